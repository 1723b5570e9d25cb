"""The backend: how a model is computed, chosen once per config, apart from what the model is.

A family config holds its architecture plus one `Numerics` sub-config (the six backend fields, the train
stage's flat `--model.impl`, `--model.remat`, ... flags). `kernels_for(cfg)` turns it into a `Kernels`
record: the dense matmul, the attention kernels, the KV-cache layout, the loss head, the layer-loop unroll,
activation checkpointing and the row streams. Model code asks that record and never tests `impl` itself;
this module's `_build` is the one place that does (one `match`). The record is cached per (numerics,
dtype), so asking it while tracing costs a dictionary lookup and nothing inside a compiled step.

Implementations (`impl`):
- "reference": plain JAX autodiff of the textbook formulas; attention is `jax.nn.dot_product_attention`
  (XLA's own kernel on CPU, cuDNN's where it applies on GPU); the loss head computes the [B, T, V] logits.
  Forward-mode AD (`jax.jvp`, `jax.jacfwd`) works through all of it.
- "xla_cpu": the path tuned for XLA's CPU backend (`core.xla_cpu` and the kernels it uses): custom VJPs
  that keep bf16 cotangents, the paper model's feature-major attention, the chunked fused loss head, an f32
  KV cache, unrolled layer loops and two-stream batches. Reverse mode only.
- "auto": "xla_cpu" on the CPU backend, "reference" elsewhere (`auto_impl`). The CPU rule is a rule, not a
  measurement of one processor: the tuned path's layout choices (no transposed dot operands, no [B, T, V]
  logits, bf16 backward) are what XLA-CPU needs on any x86 machine; whether bf16 or f32 is the faster dtype
  is the `dtype` field's question, and `python -m forgetting.bench` measures both implementations in both
  dtypes side by side.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from forgetting.core import layers, loss_head, matmul, xla_cpu

IMPLS = ("auto", "reference", "xla_cpu")
REMATS = ("none", "block", "dots")
KV_CACHE_DTYPES = ("auto", "bfloat16", "float32")


def auto_impl(backend: str | None = None) -> str:
    """The implementation `impl="auto"` resolves to on `backend` (default: JAX's default backend)."""
    return "xla_cpu" if (backend or jax.default_backend()) == "cpu" else "reference"


def resolve_impl(impl: str) -> str:
    """"reference" or "xla_cpu" for a `Numerics.impl`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return auto_impl() if impl == "auto" else impl


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How a model is computed, not what it is: the same numbers up to rounding for every choice (the
    tests hold `reference` and `xla_cpu` to that). Every family config carries one as `numerics`."""

    impl: str = "auto"  # auto | reference | xla_cpu: kernels for attention, loss head, matmul gradients
    remat: str = "none"  # activation checkpointing: none | block (recompute each block) | dots
    kv_cache_dtype: str = "auto"  # auto (f32 on xla_cpu, else dtype) | bfloat16 | float32
    unroll: int = 0  # layer-loop unroll for lax.scan; 0 = backend default (full on xla_cpu, else 1)
    loss_chunk: int = 0  # fused loss head: logits elements per chunk; 0 = default (8 MB of f32)
    streams: int = 0  # independent row groups through the layers; 0 = backend default

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if self.remat not in REMATS:
            raise ValueError(f"remat must be one of {', '.join(REMATS)}, got {self.remat!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto, bfloat16 or float32, got {self.kv_cache_dtype!r}")
        for name in ("unroll", "loss_chunk", "streams"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = the backend default), got {getattr(self, name)}")


def with_numerics(cfg: Any, **changes: Any) -> Any:
    """`cfg` (any family's config) with some numerics fields changed: `with_numerics(cfg, impl="reference")`."""
    return dataclasses.replace(cfg, numerics=dataclasses.replace(cfg.numerics, **changes))


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernels and loop choices of one (numerics, dtype): what the model code calls."""

    name: str  # the resolved implementation ("reference" | "xla_cpu"), for records and messages
    # dense(spec, a, b, dtype) -> f32: einsum with `dtype` inputs and f32 accumulation
    dense: Callable[[str, jax.Array, jax.Array, Any], jax.Array]
    # attention(q [B,t,H,e], k [B,s,K,e], v, q_positions [t], k_positions [s] or None (causal), dtype) -> f32 [B,t,H,e]
    attention: Callable[..., jax.Array]
    # The paper model's whole attention sub-block as one kernel (`xla_cpu.paper_attention`), reading and
    # writing a `fused_cache` layout cache; None: the model composes it from `dense` and `attention`.
    fused_attention: Callable[..., Any] | None
    cache: layers.CacheLayout  # the KV-cache layout of `attention`
    fused_cache: layers.CacheLayout  # the KV-cache layout of `fused_attention`
    head: loss_head.LossHead  # the loss head from final hidden states (fused on xla_cpu)
    loss_chunk: int  # the fused head's logits elements per chunk
    unroll: int | bool  # `lax.scan`'s unroll of the layer loop
    remat: str  # activation checkpointing of a block (see `checkpoint_block`)
    default_streams: int  # the streams field; 0: `xla_cpu.auto_streams` of the rows on xla_cpu, else 1
    auto_streams: bool

    def streams(self, rows: int) -> int:
        """Independent row groups for a batch of `rows` (see `xla_cpu.in_streams`)."""
        if self.default_streams:
            return self.default_streams
        return xla_cpu.auto_streams(rows) if self.auto_streams else 1

    def checkpoint_block(self, body: Callable) -> Callable:
        """The scan body under activation checkpointing: "none" keeps every activation for the backward pass,
        "block" keeps only each block's input (recomputing the block), "dots" also keeps the matmul outputs
        without batch dimensions."""
        if self.remat == "none":
            return body
        policy = None if self.remat == "block" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        return jax.checkpoint(body, prevent_cse=False, policy=policy)

    def cache_layout(self, fused: bool) -> layers.CacheLayout:
        """The layout of a cache read by `fused_attention` (when `fused` and there is one) or `attention`."""
        return self.fused_cache if fused and self.fused_attention is not None else self.cache


def kernels_for(cfg: Any) -> Kernels:
    """The kernels of a config of any family (its `numerics` and compute `dtype`)."""
    return kernels(cfg.numerics, cfg.dtype)


@functools.lru_cache(maxsize=None)
def kernels(numerics: Numerics, dtype: str) -> Kernels:
    """The kernels of `numerics` with matmul inputs in `dtype`, built once per pair (`impl="auto"` is
    resolved on the first call, for the process's default backend)."""
    return _build(numerics, jnp.dtype(dtype), resolve_impl(numerics.impl))


def _build(n: Numerics, dtype: jnp.dtype, impl: str) -> Kernels:
    """The one place that tests the implementation."""
    cache_dtype = None if n.kv_cache_dtype == "auto" else jnp.dtype(n.kv_cache_dtype)
    common = dict(name=impl, loss_chunk=n.loss_chunk or loss_head.CHUNK_ELEMENTS, remat=n.remat,
                  default_streams=n.streams)
    match impl:
        case "reference":
            token_major = layers.CacheLayout(cache_dtype or dtype, head_major=False)
            return Kernels(dense=layers.einsum_f32_acc, attention=layers.reference_attention, fused_attention=None,
                           cache=token_major, fused_cache=token_major, head=loss_head.REFERENCE,
                           unroll=n.unroll or 1, auto_streams=False, **common)
        case "xla_cpu":
            # f32 cache by default: XLA-CPU rewrites a bf16 cache update as a convert of the whole cache, two
            # passes per layer and step. Fully unrolled layers by default: the backward of a rolled loop ran
            # 1.3-1.6x slower on the benchmark shapes.
            cache_dtype = cache_dtype or jnp.dtype(jnp.float32)
            return Kernels(dense=matmul.mm, attention=functools.partial(layers.softmax_attention, dense=matmul.mm),
                           fused_attention=xla_cpu.paper_attention,
                           cache=layers.CacheLayout(cache_dtype, head_major=False),
                           fused_cache=layers.CacheLayout(cache_dtype, head_major=True), head=loss_head.FUSED,
                           unroll=n.unroll or True, auto_streams=True, **common)
    raise AssertionError(impl)  # resolve_impl returns one of the cases
