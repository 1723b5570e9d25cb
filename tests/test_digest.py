"""core.digest: content digests, and the digest of a tree of JAX arrays kept by the identity of its leaves."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from forgetting.core import digest


@pytest.fixture
def counted(monkeypatch):
    """How many arrays' bytes `tree_sha256` read."""
    digest._by_leaves.clear()
    reads = []
    real = digest.array_sha256
    monkeypatch.setattr(digest, "array_sha256", lambda a: reads.append(1) or real(a))
    yield reads
    digest._by_leaves.clear()


def test_jax_leaves_are_read_once_and_give_the_digest_of_reading_them(counted):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    first = digest.tree_sha256(tree)
    assert len(counted) == 2
    assert digest.tree_sha256(dict(tree)) == first and len(counted) == 2  # same leaves: nothing read
    copy = {k: jnp.array(v, copy=True) for k, v in tree.items()}
    assert digest.tree_sha256(copy) == first and len(counted) == 4  # equal content, new leaves: read again
    changed = dict(tree, w=tree["w"].at[0, 0].set(0.5))
    assert digest.tree_sha256(changed) != first


def test_a_numpy_leaf_is_read_every_time(counted):
    tree = {"w": np.arange(6.0), "b": jnp.ones(3)}
    first = digest.tree_sha256(tree)
    tree["w"][0] = 7.0  # numpy arrays change in place: never kept
    assert digest.tree_sha256(tree) != first and len(counted) == 4


def test_kept_digests_are_bounded(counted, monkeypatch):
    monkeypatch.setattr(digest, "KEPT_TREE_DIGESTS", 2)
    trees = [{"w": jnp.full(2, float(i))} for i in range(3)]
    for t in trees:
        digest.tree_sha256(t)
    assert len(digest._by_leaves) == 2
    digest.tree_sha256(trees[0])  # dropped first: read again
    assert len(counted) == 4
