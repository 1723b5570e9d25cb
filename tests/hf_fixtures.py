"""Test fixtures in the Hugging Face layouts (not library code): tokenizer.json pieces built from a list of
byte-level BPE tokens in rank order."""
from __future__ import annotations

from typing import Sequence


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by HF byte-level BPE vocabularies (GPT-2's definition:
    printable Latin-1 bytes map to themselves, the rest to 256, 257, ... in byte order)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def bpe_merges(tokens: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """The merge list of byte-level BPE tokens in rank order (256 single bytes first): each later token is
    the pair that rank-ordered BPE, with only the earlier tokens, reduces its bytes to."""
    rank = {t: i for i, t in enumerate(tokens)}
    merges = []
    for r, token in enumerate(tokens):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(rank.get(parts[i] + parts[i + 1], 1 << 30), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= r:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {r}) is not one merge of earlier tokens")
        merges.append((parts[0], parts[1]))
    return merges


# The tiny random HF-layout Llama checkpoint the tests share (tests/standin_checkpoint.py).
from standin_checkpoint import (  # noqa: E402,F401
    tiny_config, tiny_tokenizer_tokens, write_tiny_hf_checkpoint)


# A Llama-3-Instruct-shaped template: BOS, a system turn always present, header tokens, <|eot_id|> ends a turn.
LLAMA3_TEMPLATE = """{{ bos_token }}<|start_header_id|>system<|end_header_id|>

You are helpful.<|eot_id|>
{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>

{{ m['content'] | trim }}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def add_chat_tokenizer(directory, vocab_size: int, n_special: int = 16, template: str = LLAMA3_TEMPLATE) -> None:
    """Makes a `write_tiny_hf_checkpoint` directory chat-capable: a tokenizer.json (the same BPE ranks as its
    tokenizer.model, plus Llama 3's special tokens) and `template` as tokenizer_config.json's chat template."""
    import json
    from pathlib import Path

    from forgetting.formats.hf_tokenizer import LLAMA3_PATTERN, llama3_special_tokens

    directory = Path(directory)
    n_ranks = vocab_size - n_special
    tokens = tiny_tokenizer_tokens(n_ranks)
    byte_map = bytes_to_unicode()
    vocab = {"".join(byte_map[b] for b in t): i for i, t in enumerate(tokens)}
    merges = [["".join(byte_map[b] for b in a), "".join(byte_map[b] for b in b_)] for a, b_ in bpe_merges(tokens)]
    added = [{"id": n_ranks + i, "content": name, "special": True, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False} for i, name in enumerate(llama3_special_tokens(n_special))]
    (directory / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {**vocab, **{a["content"]: a["id"] for a in added}}, "merges": merges,
                  "byte_fallback": False},
        "added_tokens": added,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(chat_template=template, eos_token="<|eot_id|>")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
