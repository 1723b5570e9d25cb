"""einsum with low-precision inputs and f32 accumulation, and a gradient that keeps that recipe."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def mm(spec: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """einsum with `dtype` inputs and f32 accumulation. With bf16 inputs the gradients are the same
    recipe (bf16 cotangent and operands, f32 accumulation): autodiff's own transpose multiplies the f32
    cotangent by an upcast operand, which runs XLA-CPU's f32 matmuls at about half the bf16 speed."""
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
    return _mm_lowp(spec, jnp.dtype(dtype).name, a, b)


def _einsum_lowp(spec: str, dtype: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mm_lowp(spec: str, dtype: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return _einsum_lowp(spec, dtype, a, b)


def _mm_lowp_fwd(spec, dtype, a, b):
    dtype_tags = (jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))  # residuals must be arrays
    return _einsum_lowp(spec, dtype, a, b), (a.astype(dtype), b.astype(dtype), dtype_tags)


def _mm_lowp_bwd(spec, dtype, residuals, g):
    a, b, (a_tag, b_tag) = residuals
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    da = _einsum_lowp(f"{out},{spec_b}->{spec_a}", dtype, g, b)
    db = _einsum_lowp(f"{spec_a},{out}->{spec_b}", dtype, a, g)
    return da.astype(a_tag.dtype), db.astype(b_tag.dtype)


_mm_lowp.defvjp(_mm_lowp_fwd, _mm_lowp_bwd)
