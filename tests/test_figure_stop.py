"""Ctrl-C / SIGTERM to a figure: the running run checkpoints (or finishes), nothing is marked failed, no
further run starts, the resume command is printed, the exit code is 128 + the signal; a second signal
stops at once. The end-to-end case SIGTERMs a tiny toy_continual mid-run and resumes it to the summary of
an uninterrupted run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from forgetting.experiments import framework
from forgetting.experiments.framework import RunSpec
from forgetting.training import runs as stage_runs, stopping


@dataclass(frozen=True)
class Knobs:
    """Knobs of a fake figure."""

    signals: int = 0  # SIGTERMs the first run sends itself
    tag: str = "a"  # a string knob


PRESETS = {"mini": Knobs()}
CALLS: list[str] = []


def first(cfg: Knobs, run_dir: Path) -> dict:
    CALLS.append("first")
    for _ in range(cfg.signals):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
    return {"ok": 1}


def second(cfg: Knobs, run_dir: Path) -> dict:
    CALLS.append("second")
    return {"ok": 2}


def runs(knobs: Knobs, out: Path) -> list[RunSpec]:
    return [RunSpec("first", knobs, fn=first), RunSpec("second", knobs, fn=second, after=("first",))]


def summarize(knobs: Knobs, out: Path) -> dict:
    dirs = framework.locate(runs(knobs, out), out)
    return {name: framework.read_result(d) for name, d in dirs.items()}


def fmain(argv: list[str]) -> dict | None:
    return framework.main(Knobs, PRESETS, runs, summarize, None, argv=argv, progress=False)


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    yield
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "handlers restored"


def test_first_signal_finishes_the_running_run_then_stops_with_resume_command(tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        fmain(["--out", str(out), "--signals", "1"])
    assert e.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert CALLS == ["first"], "no run starts after the request"
    dirs = framework.locate(runs(Knobs(signals=1), out), out)
    assert framework.is_done(dirs["first"]) and not dirs["second"].exists()
    assert "failed" not in err
    resume = err.split("Resume with:\n")[1].splitlines()[0]
    assert resume.startswith(f"cd {os.getcwd()} && ") and resume.endswith(f"--out {out} --signals 1")
    summary = fmain(["--out", str(out), "--signals", "1"])  # the resume: the finished run is reused
    assert CALLS == ["first", "second"] and summary == {"first": {"ok": 1}, "second": {"ok": 2}}


def test_second_signal_stops_at_once(tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        fmain(["--out", str(out), "--signals", "2"])
    assert e.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped at once by a second SIGTERM during run 'first'" in err and "Resume with:" in err
    dirs = framework.locate(runs(Knobs(signals=2), out), out)
    assert not framework.is_done(dirs["first"]) and not dirs["second"].exists()


# A stage-like module whose run stops the way the train stage does: its own StopRequests sees the signal,
# it checkpoints and raises runs.Interrupted.
STAGE = "forgetting_test_stopping_stage"


@dataclass(frozen=True)
class StageConfig:
    out: str = ""
    interrupt: bool = False


def _stage_run_dir(cfg: StageConfig) -> Path:
    return Path(cfg.out) / f"stage-{int(cfg.interrupt)}"


def _stage_run(cfg: StageConfig) -> dict:
    d = _stage_run_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    CALLS.append(d.name)
    with stopping.StopRequests() as stop:
        if cfg.interrupt:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        if stop.signum is not None:
            (d / "state.msgpack").write_text("checkpoint")
            raise stage_runs.Interrupted("stopped by SIGTERM after step 3", stop.exit_code)
    (d / framework.DONE).write_text("{}")
    return {}


sys.modules[STAGE] = types.SimpleNamespace(run=_stage_run, run_dir=_stage_run_dir, main=None)


def test_interrupted_stage_run_is_not_a_failure_and_nothing_after_it_runs(tmp_path, capsys):
    def stage_runs_fn(knobs: Knobs, out: Path) -> list[RunSpec]:
        a = RunSpec("a", StageConfig(str(out), interrupt=True), module=STAGE)
        return [a, RunSpec("b", StageConfig(str(out)), module=STAGE, after=("a",)),
                RunSpec("c", knobs, fn=second)]

    with pytest.raises(SystemExit) as e:
        framework.main(Knobs, PRESETS, stage_runs_fn, summarize, None, argv=["--out", str(tmp_path)],
                       progress=False)
    assert e.value.code == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM: run 'a' saved a checkpoint" in err and "failed" not in err
    assert CALLS == ["stage-1"], "neither the dependent run nor the independent one started"
    assert (tmp_path / "stage-1" / "state.msgpack").exists()


def test_nested_requests_share_one_decision():
    with stopping.StopRequests() as outer:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        with stopping.StopRequests() as inner:  # a run set up after the signal stops at once
            assert inner.signum == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt):  # the second signal, during the run
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
    with stopping.StopRequests() as outer:
        with stopping.StopRequests() as inner:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert inner.signum == outer.signum == signal.SIGINT and outer.exit_code == 130


# ------------------------------------------------------------------------ end to end: toy_continual

TOY = ["--seeds", "1", "--d_model", "16", "--head_dim", "8", "--n_layers", "1", "--first_steps", "400", "--steps", "4",
       "--batch_size", "8", "--warmup_steps", "1", "--num_examples", "120", "--valid_examples", "8",
       "--eval_every", "4", "--replay_buffer", "2"]


def _toy(out: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "forgetting.experiments.toy_continual", "--out", str(out), *TOY],
                            cwd=cwd, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.heavy
def test_sigterm_to_toy_figure_resumes_to_the_uninterrupted_summary(tmp_path):
    from forgetting.experiments import toy_continual as tc
    from forgetting.stages import train

    out = tmp_path / "stopped"
    proc = _toy(out, tmp_path)
    _, knobs = framework.parse_args(tc.Knobs, tc.PRESETS, ["--out", str(out), *TOY])
    specs = tc.runs(knobs, out)
    dirs = framework.locate(specs, out)
    state = dirs["add"] / stage_runs.STATE_FILE
    deadline = time.time() + 600
    while not (state.exists() and train._checkpoint_step(state) >= 4):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint of run 'add' past step 4 in 600 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM: run 'add' saved a checkpoint" in err and "failed" not in err
    stopped_at = train._checkpoint_step(state)
    assert 4 <= stopped_at < 400 and not framework.is_done(dirs["add"])
    assert [n for n, d in dirs.items() if d.exists()] == ["data", "add"], "no later run started"

    resume = err.split("Resume with:\n")[1].splitlines()[0]
    again = subprocess.run(resume, shell=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                           text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(rf"resuming \S+ at step {stopped_at}", again.stderr)

    whole = _toy(tmp_path / "whole", tmp_path)
    _, err = whole.communicate(timeout=1200)
    assert whole.returncode == 0, err[-3000:]
    assert (json.loads((out / "summary.json").read_text())
            == json.loads((tmp_path / "whole" / "summary.json").read_text()))
