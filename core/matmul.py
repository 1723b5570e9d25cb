"""einsum with low-precision inputs and f32 accumulation, and a gradient that keeps that recipe (the
xla_cpu matmul, see `core.xla_cpu`; `core.backend` puts it into the kernels record)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from forgetting.core import layers


def mm(spec: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """einsum with `dtype` inputs and f32 accumulation. With bf16 inputs the gradients are the same
    recipe (bf16 cotangent and operands, f32 accumulation): autodiff's own transpose multiplies the f32
    cotangent by an upcast operand, which runs XLA-CPU's f32 matmuls at about half the bf16 speed."""
    if jnp.dtype(dtype) == jnp.float32:
        return einsum_f32_acc(spec, a, b, dtype)
    return _mm_lowp(spec, jnp.dtype(dtype).name, a, b)


einsum_f32_acc = layers.einsum_f32_acc  # plain autodiff: the reference recipe


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mm_lowp(spec: str, dtype: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return einsum_f32_acc(spec, a, b, dtype)


def _mm_lowp_fwd(spec, dtype, a, b):
    dtype_tags = (jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))  # residuals must be arrays
    return einsum_f32_acc(spec, a, b, dtype), (a.astype(dtype), b.astype(dtype), dtype_tags)


def _mm_lowp_bwd(spec, dtype, residuals, g):
    a, b, (a_tag, b_tag) = residuals
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    da = einsum_f32_acc(f"{out},{spec_b}->{spec_a}", g, b, dtype)
    db = einsum_f32_acc(f"{spec_a},{out}->{spec_b}", a, g, dtype)
    return da.astype(a_tag.dtype), db.astype(b_tag.dtype)


_mm_lowp.defvjp(_mm_lowp_fwd, _mm_lowp_bwd)
