"""Properties of the transformer: parameter counts, init, norms, RoPE, causality, KV-cache decoding."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgetting.core import model, step

fwd = jax.jit(model.forward, static_argnums=0)

B, T = 2, 16  # the one token shape used with the tiny config (its seq_len)


def _tokens(seed: int, cfg, shape=(B, T)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


# ---------------------------------------------------------------- configs and counts

@given(vocab=st.integers(1, 5000), heads=st.integers(1, 8), head_dim=st.sampled_from([2, 8, 64]),
       layers=st.integers(1, 12))
def test_param_counts(vocab, heads, head_dim, layers):
    cfg = model.ModelConfig(vocab_size=vocab, d_model=heads * head_dim, n_layers=layers, head_dim=head_dim)
    D = cfg.d_model
    leaf_sizes = [math.prod(s.shape) for s in jax.tree.leaves(model.abstract_params(cfg))]
    assert model.param_count(cfg) == sum(leaf_sizes)
    # qkv 3D² + out D² + up 4D² + down 4D² per layer, plus two untied embeddings.
    assert model.param_count(cfg) == 12 * layers * D * D + 2 * D * vocab
    assert model.paper_param_count(cfg) == 12 * layers * D**2 + D * vocab


def test_param_count_matches_init(tiny_cfg, tiny_params):
    assert model.param_count(tiny_cfg) == sum(x.size for x in jax.tree.leaves(tiny_params))
    for name, spec in model.param_specs(tiny_cfg).items():
        assert tiny_params[name].shape == spec.shape and tiny_params[name].dtype == jnp.float32


@pytest.mark.parametrize("bad", [dict(d_model=8), dict(head_dim=15, d_model=45), dict(dtype="float16"),
                                 dict(n_layers=0), dict(vocab_size=-1)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        model.ModelConfig(**{**dict(d_model=32, head_dim=16), **bad})


def test_init_std_matches_paper():
    cfg = model.ModelConfig(vocab_size=512, d_model=128, n_layers=2, head_dim=64, seq_len=8)
    params = model.init(cfg, jax.random.key(3))
    D, F = cfg.d_model, cfg.d_mlp
    for name, leaf in params.items():
        x = np.asarray(leaf, np.float64)
        want = F**-0.5 if name == "down" else D**-0.5
        assert x.size >= 32768
        # the relative error of a sample std is ~1/sqrt(2n) < 0.4%: 2% is 5 sigma.
        assert abs(x.std() / want - 1) < 0.02, name
        assert abs(x.mean()) < 5 * want / math.sqrt(x.size), name
        # Gaussian, not uniform: kurtosis ~3 (uniform gives 1.8).
        assert abs(np.mean(x**4) / np.mean(x**2) ** 2 - 3) < 0.15, name
    # independent keys per leaf: no two leaves of equal shape are equal
    assert not np.allclose(params["embed_in"], params["embed_out"])
    # deterministic in the key, different for another key
    again = model.init(cfg, jax.random.key(3))
    other = model.init(cfg, jax.random.key(4))
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not any(np.allclose(params[k], other[k]) for k in params)


# ---------------------------------------------------------------- norms and RoPE

@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-2, 4), width=st.sampled_from([4, 16, 64]))
def test_rms_norm_unit_rms_and_scale_invariant(seed, log_scale, width):
    x = np.random.default_rng(seed).standard_normal((3, 5, width)).astype(np.float32) * 10**log_scale
    y = np.asarray(model.rms_norm(jnp.asarray(x), 1e-6))
    assert y.dtype == np.float32
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1)
    rms_out = np.sqrt(np.mean(y.astype(np.float64) ** 2, axis=-1))
    np.testing.assert_allclose(rms_out, np.sqrt(ms / (ms + 1e-6)), rtol=1e-5)  # unit RMS up to eps
    np.testing.assert_allclose(rms_out[ms > 1e-2], 1.0, rtol=1e-4)
    y2 = np.asarray(model.rms_norm(jnp.asarray(x * 7.5), 1e-6))
    big = ms > 1e-2  # scale invariance holds where eps is negligible
    np.testing.assert_allclose(y2[big], y[big], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y, x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6),
                               rtol=1e-4, atol=1e-5)


def test_rms_norm_zero_is_finite():
    assert np.all(np.asarray(model.rms_norm(jnp.zeros((2, 8)), 1e-6)) == 0)


@given(seed=st.integers(0, 2**31 - 1), start=st.integers(0, 5000))
def test_rope_preserves_norms(seed, start):
    x = np.random.default_rng(seed).standard_normal((2, 6, 3, 16)).astype(np.float32)
    y = np.asarray(model.rope(jnp.asarray(x), start + jnp.arange(6), 10000.0))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_is_identity_at_position_zero_and_rotates_elsewhere():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 1, 16)), jnp.float32)
    y = np.asarray(model.rope(x, jnp.array([0, 1]), 10000.0))
    np.testing.assert_array_equal(y[:, 0], np.asarray(x)[:, 0])
    assert not np.allclose(y[:, 1], np.asarray(x)[:, 1])


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(0, 1000), n=st.integers(0, 1000),
       shift=st.integers(-1000, 1000))
def test_rope_dot_product_depends_only_on_offset(seed, m, n, shift):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 1, 4, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 4, 16)).astype(np.float32)
    shift = max(shift, -min(m, n))  # keep positions non-negative

    def dot(pq, pk):
        rq = model.rope(jnp.asarray(q), jnp.array([pq]), 10000.0)
        rk = model.rope(jnp.asarray(k), jnp.array([pk]), 10000.0)
        return np.sum(np.asarray(rq, np.float64) * np.asarray(rk, np.float64), axis=-1)

    # f32 angles at positions ~2000 carry ~1e-4 rad error, hence the tolerance.
    np.testing.assert_allclose(dot(m + shift, n + shift), dot(m, n), atol=2e-3)
    if m == n:  # same position: the rotation cancels exactly in the dot product
        np.testing.assert_allclose(dot(m, n), np.sum(q * k, axis=-1), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- forward: shape, causality

def test_forward_shape_dtype(tiny_cfg, tiny_cfg_bf16, tiny_params):
    tokens = _tokens(0, tiny_cfg)
    for cfg in (tiny_cfg, tiny_cfg_bf16):
        logits = fwd(cfg, tiny_params, tokens)
        assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(logits)))


@given(seed=st.integers(0, 2**31 - 1), split=st.integers(1, T - 1))
def test_causality_by_perturbation(tiny_cfg, tiny_params, seed, split):
    tokens = _tokens(seed, tiny_cfg)
    changed = tokens.at[:, split:].set((tokens[:, split:] + 1 + seed % 7) % tiny_cfg.vocab_size)
    a, b = np.asarray(fwd(tiny_cfg, tiny_params, tokens)), np.asarray(fwd(tiny_cfg, tiny_params, changed))
    np.testing.assert_allclose(b[:, :split], a[:, :split], rtol=0, atol=1e-6)
    assert np.abs(b[:, split] - a[:, split]).max() > 1e-3  # the change is visible where it happens


@jax.jit(static_argnums=0)
def _logit_grad_wrt_embed_in(cfg, params, tokens, t, direction_v):
    def f(embed_in):
        logits = model.forward(cfg, dict(params, embed_in=embed_in), tokens)
        return jnp.sum(jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False) * direction_v[None, :])

    return jax.grad(f)(params["embed_in"])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(0, T - 2))
def test_causality_by_gradient(tiny_cfg, tiny_cfg_bf16, tiny_params, precision, seed, t):
    """d logits[:, t] / d embed_in[token at s] is 0 for every token that occurs only after t; also
    through the hand-written bf16 backward passes."""
    cfg = tiny_cfg if precision == "float32" else tiny_cfg_bf16
    rng = np.random.default_rng(seed)
    V = cfg.vocab_size
    early = rng.integers(0, V // 2, (B, t + 1))  # tokens at positions <= t: ids < V/2
    late = rng.integers(V // 2, V, (B, T - t - 1))  # tokens after t: ids >= V/2
    tokens = jnp.asarray(np.concatenate([early, late], axis=1), jnp.int32)
    direction = jnp.asarray(rng.standard_normal(V), jnp.float32)
    g = np.asarray(_logit_grad_wrt_embed_in(cfg, tiny_params, tokens, jnp.int32(t), direction))
    assert np.all(g[V // 2:] == 0)
    assert np.all(np.abs(g[np.unique(early)]).max(axis=-1) > 0)


# ---------------------------------------------------------------- KV cache

def _stepwise(cfg, params, tokens):
    cache = model.init_cache(cfg, tokens.shape[0])
    out = []
    for i in range(tokens.shape[1]):  # pos is traced: one compilation for all positions
        logits, cache = fwd(cfg, params, tokens[:, i:i + 1], cache, jnp.int32(i))
        out.append(np.asarray(logits[:, 0]))
    return np.stack(out, axis=1)


@given(seed=st.integers(0, 2**31 - 1))
def test_cache_token_by_token_equals_full_forward(tiny_cfg, tiny_params, seed):
    tokens = _tokens(seed, tiny_cfg)
    full = np.asarray(fwd(tiny_cfg, tiny_params, tokens))
    np.testing.assert_allclose(_stepwise(tiny_cfg, tiny_params, tokens), full, rtol=1e-4, atol=1e-4)


@given(seed=st.integers(0, 2**31 - 1), prompt_len=st.sampled_from([1, 5, 11]))
def test_cache_prompt_chunk_then_tokens_equals_full_forward(tiny_cfg, tiny_params, seed, prompt_len):
    tokens = _tokens(seed, tiny_cfg)
    full = np.asarray(fwd(tiny_cfg, tiny_params, tokens))
    cache = model.init_cache(tiny_cfg, B)
    logits, cache = fwd(tiny_cfg, tiny_params, tokens[:, :prompt_len], cache, jnp.int32(0))
    np.testing.assert_allclose(np.asarray(logits), full[:, :prompt_len], rtol=1e-4, atol=1e-4)
    for i in range(prompt_len, T):
        logits, cache = fwd(tiny_cfg, tiny_params, tokens[:, i:i + 1], cache, jnp.int32(i))
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, i], rtol=1e-4, atol=1e-4)


def test_cache_decoding_bf16(tiny_cfg, tiny_cfg_bf16, tiny_params):
    tokens = _tokens(5, tiny_cfg)
    full_bf16 = np.asarray(fwd(tiny_cfg_bf16, tiny_params, tokens))
    full_f32 = np.asarray(fwd(tiny_cfg, tiny_params, tokens))
    # bf16 inputs carry ~3 significant digits; logits here are O(1).
    np.testing.assert_allclose(full_bf16, full_f32, atol=0.1)
    assert np.abs(full_bf16 - full_f32).max() > 0  # it really computes in bf16
    np.testing.assert_allclose(_stepwise(tiny_cfg_bf16, tiny_params, tokens), full_bf16, atol=0.05)
    # the cache stores f32 (see init_cache); the attention matmuls still read it as bf16
    assert all(c.dtype == jnp.float32 for c in jax.tree_util.tree_leaves(model.init_cache(tiny_cfg_bf16, B)))


@given(seed=st.integers(0, 2**31 - 1), offset=st.integers(1, 2000))
def test_forward_is_invariant_to_a_global_position_shift(tiny_cfg, tiny_params, seed, offset):
    """RoPE makes attention depend on position differences only: shifting every position by the same
    offset leaves the logits unchanged (up to f32 angle rounding)."""
    tokens = _tokens(seed, tiny_cfg)
    a = np.asarray(fwd(tiny_cfg, tiny_params, tokens, None, jnp.int32(0)))
    b = np.asarray(fwd(tiny_cfg, tiny_params, tokens, None, jnp.int32(offset)))
    np.testing.assert_allclose(b, a, atol=2e-3)


@given(seed=st.integers(0, 2**31 - 1))
def test_cache_in_several_chunks_equals_full_forward(tiny_cfg, tiny_params, seed):
    tokens = _tokens(seed, tiny_cfg)
    full = np.asarray(fwd(tiny_cfg, tiny_params, tokens))
    cache = model.init_cache(tiny_cfg, B)
    for start in range(0, T, 4):  # four chunks of 4 at positions 0, 4, 8, 12
        logits, cache = fwd(tiny_cfg, tiny_params, tokens[:, start:start + 4], cache, jnp.int32(start))
        np.testing.assert_allclose(np.asarray(logits), full[:, start:start + 4], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("streams", [2, 4])
def test_streams_are_the_same_function(tiny_cfg, tiny_params, streams):
    """`final_hidden` with independent row groups (an XLA-CPU scheduling aid) computes the same hidden
    states, and the train loss the same gradient, up to f32 summation order."""
    tokens = jnp.asarray(np.random.default_rng(streams).integers(0, tiny_cfg.vocab_size, (8, T)), jnp.int32)
    one = jax.jit(lambda p, x: model.final_hidden(tiny_cfg, p, x))(tiny_params, tokens)
    many = jax.jit(lambda p, x: model.final_hidden(tiny_cfg, p, x, streams=streams))(tiny_params, tokens)
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5)
    grads = [jax.jit(jax.grad(step.make_loss_fn(tiny_cfg, streams=s), has_aux=True))(
        tiny_params, {"ref": None, "base": None}, {"tokens": tokens})[0] for s in (1, streams)]
    for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_streams_only_splits_large_even_batches():
    assert model.auto_streams(15) == 1 and model.auto_streams(7) == 1 and model.auto_streams(2) == 1
    assert model.auto_streams(32) in (1, 2)


@given(pos=st.integers(0, 120), t=st.integers(1, 8))
def test_rope_tables_at_a_traced_position_are_the_plain_tables(pos, t):
    """Decoding slices constant tables at a traced position; they equal the tables computed for it."""
    from forgetting.core import layers

    inv_freq = layers.rope_inv_freq(16, 10000.0)
    sliced = jax.jit(lambda p: layers.rope_tables_at(p, t, inv_freq, 128))(jnp.int32(pos))
    direct = layers.rope_tables(np.arange(pos, pos + t), inv_freq)
    for a, b in zip(sliced, direct):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
