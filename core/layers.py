"""Building blocks shared by every model family, and the implementation switch.

One RMSNorm (optional gain), one RoPE (rotate-half; frequencies from the family), one grouped-query
causal attention (multi-head attention is the case kv_heads == heads), and one matmul helper. Each takes
an `impl`, resolved from a config's `impl` field by `resolve_impl`:

- "reference": plain JAX autodiff of the textbook formulas; attention is `jax.nn.dot_product_attention`
  (XLA's own kernel on CPU, cuDNN's where it applies on GPU). Forward-mode AD (`jax.jvp`, `jax.jacfwd`)
  works through it.
- "xla_cpu": the path tuned for XLA's CPU backend (`core.xla_cpu` and the kernels it uses): custom VJPs
  that keep bf16 cotangents, the feature-major attention, the chunked fused loss head, f32 KV cache,
  unrolled layer loops and two-stream batches. Reverse mode only.
- "auto": "xla_cpu" on the CPU backend, "reference" elsewhere (`auto_impl`). The CPU rule is a rule,
  not a measurement of one processor: the tuned path's layout choices (no transposed dot operands, no
  [B, T, V] logits, bf16 backward) are what XLA-CPU needs on any x86 machine; whether bf16 or f32 is
  the faster dtype is the `dtype` field's question, and `python -m forgetting.bench` measures both
  implementations in both dtypes side by side.

Matmuls take `dtype` inputs and accumulate in f32; norms, RoPE and softmax are f32.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "reference", "xla_cpu")
REMATS = ("none", "block", "dots")
NEG_INF = -1e30  # masked scores: finite, so a fully masked row cannot produce NaN
f32 = jnp.float32


def auto_impl(backend: str | None = None) -> str:
    """The implementation `impl="auto"` resolves to on `backend` (default: JAX's default backend)."""
    return "xla_cpu" if (backend or jax.default_backend()) == "cpu" else "reference"


def resolve_impl(impl: str) -> str:
    """"reference" or "xla_cpu" for a config's `impl` field."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return auto_impl() if impl == "auto" else impl


def check_rope_and_norm(base: float, base_name: str, eps: float, eps_name: str) -> None:
    """A RoPE base <= 0 or a negative RMSNorm epsilon makes every loss NaN: refused by name up front."""
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"{base_name} must be a positive number (the RoPE base, e.g. 10000), got {base}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{eps_name} must be a number >= 0 (the RMSNorm epsilon, e.g. 1e-6), got {eps}")


def check_numerics_fields(cfg: Any) -> None:
    """The checks of the numerics fields every family config carries (impl, remat, kv_cache_dtype,
    unroll, loss_chunk, streams); one message each, naming the fix."""
    if cfg.impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {cfg.impl!r}")
    if cfg.remat not in REMATS:
        raise ValueError(f"remat must be one of {', '.join(REMATS)}, got {cfg.remat!r}")
    if cfg.kv_cache_dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"kv_cache_dtype must be auto, bfloat16 or float32, got {cfg.kv_cache_dtype!r}")
    for name in ("unroll", "loss_chunk", "streams"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0 = the backend default), got {getattr(cfg, name)}")


def kv_cache_dtype(cfg: Any) -> jnp.dtype:
    """The KV cache's storage dtype: the config's, or for "auto" f32 on xla_cpu (XLA-CPU rewrites a bf16
    cache update as a convert of the whole cache, two passes per layer and step) and the compute dtype
    elsewhere."""
    if cfg.kv_cache_dtype != "auto":
        return jnp.dtype(cfg.kv_cache_dtype)
    return jnp.dtype(f32) if resolve_impl(cfg.impl) == "xla_cpu" else jnp.dtype(cfg.dtype)


def scan_unroll(cfg: Any) -> int | bool:
    """`lax.scan`'s unroll for the layer loop: the config's, or for 0 fully unrolled on xla_cpu (its
    backward of a rolled loop ran 1.3-1.6x slower on the benchmark shapes) and rolled elsewhere."""
    if cfg.unroll:
        return cfg.unroll
    return True if resolve_impl(cfg.impl) == "xla_cpu" else 1


def remat_block(cfg: Any, body):
    """The scan body under the config's activation checkpointing: "none" keeps every activation for the
    backward pass, "block" keeps only each block's input (recomputing the block), "dots" also keeps
    the matmul outputs without batch dimensions."""
    if cfg.remat == "none":
        return body
    policy = None if cfg.remat == "block" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint(body, prevent_cse=False, policy=policy)


# --- norm and RoPE ----------------------------------------------------------------------------------------
def rms_norm(x: jax.Array, eps: float, gain: jax.Array | None = None) -> jax.Array:
    """RMSNorm over the last axis in f32, times `gain` [last axis] when given."""
    x = x.astype(f32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    if gain is None:
        return x
    return x * gain.astype(f32).reshape((1,) * (x.ndim - 1) + (-1,))


def rope_inv_freq(head_dim: int, base: float, dtype: Any = np.float32) -> np.ndarray:
    """Plain RoPE inverse frequencies base^(-2i/head_dim), i < head_dim/2, computed in f64 (a family's
    frequency scaling works on the f64 values), returned as `dtype`."""
    return (1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(dtype)


def rope_tables(positions_t: jax.Array | np.ndarray, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) f32 [t, head_dim/2] of the rotary angles. Concrete (numpy) positions give constant
    tables (computed in-graph, XLA-CPU fuses sin/cos into every head's rotation)."""
    xp = np if isinstance(positions_t, np.ndarray) else jnp
    angles_tf = positions_t.astype(xp.float32)[:, None] * xp.asarray(inv_freq, xp.float32)[None, :]
    return jnp.asarray(xp.sin(angles_tf), f32), jnp.asarray(xp.cos(angles_tf), f32)


def rope_tables_at(pos: jax.Array | int, t: int, inv_freq: np.ndarray, positions: int) -> tuple[jax.Array, jax.Array]:
    """`rope_tables` for positions pos..pos+t-1, all below `positions` (a KV cache's length). A traced
    `pos` (a decoding loop's) slices constant tables of `positions` rows: computed from a traced
    position, sin/cos were re-evaluated inside every head's rotation (XLA-CPU fuses them into each
    consumer), 10% of a decoding step."""
    if isinstance(pos, (int, np.integer)):
        return rope_tables(pos + np.arange(t), inv_freq)
    sin_pf, cos_pf = rope_tables(np.arange(positions), inv_freq)
    return (jax.lax.dynamic_slice_in_dim(sin_pf, pos, t), jax.lax.dynamic_slice_in_dim(cos_pf, pos, t))


def rotate(x: jax.Array, sin: jax.Array, cos: jax.Array, axis: int = -1) -> jax.Array:
    """Rotate-half RoPE along `axis`, tables broadcasting against one half of x:
    (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin)."""
    x1, x2 = jnp.split(x, 2, axis=axis)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis)


def apply_rope(x_bthd: jax.Array, sin_tf: jax.Array, cos_tf: jax.Array) -> jax.Array:
    """RoPE on [B, t, heads, hd] with tables [t, hd/2]; f32 out."""
    return rotate(x_bthd.astype(f32), sin_tf[None, :, None, :], cos_tf[None, :, None, :])


# --- matmul and attention ---------------------------------------------------------------------------------
def einsum_f32_acc(spec: str, a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """einsum of `a` and `b` cast to `dtype`, accumulated and returned in f32 (plain autodiff)."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=f32)


def dense(spec: str, a: jax.Array, b: jax.Array, dtype: Any, impl: str) -> jax.Array:
    """einsum with `dtype` inputs and f32 accumulation. On xla_cpu with bf16 the gradient keeps the
    recipe (`core.matmul.mm`); on reference it is autodiff's."""
    if impl == "xla_cpu":
        from forgetting.core import matmul  # the tuned kernels stay out of the reference import path

        return matmul.mm(spec, a, b, dtype)
    return einsum_f32_acc(spec, a, b, dtype)


def attention(q_bthe: jax.Array, k_bske: jax.Array, v_bske: jax.Array, q_positions_t: jax.Array,
              k_positions_s: jax.Array | None, dtype: Any, impl: str) -> jax.Array:
    """Causal grouped-query attention, f32 [B, t, H, e]: q [B, t, H, e], k/v [B, s, K, e] with H a
    multiple of K; query head h reads kv head h // (H // K) (Hugging Face's `repeat_kv`). Key j is
    visible to query i iff k_positions[j] <= q_positions[i]; `k_positions_s` None means the keys are the
    queries' own positions (a plain causal forward: on GPU the reference path can then use cuDNN's
    causal flash attention, which takes no explicit mask)."""
    if impl == "reference":
        dt = jnp.dtype(dtype)
        q, k, v = q_bthe.astype(dt), k_bske.astype(dt), v_bske.astype(dt)
        if k_positions_s is None:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True).astype(f32)
        visible_ts = jnp.asarray(k_positions_s)[None, :] <= jnp.asarray(q_positions_t)[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=visible_ts[None, None]).astype(f32)
    k_positions_s = q_positions_t if k_positions_s is None else k_positions_s
    visible_ts = jnp.asarray(k_positions_s)[None, :] <= jnp.asarray(q_positions_t)[:, None]
    B, t, H, e = q_bthe.shape
    K = k_bske.shape[2]
    q = q_bthe.reshape(B, t, K, H // K, e)
    scores = dense("btkge,bske->bkgts", q, k_bske, dtype, impl) / math.sqrt(e)
    scores = jnp.where(visible_ts[None, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    return dense("bkgts,bske->btkge", probs, v_bske, dtype, impl).reshape(B, t, H, e)


def cached_attention(q_bthe: jax.Array, k_btke: jax.Array, v_btke: jax.Array, positions_t: jax.Array,
                     kv_cache: tuple[jax.Array, jax.Array] | None, pos: jax.Array | int, dtype: Any,
                     impl: str) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """(causal attention of the new queries, updated cache): without a cache over the new keys alone; with
    one ([B, T, K, e] buffers), the new keys/values are written at `pos` and every cached position is
    visible up to each query's own."""
    if kv_cache is None:
        return attention(q_bthe, k_btke, v_btke, positions_t, None, dtype, impl), None
    kv_cache = update_cache(*kv_cache, k_btke, v_btke, pos, time_axis=1)
    keys, values = kv_cache
    return attention(q_bthe, keys, values, positions_t, jnp.arange(keys.shape[1]), dtype, impl), kv_cache


def update_cache(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array | int,
                 time_axis: int) -> tuple[jax.Array, jax.Array]:
    """The cache buffers with new keys/values written at `pos` along `time_axis`."""
    def put(buf, x):
        start = [0] * buf.ndim
        start[time_axis] = pos
        return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), tuple(start))

    return put(cache_k, k), put(cache_v, v)
