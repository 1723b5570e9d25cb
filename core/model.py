"""The paper's decoder-only transformer as pure functions over a parameter pytree.

Pre-norm blocks; RMSNorm without gain before attention, MLP and unembedding; QK-norm (RMSNorm on q and
k per head) before RoPE; causal attention; GELU MLP of width `mlp_ratio * d_model`; no biases; untied
input/output embeddings. Layers are stacked on a leading axis and run with `lax.scan`, so compile time
does not grow with depth. Parameters are f32; matmuls take `cfg.dtype` inputs (bf16 by default) and
accumulate in f32; norms, softmax and logits are f32.

With bf16 the backward pass keeps the same recipe (bf16 cotangents and operands, f32 accumulation)
through hand-written gradients: `core.matmul` (every projection), `core.attention` (QK-norm, RoPE and
attention in one function), and `core.fused_head` for the losses on `final_hidden` (the train and eval steps
never hold the [B, T, V] logits). With `dtype="float32"` every gradient is the exact f32 formula.

The parameter layout matches the authors' released `weights.npz`: `embed_in` [V,D], `embed_out` [V,D],
`qkv` [L,3,H,D,hd], `out` [L,H,hd,D], `up` [L,D,4D], `down` [L,4D,D].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from forgetting.core import attention, matmul

Params = dict[str, jax.Array]
Cache = dict[str, Any]  # {"k": per-layer arrays, "v": ...}; a model family defines its own layout


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the paper's transformer."""

    vocab_size: int = 4096  # V: number of token ids
    d_model: int = 256  # D: residual width
    n_layers: int = 6  # L: transformer blocks
    head_dim: int = 64  # per-head width; heads = d_model // head_dim (as the authors': D=288 has 4 heads of 64)
    seq_len: int = 256  # T: maximum sequence length (RoPE table and KV-cache size)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    rope_base: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    dtype: str = "bfloat16"  # matmul input dtype (f32 accumulation); "float32" for exact arithmetic

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


class ParamSpec(NamedTuple):
    """One leaf of the abstract parameter tree: init and shardings both derive from it."""

    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init_std: float
    dtype: Any = jnp.float32


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
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype) for k, s in param_specs(cfg).items()}


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
    return sum(math.prod(s.shape) for s in param_specs(cfg).values())


def paper_param_count(cfg: ModelConfig) -> int:
    """The paper's count for tokens-per-parameter and size labels: 12·L·D² + D·V (one embedding)."""
    return 12 * cfg.n_layers * cfg.d_model**2 + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Forward+backward matmul FLOPs per trained token (6·N_matmul + attention), for MFU figures."""
    T = seq_len or cfg.seq_len
    n_matmul = 12 * cfg.n_layers * cfg.d_model**2 + cfg.d_model * cfg.vocab_size
    attention = 12 * cfg.n_layers * cfg.d_model * T / 2  # causal: half the score/value matmuls are used
    return 6 * n_matmul + attention


rms_norm = attention.rms_norm  # RMSNorm without gain, in f32


def rope_tables(positions_t: jax.Array | np.ndarray, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) [t, head_dim/2] of the rotary angles. Concrete (numpy) positions give constant tables:
    computed in-graph, XLA-CPU fuses sin/cos into every head's rotation and evaluates them B·H times."""
    half = head_dim // 2
    xp = np if isinstance(positions_t, np.ndarray) else jnp
    inv_freq = base ** (-xp.arange(half, dtype=xp.float32) / half)
    angles_tf = positions_t.astype(xp.float32)[:, None] * inv_freq[None, :]
    return jnp.asarray(xp.sin(angles_tf), jnp.float32), jnp.asarray(xp.cos(angles_tf), jnp.float32)


def apply_rope(x_bthd: jax.Array, sin_tf: jax.Array, cos_tf: jax.Array) -> jax.Array:
    """Rotary embedding (rotate-half form) with tables from `rope_tables`; f32 in and out."""
    return attention.rotate(x_bthd, sin_tf[None, :, None, :], cos_tf[None, :, None, :])


def rope(x_bthd: jax.Array, positions_t: jax.Array, base: float) -> jax.Array:
    """Rotary embedding (rotate-half form) at integer positions; f32 in and out."""
    return apply_rope(x_bthd, *rope_tables(positions_t, x_bthd.shape[-1], base))


def init_cache(cfg: ModelConfig, batch_size: int) -> Cache:
    """An empty KV cache for `batch_size` rows and `cfg.seq_len` positions: per layer, keys and values
    [B, H, T, hd]. Separate head-major buffers: a decoding step updates each layer's buffer alone and
    attention reads it without a transpose (a stacked [L, ...] cache was re-stacked, i.e. copied, and
    transposed at every step: sampling 32x128 tokens went from 557 to 373 ms on the benchmark model)."""
    shape = (batch_size, cfg.n_heads, cfg.seq_len, cfg.head_dim)
    # f32 storage: XLA-CPU rewrites a bf16 dynamic_update_slice as convert(whole cache) -> f32 update ->
    # convert back, two full passes per layer per decoding step; the matmuls still take bf16 inputs.
    return {name: tuple(jnp.zeros(shape, jnp.float32) for _ in range(cfg.n_layers)) for name in ("k", "v")}


def _block(cfg: ModelConfig, x_btd: jax.Array, layer: Params, positions_t: jax.Array,
           rope_sin_cos: tuple[jax.Array, jax.Array], kv_cache: tuple[jax.Array, jax.Array] | None,
           pos: jax.Array | int):
    cdt = cfg.compute_dtype
    h = rms_norm(x_btd, cfg.norm_eps)
    if kv_cache is None:
        attended = attention.causal_self_attention(h, layer["qkv"], *rope_sin_cos, cfg.norm_eps, positions_t,
                                                   cfg.dtype)
    else:  # decoding: head-major, the cache's layout
        qkv = attention.project_qkv(h, layer["qkv"], cdt)
        q, k, v = attention.split_heads(qkv, *rope_sin_cos, cfg.norm_eps)  # each [B, H, t, hd]
        cache_k, cache_v = kv_cache  # [B, H, T, hd]
        keys = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, 0, pos, 0))
        values = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, 0, pos, 0))
        kv_cache = (keys, values)
        # f32 attention over the f32 cache: rounding it to bf16 for the matmuls cost a full pass over the
        # cache per layer and decoding step (40% of sampling time), for matrix-vector products.
        attended = attention.attention(q, keys, values, jnp.asarray(positions_t), jnp.arange(cache_k.shape[2]),
                                       "float32")
    x_btd = x_btd + matmul.mm("bhte,hed->btd", attended, layer["out"], cdt)
    h = rms_norm(x_btd, cfg.norm_eps)
    hidden = jax.nn.gelu(matmul.mm("btd,df->btf", h, layer["up"], cdt))
    x_btd = x_btd + matmul.mm("btf,fd->btd", hidden, layer["down"], cdt)
    return x_btd, kv_cache


def _layers(params: Params) -> Params:
    return {name: params[name] for name in ("qkv", "out", "up", "down")}


def _embed(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, pos: jax.Array | int):
    """(input embeddings f32 [B, t, D], positions [t], RoPE (sin, cos) tables) for tokens at pos.."""
    t = tokens_bt.shape[1]
    positions_t = pos + (np.arange(t) if isinstance(pos, int) else jnp.arange(t))  # numpy: constant tables
    rope_sin_cos = rope_tables(positions_t, cfg.head_dim, cfg.rope_base)
    return params["embed_in"].astype(jnp.float32)[tokens_bt], positions_t, rope_sin_cos


def final_hidden(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, pos: jax.Array | int = 0,
                 streams: int = 1) -> jax.Array:
    """The normed last hidden states f32 [B, t, D] (what the unembedding multiplies) of a plain causal
    forward without a cache; `forward` is `unembed(final_hidden)`. Training losses take this and fuse
    the unembedding into the loss (`core.fused_head`).

    `streams` > 1 (dividing B) runs the rows as that many independent groups (rows s, s + streams, ...)
    through the layers: the same function, different summation order in the weight gradients. It is for
    XLA-CPU, which runs some ops single-threaded (batched attention matmuls, matmuls fused with a
    reduction): a second independent chain of ops keeps the other core busy (see `auto_streams`).
    Strided groups keep a batch-sharded array's rows on their devices."""
    B = tokens_bt.shape[0]
    if streams <= 1 or B % streams:
        return _final_hidden(cfg, params, tokens_bt, pos)
    groups = tokens_bt.reshape(B // streams, streams, *tokens_bt.shape[1:])
    hidden = [_final_hidden(cfg, params, groups[:, s], pos) for s in range(streams)]
    return jnp.stack(hidden, axis=1).reshape(B, *hidden[0].shape[1:])


def auto_streams(rows: int) -> int:
    """`final_hidden` streams for a batch of `rows` on this backend: 2 on a single CPU device for an even
    batch of at least 16 rows (the benchmark train step: 10% faster on 2 cores), else 1. Multi-device
    and accelerator runs have their parallelism elsewhere; tiny batches would only compile twice the
    layers."""
    single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    return 2 if single_cpu and rows >= 16 and rows % 2 == 0 else 1


def _final_hidden(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, pos: jax.Array | int) -> jax.Array:
    x_btd, positions_t, rope_sin_cos = _embed(cfg, params, tokens_bt, pos)

    def body(x, layer):
        x, _ = _block(cfg, x, layer, positions_t, rope_sin_cos, None, pos)
        return x, None

    # Unrolled: XLA's CPU backend runs the backward pass of a rolled layer loop ~1.3-1.6x slower
    # (measured on this project's benchmark shapes); stacked parameters keep the tree the same.
    x_btd, _ = jax.lax.scan(body, x_btd, _layers(params), unroll=True)
    return rms_norm(x_btd, cfg.norm_eps)


def unembed(cfg: ModelConfig, params: Params, hidden_btd: jax.Array) -> jax.Array:
    """Logits f32 [B, t, V] from `final_hidden`."""
    return matmul.mm("btd,vd->btv", hidden_btd, params["embed_out"], cfg.compute_dtype)


def forward(cfg: Any, params: Params, tokens_bt: jax.Array, cache: Cache | None = None,
            pos: jax.Array | int = 0):
    """Logits f32 [B, t, V] for int tokens [B, t] at positions pos..pos+t-1.

    Without a cache: plain causal forward (pos is normally 0). With a cache (from `init_cache`): the
    new keys/values are written at `pos` and attention runs over all earlier cached positions; returns
    (logits, new_cache). Config types other than ModelConfig (e.g. a Llama config) supply their own
    `forward(params, tokens, cache, pos)` method and share everything built on this function.
    """
    if not isinstance(cfg, ModelConfig):
        return cfg.forward(params, tokens_bt, cache, pos)
    if cache is None:
        return unembed(cfg, params, final_hidden(cfg, params, tokens_bt, pos))
    x_btd, positions_t, rope_sin_cos = _embed(cfg, params, tokens_bt, pos)
    layers = _layers(params)
    ks, vs = list(cache["k"]), list(cache["v"])
    for i in range(cfg.n_layers):  # decoding is unrolled; one cache buffer per layer
        layer = {name: w[i] for name, w in layers.items()}
        x_btd, (ks[i], vs[i]) = _block(cfg, x_btd, layer, positions_t, rope_sin_cos, (ks[i], vs[i]), pos)
    new_cache = {"k": tuple(ks), "v": tuple(vs)}
    return unembed(cfg, params, rms_norm(x_btd, cfg.norm_eps)), new_cache


def cache_for(cfg: Any, batch_size: int) -> Cache:
    """`init_cache` for any supported config type."""
    if not isinstance(cfg, ModelConfig):
        return cfg.init_cache(batch_size)
    return init_cache(cfg, batch_size)
