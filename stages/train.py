"""The train stage: pretrain, or finetune with any of the paper's forgetting-prevention methods.

    python -m forgetting.stages.train --data.path en.bin --model.d_model 128 --model.n_layers 4 \
        --model.head_dim 32 --model.seq_len 128 --opt.batch_size 32 --stop.num_tokens_train 1_000_000
    python -m forgetting.stages.train --data.path es.bin --model.load_path runs/<run> \
        --reg.method kl_pre --reg.coeff 10 --reg.synth true --reg.batch_size 16 --reg.buffer 8

Finetuning (`--model.load_path`) starts θ at the loaded weights, freezes a copy as the reference p_ref,
restarts the optimizer with warm-up, and evaluates the loaded run's own validation data as `prev_*`
(the forgetting measure). The run directory is named from the config hash: running a finished config
again returns at once; running an unfinished one resumes from its last checkpoint and ends with the
same numbers as an uninterrupted run. The last stdout line is one JSON object with `run_dir` and the
final metrics. In a multi-process run (`jax.distributed`, see core.sharding.initialize_distributed) every
process computes the same rows; process 0 alone writes them, the config, the done marker and stdout's
JSON, and each process writes its own checkpoint shards (core.sharded_checkpoint).

Checkpoints (`state.msgpack`) are written at every eval, or with `--log.checkpoint_every_steps` /
`--log.checkpoint_minutes` on a cadence of their own (between evals they carry the losses since the last
eval, so a resume still ends with the uninterrupted run's numbers).

Timing: `train_seconds` (the time axis of the high-LR figure and `--stop.train_time`) is training time as
the authors' `log.measure_time` counts it: it leaves out the first 5 steps of each process (compilation
and warm-up) and evaluations. Unlike theirs it includes assembling each step's batch, so reading real
replay rows and sampling self-generated replay count as training time.

Metrics per eval beyond the losses on each dataset: `train_loss` (the objective), `train_loss_ntp` and
`train_loss_reg` (its two terms, averaged since the last eval), `epoch` (passes over the training split),
`mix_ntp`/`mix_ntp_h2` for the `--mix.path` dataset, and `valid_kl` — in pretraining KL(init ‖ θ), the KL
to the initialization, as the authors log it; in finetuning KL(p_ref ‖ θ).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import numpy as np

from forgetting.core import lora, multihost, sharded_checkpoint, step as step_lib
from forgetting.training import cli, runs, stopping
from forgetting.training.train_config import TrainConfig, replace  # noqa: F401  (re-exported for experiments)
from forgetting.training.train_setup import Setup, build_setup

run_dir = runs.run_dir
Config = TrainConfig


def _same_tree(a: Any, b: Any) -> bool:
    """Bitwise-equal pytrees of arrays (same structure, shapes, dtypes and values)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    if any(x.shape != y.shape or x.dtype != y.dtype for x, y in pairs):
        return False
    return all(bool(v) for v in jax.device_get([jnp.array_equal(x, y) for x, y in pairs]))


def _non_finite_leaves(tree: Any) -> list[str]:
    """The paths of the leaves of `tree` holding a NaN or an infinity."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    finite = jax.device_get([jnp.isfinite(leaf).all() for _, leaf in flat])
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, finite) if not ok]


def _norm(tree: Any) -> float:
    return float(optax.tree.norm(tree))


def _diff_norm(a: Any, b: Any) -> float:
    return _norm(jax.tree.map(lambda x, y: x.astype(jnp.float32) - y.astype(jnp.float32), a, b))


UNTIMED_STEPS = 5  # steps at the start of each process left out of `train_seconds` (the authors' measure_time)


class _Trainer:
    def __init__(self, cfg: TrainConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.s: Setup = build_setup(cfg)
        if self.s.dataset.has_assistant_mask and (self.s.mix_dataset is not None or cfg.reg.method == "replace"):
            raise ValueError(f"{cfg.data.path} has an assistant-only loss mask, which --mix and --reg.method replace "
                             "would misalign (they swap rows); use kl/ntp replay or tokenize without --chat")
        self.eval_step = step_lib.make_eval_step(self.s.model_cfg)
        self.hidden_fn = step_lib.make_hidden_fn(self.s.model_cfg)
        self._splits: dict[str, Any] = {}  # eval sets kept across evals (evaluation.EvalSplit)
        self._last_checkpoint = time.perf_counter()
        self._harness = _lm_eval_scorer(cfg, self.s)

    # ----- batches -------------------------------------------------------------------------------
    def batch(self, step: int) -> dict:
        s, cfg = self.s, self.cfg
        tokens = s.dataset.train_batch(step, cfg.opt.batch_size, cfg.run.seed)
        if s.mix_dataset is not None:
            rows = s.mix_dataset.train_batch(step, cfg.opt.batch_size, cfg.run.seed + 1)
            tokens = s.data_lib.mix_batch(tokens, rows, cfg.mix.coeff)
        batch = {}
        if cfg.reg.method == "replace":
            tokens = s.data_lib.replace_batch(tokens, s.replay.rows(step), cfg.reg.coeff)
        elif cfg.reg.method in ("ntp_pre", "kl_pre"):
            batch["replay"] = s.replay.rows(step)
            ref_hidden = getattr(s.replay, "ref_hidden", lambda step: None)(step)
            if ref_hidden is not None:  # the sampler's, for the KL (`--reg.reference_hidden`)
                batch["replay_ref_hidden"] = ref_hidden
        batch["tokens"] = tokens
        # packed data: padding targets do not count; conversations: only assistant tokens count
        mask = (s.dataset.train_loss_mask(step, cfg.opt.batch_size, cfg.run.seed) if s.dataset.has_assistant_mask
                else s.dataset.loss_mask(tokens))
        if mask is not None:
            batch["mask"] = mask
        return s.put_batch(batch)

    # ----- evaluation ----------------------------------------------------------------------------
    def params_now(self, state) -> Any:
        s = self.s
        return lora.merge(s.model_cfg, s.frozen["base"], state.params) if s.use_lora else state.params

    def evaluate(self, state, step: int, train_losses: list, train_seconds: float, wall: float,
                 train_terms: list | None = None) -> dict:
        from forgetting.evals import evaluation

        s, cfg = self.s, self.cfg
        params = self.params_now(state)
        ref = s.frozen.get("ref")
        row: dict = {"step": step, "tokens": step * s.tokens_per_step, "lr": float(s.schedule(step)),
                     "epoch": step * cfg.opt.batch_size / s.dataset.num_train}
        if train_losses:
            row["train_loss"] = float(np.mean(jax.device_get(train_losses)))
        if train_terms:
            ntp, reg = np.mean(np.asarray(jax.device_get(train_terms), np.float64), axis=0)
            row["train_loss_ntp"], row["train_loss_reg"] = float(ntp), float(reg)
        kl_ref = ref if ref is not None else s.init_params  # pretraining: KL to the initialization
        # θ is bitwise the reference at the start of a run: KL is exactly 0 and the reference need not run
        same = step == 0 and kl_ref is not None and _same_tree(params, kl_ref)
        for prefix, dataset in (("valid", s.dataset), ("prev", s.prev_dataset), ("mix", s.mix_dataset)):
            if dataset is None:
                continue
            m = evaluation.ntp_and_kl_split(self.eval_step, self.hidden_fn, params, self._split(prefix, dataset),
                                            kl_ref, same)
            row.update({f"{prefix}_{k}": v for k, v in m.items()})
            span = evaluation.answer_span(dataset.token_file.meta)
            if span:
                row[f"{prefix}_acc"] = evaluation.exact_match(s.model_cfg, params, dataset, s.eval_batch_size, span,
                                                              cfg.eval.max_tokens)
        for name, dataset in s.extra_datasets.items():
            split = self._split(f"extra/{name}", dataset)
            row[f"ntp/{name}"] = evaluation.ntp_and_kl_split(self.eval_step, self.hidden_fn, params, split)["ntp"]
            span = evaluation.answer_span(dataset.token_file.meta)
            if span:
                row[f"acc/{name}"] = evaluation.exact_match(s.model_cfg, params, dataset, s.eval_batch_size, span,
                                                            cfg.eval.max_tokens)
        if cfg.eval.token_accuracy:
            row["valid_token_acc"] = evaluation.split_token_accuracy(s.model_cfg, params, self._split("valid", s.dataset))
        row.update(evaluation.ref_path_measures(self._splits, cfg.eval.ref_paths, s.model_cfg, params, ref, same,
                                                s.eval_batch_size, s.dataset.token_file.meta.get("tokenizer_sha256")))
        row.update(self._lm_eval_scores(params, step))
        row["weight_norm"] = _norm(params)
        if ref is not None:
            moved = _diff_norm(params, ref)
            row["dist_to_ref"] = moved
            if s.ref_init_distance:
                row["rel_dist_to_ref"] = moved / s.ref_init_distance
        row["train_seconds"] = train_seconds
        row["wall_time"] = wall
        # Throughput over steps after the first of this process (that one compiles): new-data tokens per
        # second of training, replay sampling included, evaluation excluded.
        row["tokens_per_s"] = (step - s.first_step_timed) * s.tokens_per_step / max(s.throughput_seconds, 1e-9)
        return row

    def _lm_eval_scores(self, params, step: int) -> dict:
        """--eval.lm_eval_tasks at every --eval.lm_eval_every-th eval: `lm_eval/<task>/<metric>` keys."""
        if self._harness is None or (step // self.s.eval_every) % self.cfg.eval.lm_eval_every:
            return {}
        return self._harness.scores(params, step)

    def _split(self, key: str, dataset) -> Any:
        from forgetting.evals import evaluation

        if key not in self._splits:
            cfg = self.cfg
            # The reference's hidden states are kept on the one-device, one-process path only.
            single = not cfg.run.mesh and jax.process_count() == 1
            budget = cfg.eval.reference_cache_mb * 2**20 if single else 0
            self._splits[key] = evaluation.EvalSplit(dataset, self.s.eval_batch_size, cfg.eval.max_tokens, budget)
        return self._splits[key]

    # ----- checkpoints ---------------------------------------------------------------------------
    @property
    def _own_checkpoint_cadence(self) -> bool:
        return bool(self.cfg.log.checkpoint_every_steps or self.cfg.log.checkpoint_minutes)

    def _checkpoint_due(self, step: int) -> bool:
        """With a checkpoint cadence of its own (--log.checkpoint_every_steps / --log.checkpoint_minutes):
        whether one is due after `step`. Every process follows process 0's clock."""
        every, minutes = self.cfg.log.checkpoint_every_steps, self.cfg.log.checkpoint_minutes
        due = bool(every) and step % every == 0
        if minutes:
            due = multihost.agree(due or time.perf_counter() - self._last_checkpoint >= 60 * minutes)
        return due

    def save_state(self, state, step: int, extras: dict) -> None:
        runs.save_checkpoint(self.out / runs.STATE_FILE, {"state": state, "extras": extras}, {"step": step})
        self._last_checkpoint = time.perf_counter()
        runs.fault_point(f"state_saved:{step}")

    def restore_state(self, template_state) -> tuple[Any, int, dict] | None:
        path = self.out / runs.STATE_FILE
        if not sharded_checkpoint.exists(path):
            return None
        template = {"state": template_state, "extras": _extras_template(self.s.eval_every)}
        step = _checkpoint_step(path)
        try:
            restored = sharded_checkpoint.restore(path, template)
        except ValueError as e:
            raise ValueError(_state_advice(e, path)) from None
        return self.s.put_state(restored["state"]), step, jax.device_get(restored["extras"])

    # ----- the loop ------------------------------------------------------------------------------
    def train(self, stop_requests: "_StopRequests | None" = None) -> dict:
        s, cfg = self.s, self.cfg
        stop_requests = stop_requests or _StopRequests()
        state = self.s.initial_state()
        extras = {"best_valid": np.float32(np.inf), "evals_since_best": np.int32(0),
                  "train_seconds": np.float32(0.0), "wall_time": np.float32(0.0), "stop_code": np.int32(0),
                  **_pending([], [], s.eval_every)}
        resumed = self.restore_state(state)
        step, last_row, losses, terms = 0, None, [], []  # terms: (ntp, reg) per step, the objective's two terms
        if resumed is not None:
            state, step, extras = resumed
            kept = runs.truncate_metrics(self.out, step)
            last_row = kept[-1] if kept and kept[-1]["step"] == step else None  # logged before the save
            n = int(extras["n_pending"])  # an interrupt between evals: the steps' losses since the last eval
            losses, terms = list(extras["pending_losses"][:n]), [tuple(t) for t in extras["pending_terms"][:n]]
            print(f"resuming {self.out} at step {step}", file=sys.stderr)
        else:
            runs.truncate_metrics(self.out, -1)  # rows of an attempt killed before its first checkpoint
        # The stop decision is part of the saved state: a run killed after deciding to stop finishes here.
        stop_reason = STOP_REASONS[int(extras["stop_code"])]
        train_step = s.train_step
        logger = _wandb_logger(cfg, self.out)
        train_seconds, wall_start = float(extras["train_seconds"]), time.perf_counter() - float(extras["wall_time"])
        s.first_step_timed, timed_seconds, compiled = step, 0.0, False
        process_first_step = step
        if resumed is None:
            last_row = self._log(self.evaluate(state, 0, [], 0.0, 0.0), logger)
            self.save_state(state, 0, extras)
        bar = _progress(cfg, s.total_steps, step) if stop_reason is None else None

        def between_evals() -> dict:  # a checkpoint's extras away from an eval: the losses since the last one
            return dict(extras, **_pending(losses, terms, s.eval_every),
                        train_seconds=np.float32(train_seconds + timed_seconds),
                        wall_time=np.float32(time.perf_counter() - wall_start))

        while stop_reason is None:
            if s.total_steps is not None and step >= s.total_steps:
                stop_reason = s.length_criterion
                break
            signum = _agreed_stop(stop_requests, step)
            if signum:  # Ctrl-C / SIGTERM: checkpoint between steps, then exit
                self.save_state(state, step, between_evals())
                raise runs.Interrupted(
                    f"stopped by {signal.Signals(signum).name} after step {step}; the checkpoint "
                    f"is saved in {self.out}. Rerun the same command to resume (it ends with the numbers an "
                    "uninterrupted run gives)", 128 + signum)
            t0 = time.perf_counter()
            batch = self.batch(step)
            state, metrics = train_step(state, batch, s.frozen)
            losses.append(metrics["loss"])
            terms.append((metrics["ntp"], metrics["reg"]))
            step += 1
            if (not compiled or step % 10 == 0 or step == s.total_steps or step % s.eval_every == 0
                    or step - process_first_step == UNTIMED_STEPS):
                jax.block_until_ready(metrics["loss"])
            seconds = time.perf_counter() - t0
            if step - process_first_step > UNTIMED_STEPS:
                timed_seconds += seconds
            if not compiled:
                compiled, s.first_step_timed = True, step  # the compiling step does not count towards throughput
            else:
                s.throughput_seconds += seconds
            if bar is not None and step % 10 == 0:
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}",
                                tok_s=f"{(step - s.first_step_timed) * s.tokens_per_step / max(s.throughput_seconds, 1e-9):,.0f}")
            if bar is not None:
                bar.update(1)
            at_end = s.total_steps is not None and step >= s.total_steps
            out_of_time = cfg.stop.train_time and train_seconds + timed_seconds >= cfg.stop.train_time
            if cfg.stop.train_time:  # clocks differ between processes: all follow process 0's decision
                out_of_time = multihost.agree(bool(out_of_time))
            if step % s.eval_every and not at_end and not out_of_time:
                if self._checkpoint_due(step):
                    self.save_state(state, step, between_evals())
                continue
            jax.block_until_ready(state.params)
            mean_loss = float(np.mean(jax.device_get(losses)))
            if not math.isfinite(mean_loss):
                raise FloatingPointError(self._divergence_message(mean_loss, step - len(losses), step))
            row = self.evaluate(state, step, losses, train_seconds + timed_seconds,
                                time.perf_counter() - wall_start, terms)
            losses, terms = [], []
            valid = row["valid_ntp"]
            # compared in float32, as stored: a float64 loss just under its own float32 rounding would
            # count as a new best at every eval and early stopping would never trigger
            if np.float32(valid) < extras["best_valid"]:
                extras["best_valid"], extras["evals_since_best"] = np.float32(valid), np.int32(0)
            else:
                extras["evals_since_best"] = np.int32(int(extras["evals_since_best"]) + 1)
            if cfg.stop.target_loss and valid <= cfg.stop.target_loss:
                stop_reason = "target_loss"
            elif cfg.stop.early_stop_evals and int(extras["evals_since_best"]) > cfg.stop.early_stop_evals:
                stop_reason = "early_stop"
            elif out_of_time:
                stop_reason = "train_time"
            elif at_end:
                stop_reason = s.length_criterion
            extras.update(train_seconds=np.float32(train_seconds + timed_seconds),
                          wall_time=np.float32(row["wall_time"]), **_pending([], [], s.eval_every),
                          stop_code=np.int32(STOP_REASONS.index(stop_reason)))
            last_row = self._log(row, logger)
            if not self._own_checkpoint_cadence or self._checkpoint_due(step):
                self.save_state(state, step, extras)
        if bar is not None:
            bar.close()
        if last_row is None or last_row["step"] != step:
            last_row = self._log(self.evaluate(state, step, losses, float(extras["train_seconds"]),
                                               time.perf_counter() - wall_start, terms), logger)
        runs.save_checkpoint(self.out / runs.PARAMS_FILE, self.params_now(state),
                             {"model": cli.to_dict(s.model_cfg)}, fault="params_write")
        runs.fault_point("before_done")
        final = dict(last_row, stop_reason=stop_reason, steps=step)
        runs.write_json(self.out / runs.DONE_FILE, final)
        if logger is not None:
            logger.finish()
        return final

    def _divergence_message(self, mean_loss: float, good: int, step: int) -> str:
        """Why the training loss is not finite: a model that computes no finite loss before any update (its
        weights, or a model field) is not the learning rate's fault; only a loss that was finite at step 0
        and diverged since is blamed on the optimization settings."""
        start = self.s.frozen.get("ref") if self.s.frozen.get("ref") is not None else self.s.init_params
        bad = _non_finite_leaves(start) if start is not None else []
        rows = runs.read_metrics(self.out) if (self.out / runs.METRICS_FILE).exists() else []
        first = rows[0].get("valid_ntp") if rows and rows[0].get("step") == 0 else None
        where = f"the loaded checkpoint {self.s.resolved.get('loaded_from')}" if self.cfg.model.loads else "the initialization"
        if bad:
            return (f"training loss became {mean_loss} between steps {good} and {step}: {where} already holds "
                    f"non-finite weights ({', '.join(bad[:5])}), so the learning rate is not the cause; use a checkpoint "
                    "with finite weights")
        if first is not None and not math.isfinite(first):
            return (f"training loss became {mean_loss} between steps {good} and {step}, and the validation loss "
                    f"was already {first} at step 0, before any update: the learning rate is not the cause. Check "
                    f"the model's fields ({'the checkpoint config of ' + where if self.cfg.model.loads else '--model.* flags'}"
                    ", e.g. rope_base/rope_theta, norm_eps, dtype) and the data")
        return (f"training loss became {mean_loss} between steps {good} and {step} (it was finite at step 0). "
                "Training is deterministic, so rerunning this command diverges again. Start a new run with a lower "
                "--opt.peak_lr, a longer --opt.warmup_tokens or --model.dtype float32 (changed flags make a new run "
                f"directory, trained from step 0); {self.out} (last good checkpoint: step {good}) can then be deleted")

    def _log(self, row: dict, logger) -> dict:
        runs.append_metrics(self.out, row)  # process 0 writes; every process computes the row
        if logger is not None:
            logger.log(row, step=row["step"])
        return row


# Saved as an index into this tuple (0: not stopped). Length criteria are named after their flag.
STOP_REASONS = (None, "target_loss", "early_stop", "train_time", "num_tokens_train", "tokens_per_param", "num_epochs")


def _lm_eval_scorer(cfg: TrainConfig, s: Setup) -> Any:
    """The harness tasks of --eval.lm_eval_tasks, ready before the first step (None without the flag)."""
    if not cfg.eval.lm_eval_tasks:
        return None
    if jax.process_count() > 1:
        raise ValueError(f"--eval.lm_eval_tasks scores in one process; this run has {jax.process_count()}: score its "
                         "checkpoints afterwards with python -m forgetting.stages.lm_eval")
    from forgetting.evals import harness_report

    return harness_report.TrainingScorer(cfg.eval, s.model_cfg, load_path=s.resolved.get("loaded_from") or "",
                                         data_path=cfg.data.path)


def _extras_template(eval_every: int) -> dict:
    f32, i32 = jnp.float32, jnp.int32
    return {"best_valid": jax.ShapeDtypeStruct((), f32), "evals_since_best": jax.ShapeDtypeStruct((), i32),
            "train_seconds": jax.ShapeDtypeStruct((), f32), "wall_time": jax.ShapeDtypeStruct((), f32),
            "stop_code": jax.ShapeDtypeStruct((), i32), "n_pending": jax.ShapeDtypeStruct((), i32),
            "pending_losses": jax.ShapeDtypeStruct((eval_every,), f32),
            "pending_terms": jax.ShapeDtypeStruct((eval_every, 2), f32)}


def _pending(losses: list, terms: list, eval_every: int) -> dict:
    """The training losses (and their ntp/reg terms) since the last eval, so a checkpoint between evals
    resumes to the same means."""
    pending = np.zeros((eval_every,), np.float32)
    pending[: len(losses)] = np.asarray(jax.device_get(losses), np.float32).reshape(-1)
    pending_terms = np.zeros((eval_every, 2), np.float32)
    pending_terms[: len(terms)] = np.asarray(jax.device_get(terms), np.float32).reshape(-1, 2)
    return {"pending_losses": pending, "pending_terms": pending_terms, "n_pending": np.int32(len(losses))}


# Kept under its old name: tests and callers enter it around `_Trainer.train`.
_StopRequests = stopping.StopRequests
STOP_POLL_STEPS = 10  # multi-process: how often (in steps) the processes agree on a pending stop request


def _agreed_stop(stop_requests: stopping.StopRequests, step: int) -> int:
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


def _progress(cfg: TrainConfig, total: int | None, initial: int):
    if not cfg.log.progress or not multihost.is_writer():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=None)


def _wandb_logger(cfg: TrainConfig, out: Path):
    if not cfg.log.wandb or not multihost.is_writer():
        return None
    try:
        import wandb
    except ImportError:
        raise ImportError("--log.wandb true needs Weights & Biases: pip install 'forgetting[wandb]'") from None
    return wandb.init(project=cfg.log.wandb_project, name=out.name, id=out.name, resume="allow",
                      config=cli.to_dict(cfg), dir=str(out))


def _state_advice(error: Exception, path: Path) -> str:
    return (f"{error}. To recover: delete {path} and rerun this command; the run then starts again from step 0 "
            "(and ends with the same numbers: training is deterministic)")


def _checkpoint_step(path: Path) -> int:
    try:
        return int(sharded_checkpoint.read_metadata(path)["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(_state_advice(e, path)) from None


def _reused(out: Path) -> dict:
    return {"run_dir": str(out), "metrics": json.loads((out / runs.DONE_FILE).read_text()), "status": "reused"}


def train(cfg: TrainConfig) -> dict:
    """Runs (or reuses, or resumes) the training run of `cfg`; returns {run_dir, metrics, status}.

    One process writes a run directory at a time (`runs.RunLock`); a resumed run must read the same input
    files it started with (`runs.check_inputs`)."""
    cfg.validate()
    dtype_choice = {"dtype": cfg.model.dtype, "why": "--model.dtype given"}
    if cfg.model.dtype == "auto":
        from forgetting.training import auto_dtype
        from forgetting.training.train_config import with_resolved_dtype

        cfg = with_resolved_dtype(cfg)
        dtype_choice = {**auto_dtype.auto_dtype(), "dtype": cfg.model.dtype}
        if multihost.is_writer():
            print(f"--model.dtype {dtype_choice['why']}", file=sys.stderr)
    out = runs.run_dir(cfg)
    if runs.is_done(out):
        return _reused(out)
    trainer = _Trainer(cfg, out)
    inputs = _input_fingerprints(cfg, trainer.s)
    out.mkdir(parents=True, exist_ok=True)
    # Signal handlers from here on: a Ctrl-C or SIGTERM while this process owns the run directory is answered
    # with a checkpoint between steps (before this point there is nothing to save).
    # In a multi-process (multi-host) run the processes of one run share its directory: only process 0
    # takes the lock and cleans up (the others must not be refused by it, nor delete its temp files).
    writer = multihost.is_writer()
    with (runs.RunLock(out) if writer else contextlib.nullcontext()), _StopRequests() as stop_requests:
        if runs.is_done(out):  # another process finished it while this one was setting up
            return _reused(out)
        if writer:
            runs.remove_temp_files(out)  # left by a killed writer; safe: we hold the lock
        state_file = out / runs.STATE_FILE
        if sharded_checkpoint.exists(state_file) and (out / runs.CONFIG_FILE).exists():
            runs.check_inputs(out, inputs, _checkpoint_step(state_file))
        elif writer:
            runs.write_json(out / runs.CONFIG_FILE, {"config": cli.to_dict(cfg), "resolved": trainer.s.resolved,
                                                     "inputs": inputs, "inputs_version": runs.INPUTS_VERSION,
                                                     "dtype_choice": dtype_choice})
        try:
            final = trainer.train(stop_requests)
        finally:
            close = getattr(trainer.s.replay, "close", None)
            if close is not None:
                close()  # the replay prefetch thread
    return {"run_dir": str(out), "metrics": final, "status": "finished"}


def _input_fingerprints(cfg: TrainConfig, s: Setup) -> dict[str, dict]:
    """Fingerprints of every file the run reads (`Setup.input_files`), by the flag (or role) that names it."""
    return {role: runs.fingerprint(path) for role, path in s.input_files.items()}


run = train  # the name experiments' framework calls


def main(argv: list[str] | None = None) -> dict:
    cfg = cli.parse(TrainConfig, argv)
    if cfg.run.mesh:
        from forgetting.core import sharding

        sharding.initialize_distributed()  # multi-host when FORGETTING_COORDINATOR etc. are set; else no-op
    try:
        with cli.exit_on_error("error", (FloatingPointError, ImportError)):
            result = train(cfg)
    except runs.Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    if multihost.is_writer():
        print(json.dumps({"run_dir": result["run_dir"], **result["metrics"]}, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
