"""Capacity slices (the paper's second headline result): the model-size and pretraining-length results
side by side. A model forgets more the closer it is to its capacity, whether it gets there by being
small or by being trained long.

Left: against model size (the model-size figure's runs), the pretraining loss and the best old-data loss
after finetuning (the lowest `prev_ntp` over its KL coefficients among the finetunes that reached the
new-data target; all finetunes if none did). Right: the same against pretraining tokens per parameter
(the pretraining-length figure's runs). The gap between the two curves is the forgetting.

It runs nothing of its own: its runs are exactly the runs of `model_size` and `pretrain_length` with
the same knobs (run directories are named by config hash, so finished ones are reused). To reuse the
runs of those figures, give all three the same `--out`:

    python -m forgetting.experiments.model_size --out out/capacity
    python -m forgetting.experiments.pretrain_length --out out/capacity
    python -m forgetting.experiments.capacity_slices --out out/capacity       # plots at once

Run alone it runs both sweeps. `--scale paper` combines the two paper presets (the authors' sweeps);
`--old_path/--new_path` set the data of both. Knobs of either sweep: `--model_size.<knob>`,
`--pretrain_length.<knob>` (seeds too: `--model_size.seeds 3`; each sweep's summary is merged over its
seeds and every number keeps its `<key>_ci95` 95% t interval).

`summary.json`: {"model_size": [{d_model, params, pretrain_loss, best_old_loss, forgetting, reached_target}],
"pretrain_length": [{tpp, pretrain_loss, best_old_loss, forgetting, reached_target}], ...}.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from forgetting.experiments import common_lm as C
from forgetting.experiments import framework, stats
from forgetting.experiments import model_size as MS
from forgetting.experiments import pretrain_length as PL
from forgetting.experiments.framework import RunSpec


@dataclass(frozen=True)
class Knobs:
    """Knobs of the capacity slices: the two sweeps' knobs, and their data in one place."""

    old_path: str = ""  # old data .bin of both sweeps (empty: each sweep's own setting)
    new_path: str = ""  # new data .bin of both sweeps (empty: each sweep's own setting)
    model_size: MS.Knobs = field(default_factory=MS.Knobs)  # the model-size sweep
    pretrain_length: PL.Knobs = field(default_factory=PL.Knobs)  # the pretraining-length sweep

    def sweeps(self) -> tuple[MS.Knobs, PL.Knobs]:
        """The two sweeps' knobs with the shared data paths applied."""
        data = {k: v for k, v in (("old_path", self.old_path), ("new_path", self.new_path)) if v}
        return dataclasses.replace(self.model_size, **data), dataclasses.replace(self.pretrain_length, **data)


PRESETS = {
    "mini": Knobs(model_size=MS.PRESETS["mini"], pretrain_length=PL.PRESETS["mini"]),
    "paper": Knobs(model_size=MS.PRESETS["paper"], pretrain_length=PL.PRESETS["paper"]),
}


def runs(k: Knobs, out: Path) -> list[RunSpec]:
    """The union of both sweeps' runs (a run both need, such as the synthetic data, once)."""
    ms, pl = k.sweeps()
    specs: dict[str, RunSpec] = {}
    for s in [*MS.runs(ms, out), *PL.runs(pl, out)]:
        if s.name in specs:
            if framework.run_dir(specs[s.name], out) != framework.run_dir(s, out):
                raise ValueError(f"the two sweeps both have a run {s.name!r} with different configs; give them the "
                                 "same data knobs")
            continue
        specs[s.name] = s
    return list(specs.values())


def _slim(row: dict, keys: tuple[str, ...]) -> dict:
    """The row's `keys`, each with its interval over seeds (`<key>_ci95`) where it has one."""
    return {k: row.get(k) for key in keys for k in (key, key + stats.CI_SUFFIX) if k == key or k in row}


def summarize(k: Knobs, out: Path) -> dict:
    ms, pl = k.sweeps()
    size, length = MS.summarize(ms, out), PL.summarize(pl, out)
    common = ("pretrain_loss", "best_old_loss", "forgetting", "best_coeff", "reached_target")
    return {"model_size": [_slim(r, ("d_model", "params", *common)) for r in size["rows"]],
            "pretrain_length": [_slim(r, ("tpp", "pretrain_tokens", *common)) for r in length["rows"]],
            "pretrain_target": size["pretrain_target"], "finetune_target_size": size["finetune_target"],
            "d_model": length["d_model"], "finetune_target_length": length["finetune_target"],
            "seeds": {"model_size": size["seeds_summarized"], "pretrain_length": length["seeds_summarized"]},
            "interval": stats.INTERVAL}


def plot(k: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    fig, axes = plotting.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    panels = ((axes[0], summary["model_size"], "params", "parameters (12·L·D² + D·V)",
               f"pretrained to {summary['pretrain_target']:.3g}, finetuned to {summary['finetune_target_size']:.3g}"),
              (axes[1], summary["pretrain_length"], "tpp", "pretraining tokens per parameter",
               f"D={summary['d_model']}, finetuned to {summary['finetune_target_length']:.3g}"))
    for ax, rows, x_key, xlabel, title in panels:
        rows = [r for r in rows if r["pretrain_loss"] is not None and r["best_old_loss"] is not None]
        if not rows:
            continue
        x = [r[x_key] for r in rows]
        pre, best = [r["pretrain_loss"] for r in rows], [r["best_old_loss"] for r in rows]
        ax.fill_between(x, pre, best, color="tab:red", alpha=0.2, lw=0, label="forgetting")
        plotting.errorbar(ax, x, rows, "pretrain_loss", "s--", color="gray", label="after pretraining")
        plotting.errorbar(ax, x, rows, "best_old_loss", "o-", color="tab:blue", label="after finetuning (best KL coeff)")
        missed = [(xx, r["best_old_loss"]) for xx, r in zip(x, rows) if not r["reached_target"]]
        if missed:
            ax.plot(*zip(*missed), "kx", ms=8, label="new-data target not reached")
        plotting.log_ticks(ax, x, (lambda v: f"{v / 1e6:.3g}M" if v >= 1e6 else f"{v / 1e3:.3g}K") if x_key == "params"
                           else C.fmt)
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("old-data loss (nats)")
    axes[0].legend(fontsize=8)
    plotting.save(fig, Path(out) / "capacity_slices")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
