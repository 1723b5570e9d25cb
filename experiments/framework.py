"""The machinery every figure file shares: runs in waves, `--list`, `--shard`, reuse, summary and plots.

A figure file declares its knobs (a frozen dataclass with per-field comments), presets for them, the runs
it needs, how to summarize the run directories and how to plot the summary, then hands all of it to
`main`:

    '''Figure X: <the claim it tests>.'''
    from dataclasses import dataclass
    from pathlib import Path
    from forgetting.experiments import framework
    from forgetting.experiments.framework import RunSpec

    @dataclass(frozen=True)
    class Knobs:
        lr: float = 1e-3  # finetuning learning rate
        seeds: int = 2  # independent repetitions

    PRESETS = {"mini": Knobs(), "paper": Knobs(seeds=5)}

    def runs(knobs: Knobs, out: Path) -> list[RunSpec]:
        pre = TrainConfig(...)                                      # a stage config
        fine = replace(pre, model=replace(pre.model, load_path=str(train.run_dir(pre))))
        return [RunSpec("pretrain", pre, module="forgetting.stages.train"),
                RunSpec("finetune", fine, module="forgetting.stages.train", after=("pretrain",))]

    def summarize(knobs: Knobs, out: Path) -> dict:                 # run directories only
        dirs = framework.locate(runs(knobs, out), out)
        return {"final_prev_ntp": framework.read_metrics(dirs["finetune"])[-1]["prev_ntp"]}

    def plot(knobs: Knobs, out: Path, summary: dict) -> None:       # PNG + PDF
        ...

    if __name__ == "__main__":
        framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)

Command line of every figure file (`--help` lists the knobs with their preset values):
    --scale mini|paper   preset to start from (default mini: minutes on 2 CPU cores)
    --out DIR            where run directories, summary.json/csv and plots go (default out/<file stem>)
    --<knob> VALUE       any knob, overriding the preset
    --list               print one shell command per run, wave by wave (`# wave k` lines between)
    --shard i/n          run the i-th (0-based) of n round-robin slices of every wave, in wave order
    --wave k             only runs of wave k
    --only NAME          only the named run(s) (comma-separated); `--list` uses it for in-process runs
    --plot_only          summarize and plot from existing run directories, run nothing
    --jobs N|auto        up to N runs at once, in worker processes on their own cores (experiments/jobs.py)
    --no_summary         run the selected runs, then exit without summarizing or plotting
    --slurm DIR          write Slurm job arrays (one task per run, a wave per array, afterok between
                         waves) and DIR/submit.sh; --slurm_cpus/_mem/_gpus/_time/... set resources

Runs: a `RunSpec` either names a stage module (`forgetting.stages.train`: `run(cfg) -> dict`,
`run_dir(cfg) -> Path`, `main(argv)`) or carries a Python callable `fn(config, run_dir) -> dict` that
runs in-process; its result is stored as `out/<name>-<config hash>/result.json` with the marker
`done.json`. Either way a finished run (a `done.json` in its run directory) is reused at once and an
unfinished one is started again (a stage resumes from its checkpoint; a callable may look at its
run_dir). `after` names runs that must be finished first; runs are grouped into waves (wave 0 has no
dependencies, wave k depends only on waves < k), so a scheduler runs wave k's commands after wave k-1's.

Knobs are checked before anything runs (`check_knobs`: each knobs class's `CHECKS` and `validate`), and so
are the stage configs the runs are built from. Ctrl-C / SIGTERM: the running run checkpoints (or, in-process,
finishes), no other run starts, the resume command is printed, the exit code is 128 + the signal number;
a second signal stops at once (`_run_all`).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import inspect
import json
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from forgetting.core import files as files_lib
from forgetting.core import host_memory
from forgetting.training import cli

DONE = "done.json"
RESULT = "result.json"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


# --------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment.

    name:   unique within the experiment (used by `after`, `--only` and `locate`).
    config: the run's config: a stage's config dataclass, or any dataclass for `fn`.
    module: a stage module (`forgetting.stages.train`) exposing `run`, `run_dir` and `main`; or None.
    fn:     used when module is None: `fn(config, run_dir: Path) -> dict` (JSON-ready), run in-process.
    after:  names of runs that must be finished before this one starts.
    """

    name: str
    config: Any
    module: str | None = None
    fn: Callable[[Any, Path], dict] | None = None
    after: tuple[str, ...] = ()

    def __post_init__(self):
        if (self.module is None) == (self.fn is None):
            raise ValueError(f"RunSpec {self.name!r}: give exactly one of module= and fn=")
        if isinstance(self.after, str):
            object.__setattr__(self, "after", (self.after,))
        else:
            object.__setattr__(self, "after", tuple(self.after))


def run_dir(spec: RunSpec, out: str | Path) -> Path:
    """The run directory of `spec`, known before it runs (a stage's `run_dir(cfg)`, else out/<name>-<hash>)."""
    if spec.module is not None:
        return Path(importlib.import_module(spec.module).run_dir(spec.config))
    return Path(out) / f"{spec.name}-{cli.config_hash(spec.config)}"


def locate(specs: Sequence[RunSpec], out: str | Path) -> dict[str, Path]:
    """{run name: run directory} for a list of runs (what `summarize` uses to find its data)."""
    return {s.name: run_dir(s, out) for s in specs}


def is_done(path: str | Path) -> bool:
    """A run directory is finished when it holds the completion marker `done.json`."""
    return (Path(path) / DONE).is_file()


def read_metrics(path: str | Path) -> list[dict]:
    """The evaluations logged in a run directory's `metrics.jsonl` (a torn last line is skipped; a bad line
    before it is an error naming the file and the line)."""
    f = Path(path) / METRICS
    if not f.is_file():
        return []
    lines = f.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:  # a writer killed mid-line; everything before it is good
            lines.pop()
    return files_lib.loads_json_lines("\n".join(lines), f)


def read_done(path: str | Path) -> dict:
    """The final metrics in a finished run directory's `done.json` ({} if not finished)."""
    f = Path(path) / DONE
    return json.loads(f.read_text()) if f.is_file() else {}


def read_result(path: str | Path) -> dict:
    """The stored result of an in-process (`fn`) run: `result.json` (KeyError-free: {} if missing)."""
    f = Path(path) / RESULT
    return json.loads(f.read_text()) if f.is_file() else {}


def waves(specs: Sequence[RunSpec]) -> list[list[RunSpec]]:
    """Groups runs into dependency levels: wave 0 needs nothing, wave k needs only waves < k.

    Order inside a wave follows the input order. Unknown dependencies, duplicate names and cycles raise.
    """
    by_name: dict[str, RunSpec] = {}
    for s in specs:
        if s.name in by_name:
            raise ValueError(f"duplicate run name {s.name!r}")
        by_name[s.name] = s
    for s in specs:
        for d in s.after:
            if d not in by_name:
                raise ValueError(f"run {s.name!r} depends on unknown run {d!r}")
    level: dict[str, int] = {}
    visiting: set[str] = set()

    def depth(name: str) -> int:
        if name in level:
            return level[name]
        if name in visiting:
            raise ValueError(f"dependency cycle through run {name!r}")
        visiting.add(name)
        deps = by_name[name].after
        level[name] = 1 + max((depth(d) for d in deps), default=-1)
        visiting.discard(name)
        return level[name]

    for s in specs:
        depth(s.name)
    out: list[list[RunSpec]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for s in specs:
        out[level[s.name]].append(s)
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard(wave_list: Sequence[Sequence[RunSpec]], i: int, n: int) -> list[list[RunSpec]]:
    """The i-th of n round-robin slices of every wave (slices are disjoint and together cover all runs)."""
    return [list(w[i::n]) for w in wave_list]


def execute(spec: RunSpec, out: str | Path) -> dict:
    """Runs one run (or reuses it if finished) and returns its result / final metrics."""
    path = run_dir(spec, out)
    if spec.module is not None:
        if is_done(path):
            return read_done(path)
        from forgetting.training.train_config import TrainConfig

        try:
            if isinstance(spec.config, TrainConfig):  # the train stage in-process, as its command line runs it
                from forgetting import training

                return training.run(spec.config).as_dict()
            return importlib.import_module(spec.module).run(spec.config)
        finally:
            host_memory.release_freed_memory()
    if is_done(path):
        return read_result(path)
    path.mkdir(parents=True, exist_ok=True)
    cli.write_json_atomic(path / CONFIG, {"name": spec.name, "fn": _fn_name(spec.fn), "config": cli.to_dict(spec.config)})
    t0 = time.time()
    try:
        result = spec.fn(spec.config, path)
    finally:
        host_memory.release_freed_memory()
    result = {} if result is None else result
    cli.write_json_atomic(path / RESULT, result)
    cli.write_json_atomic(path / DONE, {"name": spec.name, "wall_time": time.time() - t0})
    return result


def _fn_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# --------------------------------------------------------------------------------------------- summary


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any] | None:
    """{'a/b': scalar} for nested dicts of scalars; None if anything is a list or another container."""
    flat: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            sub = _flatten(v, key + "/")
            if sub is None:
                return None
            flat.update(sub)
        elif v is None or isinstance(v, (str, int, float, bool)):
            flat[key] = v
        else:
            return None
    return flat


def write_summary(summary: dict, out: str | Path) -> None:
    """Writes `summary.json`, and `summary.csv` when the summary is flat enough.

    CSV shapes: a `rows` list of flat dicts (the summary's only list) becomes a table; nested dicts of
    scalars become `key,value` lines with keys joined by '/'. Anything else: JSON only.
    """
    out = Path(out)
    cli.write_json_atomic(out / "summary.json", summary)
    csv_path = out / "summary.csv"
    rows = summary.get("rows") if isinstance(summary, Mapping) else None
    if isinstance(rows, list) and rows and all(isinstance(r, Mapping) for r in rows):
        flat_rows = [_flatten(r) for r in rows]
        if all(r is not None for r in flat_rows):
            keys: list[str] = []
            for r in flat_rows:
                keys += [k for k in r if k not in keys]
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(flat_rows)
            return
    flat = _flatten(summary) if isinstance(summary, Mapping) else None
    if flat is not None:
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", "value"])
            w.writerows(flat.items())


# --------------------------------------------------------------------------------------------- CLI


_FRAMEWORK_FLAGS = ("scale", "out", "list", "shard", "wave", "only", "plot_only", "help", "slurm", "jobs", "no_summary",
                    "worker")


def _framework_parser(add_help: bool, scales: Sequence[str], default_out: str) -> argparse.ArgumentParser:
    from simple_parsing import ArgumentGenerationMode, ArgumentParser, NestedMode

    cls = ArgumentParser if add_help else argparse.ArgumentParser
    kwargs = (
        dict(argument_generation_mode=ArgumentGenerationMode.NESTED, nested_mode=NestedMode.WITHOUT_ROOT)
        if add_help
        else {}
    )
    p = cls(add_help=add_help, **kwargs)  # simple-parsing's formatter: raw description, types, defaults
    g = p.add_argument_group("experiment")
    g.add_argument("--scale", choices=list(scales), default="mini",
                   help="knob preset to start from; knob flags override it (default: %(default)s)")
    g.add_argument("--out", default=default_out, metavar="DIR",
                   help="directory for run directories, summary.json/csv and plots (default: %(default)s)")
    g.add_argument("--list", action="store_true",
                   help="print one shell command per run, wave by wave ('# wave k' lines), and exit")
    g.add_argument("--shard", type=parse_shard, default=None, metavar="i/n",
                   help="run only the i-th (0-based) of n slices of every wave, then exit without plotting")
    g.add_argument("--wave", type=int, default=None, metavar="k", help="only the runs of wave k")
    g.add_argument("--only", default=None, metavar="NAME[,NAME...]", help="only the named runs")
    g.add_argument("--plot_only", action="store_true",
                   help="run nothing: summarize and plot from the run directories under --out")
    _add_jobs_flags(g)
    from forgetting.experiments import slurm

    slurm.add_flags(p)
    return p


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            d.update(_leaves(getattr(obj, f.name), f"{prefix}{f.name}."))
        return d
    return {prefix[:-1]: obj}


def knob_flags(knobs: Any, preset: Any) -> list[str]:
    """Flags that turn `preset` into `knobs` (only the knobs that differ)."""
    a, b = _leaves(knobs), _leaves(preset)
    flags: list[str] = []
    for name, value in a.items():
        if b.get(name) == value or value is None:
            continue
        flags += [f"--{name}", *cli._flag_value(value)]
    return flags


def _script_command(runs_fn: Callable) -> list[str]:
    """How to invoke the figure file from any directory: `python -m forgetting.experiments.x` if possible."""
    try:
        path = Path(inspect.getfile(runs_fn)).resolve()
    except (TypeError, OSError):
        path = Path(sys.argv[0]).resolve()
    here = Path(__file__).resolve().parent
    if path.parent == here:
        return ["python", "-m", f"forgetting.experiments.{path.stem}"]
    return ["python", str(path)]


def _default_out(runs_fn: Callable) -> str:
    try:
        stem = Path(inspect.getfile(runs_fn)).stem
    except (TypeError, OSError):
        stem = Path(sys.argv[0]).stem or "experiment"
    return str(Path("out") / stem)


# --------------------------------------------------------------------------------------------- knob checks


@dataclass(frozen=True)
class Rule:
    """A check of one knob's value (each element of a tuple knob): `problem(value)` says what is wrong, or None."""

    text: str  # what the value must be, for the message ("> 0")
    ok: Callable[[Any], bool]

    def problem(self, value: Any) -> str | None:
        if isinstance(value, (tuple, list)):
            bad = [v for v in value if not self.ok(v)]
            return f"every value must be {self.text}, got {bad[0]!r} in {tuple(value)!r}" if bad else None
        return None if self.ok(value) else f"must be {self.text}, got {value!r}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN is not a value


positive = Rule("> 0", lambda v: _number(v) and v > 0)
nonnegative = Rule(">= 0", lambda v: _number(v) and v >= 0)
fraction = Rule("in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)


def at_least(low: float) -> Rule:
    return Rule(f">= {low}", lambda v: _number(v) and v >= low)


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices)


nonempty = Rule("non-empty", lambda v: True)  # checked on the whole tuple in `check_knobs`


def check_knobs(knobs: Any, prefix: str = "") -> None:
    """Refuses bad knob values before anything runs, naming the knob's flag (`--lowered_lrs: ...`).

    A knobs class declares `CHECKS: ClassVar[dict[str, tuple[Rule, ...]]]` ({knob: rules}); the checks of its
    base classes apply too (the subclass's entry wins), nested knob dataclasses are checked with their own,
    and `validate()` (if any) checks what spans several knobs afterwards. Raises ValueError."""
    checks: dict[str, tuple[Rule, ...]] = {}
    for cls in reversed(type(knobs).__mro__):
        checks.update(vars(cls).get("CHECKS", {}))
    names = {f.name for f in dataclasses.fields(knobs)}
    unknown = sorted(set(checks) - names)
    if unknown:  # a typo in CHECKS would silently check nothing
        raise TypeError(f"{type(knobs).__name__}.CHECKS names unknown knobs {unknown}")
    for f in dataclasses.fields(knobs):
        value = getattr(knobs, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_knobs(value, f"{prefix}{f.name}.")
            continue
        for rule in checks.get(f.name, ()):
            if rule is nonempty:
                problem = "must not be empty" if not value else None
            else:
                problem = rule.problem(value)
            if problem:
                raise ValueError(f"--{prefix}{f.name}: {problem}")
    validate = getattr(knobs, "validate", None)
    if callable(validate):
        validate()


def parse_args(knobs_cls: type, presets: Mapping[str, Any], argv: Sequence[str] | None = None, *,
               doc: str | None = None, default_out: str = "out/experiment") -> tuple[argparse.Namespace, Any]:
    """(framework flags, knobs): the preset named by --scale, then every knob flag given on top of it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    scales = list(presets)
    pre = _framework_parser(False, scales, default_out)
    known, _ = pre.parse_known_args(argv)  # only --scale matters here; errors are reported below
    preset = presets[known.scale]
    parser = _framework_parser(True, scales, default_out)
    parser.description = doc
    parser.add_arguments(knobs_cls, dest="knobs", default=preset)
    args = parser.parse_args(argv)
    knobs = args.knobs
    try:
        check_knobs(knobs)
    except ValueError as e:
        parser.error(str(e))
    args.preset = preset
    return args, knobs


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(
    knobs_cls: type,
    presets: Mapping[str, Any],
    runs: Callable[[Any, Path], list[RunSpec]],
    summarize: Callable[[Any, Path], dict],
    plot: Callable[[Any, Path, dict], None] | None = None,
    *,
    doc: str | None = None,
    argv: Sequence[str] | None = None,
    progress: bool = True,
) -> dict | None:
    """The command line of a figure file (see the module docstring). Returns the summary when it plots."""
    from forgetting.core import host_memory

    host_memory.keep_freed_memory()  # before the first run starts JAX's threads (see core.host_memory)
    args, knobs = parse_args(knobs_cls, presets, argv, doc=doc, default_out=_default_out(runs))
    out = Path(args.out)
    if args.slurm is not None:  # tasks may start in another directory: every path in their commands is absolute
        out = out.resolve()
    specs = _checked_runs(runs, knobs, out)
    if args.worker:  # a --jobs N worker: runs what the figure sends it (experiments/jobs.py)
        from forgetting.experiments import jobs
        from forgetting.training import compile_cache

        compile_cache.enable()
        raise SystemExit(jobs.serve(specs, out))
    wave_list = waves(specs)

    selected = wave_list
    if args.wave is not None:
        if not 0 <= args.wave < len(wave_list):
            _log(f"error: --wave {args.wave}: this experiment has waves 0..{len(wave_list) - 1}")
            raise SystemExit(2)
        selected = [w if k == args.wave else [] for k, w in enumerate(wave_list)]
    if args.only:
        names = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = names - {s.name for s in specs}
        if unknown:
            _log(f"error: --only: unknown run(s) {sorted(unknown)}; known: {[s.name for s in specs]}")
            raise SystemExit(2)
        selected = [[s for s in w if s.name in names] for w in selected]
    if args.shard is not None:
        selected = shard(selected, *args.shard)

    _check_jobs_flags(args)
    if args.slurm is not None:
        return _write_slurm(args, knobs, runs, selected, out)

    if args.list:
        base = _script_command(runs) + ["--scale", args.scale, "--out", str(out)] + knob_flags(knobs, args.preset)
        for k, w in enumerate(selected):
            if not w:
                continue
            print(f"# wave {k}")
            for s in w:
                if s.module is not None:
                    print(cli.command_line(s.module, s.config))
                else:
                    print(" ".join(map(shlex.quote, base + ["--only", s.name])))
        return None

    if not args.plot_only:
        resume = _resume_command(runs, sys.argv[1:] if argv is None else argv)
        ok = _run_selected(args, knobs, runs, selected, specs, out, progress=progress, resume=resume)
        if not ok:
            raise SystemExit(1)
        if args.no_summary:
            return None
        partial = args.shard is not None or args.wave is not None or args.only
        if partial and not all(is_done(run_dir(s, out)) for s in specs):
            _log("this slice is finished; once every run is, plot with --plot_only (same --scale/--out/knobs)")
            return None

    missing = [s.name for s in specs if not is_done(run_dir(s, out))]
    if missing:
        _log(f"warning: unfinished runs {missing}; summarizing what exists")
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(knobs, out)
    write_summary(summary, out)
    if plot is not None:
        plot(knobs, out, summary)
    _log(f"wrote {out / 'summary.json'}")
    print(json.dumps(summary, indent=2, sort_keys=True))
    for figure in sorted(out.glob("*.png")):
        print(f"figure: {figure} (and {figure.with_suffix('.pdf').name})")
    return summary


def _add_jobs_flags(g: argparse._ArgumentGroup) -> None:
    from forgetting.experiments import jobs

    g.add_argument("--jobs", type=jobs.parse_jobs, default=1, metavar="N|auto",
                   help="run up to N independent runs at once, in up to N worker processes on their own share "
                        "of the cores, output in OUT/logs/<run>.log; auto: one per core for small models (see "
                        "experiments/jobs.py) (default: %(default)s)")
    g.add_argument("--no_summary", action="store_true",
                   help="run the selected runs, then exit without summarizing or plotting")
    g.add_argument(jobs.WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)  # a --jobs N worker process


def _check_jobs_flags(args: argparse.Namespace) -> None:
    """`--jobs` runs runs: refused where nothing runs here (rather than ignored)."""
    if args.jobs == 1:
        return
    if args.slurm is not None:
        _log(f"error: --jobs {args.jobs} with --slurm: every run is its own Slurm task already; "
             "limit how many run at once with --slurm_parallel")
        raise SystemExit(2)
    for flag in ("list", "plot_only"):
        if getattr(args, flag):
            _log(f"error: --jobs {args.jobs} with --{flag}: nothing runs; drop --jobs")
            raise SystemExit(2)


def _run_selected(args: argparse.Namespace, knobs: Any, runs: Callable, selected: list[list[RunSpec]],
                  specs: list[RunSpec], out: Path, *, progress: bool, resume: str) -> bool:
    """Runs the selected runs one by one in this process (`--jobs 1`), or side by side in worker processes
    (`--jobs N`, experiments/jobs.py); turns the compilation cache on first (training/compile_cache.py)."""
    from forgetting.experiments import jobs
    from forgetting.training import compile_cache

    compile_cache.enable()
    n = args.jobs
    if n == "auto":
        n, why = jobs.auto_jobs(len(jobs.available_cores()), [jobs.model_width(s.config) for w in selected for s in w])
        _log(f"--jobs {why}")
    if n == 1:
        return _run_all(selected, specs, out, progress=progress, resume=resume)
    figure = _script_command(runs) + ["--scale", args.scale, "--out", str(out)] + knob_flags(knobs, args.preset)
    return jobs.run_parallel(selected, specs, out, n, figure=figure, progress=progress, resume=resume)


def _write_slurm(args: argparse.Namespace, knobs: Any, runs: Callable, selected: list[list[RunSpec]],
                 out: Path) -> None:
    """`--slurm DIR`: job-array scripts for the selected runs (see experiments/slurm.py); runs nothing."""
    from forgetting.experiments import slurm

    problem = slurm.check_flags(args)
    if problem:
        _log(f"error: {problem}")
        raise SystemExit(2)
    base = _script_command(runs) + ["--scale", args.scale, "--out", str(out)] + knob_flags(knobs, args.preset)
    waves_commands = []
    for k, w in enumerate(selected):
        if w:
            waves_commands.append((k, [cli.command_line(s.module, s.config) if s.module is not None
                                       else " ".join(map(shlex.quote, base + ["--only", s.name])) for s in w]))
    plot_command = " ".join(map(shlex.quote, base + ["--plot_only"]))
    name = Path(_default_out(runs)).name
    submit = slurm.write(args, waves_commands, plot_command, name)
    n = sum(len(c) for _, c in waves_commands)
    _log(f"wrote {len(waves_commands)} wave(s), {n} run(s) as Slurm job arrays; submit with: bash {submit}")
    print(submit)


def _checked_runs(runs: Callable[[Any, Path], list[RunSpec]], knobs: Any, out: Path) -> list[RunSpec]:
    """The figure's runs, each stage config checked before anything runs: knobs the figure's own checks let
    through but that make an invalid run are refused now, naming the run (not an hour in, with a traceback)."""
    try:
        specs = list(runs(knobs, out))
    except ValueError as e:
        _log(f"error: {e}")
        raise SystemExit(2) from None
    for spec in specs:
        validate = getattr(spec.config, "validate", None) if spec.module is not None else None
        if callable(validate):
            try:
                validate()
            except ValueError as e:
                _log(f"error: the knobs make run {spec.name!r} invalid: {e} (that stage flag is set from the "
                     "knobs; change the knob behind it)")
                raise SystemExit(2) from None
    return specs


def _resume_command(runs_fn: Callable, argv: Sequence[str]) -> str:
    """The command that reruns this figure as it was started (from this directory): it resumes a stopped one."""
    command = " ".join(map(shlex.quote, _script_command(runs_fn) + list(argv)))
    return f"cd {shlex.quote(str(Path.cwd()))} && {command}"


def _stopped(stop: Any, name: str | None, resume: str, at_once: bool = False) -> SystemExit:
    """Says what a stop request left behind and how to resume; the exit to raise (128 + the signal)."""
    import signal

    sig = signal.Signals(stop.signum).name
    if at_once:
        what = f"stopped at once by a second {sig} during run {name!r} (it resumes from its last checkpoint)"
    elif name is None:
        what = f"stopped by {sig} between runs"
    else:
        what = f"stopped by {sig}: run {name!r} saved a checkpoint"
    _log(f"{what}; finished runs are kept. Resume with:\n{resume}")
    return SystemExit(stop.exit_code)


def _run_all(selected: list[list[RunSpec]], specs: list[RunSpec], out: Path, *, progress: bool,
             resume: str = "") -> bool:
    """Runs the selected runs wave by wave; True if none failed. Runs whose dependencies are unfinished
    are skipped with a message (another shard may still be working on them).

    The first Ctrl-C / SIGTERM stops the figure once the running run has checkpointed (a train run stops at
    its next step; an in-process run finishes), prints `resume` and exits 128 + the signal number; that run
    is not marked failed. A second signal stops at once."""
    from tqdm.auto import tqdm

    from forgetting.training import runs as stage_runs, stopping

    by_name = {s.name: s for s in specs}
    todo = [s for w in selected for s in w]
    failed: list[str] = []
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress, file=sys.stderr)
    current: str | None = None
    stop = stopping.StopRequests("stopping the figure once the running run has saved a checkpoint")
    try:
        with stop:
            for k, w in enumerate(selected):
                for s in w:
                    if stop.signum is not None:
                        raise _stopped(stop, None, resume)
                    current = s.name
                    ok = _run_one(s, k, by_name, out, bar)
                    if not ok:
                        failed.append(s.name)
                    if stop.signum is not None:  # the run finished before it saw the request
                        raise _stopped(stop, None, resume)
    except stage_runs.Interrupted as e:
        bar.close()
        if stop.signum is None:  # the run saw the signal first (its handlers were installed outside ours)
            stop.request(e.exit_code - 128)
        raise _stopped(stop, current, resume) from None
    except KeyboardInterrupt:
        bar.close()
        if stop.signum is None:  # the default SIGINT behaviour outside the handlers (other thread)
            raise
        raise _stopped(stop, current, resume, at_once=True) from None
    finally:
        bar.close()
        if failed:  # also when a stop request ends the sweep
            _log(f"failed runs: {failed}")
    return not failed


def _run_one(s: RunSpec, k: int, by_name: dict[str, RunSpec], out: Path, bar: Any) -> bool:
    """One run of `_run_all` (reused if finished, skipped if blocked); False if it failed."""
    from forgetting.training import runs as stage_runs

    bar.set_postfix_str(f"wave {k}: {s.name}")
    blocked = [d for d in s.after if not is_done(run_dir(by_name[d], out))]
    if blocked:
        _log(f"skipping run {s.name!r} (wave {k}): dependencies not finished: {blocked}")
    elif not is_done(run_dir(s, out)):
        try:
            execute(s, out)
        except stage_runs.Interrupted:
            raise  # a stop request, not a failure
        except Exception:  # noqa: BLE001 - one failed run is reported; the sweep goes on
            _log(f"run {s.name!r} failed:\n{traceback.format_exc()}")
            bar.update(1)
            return False
    bar.update(1)
    return True
