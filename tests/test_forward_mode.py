"""Forward-mode autodiff through the whole finetuning objective on the reference path.

`jax.jvp` and `jax.jacfwd` of NTP + c·KL(ref ‖ θ) on replay rows, for full finetuning and for LoRA (on all
trainable parameters and on a small subset of them), must agree with `jax.grad` (the train step's reverse
mode); so must the reference loss heads (`core.loss_head.REFERENCE`, the fused heads' equivalents). Any `custom_vjp` left on the reference path makes
`jax.jvp` raise, so this also guards that the reference path stays plain, forward-differentiable code.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting.core import backend, llama, lora, loss_head, losses, model, step

CFG = model.ModelConfig(vocab_size=11, d_model=16, n_layers=1, head_dim=8, seq_len=6, dtype="float32",
                         numerics=backend.Numerics(impl="reference"))


def _setup(use_lora: bool):
    key_p, key_r, key_t, key_l = jax.random.split(jax.random.key(0), 4)
    ref = model.init(CFG, key_p)
    # θ ≠ ref, so the KL term and its gradient are not zero
    params = jax.tree.map(lambda p, n: p + 0.05 * n, ref,
                          jax.tree.unflatten(jax.tree.structure(ref),
                                             [jax.random.normal(k, p.shape) for k, p in
                                              zip(jax.random.split(key_r, len(jax.tree.leaves(ref))), jax.tree.leaves(ref))]))
    tokens = jax.random.randint(key_t, (2, CFG.seq_len), 0, CFG.vocab_size)
    replay = jax.random.randint(jax.random.fold_in(key_t, 1), (3, CFG.seq_len), 0, CFG.vocab_size)
    batch = {"tokens": tokens, "replay": replay}
    if use_lora:
        adapters = lora.init(CFG, params, 2, key_l)
        adapters = jax.tree.map(lambda a: a + 0.03, adapters)  # B = 0 at init: move off it so every leaf matters
        return adapters, {"ref": ref, "base": params}, batch
    return params, {"ref": ref, "base": None}, batch


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_jvp_and_jacfwd_of_finetuning_loss_match_grad(use_lora):
    trainable, frozen, batch = _setup(use_lora)
    loss_fn = step.make_loss_fn(CFG, reg_method="kl_pre", reg_coeff=10.0, use_lora=use_lora)
    objective = lambda t: loss_fn(t, frozen, batch)[0]

    grads = jax.grad(objective)(trainable)
    _, metrics = loss_fn(trainable, frozen, batch)
    assert float(metrics["reg"]) > 1e-4  # the KL term is really in play

    direction = jax.tree.map(lambda g, k: jax.random.normal(k, g.shape),
                             grads, jax.tree.unflatten(jax.tree.structure(grads),
                                                       list(jax.random.split(jax.random.key(7), len(jax.tree.leaves(grads))))))
    _, tangent = jax.jvp(objective, (trainable,), (direction,))
    expected = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(tangent), expected, rtol=2e-4, atol=1e-6)

    jac = jax.jacfwd(objective)(trainable)
    for (path, j), g in zip(jax.tree_util.tree_leaves_with_path(jac), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(j), np.asarray(g), rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_kl_to_reference_jvp_matches_finite_difference():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
    ref_logits = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
    f = lambda x: losses.kl_to_reference(x, ref_logits)
    _, tangent = jax.jvp(f, (logits,), (t,))
    eps = 1e-3
    fd = (float(f(logits + eps * t)) - float(f(logits - eps * t))) / (2 * eps)
    np.testing.assert_allclose(float(tangent), fd, rtol=1e-2, atol=1e-5)


def _subset_objective(cfg, use_lora: bool, reg_method: str, leaf: str):
    """(objective of one trainable leaf with every other leaf fixed, that leaf's value): the whole
    finetuning loss as the train step computes it, NTP + c·R, as a function of a small parameter subset."""
    trainable, frozen, batch = _setup(use_lora) if cfg is CFG else _llama_setup(cfg)
    loss_fn = step.make_loss_fn(cfg, reg_method=reg_method, reg_coeff=10.0, use_lora=use_lora)

    def objective(x):
        return loss_fn(dict(trainable, **{leaf: x}), frozen, batch)[0]

    return objective, trainable[leaf]


def _llama_setup(cfg):
    key_p, key_t = jax.random.split(jax.random.key(1))
    ref = llama.init(cfg, key_p)
    params = jax.tree.map(lambda p: p * 1.05, ref)  # θ ≠ ref: the KL and its gradient are not zero
    tokens = jax.random.randint(key_t, (2, cfg.seq_len), 0, cfg.vocab_size)
    replay = jax.random.randint(jax.random.fold_in(key_t, 1), (3, cfg.seq_len), 0, cfg.vocab_size)
    return params, {"ref": ref, "base": None}, {"tokens": tokens, "replay": replay}


LLAMA_CFG = llama.LlamaConfig(vocab_size=13, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_mlp=24,
                              seq_len=6, dtype="float32", init_std=0.3, numerics=backend.Numerics(impl="reference"))


@pytest.mark.parametrize("cfg, use_lora, reg_method, leaf", [
    (CFG, False, "kl_pre", "up"), (CFG, False, "kl_dwn", "qkv"), (CFG, False, "ntp_pre", "embed_out"),
    (CFG, True, "kl_pre", "down"), (LLAMA_CFG, False, "kl_pre", "wq"),
], ids=["paper-kl_pre", "paper-kl_dwn", "paper-ntp_pre", "lora-kl_pre", "llama-kl_pre"])
def test_jvp_and_jacfwd_on_a_parameter_subset_match_grad(cfg, use_lora, reg_method, leaf):
    """Forward mode w.r.t. one leaf (LoRA: one adapted matrix's A and B) of the reference-path objective: the
    directional derivative is grad·v, and `jax.jacfwd` is the gradient itself."""
    objective, x = _subset_objective(cfg, use_lora, reg_method, leaf)
    grad = jax.grad(objective)(x)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) > 1e-5  # a real gradient, not zero
    leaves = jax.tree.leaves(x)
    direction = jax.tree.unflatten(jax.tree.structure(x), [
        jax.random.normal(k, a.shape) for k, a in zip(jax.random.split(jax.random.key(9), len(leaves)), leaves)])
    _, tangent = jax.jit(lambda v: jax.jvp(objective, (x,), (v,)))(direction)
    expected = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(tangent), expected, rtol=2e-4, atol=1e-6)
    jac = jax.jit(jax.jacfwd(objective))(x)
    for j, g in zip(jax.tree.leaves(jac), jax.tree.leaves(grad)):
        np.testing.assert_allclose(np.asarray(j), np.asarray(g), rtol=2e-4, atol=1e-6)


def test_reference_loss_heads_equal_the_fused_ones_and_differentiate_forward():
    """`loss_head.REFERENCE` (the reference path's heads) computes what the fused xla_cpu heads compute, and
    each of its functions has a forward-mode derivative equal to reverse mode's (grad·v)."""
    rng = np.random.default_rng(3)
    B, T, D, V = 2, 5, 8, 7
    h, ref_h = (jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32) for _ in range(2))
    w, ref_w = (jnp.asarray(rng.standard_normal((V, D)), jnp.float32) for _ in range(2))
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.float32).at[:, 1].set(1.0)  # at least one target counts
    args = {  # head function -> its arguments after (hidden, w), before (dtype, chunk)
        "next_token_loss": (tokens, mask), "kl_to_reference": (ref_h, ref_w, mask), "nll_per_position": (tokens,),
        "kl_per_position": (ref_h, ref_w), "nll_and_kl_per_position": (tokens, ref_h, ref_w)}
    assert set(args) == set(loss_head.LossHead._fields)
    assert backend.kernels_for(CFG).head is loss_head.REFERENCE
    for name, rest in args.items():
        def f(hidden, w_vd, fn=getattr(loss_head.REFERENCE, name), rest=rest):
            out = fn(hidden, w_vd, *rest, "float32", loss_head.CHUNK_ELEMENTS)
            return sum(jnp.sum(o * (i + 1.0)) for i, o in enumerate(jax.tree.leaves(out)))  # one scalar

        fused = getattr(loss_head.FUSED, name)(h, w, *rest, "float32", 16)  # several chunks
        for got, want in zip(jax.tree.leaves(getattr(loss_head.REFERENCE, name)(h, w, *rest, "float32", 16)),
                             jax.tree.leaves(fused)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=name)
        dh, dw = jnp.asarray(rng.standard_normal(h.shape), jnp.float32), jnp.asarray(rng.standard_normal(w.shape), jnp.float32)
        _, tangent = jax.jvp(f, (h, w), (dh, dw))
        gh, gw = jax.grad(f, argnums=(0, 1))(h, w)
        expected = float(jnp.vdot(gh, dh) + jnp.vdot(gw, dw))
        assert abs(expected) > 1e-3, name
        np.testing.assert_allclose(float(tangent), expected, rtol=1e-4, atol=1e-6, err_msg=name)
