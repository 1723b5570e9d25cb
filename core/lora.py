"""LoRA: a rank-r update W + A·B on every non-embedding matrix; A Gaussian, B zero at init.

Each adapted leaf is viewed per layer as a matrix [in, out]; the adapter is {"a": [L, in, r],
"b": [L, r, out]}. Training LoRA means differentiating only this adapter tree; `merge` folds it into
the base weights (used both inside the train step and to export a plain checkpoint).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from forgetting.core import families

def matrix_views(cfg: Any) -> families.LoraViews:
    """Which leaves get adapters, and how each is seen as a per-layer matrix: the family's LoRA targets,
    leaf -> (permutation taking the leaf to [L, in..., out...], number of "in" axes after L)."""
    return families.of(cfg).lora_targets


def _in_out(shape: tuple[int, ...], perm: tuple[int, ...], n_in: int) -> tuple[int, int, int]:
    permuted = [shape[p] for p in perm]
    return permuted[0], math.prod(permuted[1:1 + n_in]), math.prod(permuted[1 + n_in:])


def max_rank(cfg: Any, params: dict) -> int:
    """The largest useful LoRA rank: min(d_in, d_out) over the adapted matrices (a higher rank adds no
    expressiveness, only cost)."""
    return min(min(_in_out(params[name].shape, perm, n_in)[1:]) for name, (perm, n_in) in matrix_views(cfg).items())


def init(cfg: Any, params: dict, rank: int, key: jax.Array) -> dict:
    """Adapters for every viewed leaf: A ~ N(0, in^-1/2), B = 0 (so the merged model equals the base)."""
    views = matrix_views(cfg)
    keys = jax.random.split(key, len(views))
    adapters = {}
    for k, (name, (perm, n_in)) in zip(keys, sorted(views.items())):
        layers, d_in, d_out = _in_out(params[name].shape, perm, n_in)
        adapters[name] = {
            "a": d_in**-0.5 * jax.random.normal(k, (layers, d_in, rank), jnp.float32),
            "b": jnp.zeros((layers, rank, d_out), jnp.float32),
        }
    return adapters


def delta(cfg: Any, params: dict, adapters: dict) -> dict:
    """A·B reshaped into each leaf's own layout."""
    out = {}
    for name, (perm, n_in) in matrix_views(cfg).items():
        if name not in adapters:
            continue
        shape = params[name].shape
        permuted_shape = tuple(shape[p] for p in perm)
        update = jnp.einsum("lir,lro->lio", adapters[name]["a"], adapters[name]["b"])
        update = update.reshape(permuted_shape)
        inverse = tuple(perm.index(i) for i in range(len(perm)))
        out[name] = jnp.transpose(update, inverse).astype(params[name].dtype)
    return out


def merge(cfg: Any, params: dict, adapters: dict) -> dict:
    """Base weights with every adapter folded in: W + A·B."""
    updates = delta(cfg, params, adapters)
    return {name: leaf + updates[name] if name in updates else leaf for name, leaf in params.items()}


def apply_fn(cfg: Any, base_params: dict) -> Callable[[dict], dict]:
    """θ(adapters) for the train step: gradients flow into the adapters only, the base is constant."""
    frozen = jax.lax.stop_gradient(base_params)
    return lambda adapters: merge(cfg, frozen, adapters)
