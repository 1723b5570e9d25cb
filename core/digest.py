"""Content digests of arrays and parameter trees: what a cache keys a model or a batch by."""
from __future__ import annotations

import collections
import hashlib
from typing import Any

import jax
import numpy as np

from forgetting.core import lru

# tree_sha256 of trees of JAX arrays, by the identity of their leaves: a JAX array never changes, so the
# same leaf objects have the same digest (a run's reference is keyed by the replay cache and by the eval
# memo; the leaves are held here, so their ids cannot be reused by other arrays).
KEPT_TREE_DIGESTS = 4
_by_leaves: collections.OrderedDict = collections.OrderedDict()


def array_sha256(array: Any) -> str:
    """sha256 of an array's bytes (row-major); its dtype and shape are not part of it."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array)).reshape(-1).view(np.uint8)).hexdigest()


def tree_sha256(tree: Any) -> str:
    """sha256 over a pytree of arrays: every leaf's path, dtype, shape and bytes (a model's content)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)

    def compute() -> str:
        digest = hashlib.sha256()
        for path, leaf in flat:
            array = np.asarray(leaf)
            digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
            digest.update(array_sha256(array).encode())
        return digest.hexdigest()

    if not (flat and all(isinstance(leaf, jax.Array) for _, leaf in flat)):
        return compute()
    key = (treedef, tuple(id(leaf) for _, leaf in flat))
    kept = lru.get_or_compute(_by_leaves, key, lambda: ([leaf for _, leaf in flat], compute()), KEPT_TREE_DIGESTS)
    return kept[1]
