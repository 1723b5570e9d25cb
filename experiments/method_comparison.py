"""Method comparison: six ways to finetune a pretrained LM on new data, by how much old data they forget.

A model is pretrained on an "old" distribution, then finetuned on a "new" one with each of:
standard finetuning, LoRA (rank `lora_rank`, embeddings frozen), KL to the loaded model on real old
sequences (`kl_real`) or on sequences sampled from the loaded model prompted by the old dataset id
(`kl_self`), and NTP on real (`ntp_real`) or self-generated (`ntp_self`) old sequences. Figure: old-data
log-likelihood (−prev_ntp) against new-data log-likelihood (−valid_ntp) along finetuning, one line per
method, starting at the pretrained model. Paper (205M model, FineWeb-Edu → Nemotron-CC-Math): standard
loses ≈0.11 nats of old log-likelihood, LoRA ≈0.14 (and learns less), all four replay variants ≈0.002–0.005.

Default data (mini): two related offline synthetic Markov languages (language 0 → language 1, sharing a
fraction `share` of their transition rows), generated in-process by the same data run as the other LM
figures (`common_lm.data_specs`: `data_tokens` per language, `support`, `data_seed`). Any two tokenized `.bin` files work
instead: `--old_path old.bin --new_path new.bin` (made by `python -m forgetting.stages.tokenize`, same
tokenizer; the `paper` preset expects C4-en/es or FineWeb-Edu/Nemotron-CC-Math files you provide, e.g.
`--scale paper --old_path fineweb.bin --new_path math.bin`).

`--scale paper` is the authors' released sweep (experiments/method_comp): D=1024, L=16 pretrained for 3
epochs of FineWeb-Edu at LR 1e-3 with cosine decay; finetuned on Nemotron-CC-Math at constant LR 1e-5
(LoRA r16 at the same LR) until more than 10 evaluations in a row bring no new best new-data loss (their
`early_stop_steps=10`; here `--stop.early_stop_evals 10`, same meaning), evaluated every 10M tokens (their
default); KL and NTP replay both at coefficient 10 with 64 replay rows (self-generated: buffer 16). No run
stops on a target, so no loss conversion is needed.

Mini preset: D=128, L=2 on vocab-256 order-1 languages, pretrained 300 steps (batch 32x128, LR 3e-3),
finetuned 200 steps at LR 1e-3 (LoRA 1e-2); KL coefficient 10, NTP-replay coefficient 1, replay batch 32.
A high finetuning LR and a short pretraining make standard finetuning forget nats, not hundredths.

`summary.json`: {"methods": {name: {"old_before", "old_after", "new_before", "new_after"}}} (mean NTP
losses in nats on the held-out splits; `old_before` is the pretrained model's), plus "forgetting"
{name: old_after − old_before}.
"""
from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass
from pathlib import Path

from forgetting.experiments import common_lm as C
from forgetting.experiments import framework, repeat, stats
from forgetting.experiments.framework import RunSpec
from forgetting.stages import train
from forgetting.training.train_config import TrainConfig, replace

METHODS = ("standard", "lora", "kl_real", "kl_self", "ntp_real", "ntp_self")
LABELS = {"standard": "standard", "lora": "LoRA", "kl_real": "KL, real replay", "kl_self": "KL, self-generated",
          "ntp_real": "NTP, real replay", "ntp_self": "NTP, self-generated"}


@dataclass(frozen=True)
class Knobs:
    """Knobs of the method comparison."""

    old_path: str = ""  # old (pretraining) data .bin; empty = generate synthetic language 0
    new_path: str = ""  # new (finetuning) data .bin; empty = generate synthetic language 1
    vocab_size: int = 256  # synthetic languages: vocabulary
    share: float = 0.5  # synthetic languages: fraction of transition rows language 1 shares with language 0
    data_tokens: int = 2_000_000  # synthetic: tokens generated per language
    support: int = 8  # synthetic: successors per state
    data_seed: int = 0  # synthetic: seed of the language family and its samples
    seq_len: int = 128  # sequence length T
    d_model: int = 128  # model width D
    n_layers: int = 2  # transformer blocks L
    head_dim: int = 32  # per-head width
    dtype: str = "float32"  # matmul dtype (float32 | bfloat16)
    batch_size: int = 32  # sequences per step (pretraining and finetuning)
    pretrain_steps: int = 300  # pretraining steps on the old data
    pretrain_lr: float = 3e-3  # pretraining peak LR
    finetune_steps: int = 200  # finetuning steps on the new data (every method)
    finetune_lr: float = 1e-3  # finetuning peak LR
    lora_lr: float = 1e-2  # LoRA's peak LR (adapters are usually trained at a higher LR)
    warmup_steps: int = 20  # linear warm-up steps (pretraining and every finetune)
    lora_rank: int = 16  # LoRA rank
    kl_coeff: float = 10.0  # coefficient of the KL replay term
    ntp_coeff: float = 1.0  # coefficient of the NTP replay term
    replay_batch: int = 32  # replay rows per step
    replay_buffer: int = 10  # self-generated replay: steps sampled at once
    num_tokens_valid: int = 32768  # held-out tokens per dataset
    eval_every: int = 20  # finetuning steps between evaluations (pretraining: 5x this)
    eval_every_tokens: int = 0  # >0: evaluate every this many tokens instead (pretraining and finetuning)
    pretrain_epochs: float = 0.0  # >0: pretrain this many epochs of the old data instead of pretrain_steps
    pretrain_lr_decay: str = "none"  # pretraining LR schedule after warm-up: none | cosine
    early_stop_evals: int = 0  # >0: finetunes stop once more than this many evals bring no new best valid loss
    methods: str = ",".join(METHODS)  # comma-separated subset of the methods to run
    seed: int = 0  # training seed
    seeds: int = 3  # independent repetitions (seeds seed, seed+1, ...): mean and 95-percent t interval over them

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        "vocab_size": (framework.positive,), "data_tokens": (framework.positive,),
        "support": (framework.positive,), "data_seed": (framework.nonnegative,), "d_model": (framework.positive,), "n_layers": (framework.positive,),
        "head_dim": (framework.positive,), "batch_size": (framework.positive,),
        "pretrain_steps": (framework.nonnegative,), "pretrain_lr": (framework.positive,),
        "finetune_lr": (framework.positive,), "lora_lr": (framework.positive,), "lora_rank": (framework.positive,),
        "replay_batch": (framework.positive,), "replay_buffer": (framework.positive,),
        "num_tokens_valid": (framework.positive,), "eval_every": (framework.positive,),
        "finetune_steps": (framework.nonnegative,), "warmup_steps": (framework.nonnegative,),
        "kl_coeff": (framework.nonnegative,), "ntp_coeff": (framework.nonnegative,),
        "eval_every_tokens": (framework.nonnegative,), "pretrain_epochs": (framework.nonnegative,),
        "early_stop_evals": (framework.nonnegative,), "seed": (framework.nonnegative,), "seeds": (framework.positive,),
        "share": (framework.fraction,),
        "seq_len": (framework.at_least(2),), "dtype": (framework.one_of("float32", "bfloat16"),),
        "pretrain_lr_decay": (framework.one_of("none", "cosine"),),
    }

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def validate(self) -> None:
        bad = [m for m in self.method_list() if m not in METHODS]
        if bad or not self.method_list():
            raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
        if bool(self.old_path) != bool(self.new_path):
            raise ValueError("give both --old_path and --new_path (or neither, for synthetic languages)")
        if self.replay_batch > self.batch_size:
            raise ValueError("--replay_batch must be <= --batch_size (real replay draws from the data batch size)")
        if not self.finetune_steps and not self.early_stop_evals:
            raise ValueError("finetunes need a stop rule: --finetune_steps N or --early_stop_evals N")
        if not self.pretrain_steps and not self.pretrain_epochs:
            raise ValueError("pretraining needs a length: --pretrain_steps N or --pretrain_epochs E")
        if self.pretrain_epochs and not self.eval_every_tokens:
            raise ValueError("--pretrain_epochs needs --eval_every_tokens (the run's length in steps depends on the data)")


PRESETS = {
    "mini": Knobs(),
    # The authors' experiments/method_comp (pretrain.sh, finetune_with_replay.yaml, finetune_wo_replay.yaml).
    "paper": Knobs(seeds=1, seq_len=256, d_model=1024, n_layers=16, head_dim=64, dtype="bfloat16", batch_size=256,
                   pretrain_steps=0, pretrain_epochs=3.0, pretrain_lr=1e-3, pretrain_lr_decay="cosine",
                   finetune_steps=0, early_stop_evals=10, finetune_lr=1e-5, lora_lr=1e-5, warmup_steps=153,
                   kl_coeff=10.0, ntp_coeff=10.0, replay_batch=64, replay_buffer=16, num_tokens_valid=10_000_000,
                   eval_every_tokens=10_000_000),
}


def runs_one(knobs: Knobs, out: Path) -> list[RunSpec]:
    """One seed's runs (`knobs.seed`)."""
    data_specs, paths, after = C.data_specs(knobs, out)  # the LM figures' synthetic languages (or the given files)
    old, new = paths[C.OLD], paths[C.NEW]
    tps = knobs.batch_size * knobs.seq_len
    pre = replace(TrainConfig(), **{
        "run.dir": str(out), "run.name": "pretrain", "run.seed": knobs.seed,
        "data.path": old, "data.num_tokens_valid": knobs.num_tokens_valid,
        "model.d_model": knobs.d_model, "model.n_layers": knobs.n_layers, "model.head_dim": knobs.head_dim,
        "model.seq_len": knobs.seq_len, "model.dtype": knobs.dtype,
        "opt.batch_size": knobs.batch_size, "opt.peak_lr": knobs.pretrain_lr,
        "opt.warmup_tokens": knobs.warmup_steps * tps,
        "stop.num_tokens_train": knobs.pretrain_steps * tps, "log.every_steps": 5 * knobs.eval_every})
    if knobs.pretrain_epochs:
        pre = replace(pre, **{"stop.num_tokens_train": 0, "stop.num_epochs": knobs.pretrain_epochs})
    if knobs.pretrain_lr_decay != "none":
        pre = replace(pre, **{"opt.lr_decay": knobs.pretrain_lr_decay})
    if knobs.eval_every_tokens:
        pre = replace(pre, **{"log.every_steps": 0, "log.every_tokens": knobs.eval_every_tokens})
    specs = data_specs + [RunSpec("pretrain", pre, module="forgetting.stages.train", after=after)]
    base = replace(pre, **{"data.path": new, "model.load_path": str(train.run_dir(pre)),
                           "opt.peak_lr": knobs.finetune_lr, "stop.num_tokens_train": knobs.finetune_steps * tps,
                           "stop.num_epochs": 0.0, "opt.lr_decay": "none",
                           "log.every_steps": 0 if knobs.eval_every_tokens else knobs.eval_every})
    if knobs.early_stop_evals:
        base = replace(base, **{"stop.early_stop_evals": knobs.early_stop_evals})
    for m in knobs.method_list():
        changes: dict = {"run.name": m}
        if m == "lora":
            changes.update({"model.lora_rank": knobs.lora_rank, "opt.peak_lr": knobs.lora_lr})
        elif m != "standard":
            kind, source = m.split("_")
            changes.update({"reg.method": f"{kind}_pre", "reg.synth": source == "self",
                            "reg.coeff": knobs.kl_coeff if kind == "kl" else knobs.ntp_coeff,
                            "reg.batch_size": knobs.replay_batch})
            if source == "self":
                changes["reg.buffer"] = knobs.replay_buffer
        specs.append(RunSpec(m, replace(base, **changes), module="forgetting.stages.train", after=("pretrain",)))
    return specs


def curve(run: Path) -> tuple[list[float], list[float]]:
    """(new-data log-likelihood, old-data log-likelihood) along a finetuning run's evals."""
    rows = [r for r in framework.read_metrics(run) if "prev_ntp" in r and "valid_ntp" in r]
    return [-r["valid_ntp"] for r in rows], [-r["prev_ntp"] for r in rows]


def summarize_one(knobs: Knobs, out: Path) -> dict:
    """One seed's summary."""
    dirs = framework.locate(runs_one(knobs, out), out)
    methods, forgetting = {}, {}
    for m in knobs.method_list():
        rows = framework.read_metrics(dirs[m])
        if not rows:
            continue
        first, last = rows[0], framework.read_done(dirs[m]) or rows[-1]
        methods[m] = {"old_before": first["prev_ntp"], "old_after": last["prev_ntp"],
                      "new_before": first["valid_ntp"], "new_after": last["valid_ntp"]}
        forgetting[m] = last["prev_ntp"] - first["prev_ntp"]
    return {"methods": methods, "forgetting": forgetting}


def runs(knobs: Knobs, out: Path) -> list[RunSpec]:
    return repeat.runs(runs_one, knobs, out)


def summarize(knobs: Knobs, out: Path) -> dict:
    return repeat.summarize(runs_one, summarize_one, knobs, out)


def plot(knobs: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    dirs = framework.locate(runs(knobs, out), out)
    fig, ax = plotting.subplots(1, 1, figsize=(6.2, 4.6))
    styles = {"standard": ("k", "-"), "lora": ("tab:gray", "--"), "kl_real": ("tab:blue", "-"),
              "kl_self": ("tab:blue", ":"), "ntp_real": ("tab:orange", "-"), "ntp_self": ("tab:orange", ":")}
    start = None
    for m in knobs.method_list():
        x, y = curve(dirs[m])
        if not x:
            continue
        color, ls = styles[m]
        ax.plot(x, y, color=color, ls=ls, marker="o", ms=3, lw=1.6, label=LABELS[m])
        end = summary["methods"].get(m)
        if end and f"old_after{stats.CI_SUFFIX}" in end:  # the end point's 95% interval over seeds
            ax.errorbar(-end["new_after"], -end["old_after"], fmt="none", ecolor=color, capsize=3,
                        xerr=[[e] for e in reversed(stats.error(end, "new_after"))],
                        yerr=[[e] for e in reversed(stats.error(end, "old_after"))])
        start = start or (x[0], y[0])
    if start:
        ax.plot(*start, marker="*", ms=14, color="gold", mec="k", ls="none", label="pretrained", zorder=5)
    ax.set_xlabel("new-data log-likelihood (−NTP, nats)")
    ax.set_ylabel("old-data log-likelihood (−NTP, nats)")
    n = summary.get("seeds_summarized", 1)
    ax.set_title("Finetuning methods: old vs new data" + (f"\n(curves: seed {knobs.seed}; bars: mean end point, 95% t "
                                                           f"interval over {n} seeds)" if n > 1 else ""), fontsize=10)
    ax.legend(loc="lower left")
    plotting.save(fig, Path(out) / "method_comparison")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
