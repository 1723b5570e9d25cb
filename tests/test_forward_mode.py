"""Forward-mode autodiff through the whole finetuning objective on the reference path.

`jax.jvp` and `jax.jacfwd` of NTP + c·KL(ref ‖ θ) on replay rows, for full finetuning and for LoRA, must
agree with `jax.grad` (the train step's reverse mode). Any `custom_vjp` left on the reference path makes
`jax.jvp` raise, so this also guards that the reference path stays plain, forward-differentiable code.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting.core import backend, lora, losses, model, step

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
