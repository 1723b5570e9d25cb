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

import json
import sys

from forgetting.core import multihost
from forgetting.training import cli, runner, runs, stopping
from forgetting.training.loop import STOP_REASONS, UNTIMED_STEPS  # noqa: F401  (re-exported: tests, bench)
from forgetting.training.run_dir import checkpoint_step as _checkpoint_step  # noqa: F401  (tests)
from forgetting.training.train_config import TrainConfig, replace  # noqa: F401  (re-exported for experiments)

run_dir = runs.run_dir
Config = TrainConfig
_Trainer = runner.Trainer  # the loop's steps (tests wrap its batch and save)
_StopRequests = stopping.StopRequests  # kept under its old name: tests and callers enter it around a run
STOP_POLL_STEPS = runner.STOP_POLL_STEPS


def train(cfg: TrainConfig) -> dict:
    """Runs (or reuses, or resumes) the training run of `cfg`; returns {run_dir, metrics, status}
    (`forgetting.training.run`, as a dict)."""
    return runner.run(cfg).as_dict()


run = train  # the name experiments' framework calls


def main(argv: list[str] | None = None) -> dict:
    cfg = cli.parse(TrainConfig, argv)
    from forgetting.training import compile_cache

    compile_cache.enable()  # same-shape runs (here, in a figure, in other processes) reuse compiled steps
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
