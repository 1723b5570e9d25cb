"""Tokenizers of Hugging Face checkpoints: `tokenizer.json` through Hugging Face's `tokenizers` library.

    tok = load_tokenizer("ckpt/SmolLM2-135M-Instruct")          # tokenizer.json (+ tokenizer_config.json)
    tok = load_tokenizer("ckpt/Llama-3.2-1B/original")          # tiktoken-format tokenizer.model
    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")     # tokenizer in GGUF metadata (gguf extra)
    ids = tok.encode("text")                      # special-token text stays plain text (data)
    ids = tok.encode(rendered_chat, allow_special=True)   # <|im_start|> etc. become their ids (templates)

`tokenizer.json` is read by `tokenizers` itself, so whatever the library reads works as it does there:
byte-level BPE with missing single-byte tokens, added and special tokens, Unigram, WordPiece, normalizers.
Padding and truncation stored in the file are switched off (they would pad every document to a fixed
length). The tiktoken-format `tokenizer.model` of Llama 3 stays on tiktoken (it is tiktoken's own format).

Every tokenizer here has: `encode`, `decode`, `token_to_id`, `n_vocab`, `bos_id`, `eos_id`, `eos_ids` (all
ids that end a turn or document), `special_tokens` (name -> id).
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import tiktoken

from forgetting.formats import gguf_file

# Llama 3's pre-tokenizer (Meta's tokenizer.py and the Split regex of its tokenizer.json).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS_TOKEN, EOS_TOKEN, EOT_TOKEN = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def llama3_special_tokens(n_special: int = 256) -> list[str]:
    """Llama 3.1/3.2's special tokens in id order (placed right after the BPE ranks)."""
    named = [BOS_TOKEN, EOS_TOKEN, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", EOT_TOKEN, "<|python_tag|>"]
    if n_special < 2:
        raise ValueError("a Llama 3 tokenizer needs at least BOS and EOS special tokens")
    named = named[:n_special]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_special - len(named))]


@dataclasses.dataclass
class TiktokenTokenizer:
    """A Llama-3 tiktoken-format tokenizer.model (tiktoken's own format, not a conversion)."""

    encoding: tiktoken.Encoding
    bos_id: int
    eos_id: int
    eos_ids: tuple[int, ...] = ()

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t: self.encoding.encode_single_token(t) for t in self.encoding.special_tokens_set}

    def token_to_id(self, token: str) -> int | None:
        try:
            return int(self.encoding.encode_single_token(token))
        except KeyError:
            return None

    def encode(self, text: str, *, bos: bool = False, allow_special: bool = False) -> list[int]:
        ids = self.encoding.encode(text, allowed_special="all") if allow_special else self.encoding.encode_ordinary(text)
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


@dataclasses.dataclass
class HFTokenizer:
    """A `tokenizers.Tokenizer` (from tokenizer.json or GGUF metadata) plus the ids that matter here.

    `encode` adds no special tokens of the post-processor (no [CLS]/[SEP], no automatic BOS) and, unless
    `allow_special`, reads special-token text as plain text (a second tokenizer without the special added
    tokens does that)."""

    tokenizer: Any  # tokenizers.Tokenizer
    ordinary: Any  # the same without its special added tokens
    bos_id: int
    eos_id: int
    eos_ids: tuple[int, ...] = ()

    @property
    def n_vocab(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: int(i) for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str, *, bos: bool = False, allow_special: bool = False) -> list[int]:
        tok = self.tokenizer if allow_special else self.ordinary
        ids = tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


Tokenizer = HFTokenizer | TiktokenTokenizer


def _import_tokenizers() -> Any:
    try:
        import tokenizers  # (the optional `hf` extra)
    except ImportError:
        raise ImportError("reading tokenizer.json needs Hugging Face's tokenizers: pip install 'forgetting[hf]'") from None
    return tokenizers


def tokenizers_from_json(spec: dict) -> tuple[Any, Any]:
    """(full, ordinary) `tokenizers.Tokenizer`s of a tokenizer.json dict, padding and truncation off; the
    ordinary one lacks the special added tokens, so their text is tokenized as plain text."""
    tokenizers = _import_tokenizers()
    spec = dict(spec, padding=None, truncation=None)
    try:
        full = tokenizers.Tokenizer.from_str(json.dumps(spec))
        plain = dict(spec, added_tokens=[t for t in spec.get("added_tokens", []) if not t.get("special")])
        ordinary = tokenizers.Tokenizer.from_str(json.dumps(plain))
    except Exception as err:  # noqa: BLE001 - the library's own message says what it could not read
        raise ValueError(f"tokenizers cannot read this tokenizer.json: {err}") from None
    return full, ordinary


def _token_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.get("content")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parses a tiktoken-format file (base64 token, space, rank per line) without tiktoken's path cache."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}: line {line_no} is not 'base64 rank' (a SentencePiece .model? "
                                 "use the checkpoint's tokenizer.json instead)")
            try:
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}: malformed tiktoken line {line_no}") from None
    return ranks


def write_tiktoken_ranks(path: str | Path, tokens: Sequence[bytes]) -> None:
    Path(path).write_text("".join(base64.b64encode(t).decode("ascii") + f" {rank}\n" for rank, t in enumerate(tokens)))


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.readline()
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\s*", head) is not None


def _encoding_from_tiktoken_model(path: Path, tok_config: dict, vocab_size: int | None) -> tiktoken.Encoding:
    ranks = read_tiktoken_ranks(path)
    n = len(ranks)
    decoder = tok_config.get("added_tokens_decoder") or {}
    if decoder:
        special = {_token_content(v): int(k) for k, v in decoder.items()}
    else:
        n_special = (vocab_size - n) if vocab_size and vocab_size > n else 256
        special = {name: n + i for i, name in enumerate(llama3_special_tokens(n_special))}
    return tiktoken.Encoding(name=path.parent.name or "llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special)


def resolve_bos_eos(token_to_id: Any, tok_config: dict, hf_config: dict, where: str) -> tuple[int, list[int]]:
    """(BOS id, EOS ids): names from tokenizer_config.json, then config.json's ids, then common names
    (Llama 3's, <|endoftext|>, BERT's [CLS]/[SEP])."""
    def resolve(name_keys: tuple[str, ...], id_key: str, fallbacks: tuple[str, ...]) -> list[int]:
        ids: list[int] = []
        for key in name_keys:
            name = _token_content(tok_config.get(key))
            i = token_to_id(name) if name else None
            if i is not None and i not in ids:
                ids.append(int(i))
        cfg_ids = hf_config.get(id_key)
        for i in cfg_ids if isinstance(cfg_ids, list) else [cfg_ids]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
        for name in fallbacks if not ids else ():
            i = token_to_id(name)
            if i is not None:
                ids.append(int(i))
                break
        if not ids:
            raise ValueError(f"cannot determine the {id_key.split('_')[0].upper()} token of the tokenizer in "
                             f"{where}: set {name_keys[0]} in tokenizer_config.json or {id_key} in config.json")
        return ids

    bos = resolve(("bos_token", "cls_token"), "bos_token_id", (BOS_TOKEN, "<|endoftext|>", "<s>", "[CLS]"))
    eos = resolve(("eos_token", "sep_token"), "eos_token_id", (EOS_TOKEN, "<|endoftext|>", "</s>", "[SEP]"))
    return bos[0], eos


def load_tokenizer(path: str | Path, hf_config: dict | None = None) -> Tokenizer:
    """The tokenizer of a HF checkpoint directory (`tokenizer.json`, else a tiktoken-format
    `tokenizer.model` or `original/tokenizer.model`), a tokenizer.json file, or a `.gguf` file."""
    path = Path(path)
    if path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    if path.is_file() and path.suffix == ".json":
        directory, json_file = path.parent, path
    else:
        directory, json_file = path, path / "tokenizer.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer not found: {path} is not a checkpoint directory, tokenizer.json or .gguf")
    hf_config = hf_config if hf_config is not None else _read_json(directory / "config.json")
    tok_config = _read_json(directory / "tokenizer_config.json")
    if json_file.exists():
        full, ordinary = tokenizers_from_json(json.loads(json_file.read_text(encoding="utf-8")))
        bos, eos = resolve_bos_eos(full.token_to_id, tok_config, hf_config, str(directory))
        return HFTokenizer(full, ordinary, bos_id=bos, eos_id=eos[0], eos_ids=tuple(eos))
    for candidate in (directory / "tokenizer.model", directory / "original" / "tokenizer.model"):
        if candidate.exists() and _is_tiktoken_file(candidate):
            enc = _encoding_from_tiktoken_model(candidate, tok_config, hf_config.get("vocab_size"))
            special = {t: enc.encode_single_token(t) for t in enc.special_tokens_set}
            bos, eos = resolve_bos_eos(special.get, tok_config, hf_config, str(directory))
            return TiktokenTokenizer(enc, bos_id=bos, eos_id=eos[0], eos_ids=tuple(eos))
    raise FileNotFoundError(f"no tokenizer.json or tiktoken-format tokenizer.model in {directory}")


# --- the tokenizer in GGUF metadata: byte-level BPE ("gpt2" tokenizer model) from tokens, merges and token
# types, with the pre-tokenizer named by `tokenizer.ggml.pre`, built as a tokenizer.json and read by `tokenizers`.
# Control tokens become special added tokens, user-defined ones plain added tokens. ---
# tokenizer.ggml.pre -> the tokenizer.json pre_tokenizer of the family (regexes from the families' own files).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS: dict[str, tuple[dict, bool]] = {  # pre -> (pre_tokenizer, ignore_merges)
    "default": (_byte_level(True), False),
    "gpt-2": (_byte_level(True), False),
    "smollm": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      _byte_level(True)]}, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [_split(LLAMA3_PATTERN), _byte_level(False)]},
                  True),
    "llama3": ({"type": "Sequence", "pretokenizers": [_split(LLAMA3_PATTERN), _byte_level(False)]},
               True),
    "qwen2": ({"type": "Sequence", "pretokenizers": [_split(_QWEN2_REGEX), _byte_level(False)]}, False),
}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4


def tokenizer_json_from_gguf(g: gguf_file.GGUFFile) -> dict:
    """A tokenizer.json dict equivalent to the GGUF's tokenizer metadata (byte-level BPE only)."""
    model = g.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{g.path}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{g.path}: tokenizer.ggml.pre {pre!r} is not supported "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    tokens = list(g.require("tokenizer.ggml.tokens"))
    types = list(g.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [m.split(" ") for m in g.require("tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{g.path}: a tokenizer.ggml.merges entry is not two space-separated tokens")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == _TOKEN_TYPE_CONTROL}
             for i, t in enumerate(tokens) if types[i] in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


def tokenizer_from_gguf(g: gguf_file.GGUFFile) -> HFTokenizer:
    full, ordinary = tokenizers_from_json(tokenizer_json_from_gguf(g))
    bos, eos = g.get("tokenizer.ggml.bos_token_id"), g.get("tokenizer.ggml.eos_token_id")
    if bos is None or eos is None:
        raise ValueError(f"{g.path}: GGUF metadata lacks tokenizer.ggml.bos_token_id or eos_token_id")
    eos_ids = [int(eos)]
    eot = g.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    return HFTokenizer(full, ordinary, bos_id=int(bos), eos_id=int(eos), eos_ids=tuple(eos_ids))


def load_gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer in a GGUF file's metadata (see the module doc)."""
    return tokenizer_from_gguf(gguf_file.open_gguf(path))
