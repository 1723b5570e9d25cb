"""Properties of the train and eval steps: the combined objective, the reference as a constant, LoRA,
overfitting a batch, and eval sums against direct numpy computations."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgetting.core import losses, model, optim, step

fwd = jax.jit(model.forward, static_argnums=0)
B, R, T, V = 4, 4, 16, 64
LR = 0.5
seeds = st.integers(0, 2**31 - 1)
SGD = optim.optimizer("sgd", LR, weight_decay=0.0)


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"tokens": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
            "replay": jnp.asarray(rng.integers(0, V, (R, T)), jnp.int32)}


@functools.cache
def _train_step(cfg, reg_method: str, coeff: float):
    return step.make_train_step(cfg, SGD, reg_method=reg_method, reg_coeff=coeff)


@functools.cache
def _grad(cfg, reg_method: str, coeff: float):
    return jax.jit(jax.grad(step.make_loss_fn(cfg, reg_method=reg_method, reg_coeff=coeff), has_aux=True))


def _np_nll(logits, tokens):
    x = np.asarray(logits, np.float64)[:, :-1]
    m = x.max(-1, keepdims=True)
    lsm = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    return -np.take_along_axis(lsm, np.asarray(tokens)[:, 1:, None].astype(np.int64), axis=-1)[..., 0]


def _np_kl(logits, ref):
    def lsm(x):
        x = np.asarray(x, np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    lq, lp = lsm(logits), lsm(ref)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _tree_allclose(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# ---------------------------------------------------------------- the objective

@given(seed=seeds)
def test_zero_coefficient_equals_plain_ntp(tiny_cfg, tiny_params, tiny_ref_params, seed):
    method = "kl_pre"
    batch = _batch(seed)
    frozen = {"ref": tiny_ref_params, "base": None}
    plain, m_plain = _train_step(tiny_cfg, "none", 0.0)(step.init_state(tiny_params, SGD), batch, frozen)
    reg, m_reg = _train_step(tiny_cfg, method, 0.0)(step.init_state(tiny_params, SGD), batch, frozen)
    _tree_allclose(reg.params, plain.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_reg["ntp"], m_plain["ntp"], rtol=1e-5)
    np.testing.assert_allclose(m_reg["loss"], m_plain["ntp"], rtol=1e-5)
    assert float(m_plain["reg"]) == 0.0
    assert float(m_reg["reg"]) > 0  # the regularizer is computed, just weighted by 0
    # and the step really moved the parameters, by -lr * grad
    grads, _ = _grad(tiny_cfg, "none", 0.0)(tiny_params, frozen, batch)
    _tree_allclose(plain.params, jax.tree.map(lambda p, g: p - LR * g, tiny_params, grads),
                   rtol=1e-5, atol=1e-6)


@given(seed=seeds)
def test_kl_pre_gradient_vanishes_at_reference(tiny_cfg, tiny_params, tiny_ref_params, seed):
    batch = _batch(seed)
    at_ref = {"ref": tiny_params, "base": None}
    g_ntp, m_ntp = _grad(tiny_cfg, "none", 0.0)(tiny_params, at_ref, batch)
    g_kl, m_kl = _grad(tiny_cfg, "kl_pre", 10.0)(tiny_params, at_ref, batch)
    assert abs(float(m_kl["reg"])) < 1e-5
    _tree_allclose(g_kl, g_ntp, rtol=1e-4, atol=1e-5)
    # away from the reference the KL term does pull (the comparison above is not vacuous)
    away = {"ref": tiny_ref_params, "base": None}
    g_away, m_away = _grad(tiny_cfg, "kl_pre", 10.0)(tiny_params, away, batch)
    assert float(m_away["reg"]) > 1e-3
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_away), jax.tree.leaves(g_ntp)))
    assert diff > 1e-3


@given(seed=seeds)
def test_objective_is_ntp_plus_coeff_times_reg(tiny_cfg, tiny_params, tiny_ref_params, seed):
    """The metrics equal direct numpy computations, and loss = ntp + coeff * reg."""
    batch = _batch(seed)
    frozen = {"ref": tiny_ref_params, "base": None}
    _, m10 = _grad(tiny_cfg, "kl_pre", 10.0)(tiny_params, frozen, batch)
    rep = np.asarray(batch["replay"])
    want_reg = _np_kl(fwd(tiny_cfg, tiny_params, rep), fwd(tiny_cfg, tiny_ref_params, rep)).mean()
    want_ntp = _np_nll(fwd(tiny_cfg, tiny_params, batch["tokens"]), batch["tokens"]).mean()
    np.testing.assert_allclose(m10["reg"], want_reg, rtol=1e-4)
    np.testing.assert_allclose(m10["ntp"], want_ntp, rtol=1e-5)
    np.testing.assert_allclose(m10["loss"], want_ntp + 10 * want_reg, rtol=1e-4)


@functools.cache
def _loss(cfg, reg_method: str, coeff: float):
    return jax.jit(step.make_loss_fn(cfg, reg_method=reg_method, reg_coeff=coeff))


def test_other_regularizers_metrics(tiny_cfg, tiny_params, tiny_ref_params):
    batch = _batch(0)
    frozen = {"ref": tiny_ref_params, "base": None}
    tokens, rep = np.asarray(batch["tokens"]), np.asarray(batch["replay"])
    _, m = _loss(tiny_cfg, "ntp_pre", 0.5)(tiny_params, frozen, batch)
    np.testing.assert_allclose(m["reg"], _np_nll(fwd(tiny_cfg, tiny_params, rep), rep).mean(), rtol=1e-5)
    _, m = _loss(tiny_cfg, "kl_dwn", 0.5)(tiny_params, frozen, batch)
    want = _np_kl(fwd(tiny_cfg, tiny_params, tokens), fwd(tiny_cfg, tiny_ref_params, tokens)).mean()
    np.testing.assert_allclose(m["reg"], want, rtol=1e-4)
    np.testing.assert_allclose(m["loss"], m["ntp"] + 0.5 * want, rtol=1e-4)
    with pytest.raises(ValueError):
        step.make_loss_fn(tiny_cfg, reg_method="kl_post")


def test_mask_in_batch_is_a_masked_mean(tiny_cfg, tiny_params):
    batch = _batch(1)
    mask = np.random.default_rng(1).random((B, T)) < 0.5
    _, m = _loss(tiny_cfg, "none", 0.0)(tiny_params, {"ref": None, "base": None},
                                         dict(batch, mask=jnp.asarray(mask)))
    nll = _np_nll(fwd(tiny_cfg, tiny_params, batch["tokens"]), batch["tokens"])
    np.testing.assert_allclose(m["ntp"], (nll * mask[:, 1:]).sum() / mask[:, 1:].sum(), rtol=1e-5)


def test_step_metrics_and_state(tiny_cfg, tiny_params, tiny_ref_params):
    batch = _batch(2)
    frozen = {"ref": tiny_ref_params, "base": None}  # same tree structure as elsewhere: no recompile
    keep = jax.tree.map(np.array, tiny_params)
    state = step.init_state(tiny_params, SGD)
    new, metrics = _train_step(tiny_cfg, "none", 0.0)(state, batch, frozen)
    # init_state copied: the caller's tree survives the donation, unchanged
    for k in keep:
        assert np.array_equal(np.asarray(tiny_params[k]), keep[k])
    assert int(new.step) == 1
    assert all(isinstance(v, jax.Array) and v.shape == () for v in metrics.values())
    grads, _ = _grad(tiny_cfg, "none", 0.0)(tiny_params, frozen, batch)
    gnorm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(metrics["grad_norm"], gnorm, rtol=1e-5)
    np.testing.assert_allclose(metrics["update_norm"], LR * gnorm, rtol=1e-5)  # plain SGD


def test_few_steps_overfit_a_fixed_batch(tiny_cfg, tiny_params, tiny_ref_params):
    train = _train_step(tiny_cfg, "none", 0.0)  # SGD at LR 0.5, shared with the tests above
    state = step.init_state(tiny_params, SGD)
    batch = _batch(3)
    frozen = {"ref": tiny_ref_params, "base": None}
    first = None
    for _ in range(40):
        state, metrics = train(state, batch, frozen)
        first = float(metrics["loss"]) if first is None else first
    final = float(losses.next_token_loss(fwd(tiny_cfg, state.params, batch["tokens"]), batch["tokens"]))
    assert first > 0.8 * np.log(V)  # starts near chance
    assert final < 0.25 * np.log(V), final


def test_bf16_train_step_tracks_f32(tiny_cfg, tiny_cfg_bf16, tiny_params):
    batch = _batch(4)
    frozen = {"ref": None, "base": None}
    g32, m32 = _grad(tiny_cfg, "none", 0.0)(tiny_params, frozen, batch)
    g16, m16 = _grad(tiny_cfg_bf16, "none", 0.0)(tiny_params, frozen, batch)
    np.testing.assert_allclose(m16["ntp"], m32["ntp"], rtol=1e-2)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
        assert a.dtype == np.float32
        assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98
        # bf16 matmul inputs and bf16 cotangents (the hand-written backward passes) move each gradient
        # by about 1%; a wrong formula or a wrong scale moves it by far more.
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.05


# ---------------------------------------------------------------- eval

@given(seed=seeds, length=st.sampled_from([16]))
def test_eval_sums_equal_direct_computation(tiny_cfg, tiny_params, tiny_ref_params, seed, length):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, length)), jnp.int32)
    ev = _eval(tiny_cfg)
    out = ev(tiny_params, tokens, tiny_ref_params)
    nll = _np_nll(fwd(tiny_cfg, tiny_params, tokens), tokens)  # [B, length-1], col j predicts token j+1
    target_index = np.arange(1, length)
    h2 = target_index >= length // 2
    np.testing.assert_allclose(out["ntp_sum"], nll.sum(), rtol=1e-5)
    assert float(out["ntp_count"]) == B * (length - 1)
    np.testing.assert_allclose(out["ntp_h2_sum"], nll[:, h2].sum(), rtol=1e-5)
    assert float(out["ntp_h2_count"]) == B * (length - length // 2)  # targets T//2 .. T-1
    kl = _np_kl(fwd(tiny_cfg, tiny_params, tokens), fwd(tiny_cfg, tiny_ref_params, tokens))
    np.testing.assert_allclose(out["kl_sum"], kl.sum(), rtol=1e-4)
    assert float(out["kl_count"]) == B * length
    no_ref = ev(tiny_params, tokens)
    assert float(no_ref["kl_sum"]) == 0 and float(no_ref["kl_count"]) == 0
    np.testing.assert_allclose(no_ref["ntp_sum"], out["ntp_sum"], rtol=1e-6)
    self_ref = ev(tiny_params, tokens, tiny_params)
    assert abs(float(self_ref["kl_sum"])) < 1e-4


@given(seed=seeds)
def test_masked_eval_counts_only_unmasked_targets(tiny_cfg, tiny_params, tiny_ref_params, seed):
    rng = np.random.default_rng(seed)
    length = 16
    tokens = jnp.asarray(rng.integers(0, V, (B, length)), jnp.int32)
    mask = (rng.random((B, length)) < 0.6).astype(np.float32)  # e.g. padding of packed rows = 0
    out = _eval(tiny_cfg)(tiny_params, tokens, tiny_ref_params, jnp.asarray(mask))
    nll = _np_nll(fwd(tiny_cfg, tiny_params, tokens), tokens)
    target_mask = mask[:, 1:]
    h2 = (np.arange(1, length) >= length // 2)[None, :] * target_mask
    np.testing.assert_allclose(out["ntp_sum"], (nll * target_mask).sum(), rtol=1e-5)
    assert float(out["ntp_count"]) == target_mask.sum()
    np.testing.assert_allclose(out["ntp_h2_sum"], (nll * h2).sum(), rtol=1e-5)
    assert float(out["ntp_h2_count"]) == h2.sum()
    kl = _np_kl(fwd(tiny_cfg, tiny_params, tokens), fwd(tiny_cfg, tiny_ref_params, tokens))
    np.testing.assert_allclose(out["kl_sum"], (kl * mask).sum(), rtol=1e-4)
    assert float(out["kl_count"]) == mask.sum()


@functools.cache
def _eval(cfg):
    return step.make_eval_step(cfg)
