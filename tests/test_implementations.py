"""The implementation switch (`impl`), activation checkpointing (`remat`) and forward-mode AD.

`reference` (plain autodiff, `jax.nn.dot_product_attention`, losses on full logits) and `xla_cpu`
(custom bf16 VJPs, feature-major attention, the chunked fused loss head) must compute the same model:
logits and gradients agree to 1e-5 in f32 and to bf16 rounding in bf16, for both families, with and
without remat. `jax.jvp` through the reference forward matches central finite differences.
"""
from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as hst

from forgetting.core import backend, families, llama, step
from forgetting.core import model as model_lib


def paper_cfg(dtype: str, **kw) -> model_lib.ModelConfig:
    return model_lib.ModelConfig(vocab_size=64, d_model=32, n_layers=2, head_dim=16, seq_len=16, dtype=dtype,
                                 numerics=backend.Numerics(**kw))


def llama_cfg(dtype: str, **kw) -> llama.LlamaConfig:
    # init_std 0.2: the HF default 0.02 makes the tiny model's logits almost constant
    return llama.LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                             d_mlp=64, seq_len=16, dtype=dtype, init_std=0.2, numerics=backend.Numerics(**kw))


CONFIGS = {"paper": paper_cfg, "llama": llama_cfg}


def _params(cfg):
    return jax.jit(families.init, static_argnums=0)(dataclasses.replace(cfg, dtype="float32"), jax.random.key(0))


@functools.partial(jax.jit, static_argnums=0)
def _logits_and_grads(cfg, params, tokens):
    loss_fn = step.make_loss_fn(cfg)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, {"ref": None, "base": None}, {"tokens": tokens})
    return families.forward(cfg, params, tokens), metrics["loss"], grads


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.slow  # 8 configurations x 2 implementations to compile: 20-90 s each on 2 loaded cores
@pytest.mark.parametrize("remat", ["none", "block"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["paper", "llama"])
@settings(max_examples=3)
@given(seed=hst.integers(0, 2**16))
def test_reference_and_xla_cpu_agree(family, dtype, remat, seed):
    """Values drawn, shape fixed (one compilation per configuration and implementation)."""
    batch = 2
    make = CONFIGS[family]
    ref_cfg, cpu_cfg = make(dtype, impl="reference", remat=remat), make(dtype, impl="xla_cpu", remat=remat)
    params = _params(ref_cfg)
    tokens = jax.random.randint(jax.random.key(seed), (batch, ref_cfg.seq_len), 0, ref_cfg.vocab_size)
    ref_logits, ref_loss, ref_grads = _logits_and_grads(ref_cfg, params, tokens)
    cpu_logits, cpu_loss, cpu_grads = _logits_and_grads(cpu_cfg, params, tokens)
    chex.assert_trees_all_equal_shapes_and_dtypes(ref_grads, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(cpu_grads, params)
    if dtype == "float32":
        chex.assert_trees_all_close(cpu_logits, ref_logits, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(cpu_loss, ref_loss, rtol=1e-5, atol=1e-5)
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
        chex.assert_trees_all_close(cpu_grads, ref_grads, rtol=1e-5, atol=1e-5 * scale)
    else:
        # bf16 inputs carry 8 significant bits (relative rounding 2^-9 = 0.2%); the two paths round
        # different intermediates (bf16 vs f32 cotangents), so they agree to a few bf16 ulps, in norm.
        assert _rel_err(cpu_logits, ref_logits) < 1e-2
        assert abs(float(cpu_loss) - float(ref_loss)) < 1e-2 * abs(float(ref_loss))
        for name in params:
            assert _rel_err(cpu_grads[name], ref_grads[name]) < 3e-2, name


@pytest.mark.parametrize("impl, remat_kind", [("reference", "block"), ("xla_cpu", "block"), ("reference", "dots")])
@pytest.mark.parametrize("family", ["paper", "llama"])
def test_remat_gives_the_same_gradients(family, impl, remat_kind):
    plain, remat = (CONFIGS[family]("float32", impl=impl, remat=r) for r in ("none", remat_kind))
    params = _params(plain)
    tokens = jax.random.randint(jax.random.key(3), (2, plain.seq_len), 0, plain.vocab_size)
    _, loss_a, grads_a = _logits_and_grads(plain, params, tokens)
    _, loss_b, grads_b = _logits_and_grads(remat, params, tokens)
    chex.assert_trees_all_close(loss_b, loss_a, rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_a))
    chex.assert_trees_all_close(grads_b, grads_a, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("family", ["paper", "llama"])
def test_jvp_of_reference_forward_matches_finite_differences(family):
    cfg = CONFIGS[family]("float32", impl="reference")
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, cfg.seq_len), 0, cfg.vocab_size)
    keys = jax.random.split(jax.random.key(2), len(params))
    # A direction on each leaf's own scale (its RMS), so a step of h is a relative change of h.
    tangent = {k: jax.random.normal(key, p.shape, p.dtype) * jnp.sqrt(jnp.mean(jnp.square(p)))
               for key, (k, p) in zip(keys, sorted(params.items()))}

    def logits_at(eps):
        return families.forward(cfg, jax.tree.map(lambda p, t: p + eps * t, params, tangent), tokens)

    _, jvp_out = jax.jit(lambda: jax.jvp(logits_at, (0.0,), (1.0,)))()
    h = 1e-3  # central differences: error O(h^2) from curvature, O(f32 eps / h) from rounding
    fd = (jax.jit(logits_at)(h) - jax.jit(logits_at)(-h)) / (2 * h)
    assert float(jnp.linalg.norm(jvp_out)) > 1.0  # a real directional derivative, not zero
    assert _rel_err(jvp_out, fd) < 1e-3


def test_jacfwd_equals_jacrev_on_reference_loss():
    """Forward and reverse mode give the same Jacobian of the loss in a few parameter directions."""
    cfg = paper_cfg("float32", impl="reference")
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.key(4), (2, cfg.seq_len), 0, cfg.vocab_size)
    directions = jax.random.normal(jax.random.key(5), (3, *params["up"].shape))
    loss_fn = step.make_loss_fn(cfg)

    def loss_along(c):
        moved = dict(params, up=params["up"] + jnp.tensordot(c, directions, axes=1))
        return loss_fn(moved, {"ref": None, "base": None}, {"tokens": tokens})[0]

    c0 = jnp.zeros((3,))
    fwd, rev = jax.jit(jax.jacfwd(loss_along))(c0), jax.jit(jax.jacrev(loss_along))(c0)
    assert float(jnp.max(jnp.abs(rev))) > 1e-4
    np.testing.assert_allclose(fwd, rev, rtol=1e-4, atol=1e-7)


def test_auto_resolves_by_backend_and_fields_are_checked():
    assert backend.auto_impl("cpu") == "xla_cpu"
    assert backend.auto_impl("gpu") == "reference" and backend.auto_impl("tpu") == "reference"
    assert backend.resolve_impl("reference") == "reference"
    for bad in ({"impl": "cuda"}, {"remat": "all"}, {"kv_cache_dtype": "int8"}, {"unroll": -1}):
        field = next(iter(bad))
        with pytest.raises(ValueError, match=field):
            paper_cfg("float32", **bad)
        with pytest.raises(ValueError, match=field):
            llama_cfg("float32", **bad)


def test_kv_cache_dtype_follows_impl_and_override():
    assert {a.dtype for a in jax.tree.leaves(model_lib.init_cache(paper_cfg("bfloat16", impl="xla_cpu"), 1))} == {
        jnp.dtype(jnp.float32)}
    assert {a.dtype for a in jax.tree.leaves(model_lib.init_cache(paper_cfg("bfloat16", impl="reference"), 1))} == {
        jnp.dtype(jnp.bfloat16)}
    cfg = llama_cfg("bfloat16", impl="xla_cpu", kv_cache_dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(llama.init_cache(cfg, 1))} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("family", ["paper", "llama"])
def test_reference_cache_decoding_equals_full_forward(family):
    cfg = CONFIGS[family]("float32", impl="reference")
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.key(6), (2, cfg.seq_len), 0, cfg.vocab_size)
    full = families.forward(cfg, params, tokens)
    cache = families.init_cache(cfg, 2)
    decode = jax.jit(lambda p, t, c, i: families.forward(cfg, p, t, c, i))
    steps = []
    for i in range(cfg.seq_len):
        logits, cache = decode(params, tokens[:, i:i + 1], cache, i)
        steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
