"""The sharded checkpoint layout, in one process: restoring hand-made shard files (as N processes would
write them) onto any placement, refusing damaged or incomplete ones, and the single-process dispatch.
Multi-process saves themselves are exercised in tests/test_multihost.py (slow)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting.core import checkpoint, sharded_checkpoint


def _write_sharded(path, pieces_per_process: list[list[tuple[str, list, np.ndarray]]], leaves: list[dict],
                   metadata: dict, tag: str = "t0") -> None:
    """What `save` produces on len(pieces_per_process) processes, written directly."""
    n = len(pieces_per_process)
    folder = sharded_checkpoint.shards_dir(path) / tag
    files = {}
    for p, pieces in enumerate(pieces_per_process):
        f = folder / f"process-{p:05d}-of-{n:05d}.msgpack"
        checkpoint.save(f, {"shards": [a for _, _, a in pieces]},
                        metadata={"shards": [[name, region] for name, region, _ in pieces]})
        files[f.name] = checkpoint.read_header(f)["sha256"]
    sharded_checkpoint.manifest_path(path).write_text(json.dumps({
        "format": sharded_checkpoint.FORMAT, "version": sharded_checkpoint.VERSION, "tag": tag,
        "num_processes": n, "files": files, "leaves": leaves, "metadata": metadata}))


@pytest.fixture
def two_process_checkpoint(tmp_path):
    """w [4, 6] split by rows over two processes, b [6] written by process 0, step a scalar."""
    w = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    b = np.linspace(-1, 1, 6).astype(jnp.bfloat16)
    path = tmp_path / "state.msgpack"
    leaves = [{"path": "['b']", "kind": "array", "dtype": "bfloat16", "shape": [6]},
              {"path": "['step']", "kind": "array", "dtype": "int32", "shape": []},
              {"path": "['w']", "kind": "array", "dtype": "float32", "shape": [4, 6]}]
    _write_sharded(path, [[("['w']", [[0, 2], [0, 6]], w[:2]), ("['b']", [[0, 6]], b),
                           ("['step']", [], np.asarray(7, np.int32))],
                          [("['w']", [[2, 4], [0, 6]], w[2:])]], leaves, {"step": 7})
    return path, w, b


def test_restores_whole_in_one_process(two_process_checkpoint):
    path, w, b = two_process_checkpoint
    template = {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32), "b": jax.ShapeDtypeStruct((6,), jnp.bfloat16),
                "step": np.int32(0)}
    out = sharded_checkpoint.restore(path, template)
    np.testing.assert_array_equal(np.asarray(out["w"]), w)  # bit for bit
    assert np.asarray(out["b"]).tobytes() == b.tobytes()
    assert out["step"] == 7 and isinstance(out["step"], np.generic)
    assert sharded_checkpoint.read_metadata(path) == {"step": 7} and sharded_checkpoint.exists(path)


def test_region_reads_cross_shard_boundaries(two_process_checkpoint):
    path, w, _ = two_process_checkpoint
    manifest = sharded_checkpoint._read_manifest(path)
    index = sharded_checkpoint._ShardIndex(path, manifest)
    # rows 1..3 straddle both processes' pieces; columns 2..5 cut through them
    got = index.read("['w']", (slice(1, 4), slice(2, 5)), (4, 6), np.dtype(np.float32))
    np.testing.assert_array_equal(got, w[1:4, 2:5])


def test_refuses_a_file_from_another_attempt(two_process_checkpoint):
    path, _, _ = two_process_checkpoint
    f = sharded_checkpoint.shards_dir(path) / "t0" / "process-00001-of-00002.msgpack"
    checkpoint.save(f, {"shards": [np.zeros((2, 6), np.float32)]}, metadata={"shards": [["['w']", [[2, 4], [0, 6]]]]})
    with pytest.raises(ValueError, match="not the one the manifest names"):
        sharded_checkpoint.restore(path, {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32)})


def test_refuses_incomplete_and_mismatched(tmp_path, two_process_checkpoint):
    path, w, _ = two_process_checkpoint
    with pytest.raises(ValueError, match=r"expected float32\[4, 6\], found bfloat16\[6\]"):
        sharded_checkpoint.restore(path, {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32),
                                          "b": jax.ShapeDtypeStruct((4, 6), jnp.float32), "step": np.int32(0)})
    lone = tmp_path / "lone" / "state.msgpack"
    lone.parent.mkdir()
    _write_sharded(lone, [[("['w']", [[0, 2], [0, 6]], w[:2])]],
                   [{"path": "['w']", "kind": "array", "dtype": "float32", "shape": [4, 6]}], {})
    with pytest.raises(ValueError, match="cover 12 of the 24 elements"):
        sharded_checkpoint.restore(lone, {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32)})


def test_one_process_saves_the_single_file_and_supersedes_a_sharded_one(two_process_checkpoint):
    path, w, _ = two_process_checkpoint
    sharded_checkpoint.save(path, {"w": jnp.ones((4, 6))}, metadata={"step": 9})
    assert path.exists() and not sharded_checkpoint.manifest_path(path).exists()
    assert not sharded_checkpoint.shards_dir(path).exists()
    assert checkpoint.read_metadata(path) == {"step": 9} == sharded_checkpoint.read_metadata(path)
    out = sharded_checkpoint.restore(path, {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(out["w"]), np.ones((4, 6), np.float32))
