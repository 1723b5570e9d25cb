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

`--scale paper` is the authors' released sweeps (experiments/model_capacity): 13 English/Spanish
mixtures (new-data fraction 1/128, 1/64, …, 1/2, 3/4, …, 127/128), D=256, L=6, 10 epochs of the English
split with cosine decay (evaluated every 10M tokens); the overtrained start is a mixture run (their
finetune loads one run id whose mixture the release does not name; here `--over_mix 1/128`, the one
closest to old-only), finetuned with self-generated `kl_pre` (64 rows, buffer 16) at LR 1e-4, cosine over
10 epochs, at 13 coefficients 0.01 … 10; the Chinchilla start is 20 TPP with mixture 0.3 at constant LR,
finetuned at LR ∈ {3e-4, 1e-3} × coeff ∈ {1, 3, 10} with a 1e9-token warm-up and cosine decay over 100
epochs. None of these stops on a target, so no loss conversion is needed.

    python -m forgetting.experiments.model_capacity              # mini: synthetic languages, ≈3.5 min on 2 cores
    python -m forgetting.experiments.model_capacity --scale paper --old_path c4_en.bin --new_path c4_es.bin
"""
from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass
from pathlib import Path

from forgetting.experiments import common_lm as C
from forgetting.experiments import framework, repeat
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
    mix_epochs: float = 0.0  # >0: every mixture runs this many epochs of the old data (instead of mix_max_tokens)
    over_mix: float = -1.0  # >=0: the overtrained start is the mixture run of this fraction (not an old-only run)
    light_mix: float = 0.0  # new-data fraction of each batch in the lightly trained model's pretraining
    over_lr: float = 0.0  # finetuning LR of the overtrained model (0 = `lr`)
    light_lrs: tuple[float, ...] = ()  # finetuning LRs of the lightly trained model (empty = `lr`)
    light_kl_coeffs: tuple[float, ...] = ()  # KL coefficients of the lightly trained model (empty = kl_coeffs)
    over_finetune_epochs: float = 0.0  # >0: the overtrained finetunes run this many epochs of the new data
    light_finetune_epochs: float = 0.0  # >0: the lightly trained finetunes run this many epochs of the new data
    light_warmup_tokens: int = 0  # >0: warm-up of the lightly trained finetunes (tokens)

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        "d_model": (framework.positive,), "mix_max_tokens": (framework.nonnegative,),
        "over_tpp": (framework.positive,), "light_tpp": (framework.positive,),
        "finetune_tokens": (framework.positive,), "replay_batch": (framework.positive,),
        "replay_buffer": (framework.positive,), "patience": (framework.nonnegative,),
        "mix_epochs": (framework.nonnegative,), "over_lr": (framework.nonnegative,),
        "over_finetune_epochs": (framework.nonnegative,), "light_finetune_epochs": (framework.nonnegative,),
        "light_warmup_tokens": (framework.nonnegative,), "light_mix": (framework.fraction,),
        "kl_coeffs": (framework.nonempty, framework.nonnegative),
        "mix_fracs": (framework.nonempty, framework.fraction), "light_lrs": (framework.positive,),
        "light_kl_coeffs": (framework.nonnegative,), "over_mix": (framework.Rule("<= 1 (< 0: off)", lambda v: v <= 1),),
    }

    def validate(self) -> None:
        if not self.mix_max_tokens and not self.mix_epochs:
            raise ValueError("the mixture runs need a length: --mix_max_tokens N or --mix_epochs E")


PRESETS = {
    "mini": Knobs(),
    # The authors' experiments/model_capacity sweeps (pretrain.yaml, finetune.yaml, chinchilla_*).
    "paper": Knobs(seeds=1, d_model=256, n_layers=6, head_dim=64, seq_len=256, vocab_size=4096, dtype="bfloat16",
                   batch_size=256, lr=1e-3, warmup_steps=C.AUTHORS_WARMUP_STEPS, valid_tokens=C.AUTHORS_VALID_TOKENS,
                   pretrain_eval_tokens=C.DEFAULT_EVAL_TOKENS, finetune_eval_tokens=C.DEFAULT_EVAL_TOKENS,
                   pretrain_lr_decay="cosine", finetune_lr_decay="cosine",
                   mix_fracs=(1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 7 / 8, 15 / 16, 31 / 32,
                              63 / 64, 127 / 128),
                   mix_epochs=10.0, mix_max_tokens=0, patience=0, over_mix=1 / 128, light_tpp=20.0, light_mix=0.3,
                   finetune_tokens=2_000_000_000, over_lr=1e-4, over_finetune_epochs=10.0,
                   kl_coeffs=(0.01, 0.018, 0.032, 0.056, 0.1, 0.18, 0.32, 0.56, 1.0, 1.78, 3.16, 5.62, 10.0),
                   light_lrs=(3e-4, 1e-3), light_kl_coeffs=(1.0, 3.0, 10.0), light_finetune_epochs=100.0,
                   light_warmup_tokens=1_000_000_000, replay_batch=64, replay_buffer=16),
}


def mix_name(f: float) -> str:
    return f"mix{C.fmt(f)}"


def fine_name(m: str, c: float, lr: float | None = None) -> str:
    return f"ft-{m}" + (f"-lr{C.fmt(lr)}" if lr is not None else "") + f"-kl{C.fmt(c)}"


def finetunes(k: Knobs) -> list[tuple[str, str, float | None, float]]:
    """(model, trajectory key, LR or None for `lr`, coeff) of every finetune; the key is the coefficient,
    prefixed by the LR where a model is finetuned at several."""
    out = [("over", C.fmt(c), k.over_lr or None, c) for c in k.kl_coeffs]
    lrs = k.light_lrs or (None,)
    for lr in lrs:
        for c in k.light_kl_coeffs or k.kl_coeffs:
            key = C.fmt(c) if len(lrs) == 1 else f"lr{C.fmt(lr)} {C.fmt(c)}"
            out.append(("light", key, lr, c))
    return out


def _fine_run_name(m: str, lr: float | None, c: float, k: Knobs) -> str:
    return fine_name(m, c, lr if (m == "light" and len(k.light_lrs) > 1) else None)


def runs_one(k: Knobs, out: Path) -> list[RunSpec]:
    """One seed's runs (`k.seed`)."""
    specs, paths, after = C.data_specs(k, out)
    mix_cfgs = {}
    for f in k.mix_fracs:
        length = {"epochs": k.mix_epochs} if k.mix_epochs else {"max_tokens": k.mix_max_tokens}
        cfg = C.pretrain_config(k, out, paths, k.d_model, name=mix_name(f), early_stop_evals=k.patience,
                                mix_coeff=f, **length)
        mix_cfgs[f] = cfg
        specs.append(RunSpec(mix_name(f), cfg, module=C.TRAIN, after=after))
    starts = {}
    if k.over_mix >= 0:
        if k.over_mix not in mix_cfgs:
            raise ValueError(f"--over_mix {k.over_mix} is not one of --mix_fracs {k.mix_fracs}")
        starts["over"] = (mix_name(k.over_mix), mix_cfgs[k.over_mix])
    else:
        starts["over"] = ("pre-over", C.pretrain_config(k, out, paths, k.d_model, name="pre-over",
                                                        tokens_per_param=k.over_tpp))
    light = C.pretrain_config(k, out, paths, k.d_model, name="pre-light", tokens_per_param=k.light_tpp,
                              mix_coeff=k.light_mix, lr_decay="none" if k.light_mix else None)
    starts["light"] = ("pre-light", light)
    for m in MODELS:
        name, cfg = starts[m]
        if name.startswith("pre-"):
            specs.append(RunSpec(name, cfg, module=C.TRAIN, after=after))
    for m, _, lr, c in finetunes(k):
        name, pre = starts[m]
        epochs = k.over_finetune_epochs if m == "over" else k.light_finetune_epochs
        warm = k.light_warmup_tokens if m == "light" else 0
        run_name = _fine_run_name(m, lr, c, k)
        fine = C.finetune_config(k, pre, paths, name=run_name, max_tokens=k.finetune_tokens,
                                 method="kl_pre" if c > 0 else "none", coeff=c, synth=True, lr=lr,
                                 replay_batch=k.replay_batch, replay_buffer=k.replay_buffer, max_epochs=epochs,
                                 warmup_tokens=warm)
        specs.append(RunSpec(run_name, fine, module=C.TRAIN, after=(name,)))
    return specs


def _losses(row: dict, k: Knobs) -> tuple[float | None, float | None]:
    """(old-data, new-data) loss of a metrics row, from the extra evals of both datasets."""
    old, new = C.stems(k)
    return row.get(f"ntp/{old}"), row.get(f"ntp/{new}")


def summarize_one(k: Knobs, out: Path) -> dict:
    """One seed's summary."""
    dirs = framework.locate(runs_one(k, out), out)
    mixtures = []
    for f in k.mix_fracs:
        rows = framework.read_metrics(dirs[mix_name(f)])
        if not rows:
            mixtures.append({"fraction": f, "old_loss": None, "new_loss": None})
            continue
        # the converged point: the evaluation with the best validation loss of the run's own mixture
        best = min(rows, key=lambda r: (1 - f) * (_losses(r, k)[0] or 0) + f * (_losses(r, k)[1] or 0))
        old, new = _losses(best, k)
        mixtures.append({"fraction": f, "old_loss": old, "new_loss": new, "tokens": best.get("tokens")})
    front = C.pareto_frontier((m["new_loss"], m["old_loss"]) for m in mixtures if m["old_loss"] is not None)
    traj, ends = {}, {}
    for m in MODELS:
        traj[m], ends[m] = {}, {}
        for mm, key, lr, c in finetunes(k):
            if mm != m:
                continue
            rows = framework.read_metrics(dirs[_fine_run_name(m, lr, c, k)])
            pts = [_losses(r, k) for r in rows]
            pts = [(o, n) for o, n in pts if o is not None and n is not None]
            traj[m][key] = {"old": [o for o, _ in pts], "new": [n for _, n in pts]}
            if pts:
                ends[m][key] = {"old_start": pts[0][0], "new_start": pts[0][1], "old_end": pts[-1][0],
                                     "new_end": pts[-1][1], "d_old": pts[-1][0] - pts[0][0],
                                     "d_new": pts[-1][1] - pts[0][1],
                                     "behind_frontier": C.behind_frontier(front, pts[-1][1], pts[-1][0])}
    return {"mixtures": mixtures, "frontier": [list(p) for p in front], "trajectories": traj, "endpoints": ends,
            "d_model": k.d_model, "over_tpp": k.over_tpp, "light_tpp": k.light_tpp}


def runs(k: Knobs, out: Path) -> list[RunSpec]:
    return repeat.runs(runs_one, k, out)


def summarize(k: Knobs, out: Path) -> dict:
    summary = repeat.summarize(runs_one, summarize_one, k, out)
    # over seeds the frontier is that of the mean mixtures (each seed's own is in per_seed)
    summary["frontier"] = [list(p) for p in C.pareto_frontier((m["new_loss"], m["old_loss"]) for m in summary["mixtures"]
                                                              if m["old_loss"] is not None)]
    return summary


def plot(k: Knobs, out: Path, summary: dict) -> None:
    import matplotlib.pyplot as plt

    from forgetting.experiments import plotting

    fig, axes = plotting.subplots(1, 2, figsize=(11, 4.2), sharex=True, sharey=True)
    mix = [m for m in summary["mixtures"] if m["old_loss"] is not None]
    for ax, m in zip(axes, MODELS):
        plotting.errorbar(ax, [p["new_loss"] for p in mix], mix, "old_loss", "o", x_key="new_loss", color="k", ms=4,
                          zorder=3, label="mixtures")
        if summary["frontier"]:
            xs, ys = zip(*summary["frontier"])
            ax.plot(xs, ys, "k-", lw=1.2, label="Pareto frontier")
        cmap = plt.get_cmap("plasma")
        coeffs = list(summary["trajectories"][m])
        for i, c in enumerate(coeffs):
            t = summary["trajectories"][m][c]
            if t["new"] and isinstance(t["new"][0], list):  # seeds of different lengths: seed 0's curve
                t = {"new": t["new"][0], "old": t["old"][0]}
            if t["new"]:
                col = cmap(i / max(1, len(coeffs) - 1))
                ax.plot(t["new"], t["old"], "-", color=col, lw=1, label=f"KL {c}")
                ax.plot(t["new"][-1], t["old"][-1], "o", color=col, ms=4)
                end = summary["endpoints"][m].get(c, {})
                if "old_end_ci95" in end:  # the end point's 95% interval over seeds
                    plotting.errorbar(ax, [end["new_end"]], [end], "old_end", "none", x_key="new_end", ecolor=col)
        tpp = summary["over_tpp"] if m == "over" else summary["light_tpp"]
        ax.set_title(f"{'overtrained' if m == 'over' else 'lightly trained'} ({C.fmt(tpp)} TPP), finetuned on new data",
                     fontsize=10)
        ax.set_xlabel("new-data loss (nats)")
    axes[0].set_ylabel("old-data loss (nats)")
    axes[1].legend(fontsize=7)
    plotting.save(fig, Path(out) / "model_capacity")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
