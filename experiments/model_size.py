"""Model size (claim 4): small models trained to saturation forget more; forgetting shrinks as width grows.

Every width D in `widths` is pretrained on the old data until its validation loss reaches
`pretrain_target` (capped at `pretrain_max_tokens`), so all sizes start from the same old-data loss.
Each is then finetuned on the new data until the new-data loss reaches `finetune_target` (capped at
`finetune_max_tokens`) with the KL penalty on real old-data replay (`--reg.method kl_pre`) at every
coefficient in `kl_coeffs` (0 = plain finetuning). Per size the figure reports the best old-data loss
after finetuning over the coefficients, among runs that reached the new-data target (all runs if none
did): the least forgetting that size can afford while learning the new data.

Figure: best old-data loss after finetuning (and its increase over the pretrained loss) against the
parameter count 12·L·D² + D·V. `summary.json`: {"rows": [{d_model, params, pretrain_loss, best_old_loss,
forgetting, best_coeff, reached_target, per_coeff: {...}}], "pretrain_target", "finetune_target"}.
Paper (L=6, D 256..768, C4-en → C4-es, pretrain to 3.0, finetune to 2.76): 6M ≈3.26 (+0.26) … 46M ≈3.005.

`--scale paper` is the authors' released sweep (experiments/model_size): D ∈ {256, 384, 512, 640, 768}, L=6,
pretrained at constant LR 1e-3 until valid loss 3.0, evaluated every 1M tokens; each finetuned on the new
data with `kl_pre` on real replay of 256 rows (a full batch, their default) at coefficients 0.01 … 10, LR
3e-4 with cosine decay over a 10-epoch cap, until new-data loss 2.76 (evaluated every 1M tokens); 10M
validation tokens, 10M warm-up tokens. Conversions: the authors' loss is the NLL summed over the T-1
predicted positions divided by T, this project's the mean over those positions, so their targets x are
x·256/255 here (3.0 -> 3.0118, 2.76 -> 2.7708). Their pretraining has no length cap; here it stops at
20B tokens. Their evals fall at the first step past each 1M tokens; here every round(1M / 65536) = 15
steps (983K tokens).

    python -m forgetting.experiments.model_size                 # mini: synthetic languages, ≈6 min on 2 cores
    python -m forgetting.experiments.model_size --scale paper --old_path c4_en.bin --new_path c4_es.bin
"""
from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass
from pathlib import Path

from forgetting.experiments import common_lm as C
from forgetting.experiments import framework, repeat
from forgetting.experiments.framework import RunSpec


@dataclass(frozen=True)
class Knobs(C.EndPointKnobs):
    """Knobs of the model-size figure (shared data/model/optimizer knobs first)."""

    widths: tuple[int, ...] = (8, 12, 16, 32, 64)  # model widths D swept (D=8 saturates near 1.58 nats, D=64 near 1.39)
    pretrain_target: float = 1.6  # every size is pretrained until old-data valid loss <= this
    pretrain_max_tokens: int = 5_000_000  # cap on pretraining tokens (a size that cannot reach the target stops here)
    finetune_target: float = 1.7  # finetuning stops once new-data valid loss <= this
    finetune_max_tokens: int = 3_000_000  # cap on finetuning tokens
    finetune_max_epochs: float = 0.0  # >0: cap finetuning at this many epochs of the new data instead
    finetune_lr: float = 0.0  # finetuning peak LR (0 = `lr`)
    kl_coeffs: tuple[float, ...] = (0.0, 0.3, 1.0, 3.0, 10.0, 100.0)  # KL coefficients swept (0 = no regularization)
    replay_batch: int = 32  # real old-data replay rows per step for the KL term

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        "pretrain_target": (framework.positive,), "pretrain_max_tokens": (framework.positive,),
        "finetune_target": (framework.positive,), "finetune_max_tokens": (framework.positive,),
        "replay_batch": (framework.positive,), "finetune_max_epochs": (framework.nonnegative,),
        "finetune_lr": (framework.nonnegative,), "widths": (framework.nonempty, framework.positive),
        "kl_coeffs": (framework.nonempty, framework.nonnegative),
    }


PRESETS = {
    "mini": Knobs(),
    # The authors' experiments/model_size sweep: pretrain (constant LR 1e-3) to their loss 3.0, finetune with
    # kl_pre on real replay of a full batch (256 rows) at LR 3e-4, cosine over 10 epochs, to their 2.76.
    "paper": Knobs(seeds=1, widths=(256, 384, 512, 640, 768), n_layers=6, head_dim=64, seq_len=256,
                   vocab_size=4096, dtype="bfloat16",
                   batch_size=256, lr=1e-3, warmup_steps=C.AUTHORS_WARMUP_STEPS,
                   valid_tokens=C.AUTHORS_VALID_TOKENS, pretrain_eval_tokens=C.TARGET_EVAL_TOKENS,
                   finetune_eval_tokens=C.TARGET_EVAL_TOKENS, finetune_lr_decay="cosine",
                   pretrain_target=C.authors_loss(3.0, 256), pretrain_max_tokens=20_000_000_000,
                   finetune_target=C.authors_loss(2.76, 256), finetune_max_tokens=2_000_000_000,
                   finetune_max_epochs=10.0, finetune_lr=3e-4,
                   kl_coeffs=(0.01, 0.022, 0.046, 0.1, 0.22, 0.46, 1.0, 2.2, 4.6, 10.0), replay_batch=256),
}


def pre_name(d: int) -> str:
    return f"pre-d{d}"


def fine_name(d: int, c: float) -> str:
    return f"ft-d{d}-kl{C.fmt(c)}"


def finetunes(k: Knobs, coeffs: tuple[float, ...], name) -> tuple[tuple[str, dict], ...]:
    """The KL-coefficient finetunes of one checkpoint (model size and pretraining length): `name(c)` each."""
    return tuple((name(c), C.kl_or_plain(c, max_tokens=k.finetune_max_tokens, target_loss=k.finetune_target,
                                         replay_batch=k.replay_batch, max_epochs=k.finetune_max_epochs,
                                         lr=k.finetune_lr or None)) for c in coeffs)


def runs_one(k: Knobs, out: Path) -> list[RunSpec]:
    """One seed's runs: every width pretrained to the target, then finetuned at every KL coefficient."""
    return C.sweep(k, out, (C.Pretrain(pre_name(d), d, {"max_tokens": k.pretrain_max_tokens, "target_loss": k.pretrain_target},
                                       finetunes(k, k.kl_coeffs, lambda c, d=d: fine_name(d, c)))
                            for d in k.widths))


def runs(k: Knobs, out: Path) -> list[RunSpec]:
    return repeat.runs(runs_one, k, out)


def best_over(per_coeff: dict, target: float) -> tuple[float | None, str | None, bool]:
    """(best old loss, its coefficient, whether it reached the target) over {coeff: done-row}."""
    ok = {c: r for c, r in per_coeff.items() if C.reached(r, target)}
    pool = ok or {c: r for c, r in per_coeff.items() if r}
    if not pool:
        return None, None, False
    c = min(pool, key=lambda c: pool[c]["prev_ntp"])
    return pool[c]["prev_ntp"], c, bool(ok)


def coeff_row(k: Knobs, pre: dict, per: dict) -> dict:
    """The summary row of one checkpoint (`pre`: its final metrics) from its finetunes ({coeff text: final
    metrics}): the best old loss over coefficients among runs that reached the target (all if none did)."""
    best, coeff, ok = best_over(per, k.finetune_target)
    pre_loss = pre.get("valid_ntp")
    return {"pretrain_loss": pre_loss, "pretrain_tokens": pre.get("tokens"), "best_old_loss": best,
            "forgetting": None if best is None or pre_loss is None else best - pre_loss,
            "best_coeff": coeff, "reached_target": ok,
            "per_coeff": {c: {"old_loss": r.get("prev_ntp"), "new_loss": r.get("valid_ntp"),
                              "tokens": r.get("tokens"), "reached": C.reached(r, k.finetune_target)}
                          for c, r in per.items()}}


def summarize_one(k: Knobs, out: Path) -> dict:
    """One seed's summary."""
    dirs = framework.locate(runs_one(k, out), out)
    rows = []
    for d in k.widths:
        pre = C.final(dirs[pre_name(d)])
        row = coeff_row(k, pre, {C.fmt(c): C.final(dirs[fine_name(d, c)]) for c in k.kl_coeffs})
        rows.append({"d_model": d, "params": C.paper_params(k, d), **row,
                     "pretrain_reached": C.reached(pre, k.pretrain_target)})
    return {"rows": rows, "pretrain_target": k.pretrain_target, "finetune_target": k.finetune_target}


def summarize(k: Knobs, out: Path) -> dict:
    return repeat.summarize(runs_one, summarize_one, k, out)


def plot(k: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    rows = [r for r in summary["rows"] if r["best_old_loss"] is not None]
    fig, axes = plotting.subplots(1, 2, figsize=(10, 3.8))
    x = [r["params"] for r in rows]
    plotting.errorbar(axes[0], x, rows, "best_old_loss", "o-", label="best over KL coefficients")
    plotting.errorbar(axes[0], x, rows, "pretrain_loss", "s--", color="gray", label="before finetuning")
    # plain finetuning forgets by nats: keep the axis on the best runs and name the coefficients above it
    kept = [r["best_old_loss"] for r in rows] + [r["pretrain_loss"] for r in rows if r["pretrain_loss"] is not None]
    lo, hi = min(kept), max(kept)
    top = hi + max(0.15, 0.5 * (hi - lo))
    axes[0].set_ylim(lo - 0.05, top)
    for c in (C.fmt(v) for v in k.kl_coeffs):
        pts = [(xx, r["per_coeff"][c]) for xx, r in zip(x, rows) if r["per_coeff"][c]["old_loss"] is not None]
        above = bool(pts) and all(p["old_loss"] > top for _, p in pts)
        line = axes[0].plot([], [], ".", alpha=0.6, label=f"KL coeff {c}" + (" (above the axis)" if above else ""))[0]
        for xx, p in pts:
            axes[0].plot(xx, p["old_loss"], "." if p["reached"] else "x", color=line.get_color(), alpha=0.6)
    axes[0].set_ylabel("old-data loss after finetuning (nats)\n(x: new-data target not reached)")
    plotting.errorbar(axes[1], x, rows, "forgetting", "o-")
    axes[1].axhline(0, color="gray", lw=0.8)
    axes[1].set_ylabel("forgetting: Δ old-data loss (nats)")
    labels = {r["params"]: f"D={r['d_model']}\n{r['params'] / 1000:.3g}K" for r in rows}
    for ax in axes:
        plotting.log_ticks(ax, x, lambda v: labels[int(v)])
        ax.set_xlabel("parameters (12·L·D² + D·V)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"pretrained to {summary['pretrain_target']}, finetuned to {summary['finetune_target']} on new data"
                 + plotting.seeds_note(summary))
    plotting.save(fig, Path(out) / "model_size")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
