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
final metrics.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import numpy as np

from forgetting.core import checkpoint, lora, step as step_lib
from forgetting.stages import cli, runs
from forgetting.stages.train_config import TrainConfig, replace  # noqa: F401  (re-exported for experiments)
from forgetting.stages.train_setup import Setup, build_setup

run_dir = runs.run_dir
Config = TrainConfig


def _norm(tree: Any) -> float:
    return float(optax.tree.norm(tree))


def _diff_norm(a: Any, b: Any) -> float:
    return _norm(jax.tree.map(lambda x, y: x.astype(jnp.float32) - y.astype(jnp.float32), a, b))


class _Trainer:
    def __init__(self, cfg: TrainConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.s: Setup = build_setup(cfg)
        self.eval_step = step_lib.make_eval_step(self.s.model_cfg)

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
        batch["tokens"] = tokens
        mask = s.dataset.loss_mask(tokens)  # packed data: padding targets do not count
        if mask is not None:
            batch["mask"] = mask
        return s.put_batch(batch)

    # ----- evaluation ----------------------------------------------------------------------------
    def params_now(self, state) -> Any:
        s = self.s
        return lora.merge(s.model_cfg, s.frozen["base"], state.params) if s.use_lora else state.params

    def evaluate(self, state, step: int, train_losses: list, train_seconds: float, wall: float) -> dict:
        from forgetting.stages import evaluation

        s, cfg = self.s, self.cfg
        params = self.params_now(state)
        ref = s.frozen.get("ref")
        row: dict = {"step": step, "tokens": step * s.tokens_per_step, "lr": float(s.schedule(step))}
        if train_losses:
            row["train_loss"] = float(np.mean(jax.device_get(train_losses)))
        bs, cap = s.eval_batch_size, cfg.eval.max_tokens
        for prefix, dataset in (("valid", s.dataset), ("prev", s.prev_dataset)):
            if dataset is None:
                continue
            m = evaluation.ntp_and_kl(self.eval_step, params, dataset, bs, ref, cap)
            row.update({f"{prefix}_{k}": v for k, v in m.items()})
            span = evaluation.answer_span(dataset.token_file.meta)
            if span:
                row[f"{prefix}_acc"] = evaluation.exact_match(s.model_cfg, params, dataset, bs, span, cap)
        for name, dataset in s.extra_datasets.items():
            row[f"ntp/{name}"] = evaluation.ntp_and_kl(self.eval_step, params, dataset, bs, None, cap)["ntp"]
            span = evaluation.answer_span(dataset.token_file.meta)
            if span:
                row[f"acc/{name}"] = evaluation.exact_match(s.model_cfg, params, dataset, bs, span, cap)
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

    # ----- checkpoints ---------------------------------------------------------------------------
    def save_state(self, state, step: int, extras: dict) -> None:
        checkpoint.save(self.out / runs.STATE_FILE, {"state": state, "extras": extras}, metadata={"step": step})

    def restore_state(self, template_state) -> tuple[Any, int, dict] | None:
        path = self.out / runs.STATE_FILE
        if not path.exists():
            return None
        template = {"state": template_state, "extras": _extras_template()}
        restored = checkpoint.restore(path, template)
        step = int(checkpoint.read_metadata(path)["step"])
        return self.s.put_state(restored["state"]), step, jax.device_get(restored["extras"])

    # ----- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        s, cfg = self.s, self.cfg
        state = self.s.initial_state()
        extras = {"best_valid": np.float32(np.inf), "evals_since_best": np.int32(0),
                  "train_seconds": np.float32(0.0), "wall_time": np.float32(0.0)}
        resumed = self.restore_state(state)
        step = 0
        if resumed is not None:
            state, step, extras = resumed
            runs.truncate_metrics(self.out, step)
            print(f"resuming {self.out} at step {step}", file=sys.stderr)
        train_step = s.train_step
        logger = _wandb_logger(cfg, self.out)
        train_seconds, wall_start = float(extras["train_seconds"]), time.perf_counter() - float(extras["wall_time"])
        s.first_step_timed, timed_seconds, compiled = step, 0.0, False
        stop_reason, last_row = None, None
        if step == 0:
            last_row = self._log(self.evaluate(state, 0, [], 0.0, 0.0), logger)
            self.save_state(state, 0, extras)
        bar = _progress(cfg, s.total_steps, step)
        losses: list = []
        while stop_reason is None:
            if s.total_steps is not None and step >= s.total_steps:
                stop_reason = s.length_criterion
                break
            t0 = time.perf_counter()
            batch = self.batch(step)
            state, metrics = train_step(state, batch, s.frozen)
            losses.append(metrics["loss"])
            step += 1
            if not compiled or step % 10 == 0 or step == s.total_steps:
                jax.block_until_ready(metrics["loss"])
            seconds = time.perf_counter() - t0
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
            if step % s.eval_every and not at_end and not out_of_time:
                continue
            jax.block_until_ready(state.params)
            mean_loss = float(np.mean(jax.device_get(losses)))
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"training loss became {mean_loss} between steps {step - len(losses)} and {step}; the last "
                    f"good checkpoint (step {step - len(losses)}) is kept in {self.out}. Lower --opt.peak_lr, "
                    "lengthen --opt.warmup_tokens or use --model.dtype float32, then rerun to resume.")
            row = self.evaluate(state, step, losses, train_seconds + timed_seconds, time.perf_counter() - wall_start)
            losses = []
            valid = row["valid_ntp"]
            if valid < float(extras["best_valid"]):
                extras["best_valid"], extras["evals_since_best"] = np.float32(valid), np.int32(0)
            else:
                extras["evals_since_best"] = np.int32(int(extras["evals_since_best"]) + 1)
            if cfg.stop.target_loss and valid <= cfg.stop.target_loss:
                stop_reason = "target_loss"
            elif cfg.stop.early_stop_evals and int(extras["evals_since_best"]) >= cfg.stop.early_stop_evals:
                stop_reason = "early_stop"
            elif out_of_time:
                stop_reason = "train_time"
            elif at_end:
                stop_reason = s.length_criterion
            extras["train_seconds"] = np.float32(train_seconds + timed_seconds)
            extras["wall_time"] = np.float32(row["wall_time"])
            last_row = self._log(row, logger)
            self.save_state(state, step, extras)
        if bar is not None:
            bar.close()
        if last_row is None or last_row["step"] != step:
            last_row = self._log(self.evaluate(state, step, losses, float(extras["train_seconds"]),
                                               time.perf_counter() - wall_start), logger)
        checkpoint.save(self.out / runs.PARAMS_FILE, jax.device_get(self.params_now(state)),
                        metadata={"model": cli.to_dict(s.model_cfg)})
        final = dict(last_row, stop_reason=stop_reason, steps=step)
        cli.write_json_atomic(self.out / runs.DONE_FILE, final)
        if logger is not None:
            logger.finish()
        return final

    def _log(self, row: dict, logger) -> dict:
        runs.append_metrics(self.out, row)
        if logger is not None:
            logger.log(row, step=row["step"])
        return row


def _extras_template() -> dict:
    return {"best_valid": jax.ShapeDtypeStruct((), jnp.float32), "evals_since_best": jax.ShapeDtypeStruct((), jnp.int32),
            "train_seconds": jax.ShapeDtypeStruct((), jnp.float32), "wall_time": jax.ShapeDtypeStruct((), jnp.float32)}


def _progress(cfg: TrainConfig, total: int | None, initial: int):
    if not cfg.log.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=None)


def _wandb_logger(cfg: TrainConfig, out: Path):
    if not cfg.log.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise ImportError("--log.wandb true needs Weights & Biases: pip install 'forgetting[wandb]'") from None
    return wandb.init(project=cfg.log.wandb_project, name=out.name, id=out.name, resume="allow",
                      config=cli.to_dict(cfg), dir=str(out))


def train(cfg: TrainConfig) -> dict:
    """Runs (or reuses, or resumes) the training run of `cfg`; returns {run_dir, metrics, status}."""
    cfg.validate()
    out = runs.run_dir(cfg)
    if runs.is_done(out):
        return {"run_dir": str(out), "metrics": json.loads((out / runs.DONE_FILE).read_text()), "status": "reused"}
    trainer = _Trainer(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    cli.write_json_atomic(out / runs.CONFIG_FILE, {"config": cli.to_dict(cfg), "resolved": trainer.s.resolved})
    final = trainer.train()
    return {"run_dir": str(out), "metrics": final, "status": "finished"}


run = train  # the name experiments' framework calls


def main(argv: list[str] | None = None) -> dict:
    cfg = cli.parse(TrainConfig, argv)
    if cfg.run.mesh:
        from forgetting.core import sharding

        sharding.initialize_distributed()  # multi-host when FORGETTING_COORDINATOR etc. are set; else no-op
    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"run_dir": result["run_dir"], **result["metrics"]}, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
