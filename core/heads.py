"""From the fused qkv projection to attention-ready heads: QK-norm, RoPE, head-major layout.

`split_heads(qkv [B, t, 3, H, hd], sin, cos, eps)` -> q, k, v, each f32 [B, H, t, hd], with q and k
RMS-normed per head (no gain) and rotated (rotate-half RoPE), as in PAPER.md. One function with a
hand-written backward because that is where XLA-CPU lost the most time to small passes: autodiff
turns the q/k/v slicing, the half-width RoPE slices and the layout transposes into pads, adds and
strided copies (≈1 ms each on the benchmark model); here the backward is one elementwise expression
per input plus one transpose. The RoPE half swap is a multiplication by a permutation matrix, exact in
f32 (one nonzero term per output).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _swap_halves_matrix(head_dim: int) -> jax.Array:
    """P with (x @ P)[i] = x[(i + hd/2) mod hd]; symmetric, and its own inverse."""
    return jnp.asarray(np.roll(np.eye(head_dim, dtype=np.float32), head_dim // 2, axis=0))


def _swap_halves(x: jax.Array) -> jax.Array:
    return jnp.einsum("...e,ef->...f", x, _swap_halves_matrix(x.shape[-1]), precision=jax.lax.Precision.HIGHEST)


def _rope_factors(sin_tf: jax.Array, cos_tf: jax.Array):
    """Full-width tables, shaped to broadcast against [2, B, H, t, hd], so that
    rope(x) = x·cos + swap_halves(x)·sin."""
    cos = jnp.concatenate([cos_tf, cos_tf], axis=-1)
    sin = jnp.concatenate([-sin_tf, sin_tf], axis=-1)
    return cos[None, None, None], sin[None, None, None]


def _forward(qkv_bt3he, sin_tf, cos_tf, eps):
    x = qkv_bt3he.astype(jnp.float32).transpose(2, 0, 3, 1, 4)  # [3, B, H, t, hd]
    qk = x[:2]
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(qk), axis=-1) + eps)  # [2, B, H, t]
    normed = qk * inv_rms[..., None]
    cos, sin = _rope_factors(sin_tf, cos_tf)
    rotated = normed * cos + _swap_halves(normed) * sin
    return (rotated[0], rotated[1], x[2]), (normed, inv_rms)


@jax.custom_vjp
def _split_heads(qkv_bt3he, sin_tf, cos_tf, eps):
    return _forward(qkv_bt3he, sin_tf, cos_tf, eps)[0]


def _split_heads_fwd(qkv_bt3he, sin_tf, cos_tf, eps):
    out, (normed, inv_rms) = _forward(qkv_bt3he, sin_tf, cos_tf, eps)
    return out, (normed, inv_rms, sin_tf, cos_tf, jnp.zeros((0,), qkv_bt3he.dtype))  # last: the input dtype


def _split_heads_bwd(residuals, grads):
    normed, inv_rms, sin_tf, cos_tf, dtype_tag = residuals
    d_q, d_k, d_v = grads
    cos, sin = _rope_factors(sin_tf, cos_tf)
    d_rot = jnp.stack([d_q, d_k])
    d_normed = d_rot * cos + _swap_halves(d_rot * sin)  # the rotation's transpose (P is symmetric)
    d_qk = inv_rms[..., None] * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    d_qkv = jnp.concatenate([d_qk, d_v[None]], axis=0).transpose(1, 3, 0, 2, 4)  # back to [B, t, 3, H, hd]
    return d_qkv.astype(dtype_tag.dtype), None, None, None


_split_heads.defvjp(_split_heads_fwd, _split_heads_bwd)


def split_heads(qkv_bt3he: jax.Array, sin_tf: jax.Array, cos_tf: jax.Array, eps: float):
    """q, k, v [B, H, t, hd] f32 from qkv [B, t, 3, H, hd]: q and k RMS-normed per head, then rotated
    with the RoPE tables sin/cos [t, hd/2]. The tables and eps get no gradient."""
    return _split_heads(qkv_bt3he, jax.lax.stop_gradient(sin_tf), jax.lax.stop_gradient(cos_tf),
                        jnp.float32(eps))
