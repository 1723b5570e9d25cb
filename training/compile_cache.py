"""Compile once per shape: JAX's persistent compilation cache, shared by every run, figure and process.

Every run of a figure compiles the same train and eval steps again (same shapes, same program); with the
cache on, the first run writes the compiled executables to disk and every later one with the same shapes
loads them instead of compiling. JAX keys an entry by the whole lowered program, the compile options, the
XLA flags, the backend and the jax/jaxlib versions, so a cached executable is the one a fresh compile would
produce, and the numbers cannot change (tests/test_framework_jobs.py checks a run's metrics with and without).

Location: `$FORGETTING_COMPILE_CACHE` if set, else `$FORGETTING_CACHE_DIR/jax`, else `~/.cache/forgetting/jax`,
each with one subdirectory per processor (`machine_key`).
`FORGETTING_COMPILE_CACHE=off` (or `0`, `false`, `none`) switches it off. `enable()` turns it on in this
process (jax.config) and, through the environment (JAX_COMPILATION_CACHE_DIR etc., read when JAX is
imported), in every process started from it: `--jobs` children and stage subprocesses. An explicit
JAX_COMPILATION_CACHE_DIR in the environment wins.

Known limit (jax 0.9-0.10, jax-ml/jax#38445, openxla/xla#44565): on some Intel CPUs (Cascade Lake) XLA's loader
rejects every cached CPU executable (it takes the tuning flags +prefer-no-gather/-scatter for missing ISA
features) and logs an error line per entry; runs then compile as without the cache, with the same numbers.
Switch it off there. On the AMD EPYC this was measured on, entries load.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ENV = "FORGETTING_COMPILE_CACHE"
OFF = ("off", "0", "false", "none", "no")
# Only programs that take this long to compile are stored: the tiny ops (a broadcast, a convert) compile
# faster than their file is read, while a tiny model's train step takes a second or more.
MIN_COMPILE_SECS = 0.2
MAX_BYTES = 2 * 1024**3  # JAX evicts the least recently used entries above this


def machine_key() -> str:
    """A short hash of the processor's model and instruction-set flags: XLA:CPU executables are built for the
    host's features, so machines sharing a home directory keep their entries apart (XLA also refuses to load
    an executable built for features the host lacks; this keeps them from evicting each other's)."""
    import hashlib

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    seen = list(dict.fromkeys(wanted)) or [platform.processor(), platform.machine()]
    return hashlib.sha256("\n".join(seen).encode()).hexdigest()[:12]


def location() -> Path | None:
    """The cache directory (a per-processor subdirectory, see `machine_key`), or None when
    `$FORGETTING_COMPILE_CACHE` switches it off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser() / machine_key()
    root = os.environ.get("FORGETTING_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "forgetting")
    return Path(root) / "jax" / machine_key()


def max_bytes() -> int:
    """`MAX_BYTES`, or -1 (no limit) without the `filelock` package: JAX needs it to evict (and then locks
    every read and write; without it a read that meets a half-written entry is an error JAX warns about and
    compiles instead)."""
    import importlib.util

    return MAX_BYTES if importlib.util.find_spec("filelock") is not None else -1


def settings(path: Path) -> dict[str, str]:
    """The JAX options (as environment variables) that store compiled programs under `path`."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(path),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(MIN_COMPILE_SECS),
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(max_bytes()),
    }


def enable() -> Path | None:
    """Turns the cache on here and in child processes; returns its directory (None when switched off)."""
    path = location()
    if path is None or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None if path is None else Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: runs still work, they compile
        print(f"warning: compilation cache off ({ENV}={path}: {e})", file=sys.stderr)
        return None
    if max_bytes() > 0:
        repair(path)
    for name, value in settings(path).items():
        os.environ.setdefault(name, value)
    if "jax" in sys.modules:  # the environment is read when JAX is imported; later, set it directly
        import jax

        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        jax.config.update("jax_compilation_cache_max_size", max_bytes())
    return path


def repair(path: Path) -> list[str]:
    """Gives every entry that lacks its `-atime` file one (time 0: evicted first); returns their keys.

    Why: JAX's evicting cache writes an entry's `-cache` file, then its `-atime` file, and before every write
    reads the `-atime` file of every entry. A process killed between the two writes (a kill -9, an OOM kill)
    leaves an entry without one, and from then on every write to the directory fails with FileNotFoundError
    (JAX warns and compiles): the cache silently stops growing. Run under JAX's own lock."""
    import filelock

    fixed = []
    try:
        with filelock.FileLock(str(path / ".lockfile"), timeout=60):
            for entry in path.glob("*-cache"):
                atime = entry.with_name(entry.name.removesuffix("-cache") + "-atime")
                if not atime.exists():
                    atime.write_bytes((0).to_bytes(8, "little"))
                    fixed.append(entry.name.removesuffix("-cache"))
    except (filelock.Timeout, OSError) as e:  # a stuck lock or a read-only directory: runs compile as without it
        print(f"warning: compilation cache at {path} not checked ({e})", file=sys.stderr)
    return fixed

