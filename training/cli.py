"""Shared command-line plumbing for every stage: typed dataclass configs <-> flags, JSON, hashes.

Every stage is a frozen dataclass plus a plain function taking it. `parse` turns argv into that dataclass
with simple-parsing's nested mode, so a nested field `opt.peak_lr` is always the flag `--opt.peak_lr`
(never silently renamed); `to_argv` is the inverse, used by experiments' `--list` to print commands.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

from forgetting.core.files import write_json_atomic as write_json_atomic  # stages write their JSON with it

C = TypeVar("C")


def parse(config_cls: type[C], argv: Sequence[str] | None = None, *, description: str | None = None) -> C:
    """Parses argv into `config_cls`. `--config_path file.json` seeds defaults from a JSON file.

    Command lines start here, before JAX has started its threads, so this is also where the host
    allocator is set to reuse XLA's large buffers (`core.host_memory`)."""
    from simple_parsing import ArgumentGenerationMode, ArgumentParser, NestedMode

    from forgetting.core import host_memory

    host_memory.keep_freed_memory()

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(
        argument_generation_mode=ArgumentGenerationMode.NESTED,
        nested_mode=NestedMode.WITHOUT_ROOT,
        add_config_path_arg=True,
        description=description or (config_cls.__doc__ or "").strip().splitlines()[0] if config_cls.__doc__ else None,
    )
    parser.add_arguments(config_cls, dest="config")
    config_path = _config_path_arg(argv)
    if config_path is not None:
        try:
            check_config_file(config_cls, config_path)
        except ValueError as e:
            parser.error(str(e))
    try:
        args = parser.parse_args(argv)
    except (RuntimeError, TypeError, ValueError, OSError) as e:  # simple-parsing's complaints about the file
        parser.error(f"--config_path {config_path}: {e}" if config_path else str(e))
    cfg = args.config
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:  # a bad flag combination: argparse-style message and exit code 2
            parser.error(str(e))
    return cfg


def _config_path_arg(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config_path="):
            return arg.split("=", 1)[1]
    return None


def check_config_file(config_cls: type, path: str | Path) -> None:
    """A `--config_path` JSON file must exist, parse, and name only fields of `config_cls` (nested as the
    flags are: {"opt": {"peak_lr": 1e-3}}); the error names the file and the field."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return  # other formats (yaml, toml) are left to simple-parsing; its errors are caught in `parse`
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--config_path {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config_path {path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config_path {path} is not valid JSON: {e}") from None
    _check_fields(config_cls, data, path, "")


def _check_fields(config_cls: type, data: Any, path: Path, prefix: str) -> None:
    where = f"field {prefix.rstrip('.')!r}" if prefix else "the top level"
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {where} must be a JSON object of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"{path}: unknown field {prefix + key!r}; known here: {', '.join(sorted(names))}")
        if _is_dataclass_type(hints[key]):
            _check_fields(hints[key], value, path, prefix + key + ".")


def check_output_file(flag: str, path: str | Path) -> None:
    """An output file path must not name an existing directory (the rename into place would fail late)."""
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is an existing directory; give a file path such as {Path(path) / 'data.bin'}")
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path} lies under {parent}, which is a regular file, not a directory; "
                                 "give a path in a directory")
            break


def to_dict(cfg: Any) -> Any:
    """A JSON-ready dict of a (nested) dataclass config; tuples become lists, enums their values."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(config_cls: type[C], data: dict) -> C:
    """Builds `config_cls` from `to_dict` output (unknown keys are an error, missing keys take defaults)."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{config_cls.__name__}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if _is_dataclass_type(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        elif isinstance(value, list) and typing.get_origin(tp) in (tuple,):
            value = tuple(value)
        kwargs[name] = value
    return config_cls(**kwargs)


def config_hash(cfg: Any, length: int = 10) -> str:
    """A short stable hash of the resolved config (sorted JSON), used to name run directories."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _flag_value(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, enum.Enum):
        return [str(value.value)]
    return [str(value)]


def to_argv(cfg: Any, *, only_changed: bool = True, _prefix: str = "") -> list[str]:
    """Flags that `parse(type(cfg), flags)` turns back into `cfg` (fields equal to defaults are left out)."""
    out: list[str] = []
    default = type(cfg)() if only_changed and _has_all_defaults(type(cfg)) else None
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{_prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += to_argv(value, only_changed=only_changed, _prefix=name + ".")
            continue
        if default is not None and getattr(default, f.name) == value:
            continue
        if value is None:
            continue
        out += [f"--{name}", *_flag_value(value)]
    return out


def _has_all_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def command_line(module: str, cfg: Any) -> str:
    """One shell command that runs `python -m module` with `cfg` (for `--list` and Slurm arrays)."""
    import shlex

    return " ".join(["python", "-m", module, *map(shlex.quote, to_argv(cfg))])


def run_or_exit(config_cls: type[C], fn, argv: Sequence[str] | None = None, *,
                prefix: str = "error") -> tuple[C, Any]:
    """A stage's `main` core: parse flags and run `fn(cfg)`; returns (cfg, result).

    Bad input (ValueError, FileNotFoundError) becomes `<prefix>: <message>` on stderr and exit status 2.
    """
    cfg = parse(config_cls, argv)
    with exit_on_error(prefix):
        return cfg, fn(cfg)
    raise AssertionError("unreachable")  # (exit_on_error re-raises as SystemExit)


@contextlib.contextmanager
def exit_on_error(prefix: str = "error", errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turns bad input (ValueError, FileNotFoundError, `errors`, a directory given as a file or a file in the
    middle of a path) into `<prefix>: <message>` and exit status 2, another OSError (a full disk, a
    permission) into a message and status 1, and Ctrl-C into status 130, all without a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, *errors) as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        print(f"{prefix}: {os_error_message(e)}", file=sys.stderr)
        # a path of the wrong kind is bad input (2), like a ValueError; a failed write is 1
        raise SystemExit(2 if isinstance(e, (IsADirectoryError, NotADirectoryError)) else 1) from None
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def os_error_message(e: OSError) -> str:
    """What an OSError means for the user: a path of the wrong kind (a directory given as a file, a file in
    the middle of a path) is not a failed write; only a write that failed gets the disk/permissions advice."""
    name = e.filename or "a path"
    if isinstance(e, IsADirectoryError):
        return f"{name} is a directory, but a file was expected there: pass a file path"
    if isinstance(e, NotADirectoryError):
        return (f"{name}: part of this path is a regular file, not a directory (a path under a file); pass a path "
                "whose parents are directories")
    if isinstance(e, PermissionError):
        return f"permission denied on {name}: fix its permissions (or choose another path) and rerun"
    return (f"{e.strerror or e} ({e.filename or 'while writing'}); fix that (free disk space, permissions) and "
            "rerun: files are written atomically, so nothing already written was damaged")


def run_and_print(config_cls: type[C], fn, argv: Sequence[str] | None = None) -> Any:
    """`run_or_exit`, then print the result as one JSON line on stdout."""
    _, result = run_or_exit(config_cls, fn, argv)
    print(json.dumps(result, sort_keys=True))
    return result
