"""Model capacity (Figure 1, claim 4): a saturated model cannot learn new data without losing old data;
a lightly trained one can.

Frontier: one width is trained to convergence (`mix_max_tokens` tokens, far past saturation for a tiny
model; optional early stopping after `patience` evals without a new best) on every mixture in `mix_fracs`: the first ⌊f·B⌋ rows of each batch come
from the new data (f = 0: old data only, f = 1: new data only). Each run's (new-data loss, old-data loss)
at its end is a point; their Pareto frontier is the best trade-off this capacity allows.

Trajectories: two models pretrained on the old data alone — overtrained (`over_tpp` tokens per
parameter) and lightly trained (`light_tpp`) — are finetuned on the new data for `finetune_tokens` with
the KL penalty on self-generated replay (sampled from the frozen pretrained model, `--reg.synth true`)
at every coefficient in `kl_coeffs`. Each finetune's (new loss, old loss) path is drawn over the
frontier.

`summary.json`: {"mixtures": [{fraction, old_loss, new_loss}], "frontier": [[new, old], ...],
"trajectories": {"over"|"light": {coeff: {"new": [...], "old": [...]}}}, "endpoints": {...}}.
Paper: 13 English/Spanish mixtures; the ≈17K-TPP model's 13 KL coefficients never cross the frontier; a
20-TPP model gains ≈1 nat on Spanish while English moves ≈+0.05.

    python -m forgetting.experiments.model_capacity              # mini: synthetic languages, ≈3.5 min on 2 cores
    python -m forgetting.experiments.model_capacity --scale paper --old_path c4_en.bin --new_path c4_es.bin
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forgetting.experiments import common_lm as C
from forgetting.experiments import framework
from forgetting.experiments.framework import RunSpec

MODELS = ("over", "light")


@dataclass(frozen=True)
class Knobs(C.LMKnobs):
    """Knobs of the model-capacity figure (shared data/model/optimizer knobs first)."""

    d_model: int = 8  # the one model width D (small: it must saturate)
    mix_fracs: tuple[float, ...] = (0.0, 0.0625, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0)  # new-data fraction of each batch
    mix_max_tokens: int = 6_000_000  # length of each mixture run (long enough to converge a saturated model)
    patience: int = 0  # >0: also stop after this many evals without a new best old-data valid loss
    over_tpp: float = 2000.0  # tokens per parameter of the overtrained model
    light_tpp: float = 100.0  # tokens per parameter of the lightly trained model (20 is 28 steps at D=8: mostly warm-up)
    finetune_tokens: int = 1_000_000  # finetuning length of every trajectory
    kl_coeffs: tuple[float, ...] = (0.0, 0.3, 3.0, 30.0)  # KL coefficients (0 = plain finetuning)
    replay_batch: int = 32  # self-generated replay rows per step
    replay_buffer: int = 8  # steps of replay sampled at once


PRESETS = {
    "mini": Knobs(),
    "paper": Knobs(d_model=256, n_layers=6, head_dim=64, seq_len=256, vocab_size=4096, dtype="bfloat16",
                   batch_size=256, lr=1e-3, warmup_steps=150, valid_tokens=262_144, evals=100,
                   mix_fracs=(0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                   mix_max_tokens=20_000_000_000, patience=0, over_tpp=17000.0, light_tpp=20.0,
                   finetune_tokens=2_000_000_000,
                   kl_coeffs=(0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0),
                   replay_batch=64, replay_buffer=16),
}


def mix_name(f: float) -> str:
    return f"mix{C.fmt(f)}"


def fine_name(m: str, c: float) -> str:
    return f"ft-{m}-kl{C.fmt(c)}"


def runs(k: Knobs, out: Path) -> list[RunSpec]:
    specs, paths, after = C.data_specs(k, out)
    for f in k.mix_fracs:
        cfg = C.pretrain_config(k, out, paths, k.d_model, name=mix_name(f), max_tokens=k.mix_max_tokens,
                                early_stop_evals=k.patience, mix_coeff=f)
        specs.append(RunSpec(mix_name(f), cfg, module=C.TRAIN, after=after))
    for m, tpp in (("over", k.over_tpp), ("light", k.light_tpp)):
        pre = C.pretrain_config(k, out, paths, k.d_model, name=f"pre-{m}", tokens_per_param=tpp)
        specs.append(RunSpec(f"pre-{m}", pre, module=C.TRAIN, after=after))
        for c in k.kl_coeffs:
            fine = C.finetune_config(k, pre, paths, name=fine_name(m, c), max_tokens=k.finetune_tokens,
                                     method="kl_pre" if c > 0 else "none", coeff=c, synth=True,
                                     replay_batch=k.replay_batch, replay_buffer=k.replay_buffer)
            specs.append(RunSpec(fine_name(m, c), fine, module=C.TRAIN, after=(f"pre-{m}",)))
    return specs


def _losses(row: dict) -> tuple[float | None, float | None]:
    """(old-data, new-data) loss of a metrics row, from the extra evals of both datasets."""
    return row.get(f"ntp/{C.OLD}"), row.get(f"ntp/{C.NEW}")


def summarize(k: Knobs, out: Path) -> dict:
    dirs = framework.locate(runs(k, out), out)
    mixtures = []
    for f in k.mix_fracs:
        rows = framework.read_metrics(dirs[mix_name(f)])
        if not rows:
            mixtures.append({"fraction": f, "old_loss": None, "new_loss": None})
            continue
        # the converged point: the evaluation with the best validation loss of the run's own mixture
        best = min(rows, key=lambda r: (1 - f) * (_losses(r)[0] or 0) + f * (_losses(r)[1] or 0))
        old, new = _losses(best)
        mixtures.append({"fraction": f, "old_loss": old, "new_loss": new, "tokens": best.get("tokens")})
    front = C.pareto_frontier((m["new_loss"], m["old_loss"]) for m in mixtures if m["old_loss"] is not None)
    traj, ends = {}, {}
    for m in MODELS:
        traj[m], ends[m] = {}, {}
        for c in k.kl_coeffs:
            rows = framework.read_metrics(dirs[fine_name(m, c)])
            pts = [_losses(r) for r in rows]
            pts = [(o, n) for o, n in pts if o is not None and n is not None]
            traj[m][C.fmt(c)] = {"old": [o for o, _ in pts], "new": [n for _, n in pts]}
            if pts:
                ends[m][C.fmt(c)] = {"old_start": pts[0][0], "new_start": pts[0][1], "old_end": pts[-1][0],
                                     "new_end": pts[-1][1], "d_old": pts[-1][0] - pts[0][0],
                                     "d_new": pts[-1][1] - pts[0][1],
                                     "behind_frontier": C.behind_frontier(front, pts[-1][1], pts[-1][0])}
    return {"mixtures": mixtures, "frontier": [list(p) for p in front], "trajectories": traj, "endpoints": ends,
            "d_model": k.d_model, "over_tpp": k.over_tpp, "light_tpp": k.light_tpp}


def plot(k: Knobs, out: Path, summary: dict) -> None:
    import matplotlib.pyplot as plt

    from forgetting.experiments import plotting

    fig, axes = plotting.subplots(1, 2, figsize=(11, 4.2), sharex=True, sharey=True)
    mix = [m for m in summary["mixtures"] if m["old_loss"] is not None]
    for ax, m in zip(axes, MODELS):
        ax.scatter([p["new_loss"] for p in mix], [p["old_loss"] for p in mix], c="k", s=18, zorder=3, label="mixtures")
        if summary["frontier"]:
            xs, ys = zip(*summary["frontier"])
            ax.plot(xs, ys, "k-", lw=1.2, label="Pareto frontier")
        cmap = plt.get_cmap("plasma")
        coeffs = list(summary["trajectories"][m])
        for i, c in enumerate(coeffs):
            t = summary["trajectories"][m][c]
            if t["new"]:
                col = cmap(i / max(1, len(coeffs) - 1))
                ax.plot(t["new"], t["old"], "-", color=col, lw=1, label=f"KL {c}")
                ax.plot(t["new"][-1], t["old"][-1], "o", color=col, ms=4)
        tpp = summary["over_tpp"] if m == "over" else summary["light_tpp"]
        ax.set_title(f"{'overtrained' if m == 'over' else 'lightly trained'} ({C.fmt(tpp)} TPP), finetuned on new data",
                     fontsize=10)
        ax.set_xlabel("new-data loss (nats)")
    axes[0].set_ylabel("old-data loss (nats)")
    axes[1].legend(fontsize=7)
    plotting.save(fig, Path(out) / "model_capacity")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
