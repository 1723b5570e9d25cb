"""`--jobs N`: a figure's independent runs side by side, on up to N worker processes.

A run starts as soon as the runs it depends on (`after`) are finished, in wave order, at most N at once.
A worker is the figure itself with `--worker`: it reads run names from the figure and runs each in-process
exactly as `--jobs 1` does (`framework.execute`), then waits for the next, so a run pays neither Python's
and JAX's start nor a compile its worker already did. Each run's log starts with the command that reruns it
alone (a stage run: `python -m <module> <flags>`, the command `--list` prints; an in-process (`fn`) run: the
figure with `--only NAME`).

Cores: XLA sizes its CPU thread pool from the cores a process may use, and its matmuls split their sums by
that size, so a worker is told the figure's own core count (`PJRT_NPROC`): its pool, and so its numbers,
are those of the run done one by one (with a pool for one core of two, the learning-rate mini's KL runs
differed in the 8th digit). The runs then compute what they compute one by one (same program, same seed,
same thread pool), so their metrics are identical to `--jobs 1`; only wall-clock fields differ
(tests/test_framework_jobs.py). Splitting the pools between the workers would change the numbers; pinning
each worker to its share of the cores (`FORGETTING_JOBS_PIN=1`: `os.sched_setaffinity`, rebalanced among the
workers with a run whenever a run starts or ends) keeps them, but measured slower than letting the kernel
place the threads (2-core AMD EPYC, one seed, fresh `--out` and compilation cache: the model-capacity mini
163.7 s pinned vs 141.6 s not, the learning-rate mini 284.0 s vs 291.3 s), so workers are not pinned by
default.

Output: one progress bar; each run's own output goes to `<out>/logs/<run name>.log` (appended, so a
resumed run keeps its history), what workers print between runs to `<out>/logs/workers.log`; a failed run
is reported with the tail of its log, and its worker takes the next run.

Ctrl-C / SIGTERM: forwarded once to every worker (they are in their own sessions, so a terminal's Ctrl-C
reaches them only through the figure): a running train run checkpoints, an in-process run finishes, no run
starts, the resume command is printed, the exit code is 128 + the signal. A second signal is forwarded too
(the workers stop at once, keeping their runs' last checkpoints).

`--jobs auto` (`auto_jobs`): one run per core when every model of the selected runs is at most
`AUTO_MAX_WIDTH` wide, else one run at a time. Measured on a 2-core AMD EPYC (issue 26): two tiny training
loops at once run at 1.96x the throughput of one at d_model 8, 1.30x at 16 and 1.27x at 32, because one
such run keeps only 1.4-1.7 cores busy; the toy figure (d_model 64, 2 layers) at 3 seeds took 1051 s with
two at once against 1406 s one at a time (1.34x, per-run metrics identical). Wider models were not
measured to gain, and a run that fills the cores by itself gains nothing from a neighbour.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

AUTO_MAX_WIDTH = 64  # widest d_model measured to gain from a neighbour run (the toy at 64: 1.34x on 2 cores)
LOG_DIR = "logs"
TAIL_LINES = 30
POLL_SECS = 0.2
PIN_ENV = "FORGETTING_JOBS_PIN"  # "1": give each worker its own share of the cores (measured slower; see above)
WORKER_FLAG = "--worker"  # the figure as a worker process (framework.main -> serve)
WORKER_LOG = "workers.log"  # what workers print outside any run
POOL_ENVS = ("PJRT_NPROC", "NPROC")  # read by jaxlib's CPU client for its thread pool size, in this order


def parse_jobs(text: str) -> int | str:
    """`--jobs` value: a positive integer or 'auto'."""
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--jobs wants a number of runs at once or 'auto', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--jobs must be >= 1 (or auto), got {n}")
    return n


def model_width(config: Any) -> int | None:
    """The d_model of a stage config (`config.model.d_model`), or None for configs without a model."""
    width = getattr(getattr(config, "model", None), "d_model", None)
    return width if isinstance(width, int) else None


def auto_jobs(cores: int, widths: Sequence[int | None]) -> tuple[int, str]:
    """(runs at once, why) for `--jobs auto` from the number of cores and the runs' model widths (see the
    module docstring for the measurement behind it). Runs without a model (data generation) do not count."""
    known = [w for w in widths if w is not None]
    if cores < 2:
        return 1, f"auto: 1 run at a time ({cores} core)"
    if not known:
        return 1, "auto: 1 run at a time (no model width known for the selected runs)"
    if max(known) > AUTO_MAX_WIDTH:
        return 1, (f"auto: 1 run at a time (d_model {max(known)} > {AUTO_MAX_WIDTH}: one run keeps the cores "
                   "busy; wider models were not measured to gain from running side by side)")
    return cores, f"auto: {cores} runs at once, one core each (every d_model <= {AUTO_MAX_WIDTH}, {cores} cores)"


def core_shares(cores: Sequence[int], n: int) -> list[list[int]]:
    """`n` disjoint, near-equal slices of `cores` covering them all; with more runs than cores, one core each,
    round robin."""
    cores = sorted(cores)
    if n <= 0:
        return []
    if n >= len(cores):
        return [[cores[i % len(cores)]] for i in range(n)]
    return [cores[i * len(cores) // n:(i + 1) * len(cores) // n] for i in range(n)]


def available_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no pinning, every share is "all cores"
        return list(range(os.cpu_count() or 1))


def child_environment(cores: Sequence[int]) -> dict[str, str]:
    """The environment of a child run: this one, with XLA's CPU thread pool sized for `cores` (every core the
    figure has), not for the child's share, unless the user sized it already (then the child inherits that)."""
    env = dict(os.environ)
    if not any(k in env for k in POOL_ENVS):
        env[POOL_ENVS[0]] = str(len(cores))
    return env


def child_command(spec: Any, figure: Sequence[str]) -> list[str]:
    """The command that runs `spec` alone in a child process. `figure`: the figure's own command line
    (script, --scale, --out, knob flags) for in-process (`fn`) runs."""
    from forgetting.training import cli

    if spec.module is not None:
        return [sys.executable, "-m", spec.module, *cli.to_argv(spec.config)]
    base = list(figure)
    if base and base[0] == "python":
        base[0] = sys.executable
    return [*base, "--only", spec.name, "--jobs", "1", "--no_summary"]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the figure dies (a killed figure leaves no orphan runs)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Child:
    """A run in progress and the worker process running it."""
    name: str
    proc: subprocess.Popen
    log: Path
    cores: list[int] = field(default_factory=list)


@dataclass
class Worker:
    """A figure process that runs the runs it is sent, one at a time, in-process (`serve`)."""
    proc: subprocess.Popen
    cores: list[int]
    run: Child | None = None
    pending: bytes = b""  # a partial report line


def _pin(pid: int, cores: Sequence[int]) -> None:
    """Moves every thread of process `pid` onto `cores` (affinity is per thread; new threads inherit it)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # the thread (or the process) just ended
            pass


def _pinning() -> bool:
    return hasattr(os, "sched_setaffinity") and os.environ.get(PIN_ENV, "0") == "1"


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class Pool:
    """Up to N worker processes (the figure with `--worker`), started as runs need them and kept for the next
    run: a run then pays neither Python's and JAX's start nor a compile its worker already did, as one by one.
    The cores are shared among the workers that are running a run."""

    def __init__(self, out: Path, figure: Sequence[str]):
        self.out = out
        self.figure = list(figure)
        self.workers: list[Worker] = []
        self.cores = available_cores()

    @property
    def children(self) -> list[Child]:
        """The runs in progress."""
        return [w.run for w in self.workers if w.run is not None]

    def _spawn(self, share: list[int]) -> Worker:
        pin = _pinning()

        def setup() -> None:
            _die_with_parent()
            if pin:
                os.sched_setaffinity(0, share)

        (self.out / LOG_DIR).mkdir(parents=True, exist_ok=True)
        with open(self.out / LOG_DIR / WORKER_LOG, "a") as err:
            proc = subprocess.Popen(worker_command(self.figure), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, start_new_session=True, preexec_fn=setup,
                                    env=child_environment(self.cores))
        os.set_blocking(proc.stdout.fileno(), False)
        worker = Worker(proc, share)
        self.workers.append(worker)
        return worker

    def start(self, spec: Any, command: list[str]) -> Child:
        """Runs `spec` on an idle worker (a new one if none is idle). `command` runs it alone (its log's first line)."""
        log = self.out / LOG_DIR / f"{spec.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(command)}\n")  # the run's command, to rerun it by hand
        idle = [w for w in self.workers if w.run is None]
        busy = len(self.children) + 1
        worker = idle[0] if idle else self._spawn(core_shares(self.cores, busy)[-1])
        worker.run = Child(spec.name, worker.proc, log, worker.cores)
        self.rebalance()  # before the worker hears of the run: the run starts on its share, not the last one
        try:
            worker.proc.stdin.write(f"{spec.name}\n".encode())
            worker.proc.stdin.flush()
        except OSError:  # it died since the last reap: reported as the run's failure there
            pass
        return worker.run

    def rebalance(self) -> None:
        running = [w for w in self.workers if w.run is not None]
        if not _pinning() or not running:
            return
        for worker, share in zip(running, core_shares(self.cores, len(running))):
            if share != worker.cores:
                worker.cores = worker.run.cores = share
                _pin(worker.proc.pid, share)

    def _reports(self, worker: Worker) -> list[tuple[int, str]]:
        """(exit code, run name) lines the worker wrote since the last call."""
        try:
            chunk = os.read(worker.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            chunk = b""
        except OSError:
            chunk = b""
        worker.pending += chunk
        *lines, worker.pending = worker.pending.split(b"\n")
        reports = [line.decode().split(" ", 1) for line in lines if line.strip()]
        return [(int(code), name) for code, name in reports]

    def reap(self) -> list[tuple[Child, int]]:
        """The runs that ended since the last call, with an exit code: 0 finished, 1 failed, 128 + n stopped by
        signal n, or the worker's own exit status where it died during the run."""
        ended = []
        for worker in list(self.workers):
            for code, name in self._reports(worker):
                if worker.run is not None and worker.run.name == name:
                    ended.append((worker.run, code))
                    worker.run = None
            if worker.proc.poll() is not None:
                self._reports(worker)
                if worker.run is not None:
                    ended.append((worker.run, worker.proc.returncode or 1))
                    worker.run = None
                self.workers.remove(worker)
        if ended:
            self.rebalance()
        return ended

    def signal_all(self, signum: int) -> None:
        for w in self.workers:
            try:
                w.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """No more runs: every worker exits once its run (if any) is over."""
        for w in self.workers:
            try:
                w.proc.stdin.close()
            except OSError:
                pass

    def wait_all(self, timeout: float | None = None) -> list[tuple[Child, int]]:
        """Closes the workers and waits for them (killing those still running after `timeout` seconds); the
        runs they had, with the workers' exit codes."""
        self.close()
        deadline = None if timeout is None else time.time() + timeout
        ended: list[tuple[Child, int]] = []
        for w in list(self.workers):
            left = None if deadline is None else max(0.0, deadline - time.time())
            try:
                rc = w.proc.wait(left)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                rc = w.proc.wait()
            reported = {n: code for code, n in self._reports(w)}
            if w.run is not None:
                ended.append((w.run, reported.get(w.run.name, rc)))
        self.workers = []
        return ended


def worker_command(figure: Sequence[str]) -> list[str]:
    base = list(figure)
    if base and base[0] == "python":
        base[0] = sys.executable
    return [*base, WORKER_FLAG, "--no_summary"]


def serve(specs: Sequence[Any], out: Path) -> int:
    """A worker's loop (`--worker`): reads run names from stdin, runs each in this process as `--jobs 1`
    would (`framework.execute`), its output appended to `<out>/logs/<name>.log`, and reports
    `<exit code> <name>` on stdout (0 finished, 1 failed, 128 + n stopped by signal n). Ends at EOF (0) or
    after a stop request (128 + the signal): a train run checkpoints first, an in-process run finishes; a
    second signal stops at once."""
    from forgetting.training import stopping

    by_name = {s.name: s for s in specs}
    report = os.fdopen(os.dup(1), "w", buffering=1)
    between = os.open(os.devnull, os.O_WRONLY)  # stdout outside a run; stderr stays the workers' log
    os.dup2(between, 1)
    os.close(between)
    with stopping.StopRequests("the running run saves a checkpoint, then this worker stops") as stop:
        for line in sys.stdin:
            name = line.strip()
            code = stop.exit_code if stop.signum is not None else _serve_one(by_name[name], out, stop)
            report.write(f"{code} {name}\n")
            if stop.signum is not None:
                break
    return stop.exit_code if stop.signum is not None else 0


def _serve_one(spec: Any, out: Path, stop: Any) -> int:
    """Runs one run with its output in its log: 0 finished, 1 failed, 128 + n stopped."""
    import traceback

    from forgetting.experiments import framework
    from forgetting.training import runs as stage_runs

    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(out / LOG_DIR / f"{spec.name}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        framework.execute(spec, out)
        return 0
    except stage_runs.Interrupted as e:
        if stop.signum is None:
            stop.request(e.exit_code - 128)
        return stop.exit_code
    except KeyboardInterrupt:  # a second signal: at once
        sys.stderr.flush()
        os._exit(stop.exit_code)
    except Exception:  # noqa: BLE001 - reported per run; the worker takes the next
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved_fd in zip((1, 2), saved):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)


def dependents(specs: Sequence[Any]) -> dict[str, int]:
    """How many runs wait on each run, directly or through others (`after`)."""
    direct: dict[str, set[str]] = {s.name: set() for s in specs}
    for s in specs:
        for d in s.after:
            direct.setdefault(d, set()).add(s.name)
    closure: dict[str, set[str]] = {}

    def reach(name: str) -> set[str]:
        if name not in closure:
            closure[name] = set()
            for child in direct.get(name, ()):
                closure[name] |= {child} | reach(child)
        return closure[name]

    return {s.name: len(reach(s.name)) for s in specs}


def _stopped_message(signum: int, stopped: Sequence[str], at_once: bool, resume: str) -> str:
    sig = signal.Signals(signum).name
    if at_once:
        what = f"stopped at once by a second {sig}; runs {list(stopped)} resume from their last checkpoints"
    elif stopped:
        what = f"stopped by {sig}: runs {list(stopped)} saved a checkpoint"
    else:
        what = f"stopped by {sig} between runs"
    return f"{what}; finished runs are kept. Resume with:\n{resume}"


class Scheduler:
    """Starts each selected run once its dependencies are finished, at most `n` at once (see `run_parallel`)."""

    def __init__(self, selected: Sequence[Sequence[Any]], specs: Sequence[Any], out: Path, n: int,
                 figure: Sequence[str], bar: Any):
        from forgetting.experiments import framework

        self.fw = framework
        self.by_name = {s.name: s for s in specs}
        # Runs that others wait for start first (most dependents first, then wave order): the dependents can
        # then run beside the rest of the wave instead of after it, with a core idle at the end.
        waiting = dependents(specs)
        order = [s for w in selected for s in w]
        self.pending = sorted(order, key=lambda s: (-waiting[s.name], order.index(s)))
        self.wave = {s.name: k for k, w in enumerate(selected) for s in w}
        self.out, self.n, self.figure, self.bar = out, n, figure, bar
        self.pool = Pool(out, figure)
        self.failed: list[str] = []
        self.skipped: list[str] = []
        self._shown = ""
        self._dirs: dict[str, Path] = {}
        self._finished: set[str] = set()
        self._changed = True  # a run ended (or none was started yet): what can start may have changed

    def done(self, name: str) -> bool:
        # A run's directory is its config's hash: computed once per run, and a finished run stays finished
        # (the poll asks for every pending run's dependencies several times a second).
        if name in self._finished:
            return True
        if name not in self._dirs:
            self._dirs[name] = self.fw.run_dir(self.by_name[name], self.out)
        if self.fw.is_done(self._dirs[name]):
            self._finished.add(name)
            return True
        return False

    def _state(self, spec: Any) -> tuple[str, list[str]]:
        """('done' | 'ready' | 'wait' (a dependency is still to run) | 'blocked', the dependencies that block it:
        failed, skipped, or neither selected nor finished)."""
        if self.done(spec.name):
            return "done", []
        waiting = {s.name for s in self.pending} | {c.name for c in self.pool.children}
        unfinished = [d for d in spec.after if not self.done(d)]
        blocking = [d for d in unfinished if d in self.failed or d in self.skipped or d not in waiting]
        if blocking:
            return "blocked", blocking
        return ("wait" if unfinished else "ready"), []

    def launch(self) -> None:
        for spec in list(self.pending):
            state, blocking = self._state(spec)
            if state == "wait" or (state == "ready" and len(self.pool.children) >= self.n):
                continue
            self.pending.remove(spec)
            if state == "blocked":
                _log(f"skipping run {spec.name!r} (wave {self.wave[spec.name]}): dependencies not finished: {blocking}")
                self.skipped.append(spec.name)
                self.bar.update(1)
            elif state == "done":
                self.bar.update(1)
            else:
                self.pool.start(spec, child_command(spec, self.figure))
        running = ", ".join(c.name for c in self.pool.children)[:80]
        if running != self._shown:  # a refresh per change, not per poll (a log file would fill with bars)
            self._shown = running
            self.bar.set_postfix_str(running)

    def finished(self, ended: Sequence[tuple[Child, int]], stopping: bool) -> list[str]:
        """Books ended children; returns the names of those a stop request ended before they finished."""
        stopped = []
        for child, rc in ended:
            if self.done(child.name):
                self.bar.update(1)
            elif stopping:
                stopped.append(child.name)
            else:
                why = f"exit status {rc}" if rc != 0 else "it exited without marking its run finished"
                _log(f"run {child.name!r} failed ({why}); last lines of {child.log}:\n{log_tail(child.log)}")
                self.failed.append(child.name)
                self.bar.update(1)
        return stopped

    def step(self) -> None:
        ended = self.pool.reap()
        if ended or self._changed:  # nothing can start between two ends: no run became ready or free to run
            self.finished(ended, stopping=False)
            self.launch()
            self._changed = False

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.pool.children)


def run_parallel(selected: Sequence[Sequence[Any]], specs: Sequence[Any], out: Path, n: int, *,
                 figure: Sequence[str], progress: bool, resume: str) -> bool:
    """Runs the selected runs, up to `n` at once in worker processes; True if none failed. Runs whose
    dependencies failed or are not selected and unfinished are skipped with a message. A stop request
    (Ctrl-C / SIGTERM) is forwarded to the children; then SystemExit(128 + signal) after the resume command."""
    from tqdm.auto import tqdm

    from forgetting.training import stopping

    bar = tqdm(total=sum(len(w) for w in selected), desc="runs", unit="run", disable=not progress, file=sys.stderr)
    sched = Scheduler(selected, specs, out, n, figure, bar)
    stop = stopping.StopRequests("every running run saves a checkpoint, then the figure stops")
    try:
        with stop:
            try:
                while sched.busy and stop.signum is None:
                    sched.step()
                    time.sleep(POLL_SECS)
                if stop.signum is not None:
                    sched.pool.signal_all(stop.signum)
                    stopped = sched.finished(sched.pool.wait_all(), stopping=True)
                    bar.close()
                    _log(_stopped_message(stop.signum, stopped, False, resume))
                    raise SystemExit(stop.exit_code)
            except KeyboardInterrupt:
                running = [c.name for c in sched.pool.children]
                signum = stop.signum or signal.SIGINT
                sched.pool.signal_all(signum)  # the second signal: the children stop at once too
                sched.pool.wait_all(timeout=60)
                bar.close()
                if stop.signum is None:
                    raise
                _log(_stopped_message(signum, running, True, resume))
                raise SystemExit(stop.exit_code) from None
    finally:
        if sched.pool.children:  # an unexpected error: leave no run behind
            sched.pool.signal_all(signal.SIGTERM)
        sched.pool.wait_all(timeout=60)  # idle workers end with their input
        bar.close()
        if sched.failed:
            _log(f"failed runs: {sched.failed}")
    return not sched.failed


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
