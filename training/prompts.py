"""Prompts given as text, for self-generated replay (`--reg.prompt_text`) and the sample stage
(`--prompt_text`): token ids from the model's own tokenizer, spread over rows.

    tok = find_tokenizer(loaded, explicit="", data_paths=(...), flag="--reg.prompt_tokenizer")
    ids = encode_prompts(texts, tok, start_id=loaded.lineage_ids[-1], seq_len=T, vocab_size=V,
                         chat=False, flag="--reg.prompt_text")
    prompt_bp, lengths_b = spread(ids, rows)   # row i gets prompt i % len(ids), padded to the longest

The tokenizer: `explicit` when given (a .tiktoken file of the tokenizer stage, a Hugging Face checkpoint
directory, a tokenizer.json or a .gguf), checked against the run's tokenizer sha256 where the run records
one; else the checkpoint's own (a GGUF file, a HF directory, or the HF directory or GGUF a run was
finetuned from, following `loaded_from`); else, for runs of the paper model, the .tiktoken file named by
the sidecar of the data (the new data's, then the run's own), whose sha256 the sidecar records.

A text's ids: special-token text reads as the special id (`<|im_start|>` is one token: a prompt is a
control input, not data), and nothing is added for Hugging Face and GGUF tokenizers: the text is the
prompt (write `<|begin_of_text|>` or `<|endoftext|>` into it for a BOS). For the paper model's .tiktoken
tokenizers the run's dataset id is put first: every training row begins with it and it has no text form.
With `chat`, the text is first rendered as one user turn followed by the generation prompt (the assistant
header) by the checkpoint's chat template, special tokens included (a template that wants a BOS writes it).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PromptTokenizer:
    """A tokenizer reduced to what prompts need."""

    source: Path  # the .tiktoken file, HF directory, tokenizer.json or .gguf it was read from
    encode: Callable[[str], list[int]]  # special-token text read as special ids
    decode: Callable[[Sequence[int]], str]
    eos_ids: tuple[int, ...]
    paper: bool  # a .tiktoken tokenizer of the tokenizer stage (rows begin with the dataset id)


def _tiktoken(path: Path) -> PromptTokenizer:
    from forgetting.stages import tokenizer as tokenizer_stage

    enc = tokenizer_stage.load(path)
    return PromptTokenizer(path, lambda text: list(enc.encode(text, allowed_special="all")),
                           lambda ids: enc.decode([int(i) for i in ids]), (int(tokenizer_stage.eos_id(enc)),), True)


def _hf(path: Path) -> PromptTokenizer:
    from forgetting.formats import hf_tokenizer

    config = path / "config.json"
    tok = hf_tokenizer.load_tokenizer(path, json.loads(config.read_text()) if config.exists() else None)
    return PromptTokenizer(path, lambda text: tok.encode(text, allow_special=True), tok.decode,
                           tuple(tok.eos_ids or (tok.eos_id,)), False)


def load_tokenizer(path: str | Path) -> PromptTokenizer:
    """A .tiktoken file (with its .json) of the tokenizer stage, else a HF directory, tokenizer.json or .gguf."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    if path.is_file() and path.suffix not in (".gguf", ".json"):
        return _tiktoken(path)
    return _hf(path)


def _sha256(path: Path) -> str:
    from forgetting.stages import tokenize_hf
    from forgetting.stages import tokenizer as tokenizer_stage

    # The hashes the tokenize stages record: a file's bytes, a HF directory's tokenizer files.
    return tokenize_hf.tokenizer_sha256(path) if path.is_dir() else tokenizer_stage.file_sha256(path)


def _checkpoint_source(load_path: Path) -> Path | None:
    """The GGUF or HF directory a checkpoint is, or was finetuned from (through `loaded_from`)."""
    from forgetting.stages import evaluate_benchmarks

    try:
        return evaluate_benchmarks.find_tokenizer_source(load_path)
    except FileNotFoundError:
        return None


def _sidecar_tokenizer(data_path: str, sha256: str | None) -> Path | None:
    """The .tiktoken file a token file's sidecar names, when it is here and is the one it names."""
    from forgetting.core import data as data_lib

    sidecar = data_lib.sidecar_path(data_path)
    if not data_path or not sidecar.exists():
        return None
    meta = json.loads(sidecar.read_text())
    name, want = meta.get("tokenizer"), meta.get("tokenizer_sha256") or sha256
    if not name or not Path(name).is_file() or Path(name).suffix in (".gguf", ".json"):
        return None
    return Path(name) if want is None or _sha256(Path(name)) == want else None


def find_tokenizer(load_path: str | Path, *, explicit: str = "", data_paths: Sequence[str] = (),
                   tokenizer_sha256: str | None = None, flag: str) -> PromptTokenizer:
    """The tokenizer of a loaded checkpoint for prompt text (module doc); `flag` names the flag that
    passes one explicitly, for the errors."""
    if explicit:
        tok = load_tokenizer(explicit)
        if tokenizer_sha256 and _sha256(tok.source) != tokenizer_sha256:
            raise ValueError(f"{flag} {explicit} is not the tokenizer {load_path} was trained with (sha256 "
                             f"{tokenizer_sha256[:12]}…): pass the tokenizer its data was made with")
        return tok
    source = _checkpoint_source(Path(load_path))
    if source is not None:
        return load_tokenizer(source)
    for data_path in data_paths:
        found = _sidecar_tokenizer(data_path, tokenizer_sha256)
        if found is not None:
            return _tiktoken(found)
    raise FileNotFoundError(f"no tokenizer found for {load_path} (not a GGUF or Hugging Face checkpoint, and no data "
                            f"sidecar names a .tiktoken file that is here): pass {flag} TOKENIZER")


def chat_renderer(source: Path) -> Callable[[str], str]:
    """text -> the checkpoint's chat template rendered for one user turn with the generation prompt."""
    from forgetting.formats import chat_template as ct

    template, special = ct.load_chat_template(source), ct.special_tokens_of(source)
    return lambda text: ct.render(template, [{"role": "user", "content": text}], add_generation_prompt=True,
                                  special_tokens=special)


def encode_prompts(texts: Sequence[str], tok: PromptTokenizer, *, start_id: int, seq_len: int, vocab_size: int,
                   chat: bool, flag: str, chat_flag: str) -> list[list[int]]:
    """The token ids of each prompt text (module doc); refuses what cannot prompt a `seq_len` row."""
    if chat and tok.paper:
        raise ValueError(f"{chat_flag} true needs a chat template, and {tok.source} is a .tiktoken tokenizer "
                         "without one: drop it")
    render = chat_renderer(tok.source) if chat else None
    out = []
    for i, text in enumerate(texts):
        if not text:
            raise ValueError(f"{flag} entry {i} is an empty string: give each prompt some text")
        if "\\n" in text and "\n" not in text:
            print(f"warning: {flag} entry {i} holds a backslash and 'n', not a newline (in bash write $'...\\n...' "
                  "for a newline)", file=sys.stderr)
        ids = tok.encode(render(text) if render else text)
        if not ids:
            raise ValueError(f"{flag} entry {i} ({text!r}) tokenizes to no tokens with {tok.source}: give text "
                             "the tokenizer keeps")
        ids = [start_id, *ids] if tok.paper else ids
        if len(ids) >= seq_len:
            raise ValueError(f"{flag} entry {i} is {len(ids)} tokens, but rows are {seq_len} tokens long and need at "
                             "least one sampled position: shorten it")
        outside = sorted({t for t in ids if not 0 <= t < vocab_size})
        if outside:
            raise ValueError(f"{flag} entry {i} has ids {outside} outside the model's vocab [0, {vocab_size}): "
                             f"{tok.source} is not this model's tokenizer")
        out.append([int(t) for t in ids])
    return out


def spread(prompts: Sequence[Sequence[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [rows, P] prompts padded with 0 to the longest, int32 [rows] lengths): row i gets prompt i %
    len(prompts), as `--reg.prompt_ids` spreads single ids (equal shares when rows is a multiple)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("spread needs at least one prompt, each of at least one token")
    width = max(len(p) for p in prompts)
    table = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        table[i, :len(p)] = p
    which = np.arange(rows) % len(prompts)
    return table[which], np.asarray([len(p) for p in prompts], np.int32)[which]


def replay_prompts(reg: Any, loaded: Any, data_path: str, seq_len: int, vocab_size: int
                   ) -> tuple[list[list[int]], dict]:
    """The train stage's `--reg.prompt_text` as token-id prompts, and what config.json records of them."""
    tok = find_tokenizer(loaded.path, explicit=reg.prompt_tokenizer, data_paths=(data_path, loaded.data_path),
                         tokenizer_sha256=loaded.tokenizer_sha256, flag="--reg.prompt_tokenizer")
    ids = encode_prompts(reg.prompt_text, tok, start_id=loaded.lineage_ids[-1], seq_len=seq_len,
                         vocab_size=vocab_size, chat=reg.prompt_chat, flag="--reg.prompt_text",
                         chat_flag="--reg.prompt_chat")
    return ids, {"replay_prompt_ids": ids, "replay_prompt_tokenizer": str(tok.source)}
