"""The paper model's causal self-attention with QK-norm and RoPE, as tuned for XLA-CPU (`impl="xla_cpu"`,
see `core.xla_cpu`; the reference path is `core.layers.reference_attention`).

Two entry points:
- `causal_self_attention(h, w_qkv, sin, cos, eps, positions, dtype)`: from the normed input [B, t, D]
  and the qkv weight [3, H, D, hd] to the attended values f32 [B, H, t, hd], for a forward without a KV
  cache (training, evaluation). With a low-precision `dtype` it runs in a feature-major layout with a
  hand-written backward (below); with f32 it is `project_qkv` + `split_heads` + `attention` under plain
  autodiff, the textbook formula.
- `project_qkv` + `split_heads` + `attention(q, k, v, query_positions, key_positions, dtype)`:
  head-major q, k, v [B, H, t, hd], for decoding with a KV cache (keys after the cached ones).

Matmuls take `dtype` inputs with f32 accumulation; norms and softmax are f32.

Why a feature-major layout ([hd, t] per head for Q, K, V and the per-head norms) in the low-precision
path, for XLA-CPU's sake (measured on the benchmark model, `python -m forgetting.bench`):
- XLA-CPU folds a transpose that feeds a batched bf16 dot into the dot's dimension numbers; a dot that
  then contracts a non-minor axis of its left operand is upcast to f32 and runs several times slower
  (or, for some non-batched dots, fails to run). With K and V feature-major every matmul is a
  standard-layout bf16 dot: S = Q·Kᵀ and dP = dO·Vᵀ as [t, hd]·[hd, s]; O = P·V and dQ = dS·K contracting
  both minor axes; dKᵀ = Qᵀ·dS and dVᵀ = dOᵀ·P as [hd, t]·[t, s]. The [t, s]-sized transposes of P and
  dS that a head-major backward needs are gone; the transposes left are made real by `materialize`.
- The projection is computed as W·hᵀ, [3·H·hd, B·t], already t-minor: only whole rows of t move to
  reach [3, B, H, hd, t] (the head-major layout needed a strided transpose of the [B, t, 3·H·hd] output).
- The per-head RMS of q and k is a reduction over a non-minor axis (rows of t contiguous values), and the
  RoPE half swap is a swap of row blocks.
In bf16 the results are the same numbers as the head-major formulas (same roundings, measured);
`causal_self_attention` with f32 is the plain formula, and the tests check the hand-written backward in
f32 against autodiff.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from forgetting.core import layers, matmul

NEG_INF = layers.NEG_INF
f32 = jnp.float32


rms_norm = layers.rms_norm  # the shared RMSNorm (no gain here)
rotate = layers.rotate  # the shared rotate-half RoPE


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
              key_positions: jax.Array, dtype: str, probs_dtype: str | None = None) -> jax.Array:
    """Causal attention f32 [B, H, t, hd] of head-major q [B, H, t, hd] and k, v [B, H, s, hd]: query i
    sees key j iff key_positions[j] <= query_positions[i]. Plain autodiff. `probs_dtype` rounds the
    probabilities to that dtype's values (what `causal_self_attention` multiplies by v) before the
    `dtype` matmul."""
    scores = matmul.einsum_f32_acc("bhte,bhse->bhts", q, k, dtype) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(_causal(scores, query_positions, key_positions), axis=-1)
    if probs_dtype is not None:
        probs = probs.astype(probs_dtype).astype(probs.dtype)
    return matmul.einsum_f32_acc("bhts,bhse->bhte", probs, v, dtype)


def _causal(scores_bhts: jax.Array, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """Scores with the keys a query may not see set to NEG_INF."""
    allowed_ts = key_positions[None, :] <= query_positions[:, None]
    return jnp.where(allowed_ts[None, None], scores_bhts, NEG_INF)


def project_qkv(h_btd: jax.Array, w_qkv: jax.Array, dtype: str) -> jax.Array:
    """qkv [B, t, 3, H, hd] = h [B, t, D] · w_qkv [3, H, D, hd] (`dtype` inputs, f32 accumulation)."""
    _, H, D, hd = w_qkv.shape
    # One [D, 3·H·hd] weight so the output comes out row-major [B, t, 3·H·hd]: with the einsum
    # "btd,khde->kbthe" XLA-CPU computed it transposed and every consumer read it with a stride.
    w_dn = w_qkv.transpose(2, 0, 1, 3).reshape(D, 3 * H * hd)
    return matmul.mm("btd,dn->btn", h_btd, w_dn, dtype).reshape(*h_btd.shape[:2], 3, H, hd)


def causal_self_attention(h_btd: jax.Array, w_qkv: jax.Array, sin_tf: jax.Array, cos_tf: jax.Array,
                          eps: float, positions_t: jax.Array, dtype: str) -> jax.Array:
    """Attended values f32 [B, H, t, hd] from the normed input h [B, t, D] and the qkv weight
    [3, H, D, hd]: the qkv projection, QK-norm, RoPE with the tables sin/cos [t, hd/2], and causal
    softmax attention over the same t positions. The tables, eps and the positions get no gradient."""
    positions_t = jnp.asarray(positions_t)
    if jnp.dtype(dtype) == f32:
        q, k, v = split_heads(project_qkv(h_btd, w_qkv, dtype), sin_tf, cos_tf, eps)
        return attention(q, k, v, positions_t, positions_t, dtype)
    sg = jax.lax.stop_gradient
    return _feature_major(jnp.dtype(dtype).name, h_btd, w_qkv, sg(sin_tf), sg(cos_tf), f32(eps), sg(positions_t))


def materialize(x: jax.Array, i: int, j: int) -> jax.Array:
    """x itself, behind a select on an always-true iota mask over axes i < j. For the result of a
    transpose that moved those two axes out of order, which XLA would otherwise move into a consuming
    dot (see the module docstring): it does not move a transpose across such a select."""
    mask = jnp.arange(x.shape[i])[:, None] < x.shape[i] + jnp.arange(x.shape[j])[None, :]
    return jnp.where(jax.lax.broadcast_in_dim(mask, x.shape, (i, j)), x, 0)


def swap_last(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, as a real copy (a matmul operand)."""
    return materialize(x.swapaxes(-1, -2), x.ndim - 2, x.ndim - 1)


def _feature_major_forward(dtype, h_btd, w_qkv, sin_tf, cos_tf, eps, positions_t):
    B, t, D = h_btd.shape
    _, H, _, hd = w_qkv.shape
    sin_ft, cos_ft = sin_tf.T[None, None, None], cos_tf.T[None, None, None]  # against [2, B, H, hd/2, t]
    # The projection computed feature-major, [3·H·hd, B·t] = W · hᵀ (both operands contract their minor
    # axis): no transpose of the [B, t, 3·H·hd] output to t-minor, only whole rows of t move.
    w_nd = w_qkv.transpose(0, 1, 3, 2).reshape(3 * H * hd, D).astype(dtype)
    h_td = h_btd.astype(dtype).reshape(B * t, D)
    qkv_nt = jnp.einsum("nd,td->nt", w_nd, h_td, preferred_element_type=f32)
    x = materialize(qkv_nt.reshape(3, H, hd, B, t).transpose(0, 3, 1, 2, 4), 1, 2)  # [3, B, H, hd, t]
    qk = x[:2]
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(qk), axis=-2, keepdims=True) + eps)  # [2, B, H, 1, t]
    normed = qk * inv_rms
    rotated = rotate(normed, sin_ft, cos_ft, axis=-2)
    q_t, k_t, v_t = (a.astype(dtype) for a in (rotated[0], rotated[1], x[2]))  # [B, H, hd, t]
    q = swap_last(rotated[0]).astype(dtype)  # [B, H, t, hd]
    scale = 1.0 / math.sqrt(hd)
    scores = _causal(jnp.einsum("bhte,bhes->bhts", q, k_t, preferred_element_type=f32) * scale,
                     positions_t, positions_t)
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # one exp pass
    probs = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(dtype)
    out = jnp.einsum("bhts,bhes->bhte", probs, v_t, preferred_element_type=f32)
    dtype_tags = (jnp.zeros((0,), h_btd.dtype), jnp.zeros((0,), w_qkv.dtype))  # residuals must be arrays
    return out, (h_td, w_nd, q_t, k_t, v_t, probs, out, normed, inv_rms, sin_ft, cos_ft, dtype_tags)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _feature_major(dtype, h_btd, w_qkv, sin_tf, cos_tf, eps, positions_t):
    return _feature_major_forward(dtype, h_btd, w_qkv, sin_tf, cos_tf, eps, positions_t)[0]


def _feature_major_backward(dtype, residuals, d_out):
    h_td, w_nd, q_t, k_t, v_t, probs, out, normed, inv_rms, sin_ft, cos_ft, (h_tag, w_tag) = residuals
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
    d_fm = jnp.concatenate([d_qk, d_v_t[None]])  # [3, B, H, hd, t]
    _, B, H, hd, t = d_fm.shape
    # dh = d_qkv · W needs the token-major cotangent; dW = d_qkvᵀ · h the feature-major one (rows of t).
    d_qkv_tn = d_fm.transpose(1, 4, 0, 2, 3).reshape(B * t, 3 * H * hd).astype(dtype)
    d_qkv_nt = materialize(d_fm.transpose(0, 2, 3, 1, 4), 1, 3).reshape(3 * H * hd, B * t).astype(dtype)
    d_h = jnp.einsum("tn,nd->td", d_qkv_tn, w_nd, preferred_element_type=f32).reshape(B, t, -1)
    d_w_nd = jnp.einsum("nt,td->nd", d_qkv_nt, h_td, preferred_element_type=f32)
    d_w = d_w_nd.reshape(3, H, hd, -1).transpose(0, 1, 3, 2)
    return d_h.astype(h_tag.dtype), d_w.astype(w_tag.dtype), None, None, None, None


_feature_major.defvjp(_feature_major_forward, _feature_major_backward)
