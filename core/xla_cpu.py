"""The implementation tuned for XLA's CPU backend (`impl="xla_cpu"`), kept out of the model files
(`core.backend` puts these kernels into a config's `Kernels` record).

What it changes against the reference formulas, and why (measured with `python -m forgetting.bench`
on the benchmark model; see each kernel's module for the details):
- `core.matmul.mm`: bf16 matmuls whose backward keeps bf16 cotangents and operands (autodiff's transpose
  multiplies an f32 cotangent by an upcast operand, which runs XLA-CPU's f32 matmuls at bf16's cost
  or worse).
- `core.attention`: the paper model's QK-norm + RoPE + attention as one function with a feature-major
  layout and a hand-written backward (no transposed dot operands, which XLA-CPU upcasts to f32).
- `core.fused_head`: the loss computed from the final hidden states one chunk of positions at a time,
  with its gradient formed in the forward pass, so the [B, T, V] logits never exist whole.
- An f32 KV cache with f32 decode attention on values rounded as the bf16 forward's matmul inputs
  (decoding then gives the forward's numbers), fully unrolled layer loops, and `streams`: independent row groups that keep a second core busy where
  XLA-CPU runs an op single-threaded.
All of it is reverse-mode only (custom VJPs); the reference path is the one for `jax.jvp`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from forgetting.core import attention as attention_kernels
from forgetting.core import layers, matmul

f32 = jnp.float32


def paper_attention(h_btd: jax.Array, w_qkv: jax.Array, w_out: jax.Array, sin_tf: jax.Array,
                    cos_tf: jax.Array, eps: float, positions_t: Any, dtype: str,
                    kv_cache: tuple[jax.Array, jax.Array] | None, pos: jax.Array | int):
    """The paper model's attention sub-block (qkv projection, QK-norm, RoPE, causal attention, output
    projection) on the tuned path: f32 [B, t, D] and the updated per-layer cache (head-major
    [B, H, T, hd] buffers) or None."""
    if kv_cache is None:
        attended = attention_kernels.causal_self_attention(h_btd, w_qkv, sin_tf, cos_tf, eps, positions_t, dtype)
    else:  # decoding: head-major, the cache's layout
        qkv = attention_kernels.project_qkv(h_btd, w_qkv, dtype)
        q, k, v = (_as_matmul_input(a, dtype) for a in attention_kernels.split_heads(qkv, sin_tf, cos_tf, eps))
        kv_cache = layers.update_cache(*kv_cache, k, v, pos, time_axis=2)
        keys, values = kv_cache
        # Attention in the cache's dtype (f32 by default): rounding an f32 cache to bf16 for the matmuls
        # cost a full pass over it per layer and decoding step (40% of sampling time), for matrix-vector
        # products. The values are rounded as the forward's bf16 matmul inputs are (q, k, v when written,
        # and the probabilities), so decoding computes the same numbers as `causal_self_attention`: an
        # f32 product of two bf16 values is exact, and both accumulate in f32.
        attended = attention_kernels.attention(q, keys, values, jnp.asarray(positions_t),
                                               jnp.arange(keys.shape[2]), keys.dtype.name,
                                               probs_dtype=dtype)
    return matmul.mm("bhte,hed->btd", attended, w_out, dtype), kv_cache


def _as_matmul_input(x: jax.Array, dtype: str) -> jax.Array:
    """x (f32) holding the values a `dtype` matmul input would: rounded to bf16 and back, or x itself."""
    return x if jnp.dtype(dtype) == f32 else x.astype(dtype).astype(f32)


def auto_streams(rows: int) -> int:
    """Streams for a batch of `rows` on this backend: 2 on a single CPU device for an even batch of at
    least 16 rows (the benchmark train step: 10% faster on 2 cores), else 1. Multi-device and
    accelerator runs have their parallelism elsewhere; tiny batches would only compile twice the layers."""
    single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    return 2 if single_cpu and rows >= 16 and rows % 2 == 0 else 1


def in_streams(fn: Callable[[jax.Array], jax.Array], tokens_bt: jax.Array, streams: int) -> jax.Array:
    """fn(tokens) with the rows run as `streams` independent groups (rows s, s + streams, ...): the same
    function, a different summation order in the weight gradients. XLA-CPU runs some ops single-threaded
    (batched attention matmuls, matmuls fused with a reduction); a second independent chain of ops keeps
    the other core busy. Strided groups keep a batch-sharded array's rows on their devices."""
    B = tokens_bt.shape[0]
    if streams <= 1 or B % streams:
        return fn(tokens_bt)
    groups = tokens_bt.reshape(B // streams, streams, *tokens_bt.shape[1:])
    outs = [fn(groups[:, s]) for s in range(streams)]
    return jnp.stack(outs, axis=1).reshape(B, *outs[0].shape[1:])
