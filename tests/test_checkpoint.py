"""Checkpoints: exact round trips, refusal of damaged files, atomic replacement, template checks."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from forgetting.core import checkpoint, model, optim, step

DTYPES = [np.float32, ml_dtypes.bfloat16, np.int32, np.uint16, np.bool_, np.int8, np.float16, np.uint32]


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    ka = jax.dtypes.issubdtype(getattr(a, "dtype", np.float32), jax.dtypes.prng_key)
    kb = jax.dtypes.issubdtype(getattr(b, "dtype", np.float32), jax.dtypes.prng_key)
    if ka or kb:
        return ka and kb and jax.random.key_impl(a) == jax.random.key_impl(b) and \
            np.array_equal(np.asarray(jax.random.key_data(a)), np.asarray(jax.random.key_data(b)))
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()  # bitwise (NaN too)


def _assert_same(tree, restored):
    is_none = lambda x: x is None
    assert jax.tree.structure(tree, is_leaf=is_none) == jax.tree.structure(restored, is_leaf=is_none)
    for a, b in zip(jax.tree.leaves(tree, is_leaf=is_none), jax.tree.leaves(restored, is_leaf=is_none)):
        assert _equal(a, b), (a, b)


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    n = int(np.prod(shape))
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    if dtype == np.bool_:
        arr = np.frombuffer(raw, np.uint8).astype(bool)
    else:
        arr = np.frombuffer(raw, dtype).copy()  # arbitrary bit patterns, NaNs/infs included
    arr = arr.reshape(shape)
    return jnp.asarray(arr) if draw(st.booleans()) else arr


leaves = st.one_of(arrays(), st.integers(0, 2**31 - 1).map(jax.random.key), st.none())
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.dictionaries(st.text("abcxyz_", min_size=1, max_size=4), children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
    ),
    max_leaves=8,
)


@settings(deadline=None, max_examples=40)
@given(tree=trees, meta=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3))
def test_round_trip_random_trees(tmp_path_factory, tree, meta):
    path = tmp_path_factory.mktemp("rt") / "tree.ckpt"
    checkpoint.save(path, tree, meta)
    _assert_same(tree, checkpoint.restore(path, tree))
    assert checkpoint.read_metadata(path) == meta


def test_restored_leaves_are_jax_arrays_with_template_types(tmp_path):
    tree = {"a": jnp.ones((2, 3), jnp.bfloat16), "zero_d": jnp.float32(3.5), "n": np.arange(3, dtype=np.uint16),
            "py": 7, "key": jax.random.key(4), "nothing": None}
    checkpoint.save(tmp_path / "c", tree)
    out = checkpoint.restore(tmp_path / "c", tree)
    assert isinstance(out["a"], jax.Array) and out["a"].dtype == jnp.bfloat16
    assert out["zero_d"].shape == () and isinstance(out["zero_d"], jax.Array)
    assert isinstance(out["n"], np.ndarray)  # a numpy template leaf stays numpy
    assert out["py"] == 7 and type(out["py"]) is int
    assert out["nothing"] is None
    _assert_same(tree, out)


@pytest.fixture(scope="module")
def trained():
    """(cfg, opt, train step fn without donation, state after one real step): compiled once per module."""
    cfg = model.ModelConfig(vocab_size=32, d_model=16, n_layers=2, head_dim=8, seq_len=8)
    opt = optim.optimizer("adamw", optim.schedule(1e-3, 5, 100, "cosine"))
    state = step.init_state(model.init(cfg, jax.random.key(0)), opt)
    fn = step.make_train_step(cfg, opt, donate=False)
    state, _ = fn(state, _batch(), {"ref": None, "base": None})  # mu/nu/counts become non-trivial
    return cfg, opt, fn, state


def _batch():
    return {"tokens": jax.random.randint(jax.random.key(1), (2, 8), 0, 32, jnp.int32)}


def test_round_trip_optax_adamw_train_state(tmp_path, trained):
    cfg, opt, fn, state = trained
    tree = {"state": state, "rng": jax.random.key(9), "data_pos": np.int64(2**40 + 3)}
    checkpoint.save(tmp_path / "s.ckpt", tree, {"model": {"d_model": 16}})
    # restore into an abstract template (ShapeDtypeStructs) of the same structure
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    out = checkpoint.restore(tmp_path / "s.ckpt", template)
    assert isinstance(out["state"], step.TrainState)
    assert type(out["state"].opt_state) is type(state.opt_state)
    assert type(out["state"].opt_state[0]) is type(state.opt_state[0])  # ScaleByAdamState
    _assert_same(tree, out)
    assert int(out["data_pos"]) == 2**40 + 3  # 64-bit leaves are not truncated to int32
    # the restored state trains on, exactly like the original
    new, metrics = fn(out["state"], _batch(), {"ref": None, "base": None})
    expect, _ = fn(state, _batch(), {"ref": None, "base": None})
    assert int(new.step) == 2 and np.isfinite(float(metrics["loss"]))
    _assert_same(expect, new)


def test_subtree_restore_needs_strict_false(tmp_path, trained):
    state = trained[-1]
    checkpoint.save(tmp_path / "s", {"params": state.params, "opt": state.opt_state})
    with pytest.raises(ValueError, match="strict=False"):
        checkpoint.restore(tmp_path / "s", {"params": state.params})
    out = checkpoint.restore(tmp_path / "s", {"params": state.params}, strict=False)
    _assert_same({"params": state.params}, out)


def test_load_tree_without_template(tmp_path, trained):
    state = trained[-1]
    checkpoint.save(tmp_path / "s", {"state": state, "xs": [np.ones(2), (np.zeros(1), None)]})
    raw = checkpoint.load_tree(tmp_path / "s")
    assert set(raw["state"]) == {"params", "opt_state", "step"}
    np.testing.assert_array_equal(raw["state"]["params"]["qkv"], np.asarray(state.params["qkv"]))
    np.testing.assert_array_equal(raw["state"]["opt_state"][0]["mu"]["up"], np.asarray(state.opt_state[0].mu["up"]))
    assert isinstance(raw["xs"], list) and raw["xs"][1][1] is None


def test_large_leaves_are_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1000)
    tree = {"big": np.arange(10_000, dtype=np.float32), "bf": np.ones(3001, ml_dtypes.bfloat16), "small": np.ones(3)}
    checkpoint.save(tmp_path / "c", tree)
    _assert_same(tree, checkpoint.restore(tmp_path / "c", tree))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(tmp_path / "nope.ckpt", {"a": np.ones(2)})
    with pytest.raises(FileNotFoundError):
        checkpoint.read_metadata(tmp_path / "nope.ckpt")


def _saved(tmp_path: Path) -> tuple[Path, dict]:
    tree = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(5, ml_dtypes.bfloat16),
            "k": jax.random.key(0), "step": np.int32(3)}
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, tree, {"run": "x", "lr": 0.1})
    return path, tree


@settings(deadline=None, max_examples=40)
@given(data=st.data())
def test_any_corrupted_byte_is_refused(tmp_path_factory, data):
    path, tree = _saved(tmp_path_factory.mktemp("bad"))
    blob = bytearray(path.read_bytes())
    i = data.draw(st.integers(0, len(blob) - 1), label="byte")
    blob[i] ^= data.draw(st.integers(1, 255), label="xor")
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        checkpoint.restore(path, tree)
    assert str(path) in str(info.value) and "delete" in str(info.value)


@settings(deadline=None, max_examples=25)
@given(data=st.data())
def test_truncated_file_is_refused(tmp_path_factory, data):
    path, tree = _saved(tmp_path_factory.mktemp("trunc"))
    blob = path.read_bytes()
    cut = data.draw(st.integers(0, len(blob) - 1), label="length")
    path.write_bytes(blob[:cut])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        checkpoint.restore(path, tree)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        checkpoint.read_metadata(path)


def test_shape_and_dtype_mismatch_name_the_leaf(tmp_path):
    path, tree = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"\['w'\]: expected shape \(4, 16\), found \(8, 8\)"):
        checkpoint.restore(path, {**tree, "w": np.zeros((4, 16), np.float32)})
    with pytest.raises(ValueError, match=r"\['b'\]: expected dtype float32, found bfloat16"):
        checkpoint.restore(path, {**tree, "b": jax.ShapeDtypeStruct((5,), jnp.float32)})
    with pytest.raises(ValueError, match=r"\['extra'\]: missing"):
        checkpoint.restore(path, {**tree, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="PRNG key"):
        checkpoint.restore(path, {**tree, "k": np.zeros((), np.uint32)})


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path, tree = _saved(tmp_path)
    before = path.read_bytes()
    real_write = checkpoint._HashingWriter.write
    calls = {"n": 0}

    def failing_write(self, data):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first leaf record, mid-payload
            raise OSError("disk full (simulated)")
        return real_write(self, data)

    monkeypatch.setattr(checkpoint._HashingWriter, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(path, {"w": np.zeros((8, 8), np.float32)})
    monkeypatch.undo()

    def failing_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"w": np.zeros((8, 8), np.float32)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]  # temp files cleaned up
    _assert_same(tree, checkpoint.restore(path, tree))


def test_killed_process_mid_save_leaves_previous_checkpoint(tmp_path):
    """A hard kill (no cleanup handlers) between writing and renaming: the target is untouched."""
    path, tree = _saved(tmp_path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, numpy as np
        from forgetting.core import checkpoint
        real_fsync = os.fsync
        def die(fd):
            os._exit(9)  # like SIGKILL after the data is written, before os.replace
        checkpoint.os.fsync = die
        checkpoint.save({str(path)!r}, {{"w": np.zeros((512, 512), np.float32)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name == "c.ckpt"] == ["c.ckpt"]
    _assert_same(tree, checkpoint.restore(path, tree))
    # a stray temp file may remain from the kill; it never shadows the real checkpoint
    assert all(p.name.startswith(".c.ckpt.") and p.name.endswith(".tmp") for p in tmp_path.iterdir()
               if p.name != "c.ckpt")


def test_overwrite_replaces_atomically(tmp_path):
    path, _ = _saved(tmp_path)
    checkpoint.save(path, {"w": np.full((2,), 7, np.int32)}, {"v": 2})
    assert checkpoint.read_metadata(path) == {"v": 2}
    np.testing.assert_array_equal(checkpoint.restore(path, {"w": np.zeros(2, np.int32)})["w"], [7, 7])
