"""Building blocks shared by every model family.

One RMSNorm (optional gain), one RoPE (rotate-half; frequencies from the family), one grouped-query
causal attention (multi-head attention is the case kv_heads == heads) in two forms, the matmul recipe,
and the KV-cache protocol (`CacheLayout`). Which attention and matmul a model uses, and its cache layout,
come from its config's kernels record (`core.backend.kernels_for`); nothing here tests an implementation.

Matmuls take `dtype` inputs and accumulate in f32; norms, RoPE and softmax are f32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30  # masked scores: finite, so a fully masked row cannot produce NaN
f32 = jnp.float32


def check_rope_and_norm(base: float, base_name: str, eps: float, eps_name: str) -> None:
    """A RoPE base <= 0 or a negative RMSNorm epsilon makes every loss NaN: refused by name up front."""
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"{base_name} must be a positive number (the RoPE base, e.g. 10000), got {base}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{eps_name} must be a number >= 0 (the RMSNorm epsilon, e.g. 1e-6), got {eps}")


# --- norm and RoPE ----------------------------------------------------------------------------------------
def rms_norm(x: jax.Array, eps: float, gain: jax.Array | None = None) -> jax.Array:
    """RMSNorm over the last axis in f32, times `gain` [last axis] when given."""
    x = x.astype(f32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    if gain is None:
        return x
    return x * gain.astype(f32).reshape((1,) * (x.ndim - 1) + (-1,))


def rope_inv_freq(head_dim: int, base: float, dtype: Any = np.float32) -> np.ndarray:
    """Plain RoPE inverse frequencies base^(-2i/head_dim), i < head_dim/2, computed in f64 (a family's
    frequency scaling works on the f64 values), returned as `dtype`."""
    return (1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(dtype)


def rope_tables(positions_t: jax.Array | np.ndarray, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) f32 [t, head_dim/2] of the rotary angles. Concrete (numpy) positions give constant
    tables (computed in-graph, XLA-CPU fuses sin/cos into every head's rotation)."""
    xp = np if isinstance(positions_t, np.ndarray) else jnp
    angles_tf = positions_t.astype(xp.float32)[:, None] * xp.asarray(inv_freq, xp.float32)[None, :]
    return jnp.asarray(xp.sin(angles_tf), f32), jnp.asarray(xp.cos(angles_tf), f32)


def rope_tables_at(pos: jax.Array | int, t: int, inv_freq: np.ndarray, positions: int) -> tuple[jax.Array, jax.Array]:
    """`rope_tables` for positions pos..pos+t-1, all below `positions` (a KV cache's length). A traced
    `pos` (a decoding loop's) slices constant tables of `positions` rows: computed from a traced
    position, sin/cos were re-evaluated inside every head's rotation (XLA-CPU fuses them into each
    consumer), 10% of a decoding step."""
    if isinstance(pos, (int, np.integer)):
        return rope_tables(pos + np.arange(t), inv_freq)
    sin_pf, cos_pf = rope_tables(np.arange(positions), inv_freq)
    return (jax.lax.dynamic_slice_in_dim(sin_pf, pos, t), jax.lax.dynamic_slice_in_dim(cos_pf, pos, t))


def rotate(x: jax.Array, sin: jax.Array, cos: jax.Array, axis: int = -1) -> jax.Array:
    """Rotate-half RoPE along `axis`, tables broadcasting against one half of x:
    (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin)."""
    x1, x2 = jnp.split(x, 2, axis=axis)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis)


def apply_rope(x_bthd: jax.Array, sin_tf: jax.Array, cos_tf: jax.Array) -> jax.Array:
    """RoPE on [B, t, heads, hd] with tables [t, hd/2]; f32 out."""
    return rotate(x_bthd.astype(f32), sin_tf[None, :, None, :], cos_tf[None, :, None, :])


# --- matmul and attention ---------------------------------------------------------------------------------
def einsum_f32_acc(spec: str, a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """einsum of `a` and `b` cast to `dtype`, accumulated and returned in f32 (plain autodiff)."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=f32)


def reference_attention(q_bthe: jax.Array, k_bske: jax.Array, v_bske: jax.Array, q_positions_t: jax.Array,
                        k_positions_s: jax.Array | None, dtype: Any) -> jax.Array:
    """Causal grouped-query attention, f32 [B, t, H, e], by `jax.nn.dot_product_attention` (plain autodiff,
    forward mode included): q [B, t, H, e], k/v [B, s, K, e] with H a multiple of K; query head h reads kv
    head h // (H // K) (Hugging Face's `repeat_kv`). Key j is visible to query i iff k_positions[j] <=
    q_positions[i]; `k_positions_s` None means the keys are the queries' own positions (a plain causal
    forward: on GPU this can then use cuDNN's causal flash attention, which takes no explicit mask)."""
    dt = jnp.dtype(dtype)
    q, k, v = q_bthe.astype(dt), k_bske.astype(dt), v_bske.astype(dt)
    if k_positions_s is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True).astype(f32)
    visible_ts = jnp.asarray(k_positions_s)[None, :] <= jnp.asarray(q_positions_t)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=visible_ts[None, None]).astype(f32)


def softmax_attention(q_bthe: jax.Array, k_bske: jax.Array, v_bske: jax.Array, q_positions_t: jax.Array,
                      k_positions_s: jax.Array | None, dtype: Any, *, dense: Callable = einsum_f32_acc) -> jax.Array:
    """`reference_attention` written out (scores, mask, softmax, values), its two matmuls by `dense`
    (spec, a, b, dtype) -> f32: the form whose matmuls a backend can swap (`core.matmul.mm` on xla_cpu)."""
    k_positions_s = q_positions_t if k_positions_s is None else k_positions_s
    visible_ts = jnp.asarray(k_positions_s)[None, :] <= jnp.asarray(q_positions_t)[:, None]
    B, t, H, e = q_bthe.shape
    K = k_bske.shape[2]
    q = q_bthe.reshape(B, t, K, H // K, e)
    scores = dense("btkge,bske->bkgts", q, k_bske, dtype) / math.sqrt(e)
    scores = jnp.where(visible_ts[None, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    return dense("bkgts,bske->btkge", probs, v_bske, dtype).reshape(B, t, H, e)


def cached_attention(q_bthe: jax.Array, k_btke: jax.Array, v_btke: jax.Array, positions_t: jax.Array,
                     kv_cache: tuple[jax.Array, jax.Array] | None, pos: jax.Array | int, dtype: Any,
                     attention: Callable, layout: "CacheLayout") -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """(causal `attention` of the new queries, updated cache): without a cache over the new keys alone; with
    one (token-major `layout` buffers [B, T, K, e]), the new keys/values are written at `pos` and every cached
    position is visible up to each query's own."""
    if kv_cache is None:
        return attention(q_bthe, k_btke, v_btke, positions_t, None, dtype), None
    kv_cache = layout.write(kv_cache, k_btke, v_btke, pos)
    keys, values = kv_cache
    return attention(q_bthe, keys, values, positions_t, jnp.arange(keys.shape[1]), dtype), kv_cache


def update_cache(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array | int,
                 time_axis: int) -> tuple[jax.Array, jax.Array]:
    """The cache buffers with new keys/values written at `pos` along `time_axis`."""
    def put(buf, x):
        start = [0] * buf.ndim
        start[time_axis] = pos
        return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), tuple(start))

    return put(cache_k, k), put(cache_v, v)


# --- the KV-cache protocol --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """How every family's KV cache stores keys and values: a cache is {"k": buffers, "v": buffers}, the
    buffers one array per layer (a tuple: the paper model decodes unrolled) or one stacked [L, ...] array
    (Llama scans its layers); either way each layer's buffer ends in [..., T, K, hd] (token-major) or
    [..., K, T, hd] (`head_major`), so the time axis counted from the end is the same for every family.
    Chosen by the config's kernels (`core.backend`): the dtype, and head-major for the paper model's fused
    xla_cpu attention."""

    dtype: Any
    head_major: bool

    @property
    def time_axis(self) -> int:
        return -2 if self.head_major else -3

    def empty(self, lead: tuple[int, ...], batch: int, length: int, heads: int, head_dim: int) -> jax.Array:
        """One zero buffer [*lead, B, T, K, hd] (or [*lead, B, K, T, hd])."""
        inner = (heads, length) if self.head_major else (length, heads)
        return jnp.zeros((*lead, batch, *inner, head_dim), self.dtype)

    def length(self, cache: Any) -> int:
        """The positions a cache holds."""
        return jax.tree.leaves(cache)[0].shape[self.time_axis]

    def write(self, kv: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array,
              pos: jax.Array | int) -> tuple[jax.Array, jax.Array]:
        """One layer's (keys, values) buffers with new ones (in this layout) written at position `pos`."""
        return update_cache(*kv, k, v, pos, time_axis=kv[0].ndim + self.time_axis)
