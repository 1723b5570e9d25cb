"""Causal softmax attention over head-major arrays, with a hand-written low-precision backward.

`attention(q, k, v, query_positions, key_positions, dtype)`: q [B, H, t, hd], k/v [B, H, s, hd] ->
f32 [B, H, t, hd]; query i sees key j iff key_positions[j] <= query_positions[i]. Matmuls take `dtype`
inputs with f32 accumulation; softmax is f32.

With bf16 the gradient is written out rather than left to autodiff, for XLA-CPU's sake: autodiff
multiplies f32 cotangents by upcast operands (f32 matmuls run at half the bf16 speed), and two of its
four matmuls contract over a non-minor axis, which XLA-CPU runs as f32 Eigen dots outside its fast
matmul library (≈45 GFLOP/s against several hundred). Worse, XLA-CPU folds any transpose that feeds a
batched bf16 dot into the dot's dimension numbers and then upcasts the dot to f32; so a new matmul here
should be checked in the compiled HLO (`jit(f).lower(...).compile().as_text()`), not assumed bf16.
Here every matmul is bf16 in a standard layout (the [t, s] matrices are transposed by a masked select,
which XLA cannot fold away), and the softmax backward uses rowsum(dO ∘ O) = rowsum(dP ∘ P) ([t, hd]
work instead of [t, s]). With f32 this is plain autodiff, so exact-arithmetic tests see the textbook
formula.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from forgetting.core import matmul

NEG_INF = -1e30  # masked scores: finite, so a fully masked row cannot produce NaN


def _masked_scores(q, k, query_positions, key_positions, dtype):
    """q kᵀ / √hd [B, H, t, s] in f32, with keys a query may not see set to NEG_INF."""
    scores_bhts = matmul.einsum_f32_acc("bhte,bhse->bhts", q, k, dtype) / math.sqrt(q.shape[-1])
    causal_ts = key_positions[None, :] <= query_positions[:, None]
    return jnp.where(causal_ts[None, None], scores_bhts, NEG_INF)


def _attend(probs_bhts, v, dtype):
    return matmul.einsum_f32_acc("bhts,bhse->bhte", probs_bhts, v, dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, query_positions: jax.Array,
              key_positions: jax.Array, dtype: str) -> jax.Array:
    """Causal attention f32 [B, H, t, hd]; see the module docstring."""
    if jnp.dtype(dtype) == jnp.float32:
        probs_bhts = jax.nn.softmax(_masked_scores(q, k, query_positions, key_positions, dtype), axis=-1)
        return _attend(probs_bhts, v, dtype)
    return _attention_lowp(dtype, q, k, v, query_positions, key_positions)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_lowp(dtype, q, k, v, query_positions, key_positions):
    return _attention_lowp_fwd(dtype, q, k, v, query_positions, key_positions)[0]


def _attention_lowp_fwd(dtype, q, k, v, query_positions, key_positions):
    scores_bhts = _masked_scores(q, k, query_positions, key_positions, dtype)
    top_bht1 = jnp.max(scores_bhts, axis=-1, keepdims=True)
    e_bhts = jnp.exp(scores_bhts - top_bht1)  # one exp pass (logsumexp + exp(s - lse) would be two)
    probs_bhts = e_bhts / jnp.sum(e_bhts, axis=-1, keepdims=True)
    out = _attend(probs_bhts, v, dtype)
    tags = tuple(jnp.zeros((0,), x.dtype) for x in (q, k, v))  # the input dtypes (residuals are arrays)
    residuals = (q.astype(dtype), k.astype(dtype), v.astype(dtype), probs_bhts.astype(dtype), out,
                 query_positions, key_positions, tags)
    return out, residuals


def _attention_lowp_bwd(dtype, residuals, d_out):
    q, k, v, probs, out, query_positions, key_positions, (q_tag, k_tag, v_tag) = residuals
    f32 = jnp.float32
    scale = 1.0 / math.sqrt(q.shape[-1])
    row_dot_bht = jnp.sum(d_out * out, axis=-1)  # = Σ_s dP·P, the softmax correction
    # The cotangent usually arrives as a transposed view of a token-major array. XLA-CPU folds a bare
    # transpose into the consuming dots, which then contract non-leading batch axes and get upcast to f32
    # (several times slower). Selecting on data keeps the transposed copy real; where the row is not
    # finite, the non-finite value propagates, as it would have anyway.
    d_out_lp = jnp.where(jnp.isfinite(row_dot_bht)[..., None], d_out, row_dot_bht[..., None]).astype(dtype)
    # Query-major [t, s]: dQ = dS·K.
    d_probs = jnp.einsum("bhte,bhse->bhts", d_out_lp, v, preferred_element_type=f32)
    d_scores = (probs.astype(f32) * (d_probs - row_dot_bht[..., None]) * scale).astype(dtype)
    d_q = jnp.einsum("bhts,bhse->bhte", d_scores, k, preferred_element_type=f32)
    # Key-major [s, t] copies for dV = Pᵀ·dO and dK = dSᵀ·Q. A bare transpose would be folded into the
    # dot by XLA-CPU, and a batched dot contracting a non-minor axis is upcast to f32 and runs several
    # times slower; selecting with the (transposed) causal mask makes the copy real.
    causal_st = (key_positions[:, None] <= query_positions[None, :])[None, None]
    probs_bhst = jnp.where(causal_st, probs.swapaxes(-1, -2), 0)
    d_scores_bhst = jnp.where(causal_st, d_scores.swapaxes(-1, -2), 0)
    d_v = jnp.einsum("bhst,bhte->bhse", probs_bhst, d_out_lp, preferred_element_type=f32)
    d_k = jnp.einsum("bhst,bhte->bhse", d_scores_bhst, q, preferred_element_type=f32)
    return (d_q.astype(q_tag.dtype), d_k.astype(k_tag.dtype), d_v.astype(v_tag.dtype), None, None)


_attention_lowp.defvjp(_attention_lowp_fwd, _attention_lowp_bwd)
