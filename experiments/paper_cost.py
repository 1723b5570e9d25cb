"""Estimated GPU-hours of every language-model figure's `--scale paper` sweep (an estimate, not a measurement).

For every train run a paper preset lists, FLOPs = training tokens × `model.flops_per_token` (6·N_matmul +
attention, forward + backward), plus replay rows (forward + backward for real replay, a forward of the
frozen reference for KL, a forward per sampled token for self-generated replay), plus evaluations (a
forward over the validation tokens of every evaluated dataset, and of the reference or initialization for
the KL metrics, at every eval). GPU-hours = FLOPs / (MFU × peak), at the one assumed utilization of the
project (`ASSUMED_MFU`, `PEAK_TFLOPS`; `bench.plan` uses the same), printed with every estimate. Run lengths:

- tokens per parameter: exact;
- epochs: epochs × the data file's size (`--sizes`, assumed token counts of the authors' files);
- a target loss or early stopping with a cap: the cap, so those figures' numbers are upper bounds
  (marked "≤"; a run that reaches its target sooner costs less).

    python -m forgetting.experiments.paper_cost                       # the README table
    python -m forgetting.experiments.paper_cost --mfu 0.2 --peak_tflops 989
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path

from forgetting.core import model as model_lib
from forgetting.experiments import framework
from forgetting.training.train_config import TrainConfig

FIGURES = ("model_size", "pretrain_length", "grid_2d", "learning_rate", "high_lr", "model_capacity",
           "method_comparison", "capacity_slices")
DATA = {  # the figure's paper data (placeholders: only the file stems matter here)
    "grid_2d": ("fineweb_edu_10B.bin", "nemotron_math_20M.bin"),
    "method_comparison": ("fineweb_edu_10B.bin", "nemotron_math_20M.bin"),
}
# Assumed sizes (tokens) of the authors' data files: FineWeb-Edu 10B and Nemotron-CC-Math 20M by their
# names; C4-en ≈ 9.8B from the paper's ≈17K TPP for 10 epochs of it at D=256; C4-es is not stated: 1B.
SIZES = {"c4_en": 9.8e9, "c4_es": 1e9, "fineweb_edu_10B": 10e9, "nemotron_math_20M": 20e6}
# The one utilization assumption behind every GPU-hour estimate here and in bench.plan: 30% of an H100/H200
# SXM's dense bf16 peak (an assumption, not a measurement).
ASSUMED_MFU = 0.3
PEAK_TFLOPS = 989.0


def gpu_hours(flops: float, mfu: float = ASSUMED_MFU, peak_tflops: float = PEAK_TFLOPS) -> float:
    return flops / (mfu * peak_tflops * 1e12) / 3600


def assumption(mfu: float = ASSUMED_MFU, peak_tflops: float = PEAK_TFLOPS) -> str:
    """The utilization an estimate assumes, printed beside it."""
    return f"assuming MFU {mfu:g} of {peak_tflops:g} TFLOP/s peak"


def flops_per_token(mc) -> float:
    """Forward+backward FLOPs per trained token (6·N_matmul + causal attention) of any family: the paper
    model's `model.flops_per_token`; for Llama-family configs N_matmul counts the unembedding once."""
    if isinstance(mc, model_lib.ModelConfig):
        return model_lib.flops_per_token(mc)
    D, L, T = mc.d_model, mc.n_layers, mc.seq_len
    per_layer = D * mc.head_dim * (mc.n_heads * 2 + mc.n_kv_heads * 2) + 3 * D * mc.d_mlp
    return 6 * (L * per_layer + D * mc.vocab_size) + 12 * L * mc.n_heads * mc.head_dim * T / 2


def train_flops_per_token(cfg: TrainConfig, mc) -> float:
    """Training FLOPs per new-data token: the step's forward and backward plus its replay rows (forward +
    backward for replay, a forward of the frozen reference for KL, a forward per sampled token when the
    replay is self-generated)."""
    fwd_bwd = flops_per_token(mc)
    fwd = fwd_bwd / 3
    B, R = cfg.opt.batch_size, cfg.reg.batch_size
    per_token = fwd_bwd
    if cfg.reg.method in ("kl_pre", "ntp_pre"):
        per_token += R / B * (fwd if cfg.reg.synth else 0.0)  # sampling the replay rows
        per_token += R / B * (fwd_bwd + (fwd if cfg.reg.method == "kl_pre" else 0.0))
    return per_token


def _model(cfg: TrainConfig, loaded: dict[str, model_lib.ModelConfig]) -> model_lib.ModelConfig:
    if cfg.model.load_path:
        return loaded[Path(cfg.model.load_path).name]
    m = cfg.model
    return model_lib.ModelConfig(vocab_size=m.vocab_size or 4096, d_model=m.d_model, n_layers=m.n_layers,
                                 head_dim=m.head_dim, seq_len=m.seq_len, dtype=m.dtype)


def run_cost(cfg: TrainConfig, mc, sizes: dict[str, float]) -> tuple[float, bool]:
    """(FLOPs, whether the length is only a cap) of one train run (`mc`: its model config, any family;
    `sizes`: tokens of the data files by stem, for lengths in epochs)."""
    s = cfg.stop
    capped = bool(s.target_loss or s.early_stop_evals)
    if s.tokens_per_param:
        tokens = s.tokens_per_param * model_lib.paper_param_count(mc)
    elif s.num_epochs:
        tokens = s.num_epochs * sizes[Path(cfg.data.path).stem]
    elif s.num_tokens_train:
        tokens = s.num_tokens_train
    else:  # early stopping alone: assume the new data's 10 epochs
        tokens, capped = 10 * sizes[Path(cfg.data.path).stem], True
    per_token = train_flops_per_token(cfg, mc)
    fwd, B = flops_per_token(mc) / 3, cfg.opt.batch_size
    every = (cfg.log.every_steps * B * mc.seq_len) if cfg.log.every_steps else cfg.log.every_tokens
    evals = math.ceil(tokens / every) + 1
    datasets = 1 + bool(cfg.model.load_path) + bool(cfg.mix.path)
    eval_flops = evals * cfg.data.num_tokens_valid * fwd * (2 * datasets + len(cfg.eval.extra_paths))
    return tokens * per_token + eval_flops, capped


def figure_cost(name: str, sizes: dict[str, float]) -> dict:
    mod = importlib.import_module(f"forgetting.experiments.{name}")
    old, new = DATA.get(name, ("c4_en.bin", "c4_es.bin"))
    _, knobs = framework.parse_args(mod.Knobs, mod.PRESETS, ["--scale", "paper", "--old_path", old, "--new_path", new])
    specs = [s for s in mod.runs(knobs, Path("out")) if s.module == "forgetting.stages.train"]
    loaded: dict[str, model_lib.ModelConfig] = {}
    total, capped_any = 0.0, False
    for spec in [s for wave in framework.waves(specs) for s in wave]:  # a finetune after its start
        mc = _model(spec.config, loaded)
        loaded[framework.run_dir(spec, "out").name] = mc
        flops, capped = run_cost(spec.config, mc, sizes)
        total += flops
        capped_any |= capped
    return {"figure": name, "runs": len(specs), "flops": total, "upper_bound": capped_any}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mfu", type=float, default=ASSUMED_MFU, help="assumed model FLOP utilization (default %(default)s)")
    p.add_argument("--peak_tflops", type=float, default=PEAK_TFLOPS,
                   help="GPU dense bf16 peak, TFLOP/s (default %(default)s: H100/H200 SXM)")
    p.add_argument("--sizes", type=json.loads, default=SIZES, help="JSON {file stem: tokens} of the data files")
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1:
        p.error(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.peak_tflops <= 0:
        p.error(f"--peak_tflops must be positive, got {args.peak_tflops}")
    print(f"GPU-hours {assumption(args.mfu, args.peak_tflops)} (an estimate, not a measurement)")
    rows = []
    for name in FIGURES:
        r = figure_cost(name, {**SIZES, **args.sizes})
        r["gpu_hours"] = gpu_hours(r["flops"], args.mfu, args.peak_tflops)
        r["mfu"], r["peak_tflops"] = args.mfu, args.peak_tflops
        rows.append(r)
        bound = "≤" if r["upper_bound"] else ""
        print(f"{name:<18} {r['runs']:>4} runs  {r['flops']:.2e} FLOP  {bound}{r['gpu_hours']:,.0f} GPU-hours")
    return rows


if __name__ == "__main__":
    main()
