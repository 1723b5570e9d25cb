"""Properties of the learning-rate schedules and the optimizers."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgetting.core import optim

peaks = st.floats(1e-6, 1.0)
warmups = st.integers(1, 2000)


def _lr(sched, s):
    return float(sched(s))


@given(peak=peaks, warmup=warmups, frac=st.floats(0.0, 1.0))
def test_warmup_is_linear_from_zero(peak, warmup, frac):
    sched = optim.schedule(peak, warmup)
    s = min(int(frac * warmup), warmup)
    assert _lr(sched, 0) == 0.0
    np.testing.assert_allclose(_lr(sched, s), peak * s / warmup, rtol=1e-5, atol=peak * 1e-6)


@given(peak=peaks, warmup=st.integers(0, 2000), extra=st.integers(0, 10**6))
def test_constant_after_warmup(peak, warmup, extra):
    sched = optim.schedule(peak, warmup)
    np.testing.assert_allclose(_lr(sched, warmup + extra), peak, rtol=1e-6)


@given(peak=peaks, warmup=st.integers(0, 500), decay_steps=st.integers(2, 5000), frac=st.floats(0, 1))
def test_cosine_decay(peak, warmup, decay_steps, frac):
    total = warmup + decay_steps
    sched = optim.schedule(peak, warmup, total, decay="cosine")
    np.testing.assert_allclose(_lr(sched, warmup), peak, rtol=1e-5)
    assert _lr(sched, total) <= peak * 1e-6  # reaches ~0 at the end
    s = warmup + int(frac * decay_steps)
    want = 0.5 * peak * (1 + math.cos(math.pi * (s - warmup) / decay_steps))
    np.testing.assert_allclose(_lr(sched, s), want, rtol=1e-4, atol=peak * 1e-5)
    steps = np.linspace(warmup, total, 50).astype(int)
    lrs = np.array([_lr(sched, int(x)) for x in steps])
    assert np.all(np.diff(lrs) <= peak * 1e-6)  # non-increasing after warm-up
    if warmup:
        np.testing.assert_allclose(_lr(sched, warmup // 2), peak * (warmup // 2) / warmup, rtol=1e-5,
                                   atol=peak * 1e-6)


def test_schedule_errors():
    with pytest.raises(ValueError):
        optim.schedule(1e-3, 10, decay="cosine")  # cosine needs total_steps
    with pytest.raises(ValueError):
        optim.schedule(1e-3, 10, 100, decay="linear")
    with pytest.raises(ValueError):
        optim.optimizer("adam", 1e-3)


def _one_update(opt, params, grads):
    state = opt.init(params)
    updates, _ = opt.update(grads, state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates)


@given(seed=st.integers(0, 2**31 - 1), lr=st.floats(1e-4, 1.0), wd=st.sampled_from([0.0, 0.02, 0.5]))
def test_sgd_step(seed, lr, wd):
    rng = np.random.default_rng(seed)
    p, g = rng.standard_normal(7).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    new = _one_update(optim.optimizer("sgd", lr, weight_decay=wd), {"w": jnp.asarray(p)}, {"w": jnp.asarray(g)})
    np.testing.assert_allclose(new["w"], p - lr * (g + wd * p), rtol=1e-5, atol=1e-6)


def test_sgd_by_default_is_plain_and_adamw_keeps_the_papers_decay():
    """Core API defaults: `optimizer("sgd", lr)` is plain SGD (no weight decay), as the CLI's sgd is;
    `optimizer("adamw", lr)` keeps the paper's weight decay 0.02."""
    p, g = np.array([1.0, -2.0, 3.0], np.float32), np.array([0.5, 0.25, -1.0], np.float32)
    sgd = _one_update(optim.optimizer("sgd", 0.1), {"w": jnp.asarray(p)}, {"w": jnp.asarray(g)})
    np.testing.assert_allclose(sgd["w"], p - 0.1 * g, rtol=1e-6)
    adamw = _one_update(optim.optimizer("adamw", 0.1), {"w": jnp.asarray(p)}, {"w": jnp.asarray(g)})
    np.testing.assert_allclose(adamw["w"], p - 0.1 * (np.sign(g) + 0.02 * p), rtol=1e-4)


@given(seed=st.integers(0, 2**31 - 1), lr=st.floats(1e-4, 1e-1), wd=st.sampled_from([0.0, 0.02]))
def test_adamw_first_step_is_sign_plus_decoupled_decay(seed, lr, wd):
    """Adam's first update is g/|g| (bias-corrected moments), plus decoupled weight decay lr·wd·p."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(7).astype(np.float32)
    g = (rng.standard_normal(7) + np.sign(rng.standard_normal(7))).astype(np.float32)  # |g| not tiny
    new = _one_update(optim.optimizer("adamw", lr, weight_decay=wd), {"w": jnp.asarray(p)}, {"w": jnp.asarray(g)})
    np.testing.assert_allclose(new["w"], p - lr * (np.sign(g) + wd * p), rtol=1e-4, atol=1e-6)


def test_adamw_defaults_match_paper():
    """β 0.9/0.999 and weight decay 0.02: second step against a numpy AdamW."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal(5)
    g1, g2 = rng.standard_normal(5), rng.standard_normal(5)
    lr, b1, b2, wd, eps = 1e-2, 0.9, 0.999, 0.02, 1e-8
    opt = optim.optimizer("adamw", lr)
    params = {"w": jnp.asarray(p, jnp.float32)}
    state = opt.init(params)
    want = p.copy()
    m = v = np.zeros(5)
    for t, g in enumerate([g1, g2], start=1):
        upd, state = opt.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = jax.tree.map(lambda a, u: a + u, params, upd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        want = want - lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * want)
    np.testing.assert_allclose(params["w"], want, rtol=1e-5, atol=1e-6)


def test_schedule_drives_optimizer():
    sched = optim.schedule(0.5, 4)
    opt = optim.optimizer("sgd", sched, weight_decay=0.0)
    params = {"w": jnp.zeros(1)}
    state = opt.init(params)
    seen = []
    for _ in range(6):
        upd, state = opt.update({"w": -jnp.ones(1)}, state, params)
        seen.append(float(upd["w"][0]))
    np.testing.assert_allclose(seen, [0.0, 0.125, 0.25, 0.375, 0.5, 0.5], rtol=1e-6)
