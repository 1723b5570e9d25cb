"""Read and write `.safetensors` files with NumPy only (no torch, no `safetensors` package).

Format: 8-byte little-endian unsigned header length N; N bytes of JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`
(offsets relative to the first byte after the header); then the raw little-endian tensor bytes.
Reading memory-maps the file, so each tensor is a read-only view and nothing is copied until used.
Sharded checkpoints are read through `model.safetensors.index.json` (`{"weight_map": {name: file}}`).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header dict including any "__metadata__", byte offset where the data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: header length {n} is implausible; not a safetensors file?")
        header = json.loads(f.read(n).decode("utf-8"))
    return header, 8 + n


def load(path: str | os.PathLike, names: Iterable[str] | None = None, *, mmap: bool = True) -> dict[str, np.ndarray]:
    """Tensors of one file by name (all, or only `names`), as read-only memory-mapped views
    (`mmap=False` reads them into ordinary arrays)."""
    header, start = read_header(path)
    header.pop("__metadata__", None)
    wanted = header.keys() if names is None else list(names)
    # A plain ndarray view of the map (np.memmap's subclass mangles 0-d reshapes).
    buf = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray) if mmap else np.fromfile(path, dtype=np.uint8)
    out = {}
    for name in wanted:
        info = header[name]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        dt = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dt.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes, expected {count * dt.itemsize}")
        out[name] = buf[start + begin:start + end].view(dt).reshape(shape)
    return out


def metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_header(path)[0].get("__metadata__", {}) or {}


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (numpy or anything `np.asarray` accepts) in sorted name order, header padded
    with spaces to a multiple of 8 bytes (as the reference implementation does); atomic rename."""
    arrays = {}
    for name, t in tensors.items():
        a = np.asarray(t)  # (np.ascontiguousarray would turn a 0-d array into shape (1,))
        arrays[name] = a if a.flags.c_contiguous else a.copy(order="C")
    header: dict = {}
    if meta:
        header["__metadata__"] = {str(k): str(v) for k, v in meta.items()}
    offset = 0
    for name in sorted(arrays):
        a = arrays[name]
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        arrays[name] = a.astype(dt, copy=False)
        header[name] = {"dtype": _NAMES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(arrays):
            f.write(arrays[name].reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_files(directory: str | os.PathLike) -> dict[str, Path]:
    """name -> file for a HF checkpoint directory: via the shard index if present, else every
    `*.safetensors` file in it."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files (or {INDEX_FILE}) in {directory}")
    out = {}
    for file in files:
        header, _ = read_header(file)
        for name in header:
            if name != "__metadata__":
                out[name] = file
    return out


def load_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a (possibly sharded) checkpoint directory as memory-mapped views."""
    by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint_files(directory).items():
        by_file.setdefault(file, []).append(name)
    out = {}
    for file, names in by_file.items():
        out.update(load(file, names))
    return out


def save_sharded(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], max_shard_bytes: int,
                 meta: Mapping[str, str] | None = None) -> None:
    """Writes HF-style shards `model-0000i-of-0000n.safetensors` plus the index (one file when it fits)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = np.asarray(tensors[name]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save(directory / "model.safetensors", shards[0], meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save(directory / file, shard, meta)
        for name in shard:
            weight_map[name] = file
            total += np.asarray(shard[name]).nbytes
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))
