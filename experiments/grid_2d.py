"""2-D grid (claim 4): model size × pretraining length, without regularization vs with KL.

Every (width D, tokens per parameter) cell is pretrained on the old data for exactly that many tokens,
then finetuned on the new data until the new-data loss reaches `finetune_target` (capped at
`finetune_max_tokens`) twice: with no regularization and with the KL penalty on real old-data replay
(coefficient `kl_coeff`). Per cell and setting:

- loss delta = old-data loss after finetuning − old-data loss after pretraining;
- compute multiplier = the fraction of the pretraining run's tokens at which its validation loss first
  reached the finetuned model's old-data loss (linear interpolation between evaluations; 1 = nothing
  forgotten). Read from the pretraining run's metrics.jsonl, whose eval cadence is set by `evals`.

Figure: four heatmaps (loss delta / compute multiplier × none / KL), rows = D, columns = TPP.
`summary.json`: {"widths", "tpps", "delta": {"none": [[...]], "kl": [[...]]}, "multiplier": {...},
"rows": [one per cell and setting]}.
Paper (13 widths × 13 TPPs): multiplier ≈0.48 for small models without regularization, ≈0.85–0.92
everywhere with KL.

Pretraining uses cosine decay to 0 at the end of every run (both presets), as the paper's.
`--scale paper` is the authors' released sweep (experiments/2d_grid): FineWeb-Edu
(`--old_path fineweb_edu_10B.bin`) → Nemotron-CC-Math (`--new_path nemotron_math_20M.bin`); D ∈ {256, 288,
…, 640} (L=6) × TPP ∈ {20, 28, …, 1280}, cosine pretraining at LR 1e-3 (evaluated every 10M tokens, their
default: the compute multiplier interpolates between those evals); each finetuned at constant LR 1e-4
until new-data loss 2.2 (evaluated every 1M tokens), without regularization and with `kl_pre` coeff 10 on
real replay of 256 rows. Their 2.2 (NLL sum over T-1 positions / T) is 2.2·256/255 = 2.2086 here. Their
finetuning has no length cap; here it stops at 2B tokens.

    python -m forgetting.experiments.grid_2d                     # mini: synthetic languages, ≈8 min on 2 cores
    python -m forgetting.experiments.grid_2d --scale paper --old_path c4_en.bin --new_path c4_es.bin
"""
from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass
from pathlib import Path

from forgetting.experiments import common_lm as C
from forgetting.experiments import framework, repeat
from forgetting.experiments.framework import RunSpec

SETTINGS = ("none", "kl")


@dataclass(frozen=True)
class Knobs(C.EndPointKnobs):
    """Knobs of the 2-D grid (shared data/model/optimizer knobs first)."""

    widths: tuple[int, ...] = (8, 16, 32, 64)  # model widths D (grid rows)
    tpps: tuple[float, ...] = (10.0, 31.6, 100.0, 316.0)  # pretraining tokens per parameter (grid columns)
    finetune_target: float = 1.7  # finetuning stops once new-data valid loss <= this
    finetune_max_tokens: int = 2_000_000  # cap on finetuning tokens
    finetune_lr: float = 0.0  # finetuning peak LR (0 = `lr`)
    kl_coeff: float = 10.0  # coefficient of the KL penalty in the `kl` setting
    replay_batch: int = 32  # real old-data replay rows per step for the KL term

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        "finetune_target": (framework.positive,), "finetune_max_tokens": (framework.positive,),
        "replay_batch": (framework.positive,), "finetune_lr": (framework.nonnegative,),
        "kl_coeff": (framework.nonnegative,), "widths": (framework.nonempty, framework.positive),
        "tpps": (framework.nonempty, framework.positive),
    }


_PAPER_WIDTHS = tuple(range(256, 641, 32))  # 256, 288, …, 640 (13)
_PAPER_TPPS = (20.0, 28.0, 40.0, 57.0, 80.0, 113.0, 160.0, 226.0, 320.0, 453.0, 640.0, 905.0, 1280.0)
PRESETS = {
    # Cosine pretraining (the paper's): every TPP is a finished schedule, not a checkpoint of a longer run.
    "mini": Knobs(pretrain_lr_decay="cosine"),
    # The authors' experiments/2d_grid sweep (FineWeb-Edu -> Nemotron-CC-Math: pass their .bin files).
    "paper": Knobs(seeds=1, widths=_PAPER_WIDTHS, tpps=_PAPER_TPPS, n_layers=6, head_dim=64, seq_len=256, vocab_size=4096,
                   dtype="bfloat16", batch_size=256, lr=1e-3, warmup_steps=C.AUTHORS_WARMUP_STEPS,
                   valid_tokens=C.AUTHORS_VALID_TOKENS, pretrain_lr_decay="cosine",
                   pretrain_eval_tokens=C.DEFAULT_EVAL_TOKENS, finetune_eval_tokens=C.TARGET_EVAL_TOKENS,
                   finetune_target=C.authors_loss(2.2, 256), finetune_max_tokens=2_000_000_000, finetune_lr=1e-4,
                   kl_coeff=10.0, replay_batch=256),
}


def pre_name(d: int, t: float) -> str:
    return f"pre-d{d}-tpp{C.fmt(t)}"


def fine_name(d: int, t: float, setting: str) -> str:
    return f"ft-d{d}-tpp{C.fmt(t)}-{setting}"


def setting_finetunes(k, name, **kw) -> tuple[tuple[str, dict], ...]:
    """The two finetunes of one checkpoint (2-D grid and learning rate): without regularization and with
    `kl_pre` at `k.kl_coeff` on real replay; `name(setting)` each, `kw` for both."""
    return tuple((name(s), {"method": "kl_pre" if s == "kl" else "none", "coeff": k.kl_coeff, "max_tokens": k.finetune_max_tokens,
                            "target_loss": k.finetune_target, "replay_batch": k.replay_batch, **kw}) for s in SETTINGS)


def runs_one(k: Knobs, out: Path) -> list[RunSpec]:
    """One seed's runs: every (width, TPP) cell pretrained, then finetuned in both settings."""
    return C.sweep(k, out, (C.Pretrain(pre_name(d, t), d, {"tokens_per_param": t},
                                       setting_finetunes(k, lambda s, d=d, t=t: fine_name(d, t, s), lr=k.finetune_lr or None))
                            for d in k.widths for t in k.tpps))


def runs(k: Knobs, out: Path) -> list[RunSpec]:
    return repeat.runs(runs_one, k, out)


def summarize_one(k: Knobs, out: Path) -> dict:
    """One seed's summary."""
    dirs = framework.locate(runs_one(k, out), out)
    delta = {s: [[None] * len(k.tpps) for _ in k.widths] for s in SETTINGS}
    mult = {s: [[None] * len(k.tpps) for _ in k.widths] for s in SETTINGS}
    rows = []
    for i, d in enumerate(k.widths):
        for j, t in enumerate(k.tpps):
            pre_dir = dirs[pre_name(d, t)]
            tokens, losses = C.curve(framework.read_metrics(pre_dir))
            pre_loss = C.final(pre_dir).get("valid_ntp")
            for s in SETTINGS:
                done = C.final(dirs[fine_name(d, t, s)])
                old = done.get("prev_ntp")
                dl = None if old is None or pre_loss is None else old - pre_loss
                m = None if old is None or not tokens else C.nan_to_none(C.compute_multiplier(tokens, losses, old))
                delta[s][i][j], mult[s][i][j] = dl, m
                rows.append({"d_model": d, "tpp": t, "setting": s, "pretrain_loss": pre_loss, "old_loss": old,
                             "new_loss": done.get("valid_ntp"), "delta": dl, "multiplier": m,
                             "reached_target": C.reached(done, k.finetune_target)})
    return {"widths": list(k.widths), "tpps": list(k.tpps), "delta": delta, "multiplier": mult, "rows": rows,
            "finetune_target": k.finetune_target, "kl_coeff": k.kl_coeff}


def summarize(k: Knobs, out: Path) -> dict:
    return repeat.summarize(runs_one, summarize_one, k, out)


def plot(k: Knobs, out: Path, summary: dict) -> None:
    import numpy as np

    from forgetting.experiments import plotting

    reached = {(r["d_model"], r["tpp"], r["setting"]) for r in summary["rows"] if r["reached_target"]}
    cells = {(r["d_model"], r["tpp"], r["setting"]): r for r in summary["rows"]}
    fig, axes = plotting.subplots(2, 2, figsize=(10, 7.5))
    titles = {"none": "no regularization", "kl": f"KL (coeff {C.fmt(summary['kl_coeff'])})"}
    for r, (key, label, cmap) in enumerate((("delta", "Δ old-data loss (nats)", "magma_r"),
                                            ("multiplier", "compute multiplier", "viridis"))):
        vals = [v for s in SETTINGS for row in summary[key][s] for v in row if v is not None]
        lo, hi = (min(vals), max(vals)) if vals else (0, 1)
        if key == "multiplier":
            lo, hi = 0.0, 1.0
        for c, s in enumerate(SETTINGS):
            ax = axes[r][c]
            grid = np.array([[np.nan if v is None else v for v in row] for row in summary[key][s]], dtype=float)
            im = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi)
            for (a, b), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    red, green, blue, _ = im.cmap(im.norm(v))
                    cell = (summary["widths"][a], summary["tpps"][b], s)
                    star = "" if cell in reached else "*"
                    ci = cells.get(cell, {}).get(f"{key}_ci95")  # ± half of the 95% interval over seeds
                    spread = f"\n±{(ci['high'] - ci['low']) / 2:.2f}" if ci else ""
                    ax.text(b, a, f"{v:.2f}{star}{spread}", ha="center", va="center", fontsize=7,
                            color="k" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "w")
            ax.set_xticks(range(len(summary["tpps"])), [C.fmt(t) for t in summary["tpps"]], fontsize=8)
            ax.set_yticks(range(len(summary["widths"])), [str(d) for d in summary["widths"]], fontsize=8)
            ax.set_xlabel("pretraining tokens per parameter")
            ax.set_ylabel("width D")
            ax.set_title(f"{label}: {titles[s]}", fontsize=10)
            ax.grid(False)
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"finetuned to new-data loss {summary['finetune_target']} (*: target not reached within the cap)"
                 + plotting.seeds_note(summary).replace("bars", "±"),
                 fontsize=10)
    plotting.save(fig, Path(out) / "grid_2d")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
