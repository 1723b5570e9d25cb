"""Multi-process training over loopback: 2 and 4 `jax.distributed` processes on the CPU backend (one
device each, gloo collectives), sharing one run directory as on a cluster file system.

Checks, for dp, fsdp and tp: the same final metrics as one process holding as many devices; every
metrics row written once; `kill -9` of one process mid-run, then a rerun of all, ends bitwise equal to
the uninterrupted multi-process run; a checkpoint written by 2 processes resumes on 1 and on 4.

Each case starts several Python processes that each compile the train step (10-40 s each on 2 busy
cores), so the module is marked `cluster` (skipped by the default suite): `python -m pytest -q -m cluster
tests/test_multihost.py` (.ci/run runs it after the suite).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from forgetting.core import sharded_checkpoint
from forgetting.stages import generate
from forgetting.training import runs

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

T = 32
KEYS = ("valid_ntp", "valid_ntp_h2", "train_loss", "weight_norm", "step")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("corpus") / "lang0.bin"
    generate.generate(generate.Config(corpus="synthetic", language=0, num_tokens=40_000, vocab_size=64, seq_len=T,
                                      out=str(out)))
    return str(out)


def _args(corpus: str, run_dir: Path, mesh: str, mesh_model: int = 1, steps: int = 6, every: int = 2) -> list[str]:
    return ["--data.path", corpus, "--data.num_tokens_valid", "2048", "--model.d_model", "32", "--model.n_layers", "1",
            "--model.head_dim", "16", "--model.seq_len", str(T), "--model.dtype", "float32", "--opt.batch_size", "8",
            "--opt.warmup_tokens", "256", "--stop.num_tokens_train", str(8 * T * steps), "--log.every_steps",
            str(every), "--log.progress", "false", "--run.mesh", mesh, "--run.mesh_model", str(mesh_model),
            "--run.dir", str(run_dir)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int, args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """`n` train processes (one CPU device each) joined through a loopback coordinator."""
    port, procs = _free_port(), []
    log_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   FORGETTING_COORDINATOR=f"127.0.0.1:{port}", FORGETTING_NUM_PROCESSES=str(n),
                   FORGETTING_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-m", "forgetting.stages.train", *args], env=env,
                                      stdout=open(log_dir / f"out{i}", "w"), stderr=open(log_dir / f"err{i}", "w")))
    return procs


def _final(procs: list[subprocess.Popen], log_dir: Path) -> dict:
    for i, p in enumerate(procs):
        rc = p.wait(timeout=600)
        assert rc == 0, f"process {i} exited {rc}:\n{(log_dir / f'err{i}').read_text()[-3000:]}"
    lines = [(log_dir / f"out{i}").read_text().strip().splitlines() for i in range(len(procs))]
    finals = [json.loads(ls[-1]) for ls in lines if ls and ls[-1].startswith("{")]
    assert len(finals) == 1, "exactly one process (process 0) prints the final JSON"
    return finals[0]


def run_multi(n: int, corpus: str, root: Path, mesh: str, **kw) -> dict:
    log_dir = root / "logs"
    return _final(_launch(n, _args(corpus, root / "runs", mesh, **kw), log_dir), log_dir)


def run_single(devices: int, corpus: str, root: Path, mesh: str, **kw) -> dict:
    """One process with `devices` fake CPU devices, same mesh shape."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for k in ("FORGETTING_COORDINATOR", "FORGETTING_NUM_PROCESSES", "FORGETTING_PROCESS_ID"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "forgetting.stages.train", *_args(corpus, root / "runs", mesh, **kw)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_same(a: dict, b: dict, rel: float) -> None:
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], rel=rel), key


@pytest.mark.parametrize("mesh,n,mesh_model", [("dp", 2, 1), ("fsdp", 2, 1), ("tp", 2, 2), ("fsdp", 4, 1),
                                               ("tp", 4, 2)])
def test_processes_match_one_process_and_write_each_row_once(corpus, tmp_path, mesh, n, mesh_model):
    single = run_single(n, corpus, tmp_path / "single", mesh, mesh_model=mesh_model)
    multi = run_multi(n, corpus, tmp_path / "multi", mesh, mesh_model=mesh_model)
    # Same global computation; only the collectives' summation order may differ (gloo vs in-process).
    _assert_same(multi, single, rel=1e-5)
    run = Path(multi["run_dir"])
    assert [r["step"] for r in runs.read_metrics(run)] == [0, 2, 4, 6]  # each row once
    assert runs.is_done(run) and json.loads((run / runs.DONE_FILE).read_text())["step"] == 6
    # The final weights were written as shards (one file per process) and load whole in this one process.
    manifest = json.loads(sharded_checkpoint.manifest_path(run / runs.PARAMS_FILE).read_text())
    assert manifest["num_processes"] == n and len(manifest["files"]) == n
    assert not (run / runs.PARAMS_FILE).exists()
    loaded = runs.load_run(run)
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(p, np.float64))) for p in loaded.params.values())))
    assert norm == pytest.approx(multi["weight_norm"], rel=1e-5)


def _kill_mid_run(procs: list[subprocess.Popen], run: Path, after_step: int) -> int:
    """Waits until a checkpoint past `after_step` is committed, then `kill -9`s process 1 and (since the
    others then wait on it forever) the rest. Returns the step of the checkpoint left behind."""
    state = run / runs.STATE_FILE
    deadline = time.time() + 300
    while time.time() < deadline:
        if sharded_checkpoint.manifest_path(state).exists() and sharded_checkpoint.read_metadata(state)["step"] >= after_step:
            break
        assert all(p.poll() is None for p in procs), "a process ended before the kill"
        time.sleep(0.02)
    else:
        raise AssertionError(f"no checkpoint past step {after_step} within 300 s")
    procs[1].send_signal(signal.SIGKILL)
    time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
    assert not runs.is_done(run), "the run finished before the kill; lengthen it"
    return sharded_checkpoint.read_metadata(state)["step"]


def test_kill9_then_rerun_resumes_exactly_and_restores_on_other_process_counts(corpus, tmp_path):
    kw = dict(mesh_model=1, steps=40, every=4)
    reference = run_multi(2, corpus, tmp_path / "reference", "fsdp", **kw)

    root = tmp_path / "killed"
    args = _args(corpus, root / "runs", "fsdp", **kw)
    procs = _launch(2, args, root / "logs0")
    run = Path(reference["run_dir"].replace(str(tmp_path / "reference"), str(root)))
    resumed_from = _kill_mid_run(procs, run, after_step=8)
    assert 8 <= resumed_from < 40
    # Keep a copy of the interrupted run for the restores on 1 and 4 processes below.
    for name in ("on1", "on4"):
        shutil.copytree(root / "runs", tmp_path / name / "runs")

    resumed = _final(_launch(2, args, root / "logs1"), root / "logs1")
    for key in KEYS:  # same processes, same shards: bitwise the same numbers
        assert resumed[key] == reference[key], key
    steps = [r["step"] for r in runs.read_metrics(run)]
    assert steps == list(range(0, 41, 4)), "each row once, none lost or repeated by the resume"
    assert "resuming" in (root / "logs1" / "err0").read_text()

    # A checkpoint written by 2 processes resumes on 1 process (2 devices) and on 4 processes.
    on1 = run_single(2, corpus, tmp_path / "on1", "fsdp", **kw)
    on4 = run_multi(4, corpus, tmp_path / "on4", "fsdp", **kw)
    for other in (on1, on4):
        _assert_same(other, reference, rel=1e-5)


# ------------------------------------------------------------------ one stop decision (SIGTERM to one process)


def _checkpoint_past(procs: list[subprocess.Popen], state: Path, step: int, log_dir: Path) -> None:
    deadline = time.time() + 300
    while not (sharded_checkpoint.manifest_path(state).exists() and sharded_checkpoint.read_metadata(state)["step"] >= step):
        for i, p in enumerate(procs):
            assert p.poll() is None, f"process {i} ended early:\n{(log_dir / f'err{i}').read_text()[-3000:]}"
        assert time.time() < deadline, f"no checkpoint past step {step} within 300 s"
        time.sleep(0.02)


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes_exactly(corpus, tmp_path):
    """Only process 1 gets the SIGTERM (as when a scheduler signals one host): both processes stop after
    the same step with one checkpoint (the request is OR-reduced across processes every STOP_POLL_STEPS
    steps), exit 143, and a rerun of both ends bitwise equal to the uninterrupted run."""
    import re

    from forgetting.stages import train

    kw = dict(mesh_model=1, steps=40, every=4)
    reference = run_multi(2, corpus, tmp_path / "reference", "fsdp", **kw)

    root = tmp_path / "stopped"
    args = _args(corpus, root / "runs", "fsdp", **kw)
    run = Path(reference["run_dir"].replace(str(tmp_path / "reference"), str(root)))
    procs = _launch(2, args, root / "logs0")
    _checkpoint_past(procs, run / runs.STATE_FILE, 8, root / "logs0")
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
    errs = [(root / "logs0" / f"err{i}").read_text() for i in range(2)]
    assert codes == [128 + signal.SIGTERM] * 2, errs
    stops = [re.findall(r"stopped by SIGTERM after step (\d+)", e) for e in errs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops  # process 0 never saw the signal itself
    step = int(stops[0][0])
    assert step % train.STOP_POLL_STEPS == 0 and 8 <= step < 40
    assert sharded_checkpoint.read_metadata(run / runs.STATE_FILE)["step"] == step and not runs.is_done(run)

    resumed = _final(_launch(2, args, root / "logs1"), root / "logs1")
    assert f"resuming {run} at step {step}" in (root / "logs1" / "err0").read_text()
    for key in KEYS:
        assert resumed[key] == reference[key], key
    assert [r["step"] for r in runs.read_metrics(run)] == list(range(0, 41, 4))


# ------------------------------------------------------------------------------------------------------------
# Every mode on 2 processes (issue 28): finetuning with real and self-generated KL replay, LoRA, a pretraining
# mixture; kill -9 and resume for dp and tp; a multi-process finetune reads only its own slices of the loaded
# params file.

FINETUNE_KEYS = KEYS + ("train_loss_ntp", "train_loss_reg", "prev_ntp", "prev_kl", "valid_kl", "dist_to_ref")
# name: (mesh, mesh_model, flags, what compares beyond KEYS); the meshes vary so that each strategy runs a finetune
MODES = {
    "kl_real": ("fsdp", 1, ["--reg.method", "kl_pre", "--reg.coeff", "1", "--reg.batch_size", "4"], FINETUNE_KEYS),
    "kl_self": ("tp", 2, ["--reg.method", "kl_pre", "--reg.coeff", "1", "--reg.batch_size", "4", "--reg.synth", "true",
                          "--reg.buffer", "2"], FINETUNE_KEYS),
    "lora": ("dp", 1, ["--model.lora_rank", "2"], FINETUNE_KEYS),
    "mix": ("fsdp", 1, ["--mix.coeff", "0.25"], KEYS + ("mix_ntp", "valid_kl")),
}
# Records, per process, what the checkpoint readers read (see _traced_train): (file, leaf, region) of every sliced
# read and the files read whole.
TRACE_MAIN = """
import atexit, json, os, sys
from forgetting.core import checkpoint
from forgetting.stages import train
log = {"regions": [], "whole": []}
read_region, read_records = checkpoint.read_region, checkpoint._read_records
def traced_region(path, location, region):
    out = read_region(path, location, region)
    log["regions"].append([str(path), location.path, [list(sl.indices(d)[:2]) for sl, d in zip(region, location.shape)]])
    return out
def traced_records(path):
    log["whole"].append(str(path))
    return read_records(path)
checkpoint.read_region, checkpoint._read_records = traced_region, traced_records
atexit.register(lambda: open(os.environ["TRACE_OUT"], "w").write(json.dumps(log)))
train.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def corpus1(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("corpus1") / "lang1.bin"
    generate.generate(generate.Config(corpus="synthetic", language=1, num_tokens=40_000, vocab_size=64, seq_len=T,
                                      out=str(out)))
    return str(out)


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory) -> str:
    """A finished pretraining run (one process, one device) to finetune from: its params.msgpack is one file."""
    root = tmp_path_factory.mktemp("base")
    args = _args(corpus, root / "runs", "fsdp", steps=4)
    args = args[:args.index("--run.mesh")] + ["--run.dir", str(root / "runs")]
    proc = subprocess.run([sys.executable, "-m", "forgetting.stages.train", *args], env=_single_env(1),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"]


def _single_env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for k in ("FORGETTING_COORDINATOR", "FORGETTING_NUM_PROCESSES", "FORGETTING_PROCESS_ID"):
        env.pop(k, None)
    return env


def _mode_args(mode: str, corpus: str, corpus1: str, base_run: str, run_dir: Path) -> list[str]:
    mesh, mesh_model, flags, _ = MODES[mode]
    if mode == "mix":  # pretraining on corpus with a quarter of each batch from corpus1
        return _args(corpus, run_dir, mesh, mesh_model, steps=4) + ["--mix.path", corpus1, *flags]
    return _args(corpus1, run_dir, mesh, mesh_model, steps=4) + ["--model.load_path", base_run, *flags]


def _traced_launch(n: int, args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """`_launch`, each process recording its checkpoint reads in log_dir/trace{i}.json."""
    port, procs = _free_port(), []
    log_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   FORGETTING_COORDINATOR=f"127.0.0.1:{port}", FORGETTING_NUM_PROCESSES=str(n),
                   FORGETTING_PROCESS_ID=str(i), TRACE_OUT=str(log_dir / f"trace{i}.json"))
        procs.append(subprocess.Popen([sys.executable, "-c", TRACE_MAIN, *args], env=env,
                                      stdout=open(log_dir / f"out{i}", "w"), stderr=open(log_dir / f"err{i}", "w")))
    return procs


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_on_two_processes_matches_one_process(corpus, corpus1, base_run, tmp_path, mode):
    keys = MODES[mode][3]
    single = subprocess.run(
        [sys.executable, "-m", "forgetting.stages.train",
         *_mode_args(mode, corpus, corpus1, base_run, tmp_path / "single")],
        env=_single_env(2), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    logs = tmp_path / "logs"
    multi = _final(_traced_launch(2, _mode_args(mode, corpus, corpus1, base_run, tmp_path / "multi"), logs), logs)
    for key in keys:
        assert key in one, key  # the mode computes what it is compared on
        # Same global computation, bit for bit: a reduction over 2 devices is one addition, whichever order the
        # collectives (gloo vs in-process) take; so stricter than the 4-process pretraining test's rel=1e-5.
        assert multi[key] == one[key], key
    assert [r["step"] for r in runs.read_metrics(multi["run_dir"])] == [0, 2, 4]  # each row once
    if mode == "mix":
        return
    # The loaded run's params.msgpack (one file, written by one process) is read slice by slice: each process
    # reads exactly what its devices hold, never the whole file.
    params_file = str(Path(base_run) / runs.PARAMS_FILE)
    traces = [json.loads((logs / f"trace{i}.json").read_text()) for i in range(2)]
    for trace in traces:
        assert params_file not in trace["whole"], "a process read the whole params file"
    reads = [{(leaf, json.dumps(region)) for file, leaf, region in t["regions"] if file == params_file} for t in traces]
    shapes = {name: list(spec.shape) for name, spec in runs.abstract_params(runs.load_run(base_run).model_cfg).items()}
    for name, shape in shapes.items():
        per_process = [[json.loads(r) for leaf, r in rs if leaf == f"[{name!r}]"] for rs in reads]
        whole = [[0, d] for d in shape]
        if MODES[mode][0] == "dp":  # every parameter replicated: each process holds (and reads) all of it
            assert per_process == [[whole], [whole]], name
            continue
        # fsdp / tp over 2 processes: the leaf's largest shardable axis is split in two halves, one per process
        assert all(len(p) == 1 for p in per_process), name
        a, b = per_process[0][0], per_process[1][0]
        if a == whole:  # a leaf with no axis to split stays replicated
            assert b == whole, name
            continue
        split = [i for i, (ra, rb) in enumerate(zip(a, b)) if ra != rb]
        assert len(split) == 1, name
        i = split[0]
        assert sorted([a[i], b[i]]) == [[0, shape[i] // 2], [shape[i] // 2, shape[i]]], name
        assert all(a[j] == [0, shape[j]] for j in range(len(shape)) if j != i), name
    sliced = [n for n, s in shapes.items() if any(json.loads(r) != [[0, d] for d in s]
                                                  for leaf, r in reads[0] if leaf == f"[{n!r}]")]
    if MODES[mode][0] != "dp":
        assert sliced, "no parameter was split between the processes"


@pytest.mark.parametrize("mesh,mesh_model", [("dp", 1), ("tp", 2)])
def test_kill9_then_rerun_resumes_bitwise_for_dp_and_tp(corpus, tmp_path, mesh, mesh_model):
    kw = dict(mesh_model=mesh_model, steps=24, every=4)
    reference = run_multi(2, corpus, tmp_path / "reference", mesh, **kw)
    root = tmp_path / "killed"
    args = _args(corpus, root / "runs", mesh, **kw)
    run = Path(reference["run_dir"].replace(str(tmp_path / "reference"), str(root)))
    resumed_from = _kill_mid_run(_launch(2, args, root / "logs0"), run, after_step=8)
    assert 8 <= resumed_from < 24
    resumed = _final(_launch(2, args, root / "logs1"), root / "logs1")
    assert "resuming" in (root / "logs1" / "err0").read_text()
    for key in KEYS:
        assert resumed[key] == reference[key], key
    assert [r["step"] for r in runs.read_metrics(run)] == list(range(0, 25, 4))
    # The final weights are byte for byte the uninterrupted run's.
    ref_params = runs.load_run(reference["run_dir"]).params
    got = runs.load_run(run).params
    for name in ref_params:
        assert np.asarray(got[name]).tobytes() == np.asarray(ref_params[name]).tobytes(), name
