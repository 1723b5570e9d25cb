"""The export stage: a finished paper-model run in the authors' checkpoint layout.

    python -m forgetting.stages.export --load_path runs/<run> --out exported/<name> --format authors

writes `weights.npz` (the six float32 arrays embed_in, embed_out, qkv, out, up, down; this project's
parameter layout is theirs) and `config.yaml` in the layout their `train_single.py` saves (its
DEFAULT_CFG sections, filled from the run's config), so their code finetunes it with `model.load_path`
and this project loads it back with `--model.load_path` (a round trip gives the same weights). Their
dataloader gives dataset ids by file stem (c4_en, c4_es, fineweb_edu_10B, nemotron_math_20M): for their
code to replay the run's data, the data file must carry one of those names.

    python -m forgetting.stages.export --load_path runs/<run> --out exported/<name> --format hf

writes a finished Llama, Qwen2/2.5 or Qwen3 run (or a HF directory / GGUF file it can load) in the
Hugging Face layout: config.json (`to_hf_config` of the family, rope scaling included), model.safetensors
(shards + index above 5 GB) and the tokenizer. A run that trained LoRA adapters saved its final weights
with the adapters merged (`core.lora.merge`, stages/train.py), so the export holds the merged model. The
tokenizer comes from the run's source checkpoint, found by following `resolved.loaded_from` back: from a
HF directory its tokenizer files are copied (the chat template of chat_template.jinja also goes into
tokenizer_config.json); from a GGUF file tokenizer.json is built from the metadata
(`gguf_checkpoint.tokenizer_json_from_gguf`) and tokenizer_config.json gets its special tokens and chat
template. `--dtype bfloat16` halves the file.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgetting.core import families, files
from forgetting.core import model as model_lib
from forgetting.training import cli, runs

FORMATS = ("authors", "hf")
# Tokenizer files copied from a HF source directory when present (tokenizer_config.json is rewritten).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "special_tokens_map.json", "generation_config.json",
                      "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
HF_SHARD_BYTES = 5 * 10**9  # above this, shards + model.safetensors.index.json (as transformers writes)


@dataclass(frozen=True)
class ExportConfig:
    """Export a finished run to another codebase's checkpoint layout."""

    load_path: str = ""  # a finished run (authors: a paper-model run; hf: a Llama/Qwen run, HF dir or .gguf)
    out: str = ""  # the checkpoint directory to write (created; existing files in it are replaced)
    format: str = "authors"  # authors: weights.npz + config.yaml as the authors' train_single.py saves them; hf: HF layout
    dtype: str = "float32"  # hf: storage dtype of the written tensors (float32 | bfloat16)

    def validate(self) -> None:
        if not self.load_path:
            raise ValueError("pass --load_path RUN_DIR (a finished run)")
        if not self.out:
            raise ValueError("pass --out DIR (the checkpoint directory to write)")
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")


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


def source_checkpoint(path: str | Path) -> Path:
    """The HF directory or .gguf file a run (or its ancestors, through `resolved.loaded_from`) started from;
    `path` itself when it is one."""
    path, seen = Path(path), []
    while path not in seen:
        seen.append(path)
        if (path.suffix == ".gguf" and path.is_file()) or runs.is_hf_checkpoint(path):
            return path
        config = path / runs.CONFIG_FILE
        parent = (json.loads(config.read_text()).get("resolved") or {}).get("loaded_from") if config.exists() else None
        if not parent:
            break
        path = Path(parent)
    chain = " -> ".join(str(p) for p in seen)
    raise FileNotFoundError(f"no Hugging Face directory or .gguf among the checkpoints {chain} (followed through "
                            "resolved.loaded_from in each run's config.json): the tokenizer has no source")


def _hf_tokenizer_files(source: Path, out: Path, seq_len: int) -> list[str]:
    """Writes the tokenizer files of `source` (HF dir or GGUF) into `out`; returns their names."""
    from forgetting.formats import chat_template

    written = []
    if source.suffix == ".gguf":
        from forgetting.formats import gguf_checkpoint

        g = gguf_checkpoint.open_gguf(source)
        tokenizer_json = gguf_checkpoint.tokenizer_json_from_gguf(g)
        files.write_json_atomic(out / "tokenizer.json", tokenizer_json)
        specials = chat_template.special_tokens_of(source)
        tok_config: dict = {"added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                                     for t in tokenizer_json["added_tokens"]},
                            **specials, "clean_up_tokenization_spaces": False, "model_max_length": seq_len,
                            "tokenizer_class": "PreTrainedTokenizerFast"}
        template = gguf_checkpoint.gguf_chat_template(source)
        if template:
            tok_config["chat_template"] = template
        files.write_json_atomic(out / "special_tokens_map.json", specials)
        tokens = g.require("tokenizer.ggml.tokens")
        eos = [g.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")]
        eos_ids = list(dict.fromkeys(int(i) for i in eos if i is not None and 0 <= int(i) < len(tokens)))
        generation = {"bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
                      "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
        files.write_json_atomic(out / "generation_config.json", generation)
        written += ["tokenizer.json", "special_tokens_map.json", "generation_config.json"]
    else:
        for name in HF_TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
                written.append(name)
        config_file = source / "tokenizer_config.json"
        tok_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        if "chat_template" not in tok_config and (source / "chat_template.jinja").is_file():
            tok_config["chat_template"] = (source / "chat_template.jinja").read_text(encoding="utf-8")
        if not tok_config and not written:
            raise FileNotFoundError(f"{source} has no tokenizer files ({', '.join(HF_TOKENIZER_FILES)})")
    files.write_json_atomic(out / "tokenizer_config.json", tok_config)
    return written + ["tokenizer_config.json"]


def export_hf(src: Path, out: Path, dtype: str = "float32") -> dict:
    """A Llama / Qwen2 / Qwen3 run (or HF dir / GGUF) -> `out` in the HF layout (module doc)."""
    import ml_dtypes

    from forgetting.core import safetensors_io as st
    from forgetting.formats import hf_checkpoint

    loaded = runs.load_run(src, dtype=None)
    module = hf_checkpoint.module_of_config(loaded.model_cfg)  # refuses families without a HF layout
    cfg = loaded.model_cfg
    source = source_checkpoint(src)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.glob("*.safetensors")) + sorted(p.name for p in out.glob("*.index.json"))
    if stale:  # the loader reads every *.safetensors: old shards would mix with the new weights
        raise ValueError(f"--out {out} already holds {', '.join(stale)}; pass an empty or new directory")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    tensors = hf_checkpoint.params_to_hf_tensors(cfg, loaded.params, np_dtype)
    hf = module.to_hf_config(cfg, torch_dtype=dtype)
    if source.suffix == ".gguf":
        from forgetting.formats import gguf_checkpoint

        src_hf = gguf_checkpoint.hf_config_from_gguf(gguf_checkpoint.open_gguf(source))
    else:
        src_hf = json.loads((source / "config.json").read_text())
    # The source's token ids and position range describe the model (not this run's KV-cache length).
    for key in ("bos_token_id", "eos_token_id", "max_position_embeddings"):
        if src_hf.get(key) is not None:
            hf[key] = src_hf[key]
    if sum(t.nbytes for t in tensors.values()) > HF_SHARD_BYTES:
        st.save_sharded(out, tensors, HF_SHARD_BYTES, {"format": "pt"})
        weight_files = sorted(p.name for p in out.glob("model-*.safetensors")) + ["model.safetensors.index.json"]
    else:
        st.save(out / "model.safetensors", tensors, {"format": "pt"})
        weight_files = ["model.safetensors"]
    del tensors
    files.write_json_atomic(out / "config.json", hf)
    written = ["config.json", *weight_files, *_hf_tokenizer_files(source, out, cfg.seq_len)]
    return {"out": str(out), "files": written, "family": hf["model_type"], "tokenizer_from": str(source)}


def export(cfg: ExportConfig) -> dict:
    """Writes the checkpoint; returns {"out": DIR, "files": [...]}."""
    cfg.validate()
    src = Path(cfg.load_path)
    if cfg.format == "hf":
        if not src.exists():
            raise FileNotFoundError(f"--load_path {src} does not exist")
        return export_hf(src, Path(cfg.out), cfg.dtype)
    if not (src / runs.CONFIG_FILE).exists() or "resolved" not in json.loads((src / runs.CONFIG_FILE).read_text()):
        raise ValueError(f"{src} is not a run directory of this project (no config.json with a resolved model); "
                         "export takes a finished run of the train stage")
    loaded = runs.load_run(src, dtype=None)
    if families.of(loaded.model_cfg).name != "paper":
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
