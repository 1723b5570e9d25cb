"""`--jobs N`: runs of a figure side by side in child processes on their own cores, with the same results as
one by one; the rule behind `--jobs auto`; the persistent compilation cache that cannot change numbers."""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgetting.experiments import framework, jobs
from forgetting.experiments.framework import RunSpec
from forgetting.training import cli, compile_cache
from forgetting.training.train_config import TrainConfig, replace

FIGURE = Path(__file__).with_name("jobs_figure.py")
WALL_CLOCK = {"train_seconds", "wall_time", "tokens_per_s", "run_dir"}


# ------------------------------------------------------------------------------------ pure functions


def test_parse_jobs():
    assert jobs.parse_jobs("3") == 3 and jobs.parse_jobs("auto") == "auto"
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--jobs"):
            jobs.parse_jobs(bad)


def test_auto_jobs_rule():
    # measured: two runs at once gain at d_model 8..32 on 2 cores (1.96x..1.27x) and the toy's 64 (1.34x); wider is not measured
    assert jobs.auto_jobs(2, [8, 8, None])[0] == 2
    assert jobs.auto_jobs(16, [32])[0] == 16
    assert jobs.auto_jobs(2, [8, 64])[0] == 2, "the toy's d_model 64 gained 1.34x from a neighbour"
    assert jobs.auto_jobs(2, [8, 128])[0] == 1, "one wide model: one run at a time"
    assert jobs.auto_jobs(1, [8])[0] == 1, "one core"
    assert jobs.auto_jobs(4, [None, None])[0] == 1, "no model width known"
    n, why = jobs.auto_jobs(2, [8, 128])
    assert "128" in why and str(jobs.AUTO_MAX_WIDTH) in why


@pytest.mark.parametrize("cores,n", [(2, 1), (2, 2), (2, 3), (16, 3), (16, 16), (5, 2)])
def test_core_shares_split_the_cores(cores, n):
    shares = jobs.core_shares(list(range(cores)), n)
    assert len(shares) == n and all(shares)
    if n <= cores:
        flat = [c for s in shares for c in s]
        assert sorted(flat) == list(range(cores)), "disjoint and covering"
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    else:
        assert all(len(s) == 1 for s in shares)


def test_model_width():
    assert jobs.model_width(replace(TrainConfig(), **{"model.d_model": 24})) == 24
    assert jobs.model_width(object()) is None


def test_child_command_of_stage_run_parses_back_to_its_config(tmp_path):
    cfg = replace(TrainConfig(), **{"run.dir": str(tmp_path), "data.path": str(tmp_path / "d.bin"), "model.d_model": 24, "model.head_dim": 8,
                                    "opt.peak_lr": 3e-3, "stop.num_tokens_train": 1000})
    cmd = jobs.child_command(RunSpec("x", cfg, module="forgetting.stages.train"), ["python", "fig.py"])
    assert cmd[:3] == [sys.executable, "-m", "forgetting.stages.train"]
    assert cli.parse(TrainConfig, cmd[3:]) == cfg


def test_child_command_of_fn_run_is_the_figure_with_only(tmp_path):
    spec = RunSpec("data", {"x": 1}, fn=lambda c, d: {})
    cmd = jobs.child_command(spec, ["python", "-m", "forgetting.experiments.toy_continual", "--out", "o"])
    assert cmd == [sys.executable, "-m", "forgetting.experiments.toy_continual", "--out", "o", "--only", "data",
                   "--jobs", "1", "--no_summary"]


def test_a_pinned_worker_is_moved_onto_its_share_before_it_hears_of_its_run(tmp_path, monkeypatch):
    """The worker may start (and end) a short run as soon as the name arrives: the re-pin must come first."""
    events: list[tuple] = []

    class Stdin:
        def write(self, data: bytes) -> None:
            events.append(("name", data.decode().strip()))

        def flush(self) -> None:
            pass

    class Proc:
        pid, stdin = 12345, Stdin()

    monkeypatch.setenv(jobs.PIN_ENV, "1")
    monkeypatch.setattr(jobs, "_pin", lambda pid, cores: events.append(("pin", list(cores))))
    pool = jobs.Pool(tmp_path, ["fig.py"])
    pool.cores = [0, 1]
    pool.workers = [jobs.Worker(Proc(), [0]), jobs.Worker(Proc(), [1])]  # both idle, left on their halves
    pool.start(RunSpec("c", {}, fn=lambda c, d: {}), ["python", "fig.py", "--only", "c"])
    assert events == [("pin", [0, 1]), ("name", "c")], "a run alone gets every core before it starts"


# ------------------------------------------------------------------------------------ the fake figure


def _figure(out: Path, *flags: str, pin: bool = False, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, FORGETTING_COMPILE_CACHE="off", **{jobs.PIN_ENV: "1" if pin else "0"})
    return subprocess.run([sys.executable, str(FIGURE), "--out", str(out), *flags], capture_output=True, text=True,
                          env=env, timeout=900, **kw)


def _results(out: Path, **knobs) -> dict:
    return {n: framework.read_result(d) for n, d in framework.locate(_runs(out, **knobs), out).items()}


@pytest.mark.parametrize("pin", [False, True])
def test_jobs_2_runs_independent_runs_at_once_and_dependents_after(tmp_path, pin):
    out = tmp_path / "o"
    proc = _figure(out, "--jobs", "2", "--hold", "1.5", pin=pin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = _results(out, hold=1.5)
    assert r["a"]["met"] and r["b"]["met"], "a and b ran at the same time"
    assert r["a"]["start"] < r["b"]["end"] and r["b"]["start"] < r["a"]["end"]
    assert r["a"]["pid"] != r["b"]["pid"], "runs side by side in two worker processes"
    assert {r[n]["pid"] for n in "cd"} <= {r[n]["pid"] for n in "ab"}, "later runs reuse the workers"
    assert r["c"]["start"] >= max(r["a"]["end"], r["b"]["end"]) and r["d"]["start"] >= r["c"]["end"]
    cores = jobs.available_cores()
    if not pin:
        assert all(r[n]["cores"] == cores for n in "abcd"), "unpinned: the kernel places every worker's threads"
    elif len(cores) >= 2:  # FORGETTING_JOBS_PIN=1
        assert not set(r["a"]["cores"]) & set(r["b"]["cores"]), "runs side by side share no core"
        assert r["c"]["cores"] == cores, "a run alone gets every core"
    assert (out / "logs" / "a.log").is_file() and "--only a" in (out / "logs" / "a.log").read_text()
    assert json.loads((out / "summary.json").read_text())["d"]["name"] == "d", "the parent summarized"
    assert proc.stderr.count("summary_pid") == 1, "only the parent summarized (children: --no_summary)"


def test_failed_run_is_reported_with_its_log_tail_and_its_dependents_skipped(tmp_path):
    out = tmp_path / "o"
    proc = _figure(out, "--jobs", "2", "--fail", "a", "--hold", "0.1")
    assert proc.returncode == 1
    assert f"run 'a' failed (exit status 1); last lines of {out / 'logs' / 'a.log'}" in proc.stderr
    assert "RuntimeError: boom in a" in proc.stderr, "the tail of the run's log"
    assert "skipping run 'c' (wave 1): dependencies not finished: ['a']" in proc.stderr
    assert "skipping run 'd'" in proc.stderr and "failed runs: ['a']" in proc.stderr
    r = _results(out, fail="a", hold=0.1)
    assert r["b"]["name"] == "b" and r["c"] == {} and r["d"] == {}


def test_sigterm_with_jobs_2_stops_both_children_with_checkpoints_and_prints_resume(tmp_path):
    out = tmp_path / "o"
    env = dict(os.environ, FORGETTING_COMPILE_CACHE="off")
    proc = subprocess.Popen([sys.executable, str(FIGURE), "--out", str(out), "--jobs", "2", "--wait"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dirs = framework.locate(_runs(out, wait=True), out)
    deadline = time.time() + 300
    while not all((dirs[n] / "started").exists() for n in "ab"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "runs a and b did not both start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    assert all((dirs[n] / "checkpoint").exists() for n in "ab"), "both children checkpointed"
    assert not framework.is_done(dirs["a"]) and not dirs["c"].exists(), "nothing else started"
    assert "stopped by SIGTERM: runs ['a', 'b'] saved a checkpoint" in err or \
        "stopped by SIGTERM: runs ['b', 'a'] saved a checkpoint" in err
    assert "failed" not in err
    resume = err.split("Resume with:\n")[1].splitlines()[0]
    assert resume.endswith(f"--out {out} --jobs 2 --wait")
    for n in "ab":  # the children are gone
        pid = int((dirs[n] / "started").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_second_sigterm_with_jobs_2_stops_the_children_at_once(tmp_path):
    out = tmp_path / "o"
    env = dict(os.environ, FORGETTING_COMPILE_CACHE="off")
    proc = subprocess.Popen([sys.executable, str(FIGURE), "--out", str(out), "--jobs", "2", "--wait", "--linger", "120"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dirs = framework.locate(_runs(out, wait=True, linger=120.0), out)
    deadline = time.time() + 300
    while not all((dirs[n] / "started").exists() for n in "ab"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # the children got the first one and are "saving" for 120 s
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    assert time.time() - t0 < 90, "did not wait for the 120 s checkpoints"
    assert "stopped at once by a second SIGTERM" in err and "Resume with:" in err
    assert not any((dirs[n] / "checkpoint").exists() for n in "ab"), "the checkpoints were abandoned"
    for n in "ab":
        with pytest.raises(ProcessLookupError):
            os.kill(int((dirs[n] / "started").read_text()), 0)


def test_jobs_skips_a_run_whose_unselected_dependencies_are_unfinished(tmp_path):
    out = tmp_path / "o"
    proc = _figure(out, "--jobs", "2", "--only", "c,d")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping run 'c' (wave 1): dependencies not finished: ['a', 'b']" in proc.stderr
    assert "skipping run 'd' (wave 2): dependencies not finished: ['c']" in proc.stderr
    assert not (out / "logs").exists(), "nothing started"


def _runs(out: Path, **knobs) -> list[RunSpec]:
    sys.path.insert(0, str(FIGURE.parent))
    try:
        import jobs_figure
    finally:
        sys.path.pop(0)
    return jobs_figure.runs(jobs_figure.Knobs(**knobs), out)


def test_jobs_with_slurm_is_refused(tmp_path, capsys):
    from test_framework import fmain  # the fake figure of test_framework.py

    with pytest.raises(SystemExit) as e:
        fmain(["--out", str(tmp_path), "--slurm", str(tmp_path / "s"), "--jobs", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--jobs 2 with --slurm" in err and "--slurm_parallel" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flag", ["--list", "--plot_only"])
def test_jobs_where_nothing_runs_is_refused(flag, tmp_path, capsys):
    from test_framework import fmain

    with pytest.raises(SystemExit) as e:
        fmain(["--out", str(tmp_path), flag, "--jobs", "auto"])
    assert e.value.code == 2 and f"--jobs auto with {flag}: nothing runs" in capsys.readouterr().err


def test_bad_jobs_value_is_a_one_line_error(tmp_path, capsys):
    from test_framework import fmain

    with pytest.raises(SystemExit) as e:
        fmain(["--out", str(tmp_path), "--jobs", "0"])
    assert e.value.code == 2 and "--jobs must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ compile cache


def test_compile_cache_location_and_off(monkeypatch, tmp_path):
    key = compile_cache.machine_key()
    assert len(key) == 12 and key == compile_cache.machine_key()
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    assert compile_cache.location() == tmp_path / "c" / key
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.location() is None
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("FORGETTING_CACHE_DIR", str(tmp_path / "root"))
    assert compile_cache.location() == tmp_path / "root" / "jax" / key


def test_compile_cache_enable_sets_the_environment_children_inherit(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    for name in compile_cache.settings(tmp_path):
        monkeypatch.delenv(name, raising=False)
    import jax

    before = jax.config.jax_compilation_cache_dir
    try:
        where = tmp_path / "c" / compile_cache.machine_key()
        assert compile_cache.enable() == where
        assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(where) and where.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(where)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


# ------------------------------------------------------------------------------------ real training

TOY = ["--d_model", "16", "--head_dim", "8", "--n_layers", "1", "--first_steps", "8", "--steps", "4",
       "--batch_size", "8", "--warmup_steps", "1", "--num_examples", "120", "--valid_examples", "8",
       "--eval_every", "2", "--replay_buffer", "2"]


def _toy(out: Path, cache: str, *flags: str) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", FORGETTING_COMPILE_CACHE=cache)
    for name in compile_cache.settings(out):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "forgetting.experiments.toy_continual", "--out", str(out), *TOY,
                           "--seeds", "1", *flags], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _per_run(out: Path) -> dict:
    """{run name: (metrics lines, done.json)} without the wall-clock fields."""
    def strip(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in WALL_CLOCK}

    found = {}
    for d in sorted(glob.glob(str(out / "*-*" / framework.DONE))):
        run = Path(d).parent
        found[run.name.rsplit("-", 1)[0]] = ([strip(m) for m in framework.read_metrics(run)], strip(framework.read_done(run)))
    return found


@pytest.mark.heavy
def test_toy_figure_jobs_2_and_compile_cache_give_the_metrics_of_jobs_1_without_cache(tmp_path):
    cache = tmp_path / "cache"
    _toy(tmp_path / "one", "off", "--jobs", "1")
    _toy(tmp_path / "cold", str(cache), "--jobs", "2")
    assert list((cache / compile_cache.machine_key()).iterdir()), "the cache was written"
    _toy(tmp_path / "warm", str(cache), "--jobs", "2")  # every run loads the compiled steps
    one, cold, warm = (_per_run(tmp_path / n) for n in ("one", "cold", "warm"))
    assert len(one) == 8 and sum(bool(m) for m, _ in one.values()) == 7, "7 train runs with metrics + data"
    assert one == cold == warm


def test_compile_cache_sets_no_size_limit_without_filelock(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    assert compile_cache.max_bytes() == (compile_cache.MAX_BYTES if real("filelock") else -1)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "filelock" else real(name, *a))
    assert compile_cache.max_bytes() == -1, "JAX raises at the first compile when a limit is set without filelock"
    assert compile_cache.settings(Path("/c"))["JAX_COMPILATION_CACHE_MAX_SIZE"] == "-1"


def _kl_finetune(tmp_path: Path) -> TrainConfig:
    """A finetune with KL on real old text at the shapes where XLA's CPU matmuls split their sums by the thread
    pool's size (found by bisecting the learning-rate mini's config: T 64, 32 + 32 rows, 4096 validation tokens)."""
    from forgetting.stages import generate, train

    T = 64
    paths = []
    for lang in (0, 1):
        out = tmp_path / f"lang{lang}.bin"
        generate.generate(generate.Config(corpus="synthetic", language=lang, num_tokens=40_000, vocab_size=64,
                                          seq_len=T, out=str(out)))
        paths.append(str(out))
    common = {"data.num_tokens_valid": 4096, "model.d_model": 16, "model.n_layers": 1, "model.head_dim": 16,
              "model.seq_len": T, "model.dtype": "float32", "opt.batch_size": 32, "opt.warmup_tokens": 256,
              "opt.peak_lr": 3e-3, "log.every_steps": 2, "log.progress": False}
    pre = train.train(replace(TrainConfig(), **common, **{"data.path": paths[0], "stop.num_tokens_train": 32 * T * 8,
                                                          "run.dir": str(tmp_path / "pre")}))
    return replace(TrainConfig(), **common, **{
        "data.path": paths[1], "model.load_path": pre["run_dir"], "reg.method": "kl_pre", "reg.path": paths[0],
        "reg.batch_size": 32, "reg.coeff": 1.0, "stop.num_tokens_train": 32 * T * 6,
        "eval.extra_paths": (paths[0], paths[1]), "run.dir": str(tmp_path / "ft")})


@pytest.mark.skipif(len(jobs.available_cores()) < 2, reason="needs two cores: a child on one of them")
def test_a_child_on_one_core_of_two_computes_the_numbers_of_the_run_done_one_by_one(tmp_path):
    """A worker pinned to a share of the cores keeps the figure's XLA thread pool size (`child_environment`):
    with a pool sized for its one core, this run's evals differed from the in-process run's in the 8th digit."""
    from forgetting.stages import train

    cfg = _kl_finetune(tmp_path)
    alone = train.train(cfg)  # in this process: the pool of every core, as `--jobs 1` runs it
    side = replace(cfg, **{"run.dir": str(tmp_path / "side")})
    core = jobs.available_cores()[:1]
    proc = subprocess.run([sys.executable, "-m", "forgetting.stages.train", *cli.to_argv(side)], capture_output=True,
                          text=True, timeout=600, env=jobs.child_environment(jobs.available_cores()),
                          preexec_fn=lambda: os.sched_setaffinity(0, core))
    assert proc.returncode == 0, proc.stderr[-3000:]

    def metrics(run_dir: str | Path) -> list[dict]:
        return [{k: v for k, v in m.items() if k not in WALL_CLOCK} for m in framework.read_metrics(Path(run_dir))]

    [side_dir] = [p.parent for p in (tmp_path / "side").glob(f"*/{framework.DONE}")]
    assert len(metrics(alone["run_dir"])) == 4 and metrics(side_dir) == metrics(alone["run_dir"])


def test_runs_that_others_wait_on_start_first():
    specs = [RunSpec("mix", None, fn=print), RunSpec("pre", None, fn=print), RunSpec("ft1", None, fn=print, after=("pre",)),
             RunSpec("ft2", None, fn=print, after=("pre",)), RunSpec("eval", None, fn=print, after=("ft1",))]
    assert jobs.dependents(specs) == {"mix": 0, "pre": 3, "ft1": 1, "ft2": 0, "eval": 0}
    sched = jobs.Scheduler(framework.waves(specs), specs, Path("/nonexistent"), 2, ["fig"], None)
    assert [s.name for s in sched.pending] == ["pre", "ft1", "mix", "ft2", "eval"]
