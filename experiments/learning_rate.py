"""Learning rate (claim 5): a high pretraining LR and a low finetuning LR both reduce forgetting.

One width is pretrained on the old data for `pretrain_tpp` tokens per parameter at every LR in
`pretrain_lrs`; each checkpoint is finetuned on the new data at every LR in `finetune_lrs` until the
new-data loss reaches `finetune_target` (capped at `finetune_max_tokens`), without regularization and
with the KL penalty on real old-data replay (`kl_coeff`).

Figure: (left, middle) old-data loss after finetuning against the finetuning LR, one line per
pretraining LR, without / with KL; (right) finetuning LR × steps to the target against the finetuning
LR (flat = steps ∝ 1/LR). `summary.json`: {"rows": [{pretrain_lr, finetune_lr, setting, pretrain_loss,
old_loss, new_loss, steps_to_target, lr_x_steps, reached_target}], ...}.
Paper: 6 pretraining × 7 finetuning LRs; higher pretraining LR and lower finetuning LR forget less;
steps to target ≈ ∝ 1/LR.

`--scale paper` is the authors' released sweep (experiments/learning_rate): D=256, L=6 pretrained at
constant LR ∈ {2.15e-4, 4.64e-4, 1e-3, 2.15e-3, 4.64e-3, 1e-2}, each until old-data loss 3.2; every
checkpoint finetuned at constant LR ∈ {1e-6, 3.16e-6, 1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3} until new-data
loss 3.2, without regularization and with `kl_pre` coeff 10 on real replay of 256 rows; evaluations every
1M tokens (they stop on a target). Their 3.2 (NLL sum over T-1 positions / T) is 3.2·256/255 = 3.2125
here. They cap neither run; here pretraining stops at 20B tokens and finetuning at 2B.

    python -m forgetting.experiments.learning_rate               # mini: synthetic languages, ≈8 min on 2 cores
    python -m forgetting.experiments.learning_rate --scale paper --old_path c4_en.bin --new_path c4_es.bin
"""
from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass
from pathlib import Path

from forgetting.experiments import common_lm as C
from forgetting.experiments import framework, repeat
from forgetting.experiments import grid_2d as G
from forgetting.experiments.framework import RunSpec

SETTINGS = G.SETTINGS


@dataclass(frozen=True)
class Knobs(C.EndPointKnobs):
    """Knobs of the learning-rate figure (shared data/model/optimizer knobs first; `lr` is unused)."""

    d_model: int = 16  # the one model width D
    pretrain_tpp: float = 300.0  # pretraining tokens per parameter (when pretrain_target is 0)
    pretrain_target: float = 0.0  # >0: pretrain every LR until old-data valid loss <= this instead of a TPP
    pretrain_max_tokens: int = 0  # cap on pretraining tokens with pretrain_target
    pretrain_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)  # pretraining peak LRs
    finetune_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)  # finetuning peak LRs
    finetune_target: float = 1.6  # finetuning stops once new-data valid loss <= this
    finetune_max_tokens: int = 3_000_000  # cap on finetuning tokens (low LRs need many steps)
    kl_coeff: float = 10.0  # coefficient of the KL penalty in the `kl` setting
    replay_batch: int = 32  # real old-data replay rows per step for the KL term

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        "d_model": (framework.positive,), "pretrain_tpp": (framework.positive,),
        "finetune_target": (framework.positive,), "finetune_max_tokens": (framework.positive,),
        "replay_batch": (framework.positive,), "pretrain_target": (framework.nonnegative,),
        "pretrain_max_tokens": (framework.nonnegative,), "kl_coeff": (framework.nonnegative,),
        "pretrain_lrs": (framework.nonempty, framework.positive),
        "finetune_lrs": (framework.nonempty, framework.positive),
    }


PRESETS = {
    "mini": Knobs(),
    # The authors' experiments/learning_rate sweep: every pretraining LR to their loss 3.2, finetuning to 3.2.
    "paper": Knobs(seeds=1, d_model=256, n_layers=6, head_dim=64, seq_len=256, vocab_size=4096, dtype="bfloat16",
                   batch_size=256, warmup_steps=C.AUTHORS_WARMUP_STEPS, valid_tokens=C.AUTHORS_VALID_TOKENS,
                   pretrain_eval_tokens=C.TARGET_EVAL_TOKENS, finetune_eval_tokens=C.TARGET_EVAL_TOKENS,
                   pretrain_target=C.authors_loss(3.2, 256), pretrain_max_tokens=20_000_000_000,
                   pretrain_lrs=(2.15e-4, 4.64e-4, 1e-3, 2.15e-3, 4.64e-3, 1e-2),
                   finetune_lrs=(1e-6, 3.16e-6, 1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3),
                   finetune_target=C.authors_loss(3.2, 256), finetune_max_tokens=2_000_000_000, kl_coeff=10.0,
                   replay_batch=256),
}


def pre_name(lr: float) -> str:
    return f"pre-lr{C.fmt(lr)}"


def fine_name(plr: float, flr: float, s: str) -> str:
    return f"ft-plr{C.fmt(plr)}-flr{C.fmt(flr)}-{s}"


def runs_one(k: Knobs, out: Path) -> list[RunSpec]:
    """One seed's runs: a pretraining per LR, each finetuned at every finetuning LR in both settings."""
    length = ({"max_tokens": k.pretrain_max_tokens, "target_loss": k.pretrain_target} if k.pretrain_target
              else {"tokens_per_param": k.pretrain_tpp})
    return C.sweep(k, out, (C.Pretrain(pre_name(plr), k.d_model, {**length, "lr": plr},
                                       tuple(f for flr in k.finetune_lrs for f in G.setting_finetunes(
                                           k, lambda s, plr=plr, flr=flr: fine_name(plr, flr, s), lr=flr, evals=2 * k.evals)))
                            for plr in k.pretrain_lrs))


def runs(k: Knobs, out: Path) -> list[RunSpec]:
    return repeat.runs(runs_one, k, out)


def summarize_one(k: Knobs, out: Path) -> dict:
    """One seed's summary."""
    dirs = framework.locate(runs_one(k, out), out)
    rows = []
    for plr in k.pretrain_lrs:
        pre_loss = C.final(dirs[pre_name(plr)]).get("valid_ntp")
        for flr in k.finetune_lrs:
            for s in SETTINGS:
                path = dirs[fine_name(plr, flr, s)]
                done = C.final(path)
                steps = C.steps_to_target(framework.read_metrics(path), k.finetune_target)
                rows.append({"pretrain_lr": plr, "finetune_lr": flr, "setting": s, "pretrain_loss": pre_loss,
                             "old_loss": done.get("prev_ntp"), "new_loss": done.get("valid_ntp"),
                             "steps_to_target": steps, "lr_x_steps": None if steps is None else flr * steps,
                             "reached_target": steps is not None})
    return {"rows": rows, "d_model": k.d_model, "pretrain_tpp": k.pretrain_tpp, "finetune_target": k.finetune_target}


def summarize(k: Knobs, out: Path) -> dict:
    return repeat.summarize(runs_one, summarize_one, k, out)


def plot(k: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    rows = summary["rows"]
    fig, axes = plotting.subplots(1, 3, figsize=(14, 3.8))
    for plr in k.pretrain_lrs:
        for ax, s in zip(axes[:2], SETTINGS):
            rs = [r for r in rows if r["pretrain_lr"] == plr and r["setting"] == s and r["old_loss"] is not None]
            plotting.errorbar(ax, [r["finetune_lr"] for r in rs], rs, "old_loss", "o-", label=f"pretrain LR {C.fmt(plr)}")
            hit = [r for r in rs if not r["reached_target"]]
            ax.plot([r["finetune_lr"] for r in hit], [r["old_loss"] for r in hit], "kx", ms=8)
            ax.set_title("no regularization" if s == "none" else "KL", fontsize=10)
        rs = [r for r in rows if r["pretrain_lr"] == plr and r["setting"] == "none" and r["lr_x_steps"] is not None]
        plotting.errorbar(axes[2], [r["finetune_lr"] for r in rs], rs, "lr_x_steps", "o-", label=f"pretrain LR {C.fmt(plr)}")
    for ax in axes:
        plotting.log_ticks(ax, k.finetune_lrs, C.fmt)
        ax.set_xlabel("finetuning LR")
    axes[0].set_ylabel("old-data loss after finetuning (×: target not reached)")
    axes[2].set_ylabel("LR × steps to target (no reg.)")
    axes[2].set_ylim(bottom=0)  # flat line = steps ∝ 1/LR
    axes[0].legend(fontsize=8)
    fig.suptitle(f"D={summary['d_model']}, finetuned to {summary['finetune_target']}" + plotting.seeds_note(summary),
                 fontsize=10)
    plotting.save(fig, Path(out) / "learning_rate")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
