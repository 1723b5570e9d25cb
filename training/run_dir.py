"""A run directory as one object: its name and hash, lock, config.json, metrics, checkpoints, done marker,
input fingerprints and fault points. The file formats and the process-0 guards are `training.runs`'; this
is the one place the train stage reaches them from."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, ContextManager

from forgetting.core import multihost, sharded_checkpoint
from forgetting.training import cli, runs


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def of(cls, cfg: Any) -> "RunDir":
        """The run directory of a (dtype-resolved) train config, known before running."""
        return cls(runs.run_dir(cfg))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def hash(self) -> str:
        """The config hash the directory is named by (after the optional `--run.name-` prefix)."""
        return self.name.rsplit("-", 1)[-1]

    # ----- lock and completion ---------------------------------------------------------------------------
    def is_done(self) -> bool:
        return runs.is_done(self.path)

    def result(self) -> dict:
        """done.json: the final metrics of a finished run."""
        return json.loads((self.path / runs.DONE_FILE).read_text())

    def lock(self) -> ContextManager:
        """One writer at a time (`runs.RunLock`). In a multi-process run only process 0 takes the lock (the
        others share the directory and must not be refused by it)."""
        return runs.RunLock(self.path) if multihost.is_writer() else contextlib.nullcontext()

    def remove_temp_files(self) -> None:
        """Temp files a killed writer left; call only while holding the lock."""
        if multihost.is_writer():
            runs.remove_temp_files(self.path)

    def fault(self, name: str) -> None:
        runs.fault_point(name)

    # ----- inputs and config.json ------------------------------------------------------------------------
    def bind(self, cfg: Any, record: dict, inputs: dict[str, dict], dtype_choice: dict) -> None:
        """A run with a checkpoint must read the input files it started with; a new run records them (with
        the flags and what was resolved) in config.json."""
        if self.has_state() and (self.path / runs.CONFIG_FILE).exists():
            runs.check_inputs(self.path, inputs, self.state_step())
        else:
            runs.write_json(self.path / runs.CONFIG_FILE, {"config": cli.to_dict(cfg), "resolved": record,
                                                           "inputs": inputs, "inputs_version": runs.INPUTS_VERSION,
                                                           "dtype_choice": dtype_choice})

    # ----- metrics ---------------------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        return runs.read_metrics(self.path)

    def keep_metrics_until(self, step: int) -> list[dict]:
        """Drops rows logged after `step` (a resume recomputes them identically; -1: a fresh start)."""
        return runs.truncate_metrics(self.path, step)

    def append_metrics(self, row: dict) -> None:
        runs.append_metrics(self.path, row)  # process 0 writes; every process computes the row

    # ----- checkpoints -----------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.path / runs.STATE_FILE

    def has_state(self) -> bool:
        return sharded_checkpoint.exists(self.state_file)

    def state_step(self) -> int:
        return checkpoint_step(self.state_file)

    def save_state(self, tree: Any, step: int) -> None:
        runs.save_checkpoint(self.state_file, tree, {"step": step})
        runs.fault_point(f"state_saved:{step}")

    def restore_state(self, template: Any) -> tuple[Any, int] | None:
        """(the checkpoint tree, its step), or None without a checkpoint."""
        if not self.has_state():
            return None
        step = self.state_step()
        try:
            return sharded_checkpoint.restore(self.state_file, template), step
        except ValueError as e:
            raise ValueError(state_advice(e, self.state_file)) from None

    def finish(self, params: Any, model_record: dict, final: dict) -> None:
        """The final weights, then the done marker (each phase a fault point for the kill tests)."""
        runs.save_checkpoint(self.path / runs.PARAMS_FILE, params, {"model": model_record}, fault="params_write")
        runs.fault_point("before_done")
        runs.write_json(self.path / runs.DONE_FILE, final)


def fingerprints(input_files: dict[str, str]) -> dict[str, dict]:
    """Fingerprints of every file a run reads, by the flag (or role) that names it."""
    return {role: runs.fingerprint(path) for role, path in input_files.items()}


def state_advice(error: Exception, path: Path) -> str:
    return (f"{error}. To recover: delete {path} and rerun this command; the run then starts again from step 0 "
            "(and ends with the same numbers: training is deterministic)")


def checkpoint_step(path: Path) -> int:
    """The step of the state checkpoint at `path` (an error that says how to recover when unreadable)."""
    try:
        return int(sharded_checkpoint.read_metadata(path)["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(state_advice(e, path)) from None
