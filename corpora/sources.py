"""Text sources: iterate documents from `.txt`, `.jsonl`, directories of them, or Hugging Face datasets.

A source is a string:
- `path/file.txt`: documents separated by one or more blank lines (newlines inside a document are kept);
- `path/file.jsonl`: one JSON object per line, the document is its `text` field;
- `path/dir`: every `.txt` / `.jsonl` file below it, in sorted path order;
- `hf:NAME[:CONFIG][:SPLIT]`: `datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)` (split
  defaults to `train`), e.g. `hf:allenai/c4:en`. For the file builders (`json`, `csv`, `text`, `parquet`)
  the second part is `data_files` instead of a config, e.g. `hf:json:data/x.jsonl`; this is how the
  streaming path is tested offline. Needs the `hf` extra (`pip install 'forgetting[hf]'`).

Everything streams: the unit yielded is a `Piece` (text, ends_document). A document longer than
`max_piece_chars` is yielded in several pieces cut at line ends, so memory stays flat even for a
single huge document; consumers append EOS only where `ends_document` is true.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

TEXT_SUFFIXES = (".txt", ".jsonl")
FILE_BUILDERS = ("json", "csv", "text", "parquet")
DEFAULT_MAX_PIECE_CHARS = 1 << 22  # 4M characters: bounded memory for documents without blank lines


class Piece(NamedTuple):
    text: str
    ends_document: bool


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"source file not found: {path}") from None
    except OSError as e:  # permission denied, is a directory, ...
        raise ValueError(f"cannot read source {path}: {e.strerror or e}") from None


def _decode_line(raw: bytes, path: Path, line_no: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not valid UTF-8 at line {line_no}, byte offset {offset + e.start} "
            f"({e.reason}); convert the file to UTF-8"
        ) from None


def iter_txt(path: Path, max_piece_chars: int = DEFAULT_MAX_PIECE_CHARS) -> Iterator[Piece]:
    """Blank-line separated documents of a UTF-8 text file, streamed line by line."""
    lines: list[str] = []
    size = 0
    offset = 0
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, line_no, offset)
            offset += len(raw)
            if line.strip() == "":
                if lines:
                    yield Piece("".join(lines).rstrip("\r\n"), True)
                    lines, size = [], 0
                continue
            lines.append(line)
            size += len(line)
            if size >= max_piece_chars:  # cut a huge document at a line end; EOS comes later
                yield Piece("".join(lines), False)
                lines, size = [], 0
    if lines:
        yield Piece("".join(lines).rstrip("\r\n"), True)


def iter_jsonl(path: Path, text_field: str = "text") -> Iterator[Piece]:
    """The `text_field` of each JSON line; blank lines are skipped."""
    offset = 0
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, line_no, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON at line {line_no}: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise ValueError(f"{path}: line {line_no} has no string field {text_field!r}")
            yield Piece(obj[text_field], True)


def _files_below(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        found += [Path(root) / name for name in sorted(files) if name.endswith(TEXT_SUFFIXES)]
    return sorted(found)


def parse_hf_spec(spec: str) -> dict:
    """`hf:NAME[:CONFIG][:SPLIT]` -> keyword arguments for `datasets.load_dataset`."""
    parts = spec[len("hf:"):].split(":")
    if not parts[0]:
        raise ValueError(f"bad Hugging Face source {spec!r}; expected hf:NAME[:CONFIG][:SPLIT]")
    kwargs: dict = {"path": parts[0], "split": "train", "streaming": True}
    if len(parts) > 1 and parts[1]:
        kwargs["data_files" if parts[0] in FILE_BUILDERS else "name"] = parts[1]
    if len(parts) > 2 and parts[2]:
        kwargs["split"] = parts[2]
    if len(parts) > 3:
        raise ValueError(f"bad Hugging Face source {spec!r}: too many ':' parts")
    return kwargs


def iter_hf(spec: str, text_field: str = "text") -> Iterator[Piece]:
    """Streams a Hugging Face dataset (lazy import: only needed with the `hf` extra)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"source {spec!r} needs the Hugging Face `datasets` package: pip install 'forgetting[hf]'"
        ) from None
    kwargs = parse_hf_spec(spec)
    dataset = datasets.load_dataset(**kwargs)
    for i, row in enumerate(dataset):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"{spec}: row {i} has no string field {text_field!r}")
        yield Piece(text, True)


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Resolves directories to their files and checks that every local source exists."""
    if not sources:
        raise ValueError("no sources given; pass --sources FILE [FILE ...]")
    out: list[str] = []
    for src in sources:
        if src.startswith("hf:"):
            parse_hf_spec(src)
            out.append(src)
            continue
        path = Path(src)
        if path.is_dir():
            files = _files_below(path)
            if not files:
                raise ValueError(f"source directory {path} holds no .txt or .jsonl files (corpus is empty)")
            out += [str(p) for p in files]
        elif not path.exists():
            raise FileNotFoundError(f"source not found: {path}")
        elif not src.endswith(TEXT_SUFFIXES):
            raise ValueError(f"source {path}: unknown type; use .txt, .jsonl, a directory, or hf:NAME")
        else:
            out.append(src)
    return out


def source_bytes(sources: Sequence[str]) -> int | None:
    """Total size of the local files (for progress bars); None when a streaming source is included."""
    total = 0
    for src in sources:
        if src.startswith("hf:"):
            return None
        total += Path(src).stat().st_size
    return total


def iter_pieces(
    sources: Sequence[str], text_field: str = "text", max_piece_chars: int = DEFAULT_MAX_PIECE_CHARS
) -> Iterator[Piece]:
    """All pieces of all sources, in order (sources already expanded or not)."""
    for src in expand_sources(sources):
        if src.startswith("hf:"):
            yield from iter_hf(src, text_field)
        elif src.endswith(".jsonl"):
            yield from iter_jsonl(Path(src), text_field)
        else:
            yield from iter_txt(Path(src), max_piece_chars)


def iter_documents(sources: Sequence[str], text_field: str = "text") -> Iterator[str]:
    """Whole documents (pieces joined); convenient for small corpora and tests."""
    parts: list[str] = []
    for piece in iter_pieces(sources, text_field):
        parts.append(piece.text)
        if piece.ends_document:
            yield "".join(parts)
            parts = []
    if parts:
        yield "".join(parts)
