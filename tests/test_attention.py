"""Attention, the head split (QK-norm + RoPE) and the low-precision matmul: their hand-written backward
passes against autodiff of the plain formulas."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from forgetting.core import attention, heads, matmul, model

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


@given(seed=seeds, offset=st.sampled_from([0, 3]))
def test_attention_bf16_value_and_gradient_track_the_textbook_formula(seed, offset):
    """The hand-written bf16 backward against f32 autodiff: same values and gradients up to bf16
    rounding. `offset` puts the queries after some cached keys (decoding), as the KV cache does."""
    rng = np.random.default_rng(seed)
    q = _normal(rng, B, H, T, E)
    k, v = _normal(rng, B, H, T + offset, E), _normal(rng, B, H, T + offset, E)
    qpos, kpos = offset + jnp.arange(T), jnp.arange(T + offset)
    w = _normal(rng, B, H, T, E)
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v, qpos, kpos))  # noqa: E731
    low = lambda q, k, v, a, b: attention.attention(q, k, v, a, b, "bfloat16")  # noqa: E731
    np.testing.assert_allclose(low(q, k, v, qpos, kpos), _textbook_attention(q, k, v, qpos, kpos),
                               rtol=5e-2, atol=5e-2)
    for g_low, g_ref in zip(jax.grad(loss(low), (0, 1, 2))(q, k, v),
                            jax.grad(loss(_textbook_attention), (0, 1, 2))(q, k, v)):
        assert g_low.dtype == jnp.float32
        assert _relative_error(g_low, g_ref) < 0.03


@given(seed=seeds, t=st.integers(0, T - 2))
def test_attention_bf16_gradient_is_exactly_causal(seed, t):
    """Output row t depends on keys and values at positions <= t only: their gradients beyond t are
    exactly 0 (the masked probabilities are exact zeros in the hand-written backward)."""
    rng = np.random.default_rng(seed)
    q, k, v = (_normal(rng, B, H, T, E) for _ in range(3))
    pos = jnp.arange(T)
    _, g_k, g_v = jax.grad(lambda q, k, v: jnp.sum(attention.attention(q, k, v, pos, pos, "bfloat16")[:, :, t]),
                           (0, 1, 2))(q, k, v)
    assert np.all(np.asarray(g_k)[:, :, t + 1:] == 0) and np.all(np.asarray(g_v)[:, :, t + 1:] == 0)
    assert np.abs(np.asarray(g_v)[:, :, : t + 1]).max() > 0


def _reference_split(qkv, sin, cos, eps):
    q = model.apply_rope(model.rms_norm(qkv[:, :, 0], eps), sin, cos)
    k = model.apply_rope(model.rms_norm(qkv[:, :, 1], eps), sin, cos)
    return tuple(x.transpose(0, 2, 1, 3) for x in (q, k, qkv[:, :, 2]))


@given(seed=seeds, start=st.integers(0, 1000))
def test_split_heads_equals_norm_then_rope_with_the_same_gradient(seed, start):
    rng = np.random.default_rng(seed)
    qkv = _normal(rng, B, T, 3, H, E, scale=3.0)
    sin, cos = model.rope_tables(start + np.arange(T), E, 10000.0)
    out, ref = heads.split_heads(qkv, sin, cos, 1e-6), _reference_split(qkv, sin, cos, 1e-6)
    for a, b in zip(out, ref):
        assert a.shape == (B, H, T, E)
        np.testing.assert_array_equal(a, b)  # the permutation matmul is exact
    w = [_normal(rng, B, H, T, E) for _ in range(3)]
    loss = lambda f: lambda x: sum(jnp.sum(o * wi) for o, wi in zip(f(x, sin, cos, 1e-6), w))  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss(heads.split_heads))(qkv), jax.grad(loss(_reference_split))(qkv),
                               rtol=1e-4, atol=1e-5)


@given(seed=seeds, spec=st.sampled_from(["btd,dn->btn", "bhte,hed->btd", "bhts,bhse->bhte"]))
def test_low_precision_matmul_gradient_tracks_f32(seed, spec):
    rng = np.random.default_rng(seed)
    shapes = {"b": 2, "t": 5, "d": 8, "n": 6, "h": 3, "e": 4, "s": 5}
    lhs, rhs = spec.split("->")[0].split(",")
    a = _normal(rng, *[shapes[c] for c in lhs])
    b = _normal(rng, *[shapes[c] for c in rhs]).astype(jnp.bfloat16)  # mixed input dtypes
    w = _normal(rng, *[shapes[c] for c in spec.split("->")[1]])
    low = lambda a, b: jnp.sum(w * matmul.mm(spec, a, b, jnp.bfloat16))  # noqa: E731
    ref = lambda a, b: jnp.sum(w * jnp.einsum(spec, a, b.astype(jnp.float32), precision=HIGHEST))  # noqa: E731
    out, out_ref = matmul.mm(spec, a, b, jnp.bfloat16), jnp.einsum(spec, a, b.astype(jnp.float32), precision=HIGHEST)
    assert out.dtype == jnp.float32 and _relative_error(out, out_ref) < 0.02
    (ga, gb), (ra, rb) = jax.grad(low, (0, 1))(a, b), jax.grad(ref, (0, 1))(a, b)
    assert ga.dtype == jnp.float32 and gb.dtype == jnp.bfloat16  # each gradient in its input's dtype
    assert _relative_error(ga, ra) < 0.02 and _relative_error(gb, rb) < 0.02
