"""Pretraining length (claim 4): the longer a fixed-size model is pretrained, the more it forgets.

One width `d_model` is pretrained on the old data for every tokens-per-parameter value in `tpps`
(TPP = tokens / (12·L·D² + D·V); ≥ 2 decades), then each checkpoint is finetuned on the new data until
the new-data loss reaches `finetune_target` (capped at `finetune_max_tokens`) with the KL penalty on
real old-data replay at every coefficient in `kl_coeffs` (0 = plain finetuning). Forgetting = the best
old-data loss after finetuning (over coefficients, among runs that reached the target) minus the
pretrained model's old-data loss.

Figure: old-data loss before/after finetuning and the forgetting against TPP (log x).
`summary.json`: {"rows": [{tpp, pretrain_tokens, pretrain_loss, best_old_loss, forgetting, best_coeff,
reached_target, per_coeff}], "d_model", "finetune_target"}.
Paper (6M model, C4-en → C4-es, TPP 10 … 10000): forgetting ≈0 up to TPP 31.6, growing to ≈+0.18.

Pretraining uses cosine decay to 0 at the end of every run (both presets), as the paper's.
`--scale paper` is the authors' released sweep (experiments/pretrain_length): D=256, L=6 pretrained with
cosine decay at TPP ∈ {10, 31.6, 100, 316, 1000, 3162, 10000} (evaluated every 10M tokens, their
default), each finetuned with `kl_pre` on real replay of 256 rows at coefficients 0.01 … 10, LR 1e-3 with
cosine decay over a 10-epoch cap, until new-data loss 2.9 (evaluated every 1M tokens). Their loss is the
NLL sum over T-1 positions / T; this project's the mean over T-1, so their 2.9 is 2.9·256/255 = 2.9114 here.

    python -m forgetting.experiments.pretrain_length             # mini: synthetic languages, ≈9 min on 2 cores
    python -m forgetting.experiments.pretrain_length --scale paper --old_path c4_en.bin --new_path c4_es.bin
"""
from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass
from pathlib import Path

from forgetting.experiments import common_lm as C
from forgetting.experiments import framework, repeat
from forgetting.experiments.framework import RunSpec
from forgetting.experiments import model_size as MS


@dataclass(frozen=True)
class Knobs(C.EndPointKnobs):
    """Knobs of the pretraining-length figure (shared data/model/optimizer knobs first)."""

    d_model: int = 8  # the one model width D (small: it saturates near 1.58 nats, 1.75 on a 50/50 mixture)
    tpps: tuple[float, ...] = (10.0, 31.6, 100.0, 316.0, 1000.0, 3160.0, 10000.0)  # tokens per parameter of pretraining
    finetune_target: float = 1.85  # finetuning stops once new-data valid loss <= this
    finetune_max_tokens: int = 3_000_000  # cap on finetuning tokens
    finetune_max_epochs: float = 0.0  # >0: cap finetuning at this many epochs of the new data instead
    finetune_lr: float = 0.0  # finetuning peak LR (0 = `lr`)
    kl_coeffs: tuple[float, ...] = (0.0, 0.3, 1.0, 2.0, 3.0, 5.0)  # KL coefficients swept (0 = no regularization; D=8 reaches the target up to ≈3)
    replay_batch: int = 32  # real old-data replay rows per step for the KL term

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        "d_model": (framework.positive,), "finetune_target": (framework.positive,),
        "finetune_max_tokens": (framework.positive,), "replay_batch": (framework.positive,),
        "finetune_max_epochs": (framework.nonnegative,), "finetune_lr": (framework.nonnegative,),
        "tpps": (framework.nonempty, framework.positive), "kl_coeffs": (framework.nonempty, framework.nonnegative),
    }


PRESETS = {
    # Cosine pretraining (the paper's): every TPP is a finished schedule, not a checkpoint of a longer run.
    "mini": Knobs(pretrain_lr_decay="cosine"),
    # The authors' experiments/pretrain_length sweep.
    "paper": Knobs(seeds=1, d_model=256, n_layers=6, head_dim=64, seq_len=256, vocab_size=4096, dtype="bfloat16",
                   batch_size=256, lr=1e-3, warmup_steps=C.AUTHORS_WARMUP_STEPS, valid_tokens=C.AUTHORS_VALID_TOKENS,
                   pretrain_lr_decay="cosine", finetune_lr_decay="cosine",
                   pretrain_eval_tokens=C.DEFAULT_EVAL_TOKENS, finetune_eval_tokens=C.TARGET_EVAL_TOKENS,
                   tpps=(10.0, 31.6, 100.0, 316.0, 1000.0, 3162.0, 10000.0), finetune_target=C.authors_loss(2.9, 256),
                   finetune_max_tokens=2_000_000_000, finetune_max_epochs=10.0, finetune_lr=1e-3,
                   kl_coeffs=(0.01, 0.032, 0.1, 0.32, 1.0, 3.2, 10.0), replay_batch=256),
}


def pre_name(t: float) -> str:
    return f"pre-tpp{C.fmt(t)}"


def fine_name(t: float, c: float) -> str:
    return f"ft-tpp{C.fmt(t)}-kl{C.fmt(c)}"


def runs_one(k: Knobs, out: Path) -> list[RunSpec]:
    """One seed's runs: a cosine pretraining per TPP, each finetuned at every KL coefficient."""
    return C.sweep(k, out, (C.Pretrain(pre_name(t), k.d_model, {"tokens_per_param": t},
                                       MS.finetunes(k, k.kl_coeffs, lambda c, t=t: fine_name(t, c)))
                            for t in k.tpps))


def runs(k: Knobs, out: Path) -> list[RunSpec]:
    return repeat.runs(runs_one, k, out)


def summarize_one(k: Knobs, out: Path) -> dict:
    """One seed's summary."""
    dirs = framework.locate(runs_one(k, out), out)
    rows = [{"tpp": t, **MS.coeff_row(k, C.final(dirs[pre_name(t)]),
                                     {C.fmt(c): C.final(dirs[fine_name(t, c)]) for c in k.kl_coeffs})}
            for t in k.tpps]
    return {"rows": rows, "d_model": k.d_model, "params": C.paper_params(k, k.d_model),
            "finetune_target": k.finetune_target}


def summarize(k: Knobs, out: Path) -> dict:
    return repeat.summarize(runs_one, summarize_one, k, out)


def plot(k: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    rows = [r for r in summary["rows"] if r["best_old_loss"] is not None]
    x = [r["tpp"] for r in rows]
    fig, axes = plotting.subplots(1, 2, figsize=(10, 3.8))
    plotting.errorbar(axes[0], x, rows, "pretrain_loss", "s--", color="gray", label="after pretraining")
    plotting.errorbar(axes[0], x, rows, "best_old_loss", "o-", label="after finetuning (best KL coeff)")
    axes[0].set_ylabel("old-data loss (nats)")
    axes[0].legend(fontsize=8)
    plotting.errorbar(axes[1], x, rows, "forgetting", "o-")
    axes[1].axhline(0, color="gray", lw=0.8)
    axes[1].set_ylabel("forgetting: Δ old-data loss (nats)")
    for ax in axes:
        plotting.log_ticks(ax, x, C.fmt)
        ax.set_xlabel("pretraining tokens per parameter")
    fig.suptitle(f"D={summary['d_model']} ({summary['params']:,} params), finetuned to {summary['finetune_target']}"
                 + plotting.seeds_note(summary))
    plotting.save(fig, Path(out) / "pretrain_length")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
