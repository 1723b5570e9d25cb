"""A fake figure of in-process runs for tests/test_framework_jobs.py: `--jobs` runs each in a child process
(`python tests/jobs_figure.py --only NAME --no_summary`), so it has to be a script."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from forgetting.experiments import framework
from forgetting.experiments.framework import RunSpec


@dataclass(frozen=True)
class Knobs:
    """Knobs of the fake figure."""

    fail: str = ""  # name of a run that raises
    wait: bool = False  # runs a and b wait for a stop request, then save a 'checkpoint' and stop
    hold: float = 1.0  # seconds runs a and b take
    linger: float = 0.0  # seconds a stopped run takes to save its checkpoint


@dataclass(frozen=True)
class Cfg:
    name: str
    knobs: Knobs


PRESETS = {"mini": Knobs()}


def work(cfg: Cfg, run_dir: Path) -> dict:
    from forgetting.training import runs as stage_runs, stopping

    start, met = time.time(), None
    if cfg.name in ("a", "b"):
        (run_dir / "started").write_text(str(os.getpid()))
    if cfg.knobs.fail == cfg.name:
        print(f"working on {cfg.name}", flush=True)
        raise RuntimeError(f"boom in {cfg.name}")
    if cfg.name in ("a", "b"):
        with stopping.StopRequests() as stop:
            other = "b" if cfg.name == "a" else "a"
            met_by = time.time() + 300  # side by side, the other run starts meanwhile (a slow machine: slowly)
            while not list(run_dir.parent.glob(f"{other}-*/started")) and time.time() < met_by:
                time.sleep(0.02)
            met = bool(list(run_dir.parent.glob(f"{other}-*/started")))
            deadline = time.time() + (600 if cfg.knobs.wait else cfg.knobs.hold)
            while time.time() < deadline and stop.signum is None:
                time.sleep(0.02)
            if stop.signum is not None:  # as the train stage does: checkpoint, then Interrupted
                time.sleep(cfg.knobs.linger)  # a second signal here stops at once (KeyboardInterrupt)
                (run_dir / "checkpoint").write_text("state")
                raise stage_runs.Interrupted(f"{cfg.name} stopped", stop.exit_code)
    return {"name": cfg.name, "met": met, "start": start, "end": time.time(), "pid": os.getpid(),
            "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []}


def runs(knobs: Knobs, out: Path) -> list[RunSpec]:
    return [RunSpec("a", Cfg("a", knobs), fn=work), RunSpec("b", Cfg("b", knobs), fn=work),
            RunSpec("c", Cfg("c", knobs), fn=work, after=("a", "b")),
            RunSpec("d", Cfg("d", knobs), fn=work, after=("c",))]


def summarize(knobs: Knobs, out: Path) -> dict:
    return {name: framework.read_result(d) for name, d in framework.locate(runs(knobs, out), out).items()}


if __name__ == "__main__":
    summary = framework.main(Knobs, PRESETS, runs, summarize, None, doc=__doc__, progress=False)
    if summary is not None:
        print(json.dumps({"summary_pid": os.getpid()}), file=sys.stderr)
