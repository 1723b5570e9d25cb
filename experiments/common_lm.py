"""Shared pieces of the language-model figure files (model size, pretraining length, 2-D grid, learning
rate, high LR vs replay, model capacity): data, config builders and the pure summary math.

Data. By default an experiment generates two related synthetic languages in-process (language 0 = the
"old" pretraining data, language 1 = the "new" finetuning data; they share `share` of their transition
rows, so learning one overwrites part of the other and tiny widths saturate). For the paper's setting
pass `--old_path OLD.bin --new_path NEW.bin`: flat uint16 token files with their `.json` sidecars written
by the tokenize stage (`python -m forgetting.stages.tokenize ...`, e.g. C4-en and C4-es with the
4096-token BPE; old data gets dataset id 0, new data id 1), or the authors' raw files named by their
stems (c4_en.bin, c4_es.bin, fineweb_edu_10B.bin, nemotron_math_20M.bin: no sidecar needed). Then no data
run is made.

Paper presets reproduce the authors' released sweeps; `authors_loss` converts their loss values (targets)
to this project's definition, and `AUTHORS_*` hold their defaults (warm-up, validation size, eval cadence).

Configs. `base_config` turns the knobs every figure shares (`LMKnobs`) into a `TrainConfig`;
`pretrain_config` / `finetune_config` add a model width, a stop rule and a regularizer. Lengths are
always capped (a target loss alone could run forever): `stop.target_loss` combines with one length
criterion (`num_tokens_train` or `tokens_per_param`).

Summary math (pure, unit-tested): `first_crossing`, `compute_multiplier`, `pareto_frontier`,
`time_to_reach`, `compute_ratio_at_equal_loss`, `steps_to_target`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

from forgetting.experiments import framework
from forgetting.experiments.framework import RunSpec
from forgetting.stages import train
from forgetting.training.train_config import TrainConfig, replace

TRAIN = "forgetting.stages.train"
OLD, NEW = "old", "new"  # stems of the generated files (also the `ntp/<stem>` extra-eval metric names)


@dataclass(frozen=True)
class LMKnobs:
    """Knobs shared by every language-model figure (data, model shape, optimizer, evaluation)."""

    old_path: str = ""  # old (pretraining) data .bin from the tokenize stage; empty = generate synthetic language 0
    new_path: str = ""  # new (finetuning) data .bin from the tokenize stage; empty = generate synthetic language 1
    vocab_size: int = 256  # vocabulary: synthetic generation (4 ids + symbols + EOS); with --old_path only the size count 12·L·D²+D·V
    data_tokens: int = 4_000_000  # synthetic tokens generated per language
    share: float = 0.5  # fraction of transition rows the new language shares with the old one
    support: int = 8  # successors per state of the synthetic languages
    data_seed: int = 0  # seed of the synthetic language family and its samples
    n_layers: int = 1  # transformer blocks L
    head_dim: int = 16  # per-head width (heads = D / head_dim)
    seq_len: int = 64  # sequence length T
    dtype: str = "float32"  # matmul dtype: float32 | bfloat16
    batch_size: int = 32  # sequences per step (pretraining and finetuning)
    lr: float = 3e-3  # peak learning rate (pretraining; finetuning unless the figure sweeps it)
    warmup_steps: int = 20  # linear warm-up steps (repeated at the start of finetuning)
    weight_decay: float = 0.02  # AdamW decoupled weight decay
    valid_tokens: int = 16_384  # validation tokens per dataset
    evals: int = 100  # evaluations per run (eval cadence = run length / evals; the compute multiplier reads them)
    pretrain_eval_tokens: int = 0  # >0: evaluate pretraining runs every this many tokens instead (the authors' log.every_tokens)
    finetune_eval_tokens: int = 0  # >0: evaluate finetuning runs every this many tokens instead
    pretrain_lr_decay: str = "none"  # pretraining LR schedule after warm-up: none (constant) | cosine
    finetune_lr_decay: str = "none"  # finetuning LR schedule after warm-up: none | cosine (needs a run length)
    extra_evals: bool = True  # also evaluate both datasets at every eval as ntp/<stem> (model_capacity reads them)
    # finetunes measure the old data (prev_*) at every this-many-th eval; 0 = before finetuning and at the
    # end only (what a figure reading only end points needs); the last eval always measures it
    prev_every: int = 1
    seed: int = 0  # first training seed (init, batch order, replay sampling)
    seeds: int = 3  # independent repetitions (seeds seed, seed+1, ...; each repeats pretraining too): mean and 95-percent t interval

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        **{k: (framework.positive,) for k in ("vocab_size", "data_tokens", "support", "n_layers", "head_dim",
                                             "batch_size", "lr", "valid_tokens", "evals", "seeds")},
        "seq_len": (framework.at_least(2),), "share": (framework.fraction,), "dtype": (framework.one_of("auto", "float32", "bfloat16"),),
        **{k: (framework.nonnegative,) for k in ("warmup_steps", "weight_decay", "pretrain_eval_tokens",
                                                "finetune_eval_tokens", "seed", "data_seed", "prev_every")},
        "pretrain_lr_decay": (framework.one_of("none", "cosine"),), "finetune_lr_decay": (framework.one_of("none", "cosine"),),
    }

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class EndPointKnobs(LMKnobs):
    """`LMKnobs` of a figure that reads each run's end points only (learning rate, high LR, model size,
    pretraining length, 2-D grid): evaluations measure no more than that needs."""

    extra_evals: bool = False  # the figure reads end points only: no ntp/<stem> extras (true: both datasets at every eval)
    prev_every: int = 0  # finetunes measure the old data before and at the end only (1: at every eval, its curve)


# The authors' defaults (their train_single.py) that every paper preset shares.
AUTHORS_WARMUP_STEPS = 153  # their 10M warm-up tokens at B=256, T=256: ceil(10_000_000 / 65_536)
AUTHORS_VALID_TOKENS = 10_000_000  # their data.num_tokens_valid
TARGET_EVAL_TOKENS = 1_000_000  # their log.every_tokens in sweeps that stop on a target loss
DEFAULT_EVAL_TOKENS = 10_000_000  # their default log.every_tokens


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SyntheticData:
    """The two synthetic languages (generated in-process into the run directory)."""

    vocab_size: int = 256
    num_tokens: int = 4_000_000
    seq_len: int = 64
    share: float = 0.5
    support: int = 8
    seed: int = 0


def make_data(cfg: SyntheticData, run_dir: Path) -> dict:
    """Writes `old.bin` (language 0) and `new.bin` (language 1) with sidecars into `run_dir`."""
    from forgetting.stages import generate

    metas = {}
    for lang, stem in ((0, OLD), (1, NEW)):
        meta = generate.generate(generate.Config(
            corpus="synthetic", language=lang, num_tokens=cfg.num_tokens, seq_len=cfg.seq_len,
            vocab_size=cfg.vocab_size, share=cfg.share, support=cfg.support, seed=cfg.seed,
            sample_seed=cfg.seed + 17 * (lang + 1), out=str(run_dir / f"{stem}.bin")))
        metas[stem] = {k: meta.get(k) for k in ("num_tokens", "dataset_id", "entropy_rate_nats", "best_loss_nats")}
    return metas


def data_specs(k: LMKnobs, out: Path) -> tuple[list[RunSpec], dict[str, str], tuple[str, ...]]:
    """(runs to add, {"old": path, "new": path}, `after` for runs that read the data). `k`: any knobs with
    LMKnobs' data fields (old_path, new_path, vocab_size, data_tokens, seq_len, share, support, data_seed)."""
    if k.old_path or k.new_path:
        if not (k.old_path and k.new_path):
            raise ValueError("give both --old_path and --new_path (or neither, for synthetic languages)")
        return [], {OLD: k.old_path, NEW: k.new_path}, ()
    spec = RunSpec("data", SyntheticData(k.vocab_size, k.data_tokens, k.seq_len, k.share, k.support, k.data_seed),
                   fn=make_data)
    d = framework.run_dir(spec, out)
    return [spec], {OLD: str(d / f"{OLD}.bin"), NEW: str(d / f"{NEW}.bin")}, ("data",)


def data_info(specs: Sequence[RunSpec], out: Path) -> dict:
    """The data run's result ({"old": {..., best_loss_nats}, "new": {...}}), {} with user-provided data."""
    for s in specs:
        if s.name == "data":
            return framework.read_result(framework.run_dir(s, out))
    return {}


# --------------------------------------------------------------------------------------------- configs


def authors_loss(loss: float, seq_len: int) -> float:
    """The authors' next-token loss value `loss` in this project's definition. Theirs sums the NLL over the
    T-1 predicted positions and divides by T; this project averages over the T-1 positions. So their
    target x is x·T/(T-1) here (3.0 at T=256 -> 3.0118)."""
    return loss * seq_len / (seq_len - 1)


def stems(k: LMKnobs) -> tuple[str, str]:
    """The names under which the extra evals log the old and new data (`ntp/<stem>`)."""
    return (Path(k.old_path).stem if k.old_path else OLD), (Path(k.new_path).stem if k.new_path else NEW)


def paper_params(k: LMKnobs, d_model: int, vocab_size: int | None = None) -> int:
    """12·L·D² + D·V, the paper's size count (vocab from the knobs; paper data: pass it)."""
    return 12 * k.n_layers * d_model**2 + d_model * (vocab_size or k.vocab_size)


def base_config(k: LMKnobs, out: Path, paths: dict[str, str], d_model: int) -> TrainConfig:
    """Pretraining on the old data with the shared knobs; both datasets evaluated every eval."""
    return replace(TrainConfig(), **{
        "run.dir": str(out), "run.seed": k.seed,
        "data.path": paths[OLD], "data.num_tokens_valid": k.valid_tokens,
        "model.d_model": d_model, "model.n_layers": k.n_layers, "model.head_dim": min(k.head_dim, d_model),
        "model.seq_len": k.seq_len, "model.dtype": k.dtype,
        "opt.batch_size": k.batch_size, "opt.peak_lr": k.lr, "opt.weight_decay": k.weight_decay,
        "opt.warmup_tokens": k.warmup_steps * k.tokens_per_step,
        "eval.extra_paths": (paths[OLD], paths[NEW]) if k.extra_evals else (),
        "log.progress": False})


def _cadence(k: LMKnobs, every_tokens: int, max_tokens: int, evals: int | None = None) -> dict:
    """Eval-cadence config changes: every `every_tokens` tokens when > 0 (the authors' way), else about
    `evals` (default `k.evals`) evaluations over a run of `max_tokens`."""
    if every_tokens > 0:
        return {"log.every_tokens": int(every_tokens), "log.every_steps": 0}
    return {"log.every_steps": max(1, math.ceil(max_tokens / k.tokens_per_step / max(1, evals or k.evals)))}


def cadence(k: LMKnobs, max_tokens: int) -> int:
    """Eval/checkpoint every this many steps: about `k.evals` evaluations over a run of max_tokens."""
    return max(1, math.ceil(max_tokens / k.tokens_per_step / max(1, k.evals)))


def pretrain_config(k: LMKnobs, out: Path, paths: dict[str, str], d_model: int, *, name: str,
                    tokens_per_param: float = 0.0, max_tokens: int = 0, target_loss: float = 0.0,
                    lr: float | None = None, early_stop_evals: int = 0, mix_coeff: float = 0.0,
                    vocab_size: int | None = None, epochs: float = 0.0, lr_decay: str | None = None) -> TrainConfig:
    """A pretraining run: `tokens_per_param` (exact length), `epochs` (passes over the old data's training
    split) or `max_tokens` (a cap, with a target loss or early stopping). `mix_coeff` > 0 takes that
    fraction of each batch from the new data (Pareto runs); mix_coeff == 1 trains on the new data alone.
    Schedule (`lr_decay`, default `k.pretrain_lr_decay`) and eval cadence (`k.pretrain_eval_tokens`, else `k.evals` per run)
    come from the knobs."""
    if sum(bool(v) for v in (tokens_per_param, max_tokens, epochs)) != 1:
        raise ValueError("give exactly one of tokens_per_param, max_tokens and epochs")
    if epochs and not k.pretrain_eval_tokens:
        raise ValueError("an epoch-length pretraining run needs --pretrain_eval_tokens (its length in tokens "
                         "is known only from the data)")
    length = tokens_per_param * paper_params(k, d_model, vocab_size) if tokens_per_param else max_tokens
    cfg = base_config(k, out, paths, d_model)
    ch = {"run.name": name, "stop.tokens_per_param": float(tokens_per_param), "stop.num_tokens_train": int(max_tokens),
          "stop.target_loss": float(target_loss), "stop.early_stop_evals": int(early_stop_evals)}
    ch.update(_cadence(k, k.pretrain_eval_tokens, int(length)))
    if epochs:
        ch["stop.num_epochs"] = float(epochs)
    decay = lr_decay or k.pretrain_lr_decay
    if decay != "none":
        ch["opt.lr_decay"] = decay
    if lr is not None:
        ch["opt.peak_lr"] = lr
    if mix_coeff >= 1.0:
        ch["data.path"] = paths[NEW]
    elif mix_coeff > 0.0:
        ch.update({"mix.path": paths[NEW], "mix.coeff": float(mix_coeff)})
    return replace(cfg, **ch)


def finetune_config(k: LMKnobs, pre: TrainConfig, paths: dict[str, str], *, name: str, max_tokens: int,
                    target_loss: float = 0.0, method: str = "none", coeff: float = 0.0, synth: bool = False,
                    lr: float | None = None, replay_batch: int | None = None, evals: int | None = None,
                    replay_buffer: int = 8, max_epochs: float = 0.0, warmup_tokens: int = 0,
                    early_stop_evals: int = 0) -> TrainConfig:
    """Finetunes the finished run `pre` on the new data until `target_loss` (valid_ntp on the new data),
    `early_stop_evals`, or the length cap: `max_epochs` passes over the new data's training split when > 0,
    else `max_tokens`; `prev_ntp` (old data) is the forgetting measure. method: none | kl_pre | ntp_pre |
    replace. Schedule (`k.finetune_lr_decay`, over the cap) and eval cadence (`k.finetune_eval_tokens`,
    else `evals` per run) come from the knobs; `warmup_tokens` > 0 overrides the warm-up."""
    ch = {"run.name": name, "data.path": paths[NEW], "model.load_path": str(train.run_dir(pre)),
          "mix.path": "", "mix.coeff": 0.0,
          "stop.tokens_per_param": 0.0, "stop.num_tokens_train": 0 if max_epochs else int(max_tokens),
          "stop.target_loss": float(target_loss), "stop.early_stop_evals": int(early_stop_evals),
          "reg.method": method, "eval.prev_every": k.prev_every}
    ch.update(_cadence(k, k.finetune_eval_tokens, max_tokens, evals))
    if max_epochs:
        ch["stop.num_epochs"] = float(max_epochs)
    if k.finetune_lr_decay != "none":
        ch["opt.lr_decay"] = k.finetune_lr_decay
    if warmup_tokens:
        ch["opt.warmup_tokens"] = int(warmup_tokens)
    if lr is not None:
        ch["opt.peak_lr"] = lr
    if method in ("kl_pre", "ntp_pre"):
        ch.update({"reg.coeff": float(coeff), "reg.synth": bool(synth), "reg.batch_size": replay_batch or k.batch_size,
                   "reg.buffer": replay_buffer})
        if not synth:
            ch["reg.path"] = paths[OLD]
    elif method == "replace":
        ch.update({"reg.coeff": float(coeff), "reg.path": paths[OLD]})
    return replace(pre, **ch)


@dataclass(frozen=True)
class Pretrain:
    """One pretraining run of a pretrain→finetune sweep and the finetunes that start from it.

    `length`: `pretrain_config`'s keywords (tokens_per_param, max_tokens, target_loss, lr, ...);
    `finetunes`: (run name, `finetune_config` keywords) for each finetune of this checkpoint."""

    name: str
    d_model: int
    length: dict
    finetunes: tuple[tuple[str, dict], ...]


def sweep(k: LMKnobs, out: Path, pretrains: Iterable[Pretrain]) -> list[RunSpec]:
    """The runs of a pretrain→finetune sweep (model size, pretraining length, 2-D grid, learning rate): the
    data run (synthetic data), then every pretraining run and after it its finetunes."""
    specs, paths, after = data_specs(k, out)
    for p in pretrains:
        pre = pretrain_config(k, out, paths, p.d_model, name=p.name, **p.length)
        specs.append(RunSpec(p.name, pre, module=TRAIN, after=after))
        for name, kw in p.finetunes:
            specs.append(RunSpec(name, finetune_config(k, pre, paths, name=name, **kw), module=TRAIN, after=(p.name,)))
    return specs


def kl_or_plain(coeff: float, **kw) -> dict:
    """`finetune_config` keywords of a finetune with the KL penalty on real replay at `coeff` (0: none)."""
    return {"method": "kl_pre" if coeff > 0 else "none", "coeff": coeff, **kw}


def fmt(x: float) -> str:
    """Short run-name text of a number: 3e-03 -> 3e-3, 0.125 -> 0.125, 100.0 -> 100."""
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    if abs(x) < 1e-2:
        m, e = f"{x:.0e}".split("e")
        return f"{m}e{int(e)}"
    return f"{x:g}"


# --------------------------------------------------------------------------------------------- reading


def curve(rows: Iterable[dict], x: str = "tokens", y: str = "valid_ntp") -> tuple[list[float], list[float]]:
    """(xs, ys) of the rows that have both keys."""
    xs, ys = [], []
    for r in rows:
        if r.get(x) is not None and r.get(y) is not None:
            xs.append(float(r[x]))
            ys.append(float(r[y]))
    return xs, ys


def final(path: Path) -> dict:
    """done.json of a finished run, else the last metrics row ({} if none)."""
    d = framework.read_done(path)
    if d:
        return d
    rows = framework.read_metrics(path)
    return rows[-1] if rows else {}


def initial(path: Path) -> dict:
    """The first metrics row (step 0: before any update; for a finetune: the loaded model)."""
    rows = framework.read_metrics(path)
    return rows[0] if rows else {}


def reached(done: dict, target: float) -> bool:
    return bool(done) and (done.get("stop_reason") == "target_loss" or done.get("valid_ntp", math.inf) <= target)


# --------------------------------------------------------------------------------------------- math


def first_crossing(xs: Sequence[float], ys: Sequence[float], level: float, *, interpolate: bool = True) -> float | None:
    """The first x at which the curve y(x) reaches `level` (y <= level); linear interpolation between
    the bracketing points. None if it never does."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= level:
            if i == 0 or not interpolate:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            if y0 == y:
                return float(x)
            return float(x0 + (x - x0) * (y0 - level) / (y0 - y))
    return None


def compute_multiplier(tokens: Sequence[float], losses: Sequence[float], old_loss: float) -> float:
    """Fraction of the pretraining run's tokens at which its validation loss first reached `old_loss`
    (the finetuned model's old-data loss). 1 = nothing forgotten (also when the finetuned model is
    better than the end of pretraining); small = the finetuned model is only as good on the old data as
    an early checkpoint. If the curve never gets that low, 1; if it starts below it, tokens[0]/total."""
    if not tokens:
        return float("nan")
    total = float(tokens[-1])
    if old_loss <= min(losses):
        return 1.0
    x = first_crossing(tokens, losses, old_loss)
    return min(1.0, max(0.0, (x if x is not None else total) / total))


def pareto_frontier(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points when both coordinates are minimized, sorted by the first coordinate
    (so the second decreases along it)."""
    front: list[tuple[float, float]] = []
    best_y = math.inf
    for x, y in sorted((float(a), float(b)) for a, b in points):
        if y < best_y:
            if front and front[-1][0] == x:
                front[-1] = (x, y)
            else:
                front.append((x, y))
            best_y = y
    return front


def behind_frontier(front: Sequence[tuple[float, float]], x: float, y: float) -> float | None:
    """How far the point (x, y) lies behind the frontier (`pareto_frontier` output, x increasing, y
    decreasing): y minus the frontier's y at x, linearly interpolated between frontier points. > 0: behind
    (dominated side), < 0: beyond it. None where x is outside the frontier's x range."""
    if not front or not front[0][0] <= x <= front[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= x <= x1:
            return float(y - (y0 + (y1 - y0) * (x - x0) / (x1 - x0)))
    return float(y - front[0][1])  # a one-point frontier and x equal to it


def time_to_reach(points: Iterable[tuple[float, float]], level: float, *, log_time: bool = True) -> float | None:
    """Least time at which a family of runs reaches old loss <= level. `points` = (time, old loss), one
    per run; between two frontier points the time is interpolated (in log time by default). None if no
    run gets that low."""
    front = pareto_frontier(points)  # time increasing, loss decreasing
    for i, (t, y) in enumerate(front):
        if y <= level:
            if i == 0 or y == level:
                return t
            t0, y0 = front[i - 1]
            w = (y0 - level) / (y0 - y)
            if log_time and t0 > 0 and t > 0:
                return float(math.exp(math.log(t0) + w * (math.log(t) - math.log(t0))))
            return float(t0 + w * (t - t0))
    return None


def compute_ratio_at_equal_loss(slow: Iterable[tuple[float, float]], fast: Iterable[tuple[float, float]],
                                level: float | None = None) -> dict:
    """How much longer family `slow` (e.g. lowered LR) takes than family `fast` (e.g. replay) to reach the
    same old-data loss. Default level: the lowest old loss both families reach. Returns {"level",
    "time_slow", "time_fast", "ratio"} (ratio None where one family never reaches the level)."""
    slow, fast = list(slow), list(fast)
    if level is None:
        if not slow or not fast:
            return {"level": None, "time_slow": None, "time_fast": None, "ratio": None}
        level = max(min(y for _, y in slow), min(y for _, y in fast))
    ts, tf = time_to_reach(slow, level), time_to_reach(fast, level)
    ratio = ts / tf if ts is not None and tf not in (None, 0) else None
    return {"level": level, "time_slow": ts, "time_fast": tf, "ratio": ratio}


def steps_to_target(rows: Iterable[dict], target: float, key: str = "valid_ntp") -> int | None:
    """Step of the first evaluation with `key` <= target (None if never)."""
    for r in rows:
        if r.get(key) is not None and r[key] <= target:
            return int(r["step"])
    return None


def nan_to_none(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x
