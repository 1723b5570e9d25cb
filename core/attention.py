"""Causal self-attention with QK-norm and RoPE, as in PAPER.md.

Two entry points:
- `causal_self_attention(qkv, sin, cos, eps, positions, dtype)`: from the fused qkv projection
  [B, t, 3, H, hd] to the attended values f32 [B, H, t, hd], for a forward without a KV cache (training,
  evaluation). With a low-precision `dtype` it runs in a feature-major layout with a hand-written
  backward (below); with f32 it is `split_heads` + `attention` under plain autodiff, the textbook formula.
- `split_heads` + `attention(q, k, v, query_positions, key_positions, dtype)`: head-major q, k, v
  [B, H, t, hd], for decoding with a KV cache (keys after the cached ones).

Matmuls take `dtype` inputs with f32 accumulation; norms and softmax are f32.

Why a feature-major layout ([B, H, hd, t] for K, V and the per-head norms) in the low-precision path,
for XLA-CPU's sake (measured on the benchmark model, `python -m forgetting.bench`):
- XLA-CPU folds a transpose that feeds a batched bf16 dot into the dot's dimension numbers; a dot that
  then contracts a non-minor axis of its left operand is upcast to f32 and runs several times slower.
  With K and V feature-major every matmul of the forward and backward is a standard-layout bf16 dot:
  S = Q·Kᵀ and dP = dO·Vᵀ as [t, hd]·[hd, s]; O = P·V and dQ = dS·K contracting both minor axes;
  dKᵀ = Qᵀ·dS and dVᵀ = dOᵀ·P as [hd, t]·[t, s]. The [t, s]-sized transposes of P and dS that a
  head-major backward needs are gone; the transposes left ([t, hd]-sized Q and dO) are made real by
  `swap_last`.
- The per-head RMS of q and k is a reduction over a non-minor axis there (rows of t contiguous values)
  instead of over 32-value minor runs, and the RoPE half swap is a swap of row blocks.
In bf16 the results are the same numbers as the head-major formulas (same roundings); `causal_self_attention`
with f32 is the plain formula, and the tests check the hand-written backward in f32 against autodiff.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from forgetting.core import matmul

NEG_INF = -1e30  # masked scores: finite, so a fully masked row cannot produce NaN
f32 = jnp.float32


def rms_norm(x: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """RMSNorm without gain over `axis`, computed in f32."""
    x = x.astype(f32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


def rotate(x: jax.Array, sin: jax.Array, cos: jax.Array, axis: int = -1) -> jax.Array:
    """Rotate-half RoPE along `axis` (the head feature axis), with tables that broadcast against one
    half of x: (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin)."""
    x1, x2 = jnp.split(x, 2, axis=axis)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis)


def _rotate_transpose(g: jax.Array, sin: jax.Array, cos: jax.Array, axis: int) -> jax.Array:
    """The transpose (= inverse) of `rotate`: a rotation by the opposite angle."""
    return rotate(g, -sin, cos, axis)


def split_heads(qkv_bt3he: jax.Array, sin_tf: jax.Array, cos_tf: jax.Array, eps: float):
    """q, k, v f32 [B, H, t, hd] from qkv [B, t, 3, H, hd]: q and k RMS-normed per head (no gain), then
    rotated with the RoPE tables sin/cos [t, hd/2]."""
    x = qkv_bt3he.astype(f32).transpose(2, 0, 3, 1, 4)  # [3, B, H, t, hd]
    qk = rotate(rms_norm(x[:2], eps), sin_tf[None, None, None], cos_tf[None, None, None])
    return qk[0], qk[1], x[2]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, query_positions: jax.Array,
              key_positions: jax.Array, dtype: str) -> jax.Array:
    """Causal attention f32 [B, H, t, hd] of head-major q [B, H, t, hd] and k, v [B, H, s, hd]: query i
    sees key j iff key_positions[j] <= query_positions[i]. Plain autodiff."""
    scores = matmul.einsum_f32_acc("bhte,bhse->bhts", q, k, dtype) / math.sqrt(q.shape[-1])
    allowed_ts = key_positions[None, :] <= query_positions[:, None]
    probs = jax.nn.softmax(jnp.where(allowed_ts[None, None], scores, NEG_INF), axis=-1)
    return matmul.einsum_f32_acc("bhts,bhse->bhte", probs, v, dtype)


def causal_self_attention(qkv_bt3he: jax.Array, sin_tf: jax.Array, cos_tf: jax.Array, eps: float,
                          positions_t: jax.Array, dtype: str) -> jax.Array:
    """Attended values f32 [B, H, t, hd] from qkv [B, t, 3, H, hd] (QK-norm, RoPE with the tables
    sin/cos [t, hd/2], causal softmax attention over the same t positions). The tables, eps and the
    positions get no gradient."""
    positions_t = jnp.asarray(positions_t)
    if jnp.dtype(dtype) == f32:
        q, k, v = split_heads(qkv_bt3he, sin_tf, cos_tf, eps)
        return attention(q, k, v, positions_t, positions_t, dtype)
    sg = jax.lax.stop_gradient
    return _feature_major(jnp.dtype(dtype).name, qkv_bt3he, sg(sin_tf), sg(cos_tf), f32(eps), sg(positions_t))


def swap_last(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, as a real copy, for a matmul operand. XLA moves a bare transpose, or one under a
    select whose other operands are broadcasts, into the consuming dot (see the module docstring); a
    select on an always-true [cols, rows] iota mask is left alone."""
    rows, cols = x.shape[-2:]
    keep = jnp.arange(cols)[:, None] < cols + jnp.arange(rows)[None, :]
    return jnp.where(keep, x.swapaxes(-1, -2), 0)


def _feature_major_forward(dtype, qkv_bt3he, sin_tf, cos_tf, eps, positions_t):
    sin_ft, cos_ft = sin_tf.T[None, None, None], cos_tf.T[None, None, None]  # against [2, B, H, hd/2, t]
    x = qkv_bt3he.astype(f32).transpose(2, 0, 3, 4, 1)  # [3, B, H, hd, t]
    qk = x[:2]
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(qk), axis=-2, keepdims=True) + eps)  # [2, B, H, 1, t]
    normed = qk * inv_rms
    rotated = rotate(normed, sin_ft, cos_ft, axis=-2)
    q_t, k_t, v_t = (a.astype(dtype) for a in (rotated[0], rotated[1], x[2]))  # [B, H, hd, t]
    q = swap_last(rotated[0]).astype(dtype)  # [B, H, t, hd]
    scale = 1.0 / math.sqrt(qkv_bt3he.shape[-1])
    scores = jnp.einsum("bhte,bhes->bhts", q, k_t, preferred_element_type=f32) * scale
    allowed_ts = positions_t[None, :] <= positions_t[:, None]
    scores = jnp.where(allowed_ts[None, None], scores, NEG_INF)
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # one exp pass
    probs = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(dtype)
    out = jnp.einsum("bhts,bhes->bhte", probs, v_t, preferred_element_type=f32)
    dtype_tag = jnp.zeros((0,), qkv_bt3he.dtype)  # residuals must be arrays
    return out, (q_t, k_t, v_t, probs, out, normed, inv_rms, sin_ft, cos_ft, dtype_tag)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _feature_major(dtype, qkv_bt3he, sin_tf, cos_tf, eps, positions_t):
    return _feature_major_forward(dtype, qkv_bt3he, sin_tf, cos_tf, eps, positions_t)[0]


def _feature_major_backward(dtype, residuals, d_out):
    q_t, k_t, v_t, probs, out, normed, inv_rms, sin_ft, cos_ft, dtype_tag = residuals
    scale = 1.0 / math.sqrt(q_t.shape[-2])
    row_dot = jnp.sum(d_out * out, axis=-1, keepdims=True)  # Σ_s dP·P, the softmax correction [B, H, t, 1]
    # The cotangent arrives as a transposed view of a token-major array; a select on its data keeps the
    # head-major copy real (non-finite rows propagate, as they would have anyway).
    d_out_lp = jnp.where(jnp.isfinite(row_dot), d_out, row_dot).astype(dtype)  # [t, hd]
    d_out_t = swap_last(d_out_lp)  # [hd, t]
    d_probs = jnp.einsum("bhte,bhes->bhts", d_out_lp, v_t, preferred_element_type=f32)
    d_scores = (probs.astype(f32) * (d_probs - row_dot) * scale).astype(dtype)
    d_q = jnp.einsum("bhts,bhes->bhte", d_scores, k_t, preferred_element_type=f32)  # [t, hd]
    d_k_t = jnp.einsum("bhet,bhts->bhes", q_t, d_scores, preferred_element_type=f32)  # [hd, s]
    d_v_t = jnp.einsum("bhet,bhts->bhes", d_out_t, probs, preferred_element_type=f32)  # [hd, s]
    d_normed = _rotate_transpose(jnp.stack([d_q.swapaxes(-1, -2), d_k_t]), sin_ft, cos_ft, axis=-2)
    d_qk = inv_rms * (d_normed - normed * jnp.mean(d_normed * normed, axis=-2, keepdims=True))
    d_x = jnp.concatenate([d_qk, d_v_t[None]]).transpose(1, 4, 0, 2, 3)  # back to [B, t, 3, H, hd]
    return d_x.astype(dtype_tag.dtype), None, None, None, None


_feature_major.defvjp(_feature_major_forward, _feature_major_backward)
