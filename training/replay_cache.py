"""Self-generated replay drawn once per stream: a cache of sampled buffers beside the reference model.

A self-generated replay stream is fixed by the reference model's parameters, the model config it is
computed with, the replay key (from --run.seed), the temperature, the prompts and the buffer layout
(rows per step × buffer). Runs of a sweep that share all of these (KL coefficients, KL and NTP
replay with `--reg.reference_hidden forward`) draw exactly the same rows, so the first run that needs a
buffer writes it here and later runs read it: a run that reads the cache gets the very arrays it would
have sampled, so its metrics are the same.

Layout: `<reference run dir>/replay_cache/<stream digest>/` (a GGUF file or a HF directory, which are not
run directories: `<--run.dir>/replay_cache/...`), holding `manifest.json` (the stream key in full) and
one `buffer-<index>.bin` per buffer: a header naming the stream, the index and each array's dtype, shape
and sha256, then the arrays (tokens; the sampler's hidden states where the KL takes them). Every file is
written through a temp file and a rename, so a reader sees a whole file or none; two runs drawing the
same stream at once take a per-buffer `flock`, so the second waits for the first's buffer and reads it
(without flock support both sample and both rename identical files: still correct). A buffer file whose
header, size or hashes do not match is rebuilt with a warning; a manifest for another stream is never
read (the run samples its own replay). The key also holds the project's `core` sources, jax's version,
the backend, the processor and XLA_FLAGS: a cache made by other code or on another machine is a
different stream, never a source of different numbers.

Only one-device, one-process runs use it (`train_setup` decides): a sharded sampler's output would need
the mesh in the key, and several processes would all write. `--reg.replay_cache false` turns it off.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from forgetting.core import digest, files

CACHE_DIR = "replay_cache"
MANIFEST = "manifest.json"
FORMAT = 1
_MAGIC = b"FGREPLAY"
_HEADER_LEN_BYTES = 8
_CORE_DIR = Path(__file__).resolve().parent.parent / "core"

Drawn = tuple[np.ndarray, Any]  # (tokens [n, T] int32, hidden states [n, T, D] f32 or None)


class CorruptBuffer(ValueError):
    """A buffer file that is not the complete, matching buffer it claims to be."""


def _code_digest() -> str:
    """sha256 of the `core` package's sources (model, sampler, layers): a change there may change the draws."""
    sources = hashlib.sha256()
    for source in sorted(_CORE_DIR.glob("*.py")):
        sources.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return sources.hexdigest()


def stream_key(replay: Any, model_record: dict) -> dict:
    """Everything a `SelfGeneratedReplay`'s draws depend on (`model_record`: `runs.model_to_dict` of its config)."""
    from forgetting.training.auto_dtype import processor

    device = jax.devices()[0]
    lengths = replay.prompt_lengths
    return {
        "format": FORMAT, "reference_params_sha256": digest.tree_sha256(replay.ref_params), "model": model_record,
        "key_data": np.asarray(jax.random.key_data(replay.key)).tolist(), "temperature": float(replay.temperature),
        "rows_per_step": int(replay.rows_per_step), "buffer": int(replay.buffer),
        "prompts_sha256": digest.array_sha256(np.asarray(replay.prompts)) + f"|{np.asarray(replay.prompts).shape}",
        "prompt_lengths_sha256": None if lengths is None else digest.array_sha256(np.asarray(lengths)),
        "keep_hidden": bool(replay.keep_hidden), "core_sources_sha256": _code_digest(),
        "jax": jax.__version__, "backend": jax.default_backend(), "device_kind": device.device_kind,
        "processor": processor(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def digest_of(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


class ReplayCache:
    """The buffers of one stream in `root/<digest>/`; `draw(index, sample)` reads a buffer or samples and writes it."""

    def __init__(self, root: str | os.PathLike, key: dict):
        self.key, self.digest = key, digest_of(key)
        self.dir = Path(root) / self.digest
        self.read = self.written = self.rebuilt = 0
        self._stats = threading.Lock()
        self._warned: set[int] = set()  # buffers already reported corrupt (a check under the lock repeats the read)
        self.usable = self._open_manifest()

    def _warn(self, message: str) -> None:
        print(f"warning: replay cache {self.dir}: {message}", file=sys.stderr)

    def _open_manifest(self) -> bool:
        """Writes the manifest of a new stream; refuses (False) a directory whose manifest names another one."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_dead_temp_files()
        manifest = self.dir / MANIFEST
        want = {"format": FORMAT, "stream": self.digest, "key": self.key}
        if manifest.exists():
            try:
                have = json.loads(manifest.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                self._warn(f"{MANIFEST} is unreadable; rewritten (every buffer file is checked on its own)")
                have = None
            if have is not None and have != want:
                self._warn(f"{MANIFEST} describes another stream than this run's; the cache is not read or "
                           "written and this run samples its own replay (delete the directory to rebuild it)")
                return False
            if have == want:
                return True
        files.write_json_atomic(manifest, want)  # identical content from any concurrent writer
        return True

    def _remove_dead_temp_files(self) -> None:
        """Temp files of writers that died mid-write (their pid, in the name, is gone on this host)."""
        for tmp in self.dir.glob(".*.tmp"):
            match = re.search(r"\.(\d+)\.[0-9a-f]+\.tmp$", tmp.name)
            if match and not _alive(int(match.group(1))):
                tmp.unlink(missing_ok=True)

    def path(self, index: int) -> Path:
        return self.dir / f"buffer-{index:06d}.bin"

    def draw(self, index: int, sample: Callable[[int], Drawn]) -> Drawn:
        """Buffer `index` of the stream: read from its file, else `sample(index)` written to it."""
        if not self.usable:
            return sample(index)
        found = self._try_read(index)
        if found is not None:
            return found
        with self._locked(index):
            found = self._try_read(index)  # another writer may have finished it while this one waited
            if found is not None:
                return found
            tokens, hidden = sample(index)
            self._write(index, tokens, hidden)
        with self._stats:
            self.written += 1
        return tokens, hidden

    def _try_read(self, index: int) -> Drawn | None:
        path = self.path(index)
        try:
            tokens, hidden = self._read(path, index)
        except FileNotFoundError:
            return None
        except CorruptBuffer as e:  # the rename of the new draw replaces it
            with self._stats:
                if index in self._warned:
                    return None
                self._warned.add(index)
                self.rebuilt += 1
            self._warn(f"{path.name} {e}; it is sampled and written again")
            return None
        with self._stats:
            self.read += 1
        return tokens, (None if hidden is None else jax.numpy.asarray(hidden))

    @contextmanager
    def _locked(self, index: int) -> Iterator[None]:
        fd = os.open(self.dir / f".buffer-{index:06d}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel drops it if the holder dies
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, index: int, tokens: np.ndarray, hidden: Any) -> None:
        arrays = {"tokens": np.ascontiguousarray(tokens)}
        if self.key["keep_hidden"]:
            arrays["hidden"] = np.ascontiguousarray(np.asarray(hidden))
        header = {"format": FORMAT, "stream": self.digest, "index": index,
                  "arrays": [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape), "sha256": digest.array_sha256(a)}
                             for n, a in arrays.items()]}
        head = json.dumps(header, sort_keys=True).encode()
        path = self.path(index)
        files.write_bytes_atomic(path, [_MAGIC + len(head).to_bytes(_HEADER_LEN_BYTES, "little") + head,
                                        *(a.reshape(-1).view(np.uint8).data for a in arrays.values())])

    def _read(self, path: Path, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        data = path.read_bytes()
        start = len(_MAGIC) + _HEADER_LEN_BYTES
        if len(data) < start or not data.startswith(_MAGIC):
            raise CorruptBuffer("is not a replay buffer file (bad magic or truncated)")
        end = start + int.from_bytes(data[len(_MAGIC):start], "little")
        try:
            header = json.loads(data[start:end])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CorruptBuffer("has an unreadable header") from None
        if not isinstance(header, dict) or (header.get("stream"), header.get("index")) != (self.digest, index):
            raise CorruptBuffer(f"is not buffer {index} of stream {self.digest}")
        out: dict[str, np.ndarray] = {}
        offset = end
        for spec in header.get("arrays", []):
            dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
            size = int(np.prod(shape)) * dtype.itemsize
            if offset + size > len(data):
                raise CorruptBuffer("is truncated")
            array = np.frombuffer(data, dtype, int(np.prod(shape)), offset).reshape(shape)
            if digest.array_sha256(array) != spec["sha256"]:
                raise CorruptBuffer(f"has {spec['name']} whose sha256 does not match its header")
            out[spec["name"]] = array
            offset += size
        if offset != len(data) or "tokens" not in out or (self.key["keep_hidden"] and "hidden" not in out):
            raise CorruptBuffer("has a size or arrays other than its header's")
        return out["tokens"], out.get("hidden")

    def summary(self) -> str:
        return (f"replay cache {self.dir}: {self.read} buffer(s) read, {self.written} sampled and written"
                + (f", {self.rebuilt} rebuilt" if self.rebuilt else "") + ("" if self.usable else " (not used: another stream's manifest)"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cache_root(reference: Path, run_dir: str) -> Path:
    """Beside the reference: inside its run (or authors' checkpoint) directory when that is writable, else
    under --run.dir (GGUF files, HF directories, read-only runs; the stream digest holds the reference's content)."""
    is_run = reference.is_dir() and ((reference / "done.json").is_file() or (reference / "weights.npz").is_file())
    if is_run and os.access(reference, os.W_OK):
        return reference / CACHE_DIR
    return Path(run_dir) / CACHE_DIR


def factory(reference: Path, run_dir: str, model_record: dict) -> Callable[[Any], ReplayCache]:
    """What a `SelfGeneratedReplay` is built with (`cache=`) to get its stream's cache: the stream key is read
    from the finished replay source (train_setup passes it on one-device, one-process runs)."""
    return lambda replay: ReplayCache(cache_root(reference, run_dir), stream_key(replay, model_record))
