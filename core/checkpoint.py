"""Checkpoints: pytrees (params, optimizer state, step, PRNG keys, ...) in one msgpack file, atomically.

File layout (all msgpack, one file)::

    MAGIC (8 bytes) | payload | header | header length (u64 little-endian) | END_MAGIC (8 bytes)

- payload: a stream of msgpack objects. Per leaf, in tree-flattening order, one record
  `{"path", "keys", "kind", "dtype", "shape", "impl", "chunks"}` followed by `chunks` msgpack `bin`
  objects holding the leaf's C-order little-endian bytes (leaves larger than `CHUNK_BYTES` are split,
  since msgpack caps one object near 2-4 GiB). `kind` is "array", "key" (a typed `jax.random.key` array:
  its `key_data` is stored plus the PRNG `impl` name) or "none" (a `None` leaf).
- header: `{"format", "version", "sha256", "payload_bytes", "n_leaves", "metadata" (JSON text of any
  JSON-able dict, e.g. the resolved config)}`; the sha256 covers the payload bytes, then the header's
  length fields and metadata, so damage anywhere in the file is detected. It sits at the end so the
  payload can be streamed to disk while hashing; `read_metadata` reads only the tail.

Writes are atomic: a temp file in the same directory, flush + fsync, `os.replace`, fsync of the directory.
An interrupted save leaves the previous checkpoint untouched (at worst a stray `.<name>.*.tmp` file).
Restores verify the checksum, so a corrupted or truncated file is refused with a clear error.

`restore(path, template)` returns jax arrays in the template's structure (dicts, lists, tuples,
NamedTuples such as optax states all keep their types). Leaves are matched by key path; shapes and dtypes
must agree exactly. Template leaves may be arrays, `jax.ShapeDtypeStruct`s (their `.sharding`, if any,
places the restored array), Python/numpy scalars, or None. Numpy template leaves, and 64-bit leaves that
JAX would truncate (without `jax_enable_x64`), come back as numpy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from forgetting.core import files

FORMAT = "forgetting-checkpoint"
VERSION = 1
MAGIC = b"FGTCKPT1"
END_MAGIC = b"FGTCKEND"
CHUNK_BYTES = 1 << 30  # bytes per msgpack bin object; leaves above this are chunked
_TAIL = 8 + len(END_MAGIC)  # u64 header length + end magic
_MAX_HEADER = 1 << 30


# ----------------------------------------------------------------------------------------- paths


def _path_entry(k: Any) -> list:
    """A key-path entry as a msgpack-able [kind, key] pair."""
    if isinstance(k, jax.tree_util.DictKey):
        key = k.key
        if not isinstance(key, (str, int)):
            key = str(key)
        return ["dict", key]
    if isinstance(k, jax.tree_util.SequenceKey):
        return ["seq", int(k.idx)]
    if isinstance(k, jax.tree_util.GetAttrKey):
        return ["attr", k.name]
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return ["flat", int(k.key)]
    return ["other", str(k)]


def _path_str(entries: list) -> str:
    out = []
    for kind, key in entries:
        if kind == "attr":
            out.append(f".{key}")
        elif kind == "dict":
            out.append(f"[{key!r}]")
        else:
            out.append(f"[{key}]")
    return "".join(out) or "<root>"


def _flatten(tree: Any) -> tuple[list[tuple[list, Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return [([_path_entry(k) for k in path], leaf) for path, leaf in leaves], treedef


def _is_key_dtype(dtype: Any) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _to_numpy(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    arr = np.asarray(leaf)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr


def _dtype(name: str) -> np.dtype:
    return np.dtype(jnp.dtype(name))  # jnp knows bfloat16/float8 names via ml_dtypes


# ----------------------------------------------------------------------------------------- save


class _HashingWriter:
    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.n += len(data)


def _write_leaf(out: _HashingWriter, packer: msgpack.Packer, entries: list, leaf: Any) -> None:
    record: dict[str, Any] = {"path": _path_str(entries), "keys": entries}
    if leaf is None:
        record.update(kind="none", chunks=0)
        out.write(packer.pack(record))
        return
    if _is_key_dtype(getattr(leaf, "dtype", None)):
        record["kind"], record["impl"] = "key", str(jax.random.key_impl(leaf))
        record["key_shape"] = list(leaf.shape)
        arr = _to_numpy(jax.random.key_data(leaf))
    else:
        record["kind"] = "array"
        arr = _to_numpy(leaf)
    if arr.dtype == object:
        raise TypeError(f"checkpoint leaf {record['path']} has object dtype; only numeric arrays are supported")
    data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # bytes; works for bfloat16
    n_chunks = max(1, -(-len(data) // CHUNK_BYTES))
    record.update(dtype=arr.dtype.name, shape=list(arr.shape), chunks=n_chunks, nbytes=len(data))
    out.write(packer.pack(record))
    for i in range(n_chunks):
        out.write(packer.pack(bytes(data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])))


def save(path: str | Path, tree: Any, metadata: dict | None = None, *,
         before_replace: Callable[[str], None] | None = None) -> None:
    """Writes `tree` (any pytree of arrays / key arrays / scalars / None) and JSON-able `metadata` to
    `path`, atomically: readers see either the previous file or the complete new one. `before_replace`
    is called with the complete temp file's path just before it is renamed into place (tests inject
    crashes there)."""
    path = Path(path)
    metadata = {} if metadata is None else metadata
    try:  # JSON round trip: fails early on non-JSON metadata, and normalizes tuples to lists
        metadata = json.loads(json.dumps(metadata))
    except TypeError as e:
        raise TypeError(f"checkpoint metadata must be JSON-serializable: {e}") from None
    leaves, _ = _flatten(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = files.create_temp_file(path.parent, f".{path.name}.")  # the user's umask, not 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            out = _HashingWriter(f)
            packer = msgpack.Packer(use_bin_type=True)
            for entries, leaf in leaves:
                _write_leaf(out, packer, entries, leaf)
            _hash_header_fields(out.sha, out.n, len(leaves), metadata)
            header = packer.pack({
                "format": FORMAT, "version": VERSION, "sha256": out.sha.hexdigest(),
                "payload_bytes": out.n, "n_leaves": len(leaves), "metadata": _metadata_json(metadata),
            })
            f.write(header)
            f.write(struct.pack("<Q", len(header)))
            f.write(END_MAGIC)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    files.fsync_dir(path.parent)


def _hash_header_fields(sha, payload_bytes: int, n_leaves: int, metadata: dict) -> None:
    """The checksum covers the payload and then these header fields, so a damaged header is caught too."""
    blob = json.dumps({"payload_bytes": payload_bytes, "n_leaves": n_leaves}, sort_keys=True)
    sha.update(b"\0" + blob.encode() + b"\0" + _metadata_json(metadata).encode())


def _metadata_json(metadata: dict) -> str:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------------------- read


def _corrupt(path: Path, why: str) -> ValueError:
    # Generic advice; the run stages add what recovers a file in its role (params.msgpack, state.msgpack).
    return ValueError(f"checkpoint {path} is corrupt or truncated ({why}); it cannot be loaded: delete it and let "
                      "the stage that wrote it write it again, or restore it from a copy")


def _open(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (file does not exist)")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint path {path} is a directory, expected a checkpoint file")
    return path, open(path, "rb")


def _read_header(path: Path, f) -> tuple[dict, int]:
    """Returns (header, payload end offset) after checking magic bytes and framing."""
    size = os.fstat(f.fileno()).st_size
    if size < len(MAGIC) + _TAIL:
        raise _corrupt(path, f"only {size} bytes")
    if f.read(len(MAGIC)) != MAGIC:
        raise _corrupt(path, "bad magic bytes; not a forgetting checkpoint")
    f.seek(size - _TAIL)
    tail = f.read(_TAIL)
    if tail[8:] != END_MAGIC:
        raise _corrupt(path, "missing end marker; the write was probably interrupted")
    (header_len,) = struct.unpack("<Q", tail[:8])
    payload_end = size - _TAIL - header_len
    if header_len > _MAX_HEADER or payload_end < len(MAGIC):
        raise _corrupt(path, "bad header length")
    f.seek(payload_end)
    try:
        header = msgpack.unpackb(f.read(header_len), raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - any decode failure means a damaged file
        raise _corrupt(path, f"unreadable header: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _corrupt(path, "header is not a forgetting checkpoint header")
    expected = {"version": int, "sha256": str, "payload_bytes": int, "n_leaves": int, "metadata": str}
    for key, typ in expected.items():
        if not isinstance(header.get(key), typ):
            raise _corrupt(path, f"header field {key!r} missing or damaged")
    try:
        header["metadata"] = json.loads(header["metadata"])
    except ValueError:
        raise _corrupt(path, "metadata is not valid JSON") from None
    if not isinstance(header["metadata"], dict):
        raise _corrupt(path, "metadata is not a JSON object")
    if header.get("version") != VERSION:
        raise ValueError(f"checkpoint {path} has format version {header.get('version')}; this code reads "
                         f"version {VERSION}")
    if header.get("payload_bytes") != payload_end - len(MAGIC):
        raise _corrupt(path, "payload length does not match the header")
    return header, payload_end


class _HashingReader:
    def __init__(self, f, limit: int):
        self.f, self.left, self.sha = f, limit, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        self.sha.update(data)
        return data


def _read_records(path: Path) -> tuple[dict, list[dict]]:
    """Reads and checksums the whole file; returns (header, records with numpy `value`s)."""
    path, f = _open(path)
    with f:
        header, payload_end = _read_header(path, f)
        f.seek(len(MAGIC))
        reader = _HashingReader(f, payload_end - len(MAGIC))
        limit = CHUNK_BYTES + (1 << 20)
        unpacker = msgpack.Unpacker(reader, raw=False, strict_map_key=False, max_buffer_size=max(limit, 1 << 24),
                                    read_size=1 << 22)
        records = []
        try:
            for _ in range(header["n_leaves"]):
                record = unpacker.unpack()
                if record["kind"] == "none":
                    record["value"] = None
                else:
                    chunks = [unpacker.unpack() for _ in range(record["chunks"])]
                    buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    if len(buf) != record["nbytes"]:
                        raise ValueError("leaf byte count mismatch")
                    arr = np.frombuffer(buf, dtype=_dtype(record["dtype"])).reshape(record["shape"]).copy()
                    record["value"] = arr
                records.append(record)
            if reader.left:  # consume whatever the unpacker did not need, so the hash covers it all
                while reader.read(1 << 22):
                    pass
            trailing = list(unpacker)
        except Exception as e:  # noqa: BLE001 - a damaged stream fails in many ways; checksum decides
            raise _corrupt(path, f"undecodable payload: {type(e).__name__}: {e}") from None
        _hash_header_fields(reader.sha, header["payload_bytes"], header["n_leaves"], header["metadata"])
        if reader.sha.hexdigest() != header["sha256"]:
            raise _corrupt(path, "checksum mismatch")
        if trailing:
            raise _corrupt(path, "unexpected trailing data in payload")
    return header, records


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata stored with the checkpoint (reads only the header, no checksum of the payload)."""
    path, f = _open(path)
    with f:
        header, _ = _read_header(path, f)
    return header["metadata"]


def read_header(path: str | Path) -> dict:
    """The header: format, version, sha256, payload_bytes, n_leaves, metadata."""
    path, f = _open(path)
    with f:
        header, _ = _read_header(path, f)
    return header


@dataclasses.dataclass(frozen=True)
class LeafLocation:
    """Where one leaf's bytes lie in a checkpoint file: `chunks` are (file offset, byte count) in order."""

    path: str
    kind: str
    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: tuple[tuple[int, int], ...]


def leaf_locations(path: str | Path) -> dict[str, LeafLocation]:
    """Every leaf's location, by key path string, from the records alone: the leaves' data is skipped, not
    read. Checks the framing (magic bytes, end marker, header, every record's byte count against its shape)
    but not the payload's sha256, which needs every byte: the price of `read_region`'s partial reads."""
    path, f = _open(path)
    out = {}
    with f:
        header, payload_end = _read_header(path, f)
        pos = len(MAGIC)
        try:
            for _ in range(header["n_leaves"]):
                record, pos = _record_at(f, pos, payload_end)
                chunks = []
                for _ in range(record["chunks"]):
                    start, n = _bin_at(f, pos)
                    chunks.append((start, n))
                    pos = start + n
                if pos > payload_end:
                    raise ValueError("a leaf runs past the payload")
                if record["kind"] != "none":
                    dtype, shape = _dtype(record["dtype"]), tuple(record["shape"])
                    if sum(n for _, n in chunks) != record["nbytes"] or record["nbytes"] != dtype.itemsize * math.prod(shape):
                        raise ValueError(f"leaf {record['path']}: byte count does not match its shape")
                    out[record["path"]] = LeafLocation(record["path"], record["kind"], dtype, shape, tuple(chunks))
        except Exception as e:  # noqa: BLE001 - a damaged stream fails in many ways
            raise _corrupt(path, f"undecodable payload: {type(e).__name__}: {e}") from None
        if pos != payload_end:
            raise _corrupt(path, "unexpected trailing data in payload")
    return out


def _record_at(f, pos: int, payload_end: int) -> tuple[dict, int]:
    """The msgpack record starting at `pos` and the offset just past it."""
    size = 1 << 12  # records are small (path, keys, dtype, shape); read more only if one is not
    while True:
        f.seek(pos)
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(f.read(min(size, payload_end - pos)))
        try:
            record = unpacker.unpack()
        except msgpack.OutOfData:
            if size >= payload_end - pos:
                raise
            size *= 4
            continue
        if not isinstance(record, dict):
            raise ValueError(f"expected a leaf record at offset {pos}")
        return record, pos + unpacker.tell()


def _bin_at(f, pos: int) -> tuple[int, int]:
    """(data offset, length) of the msgpack bin object at `pos`."""
    f.seek(pos)
    head = f.read(5)
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(head[0]) if head else None
    if width is None:
        raise ValueError(f"expected a msgpack bin object at offset {pos}")
    return pos + 1 + width, int.from_bytes(head[1:1 + width], "big")


def read_region(path: str | Path, location: LeafLocation, region: tuple[slice, ...]) -> np.ndarray:
    """The values of one leaf (`leaf_locations`) inside `region` (slices of its shape), read through a memory
    map: only the pages holding the region are read. A leaf split over several chunks (over `CHUNK_BYTES`)
    is read by whole rows of its leading axis."""
    shape, dtype = location.shape, location.dtype
    if len(location.chunks) == 1 and shape:
        offset, nbytes = location.chunks[0]
        if nbytes:
            raw = np.memmap(path, np.uint8, mode="r", offset=offset, shape=(nbytes,))
            return np.array(raw.view(dtype).reshape(shape)[region])
    if not shape or len(location.chunks) <= 1:  # a scalar or an empty leaf
        return np.frombuffer(_read_bytes(path, location.chunks, 0, dtype.itemsize * math.prod(shape)),
                             dtype).reshape(shape)[region].copy()
    lo, hi, _ = region[0].indices(shape[0]) if region else (0, shape[0], 1)
    row = dtype.itemsize * math.prod(shape[1:])
    rows = np.frombuffer(_read_bytes(path, location.chunks, lo * row, max(hi, lo) * row), dtype)
    return rows.reshape((max(hi - lo, 0), *shape[1:]))[(slice(None), *region[1:])].copy()


def _read_bytes(path: str | Path, chunks: tuple[tuple[int, int], ...], start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a leaf's data, which lies in `chunks` one after the other."""
    out, base = [], 0
    with open(path, "rb") as f:
        for offset, n in chunks:
            a, b = max(start, base), min(stop, base + n)
            if a < b:
                f.seek(offset + a - base)
                out.append(f.read(b - a))
            base += n
    return b"".join(out)


def _record_value(record: dict) -> Any:
    if record["kind"] == "key":
        return jax.random.wrap_key_data(jnp.asarray(record["value"]), impl=record["impl"])
    return record["value"]


def load_tree(path: str | Path) -> dict:
    """Raw restore without a template: nested dicts (dict keys and NamedTuple fields) and lists of numpy
    arrays (typed PRNG keys come back as jax key arrays, None leaves as None). For inspection and
    conversion; use `restore` to get the original container types back."""
    _, records = _read_records(path)
    if not records:
        return {}
    root: Any = [] if records[0]["keys"] and records[0]["keys"][0][0] in ("seq", "flat") else {}
    for record in records:
        value = _record_value(record)
        entries = record["keys"]
        if not entries:
            return value  # the whole tree was one leaf
        node: Any = root
        for i, (_, key) in enumerate(entries):
            last = i == len(entries) - 1
            if isinstance(node, list):
                while len(node) <= key:
                    node.append(None)
                if last:
                    node[key] = value
                else:
                    if node[key] is None:
                        node[key] = [] if entries[i + 1][0] in ("seq", "flat") else {}
                    node = node[key]
            else:
                if last:
                    node[key] = value
                else:
                    node = node.setdefault(key, [] if entries[i + 1][0] in ("seq", "flat") else {})
    return root


def _template_info(leaf: Any) -> tuple[tuple[int, ...], np.dtype | None, bool, Any]:
    """(shape, dtype, is_key, sharding) of a template leaf."""
    if isinstance(leaf, (bool, int, float, complex, np.generic)):
        arr = np.asarray(leaf)
        return arr.shape, arr.dtype, False, None
    dtype = getattr(leaf, "dtype", None)
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    sharding = getattr(leaf, "sharding", None)
    if _is_key_dtype(dtype):
        return shape, None, True, sharding
    return shape, np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype, False, sharding


def restore(path: str | Path, template: Any, *, strict: bool = True) -> Any:
    """Loads the checkpoint at `path` into the structure of `template`.

    Every template leaf must be present in the file with the same shape and dtype (no silent casts).
    With `strict` (default), leaves in the file that the template lacks are an error too; pass
    `strict=False` to restore a sub-tree (e.g. only `params` of a full training state, when the template
    has the same key paths). Returns jax arrays (placed with the template leaf's sharding when it has one).
    """
    path = Path(path)
    _, records = _read_records(path)
    by_path = {r["path"]: r for r in records}
    leaves, treedef = _flatten(template)
    problems, out = [], []
    for entries, leaf in leaves:
        name = _path_str(entries)
        record = by_path.get(name)
        if record is None:
            problems.append(f"{name}: missing from the checkpoint")
            continue
        if leaf is None:
            if record["kind"] != "none":
                problems.append(f"{name}: template has None, checkpoint has an array")
            out.append(None)
            continue
        shape, dtype, is_key, sharding = _template_info(leaf)
        if record["kind"] == "none":
            problems.append(f"{name}: checkpoint has None, template expects shape {shape}")
            continue
        found_key = record["kind"] == "key"
        if is_key != found_key:
            problems.append(f"{name}: expected {'a PRNG key array' if is_key else 'a plain array'}, found "
                            f"{'a PRNG key array' if found_key else 'a plain array'}")
            continue
        found_shape = tuple(record["key_shape"] if found_key else record["shape"])
        if found_shape != shape:
            problems.append(f"{name}: expected shape {shape}, found {found_shape}")
            continue
        if not is_key and _dtype(record["dtype"]) != dtype:
            problems.append(f"{name}: expected dtype {dtype.name}, found {record['dtype']}")
            continue
        if is_key and isinstance(leaf, jax.Array) and str(jax.random.key_impl(leaf)) != record["impl"]:
            problems.append(f"{name}: expected PRNG impl {jax.random.key_impl(leaf)}, found {record['impl']}")
            continue
        value = _record_value(record)
        record["value"] = None  # each leaf's bytes are let go once converted: the peak is one state, not two
        if isinstance(leaf, (bool, int, float, complex)):
            out.append(type(leaf)(value.item()))
        elif isinstance(leaf, np.generic):
            out.append(value[()])
        elif isinstance(leaf, np.ndarray) or (
                not is_key and jax.dtypes.canonicalize_dtype(value.dtype) != value.dtype):
            out.append(value)  # numpy template, or a 64-bit dtype JAX would truncate without jax_enable_x64
        elif sharding is not None and not is_key:
            out.append(jax.device_put(value, sharding))
        else:
            out.append(jnp.asarray(value) if not is_key else value)
    if strict:
        wanted = {_path_str(e) for e, _ in leaves}
        extra = [p for p in by_path if p not in wanted]
        if extra:
            shown = ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else "")
            problems.append(f"checkpoint has {len(extra)} leaf/leaves the template lacks: {shown} "
                            f"(pass strict=False to ignore them)")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the template:\n  " + "\n  ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, out)
