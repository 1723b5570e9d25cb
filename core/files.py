"""Atomic file writes: a reader sees the previous file or the complete new one, never half of it. Temp
files get the user's umask (unlike `tempfile.mkstemp`, always 0600), so a run stays readable by the group
on a shared cluster when the umask says so."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable


def create_temp_file(directory: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd, path) of a new, exclusively created file in `directory` for an atomic write, mode 0666 & ~umask."""
    for _ in range(100):
        tmp = os.path.join(directory, f"{prefix}{os.getpid()}.{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) atomically: `write_bytes_atomic`."""
    write_bytes_atomic(path, [text.encode("utf-8")])


def write_bytes_atomic(path: str | os.PathLike, chunks: Iterable[Any]) -> None:
    """Writes the bytes-like `chunks` through a temp file in the same directory: flush, fsync, rename over
    `path`, fsync of the directory (so the rename itself survives a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """The project's one atomic JSON writer: indented, key-sorted JSON through `write_text_atomic`."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync of a directory (its entries), where the platform allows opening one."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the file itself is synced
        pass
    finally:
        os.close(fd)


def loads_json(text: str, source: str | os.PathLike) -> Any:
    """`json.loads` whose error names the file, the line and the column of the fault."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None


def loads_json_lines(text: str, source: str | os.PathLike) -> list:
    """The JSON values of a `.jsonl` text (blank lines skipped); an error names the file and the line."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}, line {number} column {e.colno}: not valid JSON ({e.msg})") from None
    return rows
