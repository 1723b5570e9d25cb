"""Token files and training batches (numpy only).

A token file is a flat little-endian uint16 `.bin` (nanoGPT's format, the paper's too) plus a JSON
sidecar `<file>.json` with at least dataset_id, num_tokens, vocab_size, tokenizer_sha256, eos_id, dtype.
Vocabularies above 65536 ids (Llama 3: 128256) use `"dtype": "uint32"` (little-endian); uint16 stays the
default and the only choice for smaller vocabularies.

Packed files (`pack_documents`, written by `stages/tokenize_hf.py --pack true`) hold whole documents
placed in rows of exactly `packed_seq_len` tokens, each row right-padded with `pad_id`; the sidecar
records both. `SequenceDataset.loss_mask` then marks the target tokens that count (every token that is
not padding), which the train stage passes as `batch["mask"]`. Without `pad_id` there is no mask: every
position counts (the paper's path).

Conversation files (`stages/tokenize_hf.py --chat true`) name a parallel uint8 file in the sidecar
(`"loss_mask": "<name>.mask.bin"`, one byte per token, 1 on assistant-turn tokens); the dataset reads it
row by row beside the tokens and `train_loss_mask` / `valid_batches(with_mask=True)` give the target mask
(times the padding mask when there is one).

`SequenceDataset` cuts the file into consecutive T-token sequences (a trailing partial one is dropped),
takes a validation split once from a seeded permutation, and serves training batches as a stateless
function of (seed, step): sample k of the run is position k % num_train of the permutation for
(seed, epoch = k // num_train). A resumed run therefore sees exactly the batches it would have seen.
The dataset id overwrites token 0 of every sequence (the paper's convention).

The authors' token files are raw uint16 `.bin` files without a sidecar. They open here too: their file
stems (`AUTHORS_DATASET_IDS`: c4_en, c4_es, fineweb_edu_10B, nemotron_math_20M) carry their dataset ids,
and any other raw file opens when its dataset id is given (`TokenFile(path, dataset_id=...)`); the
vocabulary size is then unknown (0) and comes from the model.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from forgetting.core.files import write_json_atomic as write_json_atomic  # the sidecar writer (re-exported)

DTYPE = np.dtype("<u2")
# The dataset ids the authors' dataloader assigns by file stem (their DATASET_TOKEN_IDS).
AUTHORS_DATASET_IDS = {"c4_en": 0, "c4_es": 1, "fineweb_edu_10B": 0, "nemotron_math_20M": 1}
DTYPES = {"uint16": DTYPE, "uint32": np.dtype("<u4")}
_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning for the maximum id (32 MiB)


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def dtype_for_vocab(vocab_size: int) -> str:
    """The token file dtype for a vocabulary: uint16 up to 65536 ids, else uint32."""
    return "uint16" if vocab_size <= 65536 else "uint32"


class TokenWriter:
    """Streams tokens (uint16, or uint32 for vocabularies > 65536) to `path` (via a temp file renamed on
    `close`), then writes the sidecar."""

    def __init__(self, path: str | Path, dtype: str = "uint16"):
        if dtype not in DTYPES:
            raise ValueError(f"token file dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self._np_dtype = DTYPES[dtype]
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(str(self.path) + ".tmp")
        self._f = open(self._tmp, "wb")
        self.num_tokens = 0
        self.max_id = -1

    def write(self, tokens: np.ndarray | Sequence[int]) -> None:
        arr = np.asarray(tokens)
        if arr.size == 0:
            return
        top = int(np.iinfo(self._np_dtype).max)
        if arr.min() < 0 or arr.max() > top:
            raise ValueError(f"token ids must be in [0, {top}] to fit a {self.dtype} .bin file")
        self.max_id = max(self.max_id, int(arr.max()))
        self._f.write(arr.astype(self._np_dtype, copy=False).tobytes())
        self.num_tokens += arr.size

    def close(self, meta: dict) -> dict:
        """Finishes the file; `meta` is completed with num_tokens and dtype and written as the sidecar."""
        self._f.close()
        if self.num_tokens == 0:
            self._tmp.unlink()
            raise ValueError(f"refusing to write {self.path}: the corpus is empty (no tokens)")
        vocab = int(meta.get("vocab_size") or 0)
        if self.dtype != "uint16" and vocab and vocab <= 65536:
            self._tmp.unlink()
            raise ValueError(f"a vocabulary of {vocab} ids fits uint16; {self.dtype} is only for vocabularies "
                             "above 65536")
        os.replace(self._tmp, self.path)
        full = {**meta, "dtype": self.dtype, "num_tokens": self.num_tokens, "max_token_id": self.max_id}
        write_json_atomic(sidecar_path(self.path), full)
        return full

    def abort(self) -> None:
        self._f.close()
        if self._tmp.exists():
            self._tmp.unlink()


def write_token_file(path: str | Path, tokens: np.ndarray, meta: dict, dtype: str | None = None) -> dict:
    """Writes an in-memory token array and its sidecar in one go (dtype: from the meta's vocab_size)."""
    writer = TokenWriter(path, dtype or dtype_for_vocab(int(meta.get("vocab_size") or 0)))
    try:
        writer.write(np.asarray(tokens).ravel())
    except BaseException:
        writer.abort()
        raise
    return writer.close(meta)


class TokenFile:
    """A memmapped `.bin` token file with its validated sidecar."""

    def __init__(self, path: str | Path, *, vocab_size: int | None = None, tokenizer_sha256: str | None = None,
                 dataset_id: int | None = None):
        """`dataset_id`: for a raw `.bin` without a sidecar (the authors' files); None = the sidecar's, or
        the authors' id of the file stem. Given with a sidecar, it must agree with the sidecar's."""
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"token file not found: {self.path}")
        if self.path.is_dir():
            raise ValueError(f"token file {self.path} is a directory; pass the .bin file (e.g. {self.path / 'data.bin'})")
        meta_path = sidecar_path(self.path)
        if meta_path.exists():
            try:
                self.meta: dict = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"sidecar {meta_path} is not valid JSON: {e}") from None
            if dataset_id is not None and "dataset_id" in self.meta and int(self.meta["dataset_id"]) != dataset_id:
                raise ValueError(f"dataset id {dataset_id} was given for {self.path}, but its sidecar says "
                                 f"{self.meta['dataset_id']}; drop the dataset id or fix the sidecar")
        else:
            if dataset_id is None:
                dataset_id = AUTHORS_DATASET_IDS.get(self.path.stem)
            if dataset_id is None:
                raise FileNotFoundError(
                    f"sidecar {meta_path} not found; a raw uint16 token file (the authors' format) needs its "
                    f"dataset id: pass --data.dataset_id N (their stems {sorted(AUTHORS_DATASET_IDS)} have one)")
            self.meta = {"dataset_id": int(dataset_id), "dtype": "uint16", "raw": True}
        size = self.path.stat().st_size
        if size == 0:
            raise ValueError(f"token file {self.path} is empty (0 bytes)")
        dtype_name = self.meta.get("dtype", "uint16")
        if dtype_name not in DTYPES:
            raise ValueError(f"{meta_path}: dtype {dtype_name!r} is not supported ({' or '.join(DTYPES)})")
        self.dtype = DTYPES[dtype_name]
        _check_dtype(self.path, meta_path, self.meta, size)
        if size % self.dtype.itemsize:
            raise ValueError(f"token file {self.path} has {size} bytes, not a multiple of {self.dtype.itemsize}: "
                             f"not a {dtype_name} token file (truncated?)")
        self.num_tokens = size // self.dtype.itemsize
        if self.meta.get("num_tokens") not in (None, self.num_tokens):
            raise ValueError(f"{meta_path} says {self.meta['num_tokens']} tokens but {self.path} holds {self.num_tokens}")
        if "dataset_id" not in self.meta:
            raise ValueError(f"{meta_path} has no dataset_id")
        self.dataset_id: int = int(self.meta["dataset_id"])
        self.vocab_size: int = int(self.meta.get("vocab_size") or 0)
        if tokenizer_sha256 is not None and self.meta.get("tokenizer_sha256") != tokenizer_sha256:
            raise ValueError(
                f"{self.path} was tokenized with tokenizer sha256 {self.meta.get('tokenizer_sha256')}, "
                f"but the tokenizer in use has sha256 {tokenizer_sha256}; re-tokenize with the same tokenizer"
            )
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        if vocab_size is not None:
            self.check_vocab(vocab_size)

    def max_token_id(self) -> int:
        """The largest id in the file, scanned in chunks so memory stays flat."""
        return max(int(self.tokens[i : i + _SCAN_CHUNK].max()) for i in range(0, self.num_tokens, _SCAN_CHUNK))

    def check_vocab(self, vocab_size: int) -> None:
        if self.dataset_id >= vocab_size or self.dataset_id < 0:
            raise ValueError(f"{self.path}: dataset_id {self.dataset_id} is outside the model's vocab of {vocab_size}")
        top = self.max_token_id()
        if top >= vocab_size:
            raise ValueError(
                f"{self.path} holds token id {top} but the model's vocab has {vocab_size} ids; "
                "use a model vocab_size at least the tokenizer's"
            )


def _check_dtype(path: Path, meta_path: Path, meta: dict, size: int) -> None:
    """A sidecar whose token count fits the file's size only at another dtype names the wrong dtype: say so,
    rather than report a token count mismatch."""
    named, count = meta.get("dtype", "uint16"), meta.get("num_tokens")
    if not isinstance(count, int) or count <= 0 or size == count * DTYPES[named].itemsize:
        return
    for other, dtype in DTYPES.items():
        if other != named and size == count * dtype.itemsize:
            raise ValueError(f"{meta_path} names dtype {named}, but {path} holds {count} tokens of {other} "
                             f"({size} bytes = {count} x {dtype.itemsize}): the sidecar's dtype is wrong; make the "
                             f"file again (or set \"dtype\": \"{other}\" if the file is right)")


class SequenceDataset:
    """Consecutive `seq_len`-token sequences of a TokenFile with a seeded validation split."""

    def __init__(self, token_file: TokenFile, seq_len: int, *, num_tokens_valid: int, split_seed: int,
                 overwrite_first_with_id: bool = True):
        if seq_len < 1:
            raise ValueError("seq_len must be >= 1")
        packed = token_file.meta.get("packed_seq_len")
        if packed is not None and int(packed) != seq_len:
            raise ValueError(f"{token_file.path} was packed into rows of {packed} tokens, but the model's sequence "
                             f"length is {seq_len}; pack it again with --seq_len {seq_len} (or pass --model.seq_len "
                             f"{packed})")
        pad = token_file.meta.get("pad_id")
        self.pad_id: int | None = None if pad is None else int(pad)
        self.token_file = token_file
        self.seq_len = seq_len
        self.overwrite_first_with_id = overwrite_first_with_id
        self.num_sequences = token_file.num_tokens // seq_len
        if self.num_sequences == 0:
            raise ValueError(f"{token_file.path} has {token_file.num_tokens} tokens: fewer than one sequence of {seq_len}")
        self._rows = token_file.tokens[: self.num_sequences * seq_len].reshape(self.num_sequences, seq_len)
        self._mask_rows = self._open_loss_mask(token_file)
        n_valid = math.ceil(num_tokens_valid / seq_len) if num_tokens_valid > 0 else 0
        if n_valid >= self.num_sequences:
            raise ValueError(
                f"{token_file.path}: a validation split of {n_valid} sequences leaves no training sequences "
                f"(only {self.num_sequences} of {seq_len} tokens); lower num_tokens_valid"
            )
        perm = np.random.default_rng(split_seed).permutation(self.num_sequences)
        # Sorted within each split so memmap reads are as sequential as possible; the split itself is random.
        self.valid_indices = np.sort(perm[:n_valid])
        self.train_indices = np.sort(perm[n_valid:])
        self.num_valid = int(n_valid)
        self.num_train = int(self.num_sequences - n_valid)
        self._perm_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _open_loss_mask(self, token_file: TokenFile) -> np.ndarray | None:
        name = token_file.meta.get("loss_mask")
        if not name:
            return None
        path = token_file.path.parent / name
        if not path.exists():
            raise FileNotFoundError(f"{token_file.path}'s sidecar names the loss mask {name}, which is missing; "
                                    "tokenize again")
        if path.stat().st_size != token_file.num_tokens:
            raise ValueError(f"{path} has {path.stat().st_size} bytes but {token_file.path} holds "
                             f"{token_file.num_tokens} tokens; tokenize again")
        mask = np.memmap(path, dtype=np.uint8, mode="r", shape=(token_file.num_tokens,))
        return mask[: self.num_sequences * self.seq_len].reshape(self.num_sequences, self.seq_len)

    @property
    def has_assistant_mask(self) -> bool:
        """True for conversation files whose loss counts only the tokens their mask file marks."""
        return self._mask_rows is not None

    def _masks_of(self, sequence_ids: np.ndarray, tokens_bt: np.ndarray) -> np.ndarray | None:
        pad = self.loss_mask(tokens_bt)
        if self._mask_rows is None:
            return pad
        order = np.argsort(sequence_ids, kind="stable")
        out = np.empty((len(sequence_ids), self.seq_len), dtype=np.float32)
        out[order] = self._mask_rows[sequence_ids[order]]
        return out if pad is None else out * pad

    def train_loss_mask(self, step: int, batch_size: int, seed: int) -> np.ndarray | None:
        """float32 [B, T] target mask of `train_batch(step, batch_size, seed)` (assistant tokens of conversation
        files, times not-padding of packed files); None when every target counts."""
        ids = self.train_indices[self.train_positions(step, batch_size, seed)]
        return self._masks_of(ids, self._rows_of(ids))

    def _rows_of(self, sequence_ids: np.ndarray) -> np.ndarray:
        order = np.argsort(sequence_ids, kind="stable")  # read the memmap in increasing offset order
        out = np.empty((len(sequence_ids), self.seq_len), dtype=np.int32)
        out[order] = self._rows[sequence_ids[order]]
        if self.overwrite_first_with_id:
            out[:, 0] = self.token_file.dataset_id
        return out

    def loss_mask(self, tokens_bt: np.ndarray) -> np.ndarray | None:
        """float32 [B, T]: 1 where the token counts as a target (not padding); None for unpadded files."""
        if self.pad_id is None:
            return None
        return (np.asarray(tokens_bt) != self.pad_id).astype(np.float32)

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.num_train < batch_size:
            raise ValueError(
                f"{self.token_file.path}: the training split has {self.num_train} sequences of {self.seq_len} tokens, "
                f"fewer than one batch of {batch_size}; use more data, a smaller batch, or a smaller validation split"
            )

    def epoch_of(self, step: int, batch_size: int) -> int:
        return (step * batch_size) // self.num_train

    def _epoch_permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:  # memoized only: the value is a pure function of (seed, epoch)
            perm = np.random.default_rng([seed, epoch]).permutation(self.num_train)
            self._perm_cache[key] = perm
            while len(self._perm_cache) > 2:
                self._perm_cache.popitem(last=False)
        return perm

    def train_positions(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Indices into the training split for batch `step` (rows wrap into the next epoch's order)."""
        self.check_batch_size(batch_size)
        k = step * batch_size + np.arange(batch_size, dtype=np.int64)
        epochs, within = np.divmod(k, self.num_train)
        out = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self._epoch_permutation(seed, int(e))[within[mask]]
        return out

    def train_batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """int32 [batch_size, seq_len]: the training batch number `step` of a run with this `seed`."""
        return self.train_sequences(self.train_positions(step, batch_size, seed))

    def train_sequences(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """int32 rows of the training split by index (0..num_train-1), e.g. for real replay."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_train):
            raise IndexError(f"training sequence index out of range [0, {self.num_train})")
        return self._rows_of(self.train_indices[idx])

    def valid_batches(self, batch_size: int, *, drop_last: bool = False, with_mask: bool = False) -> Iterator:
        """The whole validation split in a fixed order; the last batch is smaller unless `drop_last`.
        With `with_mask`, (tokens, target mask or None) pairs (see `train_loss_mask`)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        for start in range(0, self.num_valid, batch_size):
            ids = self.valid_indices[start : start + batch_size]
            if drop_last and len(ids) < batch_size:
                return
            rows = self._rows_of(ids)
            yield (rows, self._masks_of(ids, rows)) if with_mask else rows


def num_rows(fraction: float, batch_size: int) -> int:
    """Rows of a batch of `batch_size` that a mixture or replacement `fraction` takes: floor(fraction * B)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return int(math.floor(fraction * batch_size + 1e-9))  # epsilon: 0.29 * 100 is 28.999... in floating point


def _swap_rows(main_bt: np.ndarray, other_bt: np.ndarray, fraction: float) -> np.ndarray:
    n = num_rows(fraction, main_bt.shape[0])
    if n == 0:
        return main_bt
    if other_bt.shape[0] < n or other_bt.shape[1:] != main_bt.shape[1:]:
        raise ValueError(f"need at least {n} rows of shape {main_bt.shape[1:]} from the other batch, got {other_bt.shape}")
    out = np.array(main_bt, copy=True)
    out[:n] = other_bt[:n]
    return out


def mix_batch(main_bt: np.ndarray, other_bt: np.ndarray, fraction: float) -> np.ndarray:
    """Pretraining mixture: the first floor(fraction * B) rows come from `other_bt`."""
    return _swap_rows(main_bt, other_bt, fraction)


def replace_batch(main_bt: np.ndarray, old_bt: np.ndarray, fraction: float) -> np.ndarray:
    """`replace` replay: the first floor(fraction * B) rows of the new-data batch become old-data rows."""
    return _swap_rows(main_bt, old_bt, fraction)


def iter_packed_rows(documents: Iterable[Sequence[int]], seq_len: int, pad_id: int) -> Iterator[np.ndarray]:
    """Streams the rows of `pack_documents` (int64 [seq_len] each)."""
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2 for packing")
    current: list[int] = []

    def padded() -> np.ndarray:
        row = np.asarray(current + [pad_id] * (seq_len - len(current)), np.int64)
        current.clear()
        return row

    for doc in documents:
        doc = list(doc)
        if pad_id in doc:
            raise ValueError(f"a document contains the padding id {pad_id}; choose a pad id the text cannot produce")
        if current and len(current) + len(doc) > seq_len:
            yield padded()
        while len(doc) > seq_len:
            yield np.asarray(doc[:seq_len], np.int64)
            doc = doc[seq_len:]
        current.extend(doc)
        if len(current) == seq_len:
            yield padded()
    if current:
        yield padded()


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int, pad_id: int) -> np.ndarray:
    """Packs documents (token lists, each already BOS + text + EOS) into rows of `seq_len` tokens.

    Next-fit in document order: a document goes into the current row if it fits, otherwise the row is
    right-padded with `pad_id` and a new one begins; a document longer than a row is cut into row-sized
    pieces (its last piece starts a new partial row). Documents are never cut except when longer than a
    row, so the only positions that do not count are the padding (see `SequenceDataset.loss_mask`).
    Returns int64 [N, seq_len].
    """
    rows = list(iter_packed_rows(documents, seq_len, pad_id))
    if not rows:
        raise ValueError("nothing to pack: no documents")
    return np.stack(rows)
