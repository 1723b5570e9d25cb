"""RoPE inverse frequencies and attention scaling for the rope types of Hugging Face checkpoints.

    inv_freq, attention_scaling = rope_frequencies(head_dim, base, {"rope_type": "yarn", "factor": 4.0, ...},
                                                   max_position_embeddings=131072)

`inv_freq` [head_dim/2] (float64) are the per-pair angular frequencies; `attention_scaling` multiplies cos
and sin (so q.k by its square), as `transformers` does. Supported `rope_type`s, with the fields each reads:

- "default": none (plain RoPE, attention_scaling 1).
- "linear" (position interpolation): `factor`; every frequency divided by it.
- "llama3": `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`;
  long wavelengths divided by `factor`, short ones kept, a smooth blend between.
- "yarn": `factor`, optional `original_max_position_embeddings`, `beta_fast` (32), `beta_slow` (1),
  `attention_factor`, `mscale`, `mscale_all_dim`, `truncate` (True); interpolation ramped between the
  correction dims of beta_fast and beta_slow rotations, attention scaled by 0.1 ln(factor) + 1.

Any other type, or an unknown field of a known type, raises ValueError naming it (a guess would change the
numbers silently).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

# Fields each type may carry besides rope_type/type/rope_theta (anything else is refused).
_FIELDS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                       "mscale", "mscale_all_dim", "truncate"}),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "default": (), "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
}
# Keys that name the type or the base rather than a parameter of the scaling.
_META_KEYS = frozenset({"rope_type", "type", "rope_theta"})
SUPPORTED_TYPES = tuple(_FIELDS)


def rope_type_of(scaling: Mapping[str, Any] | None) -> str:
    """The rope type of a scaling dict (`rope_type`, or the older `type`); "default" for None/empty."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def check_scaling(scaling: Mapping[str, Any] | None) -> None:
    """Raises ValueError naming an unsupported rope type, an unknown field, or a missing required one."""
    rope_type = rope_type_of(scaling)
    if rope_type not in _FIELDS:
        raise ValueError(f"unsupported rope_type {rope_type!r} (supported: {', '.join(SUPPORTED_TYPES)}); "
                         "it would change the positional encoding, so the checkpoint cannot be loaded")
    extra = sorted(set(scaling or {}) - _META_KEYS - _FIELDS[rope_type])
    if extra:
        raise ValueError(f"rope_type {rope_type!r} with unsupported field(s) {', '.join(extra)}")
    missing = [k for k in _REQUIRED[rope_type] if (scaling or {}).get(k) is None]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs field(s) {', '.join(missing)}")


def default_inv_freq(head_dim: int, base: float) -> np.ndarray:
    """base^(-2i/head_dim) for i < head_dim/2 (float64)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive even head_dim, got {head_dim}")
    return 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def _llama3(inv_freq: np.ndarray, s: Mapping[str, Any]) -> np.ndarray:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_context = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    long = wavelen > old_context / low
    short = wavelen < old_context / high
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(long, inv_freq / factor, np.where(short, inv_freq, blended))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, base: float, s: Mapping[str, Any], max_position_embeddings: int | None
          ) -> tuple[np.ndarray, float]:
    factor = float(s["factor"])
    original = s.get("original_max_position_embeddings")
    if original is not None and max_position_embeddings is not None:
        # Current transformers takes the ratio of the context lengths as the factor when both are given:
        # refuse a config where that ratio and `factor` disagree rather than pick one.
        ratio = max_position_embeddings / float(original)
        if not math.isclose(ratio, factor, rel_tol=1e-6):
            raise ValueError(f"yarn factor {factor} disagrees with max_position_embeddings / "
                             f"original_max_position_embeddings = {ratio}; fix one of them in config.json")
    elif original is None and max_position_embeddings is None:
        raise ValueError("yarn needs original_max_position_embeddings or max_position_embeddings")
    context = float(original if original is not None else max_position_embeddings)
    attention = s.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                     if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
        return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    inv_freq = default_inv_freq(head_dim, base)
    mixed = inv_freq / factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return mixed, float(attention)


def rope_frequencies(head_dim: int, base: float, scaling: Mapping[str, Any] | None = None,
                     max_position_embeddings: int | None = None) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim/2] float64, attention_scaling) of a rope type (see the module doc)."""
    check_scaling(scaling)
    rope_type = rope_type_of(scaling)
    inv_freq = default_inv_freq(head_dim, base)
    if rope_type == "default":
        return inv_freq, 1.0
    assert scaling is not None
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return _yarn(head_dim, base, scaling, max_position_embeddings)
