"""The export stage: a finished paper-model run in the authors' checkpoint layout.

    python -m forgetting.stages.export --load_path runs/<run> --out exported/<name> --format authors

writes `weights.npz` (the six float32 arrays embed_in, embed_out, qkv, out, up, down; this project's
parameter layout is theirs) and `config.yaml` in the layout their `train_single.py` saves (its
DEFAULT_CFG sections, filled from the run's config), so their code finetunes it with `model.load_path`
and this project loads it back with `--model.load_path` (a round trip gives the same weights). Their
dataloader gives dataset ids by file stem (c4_en, c4_es, fineweb_edu_10B, nemotron_math_20M): for their
code to replay the run's data, the data file must carry one of those names.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgetting.core import model as model_lib
from forgetting.stages import cli, runs

FORMATS = ("authors",)


@dataclass(frozen=True)
class ExportConfig:
    """Export a finished run to another codebase's checkpoint layout."""

    load_path: str = ""  # a finished run directory of this project (a paper-model run)
    out: str = ""  # the checkpoint directory to write (created; existing files in it are replaced)
    format: str = "authors"  # authors: weights.npz + config.yaml as the authors' train_single.py saves them

    def validate(self) -> None:
        if not self.load_path:
            raise ValueError("pass --load_path RUN_DIR (a finished run)")
        if not self.out:
            raise ValueError("pass --out DIR (the checkpoint directory to write)")
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")


def _yaml_value(value: Any) -> str:
    if value is None or value == "":
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a double-quoted YAML scalar


def _yaml(tree: dict) -> str:
    lines = []
    for section, fields in tree.items():
        lines.append(f"{section}:")
        lines += [f"  {key}: {_yaml_value(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def authors_config(saved: dict, model_cfg: model_lib.ModelConfig) -> dict:
    """The authors' config sections for a run of this project (`saved`: its config.json)."""
    c = saved["config"]
    data, mix, reg, opt, stop = c["data"], c["mix"], c["reg"], c["opt"], c["stop"]
    data_path = str(Path(data["path"]).resolve()) if data["path"] else None
    return {
        "run": {"seed": c["run"]["seed"], "tags": None},
        "data": {"path": data_path, "split_seed": data["split_seed"], "num_tokens_valid": data["num_tokens_valid"]},
        "mix": {"path": str(Path(mix["path"]).resolve()) if mix["path"] else None, "coeff": mix["coeff"]},
        "model": {"D": model_cfg.d_model, "L": model_cfg.n_layers, "H": model_cfg.head_dim, "T": model_cfg.seq_len,
                  "V": model_cfg.vocab_size, "lora_rank": None, "remat": False, "dp_shard": False, "tp_size": 1,
                  "activ_dtype": model_cfg.dtype, "load_path": None, "load_dir": None, "load_idx": None,
                  "save_dir": None},
        "reg": {"method": None if reg["method"] == "none" else reg["method"], "coeff": reg["coeff"],
                "synth": reg["synth"], "batch_size": reg["batch_size"], "buffer": reg["buffer"]},
        "opt": {"batch_size": opt["batch_size"], "peak_lr": opt["peak_lr"], "warmup_tokens": opt["warmup_tokens"],
                "lr_decay": None if opt["lr_decay"] == "none" else opt["lr_decay"], "optimizer": opt["optimizer"],
                "b1": opt["b1"], "b2": opt["b2"], "weight_decay": opt["weight_decay"]},
        "stop": {k: (stop[k] or None) for k in ("num_tokens_train", "tokens_per_param", "num_epochs", "target_loss",
                                                 "train_time")},
        "log": {"every_tokens": c["log"]["every_tokens"], "measure_time": False, "project": "ptx-mini",
                "mode": "disabled"},
    }


def export(cfg: ExportConfig) -> dict:
    """Writes the checkpoint; returns {"out": DIR, "files": [...]}."""
    cfg.validate()
    src = Path(cfg.load_path)
    if not (src / runs.CONFIG_FILE).exists() or "resolved" not in json.loads((src / runs.CONFIG_FILE).read_text()):
        raise ValueError(f"{src} is not a run directory of this project (no config.json with a resolved model); "
                         "export takes a finished run of the train stage")
    loaded = runs.load_run(src, dtype=None)
    if not isinstance(loaded.model_cfg, model_lib.ModelConfig):
        raise ValueError(f"{src} is a {type(loaded.model_cfg).__name__} run; only paper-model runs export to the "
                         "authors' layout")
    saved = json.loads((src / runs.CONFIG_FILE).read_text())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: np.asarray(v, np.float32) for k, v in loaded.params.items()}
    np.savez(out / "weights.npz", **weights)
    (out / "config.yaml").write_text(_yaml(authors_config(saved, loaded.model_cfg)))
    return {"out": str(out), "files": ["weights.npz", "config.yaml"]}


def main(argv: list[str] | None = None) -> dict:
    cfg = cli.parse(ExportConfig, argv)
    try:
        result = export(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
