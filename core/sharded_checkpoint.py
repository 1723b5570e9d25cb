"""Checkpoints of sharded state across processes: each process writes only the shards it holds.

`save(path, tree, metadata)`, `restore(path, template)`, `read_metadata(path)` and `exists(path)` take the
same `path` as `core.checkpoint` (e.g. `<run>/state.msgpack`) and choose the layout:

- one process: the single-file msgpack checkpoint of `core.checkpoint` at `path`, exactly as before;
- several processes (`jax.distributed`): a sharded checkpoint next to it::

      <path>.manifest.json                          the commit point (written last, atomically, by process 0)
      <path>.shards/<tag>/process-00000-of-00002.msgpack   each process's own shards (core.checkpoint files)

  Each process writes the shards of every array that it holds with `replica_id == 0` (so each element is
  written once, by one process; nothing is gathered), as a `core.checkpoint` file (atomic, sha256
  checksummed). After a barrier, process 0 writes the manifest (leaf shapes, dtypes, every file's sha256)
  atomically, then deletes older attempts. A save killed anywhere leaves the previous manifest and its
  shards intact. `<tag>` is fresh per save, so a new attempt never overwrites files the manifest names.

Restores work on any number of processes M, whatever N wrote the checkpoint (N = 1 included): each
array is rebuilt with `jax.make_array_from_callback` on the template leaf's sharding, so a process reads
only the files holding shards that overlap its own devices' slices (all of them when M = 1). Values
are copied bit for bit; a manifest whose files are missing, damaged or from another attempt is refused.
`restore(..., sliced=True)` goes further, for loading weights onto many hosts: each process reads only
the byte ranges of its own slices, from either layout (checksums unchecked; see `restore`).

Why not orbax-checkpoint: `pip download orbax-checkpoint` (0.12.8) brings ~29 MB of wheels this project
does not otherwise install (tensorstore 21 MB, protobuf, etils, uvloop, aiofiles, simplejson, humanize,
prometheus-client, pyyaml, psutil) for what is, here, one file per process plus a JSON manifest on top of
the existing checksummed msgpack format. Its multi-process saves coordinate through the same
`jax.distributed` barriers, so it would not remove the CPU/gloo requirements the tests exercise, and its
async and multi-tier machinery is not needed. Keeping the one format also keeps the sha256 checks, the
clear errors and `load_tree` inspection for every checkpoint, single- or multi-process.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from forgetting.core import checkpoint, files, multihost

FORMAT = "forgetting-sharded-checkpoint"
VERSION = 1


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".manifest.json")


def shards_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".shards")


def _file_name(process: int, num_processes: int) -> str:
    return f"process-{process:05d}-of-{num_processes:05d}.msgpack"


# ----------------------------------------------------------------------------------------- save


def _region(index: tuple, shape: tuple[int, ...]) -> list[list[int]]:
    """A shard's index (slices) as [[start, stop], ...] per dimension."""
    out = []
    for sl, dim in zip(index, shape):
        start, stop, step = sl.indices(dim)
        if step != 1:
            raise ValueError(f"strided shard index {index} is not supported")
        out.append([start, stop])
    return out


def _local_shards(leaf: Any, writer: bool) -> tuple[dict, list[tuple[list, np.ndarray]]]:
    """(leaf spec, [(region, numpy data)]) of the pieces of `leaf` this process writes."""
    if leaf is None:
        return {"kind": "none"}, []
    spec: dict[str, Any] = {"kind": "array"}
    if checkpoint._is_key_dtype(getattr(leaf, "dtype", None)):
        spec.update(kind="key", impl=str(jax.random.key_impl(leaf)))
        leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.sharding.is_fully_replicated):
        pieces = [(_region(s.index, leaf.shape), np.asarray(s.data)) for s in _addressable_shards(leaf)
                  if s.replica_id == 0]
    else:  # host values, process-local and replicated arrays are the same everywhere: process 0 writes them
        arr = np.asarray(leaf)
        pieces = [([[0, d] for d in arr.shape], arr)] if writer else []
    spec.update(dtype=np.dtype(leaf.dtype).name, shape=list(np.shape(leaf)))
    return spec, pieces


def _addressable_shards(leaf: jax.Array) -> list:
    try:
        return leaf.addressable_shards
    except ValueError:
        # jax 0.10 on CPU: an array `device_put` from one process-local device onto a global sharding may
        # refuse to list its shards; a jitted copy with the same sharding is an ordinary global array.
        return jax.jit(jnp.copy, out_shardings=leaf.sharding)(leaf).addressable_shards


def save(path: str | Path, tree: Any, metadata: dict | None = None, *,
         before_replace: Callable[[str], None] | None = None) -> None:
    """Saves `tree` with JSON-able `metadata` at `path` (one process) or as a sharded checkpoint (several);
    every process must call it with its part of the same global tree. `before_replace` as in
    `checkpoint.save` (a test hook between a complete temp file and its rename)."""
    path = Path(path)
    if not multihost.is_multiprocess():
        checkpoint.save(path, tree, metadata, before_replace=before_replace)
        _remove_sharded(path)  # a single-file save supersedes an older sharded one
        return
    metadata = {} if metadata is None else json.loads(json.dumps(metadata))
    n, me, writer = jax.process_count(), jax.process_index(), multihost.is_writer()
    tag = multihost.shared_token()
    folder = shards_dir(path) / tag
    folder.mkdir(parents=True, exist_ok=True)
    leaves, _ = checkpoint._flatten(tree)
    specs, arrays, index = [], [], []
    for entries, leaf in leaves:
        name = checkpoint._path_str(entries)
        spec, pieces = _local_shards(leaf, writer)
        specs.append(dict(spec, path=name))
        for region, data in pieces:
            index.append([name, region])
            arrays.append(data)
    checkpoint.save(folder / _file_name(me, n), {"shards": arrays}, metadata={"shards": index},
                    before_replace=before_replace)
    multihost.barrier(f"checkpoint-written-{tag}")
    if writer:
        file_hashes = {}
        for p in range(n):
            file = folder / _file_name(p, n)
            if not file.exists():
                raise FileNotFoundError(f"process {p}'s shard file {file} is missing after the save barrier; is "
                                        "the run directory on a file system every process shares?")
            file_hashes[file.name] = checkpoint.read_header(file)["sha256"]
        files.write_json_atomic(manifest_path(path), {
            "format": FORMAT, "version": VERSION, "tag": tag, "num_processes": n, "files": file_hashes,
            "leaves": specs, "metadata": metadata})
        for old in shards_dir(path).iterdir():  # earlier saves and interrupted attempts
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
        path.unlink(missing_ok=True)  # a sharded save supersedes an older single-file one
    multihost.barrier(f"checkpoint-committed-{tag}")


def _remove_sharded(path: Path) -> None:
    manifest_path(path).unlink(missing_ok=True)
    shutil.rmtree(shards_dir(path), ignore_errors=True)


# ----------------------------------------------------------------------------------------- read


def exists(path: str | Path) -> bool:
    return Path(path).exists() or manifest_path(path).exists()


def _use_sharded(path: Path) -> bool:
    """Whether the sharded checkpoint is the current one (the newer, if a save died between committing one
    layout and deleting the other)."""
    m = manifest_path(path)
    if not m.exists():
        return False
    return not path.exists() or m.stat().st_mtime_ns >= path.stat().st_mtime_ns


def _read_manifest(path: Path) -> dict:
    m = manifest_path(path)
    try:
        manifest = json.loads(m.read_text())
    except ValueError:
        raise ValueError(f"checkpoint manifest {m} is not valid JSON; delete it and resume from scratch") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{m} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{m} has format version {manifest.get('version')}; this code reads version {VERSION}")
    return manifest


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if _use_sharded(path):
        return _read_manifest(path)["metadata"]
    return checkpoint.read_metadata(path)


class _ShardIndex:
    """Where each leaf's stored pieces are; reads (and checksums) a process file only when first needed."""

    def __init__(self, path: Path, manifest: dict, sliced: bool = False):
        self.sliced = sliced
        self._locations: dict[str, dict] = {}
        self.folder = shards_dir(path) / manifest["tag"]
        self.files = manifest["files"]
        self.pieces: dict[str, list[tuple[str, int, list]]] = {}
        for name, sha in self.files.items():
            file = self.folder / name
            if not file.exists():
                raise FileNotFoundError(f"checkpoint {path}: shard file {file} named by the manifest is missing")
            header = checkpoint.read_header(file)
            if header["sha256"] != sha:
                raise ValueError(f"checkpoint {path}: shard file {file} is not the one the manifest names (checksum "
                                 "differs); the checkpoint is damaged")
            for i, (leaf, region) in enumerate(header["metadata"]["shards"]):
                self.pieces.setdefault(leaf, []).append((name, i, region))
        self._loaded: dict[str, list[np.ndarray]] = {}

    def _piece(self, file: str, i: int, src: tuple[slice, ...]) -> np.ndarray:
        """`src` of piece `i` of `file`: read whole files (checksummed), or only `src` when sliced."""
        if not self.sliced:
            return self._data(file, i)[src]
        if file not in self._locations:
            self._locations[file] = checkpoint.leaf_locations(self.folder / file)
        return checkpoint.read_region(self.folder / file, self._locations[file][f"['shards'][{i}]"], src)

    def _data(self, file: str, i: int) -> np.ndarray:
        if file not in self._loaded:
            self._loaded[file] = checkpoint.load_tree(self.folder / file).get("shards", [])
        return self._loaded[file][i]

    def read(self, leaf: str, region: tuple[slice, ...], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The values of `leaf` inside `region` (slices of the global `shape`), from the overlapping pieces."""
        bounds = [sl.indices(d)[:2] for sl, d in zip(region, shape)]
        out = np.empty([b - a for a, b in bounds], dtype)
        filled = 0
        for file, i, stored in self.pieces.get(leaf, []):
            lo = [max(a, s0) for (a, _), (s0, _) in zip(bounds, stored)]
            hi = [min(b, s1) for (_, b), (_, s1) in zip(bounds, stored)]
            if any(end <= start for start, end in zip(lo, hi)) and out.size:
                continue
            src = tuple(slice(start - s0, end - s0) for start, end, (s0, _) in zip(lo, hi, stored))
            dst = tuple(slice(start - a, end - a) for start, end, (a, _) in zip(lo, hi, bounds))
            out[dst] = self._piece(file, i, src)
            filled += int(np.prod([end - start for start, end in zip(lo, hi)]))
        if filled != out.size:
            raise ValueError(f"sharded checkpoint: the stored pieces of {leaf} cover {filled} of the {out.size} "
                             f"elements of {[list(b) for b in bounds]}; the checkpoint is incomplete")
        return out


def restore(path: str | Path, template: Any, *, sliced: bool = False) -> Any:
    """Loads the checkpoint at `path` (either layout) into the structure of `template`: leaves with a
    sharding (arrays, or ShapeDtypeStructs with `.sharding`) come back placed on it, each process reading
    only the files that hold what its devices hold; other leaves come back whole (numpy templates as numpy).

    `sliced`: each process reads only the byte ranges of its devices' slices, from either layout (a
    one-file checkpoint too), through memory maps. The framing and every leaf's shape and byte count are
    checked, but not the files' sha256 checksums, which need every byte: for loading weights onto many
    hosts (a finetune's `--model.load_path`), not for resuming a training state."""
    path = Path(path)
    if not _use_sharded(path):
        return _restore_sliced(path, template) if sliced else checkpoint.restore(path, template)
    manifest = _read_manifest(path)
    specs = {s["path"]: s for s in manifest["leaves"]}
    index = _ShardIndex(path, manifest, sliced)
    leaves, treedef = checkpoint._flatten(template)
    problems, out = [], []
    for entries, leaf in leaves:
        name = checkpoint._path_str(entries)
        spec = specs.get(name)
        if spec is None:
            problems.append(f"{name}: missing from the checkpoint")
            continue
        if leaf is None or spec["kind"] == "none":
            if (leaf is None) != (spec["kind"] == "none"):
                problems.append(f"{name}: template and checkpoint disagree on a None leaf")
            out.append(None)
            continue
        shape, dtype, is_key, sharding = checkpoint._template_info(leaf)
        stored_shape = tuple(spec["shape"])
        if is_key != (spec["kind"] == "key"):
            problems.append(f"{name}: PRNG key array in only one of template and checkpoint")
            continue
        if is_key:
            data = index.read(name, tuple(slice(None) for _ in stored_shape), stored_shape, np.dtype(spec["dtype"]))
            key = jax.random.wrap_key_data(jnp.asarray(data), impl=spec["impl"])
            if key.shape != shape:
                problems.append(f"{name}: expected key shape {shape}, found {key.shape}")
            out.append(key)
            continue
        if stored_shape != shape or checkpoint._dtype(spec["dtype"]) != dtype:
            problems.append(f"{name}: expected {dtype.name}{list(shape)}, found {spec['dtype']}{list(stored_shape)}")
            continue
        if sharding is not None and not isinstance(leaf, np.ndarray):
            out.append(jax.make_array_from_callback(
                shape, sharding, lambda region, name=name: index.read(name, region, shape, dtype)))
            continue
        value = index.read(name, tuple(slice(None) for _ in shape), shape, dtype)
        if isinstance(leaf, (bool, int, float, complex)):
            out.append(type(leaf)(value.item()))
        elif isinstance(leaf, np.generic):
            out.append(value[()])
        elif isinstance(leaf, np.ndarray) or jax.dtypes.canonicalize_dtype(value.dtype) != value.dtype:
            out.append(value)
        else:
            out.append(jnp.asarray(value))
    return _unflatten_checked(manifest_path(path), specs, leaves, treedef, out, problems)


def _restore_sliced(path: Path, template: Any) -> Any:
    """`restore(sliced=True)` of a one-file checkpoint: each sharded array leaf from its devices' regions."""
    locations = checkpoint.leaf_locations(path)
    leaves, treedef = checkpoint._flatten(template)
    problems, out = [], []
    for entries, leaf in leaves:
        name = checkpoint._path_str(entries)
        where = locations.get(name)
        shape, dtype, is_key, sharding = checkpoint._template_info(leaf) if leaf is not None else ((), None, False, None)
        if where is None or where.kind != "array" or is_key or sharding is None or isinstance(leaf, np.ndarray):
            problems.append(f"{name}: a sliced restore takes plain array leaves with a sharding, found "
                            f"{'nothing' if where is None else where.kind} for template {type(leaf).__name__}")
            continue
        if where.shape != shape or where.dtype != dtype:
            problems.append(f"{name}: expected {dtype.name}{list(shape)}, found {where.dtype.name}{list(where.shape)}")
            continue
        out.append(jax.make_array_from_callback(
            shape, sharding, lambda region, where=where: checkpoint.read_region(path, where, region)))
    return _unflatten_checked(path, locations, leaves, treedef, out, problems)


def _unflatten_checked(path: Path, names_in_file: Any, leaves: list, treedef: Any, out: list, problems: list[str]) -> Any:
    """The restored tree, or one error listing every mismatch (and the file's leaves the template lacks)."""
    extra = [p for p in names_in_file if p not in {checkpoint._path_str(e) for e, _ in leaves}]
    if extra:
        problems.append(f"checkpoint has {len(extra)} leaf/leaves the template lacks: {', '.join(extra[:8])}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the template:\n  " + "\n  ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, out)
