"""The model-family protocol and its registry.

A family is one architecture (the paper's transformer, Llama, ...) described by a `Family` record of
pure functions over (config, parameter pytree). Everything shared (train and eval steps, LoRA,
sharding, sampling, run records) looks a config's family up here, by the config's type, and never asks
which family it is. Adding a family takes one module that defines its config dataclass, implements the
functions below and calls `register` at import time, plus its tests; `by_name("qwen3")` imports
`forgetting.core.qwen3` on first use, so run records name it without a list to edit.

The protocol (see `Family`): parameter specs with logical axes (`ParamSpec`, which also drive init and
sharding), forward with an optional KV cache, the normed final hidden states and the output embedding
(the fused loss heads start there), cache init, LoRA targets, and the Hugging Face tensor names.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]
Cache = Any  # a family's own KV-cache pytree


class ParamSpec(NamedTuple):
    """One leaf of the abstract parameter tree: init and shardings both derive from it. Logical axes
    name what each axis is ("vocab", "embed", "layers", "heads", "head_dim", "mlp", or None)."""

    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init_std: float
    dtype: Any = jnp.float32


# leaf -> (permutation taking the leaf to [L, in..., out...], number of "in" axes after L)
LoraViews = Mapping[str, tuple[tuple[int, ...], int]]


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family provides. Every function takes the family's config first."""

    name: str  # recorded in run directories ("family": name); also the module name for `by_name`
    config_type: type
    param_specs: Callable[[Any], dict[str, ParamSpec]]
    init: Callable[[Any, jax.Array], Params]
    # forward(cfg, params, tokens [B, t], cache=None, pos=0) -> logits f32 [B, t, V], or
    # (logits, new_cache) when a cache (from `init_cache`) is given.
    forward: Callable[..., Any]
    # final_hidden(cfg, params, tokens [B, t]) -> normed last hidden states f32 [B, t, D]: what
    # `output_embedding` multiplies into the logits (the fused loss heads start from it).
    final_hidden: Callable[[Any, Params, jax.Array], jax.Array]
    output_embedding: Callable[[Any, Params], jax.Array]  # [V, D]
    # (cfg, batch_size, length=None) -> an empty cache of `length` positions (None: cfg.seq_len): {"k", "v"}
    # buffers in the layout of the config's kernels (`layers.CacheLayout`, the one protocol of every family)
    init_cache: Callable[..., Cache]
    lora_targets: LoraViews  # the leaves LoRA adapts and how each is a per-layer matrix
    # hf_names(cfg) -> {HF tensor name: (leaf, layer index or None)}; None when the family has no HF form.
    hf_names: Callable[[Any], dict[str, tuple[str, int | None]]] | None = None
    config_from_dict: Callable[[dict], Any] | None = None  # inverse of `cli.to_dict`; default cls(**d)
    # decode_hidden(cfg, params, tokens [B, t], cache, pos) -> (normed final hidden f32 [B, t, D], new
    # cache): `forward` with a cache, stopped before the unembedding, so that the sampler can hand out
    # the hidden states its samples were drawn from. None: the sampler cannot return them.
    decode_hidden: Callable[..., Any] | None = None

    def from_dict(self, d: dict) -> Any:
        return self.config_from_dict(d) if self.config_from_dict else self.config_type(**d)


_BY_TYPE: dict[type, Family] = {}
_BY_NAME: dict[str, Family] = {}
# Families whose module name differs from the family name (the paper model lives in core/model.py).
_MODULE_OF = {"paper": "model"}


def register(family: Family) -> Family:
    """Adds a family (called by its module at import). Re-registering the same name replaces it."""
    _BY_TYPE[family.config_type] = family
    _BY_NAME[family.name] = family
    return family


def of(cfg: Any) -> Family:
    """The family of a config instance."""
    family = _BY_TYPE.get(type(cfg))
    if family is None:
        known = ", ".join(sorted(f.config_type.__name__ for f in _BY_TYPE.values())) or "none"
        raise TypeError(f"{type(cfg).__name__} is not a registered model config (registered: {known}); "
                        "its module must call forgetting.core.families.register")
    return family


def by_name(name: str) -> Family:
    """The family recorded as `name`, importing `forgetting.core.<name>` on first use."""
    if name not in _BY_NAME:
        module = _MODULE_OF.get(name, name)
        if not module.isidentifier():
            raise ValueError(f"unknown model family {name!r}")
        try:
            importlib.import_module(f"forgetting.core.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"forgetting.core.{module}":  # the module exists but lacks a dependency
                raise
            raise ValueError(f"unknown model family {name!r}: no module forgetting.core.{module}") from None
        if name not in _BY_NAME:
            raise ValueError(f"unknown model family {name!r}: forgetting.core.{module} registers no such family")
    return _BY_NAME[name]


def names() -> tuple[str, ...]:
    return tuple(sorted(_BY_NAME))


# --- generic helpers over any family --------------------------------------------------------------------
def param_specs(cfg: Any) -> dict[str, ParamSpec]:
    return of(cfg).param_specs(cfg)


def abstract_params(cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype) for k, s in param_specs(cfg).items()}


def param_count(cfg: Any) -> int:
    """The true number of parameters (sum of leaf sizes)."""
    return sum(math.prod(s.shape) for s in param_specs(cfg).values())


def init(cfg: Any, key: jax.Array) -> Params:
    return of(cfg).init(cfg, key)


def forward(cfg: Any, params: Params, tokens_bt: jax.Array, cache: Cache | None = None,
            pos: jax.Array | int = 0):
    return of(cfg).forward(cfg, params, tokens_bt, cache, pos)


def init_cache(cfg: Any, batch_size: int, length: int | None = None) -> Cache:
    return of(cfg).init_cache(cfg, batch_size, length)


def has_decode_hidden(cfg: Any) -> bool:
    return of(cfg).decode_hidden is not None


def decode_hidden(cfg: Any, params: Params, tokens_bt: jax.Array, cache: Cache, pos: jax.Array | int):
    family = of(cfg)
    if family.decode_hidden is None:
        raise ValueError(f"model family {family.name!r} provides no decode_hidden (a cached forward to the final "
                         "hidden states), so its sampler cannot return them")
    return family.decode_hidden(cfg, params, tokens_bt, cache, pos)
