"""Stage `tokenize_hf`: text sources -> a token file made with a Hugging Face (Llama) checkpoint's tokenizer.

    python -m forgetting.stages.tokenize_hf --sources verilog.jsonl --hf_tokenizer ckpt/Llama-3.2-1B-Instruct \
        --out verilog.bin [--pack true --seq_len 1024]

Every document is written as BOS + text + EOS (`encode_ordinary`: special-token text in the data stays
plain text). Vocabularies above 65536 ids (Llama 3: 128256) give a uint32 file (`"dtype": "uint32"` in
the sidecar), smaller ones uint16. The sidecar's dataset_id is BOS by default, so the train stage's
"token 0 of every sequence is the dataset id" convention puts BOS at the start of every row: the same
token that prompts self-generated replay.

Without `--pack` documents are concatenated and cut into T-token rows by the train stage (every position
counts, as for the paper's data). With `--pack true --seq_len T` whole documents are placed in T-token
rows (next-fit, see `core.data.pack_documents`), right-padded with `<|finetune_right_pad_id|>` (or
`--pad_id`), and the train stage masks the padding out of the loss (`batch["mask"]`).

Conversations (`--chat true`): each JSONL line's `--messages_field` (default "messages", a list of
{"role", "content"}) is rendered with the checkpoint's chat template (`stages.chat_template`; or
`--chat_template FILE_OR_DIR`) and tokenized with special-token text read as special tokens. A document is
BOS (unless the rendering starts with it) + the rendering; no EOS is added (the template's end-of-turn
tokens end it). Beside OUT goes OUT.mask.bin: one uint8 per token, 1 where the token belongs to an assistant
turn (its content and end-of-turn tokens), named in the sidecar as `"loss_mask": "<name>.mask.bin"`, with
`"assistant_tokens"`. `--hf_tokenizer` may also be a tokenizer.json or a llama.cpp `.gguf` file.

One document per row (`--one_per_row true --seq_len T`, text or `--chat`): every document alone in its own
T-token row, right-padded as `--pack` pads (the padding never counts), and documents longer than T dropped
(`"dropped_documents"` in the sidecar): the authors' instruct data layout (their loader pads each
conversation to the sequence length and skips longer ones). With `--chat` the mask file follows the rows
(0 on padding).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from forgetting.core import data
from forgetting.training import cli
from forgetting.corpora import sources as sources_lib

PAD_TOKEN = "<|finetune_right_pad_id|>"


@dataclasses.dataclass(frozen=True)
class Config:
    """Tokenize text sources with a Hugging Face checkpoint's tokenizer (BOS + text + EOS per document)."""

    sources: tuple[str, ...] = ()  # .txt / .jsonl files, directories of them, or hf:NAME[:CONFIG][:SPLIT]
    hf_tokenizer: str = ""  # a HF checkpoint directory (tokenizer.json or tokenizer.model), tokenizer.json or .gguf
    out: str = "data.bin"  # output .bin; the sidecar goes to OUT.json
    dataset_id: int = -1  # written to the sidecar (overwrites token 0 of every row); -1 = the BOS id
    pack: bool = False  # pack whole documents into --seq_len rows with padding (masked out of the loss)
    seq_len: int = 0  # row length for --pack (the train stage's --model.seq_len)
    pad_id: int = -1  # padding id for --pack; -1 = <|finetune_right_pad_id|> of the tokenizer
    max_tokens: int = 0  # stop after about this many tokens (0 = all; with --pack: whole rows, so a little more)
    max_documents: int = 0  # keep at most this many documents (0 = all)
    text_field: str = "text"  # field holding the text in .jsonl / Hugging Face rows
    chat: bool = False  # .jsonl conversations rendered with the chat template; writes OUT.mask.bin
    messages_field: str = "messages"  # --chat: field holding the list of {"role", "content"} messages
    chat_template: str = ""  # --chat: a .jinja file, a directory / tokenizer_config.json or .gguf (default: --hf_tokenizer)
    one_per_row: bool = False  # each document alone in a padded --seq_len row; longer documents are dropped

    def validate(self) -> None:
        if not self.hf_tokenizer:
            raise ValueError("pass --hf_tokenizer DIR (a Hugging Face checkpoint directory, tokenizer.json or .gguf)")
        if self.pack and self.seq_len < 2:
            raise ValueError("--pack true needs --seq_len T (the training sequence length)")
        if self.one_per_row and self.seq_len < 2:
            raise ValueError("--one_per_row true needs --seq_len T (the training sequence length)")
        if self.one_per_row and self.pack:
            raise ValueError("--one_per_row true and --pack true are two row layouts; choose one")
        if self.max_tokens < 0 or self.max_documents < 0:
            raise ValueError("--max_tokens and --max_documents must be >= 0")
        if self.seq_len < 0:
            raise ValueError(f"--seq_len must be >= 0, got {self.seq_len}")
        if self.pad_id < -1 or self.dataset_id < -1:
            raise ValueError(f"--pad_id and --dataset_id must be >= 0 (or -1 = from the tokenizer), got "
                             f"{self.pad_id}, {self.dataset_id}")
        cli.check_output_file("--out", self.out)
        if self.chat and self.pack:
            raise ValueError("--chat true with --pack true is not supported; tokenize conversations unpacked")
        if self.chat and any(not str(src).endswith(".jsonl") for src in self.sources):
            raise ValueError("--chat true reads .jsonl files of conversations only")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model", "tokenizer_config.json")


def tokenizer_sha256(directory: str | Path) -> str:
    """sha256 over the tokenizer files of a HF checkpoint directory (whichever are present)."""
    directory = Path(directory)
    h = hashlib.sha256()
    if directory.is_file():  # a .gguf or tokenizer.json
        with open(directory, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    for name in TOKENIZER_FILES:
        f = directory / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def mask_path(out: str | Path) -> Path:
    """The assistant-mask file beside a token file: data.bin -> data.mask.bin."""
    out = Path(out)
    return out.with_name(out.stem + ".mask.bin")


def _iter_conversations(sources: list[str], field: str):
    for src in sources:
        with open(src, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{src}: invalid JSON at line {line_no}: {e.msg}") from None
                messages = obj.get(field) if isinstance(obj, dict) else None
                if not isinstance(messages, list) or not messages:
                    raise ValueError(f"{src}: line {line_no} has no non-empty list field {field!r}")
                yield src, line_no, messages


def _chat_template_text(cfg: Config) -> str:
    from forgetting.formats import chat_template

    source = Path(cfg.chat_template or cfg.hf_tokenizer)
    if source.suffix == ".jinja":
        return source.read_text(encoding="utf-8")
    return chat_template.load_chat_template(source)


def _pad_id(cfg: Config, tok) -> int:
    if cfg.pad_id >= 0:
        return cfg.pad_id
    pad = tok.token_to_id(PAD_TOKEN)
    if pad is None:
        raise ValueError(f"the tokenizer has no {PAD_TOKEN}; pass --pad_id (an id the text never produces)")
    return int(pad)


def tokenize(cfg: Config) -> dict:
    """Tokenizes `cfg.sources` into `cfg.out`; returns the sidecar dict."""
    cfg.validate()
    directory = Path(cfg.hf_tokenizer)
    tok, vocab, dataset_id = _tokenizer(cfg, directory)
    start = time.perf_counter()
    docs = _Documents(cfg, tok, directory)
    meta: dict = {"dataset_id": dataset_id, "vocab_size": vocab, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
                  "tokenizer": str(directory), "tokenizer_sha256": tokenizer_sha256(directory), "kind": "text",
                  "sources": list(cfg.sources), "config": cli.to_dict(cfg)}
    writer = data.TokenWriter(cfg.out, data.dtype_for_vocab(vocab))
    mask_tmp = Path(str(mask_path(cfg.out)) + ".tmp")
    mask_file = open(mask_tmp, "wb") if cfg.chat else None
    try:
        if cfg.one_per_row:
            n_pad, n_assistant, n_dropped = _write_one_per_row(cfg, tok, docs, writer, mask_file, meta)
        elif cfg.pack:  # streamed: one row at a time
            pad = _pad_id(cfg, tok)
            n_pad, n_assistant, n_dropped = 0, 0, 0
            for row in data.iter_packed_rows(iter(docs), cfg.seq_len, pad):
                writer.write(row)
                n_pad += int(np.sum(row == pad))
            meta.update(pad_id=pad, packed_seq_len=cfg.seq_len)
        else:
            n_pad, n_dropped = 0, 0
            n_assistant = _write_documents(cfg, docs, writer, mask_file)
    except BaseException:
        _discard(writer, mask_file, mask_tmp)
        raise
    _check_written(cfg, writer, mask_file, mask_tmp, meta, n_assistant, n_dropped)
    if cfg.pack or cfg.one_per_row:
        meta["pad_fraction"] = round(n_pad / writer.num_tokens, 4)
    meta.update(num_documents=docs.counts["docs"] - n_dropped, seconds=round(time.perf_counter() - start, 3))
    return writer.close(meta)


def _tokenizer(cfg: Config, directory: Path) -> tuple[Any, int, int]:
    """(the tokenizer, its vocab size, the dataset id of the rows)."""
    from forgetting.formats import hf_checkpoint

    hf_config = {}
    if directory.is_dir() and (directory / "config.json").exists():
        hf_config = json.loads((directory / "config.json").read_text())
    tok = hf_checkpoint.load_tokenizer(directory, hf_config or None)
    vocab = max(tok.n_vocab, int(hf_config.get("vocab_size") or 0))
    dataset_id = tok.bos_id if cfg.dataset_id < 0 else cfg.dataset_id
    if dataset_id >= vocab:
        raise ValueError(f"dataset_id {dataset_id} is not an id of the tokenizer ({vocab} ids)")
    return tok, vocab, dataset_id


class _Documents:
    """The token ids of each document (BOS first; EOS last for text), up to --max_documents / --max_tokens.
    With --chat each document is a conversation, and `masks` gets its assistant mask as it is yielded."""

    def __init__(self, cfg: Config, tok: Any, directory: Path):
        self.cfg, self.tok, self.directory = cfg, tok, directory
        self.srcs = sources_lib.expand_sources(cfg.sources)
        self.counts = {"docs": 0, "tokens": 0}
        self.masks: list[list[int]] = []  # --chat: the mask of the document just yielded

    def _full(self) -> bool:
        cfg, counts = self.cfg, self.counts
        return bool(cfg.max_documents and counts["docs"] >= cfg.max_documents
                    or cfg.max_tokens and counts["tokens"] >= cfg.max_tokens)

    def _count(self, ids: list[int]) -> list[int]:
        self.counts["docs"] += 1
        self.counts["tokens"] += len(ids)
        return ids

    def __iter__(self) -> Iterator[list[int]]:
        if self.cfg.chat:
            yield from self._conversations()
            return
        tok = self.tok
        for text in sources_lib.iter_documents(self.srcs, self.cfg.text_field):
            if self._full():
                return
            yield self._count([tok.bos_id, *tok.encode(text), tok.eos_id])

    def _conversations(self) -> Iterator[list[int]]:
        from forgetting.formats import chat_template

        cfg, tok = self.cfg, self.tok
        template = _chat_template_text(cfg)
        special = chat_template.special_tokens_of(Path(cfg.chat_template) if cfg.chat_template and not
                                                  cfg.chat_template.endswith(".jinja") else self.directory)
        for src, line_no, messages in _iter_conversations(self.srcs, cfg.messages_field):
            if self._full():
                return
            try:
                ids, mask = chat_template.tokenize_conversation(tok, template, messages, special)
            except chat_template.ChatTemplateError as err:
                raise ValueError(f"{src}: line {line_no}: {err}") from None
            if not ids or ids[0] != tok.bos_id:
                ids, mask = [tok.bos_id, *ids], [0, *mask]
            self.masks.append(mask)
            yield self._count(ids)


def _write_one_per_row(cfg: Config, tok: Any, docs: _Documents, writer: Any, mask_file: Any,
                       meta: dict) -> tuple[int, int, int]:
    """--one_per_row: each document padded to one row (a longer one is skipped, as the authors');
    returns (padding tokens, assistant tokens, documents dropped)."""
    pad = _pad_id(cfg, tok)
    n_pad = n_assistant = n_dropped = 0
    for ids in docs:
        mask_of_doc = docs.masks.pop() if mask_file is not None else None
        if len(ids) > cfg.seq_len:  # the authors skip what does not fit one row
            n_dropped += 1
            continue
        if pad in ids:
            raise ValueError(f"a document contains the padding id {pad}; choose a --pad_id the text cannot "
                             "produce")
        row = np.full(cfg.seq_len, pad, np.int64)
        row[:len(ids)] = ids
        writer.write(row)
        n_pad += cfg.seq_len - len(ids)
        if mask_file is not None:
            mask = np.zeros(cfg.seq_len, np.uint8)
            mask[:len(ids)] = mask_of_doc
            mask_file.write(mask.tobytes())
            n_assistant += int(mask.sum())
    meta.update(pad_id=pad, packed_seq_len=cfg.seq_len, dropped_documents=n_dropped)
    return n_pad, n_assistant, n_dropped


def _write_documents(cfg: Config, docs: _Documents, writer: Any, mask_file: Any) -> int:
    """Documents back to back (cut at --max_tokens); returns the assistant tokens (--chat)."""
    n_assistant = 0
    for ids in docs:
        room = cfg.max_tokens - writer.num_tokens if cfg.max_tokens else len(ids)
        writer.write(np.asarray(ids[:room], np.int64))
        if mask_file is not None:
            mask = np.asarray(docs.masks.pop()[:room], np.uint8)
            mask_file.write(mask.tobytes())
            n_assistant += int(mask.sum())
    return n_assistant


def _discard(writer: Any, mask_file: Any, mask_tmp: Path) -> None:
    writer.abort()
    if mask_file is not None:
        mask_file.close()
        mask_tmp.unlink(missing_ok=True)


def _check_written(cfg: Config, writer: Any, mask_file: Any, mask_tmp: Path, meta: dict, n_assistant: int,
                   n_dropped: int) -> None:
    """Refuses an empty output (nothing fit, no assistant turn, no text); moves the mask file into place."""
    if cfg.one_per_row and writer.num_tokens == 0 and n_dropped:
        _discard(writer, mask_file, mask_tmp)
        raise ValueError(f"all {n_dropped} documents are longer than --seq_len {cfg.seq_len}: nothing to write")
    if mask_file is not None:
        mask_file.close()
        if n_assistant == 0:
            mask_tmp.unlink(missing_ok=True)
            writer.abort()
            raise ValueError("--chat true: no assistant turn in the conversations (nothing would count in the loss)")
        os.replace(mask_tmp, mask_path(cfg.out))
        meta.update(kind="chat", loss_mask=mask_path(cfg.out).name, assistant_tokens=n_assistant)
    if writer.num_tokens == 0:
        writer.abort()
        raise ValueError(f"the corpus is empty: no text in {', '.join(cfg.sources)}")


run = tokenize


def main(argv: list[str] | None = None) -> dict:
    cfg, meta = cli.run_or_exit(Config, tokenize, argv, prefix="tokenize_hf: error")
    print(f"wrote {cfg.out}: {meta['num_tokens']} tokens ({meta['dtype']}), {meta['num_documents']} documents, "
          f"{meta['seconds']:.1f}s")
    return meta


if __name__ == "__main__":
    main()
