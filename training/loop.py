"""The train loop over one state value, `LoopState`, which is also the checkpoint: `checkpoint()` writes it
as a tree and `checkpoint_template()` (the same code) gives the tree a restore fills in.

The decisions are small pure functions (tests/test_train_decisions.py): `eval_due`, `checkpoint_due`,
`out_of_time`, `after_eval` (best loss, evals since best, stop reason). `run` is the loop itself; what it
does at each point (a step, an eval, a save, a signal) is the `Steps` object's, and the progress bar,
wandb and throughput timing hang on its hooks.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Protocol

import jax
import numpy as np

from forgetting.core import multihost

# Saved as an index into this tuple (0: not stopped). Length criteria are named after their flag.
STOP_REASONS = (None, "target_loss", "early_stop", "train_time", "num_tokens_train", "tokens_per_param", "num_epochs")
UNTIMED_STEPS = 5  # steps at the start of each process left out of `train_seconds` (the authors' measure_time)


@dataclasses.dataclass
class Clock:
    """This process's timing (not saved: a resumed process starts its own; only the saved totals carry over)."""

    train_seconds: float = 0.0  # training time of earlier processes (from the checkpoint)
    timed_seconds: float = 0.0  # training time of this process, after its first UNTIMED_STEPS steps
    wall_start: float = 0.0  # perf_counter at which the run (all processes together) would have started
    first_step: int = 0  # the step this process started at
    first_step_timed: int = 0  # the first step counted towards throughput (after the compiling one)
    throughput_seconds: float = 0.0
    compiled: bool = False
    last_checkpoint: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def total_train_seconds(self) -> float:
        return self.train_seconds + self.timed_seconds

    def wall(self) -> float:
        return time.perf_counter() - self.wall_start

    def tokens_per_s(self, step: int, tokens_per_step: int) -> float:
        """New-data tokens per second of training over the steps after this process's compiling one."""
        return (step - self.first_step_timed) * tokens_per_step / max(self.throughput_seconds, 1e-9)


@dataclasses.dataclass
class LoopState:
    """Everything the loop carries from step to step; `checkpoint()` of it is what state.msgpack holds."""

    step: int
    train: Any  # core.step.TrainState
    losses: list  # the objective per step since the last eval (device scalars)
    terms: list  # (ntp, reg) per step since the last eval: the objective's two terms
    best_valid: np.float32 = np.float32(np.inf)
    evals_since_best: int = 0
    stop_reason: str | None = None
    clock: Clock = dataclasses.field(default_factory=Clock)

    @classmethod
    def start(cls, train_state: Any) -> "LoopState":
        return cls(step=0, train=train_state, losses=[], terms=[], clock=Clock(wall_start=time.perf_counter()))

    def checkpoint(self, eval_every: int, wall_time: float | None = None) -> dict:
        """The checkpoint tree: the train state and the loop's extras (`wall_time`: the eval row's, at an eval)."""
        pending = np.zeros((eval_every,), np.float32)
        pending[: len(self.losses)] = np.asarray(jax.device_get(self.losses), np.float32).reshape(-1)
        pending_terms = np.zeros((eval_every, 2), np.float32)
        pending_terms[: len(self.terms)] = np.asarray(jax.device_get(self.terms), np.float32).reshape(-1, 2)
        extras = {"best_valid": np.float32(self.best_valid), "evals_since_best": np.int32(self.evals_since_best),
                  "train_seconds": np.float32(self.clock.total_train_seconds),
                  "wall_time": np.float32(self.clock.wall() if wall_time is None else wall_time),
                  "stop_code": np.int32(STOP_REASONS.index(self.stop_reason)),
                  "pending_losses": pending, "pending_terms": pending_terms, "n_pending": np.int32(len(self.losses))}
        return {"state": self.train, "extras": extras}

    @classmethod
    def from_checkpoint(cls, tree: dict, step: int) -> "LoopState":
        """The state a checkpoint holds (its step from the checkpoint's metadata); this process's clock starts now."""
        e = jax.device_get(tree["extras"])
        n = int(e["n_pending"])  # an interrupt between evals: the steps' losses since the last eval
        clock = Clock(train_seconds=float(e["train_seconds"]), wall_start=time.perf_counter() - float(e["wall_time"]))
        return cls(step=step, train=tree["state"], losses=list(e["pending_losses"][:n]),
                   terms=[tuple(t) for t in e["pending_terms"][:n]], best_valid=np.float32(e["best_valid"]),
                   evals_since_best=int(e["evals_since_best"]), stop_reason=STOP_REASONS[int(e["stop_code"])],
                   clock=clock)


def checkpoint_template(train_state: Any, eval_every: int) -> dict:
    """What a restore fills in: the checkpoint of a fresh state (the same code writes both)."""
    return LoopState.start(train_state).checkpoint(eval_every)


# ---------------------------------------------------------------------------------------------- decisions


def at_length(step: int, total_steps: int | None) -> bool:
    """Whether the run's fixed length (if it has one) is reached."""
    return total_steps is not None and step >= total_steps


def out_of_time(train_seconds: float, limit: float) -> bool:
    """--stop.train_time reached (0: no limit)."""
    return bool(limit) and train_seconds >= limit


def eval_due(step: int, eval_every: int, at_end: bool, out_of_time: bool) -> bool:
    """An eval after `step`: on the cadence, and at the end of the run whatever the cadence."""
    return step % eval_every == 0 or at_end or out_of_time


def checkpoint_due(step: int, every_steps: int, minutes: float, seconds_since_last: float) -> bool:
    """With a checkpoint cadence of its own (--log.checkpoint_every_steps / --log.checkpoint_minutes)."""
    return (bool(every_steps) and step % every_steps == 0) or (bool(minutes) and seconds_since_last >= 60 * minutes)


@dataclasses.dataclass(frozen=True)
class AfterEval:
    best_valid: np.float32
    evals_since_best: int
    stop_reason: str | None


def after_eval(best_valid: np.float32, evals_since_best: int, valid: float, stop: Any, out_of_time: bool,
               at_end: bool, length_criterion: str | None) -> AfterEval:
    """What an eval with validation loss `valid` changes: the best loss, evals since it, and whether to stop
    (`stop`: the --stop.* flags). Compared in float32, as stored: a float64 loss just under its own float32
    rounding would count as a new best at every eval and early stopping would never trigger."""
    if np.float32(valid) < best_valid:
        best_valid, evals_since_best = np.float32(valid), 0
    else:
        evals_since_best += 1
    reason = None
    if stop.target_loss and valid <= stop.target_loss:
        reason = "target_loss"
    elif stop.early_stop_evals and evals_since_best > stop.early_stop_evals:
        reason = "early_stop"
    elif out_of_time:
        reason = "train_time"
    elif at_end:
        reason = length_criterion
    return AfterEval(best_valid, evals_since_best, reason)


# ---------------------------------------------------------------------------------------------- the loop


class Steps(Protocol):
    """What the loop does at each point; `training.runner.Trainer` is the train stage's."""

    total_steps: int | None
    length_criterion: str | None
    eval_every: int
    stop: Any  # the --stop.* flags

    def stop_signal(self, st: LoopState) -> None: ...  # raises runs.Interrupted after a checkpoint
    def step(self, st: LoopState) -> dict: ...  # one train step (st.step advances)
    def on_step(self, st: LoopState, metrics: dict) -> None: ...  # hooks: progress bar, throughput
    def maybe_checkpoint(self, st: LoopState, at_eval: bool) -> None: ...
    def evaluate(self, st: LoopState) -> dict: ...  # the eval row (pending losses included)
    def complete(self, st: LoopState, row: dict) -> dict: ...  # the last eval row: what the cadences left out added
    def log(self, row: dict) -> None: ...


def run(steps: Steps, st: LoopState) -> LoopState:
    """Train until a stop reason: step, then an eval when due (which may stop the run), and checkpoints."""
    while st.stop_reason is None:
        if at_length(st.step, steps.total_steps):
            st.stop_reason = steps.length_criterion
            break
        steps.stop_signal(st)
        metrics = steps.step(st)
        steps.on_step(st, metrics)
        at_end = at_length(st.step, steps.total_steps)
        timeout = out_of_time(st.clock.total_train_seconds, steps.stop.train_time)
        if steps.stop.train_time:  # clocks differ between processes: all follow process 0's decision
            timeout = multihost.agree(timeout)
        if not eval_due(st.step, steps.eval_every, at_end, timeout):
            steps.maybe_checkpoint(st, at_eval=False)
            continue
        row = steps.evaluate(st)
        st.losses, st.terms = [], []
        decided = after_eval(st.best_valid, st.evals_since_best, row["valid_ntp"], steps.stop, timeout, at_end,
                             steps.length_criterion)
        st.best_valid, st.evals_since_best, st.stop_reason = decided.best_valid, decided.evals_since_best, decided.stop_reason
        if st.stop_reason is not None:  # known only once the row's validation loss is: the row is then completed
            row = steps.complete(st, row)
        steps.log(row)
        steps.maybe_checkpoint(st, at_eval=True)
    return st
