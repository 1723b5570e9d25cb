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


# The tiny random HF-layout Llama checkpoint (the instruct mini's stand-in, which the tests share).
from forgetting.experiments.standin_checkpoint import (  # noqa: E402,F401
    tiny_config, tiny_tokenizer_tokens, write_tiny_hf_checkpoint)
