"""Train-stage throughput: pretraining, and finetuning with none / kl_pre real / kl_pre self-generated.

    python -m forgetting.bench.stage_bench [--d_model 128 --n_layers 4 --head_dim 32 --seq_len 128 ...]

Runs the real train stage (data loading, replay sampling, the jitted step) on generated synthetic
languages and reports its own `tokens_per_s` (new-data tokens per second of training time, sampling of
self-generated replay included; evaluation excluded). Writes JSON with `--json`.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from forgetting.training import cli

from forgetting.stages import generate, train
from forgetting.training.train_config import TrainConfig, replace


@dataclass(frozen=True)
class StageBenchConfig:
    """Train-stage throughput benchmark."""

    d_model: int = 128  # residual width
    n_layers: int = 4  # blocks
    head_dim: int = 32  # per-head width
    seq_len: int = 128  # sequence length
    vocab_size: int = 4096  # synthetic-language vocabulary
    batch_size: int = 32  # new-data rows per step
    replay_batch: int = 16  # replay rows per step
    replay_buffer: int = 8  # self-generated replay: steps sampled at once
    steps: int = 64  # timed steps per configuration (plus the compile step, excluded by the stage)
    dtype: str = "bfloat16"  # matmul input dtype
    json: str = ""  # also write the results here


def bench(cfg: StageBenchConfig) -> dict:
    work = Path(tempfile.mkdtemp(prefix="stage_bench_"))
    tokens = cfg.batch_size * cfg.seq_len * (cfg.steps + 8) + 65_536
    paths = []
    for lang in (0, 1):
        out = work / f"lang{lang}.bin"
        generate.generate(generate.Config(corpus="synthetic", language=lang, num_tokens=tokens,
                                          vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, out=str(out)))
        paths.append(str(out))
    base = replace(TrainConfig(), **{
        "data.path": paths[0], "data.num_tokens_valid": 8 * cfg.seq_len, "model.d_model": cfg.d_model,
        "model.n_layers": cfg.n_layers, "model.head_dim": cfg.head_dim, "model.seq_len": cfg.seq_len,
        "model.dtype": cfg.dtype, "opt.batch_size": cfg.batch_size, "opt.warmup_tokens": 0,
        "stop.num_tokens_train": cfg.batch_size * cfg.seq_len * cfg.steps, "log.every_steps": cfg.steps,
        "log.progress": False, "run.dir": str(work / "runs")})
    results = {}
    pre = train.train(base)
    results["pretrain"] = pre["metrics"]["tokens_per_s"]
    fine = replace(base, **{"data.path": paths[1], "model.load_path": pre["run_dir"]})
    variants = {
        "finetune_none": {},
        "finetune_kl_real": {"reg.method": "kl_pre", "reg.batch_size": cfg.replay_batch},
        "finetune_kl_self": {"reg.method": "kl_pre", "reg.synth": True, "reg.batch_size": cfg.replay_batch,
                             "reg.buffer": cfg.replay_buffer},
    }
    for name, changes in variants.items():
        results[name] = train.train(replace(fine, **changes))["metrics"]["tokens_per_s"]
    ratios = {f"{k}_vs_none": results[k] / results["finetune_none"] for k in ("finetune_kl_real", "finetune_kl_self")}
    return {"config": cli.to_dict(cfg), "tokens_per_s": results, "ratios": ratios}


def main(argv: list[str] | None = None) -> dict:
    cfg = cli.parse(StageBenchConfig, argv)
    result = bench(cfg)
    for name, value in result["tokens_per_s"].items():
        print(f"{name:<20} {value:>12,.0f} tokens/s")
    for name, value in result["ratios"].items():
        print(f"{name:<28} {value:.2f}x")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
