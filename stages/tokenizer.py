"""Stage `tokenizer`: train a byte-level BPE and write it as a tiktoken file.

    python -m forgetting.stages.tokenizer --sources A.txt B.txt --vocab_size 4096 --n_reserved 10 --out tok.tiktoken

Id layout (n_vocab == vocab_size): ranks 0..255 are the single bytes (in byte order), then the learned
merges in the order they were learned, then `n_reserved` tokens `<|reserved_i|>`, then `<|endoftext|>`
as the last id (vocab_size - 1). Text is split by a regex pre-tokenizer (GPT-4's by default) and merges
never cross pre-token boundaries. Training is deterministic: the most frequent pair wins, ties go to the
smallest (left id, right id). Encoding always goes through tiktoken (`load(path)`).

Writes `out` (tiktoken's format: base64 token, space, rank per line) and `out.json` (pattern, special
tokens, training statistics).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import heapq
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import regex
import tiktoken
from tqdm import tqdm

from forgetting.training import cli

from forgetting.corpora import sources as sources_lib

EOS_TOKEN = "<|endoftext|>"
PATTERNS = {
    # GPT-2's pre-tokenizer.
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # GPT-4's (cl100k) pre-tokenizer: numbers in groups of up to 3 digits, case-insensitive contractions.
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}
_COUNT_CHUNK_CHARS = 1 << 20  # text handed to a counting worker at a time


@dataclasses.dataclass(frozen=True)
class Config:
    """Train a byte-level BPE tokenizer (tiktoken format) on text sources."""

    sources: tuple[str, ...] = ()  # .txt / .jsonl files, directories of them, or hf:NAME[:CONFIG][:SPLIT]
    vocab_size: int = 4096  # total ids: 256 bytes + merges + n_reserved + 1 EOS
    n_reserved: int = 10  # reserved special tokens <|reserved_i|> placed before the EOS
    out: str = "tok.tiktoken"  # output path; the metadata goes to OUT.json
    pattern: str = "cl100k"  # pre-tokenizer: 'cl100k', 'gpt2', or a raw regex
    max_chars: int = 0  # train on at most this many characters of text (0 = all)
    text_field: str = "text"  # field holding the text in .jsonl / Hugging Face rows
    workers: int = 0  # processes counting pre-tokens (0 = number of CPU cores)
    progress: bool = True  # show progress bars on stderr

    def validate(self) -> None:
        if self.vocab_size - self.n_reserved - 1 < 256:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no room for 256 bytes + {self.n_reserved} reserved + EOS")
        if self.vocab_size > 65536:
            raise ValueError("vocab_size must be <= 65536 so token ids fit uint16 .bin files")
        if self.n_reserved < 0:
            raise ValueError("n_reserved must be >= 0")
        if self.max_chars < 0 or self.workers < 0:
            raise ValueError(f"--max_chars and --workers must be >= 0, got {self.max_chars}, {self.workers}")
        cli.check_output_file("--out", self.out)


def resolve_pattern(pattern: str) -> str:
    return PATTERNS.get(pattern, pattern)


def special_token_names(n_reserved: int) -> list[str]:
    return [f"<|reserved_{i}|>" for i in range(n_reserved)] + [EOS_TOKEN]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _count_chunk(args: tuple[list[str], str]) -> Counter:
    texts, pat = args
    compiled = regex.compile(pat)
    counts: Counter = Counter()
    for text in texts:  # pieces are counted separately: no pre-token spans two documents
        counts.update(compiled.findall(text))
    return counts


def _text_chunks(pieces: Iterable[sources_lib.Piece], max_chars: int, bar: tqdm, seen: dict) -> Iterator[list[str]]:
    """Groups pieces into ~1M-character chunks (pre-token counting never crosses a piece)."""
    buf: list[str] = []
    size = total = 0
    for piece in pieces:
        text = piece.text
        if max_chars and total + len(text) > max_chars:
            text = text[: max_chars - total]
        buf.append(text)
        size += len(text)
        total += len(text)
        seen["chars"] = total
        seen["pieces"] = seen.get("pieces", 0) + 1
        bar.update(len(text))
        if size >= _COUNT_CHUNK_CHARS:
            yield buf
            buf, size = [], 0
        if max_chars and total >= max_chars:
            break
    if buf:
        yield buf


def count_words(cfg: Config) -> tuple[Counter, dict]:
    """Pre-token frequencies over the sources (in parallel over text chunks)."""
    pat = resolve_pattern(cfg.pattern)
    srcs = sources_lib.expand_sources(cfg.sources)
    bar = tqdm(total=sources_lib.source_bytes(srcs), unit="char", unit_scale=True, desc="count pre-tokens",
               disable=not cfg.progress or not sys.stderr.isatty(), file=sys.stderr)
    seen: dict = {"chars": 0, "pieces": 0}
    chunks = ((c, pat) for c in _text_chunks(sources_lib.iter_pieces(srcs, cfg.text_field), cfg.max_chars, bar, seen))
    counts: Counter = Counter()
    workers = cfg.workers or os.cpu_count() or 1
    if workers > 1:
        # fork is fastest, but forking a process in which JAX's threads already run can deadlock.
        method = "spawn" if "jax" in sys.modules else "fork"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            for c in pool.imap(_count_chunk, chunks, chunksize=1):
                counts.update(c)
    else:
        for c in map(_count_chunk, chunks):
            counts.update(c)
    bar.close()
    if not counts:
        raise ValueError(f"the training corpus is empty (sources: {', '.join(cfg.sources)})")
    return counts, {"chars": seen["chars"], "pieces": seen["pieces"], "unique_pretokens": len(counts), "pretokens": sum(counts.values())}


def _apply_merge(words: list[list[int]], freqs: list[int], where: dict, pair_count: dict, pair: tuple[int, int],
                 new_id: int) -> set[tuple[int, int]]:
    """Rewrites the words holding `pair` with `new_id` in its place, updating the pair counts and the inverted
    index; returns the pairs whose counts grew (to re-queue)."""
    a, b = pair
    touched: set[tuple[int, int]] = set()
    for wi in where.pop(pair):
        w = words[wi]
        f = freqs[wi]
        out: list[int] = []
        i, n = 0, len(w)
        while i < n:
            if i + 1 < n and w[i] == a and w[i + 1] == b:
                out.append(new_id)
                i += 2
            else:
                out.append(w[i])
                i += 1
        if len(out) == n:  # stale index entry: this word no longer holds the pair
            continue
        for p in zip(w, w[1:]):
            pair_count[p] -= f
        for p in zip(out, out[1:]):
            pair_count[p] += f
            where[p].add(wi)
            touched.add(p)
        words[wi] = out
    return touched


def learn_merges(word_counts: dict[bytes, int], n_merges: int, progress: bool = False) -> list[bytes]:
    """Byte-pair merges, most frequent first; returns the new tokens' bytes in rank order.

    Words are counted once; each merge only revisits the words containing the merged pair (an inverted
    index), and a lazy max-heap keyed by (-count, left id, right id) finds the next pair, which makes
    the result deterministic and ties broken by the smallest ids.
    """
    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    id_of: dict[bytes, int] = {b: i for i, b in enumerate(vocab)}
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    pair_count: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        f = freqs[wi]
        for pair in zip(w, w[1:]):
            pair_count[pair] += f
            where[pair].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    new_tokens: list[bytes] = []
    bar = tqdm(total=n_merges, desc="merges", disable=not progress or not sys.stderr.isatty(), file=sys.stderr)
    while len(new_tokens) < n_merges:
        if not heap:
            raise ValueError(
                f"the corpus is too small to learn {n_merges} merges (learned {len(new_tokens)}); "
                "use more text or a smaller vocab_size"
            )
        neg, a, b = heapq.heappop(heap)
        current = pair_count.get((a, b), 0)
        if current != -neg:  # stale heap entry: re-queue with the true count
            if current > 0:
                heapq.heappush(heap, (-current, a, b))
            continue
        merged = vocab[a] + vocab[b]
        new_id = id_of.get(merged)
        if new_id is None:  # the same bytes can arise from two different splits; keep one id
            new_id = len(vocab)
            vocab.append(merged)
            id_of[merged] = new_id
            new_tokens.append(merged)
            bar.update(1)
        touched = _apply_merge(words, freqs, where, pair_count, (a, b), new_id)
        pair_count.pop((a, b), None)
        for pair in touched:
            c = pair_count[pair]
            if c > 0:
                heapq.heappush(heap, (-c, pair[0], pair[1]))
    bar.close()
    return new_tokens


def write_tiktoken(path: str | Path, tokens: list[bytes]) -> None:
    lines = [base64.b64encode(t).decode("ascii") + f" {rank}\n" for rank, t in enumerate(tokens)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)


def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    """Parses a .tiktoken file (no caching by path, unlike tiktoken.load.load_tiktoken_bpe)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}: malformed tiktoken line {line_no}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not dense 0..{len(ranks) - 1}")
    return ranks


def load(path: str | Path) -> tiktoken.Encoding:
    """The tokenizer at `path` (+ `path.json`) as a tiktoken Encoding."""
    path = Path(path)
    meta_path = Path(str(path) + ".json")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if not meta_path.exists():
        raise FileNotFoundError(f"tokenizer metadata not found: {meta_path} (written next to the .tiktoken by the tokenizer stage)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"tokenizer metadata {meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"tokenizer metadata {meta_path} must be a JSON object, got {type(meta).__name__}")
    for name, kind in (("pattern", str), ("special_tokens", dict)):
        if not isinstance(meta.get(name), kind):
            raise ValueError(f"tokenizer metadata {meta_path}: field {name!r} is missing or not a {kind.__name__}; "
                             "rewrite it with the tokenizer stage")
    try:
        special = {str(k): int(v) for k, v in meta["special_tokens"].items()}
    except (TypeError, ValueError):
        raise ValueError(f"tokenizer metadata {meta_path}: field 'special_tokens' must map names to ids") from None
    ranks = read_tiktoken(path)
    try:
        return tiktoken.Encoding(name=str(meta.get("name", path.stem)), pat_str=meta["pattern"],
                                 mergeable_ranks=ranks, special_tokens=special)
    except ValueError as e:  # e.g. a pattern that is not a valid regex, or clashing ids
        raise ValueError(f"tokenizer {path} (metadata {meta_path}) is invalid: {e}") from None


def eos_id(enc: tiktoken.Encoding) -> int:
    return enc.eot_token if EOS_TOKEN in enc.special_tokens_set else enc.n_vocab - 1


def train_tokenizer(cfg: Config) -> dict:
    """Trains the BPE, writes `cfg.out` and `cfg.out.json`; returns the metadata."""
    cfg.validate()
    start = time.perf_counter()
    counts, stats = count_words(cfg)
    t_count = time.perf_counter() - start
    word_bytes: Counter = Counter()
    for w, c in sorted(counts.items()):  # sorted: word order (hence set/heap work) independent of input order
        word_bytes[w.encode("utf-8")] += c
    n_merges = cfg.vocab_size - cfg.n_reserved - 1 - 256
    merged = learn_merges(dict(sorted(word_bytes.items())), n_merges, progress=cfg.progress)
    tokens = [bytes([i]) for i in range(256)] + merged
    write_tiktoken(cfg.out, tokens)
    specials = {name: len(tokens) + i for i, name in enumerate(special_token_names(cfg.n_reserved))}
    meta = {
        "name": Path(cfg.out).stem,
        "pattern": resolve_pattern(cfg.pattern),
        "special_tokens": specials,
        "vocab_size": cfg.vocab_size,
        "eos_id": specials[EOS_TOKEN],
        "sha256": file_sha256(cfg.out),
        "config": cli.to_dict(cfg),
        "stats": {**stats, "merges": len(merged), "seconds_counting": round(t_count, 3),
                  "seconds_total": round(time.perf_counter() - start, 3)},
    }
    cli.write_json_atomic(str(cfg.out) + ".json", meta)
    enc = load(cfg.out)
    assert enc.n_vocab == cfg.vocab_size, (enc.n_vocab, cfg.vocab_size)
    return meta


def main(argv: list[str] | None = None) -> None:
    cfg, meta = cli.run_or_exit(Config, train_tokenizer, argv, prefix="tokenizer: error")
    s = meta["stats"]
    print(f"wrote {cfg.out}: {cfg.vocab_size} ids, {s['chars']} chars, {s['unique_pretokens']} unique pre-tokens, "
          f"{s['seconds_total']:.1f}s")


if __name__ == "__main__":
    main()
