"""The paper's decoder-only transformer as pure functions over a parameter pytree.

Pre-norm blocks; RMSNorm without gain before attention, MLP and unembedding; QK-norm (RMSNorm on q and
k per head) before RoPE; causal attention; GELU MLP of width `mlp_ratio * d_model`; no biases; untied
input/output embeddings. Layers are stacked on a leading axis and run with `lax.scan`, so compile time
does not grow with depth. Parameters are f32; matmuls take `cfg.dtype` inputs (bf16 by default) and
accumulate in f32; norms, softmax and logits are f32.

This file is the architecture in plain JAX, built from the shared blocks of `core.layers` (the same
RMSNorm, RoPE and grouped-query attention Llama uses, here with kv heads == heads). How it is computed
is `cfg.numerics` (`core.backend.Numerics`): its kernels record (`backend.kernels_for(cfg)`) gives the
matmul, the attention (or the fused attention sub-block of XLA-CPU), the cache layout, the layer-loop
unroll, activation checkpointing and the row streams; this file asks the record and never the `impl`.

The parameter layout matches the authors' released `weights.npz`: `embed_in` [V,D], `embed_out` [V,D],
`qkv` [L,3,H,D,hd], `out` [L,H,hd,D], `up` [L,D,4D], `down` [L,4D,D].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from forgetting.core import backend, families, layers, xla_cpu
from forgetting.core.families import ParamSpec as ParamSpec  # re-exported: part of this module's API

Params = dict[str, jax.Array]
Cache = dict[str, Any]  # {"k": per-layer buffers, "v": ...} in the kernels' `layers.CacheLayout`


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The shape fields of the paper's transformer (unchecked: `ModelConfig` checks them)."""

    vocab_size: int = 4096  # V: number of token ids
    d_model: int = 256  # D: residual width
    n_layers: int = 6  # L: transformer blocks
    head_dim: int = 64  # per-head width; heads = d_model // head_dim (as the authors': D=288 has 4 heads of 64)
    seq_len: int = 256  # T: maximum sequence length (RoPE table and KV-cache size)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    rope_base: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    dtype: str = "bfloat16"  # matmul input dtype (f32 accumulation); "float32" for exact arithmetic


@dataclasses.dataclass(frozen=True)
class ModelConfig(Architecture):
    """The paper's transformer: its architecture, and how it is computed (`numerics`)."""

    numerics: backend.Numerics = backend.Numerics()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "head_dim", "seq_len", "mlp_ratio"):
            if getattr(self, name) <= 0:  # first: head_dim 0 would otherwise divide by zero below
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model < self.head_dim:
            raise ValueError(f"d_model={self.d_model} must be at least head_dim={self.head_dim} (one head)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        layers.check_rope_and_norm(self.rope_base, "rope_base", self.norm_eps, "norm_eps")
        if not isinstance(self.numerics, backend.Numerics):
            raise TypeError(f"numerics must be a core.backend.Numerics, got {type(self.numerics).__name__}")

    @property
    def n_heads(self) -> int:
        """floor(D / head_dim), as the authors' model: the attention width heads·head_dim may be below D."""
        return self.d_model // self.head_dim

    @property
    def d_mlp(self) -> int:
        return self.mlp_ratio * self.d_model

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """The abstract parameter tree (shape, logical axes, init std). Init N(0, D^-1/2) everywhere except
    the MLP down projection, N(0, (mlp width)^-1/2), as in the paper."""
    V, D, L, H, hd, F = cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.d_mlp
    std = D**-0.5
    return {
        "embed_in": ParamSpec((V, D), ("vocab", "embed"), std),
        "embed_out": ParamSpec((V, D), ("vocab", "embed"), std),
        "qkv": ParamSpec((L, 3, H, D, hd), ("layers", None, "heads", "embed", "head_dim"), std),
        "out": ParamSpec((L, H, hd, D), ("layers", "heads", "head_dim", "embed"), std),
        "up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), std),
        "down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), F**-0.5),
    }


def abstract_params(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    return families.abstract_params(cfg)


def init(cfg: ModelConfig, key: jax.Array) -> Params:
    """Samples parameters from the paper's init; one independent key per leaf (sorted by name)."""
    specs = param_specs(cfg)
    keys = jax.random.split(key, len(specs))
    return {
        name: (spec.init_std * jax.random.normal(k, spec.shape, jnp.float32)).astype(spec.dtype)
        for k, (name, spec) in zip(keys, sorted(specs.items()))
    }


def param_count(cfg: ModelConfig) -> int:
    """The true number of parameters (sum of leaf sizes)."""
    return families.param_count(cfg)


def paper_param_count(cfg: Any) -> int:
    """The paper's count for tokens-per-parameter and size labels: 12·L·D² + D·V (one embedding).
    The one place it is computed."""
    return 12 * cfg.n_layers * cfg.d_model**2 + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Forward+backward matmul FLOPs per trained token (6·N_matmul + attention), for MFU figures."""
    T = seq_len or cfg.seq_len
    attention = 12 * cfg.n_layers * cfg.d_model * T / 2  # causal: half the score/value matmuls are used
    return 6 * paper_param_count(cfg) + attention


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm without gain, in f32."""
    return layers.rms_norm(x, eps)


def rope_tables(positions_t: jax.Array | np.ndarray, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) [t, head_dim/2] of the rotary angles (see `layers.rope_tables`)."""
    return layers.rope_tables(positions_t, layers.rope_inv_freq(head_dim, base))


apply_rope = layers.apply_rope


def rope(x_bthd: jax.Array, positions_t: jax.Array, base: float) -> jax.Array:
    """Rotary embedding (rotate-half form) at integer positions; f32 in and out."""
    return apply_rope(x_bthd, *rope_tables(positions_t, x_bthd.shape[-1], base))


auto_streams = xla_cpu.auto_streams


def _cache_layout(kernels: backend.Kernels) -> layers.CacheLayout:
    return kernels.cache_layout(fused=True)  # the fused attention sub-block, where the kernels have one


def init_cache(cfg: ModelConfig, batch_size: int, length: int | None = None) -> Cache:
    """An empty KV cache for `batch_size` rows and `length` (default `cfg.seq_len`) positions: per layer,
    keys and values in separate buffers (the kernels' `layers.CacheLayout`), so a decoding step updates each
    layer's buffer alone (a stacked [L, ...] cache was re-stacked, i.e. copied, at every step: sampling
    32x128 tokens went from 557 to 373 ms on the benchmark model)."""
    layout = _cache_layout(backend.kernels_for(cfg))
    length = cfg.seq_len if length is None else length
    return {name: tuple(layout.empty((), batch_size, length, cfg.n_heads, cfg.head_dim) for _ in range(cfg.n_layers))
            for name in ("k", "v")}


def _attention(cfg: ModelConfig, kernels: backend.Kernels, h_btd: jax.Array, layer: Params, positions_t: Any,
               rope_sin_cos: tuple[jax.Array, jax.Array], kv_cache: tuple[jax.Array, jax.Array] | None,
               pos: jax.Array | int):
    """The attention sub-block: qkv projection, QK-norm, RoPE, causal attention, output projection."""
    if kernels.fused_attention is not None:
        return kernels.fused_attention(h_btd, layer["qkv"], layer["out"], *rope_sin_cos, cfg.norm_eps,
                                       positions_t, cfg.dtype, kv_cache, pos)
    cdt, dense = cfg.compute_dtype, kernels.dense
    q, k, v = dense("btd,khde->kbthe", h_btd, layer["qkv"], cdt)  # each [B, t, H, hd]
    q = layers.apply_rope(layers.rms_norm(q, cfg.norm_eps), *rope_sin_cos)
    k = layers.apply_rope(layers.rms_norm(k, cfg.norm_eps), *rope_sin_cos)
    attended, kv_cache = layers.cached_attention(q, k, v, positions_t, kv_cache, pos, cdt, kernels.attention,
                                                 kernels.cache)
    return dense("bthe,hed->btd", attended, layer["out"], cdt), kv_cache


def _block(cfg: ModelConfig, kernels: backend.Kernels, x_btd: jax.Array, layer: Params, positions_t: Any,
           rope_sin_cos: tuple[jax.Array, jax.Array], kv_cache: tuple[jax.Array, jax.Array] | None,
           pos: jax.Array | int):
    cdt = cfg.compute_dtype
    attended, kv_cache = _attention(cfg, kernels, layers.rms_norm(x_btd, cfg.norm_eps), layer, positions_t,
                                    rope_sin_cos, kv_cache, pos)
    x_btd = x_btd + attended
    h = layers.rms_norm(x_btd, cfg.norm_eps)
    hidden = jax.nn.gelu(kernels.dense("btd,df->btf", h, layer["up"], cdt))
    x_btd = x_btd + kernels.dense("btf,fd->btd", hidden, layer["down"], cdt)
    return x_btd, kv_cache


def _layers(params: Params) -> Params:
    return {name: params[name] for name in ("qkv", "out", "up", "down")}


def _embed(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, pos: jax.Array | int,
           cache_length: int | None = None):
    """(input embeddings f32 [B, t, D], positions [t], RoPE (sin, cos) tables) for tokens at pos..;
    with a cache of `cache_length` positions the tables come from `layers.rope_tables_at`."""
    t = tokens_bt.shape[1]
    positions_t = pos + (np.arange(t) if isinstance(pos, int) else jnp.arange(t))  # numpy: constant tables
    if cache_length is None:
        rope_sin_cos = rope_tables(positions_t, cfg.head_dim, cfg.rope_base)
    else:
        rope_sin_cos = layers.rope_tables_at(pos, t, layers.rope_inv_freq(cfg.head_dim, cfg.rope_base), cache_length)
    return params["embed_in"].astype(jnp.float32)[tokens_bt], positions_t, rope_sin_cos


def final_hidden(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, pos: jax.Array | int = 0,
                 streams: int = 1) -> jax.Array:
    """The normed last hidden states f32 [B, t, D] (what the unembedding multiplies) of a plain causal
    forward without a cache; `forward` is `unembed(final_hidden)`. Training losses take this and fuse
    the unembedding into the loss on xla_cpu (`core.fused_head`). `streams` > 1 runs the rows as that
    many independent groups (`xla_cpu.in_streams`)."""
    return xla_cpu.in_streams(lambda tokens: _final_hidden(cfg, params, tokens, pos), tokens_bt, streams)


def _final_hidden(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, pos: jax.Array | int) -> jax.Array:
    kernels = backend.kernels_for(cfg)
    x_btd, positions_t, rope_sin_cos = _embed(cfg, params, tokens_bt, pos)

    def body(x, layer):
        x, _ = _block(cfg, kernels, x, layer, positions_t, rope_sin_cos, None, pos)
        return x, None

    x_btd, _ = jax.lax.scan(kernels.checkpoint_block(body), x_btd, _layers(params), unroll=kernels.unroll)
    return layers.rms_norm(x_btd, cfg.norm_eps)


def output_embedding(cfg: ModelConfig, params: Params) -> jax.Array:
    return params["embed_out"]


def unembed(cfg: ModelConfig, params: Params, hidden_btd: jax.Array) -> jax.Array:
    """Logits f32 [B, t, V] from `final_hidden`."""
    return backend.kernels_for(cfg).dense("btd,vd->btv", hidden_btd, params["embed_out"], cfg.compute_dtype)


def _decode_hidden(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, cache: Cache, pos: jax.Array | int):
    """(normed final hidden states f32 [B, t, D], new cache) of a forward with a cache."""
    kernels = backend.kernels_for(cfg)
    cache_length = _cache_layout(kernels).length(cache)
    x_btd, positions_t, rope_sin_cos = _embed(cfg, params, tokens_bt, pos, cache_length)
    stacked = _layers(params)
    ks, vs = list(cache["k"]), list(cache["v"])
    for i in range(cfg.n_layers):  # decoding is unrolled; one cache buffer per layer
        layer = {name: w[i] for name, w in stacked.items()}
        x_btd, (ks[i], vs[i]) = _block(cfg, kernels, x_btd, layer, positions_t, rope_sin_cos, (ks[i], vs[i]), pos)
    return layers.rms_norm(x_btd, cfg.norm_eps), {"k": tuple(ks), "v": tuple(vs)}


def _forward(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, cache: Cache | None = None,
             pos: jax.Array | int = 0):
    if cache is None:
        return unembed(cfg, params, _final_hidden(cfg, params, tokens_bt, pos))
    hidden_btd, new_cache = _decode_hidden(cfg, params, tokens_bt, cache, pos)
    return unembed(cfg, params, hidden_btd), new_cache


def forward(cfg: Any, params: Params, tokens_bt: jax.Array, cache: Cache | None = None,
            pos: jax.Array | int = 0):
    """Logits f32 [B, t, V] for int tokens [B, t] at positions pos..pos+t-1, for a config of any
    registered family (`core.families`).

    Without a cache: plain causal forward (pos is normally 0). With a cache (from `cache_for`): the new
    keys/values are written at `pos` and attention runs over all earlier cached positions; returns
    (logits, new_cache).
    """
    return families.forward(cfg, params, tokens_bt, cache, pos)


def cache_for(cfg: Any, batch_size: int, length: int | None = None) -> Cache:
    """An empty KV cache of `length` positions (default `cfg.seq_len`) for a config of any registered
    family. Decoding works with any length that covers the positions written."""
    return families.init_cache(cfg, batch_size, length)


_LORA_TARGETS = {
    "qkv": ((0, 3, 1, 2, 4), 1),  # [L,3,H,D,hd] -> [L, D | 3,H,hd]
    "out": ((0, 1, 2, 3), 2),  # [L,H,hd,D] -> [L, H,hd | D]
    "up": ((0, 1, 2), 1),  # [L,D,F]
    "down": ((0, 1, 2), 1),  # [L,F,D]
}

FAMILY = families.register(families.Family(
    name="paper", config_type=ModelConfig, param_specs=param_specs, init=init, forward=_forward,
    final_hidden=lambda cfg, params, tokens: _final_hidden(cfg, params, tokens, 0),
    output_embedding=output_embedding, init_cache=init_cache, lora_targets=_LORA_TARGETS,
    decode_hidden=_decode_hidden))
