"""The GGUF file reader (llama.cpp's format), through the `gguf` package (the `gguf` extra): metadata and
dequantized tensors, one parse per unchanged file. `formats.gguf_checkpoint` reads weights and config from it,
`formats.hf_tokenizer` the tokenizer metadata."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


def _import_gguf() -> Any:
    try:
        import gguf  # (the optional `gguf` extra)
    except ImportError:
        raise ImportError("reading .gguf files needs the gguf package: pip install 'forgetting[gguf]'") from None
    return gguf


class GGUFFile:
    """Metadata and tensors of one GGUF file (memory-mapped by gguf.GGUFReader)."""

    def __init__(self, path: str | os.PathLike):
        gguf = _import_gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as err:  # noqa: BLE001 - gguf's reader fails in many ways on a damaged file
            raise ValueError(f"{self.path} is not a readable GGUF file: {err}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: GGUF metadata has no {key}")
        return value

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in numpy (row-major, HF [out, in]) order."""
        gguf = _import_gguf()
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(f"{self.path}: tensor {name} has type {kind}; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")
        out = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(out, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """A GGUFFile, reused while the file is unchanged (parsing the metadata of a real file takes seconds:
    the tokenizer, the chat template and the weights of one file are read from one parse)."""
    p = Path(path).resolve()
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = p.stat()
    return _open_cached(str(p), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)
