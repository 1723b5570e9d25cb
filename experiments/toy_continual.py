"""Toy continual learning: add → reversal → sort → modadd, with and without self-generated replay.

The paper's toy (claim 2): a small LM learns four 3-digit arithmetic tasks one after another. Every
example is `[BOS_task a1 a2 a3 SEP b1 b2 b3 EQ o1 o2 o3 o4 EOS]`, and each task's BOS id is its
dataset id. Run 1 pretrains on `add`; every later task finetunes the previous task's finished run
(optimizer restarted with warm-up, loss on all positions). Two settings share run 1:

- without replay: plain next-token training on the new task;
- with replay: at each new task the loaded weights are the frozen snapshot; every step a full batch is
  sampled from it (temperature 1, full length), prompted by the BOS tokens of all earlier tasks in
  equal shares (the loaded run's lineage ids), and NTP on it is added with coefficient `replay_coeff`
  (`--reg.method ntp_pre --reg.synth true`).

Every run evaluates exact-match accuracy (greedy decoding after the 9-token prompt) on the held-out
split of all four tasks every `eval_every` steps. Figure: accuracy of each task against the global
step (tasks concatenated, dashed lines at task switches), left without replay, right with replay.
`summary.json`: {"without_replay": {"add", "reversal", "sort", "modadd"}, "with_replay": {...}}, the
final accuracies in [0, 1] (plus "steps_per_task": {"first", "later"}). Paper: without replay add ≈21%,
reversal ≈0%, sort ≈1%, modadd 100%; with replay all four ≈100%.

Mini preset (CPU minutes) vs the paper: D=64 (4 heads of 16) instead of 256, batch 256 instead of 2048,
LR 1e-2 with a cosine decay in every task instead of a constant 1e-4, 1200 steps on add (learned from
scratch, the slowest) and 800 on each later task instead of 2000, 30-step warm-up, float32.

    python -m forgetting.experiments.toy_continual              # mini: minutes on 2 CPU cores
    python -m forgetting.experiments.toy_continual --scale paper
"""
from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass
from pathlib import Path

from forgetting.experiments import framework, repeat
from forgetting.experiments.framework import RunSpec
from forgetting.stages import train
from forgetting.training.train_config import TrainConfig, replace

TASKS = ("add", "reversal", "sort", "modadd")
SETTINGS = ("without_replay", "with_replay")
SEQ_LEN = 14  # 3-digit examples: 3n+5 tokens


@dataclass(frozen=True)
class Knobs:
    """Knobs of the toy continual-learning figure."""

    d_model: int = 64  # model width D
    n_layers: int = 2  # transformer blocks L
    head_dim: int = 16  # per-head width (heads = D / head_dim)
    dtype: str = "float32"  # matmul dtype (float32 | bfloat16)
    first_steps: int = 1200  # training steps on the first task (add: the slowest to learn from scratch)
    first_lr_decay: str = "cosine"  # LR schedule of the first task after warm-up: none (constant) | cosine
    steps: int = 800  # training steps on every later task
    batch_size: int = 256  # sequences per step
    first_lr: float = 1e-2  # AdamW peak learning rate on the first task
    lr: float = 1e-2  # AdamW peak learning rate on every later task (restarted with warm-up at every task)
    lr_decay: str = "cosine"  # LR schedule of every later task after warm-up: none (constant) | cosine
    b2: float = 0.99  # AdamW beta2
    weight_decay: float = 0.02  # AdamW decoupled weight decay
    warmup_steps: int = 30  # linear warm-up steps at the start of every task
    replay_coeff: float = 10.0  # coefficient of the NTP term on self-generated replay
    replay_buffer: int = 10  # steps of replay sampled from the snapshot at once
    num_examples: int = 50_000  # examples generated per task (its held-out split included)
    valid_examples: int = 256  # held-out examples per task (accuracy is measured on them)
    eval_every: int = 50  # steps between accuracy evaluations
    seed: int = 0  # seed of training (init, batch order, replay sampling)
    seeds: int = 3  # independent repetitions (seeds seed, seed+1, ...): mean and 95-percent t interval over them
    data_seed: int = 0  # seed of the generated task examples

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        "d_model": (framework.positive,), "n_layers": (framework.positive,), "head_dim": (framework.positive,),
        "first_lr": (framework.positive,), "lr": (framework.positive,), "replay_buffer": (framework.positive,),
        "num_examples": (framework.positive,), "weight_decay": (framework.nonnegative,),
        "warmup_steps": (framework.nonnegative,), "replay_coeff": (framework.nonnegative,),
        "seed": (framework.nonnegative,), "seeds": (framework.positive,), "data_seed": (framework.nonnegative,),
        "b2": (framework.Rule("in [0, 1)", lambda v: 0 <= v < 1),), "dtype": (framework.one_of("float32", "bfloat16"),),
    }

    def validate(self) -> None:
        if self.steps < 1 or self.first_steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("--steps, --batch_size and --eval_every must be positive")
        if self.valid_examples < 1 or self.valid_examples >= self.num_examples:
            raise ValueError("--valid_examples must be in [1, num_examples)")
        if self.first_lr_decay not in ("none", "cosine") or self.lr_decay not in ("none", "cosine"):
            raise ValueError("--first_lr_decay and --lr_decay must be none or cosine")
        if self.d_model % self.head_dim:
            raise ValueError("--d_model must be a multiple of --head_dim")


PRESETS = {
    "mini": Knobs(),
    "paper": Knobs(seeds=1, d_model=256, n_layers=2, head_dim=16, dtype="bfloat16", first_steps=2000, first_lr_decay="none",
                   lr_decay="none", steps=2000, batch_size=2048, first_lr=1e-4, lr=1e-4, warmup_steps=200,
                   replay_buffer=16, num_examples=1_000_000, valid_examples=1000, eval_every=20),
}


@dataclass(frozen=True)
class DataConfig:
    """The four task files (generated in-process into the run directory)."""

    tasks: tuple[str, ...] = TASKS
    num_examples: int = 50_000
    seed: int = 0


def make_data(cfg: DataConfig, run_dir: Path) -> dict:
    """Writes `<task>.bin` (+ sidecar) for every task into `run_dir`."""
    from forgetting.stages import generate

    metas = {}
    for task in cfg.tasks:
        meta = generate.generate(generate.Config(corpus="toy", task=task, num_examples=cfg.num_examples,
                                                 seed=cfg.seed + TASKS.index(task), out=str(run_dir / f"{task}.bin")))
        metas[task] = {"num_tokens": meta["num_tokens"], "dataset_id": meta["dataset_id"]}
    return metas


def _data_spec(knobs: Knobs) -> RunSpec:
    return RunSpec("data", DataConfig(TASKS, knobs.num_examples, knobs.data_seed), fn=make_data)


def run_name(setting: str, task: str) -> str:
    """RunSpec name of one task's run; the first task's run is shared by both settings."""
    return task if task == TASKS[0] else f"{task}-{'replay' if setting == 'with_replay' else 'plain'}"


def runs_one(knobs: Knobs, out: Path) -> list[RunSpec]:
    """One seed's runs (`knobs.seed`)."""
    data = _data_spec(knobs)
    data_dir = framework.run_dir(data, out)
    paths = {t: str(data_dir / f"{t}.bin") for t in TASKS}
    tokens_per_step = knobs.batch_size * SEQ_LEN
    base = TrainConfig()
    base = replace(
        base,
        **{"run.dir": str(out), "run.seed": knobs.seed,
           "data.path": paths[TASKS[0]], "data.num_tokens_valid": knobs.valid_examples * SEQ_LEN,
           "model.d_model": knobs.d_model, "model.n_layers": knobs.n_layers, "model.head_dim": knobs.head_dim,
           "model.seq_len": SEQ_LEN, "model.dtype": knobs.dtype,
           "opt.batch_size": knobs.batch_size, "opt.peak_lr": knobs.lr, "opt.b2": knobs.b2,
           "opt.weight_decay": knobs.weight_decay, "opt.warmup_tokens": knobs.warmup_steps * tokens_per_step,
           "opt.lr_decay": knobs.lr_decay,
           "stop.num_tokens_train": knobs.steps * tokens_per_step,
           "eval.extra_paths": tuple(paths[t] for t in TASKS),
           "log.every_steps": knobs.eval_every})
    first = replace(base, **{"run.name": run_name("without_replay", TASKS[0]),
                             "stop.num_tokens_train": knobs.first_steps * tokens_per_step,
                             "opt.lr_decay": knobs.first_lr_decay, "opt.peak_lr": knobs.first_lr})
    specs = [data, RunSpec(run_name("without_replay", TASKS[0]), first, module="forgetting.stages.train",
                           after=("data",))]
    for setting in SETTINGS:
        prev_name, prev_cfg = run_name(setting, TASKS[0]), first
        for task in TASKS[1:]:
            changes = {"run.name": run_name(setting, task), "data.path": paths[task],
                       "model.load_path": str(train.run_dir(prev_cfg))}
            if setting == "with_replay":
                changes.update({"reg.method": "ntp_pre", "reg.synth": True, "reg.coeff": knobs.replay_coeff,
                                "reg.batch_size": knobs.batch_size, "reg.buffer": knobs.replay_buffer})
            cfg = replace(base, **changes)
            name = run_name(setting, task)
            specs.append(RunSpec(name, cfg, module="forgetting.stages.train", after=(prev_name,)))
            prev_name, prev_cfg = name, cfg
    return specs


def curves(knobs: Knobs, out: Path, setting: str) -> dict:
    """{"step": [...], "switches": [...], "acc": {task: [...]}} along the concatenated task chain."""
    dirs = framework.locate(runs(knobs, out), out)
    steps, acc, switches = [], {t: [] for t in TASKS}, []
    offset = 0
    for k, task in enumerate(TASKS):
        rows = framework.read_metrics(dirs[run_name(setting, task)])
        if k:
            switches.append(offset)
            rows = [r for r in rows if r["step"] > 0]  # step 0 of a task repeats the previous task's end
        for r in rows:
            steps.append(offset + r["step"])
            for t in TASKS:
                acc[t].append(r.get(f"acc/{t}", float("nan")))
        done = framework.read_done(dirs[run_name(setting, task)])
        offset += int(done.get("steps", knobs.first_steps if k == 0 else knobs.steps))
    return {"step": steps, "switches": switches, "acc": acc}


def summarize_one(knobs: Knobs, out: Path) -> dict:
    """One seed's summary."""
    dirs = framework.locate(runs_one(knobs, out), out)
    summary: dict = {}
    for setting in SETTINGS:
        final = framework.read_done(dirs[run_name(setting, TASKS[-1])])
        summary[setting] = {t: final.get(f"acc/{t}") for t in TASKS}
    summary["steps_per_task"] = {"first": knobs.first_steps, "later": knobs.steps}
    return summary


def runs(knobs: Knobs, out: Path) -> list[RunSpec]:
    return repeat.runs(runs_one, knobs, out)


def summarize(knobs: Knobs, out: Path) -> dict:
    return repeat.summarize(runs_one, summarize_one, knobs, out)


def _pct(v):
    """A fraction, or its 95% interval, in percent."""
    if v is None:
        return None
    return {k: 100 * x for k, x in v.items()} if isinstance(v, dict) else 100 * v


def plot(knobs: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    colors = {"add": "tab:blue", "reversal": "tab:orange", "sort": "tab:green", "modadd": "tab:red"}
    titles = {"without_replay": "Without replay", "with_replay": "With self-generated replay"}
    fig, axes = plotting.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, setting in zip(axes, SETTINGS):
        c = curves(knobs, out, setting)
        for t in TASKS:
            ax.plot(c["step"], c["acc"][t], color=colors[t], lw=1.8, label=t)
        for x in c["switches"]:
            ax.axvline(x, color="gray", ls="--", lw=0.8)
        for x, t in zip([0, *c["switches"]], TASKS):  # which task is being trained
            ax.text(x, 1.05, f" {t}", fontsize=8, color=colors[t], va="bottom", ha="left")
        final = summary.get(setting, {})
        text = "final: " + ", ".join(f"{t} {plotting.pm({k: _pct(v) for k, v in final.items()}, t, '{:.0f}')}%"
                                     for t in TASKS if final.get(t) is not None)
        ax.set_title(f"{titles[setting]}\n{text}", fontsize=10)
        ax.set_xlabel("step (tasks concatenated)")
        ax.set_ylim(-0.03, 1.12)
    axes[0].set_ylabel("exact-match accuracy")
    axes[-1].legend(loc="center right")
    plotting.save(fig, Path(out) / "toy_continual")


if __name__ == "__main__":
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
