"""Properties of the losses: next-token NLL and forward KL against direct float64 numpy formulas."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgetting.core import losses

SHAPES = [(1, 2, 3), (2, 5, 7), (3, 4, 64)]  # (B, T, V): few shapes, so compilations are reused
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([0.1, 1.0, 5.0, 30.0])


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _np_kl(logits, ref_logits):
    """sum_v p_ref (log p_ref - log p), with 0 log 0 = 0."""
    lq, lp = _np_log_softmax(logits), _np_log_softmax(ref_logits)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)
    return terms.sum(-1)


def _draw(seed, shape, scale):
    rng = np.random.default_rng(seed)
    B, T, V = shape
    logits = (scale * rng.standard_normal(shape)).astype(np.float32)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = rng.random((B, T)) < 0.6
    return rng, logits, tokens, mask


# ---------------------------------------------------------------- next-token loss

@given(seed=seeds, shape=st.sampled_from(SHAPES), scale=scales)
def test_next_token_loss_matches_numpy(seed, shape, scale):
    _, logits, tokens, mask = _draw(seed, shape, scale)
    B, T, V = shape
    lsm = _np_log_softmax(logits[:, :-1])
    nll = -np.take_along_axis(lsm, tokens[:, 1:, None].astype(np.int64), axis=-1)[..., 0]  # [B, T-1]

    per_pos = np.asarray(losses.next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), per_position=True))
    assert per_pos.shape == (B, T - 1)
    np.testing.assert_allclose(per_pos, nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses.next_token_nll(jnp.asarray(logits), jnp.asarray(tokens)), nll,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses.next_token_loss(jnp.asarray(logits), jnp.asarray(tokens)), nll.mean(),
                               rtol=1e-5, atol=1e-5)

    m = mask[:, 1:]  # mask[:, 0] (the first token is never a target) must not matter
    masked = losses.next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
    want = (nll * m).sum() / max(m.sum(), 1)
    np.testing.assert_allclose(masked, want, rtol=1e-5, atol=1e-5)
    flipped = mask.copy()
    flipped[:, 0] = ~flipped[:, 0]
    np.testing.assert_allclose(losses.next_token_loss(jnp.asarray(logits), jnp.asarray(tokens),
                                                      jnp.asarray(flipped)), masked, rtol=1e-6)
    per_pos_masked = losses.next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask),
                                            per_position=True)
    np.testing.assert_allclose(per_pos_masked, nll * m, rtol=1e-5, atol=1e-5)


def test_next_token_loss_all_masked_is_zero_not_nan():
    logits = jnp.zeros((2, 3, 5))
    tokens = jnp.zeros((2, 3), jnp.int32)
    assert float(losses.next_token_loss(logits, tokens, jnp.zeros((2, 3)))) == 0.0


def test_next_token_loss_uniform_is_log_v():
    logits = jnp.zeros((2, 5, 7))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 7, (2, 5)), jnp.int32)
    np.testing.assert_allclose(losses.next_token_loss(logits, tokens), np.log(7), rtol=1e-6)


# ---------------------------------------------------------------- KL

@given(seed=seeds, shape=st.sampled_from(SHAPES), scale=scales, ref_scale=scales)
def test_kl_nonnegative_zero_on_self_and_matches_numpy(seed, shape, scale, ref_scale):
    rng, logits, _, mask = _draw(seed, shape, scale)
    ref = (ref_scale * rng.standard_normal(shape)).astype(np.float32)
    kl = np.asarray(losses.kl_per_position(jnp.asarray(logits), jnp.asarray(ref)))
    assert kl.shape == shape[:2]
    want = _np_kl(logits, ref)
    np.testing.assert_allclose(kl, want, rtol=1e-4, atol=1e-5)
    assert np.all(kl >= -1e-6)
    np.testing.assert_allclose(losses.kl_per_position(jnp.asarray(logits), jnp.asarray(logits)), 0.0, atol=1e-6)
    # invariant to a per-position shift of either side's logits (they are log-probabilities up to a constant)
    shift = rng.standard_normal(shape[:2] + (1,)).astype(np.float32) * 10
    np.testing.assert_allclose(losses.kl_per_position(jnp.asarray(logits + shift), jnp.asarray(ref - shift)),
                               kl, rtol=1e-3, atol=1e-4)
    # reductions
    np.testing.assert_allclose(losses.kl_to_reference(jnp.asarray(logits), jnp.asarray(ref)), want.mean(),
                               rtol=1e-4, atol=1e-5)
    masked = losses.kl_to_reference(jnp.asarray(logits), jnp.asarray(ref), jnp.asarray(mask))
    np.testing.assert_allclose(masked, (want * mask).sum() / max(mask.sum(), 1), rtol=1e-4, atol=1e-5)
    per_pos = losses.kl_to_reference(jnp.asarray(logits), jnp.asarray(ref), jnp.asarray(mask), per_position=True)
    np.testing.assert_allclose(per_pos, want * mask, rtol=1e-4, atol=1e-5)


def test_kl_is_forward_kl_with_reference_as_target():
    """KL(p_ref || p) with a one-hot reference is the NLL of that token under p (not the reverse KL)."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((1, 3, 6)).astype(np.float32)
    ref = np.full((1, 3, 6), -np.inf, np.float32)
    targets = np.array([2, 0, 5])
    ref[0, np.arange(3), targets] = 0.0
    kl = np.asarray(losses.kl_per_position(jnp.asarray(logits), jnp.asarray(ref)))[0]
    np.testing.assert_allclose(kl, -_np_log_softmax(logits)[0, np.arange(3), targets], rtol=1e-5)


_kl_grad = jax.jit(jax.grad(lambda x, r: losses.kl_to_reference(x, r), argnums=(0, 1)))


@given(seed=seeds, shape=st.sampled_from(SHAPES), scale=scales)
def test_kl_gradient_vanishes_at_reference(seed, shape, scale):
    _, logits, _, _ = _draw(seed, shape, scale)
    g, g_ref = _kl_grad(jnp.asarray(logits), jnp.asarray(logits))
    np.testing.assert_allclose(g, 0.0, atol=1e-7)
    assert np.all(np.asarray(g_ref) == 0)  # the reference is a constant


@given(seed=seeds, shape=st.sampled_from(SHAPES), scale=scales)
def test_kl_gradient_matches_analytic(seed, shape, scale):
    """d KL / d logits = (softmax(logits) - p_ref) / (number of positions)."""
    rng, logits, _, _ = _draw(seed, shape, scale)
    ref = rng.standard_normal(shape).astype(np.float32)
    g, _ = _kl_grad(jnp.asarray(logits), jnp.asarray(ref))
    want = (np.exp(_np_log_softmax(logits)) - np.exp(_np_log_softmax(ref))) / (shape[0] * shape[1])
    np.testing.assert_allclose(g, want, atol=1e-6)


@given(seed=seeds, shape=st.sampled_from(SHAPES), big=st.sampled_from([1e3, 1e4, 3e4]),
       n_inf=st.integers(1, 2))
def test_kl_stable_for_extreme_logits(seed, shape, big, n_inf):
    rng = np.random.default_rng(seed)
    B, T, V = shape
    logits = (big * rng.choice([-1.0, 0.0, 1.0], shape)).astype(np.float32)
    ref = (big * rng.choice([-1.0, 0.0, 1.0], shape)).astype(np.float32)
    # -inf entries in the reference (impossible tokens), never the whole row
    cols = rng.integers(0, V, (B, T, n_inf))
    for b in range(B):
        for t in range(T):
            ref[b, t, cols[b, t]] = -np.inf
            if np.all(np.isinf(ref[b, t])):
                ref[b, t, 0] = 0.0
    value = np.asarray(losses.kl_per_position(jnp.asarray(logits), jnp.asarray(ref)))
    assert np.all(np.isfinite(value)) and np.all(value >= -1e-3)
    np.testing.assert_allclose(value, _np_kl(logits, ref), rtol=1e-4, atol=1e-2)
    g, g_ref = _kl_grad(jnp.asarray(logits), jnp.asarray(ref))
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.isfinite(np.asarray(g_ref)))
    # and at the reference itself: value 0, gradient 0, even with -inf entries on both sides
    np.testing.assert_allclose(losses.kl_per_position(jnp.asarray(ref), jnp.asarray(ref)), 0.0, atol=1e-6)
    g, _ = _kl_grad(jnp.asarray(ref), jnp.asarray(ref))
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(g, 0.0, atol=1e-7)


def test_kl_in_bf16_inputs_is_computed_in_f32():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 64)), rng.standard_normal((2, 3, 64))
    kl = losses.kl_per_position(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
    assert kl.dtype == jnp.float32
    want = _np_kl(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64), np.asarray(jnp.asarray(b, jnp.bfloat16), np.float64))
    np.testing.assert_allclose(kl, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- regularizer dispatch

def test_regularizer_dispatch():
    rng = np.random.default_rng(2)
    new, ref_new, rep, ref_rep = (jnp.asarray(rng.standard_normal((2, 5, 7)), jnp.float32) for _ in range(4))
    rep_tokens = jnp.asarray(rng.integers(0, 7, (2, 5)), jnp.int32)
    kw = dict(logits_new=new, ref_logits_new=ref_new, logits_replay=rep, ref_logits_replay=ref_rep,
              replay_tokens=rep_tokens)
    assert float(losses.regularizer("none", **kw)) == 0.0
    np.testing.assert_allclose(losses.regularizer("kl_pre", **kw), _np_kl(rep, ref_rep).mean(), rtol=1e-5)
    np.testing.assert_allclose(losses.regularizer("kl_dwn", **kw), _np_kl(new, ref_new).mean(), rtol=1e-5)
    np.testing.assert_allclose(losses.regularizer("ntp_pre", **kw),
                               losses.next_token_loss(rep, rep_tokens), rtol=1e-6)
    with pytest.raises(ValueError):
        losses.regularizer("kl_post", **kw)
