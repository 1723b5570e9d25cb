"""A sweep of self-generated-KL coefficients from one pretrained model, three ways on one machine in one sitting.

    python -m forgetting.bench sweep --reference ~/src/forgetting-authors      # all three ways
    python -m forgetting.bench.sweep --reference DIR --sittings 3 --json sweep.json

The ways, each the whole sweep (8 coefficients by default) one run after another, with `bench.versus`'s
runs, data and tutorial-size defaults:
- `cache`: this project's train stage with the replay cache (`training.replay_cache`), emptied before the
  sweep, so its first run samples and writes the replay and the other runs read it;
- `nocache`: the same runs with `--reg.replay_cache false` (every run samples its own replay);
- `authors`: the authors' `train_single.py` from `--reference` (a checkout of github.com/martin-marek/forgetting,
  imported at run time in a child process, never part of this project), every run its own process.
The project's sweep is one process that runs its runs in turn, as a figure's `--jobs 1` does
(`bench.sweep_process`: JAX imported once, compiled steps reused in memory), timed from spawn to exit;
`--project_process run` gives every project run its own process instead (as `bench.versus` times them).
All three finetune from one pretrained model: the authors' pretraining run with `--reference` (the project
loads their checkpoint), else the project's. Pretraining is done once and is not part of any sweep's wall.
The ways take turns going first from one sitting to the next. Printed: each way's whole-sweep wall, the
ratios authors/cache, authors/nocache and nocache/cache (the cache's own share of the gain) per sitting,
their median and range, the processor (`/proc/cpuinfo` model name, as lscpu prints it), and whether the
cache and nocache runs of each coefficient logged the same metrics (they must: wall-clock fields aside).

With `--json`, the file is rewritten after every sitting, and a sweep started again with the same `--json`
(same flags but `--sittings`, same machine) keeps the sittings it holds and runs the rest, each way's turn to
go first following the sitting's number; the pretrained model is reused while its folder exists. Each sitting
records the project's git revision, and the report names them when they differ.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from forgetting.bench import versus
from forgetting.training import cli

WAYS = ("cache", "nocache", "authors")
PROJECT_PROCESS = ("sweep", "run")
WALL_CLOCK = ("train_seconds", "wall_time", "tokens_per_s")
_SIZE_UNUSED = ("reference", "modes", "pairs", "reg_coeff", "work", "json", "python")  # bench.versus flags the sweep sets itself


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Whole-sweep wall time of self-generated-KL coefficients: project with and without the replay cache, and the authors'."""

    reference: str = ""  # checkout of the authors' code (has train_single.py); empty = the project's two ways alone
    coeffs: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)  # the swept --reg.coeff values
    sittings: int = 1  # repetitions of the three ways (median and range over them)
    # the run: the authors' tutorial size by default (bench.versus's flags; its --modes and --pairs are unused)
    size: versus.VersusConfig = dataclasses.field(default_factory=versus.VersusConfig)
    work: str = ""  # working folder (data, runs, logs); empty = a fresh temporary folder
    json: str = ""  # also write every run and the summary here (after every sitting; a file from the same flags is continued)
    python: str = ""  # interpreter for every run (empty = this one)
    project_process: str = "sweep"  # sweep: the project's whole sweep in one process; run: a process per run

    def validate(self) -> None:
        if self.project_process not in PROJECT_PROCESS:
            raise ValueError(f"--project_process must be one of {' '.join(PROJECT_PROCESS)}, got {self.project_process!r}")
        if len(self.coeffs) < 1 or any(c < 0 for c in self.coeffs):
            raise ValueError(f"--coeffs must be one or more KL coefficients >= 0, got {list(self.coeffs)}")
        if len(set(self.coeffs)) < len(self.coeffs):
            raise ValueError(f"--coeffs repeats a value ({list(self.coeffs)}); a repeated run would be reused, not timed")
        if self.sittings < 1:
            raise ValueError("--sittings must be at least 1")
        inert = {f.name: getattr(self.size, f.name) for f in dataclasses.fields(versus.VersusConfig)
                 if f.name in _SIZE_UNUSED and getattr(self.size, f.name) != f.default}
        if inert:
            raise ValueError(f"{', '.join('--size.' + k for k in inert)}: not used by the sweep (it sets the coefficients, "
                             "reference, work folder, output and interpreter itself); use --coeffs, --reference, --work, "
                             "--json, --python")
        dataclasses.replace(self.size, reference=self.reference).validate()

    @property
    def ways(self) -> tuple[str, ...]:
        return WAYS if self.reference else WAYS[:2]


def metrics_without_wall_clock(run_dir: str) -> str:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return "\n".join(json.dumps({k: v for k, v in json.loads(x).items() if k not in WALL_CLOCK}, sort_keys=True)
                     for x in lines)


def pretrain(cfg: SweepConfig, python: str, data: dict, work: Path) -> str:
    """The one pretrained model of every way: the authors' checkpoint with --reference, else the project's run."""
    size = dataclasses.replace(cfg.size, reference=cfg.reference)
    run = versus.run_authors if cfg.reference else versus.run_project
    result = run(size, python, "pretrain", data, "", work / "runs" / "pretrain")
    print(f"pretrain ({'authors' if cfg.reference else 'project'}) wall {result['wall_s']:.1f} s: {result['checkpoint']}",
          flush=True)
    return result["checkpoint"]


def sweep_one_way(cfg: SweepConfig, way: str, python: str, data: dict, checkpoint: str, folder: Path) -> dict:
    """The whole sweep one run after another; `wall_s` from the first spawn to the last exit."""
    from forgetting.training import replay_cache

    if way == "cache":  # a cold cache: the sweep's first run pays for sampling and writing it
        shutil.rmtree(Path(checkpoint) / replay_cache.CACHE_DIR, ignore_errors=True)
    flags = (*cfg.size.project_flags, *(("--reg.replay_cache", "false") if way == "nocache" else ()))
    sizes = [dataclasses.replace(cfg.size, reference=cfg.reference, reg_coeff=c, project_flags=flags) for c in cfg.coeffs]
    start = time.perf_counter()
    if way != "authors" and cfg.project_process == "sweep":
        results = run_project_sweep(sizes, python, data, checkpoint, folder)
    else:
        run = versus.run_authors if way == "authors" else versus.run_project
        results = [run(size, python, "kl_self", data, checkpoint, folder / f"coeff-{size.reg_coeff:g}") for size in sizes]
    wall = time.perf_counter() - start
    runs = [{"coeff": c, **r} for c, r in zip(cfg.coeffs, results, strict=True)]
    for r in runs:
        print(f"  {way:<7} coeff {r['coeff']:<8g} wall {r['wall_s']:7.1f} s  valid_ntp {r['valid_ntp']:.4f}  "
              f"prev_ntp {r['prev_ntp']:.4f}", flush=True)
    return {"wall_s": wall, "runs": runs}


def run_project_sweep(sizes: list[versus.VersusConfig], python: str, data: dict, checkpoint: str,
                      folder: Path) -> list[dict]:
    """The project's runs of `sizes` in one process (`bench.sweep_process`); per run as `versus.run_project`
    gives it, with `wall_s` the run's own seconds in that process (the first run's include the process start)."""
    versus._fresh(folder)
    argvs = [versus.project_args(size, "kl_self", data, checkpoint, folder / "runs") for size in sizes]
    (folder / "runs.json").write_text(json.dumps(argvs))
    log = folder / "log.txt"
    wall, rss, code = versus._timed([python, "-m", "forgetting.bench.sweep_process", str(folder / "runs.json"),
                                     str(folder / "results.json")], log)
    if code != 0:
        raise versus._failed("project", "kl_self sweep", code, log)
    rows = json.loads((folder / "results.json").read_text())
    tokens_per_step = sizes[0].batch_size * sizes[0].seq_len
    in_runs = sum(r["seconds"] for r in rows)
    return [{"wall_s": r["seconds"] + (wall - in_runs if i == 0 else 0.0), "peak_rss_mb": rss, "steps": int(r["steps"]),
             "train_seconds": r["train_seconds"], "checkpoint": r["run_dir"],
             "train_tokens_per_s": versus._rate(int(r["steps"]), tokens_per_step, r["train_seconds"]),
             "valid_ntp": r.get("valid_ntp"), "prev_ntp": r.get("prev_ntp")} for i, r in enumerate(rows)]


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


RATIOS = {"authors/cache": ("authors", "cache"), "authors/nocache": ("authors", "nocache"),
          "nocache/cache": ("nocache", "cache")}


def summarize(sittings: list[dict]) -> dict:
    """Each way's whole-sweep wall and the wall ratios, sitting by sitting, as median and range."""
    ways = [w for w in WAYS if all(w in s for s in sittings)]
    summary: dict = {"wall_s": {w: _spread([s[w]["wall_s"] for s in sittings]) for w in ways}, "ratio": {},
                     # training time alone (the authors' measure_time definition on both sides): less exposed to
                     # a busy machine's startup and compilation delays than the wall
                     "train_s": {w: _spread([sum(r["train_seconds"] for r in s[w]["runs"]) for s in sittings]) for w in ways}}
    for name, (slow, fast) in RATIOS.items():
        if slow in ways and fast in ways:
            summary["ratio"][name] = _spread([s[slow]["wall_s"] / s[fast]["wall_s"] for s in sittings])
    summary["revisions"] = [s.get("revision", "") for s in sittings]
    summary["cache_metrics_identical"] = all(
        s["cache_metrics_identical"] if "cache_metrics_identical" in s else cache_metrics_identical(s) for s in sittings)
    return summary


def cache_metrics_identical(sitting: dict) -> bool:
    """Whether the sitting's cache and nocache runs logged the same metrics (wall-clock fields aside), read from
    their run folders; a sitting keeps the answer, as its folders need not outlive the machine."""
    return all(metrics_without_wall_clock(a["checkpoint"]) == metrics_without_wall_clock(b["checkpoint"])
               for a, b in zip(sitting["cache"]["runs"], sitting["nocache"]["runs"], strict=True))


def report(summary: dict, machine: dict, cfg: SweepConfig) -> str:
    fmt = versus._fmt
    lines = [f"{machine['processor']}, {machine['cpus']} CPUs, jax {machine['jax']}, Python {machine['python']}; "
             f"{len(cfg.coeffs)} coefficients, median [range] over {len(summary['revisions'])} sitting(s)",
             "| way | whole-sweep wall s | training s, summed over runs |", "|---|---|---|"]
    lines += [f"| {w} | {fmt(s, ',.1f')} | {fmt(summary['train_s'][w], ',.1f')} |" for w, s in summary["wall_s"].items()]
    lines += [f"| {name} | {fmt(s, '.2f')}× | |" for name, s in summary["ratio"].items()]
    lines.append(f"\ncache and nocache runs logged the same metrics (wall-clock fields aside): "
                 f"{'yes' if summary['cache_metrics_identical'] else 'NO'}")
    revisions = summary["revisions"]
    if len(set(revisions)) > 1:
        lines.append("project revision by sitting: " + ", ".join(r or "unknown" for r in revisions))
    return "\n".join(lines)


def revision() -> str:
    """The project's git commit (short), with `+` when its tracked files differ from it; empty outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def earlier_sittings(cfg: SweepConfig, machine: dict) -> dict:
    """What an earlier sweep with this `--json` finished: {"sittings": [...], "pretrained": path or ""};
    nothing without --json or its file. Refused when its flags (but --sittings) or its machine differ."""
    path = Path(cfg.json).expanduser()
    if not cfg.json or not path.is_file():
        return {"sittings": [], "pretrained": ""}
    earlier = json.loads(path.read_text())
    flags = {k: v for k, v in cli.to_dict(cfg).items() if k != "sittings"}
    theirs = {k: v for k, v in earlier.get("config", {}).items() if k != "sittings"}
    if theirs != flags:
        changed = sorted(k for k in flags.keys() | theirs.keys() if flags.get(k) != theirs.get(k))
        raise ValueError(f"--json {path} holds a sweep with other flags ({', '.join('--' + k for k in changed)}): "
                         "its sittings cannot be continued; give the same flags, or another --json for a new sweep")
    if earlier.get("machine") != machine:
        raise ValueError(f"--json {path} holds sittings from another machine or software ({earlier.get('machine')}, "
                         f"this one {machine}); sittings are compared on one machine: give another --json")
    sittings = earlier.get("sittings", [])
    for s in sittings:  # written before sittings kept the answer: their folders, else the summary of that time
        if "cache_metrics_identical" not in s:
            folders = [r["checkpoint"] for w in ("cache", "nocache") for r in s[w]["runs"]]
            s["cache_metrics_identical"] = (cache_metrics_identical(s) if all(Path(f).is_dir() for f in folders)
                                            else bool(earlier.get("summary", {}).get("cache_metrics_identical", False)))
    pretrained = earlier.get("pretrained", "")
    return {"sittings": sittings, "pretrained": pretrained if pretrained and Path(pretrained).is_dir() else ""}


def bench(cfg: SweepConfig) -> dict:
    cfg.validate()
    python = cfg.python or sys.executable
    work = Path(cfg.work).expanduser() if cfg.work else Path(tempfile.mkdtemp(prefix="sweep_"))
    here = versus.machine()
    earlier = earlier_sittings(cfg, here)
    sittings = list(earlier["sittings"])
    if sittings:
        print(f"{cfg.json}: {len(sittings)} sitting(s) already done; {max(cfg.sittings - len(sittings), 0)} to run",
              flush=True)
    result: dict = {"config": cli.to_dict(cfg), "machine": here, "pretrained": earlier["pretrained"],
                    "sittings": sittings, "summary": summarize(sittings) if sittings else {}}
    if len(sittings) < cfg.sittings:
        data = versus.make_data(cfg.size, work / "data")
        checkpoint = earlier["pretrained"] or pretrain(cfg, python, data, work)
        result["pretrained"] = checkpoint
        for sitting in range(len(sittings), cfg.sittings):
            shift = sitting % len(cfg.ways)
            order = [*cfg.ways[shift:], *cfg.ways[:shift]]
            row: dict = {"sitting": sitting, "order": order, "revision": revision()}
            for way in order:
                row[way] = sweep_one_way(cfg, way, python, data, checkpoint, work / "runs" / f"{way}-{sitting}")
                print(f"sitting {sitting} {way:<7} whole sweep {row[way]['wall_s']:8.1f} s", flush=True)
            row["cache_metrics_identical"] = cache_metrics_identical(row)
            sittings.append(row)
            result["summary"] = summarize(sittings)
            if cfg.json:  # a later sweep with this --json goes on from here
                cli.write_json_atomic(Path(cfg.json).expanduser(), result)
    return result


def main(argv: list[str] | None = None) -> dict:
    cfg = cli.parse(SweepConfig, argv)
    result = bench(cfg)
    print("\n" + report(result["summary"], result["machine"], cfg))
    return result  # with --json, `bench` wrote the file after each sitting it ran


if __name__ == "__main__":
    main()
