"""High LR vs replay (claim 6): a low finetuning LR protects old data only at a large cost in steps;
replay at a high LR gets the same protection far cheaper.

One model is pretrained on the old data (`pretrain_tpp` tokens per parameter), then finetuned on the
new data until the new-data loss reaches `finetune_target` (capped at `finetune_max_tokens`) in two
families:

- lowered LR, no replay: every finetuning LR in `lowered_lrs`;
- high LR + replay: LR `high_lr` with the first ⌊f·B⌋ rows of each batch replaced by old-data rows
  (`--reg.method replace`) for every f in `replace_fracs` (f = 0 is plain finetuning at `high_lr`).

Figure: old-data loss after finetuning against the measured training time (`train_seconds`, log x),
one curve per family. `summary.json`: {"lowered_lr": [{lr, old_loss, new_loss, seconds, tokens,
reached_target}], "replay": [{fraction, ...}], "compute_ratio": {level, time_slow, time_fast, ratio}} —
ratio = time the lowered-LR family needs to reach the lowest old loss both families reach, over the
replay family's time (log-time interpolation along each family's frontier).
Paper: LR 1e-3 → 1e-7 vs fraction 0 → 0.125 at 1e-3; replay reaches ≈3.37 vs ≈3.63 at ≈38× less time.

Time axis: `train_seconds`, the training time of the run as the authors measure it (`log.measure_time`):
the first 5 steps of the process (compilation) are left out; unlike theirs, batch assembly counts (for
`replace` that is reading the replaced old rows; self-generated replay sampling would count too).

`--scale paper` is the authors' released sweeps (experiments/high_lr lr.yaml and rep.yaml): one model
pretrained on English (their checkpoint's config is not released: here D=256, L=6 at 1000 TPP, or pass
`--start_from DIR` with their checkpoint), finetuned on Spanish until new-data loss 3.3 (evaluated every
1M tokens) at constant LR ∈ 17 values 1e-7 … 1e-3 (4 per decade) without replay, and at LR 1e-3 with
`replace` fractions {0, 1/256 (twice), 1/128, …, 1/2}. Their 3.3 (NLL sum over T-1 positions / T) is
3.3·256/255 = 3.3129 here. They cap no run; here finetuning stops at 5B tokens.

    python -m forgetting.experiments.high_lr                     # mini: synthetic languages, ≈1.5 min on 2 cores
    python -m forgetting.experiments.high_lr --scale paper --old_path c4_en.bin --new_path c4_es.bin
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
    """Knobs of the high-LR-vs-replay figure (shared data/model/optimizer knobs first)."""

    d_model: int = 16  # the one model width D
    pretrain_tpp: float = 1000.0  # pretraining tokens per parameter
    high_lr: float = 3e-3  # finetuning LR of the replay family (and the top of the lowered family)
    lowered_lrs: tuple[float, ...] = (3e-3, 1e-3, 3e-4, 1e-4)  # finetuning LRs of the no-replay family
    replace_fracs: tuple[float, ...] = (0.0, 0.0625, 0.125, 0.25, 0.5)  # replaced fraction of each batch at high_lr
    finetune_target: float = 1.6  # finetuning stops once new-data valid loss <= this
    finetune_max_tokens: int = 4_000_000  # cap on finetuning tokens (the lowest LRs need many steps)
    start_from: str = ""  # finetune this finished run / authors' checkpoint directory instead of pretraining one

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        "d_model": (framework.positive,), "pretrain_tpp": (framework.positive,), "high_lr": (framework.positive,),
        "finetune_target": (framework.positive,), "finetune_max_tokens": (framework.positive,),
        "lowered_lrs": (framework.nonempty, framework.positive),
        "replace_fracs": (framework.nonempty, framework.fraction),
    }


_PAPER_LRS = (1e-7, 1.78e-7, 3.16e-7, 5.62e-7, 1e-6, 1.78e-6, 3.16e-6, 5.62e-6, 1e-5, 1.78e-5, 3.16e-5, 5.62e-5,
              1e-4, 1.78e-4, 3.16e-4, 5.62e-4, 1e-3)  # 4 per decade
PRESETS = {
    "mini": Knobs(),
    # The authors' experiments/high_lr sweeps (lr.yaml and rep.yaml; 1/256 is run twice, as theirs).
    "paper": Knobs(seeds=1, d_model=256, n_layers=6, head_dim=64, seq_len=256, vocab_size=4096, dtype="bfloat16",
                   batch_size=256, lr=1e-3, warmup_steps=C.AUTHORS_WARMUP_STEPS, valid_tokens=C.AUTHORS_VALID_TOKENS,
                   pretrain_eval_tokens=C.DEFAULT_EVAL_TOKENS, finetune_eval_tokens=C.TARGET_EVAL_TOKENS,
                   pretrain_tpp=1000.0, high_lr=1e-3, lowered_lrs=_PAPER_LRS,
                   replace_fracs=(0.0, 1 / 256, 1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2),
                   finetune_target=C.authors_loss(3.3, 256), finetune_max_tokens=5_000_000_000),
}


def lr_name(lr: float) -> str:
    return f"ft-lr{C.fmt(lr)}"


def frac_name(f: float) -> str:
    return f"ft-replace{C.fmt(f)}"


def frac_names(fracs: tuple[float, ...]) -> list[str]:
    """Run names of the replay family in order; a repeated fraction is a repeated run (the authors run 1/256
    twice: same config, separate timing) and gets `-r2`, `-r3`, … (the name is part of the run directory)."""
    names, seen = [], {}
    for f in fracs:
        seen[f] = seen.get(f, 0) + 1
        names.append(frac_name(f) + (f"-r{seen[f]}" if seen[f] > 1 else ""))
    return names


def runs_one(k: Knobs, out: Path) -> list[RunSpec]:
    """One seed's runs (`k.seed`)."""
    specs, paths, after = C.data_specs(k, out)
    pre = C.pretrain_config(k, out, paths, k.d_model, name="pretrain", tokens_per_param=k.pretrain_tpp)
    dep: tuple[str, ...] = ()
    if not k.start_from:
        specs.append(RunSpec("pretrain", pre, module=C.TRAIN, after=after))
        dep = ("pretrain",)

    def fine(name: str, **kw) -> RunSpec:
        cfg = C.finetune_config(k, pre, paths, name=name, max_tokens=k.finetune_max_tokens,
                                target_loss=k.finetune_target, **kw)
        if k.start_from:
            cfg = C.replace(cfg, **{"model.load_path": k.start_from})
        return RunSpec(name, cfg, module=C.TRAIN, after=dep or after)

    for lr in k.lowered_lrs:
        specs.append(fine(lr_name(lr), lr=lr))
    for f, name in zip(k.replace_fracs, frac_names(k.replace_fracs)):
        if f > 0:
            specs.append(fine(name, lr=k.high_lr, method="replace", coeff=f))
        elif k.high_lr not in k.lowered_lrs:
            specs.append(fine(lr_name(k.high_lr), lr=k.high_lr))
    return specs


def _point(done: dict, target: float) -> dict:
    return {"old_loss": done.get("prev_ntp"), "new_loss": done.get("valid_ntp"), "seconds": done.get("train_seconds"),
            "tokens": done.get("tokens"), "reached_target": C.reached(done, target)}


def family_points(rows: list[dict]) -> list[tuple[float, float]]:
    """(seconds, old loss) of a family's runs that reached the target (all finished runs if none did)."""
    ok = [r for r in rows if r["reached_target"] and r["old_loss"] is not None and r["seconds"] is not None]
    pool = ok or [r for r in rows if r["old_loss"] is not None and r["seconds"] is not None]
    return [(r["seconds"], r["old_loss"]) for r in pool]


def summarize_one(k: Knobs, out: Path) -> dict:
    """One seed's summary."""
    dirs = framework.locate(runs_one(k, out), out)
    low = [{"lr": lr, **_point(C.final(dirs[lr_name(lr)]), k.finetune_target)} for lr in k.lowered_lrs]
    rep = [{"fraction": f, **_point(C.final(dirs[name if f > 0 else lr_name(k.high_lr)]), k.finetune_target)}
           for f, name in zip(k.replace_fracs, frac_names(k.replace_fracs))]
    ratio = C.compute_ratio_at_equal_loss(family_points(low), family_points(rep))
    pre = C.final(dirs["pretrain"]) if "pretrain" in dirs else {}
    return {"lowered_lr": low, "replay": rep, "compute_ratio": ratio, "pretrain_loss": pre.get("valid_ntp"),
            "high_lr": k.high_lr, "finetune_target": k.finetune_target}


def runs(k: Knobs, out: Path) -> list[RunSpec]:
    return repeat.runs(runs_one, k, out)


def summarize(k: Knobs, out: Path) -> dict:
    return repeat.summarize(runs_one, summarize_one, k, out)


def plot(k: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    fig, ax = plotting.subplots(figsize=(6.5, 4.2))
    for key, lab, label in (("lowered_lr", "lr", "lowered LR, no replay"),
                            ("replay", "fraction", f"LR {C.fmt(summary['high_lr'])} + replaced fraction")):
        pts = [p for p in summary[key] if p["old_loss"] is not None and p["seconds"] is not None]
        plotting.errorbar(ax, [p["seconds"] for p in pts], pts, "old_loss", "o-", x_key="seconds", label=label)
        for p in pts:
            if key == "replay" and p["fraction"] == 0:
                continue  # the same run as the lowered family's first point (plain finetuning at high_lr)
            ax.annotate(C.fmt(p[lab]), (p["seconds"], p["old_loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if not p["reached_target"]:
                ax.plot(p["seconds"], p["old_loss"], "kx", ms=8)
    if summary.get("pretrain_loss") is not None:
        ax.axhline(summary["pretrain_loss"], color="gray", ls="--", lw=0.8, label="before finetuning")
    r = summary["compute_ratio"]
    if r.get("ratio"):
        ax.axhline(r["level"], color="k", lw=0.5, ls=":")
        ax.set_title(f"equal old loss {r['level']:.3f}: lowered LR needs {r['ratio']:.1f}× the time", fontsize=10)
    ax.set_xscale("log")
    ax.set_xlabel("finetuning time to target (s, measured; ×: target not reached)")
    ax.set_ylabel("old-data loss after finetuning (nats)")
    ax.legend(fontsize=8)
    plotting.save(fig, Path(out) / "high_lr")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
