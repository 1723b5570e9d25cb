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
import json
from pathlib import Path
from typing import Any

import numpy as np

from forgetting.core import checkpoint, families
from forgetting.core import model as model_lib
from forgetting.stages import cli

CONFIG_FILE, METRICS_FILE, STATE_FILE, PARAMS_FILE, DONE_FILE = (
    "config.json", "metrics.jsonl", "state.msgpack", "params.msgpack", "done.json")

# Fields that change where or how a run is shown or placed, not its numbers: left out of the hash.
_UNHASHED = {("run", "dir"), ("run", "mesh"), ("run", "mesh_model"), ("log", "wandb"),
             ("log", "wandb_project"), ("log", "progress")}


def hashed_config(cfg: Any) -> dict:
    d = cli.to_dict(cfg)
    for section, key in _UNHASHED:
        d.get(section, {}).pop(key, None)
    return d


def run_dir(cfg: Any) -> Path:
    """The run directory of a training config: `<run.dir>/<run.name->hash`, known before running."""
    digest = cli.config_hash(hashed_config(cfg))
    name = f"{cfg.run.name}-{digest}" if cfg.run.name else digest
    return Path(cfg.run.dir) / name


def is_done(path: str | Path) -> bool:
    return (Path(path) / DONE_FILE).exists()


def read_metrics(path: str | Path) -> list[dict]:
    file = Path(path) / METRICS_FILE
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def append_metrics(path: Path, row: dict) -> None:
    with open(path / METRICS_FILE, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drops rows logged after the checkpoint being resumed (they are recomputed identically)."""
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    tmp = path / (METRICS_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp.replace(path / METRICS_FILE)


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


def load_run(path: str | Path, *, dtype: str | None = None, seq_len: int | None = None) -> LoadedRun:
    """Loads a finished run directory of this project, an authors' `weights.npz` directory, or a Hugging
    Face Llama checkpoint directory (`seq_len`: its sequence length here; ignored for run directories,
    which keep their own)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--model.load_path {path} does not exist; pass a finished run directory")
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
    saved = json.loads((path / CONFIG_FILE).read_text())
    resolved = saved["resolved"]
    model_dict = dict(resolved["model"])
    if dtype:
        model_dict["dtype"] = dtype
    model_cfg = model_config_from_dict(model_dict)
    params = checkpoint.restore(path / PARAMS_FILE, abstract_params(model_cfg))
    data = saved["config"]["data"]
    return LoadedRun(path, model_cfg, params, data["path"], data["num_tokens_valid"], data["split_seed"],
                     tuple(resolved["lineage_ids"]), resolved.get("tokenizer_sha256"))


def model_to_dict(model_cfg: Any) -> dict:
    """The resolved-model record of a run: the config's fields, plus `"family": name` for every family
    but the paper model's (paper-model records keep their old form: no family key)."""
    d = cli.to_dict(model_cfg)
    name = families.of(model_cfg).name
    if name != "paper":
        d["family"] = name
    return d


def model_config_from_dict(model_dict: dict) -> Any:
    """Inverse of `model_to_dict`: the config of the recorded family (the paper model without a key)."""
    d = dict(model_dict)
    return families.by_name(d.pop("family", "paper")).from_dict(d)


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
    from forgetting.stages import hf_checkpoint  # noqa: PLC0415

    model_cfg, params, _ = hf_checkpoint.load_hf(path, dtype=dtype or "bfloat16", param_dtype="float32",
                                                 seq_len=seq_len or None)
    return LoadedRun(path, model_cfg, params, "", 0, 0, (model_cfg.bos_id,), None)


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
    data_path = str(data.get("path", "") or "")
    dataset_id = int(data.get("id", 0) or 0)
    # Split settings default to 0 = "as in the new run" (train_setup fills them in).
    return LoadedRun(path, model_cfg, params, data_path, int(data.get("num_tokens_valid", 0) or 0),
                     int(data.get("split_seed", 0) or 0), (dataset_id,), None)
