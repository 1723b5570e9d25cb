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


# ---- sliced restores (a multi-process finetune's --model.load_path): only the byte ranges of one's slices ----


def _recording(monkeypatch) -> list:
    """Patches the readers to record the regions read (and any file read whole)."""
    log = []
    region, records = checkpoint.read_region, checkpoint._read_records
    monkeypatch.setattr(checkpoint, "read_region", lambda path, where, reg: (
        log.append((where.path, [list(s.indices(d)[:2]) for s, d in zip(reg, where.shape)])), region(path, where, reg))[1])
    monkeypatch.setattr(checkpoint, "_read_records", lambda path: (log.append(("whole", str(path))), records(path))[1])
    return log


@pytest.mark.parametrize("chunk_bytes", [checkpoint.CHUNK_BYTES, 40])  # 40: every leaf in several msgpack chunks
def test_region_reads_of_one_file_are_bitwise_and_read_only_the_region(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", chunk_bytes)
    tree = {"w": (np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5) / 7),
            "b": np.linspace(-1, 1, 6).astype(jnp.bfloat16), "s": np.float32(2.5)}
    checkpoint.save(tmp_path / "p.msgpack", tree)
    where = checkpoint.leaf_locations(tmp_path / "p.msgpack")
    assert {k: (w.shape, w.dtype.name) for k, w in where.items()} == {
        "['w']": ((4, 6, 5), "float32"), "['b']": ((6,), "bfloat16"), "['s']": ((), "float32")}
    for region in [(slice(1, 3), slice(None), slice(2, 5)), (slice(None), slice(4, 6), slice(0, 1)),
                   (slice(3, 4), slice(0, 0), slice(None))]:
        got = checkpoint.read_region(tmp_path / "p.msgpack", where["['w']"], region)
        assert got.tobytes() == tree["w"][region].tobytes()
    assert checkpoint.read_region(tmp_path / "p.msgpack", where["['b']"], (slice(2, 5),)).tobytes() == \
        tree["b"][2:5].tobytes()
    assert checkpoint.read_region(tmp_path / "p.msgpack", where["['s']"], ()) == np.float32(2.5)


def test_sliced_restore_reads_each_devices_slices_of_either_layout(tmp_path, monkeypatch, two_process_checkpoint):
    path, w, b = two_process_checkpoint
    one_file = tmp_path / "one.msgpack"
    checkpoint.save(one_file, {"w": w, "b": b})
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    template = {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32, sharding=rows),
                "b": jax.ShapeDtypeStruct((6,), jnp.bfloat16, sharding=rows)}
    for file in (one_file, path):
        log = _recording(monkeypatch)
        if file == path:
            scalar = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            template = dict(template, step=jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar))
        out = sharded_checkpoint.restore(file, template, sliced=True)
        assert np.asarray(out["w"]).tobytes() == w.tobytes() and np.asarray(out["b"]).tobytes() == b.tobytes()
        assert not [e for e in log if e[0] == "whole"], "nothing is read whole"
        if file == one_file:  # one device holds all: its one region of each leaf
            assert sorted(log) == [("['b']", [[0, 6]]), ("['w']", [[0, 4], [0, 6]])]
        else:  # the sharded layout: each stored piece overlapping the device's region, cut to the overlap
            assert log.count(("['shards'][0]", [[0, 2], [0, 6]])) == 2  # w's rows 0..2 and 2..4, one per file
    with pytest.raises(ValueError, match=r"expected float32\[4, 6\], found bfloat16\[6\]"):
        sharded_checkpoint.restore(one_file, {"w": template["b"], "b": template["w"]}, sliced=True)
