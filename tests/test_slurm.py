"""`--slurm DIR`: job-array scripts for a figure's runs, and a real submission to a one-node Slurm.

The script checks are fast and in the default suite. `test_real_slurm_matches_local_run` starts a private
Slurm (tests/slurm/start_slurm.sh: Debian's slurm-wlm + munge, as root), submits a shrunken high_lr mini,
and compares its summary with a local run's (and once more with `--slurm_requeue` and two preemptions of
the pretraining task); it takes minutes, so it is marked `cluster` (skipped by the default suite) and skips without Slurm:

    apt-get install -y slurm-wlm munge
    python -m pytest -q -m cluster tests/test_slurm.py -p no:cacheprovider
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FIGURE = "forgetting.experiments.high_lr"
# high_lr's mini, smaller: data, one pretraining run, then two finetunes (one with replay): 3 waves, 4 runs.
SMALL = ["--seeds", "1", "--lowered_lrs", "3e-3", "--replace_fracs", "0.0", "0.25", "--pretrain_tpp", "100",
         "--finetune_max_tokens", "40000"]


def _figure(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", FIGURE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1200)


def test_slurm_scripts_one_task_per_run_waves_chained(tmp_path):
    proc = _figure("--out", "o", "--slurm", "s", *SMALL, "--slurm_cpus", "3", "--slurm_gpus", "1",
                   "--slurm_time", "2:00:00", "--slurm_partition", "gpu", "--slurm_parallel", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "s"
    listed = _figure("--out", str(tmp_path / "o"), "--list", *SMALL, cwd=tmp_path)
    waves, current = [], None
    for line in listed.stdout.strip().splitlines():
        if line.startswith("# wave"):
            current = []
            waves.append(current)
        else:
            current.append(line)
    assert [len(w) for w in waves] == [1, 1, 2]
    for k, commands in enumerate(waves):  # one task per run: the same commands --list prints
        assert (folder / f"wave{k}.txt").read_text().splitlines() == commands
        script = (folder / f"wave{k}.sbatch").read_text()
        assert f"#SBATCH --array=0-{len(commands) - 1}%2" in script
        for option in ("--cpus-per-task=3", "--gpus-per-task=1", "--time=2:00:00", "--partition=gpu",
                       f"--chdir={tmp_path}"):
            assert f"#SBATCH {option}" in script
    submit = (folder / "submit.sh").read_text()
    order = re.findall(r"sbatch --parsable \"\$\{dep\[@\]\}\" ([\w.]+)\)", submit)
    assert order == ["wave0.sbatch", "wave1.sbatch", "wave2.sbatch", "plot.sbatch"]
    assert submit.count("--dependency=afterok:") == 3
    assert "--plot_only" in (folder / "plot.sbatch").read_text()
    assert not (tmp_path / "o").exists()  # writing scripts runs nothing


def test_bad_slurm_flag_is_one_line_error(tmp_path):
    proc = _figure("--out", "o", "--slurm", "s", "--slurm_cpus", "0", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == "error: --slurm_cpus must be >= 1, got 0"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("needs Slurm: apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm test starts slurmd, which runs as root")
    folder = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run([str(HERE / "slurm" / "start_slurm.sh"), str(folder)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"))
    yield env
    subprocess.run([str(HERE / "slurm" / "stop_slurm.sh"), str(folder)], timeout=60)


def _wait_for(job: str, env: dict, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        if q.returncode == 0 and not q.stdout.strip():
            return
        if "DependencyNeverSatisfied" in q.stdout:
            raise AssertionError(f"job {job} can never run: an earlier wave failed")
        time.sleep(2)
    raise AssertionError(f"Slurm job {job} still queued or running after {timeout} s")


@pytest.mark.slow
@pytest.mark.cluster
def test_real_slurm_matches_local_run(slurm, tmp_path):
    write = _figure("--out", str(tmp_path / "slurm_out"), "--slurm", str(tmp_path / "scripts"), *SMALL,
                    "--slurm_cpus", "1", "--slurm_mem", "2G", "--slurm_time", "0:30:00", cwd=tmp_path)
    assert write.returncode == 0, write.stderr[-2000:]
    submit = subprocess.run(["bash", str(tmp_path / "scripts" / "submit.sh")], env=slurm, capture_output=True,
                            text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    jobs = dict(re.findall(r"^(wave \d+|plot): job (\d+)", submit.stdout, re.M))
    assert list(jobs) == ["wave 0", "wave 1", "wave 2", "plot"]
    _wait_for(jobs["plot"], slurm, timeout=1500)
    logs = sorted((tmp_path / "scripts" / "logs").glob("*.out"))
    assert len(logs) == 5, [p.name for p in logs]  # 1 + 1 + 2 array tasks and the plot job, each ran once
    summary_file = tmp_path / "slurm_out" / "summary.json"
    assert summary_file.exists(), "\n".join(p.read_text()[-1500:] for p in logs)
    on_slurm = json.loads(summary_file.read_text())

    local = _figure("--out", str(tmp_path / "local_out"), *SMALL, cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-2000:]
    here = json.loads((tmp_path / "local_out" / "summary.json").read_text())
    assert on_slurm["pretrain_loss"] == pytest.approx(here["pretrain_loss"], rel=1e-6)
    for family in ("lowered_lr", "replay"):
        assert len(on_slurm[family]) == len(here[family])
        for a, b in zip(on_slurm[family], here[family]):
            for key in ("old_loss", "new_loss", "tokens", "reached_target"):
                assert a[key] == pytest.approx(b[key], rel=1e-6), (family, key)


# ------------------------------------------------------------------ --slurm_requeue: checkpoint and requeue

# Stands in for a run: checkpoints (exits 143) on SIGTERM, else finishes after a while.
_FAKE_RUN = ("python3 -c 'import os, signal, sys, time; open(\"child.pid\", \"w\").write(str(os.getpid())); "
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); time.sleep(float(os.environ[\"RUN_SECS\"]))'")


def _requeue_task(tmp_path: Path, run_secs: float, signal_to: str) -> tuple[int, str, list[str]]:
    """Runs wave0.sbatch of a --slurm_requeue script with bash (no Slurm): a fake run, a fake scontrol that
    records its arguments; `signal_to` is who gets signalled once the run started. Returns (exit code,
    output, scontrol calls)."""
    import signal as sig

    write = _figure("--out", "o", "--slurm", "s", "--slurm_requeue", "--slurm_signal_secs", "120", *SMALL,
                    cwd=tmp_path)
    assert write.returncode == 0, write.stderr[-2000:]
    (tmp_path / "s" / "wave0.txt").write_text(_FAKE_RUN + "\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="0", SLURM_JOB_ID="77",
               RUN_SECS=str(run_secs))
    shell = subprocess.Popen(["bash", str(tmp_path / "s" / "wave0.sbatch")], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_file = tmp_path / "child.pid"
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and shell.poll() is None
        time.sleep(0.02)
    time.sleep(0.3)  # the run installed its handler
    child = int(pid_file.read_text())
    if signal_to == "shell_usr1":  # Slurm's --signal=B:USR1@S before the time limit
        shell.send_signal(sig.SIGUSR1)
    elif signal_to == "run":  # the task alone
        os.kill(child, sig.SIGTERM)
    elif signal_to == "job":  # Slurm ending the job: every process
        shell.send_signal(sig.SIGTERM)
        os.kill(child, sig.SIGTERM)
    out, _ = shell.communicate(timeout=60)
    calls = (tmp_path / "scontrol.calls").read_text().splitlines() if (tmp_path / "scontrol.calls").exists() else []
    return shell.returncode, out, calls


def test_requeue_scripts_ask_slurm_for_signal_and_requeue(tmp_path):
    write = _figure("--out", "o", "--slurm", "s", "--slurm_requeue", "--slurm_signal_secs", "90", *SMALL,
                    cwd=tmp_path)
    assert write.returncode == 0, write.stderr[-2000:]
    for k in range(3):
        script = (tmp_path / "s" / f"wave{k}.sbatch").read_text()
        for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@90", "#SBATCH --open-mode=append"):
            assert line in script
        assert subprocess.run(["bash", "-n", str(tmp_path / "s" / f"wave{k}.sbatch")]).returncode == 0
    plain = _figure("--out", "o", "--slurm", "p", *SMALL, cwd=tmp_path)
    assert plain.returncode == 0 and "--requeue" not in (tmp_path / "p" / "wave0.sbatch").read_text()
    bad = _figure("--out", "o", "--slurm", "b", "--slurm_requeue", "--slurm_signal_secs", "0", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: --slurm_signal_secs must be >= 1, got 0"


@pytest.mark.parametrize("signal_to,requeued", [("shell_usr1", True), ("run", True), ("job", False),
                                                ("none", False)])
def test_requeue_task_requeues_only_when_the_run_checkpointed_on_its_own_signal(tmp_path, signal_to, requeued):
    rc, out, calls = _requeue_task(tmp_path, 2.0 if signal_to == "none" else 60.0, signal_to)
    if requeued:  # the run checkpointed (143); the task asks Slurm to run it again
        assert calls == ["requeue 77"] and rc == 0, out
    elif signal_to == "job":  # Slurm is ending the job: it decides (requeues a preempted one, not a cancelled one)
        assert calls == [] and rc == 143, out
    else:
        assert calls == [] and rc == 0, out


def _pretrain_dir(out: Path, knobs_flags: list[str]) -> Path:
    from forgetting.experiments import framework, high_lr

    _, knobs = framework.parse_args(high_lr.Knobs, high_lr.PRESETS, ["--out", str(out), *knobs_flags])
    return framework.locate(high_lr.runs(knobs, out), out)["pretrain"]


def _checkpoint_step(run: Path) -> int:
    from forgetting.training import runs
    from forgetting.stages import train

    state = run / runs.STATE_FILE
    return train._checkpoint_step(state) if state.exists() else -1


def _wait_until(what: str, condition, timeout: float) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.cluster
def test_real_slurm_preempted_task_checkpoints_requeues_and_matches_local_run(slurm, tmp_path):
    """--slurm_requeue on a real Slurm: the pretraining task is preempted twice while it trains, once by a
    SIGTERM to the run alone (the task requeues itself) and once by `scontrol requeue` (Slurm signals the job
    and requeues it); each time it checkpoints and the next attempt resumes. The figure ends with the summary
    of an uninterrupted local run."""
    import signal as sig

    from forgetting.training import runs

    knobs = [*SMALL[:-4], "--pretrain_tpp", "300", "--finetune_max_tokens", "40000"]
    out = tmp_path / "slurm_out"
    write = _figure("--out", str(out), "--slurm", str(tmp_path / "scripts"), *knobs, "--slurm_requeue",
                    "--slurm_cpus", "1", "--slurm_mem", "2G", "--slurm_time", "0:30:00", cwd=tmp_path)
    assert write.returncode == 0, write.stderr[-2000:]
    submit = subprocess.run(["bash", str(tmp_path / "scripts" / "submit.sh")], env=slurm, capture_output=True,
                            text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    jobs = dict(re.findall(r"^(wave \d+|plot): job (\d+)", submit.stdout, re.M))
    pretrain = _pretrain_dir(out, knobs)
    log = tmp_path / "scripts" / "logs" / f"wave1-{jobs['wave 1']}_0.out"

    # 1. SIGTERM to the run alone (its pid is in the run's lock file)
    _wait_until("a pretraining checkpoint past step 0",
                lambda: _checkpoint_step(pretrain) > 0 and (pretrain / runs.LOCK_FILE).read_text().strip(), 900)
    pid = int((pretrain / runs.LOCK_FILE).read_text().split()[1])
    os.kill(pid, sig.SIGTERM)
    _wait_until("the requeued task resuming", lambda: log.exists() and "resuming" in log.read_text(), 900)
    first = int(re.search(r"stopped by SIGTERM after step (\d+)", log.read_text()).group(1))
    assert "requeueing job" in log.read_text()

    # 2. scontrol requeue of the running task: Slurm signals the whole job and requeues it
    _wait_until("a checkpoint of the resumed attempt", lambda: _checkpoint_step(pretrain) > first, 900)
    assert not runs.is_done(pretrain), "pretraining finished before the second preemption; lengthen it"
    requeue = subprocess.run(["scontrol", "requeue", jobs["wave 1"]], env=slurm, capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    _wait_for(jobs["plot"], slurm, timeout=2400)
    text = log.read_text()
    assert len(re.findall(r"resuming \S+ at step \d+", text)) == 2, text[-3000:]
    assert len(re.findall(r"stopped by SIGTERM after step \d+", text)) == 2, text[-3000:]
    summary_file = out / "summary.json"
    assert summary_file.exists(), "\n".join(p.read_text()[-1500:] for p in (tmp_path / "scripts" / "logs").glob("*"))
    on_slurm = json.loads(summary_file.read_text())

    local = _figure("--out", str(tmp_path / "local_out"), *knobs, cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-2000:]
    here = json.loads((tmp_path / "local_out" / "summary.json").read_text())
    assert on_slurm["pretrain_loss"] == pytest.approx(here["pretrain_loss"], rel=1e-6)
    for family in ("lowered_lr", "replay"):
        for a, b in zip(on_slurm[family], here[family], strict=True):
            for key in ("old_loss", "new_loss", "tokens", "reached_target"):
                assert a[key] == pytest.approx(b[key], rel=1e-6), (family, key)
