"""The fused unembedding + loss (`core.fused_head`) against the plain path: logits = hidden @ Wᵀ, then
`core.losses`. Values and gradients must agree (f32: to rounding; bf16: to bf16 precision), for any
chunking of the positions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgetting.core import fused_head, losses

SHAPES = [(2, 6, 11, 8), (3, 8, 32, 16)]  # (B, T, V, D): few shapes, so compilations are reused
seeds = st.integers(0, 2**31 - 1)


def _draw(seed, shape, scale=1.0):
    rng = np.random.default_rng(seed)
    B, T, V, D = shape
    f = lambda *s: jnp.asarray(scale * rng.standard_normal(s), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)
    return f(B, T, D), f(V, D), f(B, T, D), f(V, D), tokens, mask


def _logits(h, w):
    return jnp.einsum("btd,vd->btv", h, w, precision=jax.lax.Precision.HIGHEST)


# Each property runs with the whole sequence in one chunk and with one position per chunk.
budgets = pytest.mark.parametrize("chunk_budget", [1 << 30, 1], ids=["one-chunk", "one-position-chunks"])


@budgets
@given(seed=seeds, shape=st.sampled_from(SHAPES), masked=st.booleans())
def test_next_token_loss_and_gradient_match_the_logit_path(chunk_budget, seed, shape, masked):
    h, w, _, _, tokens, mask = _draw(seed, shape)
    mask = mask if masked else None
    fused = lambda h, w: fused_head.next_token_loss(h, w, tokens, mask, "float32", chunk_budget)
    plain = lambda h, w: losses.next_token_loss(_logits(h, w), tokens, mask)
    np.testing.assert_allclose(fused(h, w), plain(h, w), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.grad(fused, (0, 1))(h, w), jax.grad(plain, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@budgets
@given(seed=seeds, shape=st.sampled_from(SHAPES), masked=st.booleans())
def test_kl_and_gradient_match_the_logit_path(chunk_budget, seed, shape, masked):
    h, w, ref_h, ref_w, _, mask = _draw(seed, shape, scale=2.0)
    mask = mask if masked else None
    fused = lambda h, w: fused_head.kl_to_reference(h, w, ref_h, ref_w, mask, "float32", chunk_budget)
    plain = lambda h, w: losses.kl_to_reference(_logits(h, w), _logits(ref_h, ref_w), mask)
    np.testing.assert_allclose(fused(h, w), plain(h, w), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.grad(fused, (0, 1))(h, w), jax.grad(plain, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The reference side is a constant: no gradient flows to it.
    g_ref = jax.grad(lambda rh, rw: fused_head.kl_to_reference(h, w, rh, rw, mask, "float32", chunk_budget),
                     (0, 1))(ref_h, ref_w)
    assert all(np.all(np.asarray(g) == 0) for g in g_ref)


@budgets
@given(seed=seeds, shape=st.sampled_from(SHAPES))
def test_kl_to_itself_is_zero_with_vanishing_gradient(chunk_budget, seed, shape):
    h, w, _, _, _, _ = _draw(seed, shape, scale=3.0)
    value, grads = jax.value_and_grad(
        lambda h, w: fused_head.kl_to_reference(h, w, h, w, None, "float32", chunk_budget), (0, 1))(h, w)
    assert float(value) == 0.0
    assert max(float(jnp.abs(g).max()) for g in grads) < 1e-6


@budgets
@given(seed=seeds, shape=st.sampled_from(SHAPES))
def test_per_position_values_match_the_logit_path(chunk_budget, seed, shape):
    h, w, ref_h, ref_w, tokens, _ = _draw(seed, shape, scale=2.0)
    B, T = tokens.shape
    nll = fused_head.nll_per_position(h, w, tokens, "float32", chunk_budget)
    assert nll.shape == (B, T - 1)
    np.testing.assert_allclose(nll, losses.next_token_nll(_logits(h, w), tokens), rtol=1e-5, atol=1e-5)
    kl = fused_head.kl_per_position(h, w, ref_h, ref_w, "float32", chunk_budget)
    assert kl.shape == (B, T)
    np.testing.assert_allclose(kl, losses.kl_per_position(_logits(h, w), _logits(ref_h, ref_w)),
                               rtol=1e-5, atol=1e-5)
    # the eval's one pass over θ's logits gives both
    both_nll, both_kl = fused_head.nll_and_kl_per_position(h, w, tokens, ref_h, ref_w, "float32", chunk_budget)
    assert both_nll.shape == (B, T - 1) and both_kl.shape == (B, T)
    np.testing.assert_allclose(both_nll, nll, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(both_kl, kl, rtol=1e-6, atol=1e-6)


@given(seed=seeds)
def test_bf16_values_and_gradients_track_f32(seed):
    """bf16 matmul inputs and bf16 logit cotangents: the answer moves by bf16 rounding, not more."""
    h, w, ref_h, ref_w, tokens, mask = _draw(seed, SHAPES[1])
    for fused in (lambda h, w, dt: fused_head.next_token_loss(h, w, tokens, mask, dt),
                  lambda h, w, dt: fused_head.kl_to_reference(h, w, ref_h, ref_w, mask, dt)):
        v32, g32 = jax.value_and_grad(fused, (0, 1))(h, w, "float32")
        v16, g16 = jax.value_and_grad(fused, (0, 1))(h, w, "bfloat16")
        np.testing.assert_allclose(v16, v32, rtol=3e-2, atol=3e-2)
        for a, b in zip(g16, g32):
            a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
            assert a.dtype == np.float32
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.03  # bf16 rounding, not a wrong formula


@given(batch=st.integers(1, 64), seq_len=st.integers(1, 300), vocab=st.integers(1, 70000),
       budget=st.integers(1, 1 << 22))
def test_chunk_length_is_the_largest_divisor_within_budget(batch, seq_len, vocab, budget):
    c = fused_head.chunk_length(batch, seq_len, vocab, budget)
    assert seq_len % c == 0
    assert c == 1 or batch * c * vocab <= budget
    assert not any(seq_len % d == 0 and batch * d * vocab <= budget for d in range(c + 1, seq_len + 1))


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 6])
def test_jitted_bf16_gradient_compiles_to_the_eager_numbers(n_chunks):
    """Under jit XLA-CPU rewrites the transposes around the head's bf16 matmuls (the dW layout depends on
    the number of chunks): every chunking must compile, run and give the eager gradient."""
    h, w, ref_h, ref_w, tokens, mask = _draw(n_chunks, SHAPES[0])
    B, T, V, _ = SHAPES[0]
    loss = lambda h, w: fused_head.next_token_loss(h, w, tokens, mask, "bfloat16", B * (T // n_chunks) * V)
    value, grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(h, w)
    eager_value, eager_grads = jax.value_and_grad(loss, (0, 1))(h, w)
    np.testing.assert_allclose(value, eager_value, rtol=1e-5)
    for a, b in zip(grads, eager_grads):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
