"""Content digests of arrays and parameter trees: what a cache keys a model or a batch by."""
from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np


def array_sha256(array: Any) -> str:
    """sha256 of an array's bytes (row-major); its dtype and shape are not part of it."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array)).reshape(-1).view(np.uint8)).hexdigest()


def tree_sha256(tree: Any) -> str:
    """sha256 over a pytree of arrays: every leaf's path, dtype, shape and bytes (a model's content)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(array_sha256(array).encode())
    return digest.hexdigest()
