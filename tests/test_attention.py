"""Self-attention (QK-norm, RoPE, causal softmax) and the low-precision matmul: their hand-written
backward passes against autodiff of the plain formulas."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgetting.core import attention, matmul, model

B, H, T, E = 2, 3, 8, 16
seeds = st.integers(0, 2**31 - 1)
HIGHEST = jax.lax.Precision.HIGHEST


def _normal(rng, *shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _textbook_attention(q, k, v, query_positions, key_positions):
    """softmax(q kᵀ / √hd + causal mask) v in f32 at full precision."""
    scores = jnp.einsum("bhte,bhse->bhts", q, k, precision=HIGHEST) / np.sqrt(q.shape[-1])
    allowed = key_positions[None, :] <= query_positions[:, None]
    probs = jax.nn.softmax(jnp.where(allowed[None, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bhse->bhte", probs, v, precision=HIGHEST)


def _relative_error(a, b):
    """‖a − b‖ / ‖b‖: bf16 rounding gives about 1e-2; a wrong formula or scale gives far more."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@given(seed=seeds)
def test_attention_f32_is_the_textbook_formula(seed):
    rng = np.random.default_rng(seed)
    q, k, v = (_normal(rng, B, H, T, E, scale=2.0) for _ in range(3))
    pos = jnp.arange(T)
    np.testing.assert_allclose(attention.attention(q, k, v, pos, pos, "float32"),
                               _textbook_attention(q, k, v, pos, pos), rtol=1e-4, atol=1e-5)


D = 12  # model width: deliberately not H·E, so the projection's shapes cannot be mixed up


def _textbook_self_attention(h, w_qkv, sin, cos, eps):
    """The qkv projection, QK-norm, RoPE and causal attention composed from the model's plain pieces, at
    full precision."""
    qkv = jnp.einsum("btd,khde->btkhe", h, w_qkv, precision=HIGHEST)
    q = model.apply_rope(model.rms_norm(qkv[:, :, 0], eps), sin, cos).transpose(0, 2, 1, 3)
    k = model.apply_rope(model.rms_norm(qkv[:, :, 1], eps), sin, cos).transpose(0, 2, 1, 3)
    pos = jnp.arange(qkv.shape[1])
    return _textbook_attention(q, k, qkv[:, :, 2].transpose(0, 2, 1, 3), pos, pos)


def _inputs(rng, start, t=T, e=E):
    """(h [B, t, D], w_qkv [3, H, D, e], sin, cos)."""
    sin, cos = model.rope_tables(start + np.arange(t), e, 10000.0)
    return _normal(rng, B, t, D), _normal(rng, 3, H, D, e, scale=D ** -0.5), sin, cos


def _self_attention(dtype, fused=False):
    """causal_self_attention; `fused` runs the low-precision path's hand-written backward in `dtype`
    even for f32, so its math can be checked against autodiff."""
    if fused:
        return lambda h, w, sin, cos: attention._feature_major(dtype, h, w, sin, cos, jnp.float32(1e-6), jnp.arange(h.shape[1]))
    return lambda h, w, sin, cos: attention.causal_self_attention(h, w, sin, cos, 1e-6, np.arange(h.shape[1]), dtype)


def _loss(f, weight, sin, cos):
    return lambda h, w: jnp.sum(weight * f(h, w, sin, cos))


@given(seed=seeds, start=st.integers(0, 1000))
def test_feature_major_backward_is_the_gradient_of_the_textbook_formula(seed, start):
    """The hand-written backward, run in f32, against f32 autodiff of projection + QK-norm + RoPE +
    attention: the same formula up to f32 rounding (a wrong transpose, sign or scale would be far off)."""
    rng = np.random.default_rng(seed)
    h, w_qkv, sin, cos = _inputs(rng, start)
    weight = _normal(rng, B, H, T, E)
    textbook = lambda h, w, sin, cos: _textbook_self_attention(h, w, sin, cos, 1e-6)
    fused = _self_attention("float32", fused=True)
    np.testing.assert_allclose(fused(h, w_qkv, sin, cos), textbook(h, w_qkv, sin, cos), rtol=1e-4, atol=1e-5)
    expected = jax.grad(_loss(textbook, weight, sin, cos), (0, 1))(h, w_qkv)
    plain = _self_attention("float32")  # the f32 path is plain autodiff of the same pieces
    for f in (fused, plain):
        for g, g_ref in zip(jax.grad(_loss(f, weight, sin, cos), (0, 1))(h, w_qkv), expected):
            np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-5)


@given(seed=seeds, start=st.integers(0, 1000))
def test_bf16_self_attention_value_and_gradient_track_f32(seed, start):
    rng = np.random.default_rng(seed)
    h, w_qkv, sin, cos = _inputs(rng, start)
    weight = _normal(rng, B, H, T, E)
    low, ref = _self_attention("bfloat16"), _self_attention("float32")
    assert _relative_error(low(h, w_qkv, sin, cos), ref(h, w_qkv, sin, cos)) < 0.03
    grads = jax.grad(_loss(low, weight, sin, cos), (0, 1))(h, w_qkv)
    for g, g_ref in zip(grads, jax.grad(_loss(ref, weight, sin, cos), (0, 1))(h, w_qkv)):
        assert g.dtype == jnp.float32 and _relative_error(g, g_ref) < 0.03


@given(seed=seeds, t=st.integers(0, T - 2))
def test_bf16_self_attention_gradient_is_exactly_causal(seed, t):
    """Output row t depends on the inputs at positions <= t only: the gradient beyond t is exactly 0
    (masked probabilities are exact zeros in the hand-written backward)."""
    rng = np.random.default_rng(seed)
    h, w_qkv, sin, cos = _inputs(rng, 0)
    g = np.asarray(jax.grad(lambda x: jnp.sum(_self_attention("bfloat16")(x, w_qkv, sin, cos)[:, :, t]))(h))
    assert np.all(g[:, t + 1:] == 0)
    assert np.abs(g[:, : t + 1]).max() > 0


@pytest.mark.parametrize("t, e", [(5, 4), (16, 8), (33, 6)])
def test_jitted_bf16_train_path_compiles_to_the_same_numbers(t, e):
    """Under jit XLA rewrites transposes around the bf16 dots (see core.attention); whatever it does
    must still compile, run and give the eager numbers (up to fusion-order rounding)."""
    rng = np.random.default_rng(t)
    h, w_qkv, sin, cos = _inputs(rng, 0, t, e)
    f = _loss(_self_attention("bfloat16"), _normal(rng, B, H, t, e), sin, cos)
    value, grads = jax.jit(jax.value_and_grad(f, (0, 1)))(h, w_qkv)
    eager_value, eager_grads = jax.value_and_grad(f, (0, 1))(h, w_qkv)
    assert abs(float(value) - float(eager_value)) <= 1e-3 * (1 + abs(float(eager_value)))
    for g, g_eager in zip(grads, eager_grads):
        assert _relative_error(g, g_eager) < 1e-2


@given(seed=seeds, spec=st.sampled_from(["btd,dn->btn", "bhte,hed->btd", "bhts,bhse->bhte"]))
def test_low_precision_matmul_gradient_tracks_f32(seed, spec):
    rng = np.random.default_rng(seed)
    shapes = {"b": 2, "t": 5, "d": 8, "n": 6, "h": 3, "e": 4, "s": 5}
    lhs, rhs = spec.split("->")[0].split(",")
    a = _normal(rng, *[shapes[c] for c in lhs])
    b = _normal(rng, *[shapes[c] for c in rhs]).astype(jnp.bfloat16)  # mixed input dtypes
    w = _normal(rng, *[shapes[c] for c in spec.split("->")[1]])
    low = lambda a, b: jnp.sum(w * matmul.mm(spec, a, b, jnp.bfloat16))
    ref = lambda a, b: jnp.sum(w * jnp.einsum(spec, a, b.astype(jnp.float32), precision=HIGHEST))
    out, out_ref = matmul.mm(spec, a, b, jnp.bfloat16), jnp.einsum(spec, a, b.astype(jnp.float32), precision=HIGHEST)
    assert out.dtype == jnp.float32 and _relative_error(out, out_ref) < 0.02
    (ga, gb), (ra, rb) = jax.grad(low, (0, 1))(a, b), jax.grad(ref, (0, 1))(a, b)
    assert ga.dtype == jnp.float32 and gb.dtype == jnp.bfloat16  # each gradient in its input's dtype
    assert _relative_error(ga, ra) < 0.02 and _relative_error(gb, rb) < 0.02
