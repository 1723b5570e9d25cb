"""Stage `tokenize`: text sources -> a flat little-endian uint16 `.bin` plus a JSON sidecar.

    python -m forgetting.stages.tokenize --sources A.txt --tokenizer tok.tiktoken --dataset_id 0 --out a.bin

Every document is followed by EOS. Encoding goes through tiktoken (`encode_ordinary`, so text that
happens to contain "<|endoftext|>" is encoded as plain text, never as the special token). The run
streams: text is read and encoded in ~1M-character batches and appended to the output, so memory stays
flat for inputs larger than RAM. With `--shuffle`, documents are first written in source order to a
temporary file and then copied out in a seeded random order (memory: one offset per document).
`--max_tokens` truncates the output (after shuffling) to that many tokens.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from forgetting.core import data
from forgetting.training import cli
from forgetting.corpora import sources as sources_lib
from forgetting.stages import tokenizer as tokenizer_lib

_BATCH_CHARS = 1 << 20


@dataclasses.dataclass(frozen=True)
class Config:
    """Tokenize text sources into a uint16 .bin token file with a JSON sidecar."""

    sources: tuple[str, ...] = ()  # .txt / .jsonl files, directories of them, or hf:NAME[:CONFIG][:SPLIT]
    tokenizer: str = "tok.tiktoken"  # a .tiktoken file written by the tokenizer stage (with its .json)
    dataset_id: int = 0  # written to the sidecar; overwrites token 0 of every training sequence
    out: str = "data.bin"  # output .bin; the sidecar goes to OUT.json
    shuffle: bool = False  # shuffle document order (seeded)
    seed: int = 0  # seed of the document shuffle
    max_tokens: int = 0  # keep at most this many tokens (0 = all)
    text_field: str = "text"  # field holding the text in .jsonl / Hugging Face rows
    threads: int = 0  # tiktoken encoding threads (0 = number of CPU cores)
    progress: bool = True  # progress bar (MB/s) on stderr

    def validate(self) -> None:
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.dataset_id < 0:
            raise ValueError("dataset_id must be >= 0")
        if self.threads < 0 or self.seed < 0:
            raise ValueError(f"--threads and --seed must be >= 0, got {self.threads}, {self.seed}")
        cli.check_output_file("--out", self.out)


def _encoded_pieces(cfg: Config, enc, eos: int, srcs: list[str], bar: tqdm) -> Iterator[tuple[np.ndarray, bool]]:
    """(tokens, ends_document) per piece, EOS already appended at document ends; encoded in batches."""
    threads = cfg.threads or os.cpu_count() or 1
    batch: list[sources_lib.Piece] = []
    size = 0

    def flush():
        texts = [p.text for p in batch]
        for piece, ids in zip(batch, enc.encode_ordinary_batch(texts, num_threads=threads)):
            if piece.ends_document:
                ids.append(eos)
            yield np.asarray(ids, dtype=data.DTYPE), piece.ends_document
        bar.update(sum(len(t.encode("utf-8")) for t in texts))

    for piece in sources_lib.iter_pieces(srcs, cfg.text_field):
        batch.append(piece)
        size += len(piece.text)
        if size >= _BATCH_CHARS:
            yield from flush()
            batch, size = [], 0
    if batch:
        yield from flush()


def _write_in_order(stream, writer: data.TokenWriter, max_tokens: int) -> int:
    n_docs = 0
    for ids, ends in stream:
        if max_tokens and writer.num_tokens + len(ids) >= max_tokens:
            writer.write(ids[: max_tokens - writer.num_tokens])
            return n_docs + 1
        writer.write(ids)
        n_docs += int(ends)
    return n_docs


def _write_shuffled(stream, writer: data.TokenWriter, max_tokens: int, seed: int, tmp_path: Path) -> int:
    staging = data.TokenWriter(tmp_path)
    ends: list[int] = []
    try:
        for ids, doc_ends in stream:
            staging.write(ids)
            if doc_ends:
                ends.append(staging.num_tokens)
    except BaseException:
        staging.abort()
        raise
    if staging.num_tokens == 0:
        staging.abort()
        return 0
    if not ends or ends[-1] != staging.num_tokens:
        ends.append(staging.num_tokens)
    staging.close({"dataset_id": 0, "staging": True})
    tokens = None
    try:
        tokens = np.memmap(tmp_path, dtype=data.DTYPE, mode="r")
        bounds = np.concatenate([[0], np.asarray(ends, dtype=np.int64)])
        order = np.random.default_rng(seed).permutation(len(ends))
        for n_docs, d in enumerate(order, start=1):
            ids = tokens[bounds[d] : bounds[d + 1]]
            if max_tokens and writer.num_tokens + len(ids) >= max_tokens:
                writer.write(ids[: max_tokens - writer.num_tokens])
                return n_docs
            writer.write(ids)
        return len(order)
    finally:
        del tokens  # release the memmap before deleting its file
        tmp_path.unlink(missing_ok=True)
        data.sidecar_path(tmp_path).unlink(missing_ok=True)


def tokenize(cfg: Config) -> dict:
    """Tokenizes `cfg.sources` into `cfg.out`; returns the sidecar dict."""
    cfg.validate()
    enc = tokenizer_lib.load(cfg.tokenizer)
    if enc.n_vocab > 65536:
        raise ValueError(f"tokenizer has {enc.n_vocab} ids; a uint16 .bin holds at most 65536")
    if cfg.dataset_id >= enc.n_vocab:
        raise ValueError(f"dataset_id {cfg.dataset_id} is not an id of the tokenizer ({enc.n_vocab} ids)")
    eos = tokenizer_lib.eos_id(enc)
    srcs = sources_lib.expand_sources(cfg.sources)
    bar = tqdm(total=sources_lib.source_bytes(srcs), unit="B", unit_scale=True, unit_divisor=1024, desc="tokenize",
               disable=not cfg.progress or not sys.stderr.isatty(), file=sys.stderr)
    start = time.perf_counter()
    writer = data.TokenWriter(cfg.out)
    try:
        stream = _encoded_pieces(cfg, enc, eos, srcs, bar)
        if cfg.shuffle:
            n_docs = _write_shuffled(stream, writer, cfg.max_tokens, cfg.seed, Path(str(cfg.out) + ".staging"))
        else:
            n_docs = _write_in_order(stream, writer, cfg.max_tokens)
    except BaseException:
        writer.abort()
        bar.close()
        raise
    bar.close()
    if writer.num_tokens == 0:
        writer.abort()
        raise ValueError(f"the corpus is empty: no text in {', '.join(cfg.sources)}")
    meta = {
        "dataset_id": cfg.dataset_id,
        "vocab_size": enc.n_vocab,
        "eos_id": eos,
        "tokenizer": str(cfg.tokenizer),
        "tokenizer_sha256": tokenizer_lib.file_sha256(cfg.tokenizer),
        "kind": "text",
        "num_documents": n_docs,
        "sources": list(cfg.sources),
        "config": cli.to_dict(cfg),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return writer.close(meta)


def main(argv: list[str] | None = None) -> None:
    cfg, meta = cli.run_or_exit(Config, tokenize, argv, prefix="tokenize: error")
    print(f"wrote {cfg.out}: {meta['num_tokens']} tokens, {meta['num_documents']} documents, {meta['seconds']:.1f}s")


if __name__ == "__main__":
    main()
