"""The in-process train API: `run(cfg) -> RunResult`, what `python -m forgetting.stages.train` runs.

    config (train_config) -> plan (plan) -> loop (loop, over LoopState) -> run directory (run_dir)

`run` validates the config, resolves it, names its run directory (a finished one is reused at once), builds
the plan, takes the directory's lock, records or checks the inputs, and trains: `Trainer` is the loop's
`Steps` (the batch, the step and its timing, evals, checkpoints, signals, hooks)."""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from forgetting.core import data as data_lib
from forgetting.core import multihost
from forgetting.training import cli, loop, stopping
from forgetting.training import plan as plan_lib
from forgetting.training.eval_row import Evaluator
from forgetting.training.run_dir import RunDir, fingerprints
from forgetting.training.runs import Interrupted
from forgetting.training.train_config import TrainConfig

STOP_POLL_STEPS = 10  # multi-process: how often (in steps) the processes agree on a pending stop request


@dataclasses.dataclass(frozen=True)
class RunResult:
    run_dir: str
    metrics: dict  # the final row (done.json): the last eval's metrics, stop_reason and steps
    status: str  # "finished" (trained now, or resumed and finished) | "reused" (finished before)

    def as_dict(self) -> dict:
        return {"run_dir": self.run_dir, "metrics": self.metrics, "status": self.status}

    def __getitem__(self, key: str) -> Any:  # result["run_dir"], as the stage's dict
        return self.as_dict()[key]


def run(cfg: TrainConfig) -> RunResult:
    """Runs (or reuses, or resumes) the training run of `cfg`.

    One process writes a run directory at a time (`runs.RunLock`); a resumed run must read the same input
    files it started with (`runs.check_inputs`)."""
    cfg.validate()
    cfg, dtype_choice = plan_lib.resolve_config(cfg)
    plan_lib.announce(dtype_choice)
    rd = RunDir.of(cfg)
    if rd.is_done():
        return RunResult(str(rd.path), rd.result(), "reused")
    plan = plan_lib.build(cfg, dtype_choice)
    try:
        trainer = Trainer(plan, rd)
        inputs = fingerprints(plan.input_files)
        rd.path.mkdir(parents=True, exist_ok=True)
        # Signal handlers from here on: a Ctrl-C or SIGTERM while this process owns the run directory is
        # answered with a checkpoint between steps (before this point there is nothing to save).
        with rd.lock(), stopping.StopRequests() as stop_requests:
            if rd.is_done():  # another process finished it while this one was setting up
                return RunResult(str(rd.path), rd.result(), "reused")
            rd.remove_temp_files()  # left by a killed writer; safe: we hold the lock
            rd.bind(plan.cfg, plan.resolved, inputs, plan.dtype_choice)
            final = trainer.train(stop_requests)
    finally:
        if plan.replay is not None:
            plan.replay.close()  # the replay prefetch thread
    return RunResult(str(rd.path), final, "finished")


class Trainer:
    """The train stage's `loop.Steps`: what happens at each point of the loop, for one plan and run directory."""

    def __init__(self, plan: plan_lib.Plan, rd: RunDir):
        self.plan, self.rd, self.cfg = plan, rd, plan.cfg
        self.total_steps, self.length_criterion = plan.schedule.total_steps, plan.schedule.length_criterion
        self.eval_every, self.stop = plan.schedule.eval_every, plan.cfg.stop
        self.evaluator = Evaluator(plan)
        self.stop_requests = stopping.StopRequests()
        self.last_row: dict | None = None
        self.bar = self.logger = None

    # ----- start and finish ----------------------------------------------------------------------------
    def train(self, stop_requests: stopping.StopRequests | None = None) -> dict:
        """Trains from the checkpoint (or from step 0) to a stop reason; writes the final weights and done.json."""
        self.stop_requests = stop_requests or self.stop_requests
        st, fresh = self.start()
        self.logger = _wandb_logger(self.cfg, self.rd)
        if fresh:  # evaluate and checkpoint step 0
            self.log(self.evaluator.row(st.train, 0, [], [], st.clock))
            self.save(st, wall_time=self.last_row["wall_time"])
        self.bar = _progress(self.cfg, self.total_steps, st.step) if st.stop_reason is None else None
        st = loop.run(self, st)
        if self.bar is not None:
            self.bar.close()
        if self.last_row is None or self.last_row["step"] != st.step:
            self.log(self.complete(st, self.evaluator.row(st.train, st.step, st.losses, st.terms, st.clock)))
        final = dict(self.last_row, stop_reason=st.stop_reason, steps=st.step)
        self.rd.finish(self.evaluator.params_now(st.train), cli.to_dict(self.plan.model_cfg), final)
        if self.logger is not None:
            self.logger.finish()
        return final

    def start(self) -> tuple[loop.LoopState, bool]:
        """(the loop state to train from, whether it is fresh): the checkpoint's (metrics after it dropped),
        else step 0's."""
        if not self.rd.has_state():
            self.rd.keep_metrics_until(-1)  # rows of an attempt killed before its first checkpoint
            return loop.LoopState.start(self.plan.initial_state()), True
        tree, step = self.rd.restore_state(loop.checkpoint_template(self.plan.abstract_state(), self.eval_every))
        st = loop.LoopState.from_checkpoint({"state": self.plan.placement.put_state(tree["state"]),
                                             "extras": tree["extras"]}, step)
        kept = self.rd.keep_metrics_until(step)
        self.last_row = kept[-1] if kept and kept[-1]["step"] == step else None  # logged before the save
        st.clock.first_step = st.clock.first_step_timed = step
        print(f"resuming {self.rd.path} at step {step}", file=sys.stderr)
        return st, False

    # ----- the step --------------------------------------------------------------------------------------
    def batch(self, step: int) -> dict:
        """The placed batch of `step`: new data (mixed, or with rows replaced), replay rows, the loss mask."""
        p, cfg = self.plan, self.cfg
        tokens = p.data.train.train_batch(step, cfg.opt.batch_size, cfg.run.seed)
        if p.data.mix is not None:
            rows = p.data.mix.train_batch(step, cfg.opt.batch_size, cfg.run.seed + 1)
            tokens = data_lib.mix_batch(tokens, rows, cfg.mix.coeff)
        batch = {}
        if cfg.reg.method == "replace":
            tokens = data_lib.replace_batch(tokens, p.replay.rows(step), cfg.reg.coeff)
        elif cfg.reg.method in ("ntp_pre", "kl_pre"):
            batch["replay"] = p.replay.rows(step)
            ref_hidden = p.replay.ref_hidden(step)
            if ref_hidden is not None:  # the sampler's, for the KL (`--reg.reference_hidden`)
                batch["replay_ref_hidden"] = ref_hidden
        batch["tokens"] = tokens
        # packed data: padding targets do not count; conversations: only assistant tokens count
        dataset = p.data.train
        mask = (dataset.train_loss_mask(step, cfg.opt.batch_size, cfg.run.seed) if dataset.has_assistant_mask
                else dataset.loss_mask(tokens))
        if mask is not None:
            batch["mask"] = mask
        return p.placement.put_batch(batch)

    def step(self, st: loop.LoopState) -> dict:
        """One train step, timed: the first UNTIMED_STEPS of each process are left out of train_seconds, the
        compiling one out of the throughput."""
        c = st.clock
        t0 = time.perf_counter()
        st.train, metrics = self.plan.train_step(st.train, self.batch(st.step), self.plan.frozen)
        st.losses.append(metrics["loss"])
        st.terms.append((metrics["ntp"], metrics["reg"]))
        st.step += 1
        step = st.step
        if (not c.compiled or step % 10 == 0 or step == self.total_steps or step % self.eval_every == 0
                or step - c.first_step == loop.UNTIMED_STEPS):
            jax.block_until_ready(metrics["loss"])
        seconds = time.perf_counter() - t0
        if step - c.first_step > loop.UNTIMED_STEPS:
            c.timed_seconds += seconds
        if not c.compiled:
            c.compiled, c.first_step_timed = True, step  # the compiling step does not count towards throughput
        else:
            c.throughput_seconds += seconds
        return metrics

    def on_step(self, st: loop.LoopState, metrics: dict) -> None:
        """Hooks after each step: the progress bar (with the loss and throughput every 10 steps)."""
        if self.bar is None:
            return
        if st.step % 10 == 0:
            tok_s = st.clock.tokens_per_s(st.step, self.plan.schedule.tokens_per_step)
            self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", tok_s=f"{tok_s:,.0f}")
        self.bar.update(1)

    # ----- evals, checkpoints, signals -------------------------------------------------------------------
    def evaluate(self, st: loop.LoopState) -> dict:
        jax.block_until_ready(st.train.params)
        mean_loss = float(np.mean(jax.device_get(st.losses)))
        if not math.isfinite(mean_loss):
            raise FloatingPointError(divergence_message(self.plan, self.rd, mean_loss, st.step - len(st.losses), st.step))
        return self.evaluator.row(st.train, st.step, st.losses, st.terms, st.clock)

    def complete(self, st: loop.LoopState, row: dict) -> dict:
        return self.evaluator.complete(st.train, row)

    def log(self, row: dict) -> None:
        self.rd.append_metrics(row)
        if self.logger is not None:
            self.logger.log(row, step=row["step"])
        self.last_row = row

    def save(self, st: loop.LoopState, wall_time: float | None = None) -> None:
        self.rd.save_state(st.checkpoint(self.eval_every, wall_time), st.step)
        st.clock.last_checkpoint = time.perf_counter()

    def maybe_checkpoint(self, st: loop.LoopState, at_eval: bool) -> None:
        """At every eval, unless the run has a checkpoint cadence of its own; then on that cadence (between
        evals too, with the losses since the last eval). Every process follows process 0's clock."""
        every, minutes = self.cfg.log.checkpoint_every_steps, self.cfg.log.checkpoint_minutes
        if at_eval and not (every or minutes):
            self.save(st, wall_time=self.last_row["wall_time"])
            return
        due = loop.checkpoint_due(st.step, every, minutes, time.perf_counter() - st.clock.last_checkpoint)
        if minutes:
            due = multihost.agree(due)
        if due:
            self.save(st, wall_time=self.last_row["wall_time"] if at_eval else None)

    def stop_signal(self, st: loop.LoopState) -> None:
        """Ctrl-C / SIGTERM: checkpoint between steps, then stop (`runs.Interrupted`)."""
        signum = agreed_stop(self.stop_requests, st.step)
        if signum:
            self.save(st)
            raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {st.step}; the checkpoint is saved "
                              f"in {self.rd.path}. Rerun the same command to resume (it ends with the numbers an "
                              "uninterrupted run gives)", 128 + signum)


def agreed_stop(stop_requests: stopping.StopRequests, step: int) -> int:
    """The signal to stop on before `step` (0: go on), one decision for all processes.

    Each process of a multi-process run gets its own signal (or only one of them does): a process that
    stopped alone would leave the others waiting in a collective. So every STOP_POLL_STEPS steps the
    processes take the largest signal number any of them saw (an OR of the flags) and all stop at that
    step; in between the request waits. One process polls every step (no collective to wait on)."""
    local = stop_requests.signum or 0
    if not multihost.is_multiprocess():
        return local
    if step % STOP_POLL_STEPS:
        return 0
    return multihost.agree_max(local)


def _non_finite_leaves(tree: Any) -> list[str]:
    """The paths of the leaves of `tree` holding a NaN or an infinity."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    finite = jax.device_get([jax.numpy.isfinite(leaf).all() for _, leaf in flat])
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, finite) if not ok]


def divergence_message(plan: plan_lib.Plan, rd: RunDir, mean_loss: float, good: int, step: int) -> str:
    """Why the training loss is not finite: a model that computes no finite loss before any update (its
    weights, or a model field) is not the learning rate's fault; only a loss that was finite at step 0
    and diverged since is blamed on the optimization settings."""
    cfg = plan.cfg
    start = plan.reference.params if plan.reference.params is not None else plan.model.init_params
    bad = _non_finite_leaves(start) if start is not None else []
    rows = rd.metrics()
    first = rows[0].get("valid_ntp") if rows and rows[0].get("step") == 0 else None
    where = f"the loaded checkpoint {plan.model.loaded_from}" if cfg.model.loads else "the initialization"
    if bad:
        return (f"training loss became {mean_loss} between steps {good} and {step}: {where} already holds "
                f"non-finite weights ({', '.join(bad[:5])}), so the learning rate is not the cause; use a checkpoint "
                "with finite weights")
    if first is not None and not math.isfinite(first):
        return (f"training loss became {mean_loss} between steps {good} and {step}, and the validation loss "
                f"was already {first} at step 0, before any update: the learning rate is not the cause. Check "
                f"the model's fields ({'the checkpoint config of ' + where if cfg.model.loads else '--model.* flags'}"
                ", e.g. rope_base/rope_theta, norm_eps, dtype) and the data")
    return (f"training loss became {mean_loss} between steps {good} and {step} (it was finite at step 0). "
            "Training is deterministic, so rerunning this command diverges again. Start a new run with a lower "
            "--opt.peak_lr, a longer --opt.warmup_tokens or --model.dtype float32 (changed flags make a new run "
            f"directory, trained from step 0); {rd.path} (last good checkpoint: step {good}) can then be deleted")


def _progress(cfg: TrainConfig, total: int | None, initial: int):
    if not cfg.log.progress or not multihost.is_writer():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=None)


def _wandb_logger(cfg: TrainConfig, rd: RunDir):
    if not cfg.log.wandb or not multihost.is_writer():
        return None
    try:
        import wandb
    except ImportError:
        raise ImportError("--log.wandb true needs Weights & Biases: pip install 'forgetting[wandb]'") from None
    return wandb.init(project=cfg.log.wandb_project, name=rd.name, id=rd.name, resume="allow",
                      config=cli.to_dict(cfg), dir=str(rd.path))
