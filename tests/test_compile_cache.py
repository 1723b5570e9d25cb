"""The persistent compilation cache's directory repair (training/compile_cache.py)."""
from __future__ import annotations

import pytest

from forgetting.training import compile_cache

pytest.importorskip("filelock")


def _lru(path):
    from jax._src import lru_cache

    return lru_cache.LRUCache(str(path), max_size=1 << 20)


def test_an_entry_left_without_its_atime_file_no_longer_blocks_every_write(tmp_path):
    """A process killed between JAX writing an entry and its `-atime` file leaves an orphan; JAX's next write
    (it reads every entry's atime to decide on eviction) fails until `repair` gives the orphan an atime."""
    cache = _lru(tmp_path)
    cache.put("a", b"x" * 100)
    cache.put("b", b"y" * 100)
    (tmp_path / "a-atime").unlink()  # what a kill -9 between the two writes leaves
    with pytest.raises(FileNotFoundError):  # the failure mode repaired below (JAX warns and compiles)
        cache.put("c", b"z" * 100)
    assert compile_cache.repair(tmp_path) == ["a"]
    assert (tmp_path / "a-atime").read_bytes() == (0).to_bytes(8, "little")  # the oldest: evicted first
    cache.put("c", b"z" * 100)
    assert cache.get("c") == b"z" * 100 and cache.get("a") == b"x" * 100
    assert compile_cache.repair(tmp_path) == []  # nothing left to repair


def test_enable_repairs_the_directory_it_turns_on(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    for name in compile_cache.settings(tmp_path):
        monkeypatch.delenv(name, raising=False)
    d = compile_cache.location()
    d.mkdir(parents=True)
    (d / "k-cache").write_bytes(b"entry")
    import jax

    # leave this process's JAX config and environment alone
    monkeypatch.setattr(compile_cache, "settings", lambda path: {})
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    assert compile_cache.enable() == d
    assert (d / "k-atime").exists()
