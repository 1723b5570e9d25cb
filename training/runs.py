"""Run directories: naming by config hash, metrics log, completion marker, and loading finished runs.

A run directory holds `config.json` (the flags plus what was resolved from data and checkpoints),
`metrics.jsonl` (one JSON object per eval), `state.msgpack` (the resumable training state),
`params.msgpack` (final weights, LoRA merged) and `done.json` (the completion marker with the final
metrics). Finished runs also load as `--model.load_path`, as do checkpoints written by the authors'
released code (a directory with `weights.npz` and `config.yaml`) and Llama-family checkpoints in the
Hugging Face layout (a directory whose `config.json` has `model_type` and holds `*.safetensors`).
A run's resolved model config records `"family": "llama"` for Llama models, so a finetuned Llama run
loads again as a LlamaConfig.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from forgetting.core import families, files, multihost, sharded_checkpoint
from forgetting.core import data as data_lib
from forgetting.core import backend
from forgetting.core import model as model_lib
from forgetting.training import cli

CONFIG_FILE, METRICS_FILE, STATE_FILE, PARAMS_FILE, DONE_FILE = (
    "config.json", "metrics.jsonl", "state.msgpack", "params.msgpack", "done.json")
LOCK_FILE = "lock"  # advisory lock of the one process writing the run (holds its pid and host)
FAULT_ENV = "FORGETTING_FAULT_AT"  # tests: `kill -9` the run at this named point (see `fault_point`)

# Fields that change where or how a run is shown or placed, not its numbers: left out of the hash.
_UNHASHED = {("run", "dir"), ("run", "mesh"), ("run", "mesh_model"), ("log", "wandb"),
             ("log", "wandb_project"), ("log", "progress"), ("log", "checkpoint_every_steps"),
             ("log", "checkpoint_minutes"), ("reg", "replay_cache")}


# Input paths: named by the file they point at, so `x.bin`, `$PWD/x.bin` and `dir/` vs `dir` are one run.
_PATH_FIELDS = (("data", "path"), ("mix", "path"), ("reg", "path"), ("model", "load_path"), ("model", "load_dir"),
                ("eval", "extra_paths"))


def normalize_path(path: str) -> str:
    """An input path as a run's identity records it: absolute, `~` and symlinks resolved, no trailing slash
    ("" stays "": no file)."""
    return str(Path(path).expanduser().resolve()) if path else path


# How a run directory's hash is computed. 1: every field of the config (so any new field renamed every run);
# 2: only the fields that differ from their defaults, plus the dtype the run computes in, plus this number.
HASH_SCHEME = 2


def hashed_config(cfg: Any, *, normalize: bool = True, scheme: int = HASH_SCHEME) -> dict:
    """The config a run is named by (`normalize=False`: input paths as spelled, the naming before paths
    were normalized; `scheme=1`: the naming before only non-default fields were hashed)."""
    d = cli.to_dict(cfg) if scheme == 1 else _changed_fields(cfg)
    for section, key in _PATH_FIELDS if normalize else ():
        value = d.get(section, {}).get(key)
        if isinstance(value, str):
            d[section][key] = normalize_path(value)
        elif isinstance(value, (list, tuple)):
            d[section][key] = [normalize_path(v) for v in value]
    model = getattr(cfg, "model", None)
    if model is not None and hasattr(model, "dtype"):  # the run is named by the dtype it computes in
        from forgetting.training.plan import resolve_dtype

        d.setdefault("model", {})["dtype"] = resolve_dtype(model.dtype)["dtype"]
    for section, key in _UNHASHED:
        d.get(section, {}).pop(key, None)
    if scheme == 1:
        return d
    return {"hash_scheme": scheme, **{k: v for k, v in d.items() if v != {}}}


def _changed_fields(cfg: Any) -> dict:
    """`cli.to_dict(cfg)` without the fields at their defaults (each section against its own class's
    defaults), so a new field left at its default names no run differently."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = _changed_fields(value)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is dataclasses.MISSING or cli.to_dict(value) != cli.to_dict(default):
            out[f.name] = cli.to_dict(value)
    return out


def run_dir(cfg: Any) -> Path:
    """The run directory of a training config: `<run.dir>/<run.name->hash`, known before running. A run
    started under an older naming (hash scheme 1; input paths not yet normalized) keeps its directory."""
    path = _named(cfg, hashed_config(cfg))
    if path.exists():
        return path
    for legacy in (_named(cfg, hashed_config(cfg, scheme=1)), _named(cfg, hashed_config(cfg, normalize=False, scheme=1))):
        if legacy.exists():
            return legacy
    return path


def _named(cfg: Any, hashed: dict) -> Path:
    digest = cli.config_hash(hashed)
    name = f"{cfg.run.name}-{digest}" if cfg.run.name else digest
    return Path(cfg.run.dir) / name


def is_done(path: str | Path) -> bool:
    """Finished: both the completion marker and the final weights are there (a run whose params.msgpack was
    deleted to recover from corruption is unfinished again: rerunning it rewrites the weights)."""
    return (Path(path) / DONE_FILE).exists() and sharded_checkpoint.exists(Path(path) / PARAMS_FILE)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; a bad line is an error naming the file and the line, except a torn
    last line (no newline: its writer was killed mid-write), which is dropped."""
    file = Path(path) / METRICS_FILE
    if not file.exists():
        return []
    text = file.read_text()
    if text and not text.endswith("\n"):
        head, _, last = text.rpartition("\n")
        try:
            json.loads(last)
        except json.JSONDecodeError:
            text = head
    return files.loads_json_lines(text, file)


# ---- every write into a run directory goes through the functions below (one place for a process-0 guard) ----


def append_metrics(path: Path, row: dict) -> None:
    if not multihost.is_writer():  # every process computes the row; process 0 writes it once
        return
    with open(path / METRICS_FILE, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


def truncate_metrics(path: Path, last_step: int) -> list[dict]:
    """Drops rows logged after the checkpoint being resumed (they are recomputed identically); -1 drops all
    (a fresh start). Returns the rows kept."""
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    if multihost.is_writer():
        files.write_text_atomic(path / METRICS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


def write_json(path: Path, obj: Any) -> None:
    """Process 0 writes (config.json, done.json); the other processes of a multi-process run skip it."""
    if multihost.is_writer():
        cli.write_json_atomic(path, obj)


def save_checkpoint(path: Path, tree: Any, metadata: dict, *, fault: str | None = None) -> None:
    """`sharded_checkpoint.save` (one file on one process; each process its own shards on several); `fault`
    names the crash point between the complete temp file and its rename."""
    sharded_checkpoint.save(path, tree, metadata=metadata,
                            before_replace=(lambda _tmp: fault_point(fault)) if fault else None)


def remove_temp_files(path: Path) -> list[str]:
    """Deletes the temp files a killed writer left (`*.tmp`, `.*.tmp`); call only while holding the lock."""
    removed = []
    for tmp in sorted({*path.glob("*.tmp"), *path.glob(".*.tmp")}):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed


def fault_point(name: str) -> None:
    """Fault injection for tests: if $FORGETTING_FAULT_AT names this point, die like `kill -9` (no cleanup,
    no flush, no finally blocks)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ---- one writer per run directory ----


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunInUse(ValueError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An advisory `fcntl.flock` on `<run>/lock`, which records the holder's pid and host. The kernel drops
    the lock when its process dies (even by `kill -9`), so a lock file left by a killed run is stale and is
    simply taken over. (flock is per host on some network file systems: two hosts writing one run dir are
    caught only where the file system supports it.)"""

    def __init__(self, run_path: str | Path):
        self.path = Path(run_path) / LOCK_FILE
        self.fd: int | None = None
        self.previous_holder = ""  # the holder recorded by a stale lock file that was taken over

    def __enter__(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunInUse(f"run directory {self.path.parent} is in use by {holder} (lock {self.path}); two "
                           "writers would interleave its metrics and checkpoints: wait for that run to finish "
                           "(then this command returns its result) or stop it") from None
        self.previous_holder = os.read(fd, 256).decode(errors="replace").strip()
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self.fd = fd
        if self.previous_holder:
            print(f"note: took over the stale lock of {self.previous_holder} (that process is gone)", file=sys.stderr)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean exit leaves an empty lock file: content means the holder died
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        # The lock file stays: deleting it would let a third process lock a different inode.


# ---- a run is bound to its inputs ----

_FINGERPRINT_BYTES = 1 << 20  # hashed at each end of a file: cheap for any size, catches any rewrite in practice
_VOLATILE_SIDECAR_KEYS = ("seconds",)  # timing, not content: re-making the same file does not change a run


def fingerprint(path: str | Path) -> dict:
    """A cheap identity of an input file: its size, a sha256 of its first and last MiB (of all of it when
    smaller) and, for token files, a sha256 of its sidecar without timing fields."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 2 * _FINGERPRINT_BYTES:
            digest.update(f.read())
        else:
            digest.update(f.read(_FINGERPRINT_BYTES))
            f.seek(size - _FINGERPRINT_BYTES)
            digest.update(f.read(_FINGERPRINT_BYTES))
    out = {"path": str(path), "size": size, "head_tail_sha256": digest.hexdigest()}
    sidecar = data_lib.sidecar_path(path)
    if sidecar.exists():
        try:
            meta = json.loads(sidecar.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = sidecar.read_text(errors="replace")
        if isinstance(meta, dict):
            meta = {k: v for k, v in meta.items() if k not in _VOLATILE_SIDECAR_KEYS}
        out["sidecar_sha256"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return out


_CONTENT_KEYS = ("size", "head_tail_sha256", "sidecar_sha256")
# config.json's "inputs_version": 2 since GGUF/HF/load_dir checkpoints and mask files are fingerprinted too
INPUTS_VERSION = 2


def _content(record: dict) -> tuple:
    return tuple(record.get(k) for k in _CONTENT_KEYS)


def same_content(a: dict, b: dict) -> bool:
    """Whether two `fingerprint`s are of the same content (their paths may differ)."""
    return _content(a) == _content(b)


def check_inputs(run_path: Path, current: dict[str, dict], resume_step: int) -> None:
    """Refuses to resume a run whose recorded input files changed since it started (the message names the
    file); a run recorded before fingerprints existed is resumed with a warning."""
    config = read_run_config(run_path)
    saved = config.get("inputs")
    if saved is None:
        print(f"warning: {run_path / CONFIG_FILE} records no input fingerprints (an older run); resuming without "
              "checking that its data is unchanged", file=sys.stderr)
        return
    for role in sorted(set(saved) | set(current)):
        before, now = saved.get(role), current.get(role)
        if before is not None and now is not None and same_content(before, now):
            continue  # the same file, however its path is spelled now
        if before is None and config.get("inputs_version", 1) < INPUTS_VERSION:
            print(f"warning: {run_path} started before {role} was fingerprinted; resuming without checking it",
                  file=sys.stderr)
            continue
        if before is None or now is None:
            raise ValueError(f"the inputs of run {run_path} changed: {role} was "
                             f"{'not used' if before is None else before['path']} when it started and is "
                             f"{'not used' if now is None else now['path']} now; resume with the original inputs")
        what = [k for k in _CONTENT_KEYS if before.get(k) != now.get(k)]
        raise ValueError(f"{role} {now['path']} changed since run {run_path} started ({', '.join(what)} differ); its "
                         f"checkpoint at step {resume_step} was trained on the old file. Put the original file back to "
                         "resume, or train on the new file as a separate run (e.g. add --run.name NEW)")


def runs_in_dir(directory: str | Path) -> list[Path]:
    """The loadable runs directly under `directory`, sorted by path: finished run directories of this
    project and the authors' checkpoints (`*/weights.npz`). The authors' `model.load_dir`/`load_idx` sweeps
    index the same kind of sorted list (theirs holds only their checkpoints)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"--model.load_dir {directory} is not a directory")
    found = {p.parent for p in directory.glob(f"*/{DONE_FILE}")} | {p.parent for p in directory.glob("*/weights.npz")}
    return sorted(found)


def run_in_dir(directory: str | Path, index: int) -> Path:
    """The `index`-th of `runs_in_dir(directory)` (the authors' load_dir/load_idx)."""
    found = runs_in_dir(directory)
    if not found:
        raise FileNotFoundError(f"--model.load_dir {directory} holds no finished runs or authors' checkpoints")
    if not 0 <= index < len(found):
        raise ValueError(f"--model.load_idx {index} is out of range: {directory} holds {len(found)} runs "
                         f"(0..{len(found) - 1})")
    return found[index]


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A finished run (or an authors' checkpoint) ready to finetune from."""

    path: Path
    model_cfg: Any  # a config of any registered family (`core.families`)
    params: dict
    data_path: str  # the data it was trained on ("" if unknown)
    num_tokens_valid: int
    split_seed: int
    lineage_ids: tuple[int, ...]  # dataset ids of every dataset in its training history
    tokenizer_sha256: str | None
    # other sidecar `tokenizer_sha256`s that name the same tokenizer (a HF directory's tokenizer.json on its own)
    tokenizer_aliases: tuple[str, ...] = ()

    def tokenizer_matches(self, sha256: str | None) -> bool:
        """Whether data whose sidecar records `sha256` was tokenized with this model's tokenizer (unknown on
        either side: not refused)."""
        return not (sha256 and self.tokenizer_sha256) or sha256 in (self.tokenizer_sha256, *self.tokenizer_aliases)


def load_run(path: str | Path, *, dtype: str | None = None, seq_len: int | None = None,
             shardings: Callable[[Any], dict] | None = None) -> LoadedRun:
    """Loads a finished run directory of this project, an authors' `weights.npz` directory, a Hugging
    Face Llama/Qwen2/Qwen3 checkpoint directory or a llama.cpp `.gguf` file (`seq_len`: its sequence length here; ignored for run directories,
    which keep their own).

    `shardings(model_cfg)` (a multi-process run): the parameters' shardings; a run directory's params then
    come back placed on them, each process reading only its own slices of params.msgpack."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--model.load_path {path} does not exist; pass a finished run directory")
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf_checkpoint(path, dtype, seq_len)
    if (path / "weights.npz").exists():
        return _load_authors_checkpoint(path, dtype)
    if is_hf_checkpoint(path):
        return _load_hf_checkpoint(path, dtype, seq_len)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path} is neither a run directory (no {CONFIG_FILE}) nor an authors' "
                                "checkpoint (no weights.npz)")
    if not is_done(path):
        raise ValueError(f"run {path} is not finished (no {DONE_FILE}); finish it first by running its config "
                         "again (it resumes), then finetune from it")
    saved = read_run_config(path)
    file = path / CONFIG_FILE
    resolved, data = saved["resolved"], saved["config"]["data"]
    model_dict = dict(resolved["model"])
    if dtype:
        model_dict["dtype"] = dtype
    try:
        model_cfg = model_config_from_dict(model_dict)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: field 'resolved.model' is not a valid model config ({e})") from None
    try:
        if shardings is None:
            params = sharded_checkpoint.restore(path / PARAMS_FILE, abstract_params(model_cfg))  # either layout
        else:
            where = shardings(model_cfg)
            template = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where[k])
                        for k, s in abstract_params(model_cfg).items()}
            params = sharded_checkpoint.restore(path / PARAMS_FILE, template, sliced=True)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{e}. To recover the run's final weights: delete {path / PARAMS_FILE} and "
                         f"{path / DONE_FILE}, then rerun the run's training command (its flags are in {file}): it "
                         f"rewrites them from its last state checkpoint ({STATE_FILE})") from None
    return LoadedRun(path, model_cfg, params, data["path"], data["num_tokens_valid"], data["split_seed"],
                     tuple(resolved["lineage_ids"]), resolved.get("tokenizer_sha256"))


# The fields of a run's config.json that other runs and stages read, with their JSON types.
_RUN_CONFIG_FIELDS = {("config",): dict, ("resolved",): dict, ("resolved", "model"): dict,
                      ("resolved", "lineage_ids"): list, ("config", "data"): dict, ("config", "data", "path"): str,
                      ("config", "data", "num_tokens_valid"): int, ("config", "data", "split_seed"): int,
                      ("config", "run"): dict, ("config", "model"): dict}


def read_run_config(path: str | Path) -> dict:
    """A run directory's config.json, checked: the error names the file and the bad field."""
    file = Path(path) / CONFIG_FILE
    try:
        saved = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{file} must be a JSON object with 'config' and 'resolved', got {type(saved).__name__}")
    for keys, kind in _RUN_CONFIG_FIELDS.items():
        value: Any = saved
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{file}: field {'.'.join(keys)!r} is missing or not a JSON {kind.__name__}")
    if not all(isinstance(i, int) for i in saved["resolved"]["lineage_ids"]):
        raise ValueError(f"{file}: field 'resolved.lineage_ids' must be a list of token ids")
    return saved


def model_to_dict(model_cfg: Any) -> dict:
    """The resolved-model record of a run: the config's fields (its numerics as a "numerics" dict), plus
    `"family": name` for every family but the paper model's (paper-model records keep their old form: no
    family key)."""
    d = cli.to_dict(model_cfg)
    name = families.of(model_cfg).name
    if name != "paper":
        d["family"] = name
    return d


def model_config_from_dict(model_dict: dict) -> Any:
    """Inverse of `model_to_dict`: the config of the recorded family (the paper model without a key). Also
    reads the records written before the numerics had their own sub-config (the six fields flat beside the
    shape); a record with neither gets the default numerics."""
    d = dict(model_dict)
    numerics = dict(d.pop("numerics", None) or {})
    for name in (f.name for f in dataclasses.fields(backend.Numerics)):
        if name in d:
            numerics.setdefault(name, d.pop(name))
    return families.by_name(d.pop("family", "paper")).from_dict(dict(d, numerics=backend.Numerics(**numerics)))


def abstract_params(model_cfg: Any) -> dict:
    """Shape/dtype tree of the parameters of any model family."""
    return families.abstract_params(model_cfg)


def is_hf_checkpoint(path: str | Path) -> bool:
    """A Hugging Face checkpoint directory: `config.json` with a `model_type` (our run directories' config.json
    has `config`/`resolved` instead) and safetensors weights."""
    path = Path(path)
    try:
        conf = json.loads((path / CONFIG_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(conf, dict) and "model_type" in conf and "resolved" not in conf and any(path.glob("*.safetensors"))


def _load_hf_checkpoint(path: Path, dtype: str | None, seq_len: int | None) -> LoadedRun:
    """A HF Llama checkpoint as a LoadedRun: no training data is known (real replay needs --reg.path), and
    self-generated replay is prompted by BOS (the lineage is just the BOS id)."""
    from forgetting.formats import hf_checkpoint

    model_cfg, params, _ = hf_checkpoint.load_hf(path, dtype=dtype or "bfloat16", param_dtype="float32",
                                                 seq_len=seq_len or None)
    return LoadedRun(path, model_cfg, params, "", 0, 0, (model_cfg.bos_id,), *_checkpoint_tokenizer(path))


def checkpoint_tokenizer_files(path: Path) -> list[Path]:
    """The tokenizer files a HF checkpoint directory holds (what `tokenize_hf --hf_tokenizer DIR` hashes)."""
    from forgetting.stages import tokenize_hf

    return [path / name for name in tokenize_hf.TOKENIZER_FILES if (path / name).exists()]


def _checkpoint_tokenizer(path: Path) -> tuple[str | None, tuple[str, ...]]:
    """(tokenizer sha256, aliases) of a HF directory or GGUF file, as `tokenize_hf` records them in a sidecar
    when tokenizing with `--hf_tokenizer` the directory (or one of its tokenizer files) or the GGUF file;
    (None, ()) for a directory without tokenizer files."""
    from forgetting.stages import tokenize_hf

    if path.is_dir() and not checkpoint_tokenizer_files(path):
        return None, ()
    aliases = tuple(tokenize_hf.tokenizer_sha256(f) for f in checkpoint_tokenizer_files(path)) if path.is_dir() else ()
    return tokenize_hf.tokenizer_sha256(path), aliases


def _load_gguf_checkpoint(path: Path, dtype: str | None, seq_len: int | None) -> LoadedRun:
    """A llama.cpp GGUF file (Llama architecture) as a LoadedRun, like a HF checkpoint directory."""
    from forgetting.formats import gguf_checkpoint

    model_cfg, params, _ = gguf_checkpoint.load_gguf(path, dtype=dtype or "bfloat16", param_dtype="float32",
                                                     seq_len=seq_len or None)
    return LoadedRun(path, model_cfg, params, "", 0, 0, (model_cfg.bos_id,), *_checkpoint_tokenizer(path))


def parse_simple_yaml(text: str) -> dict:
    """Nested `key: value` mappings of scalars (the subset the authors' config.yaml uses); no pyyaml."""
    root: dict = {}
    stack: list[tuple[int, dict]] = [(-1, root)]
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith(("#", "-")):
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = line.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        value = value.strip()
        if not value:
            parent[key] = {}
            stack.append((indent, parent[key]))
            continue
        value = value.strip("'\"")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        else:
            value = {"true": True, "false": False, "null": None, "~": None}.get(str(value).lower(), value)
        parent[key] = value
    return root


_AUTHOR_KEYS = ("embed_in", "embed_out", "qkv", "out", "up", "down")


def authors_data_path(checkpoint: Path, path: str) -> str:
    """Where the data named in an authors' config.yaml is here: a relative path is relative to the
    checkpoint directory; an absolute path that does not exist here (their /dev/shm/...) falls back to a
    file of the same name in the checkpoint directory, when there is one."""
    if not path:
        return ""
    p = Path(path).expanduser()
    if not p.is_absolute():
        return str(checkpoint / p)
    if not p.exists() and (checkpoint / p.name).exists():
        return str(checkpoint / p.name)
    return str(p)


def _load_authors_checkpoint(path: Path, dtype: str | None) -> LoadedRun:
    yaml_file = path / "config.yaml"
    if not yaml_file.exists():
        raise FileNotFoundError(f"authors' checkpoint {path} has weights.npz but no config.yaml")
    conf = parse_simple_yaml(yaml_file.read_text())
    m = conf.get("model", {})
    try:
        model_cfg = model_lib.ModelConfig(vocab_size=int(m["V"]), d_model=int(m["D"]), n_layers=int(m["L"]),
                                          head_dim=int(m["H"]), seq_len=int(m["T"]), dtype=dtype or "bfloat16")
    except KeyError as e:
        raise ValueError(f"{yaml_file}: model section needs D, L, H (head dim), T, V; missing {e}") from None
    with np.load(path / "weights.npz") as npz:
        missing = [k for k in _AUTHOR_KEYS if k not in npz.files]
        if missing:
            raise ValueError(f"{path}/weights.npz lacks {missing}; expected keys {list(_AUTHOR_KEYS)}")
        params = {k: np.asarray(npz[k], np.float32) for k in _AUTHOR_KEYS}
    expected = model_lib.abstract_params(model_cfg)
    for k, spec in expected.items():
        if params[k].shape != spec.shape:
            raise ValueError(f"{path}/weights.npz: {k} has shape {params[k].shape}, config.yaml implies {spec.shape}")
    data = conf.get("data", {})
    data_path = authors_data_path(path, str(data.get("path", "") or ""))
    dataset_id = data_lib.AUTHORS_DATASET_IDS.get(Path(data_path).stem, int(data.get("id", 0) or 0))
    # Split settings default to 0 = "as in the new run" (train_setup fills them in).
    return LoadedRun(path, model_cfg, params, data_path, int(data.get("num_tokens_valid", 0) or 0),
                     int(data.get("split_seed", 0) or 0), (dataset_id,), None)
