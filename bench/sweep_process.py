"""One process that runs train-stage runs one after another, in-process, as a figure's `--jobs 1` does.

    python -m forgetting.bench.sweep_process RUNS.json RESULTS.json

RUNS.json is a list of train-stage argument lists (what `python -m forgetting.stages.train` takes). Each run
is parsed and run here in turn (`training.run`); the process imports JAX once, and runs of the same shapes
reuse the steps it compiled for the first. RESULTS.json gets, after each run, one row per finished run:
{"run_dir", "seconds" (the run in this process), final metrics...}. A failing run ends the process with its
error (exit 1), the rows of the runs before it written.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def run_all(argvs: list[list[str]], results: Path) -> list[dict]:
    from forgetting import training
    from forgetting.core import host_memory
    from forgetting.training import cli, compile_cache
    from forgetting.training.train_config import TrainConfig

    compile_cache.enable()  # as the train stage's command line does
    rows: list[dict] = []
    for argv in argvs:
        cfg = cli.parse(TrainConfig, argv)
        start = time.perf_counter()
        result = training.run(cfg).as_dict()
        host_memory.release_freed_memory()  # as a figure does between in-process runs
        rows.append({"run_dir": result["run_dir"], "seconds": time.perf_counter() - start, **result["metrics"]})
        cli.write_json_atomic(results, rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m forgetting.bench.sweep_process RUNS.json RESULTS.json")
    runs = json.loads(Path(args[0]).read_text())
    if not isinstance(runs, list) or not all(isinstance(a, list) for a in runs):
        raise SystemExit(f"{args[0]}: expected a JSON list of argument lists")
    run_all(runs, Path(args[1]))


if __name__ == "__main__":
    main()
