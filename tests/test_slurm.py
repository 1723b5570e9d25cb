"""`--slurm DIR`: job-array scripts for a figure's runs, and a real submission to a one-node Slurm.

The script checks are fast and in the default suite. `test_real_slurm_matches_local_run` starts a private
Slurm (tests/slurm/start_slurm.sh: Debian's slurm-wlm + munge, as root), submits a shrunken high_lr mini,
and compares its summary with a local run's; it takes minutes, so it is marked `cluster` (skipped by the default suite) and skips without Slurm:

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
SMALL = ["--lowered_lrs", "3e-3", "--replace_fracs", "0.0", "0.25", "--pretrain_tpp", "100",
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
