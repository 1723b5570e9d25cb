"""The figure machinery: waves, --list, --shard, reuse, --plot_only, knob flags over presets."""
from __future__ import annotations

import json
import shlex
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from forgetting.experiments import framework
from forgetting.experiments.framework import RunSpec
from forgetting.training import cli

# --------------------------------------------------------------------------- a fake stage module

FAKE = "forgetting_test_fake_stage"


@dataclass(frozen=True)
class FakeRun:
    dir: str = "runs"  # where run directories go
    name: str = "fake"  # run name prefix


@dataclass(frozen=True)
class FakeOpt:
    lr: float = 1e-3  # learning rate
    widths: tuple[int, ...] = (1, 2)  # a tuple knob


@dataclass(frozen=True)
class FakeConfig:
    """A stand-in for the training stage's config tree."""

    run: FakeRun = field(default_factory=FakeRun)
    opt: FakeOpt = field(default_factory=FakeOpt)
    load_path: str = ""  # run dir this run depends on
    steps: int = 3  # number of evals to log


CALLS: list[str] = []


def _fake_run_dir(cfg: FakeConfig) -> Path:
    return Path(cfg.run.dir) / f"{cfg.run.name}-{cli.config_hash(cfg)}"


def _fake_run(cfg: FakeConfig) -> dict:
    d = _fake_run_dir(cfg)
    if (d / "done.json").exists():
        return {"run_dir": str(d), "metrics": json.loads((d / "done.json").read_text())}
    if cfg.load_path:
        assert (Path(cfg.load_path) / "done.json").exists(), "dependency not finished"
    CALLS.append(str(d))
    d.mkdir(parents=True, exist_ok=True)
    cli.write_json_atomic(d / "config.json", cli.to_dict(cfg))
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(cfg.steps):
            f.write(json.dumps({"step": s, "valid_ntp": cfg.opt.lr * 1000 / (s + 1)}) + "\n")
        f.write('{"step": 99, "valid_nt')  # a torn last line, as after a crash
    final = {"valid_ntp": cfg.opt.lr * 1000 / cfg.steps}
    cli.write_json_atomic(d / "done.json", final)
    return {"run_dir": str(d), "metrics": final}


def _fake_main(argv=None):
    return _fake_run(cli.parse(FakeConfig, argv))


fake_module = types.ModuleType(FAKE)
fake_module.FakeConfig = FakeConfig
fake_module.run = _fake_run
fake_module.run_dir = _fake_run_dir
fake_module.main = _fake_main
sys.modules[FAKE] = fake_module


# --------------------------------------------------------------------------- a fake figure


@dataclass(frozen=True)
class Knobs:
    """Knobs of the fake figure."""

    lrs: tuple[float, ...] = (1e-3, 2e-3)  # finetuning learning rates
    steps: int = 3  # evals per run
    tag: str = "a"  # a string knob


PRESETS = {"mini": Knobs(), "paper": Knobs(lrs=(1e-3, 2e-3, 3e-3, 4e-3), steps=5)}

FN_CALLS: list[str] = []


def analysis(cfg: Knobs, run_dir: Path) -> dict:
    FN_CALLS.append(str(run_dir))
    return {"n": len(cfg.lrs), "tag": cfg.tag}


def runs(knobs: Knobs, out: Path) -> list[RunSpec]:
    pre = FakeConfig(run=FakeRun(dir=str(out / "runs"), name="pre"), steps=knobs.steps)
    specs = [RunSpec("pre", pre, module=FAKE)]
    for lr in knobs.lrs:
        ft = FakeConfig(run=FakeRun(dir=str(out / "runs"), name="ft"), opt=FakeOpt(lr=lr, widths=(3, 4)),
                        load_path=str(_fake_run_dir(pre)), steps=knobs.steps)
        specs.append(RunSpec(f"ft_{lr:g}", ft, module=FAKE, after=("pre",)))
    specs.append(RunSpec("analysis", knobs, fn=analysis, after=tuple(s.name for s in specs[1:])))
    return specs


def summarize(knobs: Knobs, out: Path) -> dict:
    dirs = framework.locate(runs(knobs, out), out)
    rows = [{"lr": lr, "final": framework.read_metrics(dirs[f"ft_{lr:g}"])[-1]["valid_ntp"]} for lr in knobs.lrs]
    return {"rows": rows, "analysis": framework.read_result(dirs["analysis"])}


PLOTS: list[dict] = []


def plot(knobs: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    fig, ax = plotting.subplots()
    ax.plot([r["lr"] for r in summary["rows"]], [r["final"] for r in summary["rows"]])
    plotting.save(fig, out / "fake")
    PLOTS.append(summary)


def fmain(argv, **kw):
    return framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__, argv=argv, progress=False, **kw)


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    FN_CALLS.clear()
    PLOTS.clear()


# --------------------------------------------------------------------------- tests


def test_waves_order_and_errors():
    a = RunSpec("a", Knobs(), fn=analysis)
    b = RunSpec("b", Knobs(), fn=analysis, after=("a",))
    c = RunSpec("c", Knobs(), fn=analysis, after=("a", "b"))
    d = RunSpec("d", Knobs(), fn=analysis)
    w = framework.waves([c, b, a, d])
    assert [[s.name for s in wave] for wave in w] == [["a", "d"], ["b"], ["c"]]
    with pytest.raises(ValueError, match="unknown"):
        framework.waves([RunSpec("x", Knobs(), fn=analysis, after=("nope",))])
    with pytest.raises(ValueError, match="cycle"):
        framework.waves([RunSpec("x", Knobs(), fn=analysis, after=("y",)),
                         RunSpec("y", Knobs(), fn=analysis, after=("x",))])
    with pytest.raises(ValueError, match="duplicate"):
        framework.waves([a, a])
    with pytest.raises(ValueError):
        RunSpec("bad", Knobs())  # neither module nor fn


def test_list_prints_one_parsable_command_per_run(tmp_path, capsys):
    out = tmp_path / "o"
    fmain(["--out", str(out), "--list"])
    lines = capsys.readouterr().out.strip().splitlines()
    specs = runs(Knobs(), out)
    assert [l for l in lines if l.startswith("#")] == ["# wave 0", "# wave 1", "# wave 2"]
    cmds = [l for l in lines if not l.startswith("#")]
    assert len(cmds) == len(specs)
    for spec, cmd in zip(framework.waves(specs)[0] + framework.waves(specs)[1], cmds):
        argv = shlex.split(cmd)
        assert argv[:3] == ["python", "-m", FAKE]
        assert cli.parse(FakeConfig, argv[3:]) == spec.config
    # the in-process run is a command of the figure file itself, restricted with --only
    last = shlex.split(cmds[-1])
    assert last[-2:] == ["--only", "analysis"] and "--out" in last
    assert not any(p.exists() for p in out.rglob("*"))  # listing runs nothing


def test_list_command_for_fn_run_carries_knob_flags(tmp_path, capsys):
    out = tmp_path / "o"
    fmain(["--out", str(out), "--list", "--scale", "paper", "--steps", "7", "--wave", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "# wave 2" and len(lines) == 2
    argv = shlex.split(lines[1])
    i = argv.index("--scale")
    args, knobs = framework.parse_args(Knobs, PRESETS, argv[i:])
    assert knobs == Knobs(lrs=PRESETS["paper"].lrs, steps=7)
    assert args.only == "analysis" and args.out == str(out)


def test_shards_are_disjoint_and_cover(tmp_path):
    specs = runs(PRESETS["paper"], tmp_path)
    w = framework.waves(specs)
    n = 3
    seen: list[str] = []
    for i in range(n):
        for wave_k, part in zip(w, framework.shard(w, i, n)):
            assert set(s.name for s in part) <= set(s.name for s in wave_k)
            seen += [s.name for s in part]
    assert sorted(seen) == sorted(s.name for s in specs)
    assert len(seen) == len(set(seen))


def test_shard_runs_slice_and_skips_blocked(tmp_path, capsys):
    out = tmp_path / "o"
    # shard 1/2 on a fresh dir: wave 0 has only "pre" (goes to shard 0); its wave-1 runs are blocked
    assert fmain(["--out", str(out), "--shard", "1/2"]) is None
    err = capsys.readouterr().err
    assert "skipping run" in err and CALLS == []
    # shard 0/2 runs "pre", then its share of wave 1 (ft_0.001), skips analysis (needs ft_0.002)
    fmain(["--out", str(out), "--shard", "0/2"])
    assert len(CALLS) == 2 and FN_CALLS == []
    fmain(["--out", str(out), "--shard", "1/2"])
    assert len(CALLS) == 3
    assert not PLOTS  # shards never plot
    # everything finished: a plain run reuses all stage runs, runs only the analysis, then plots
    CALLS.clear()
    summary = fmain(["--out", str(out)])
    assert CALLS == [] and len(FN_CALLS) == 1
    assert [r["lr"] for r in summary["rows"]] == [1e-3, 2e-3]


def test_plain_run_reuses_and_plot_only(tmp_path):
    out = tmp_path / "o"
    s1 = fmain(["--out", str(out)])
    assert len(CALLS) == 3 and len(FN_CALLS) == 1
    for name in ("summary.json", "summary.csv", "fake.png", "fake.pdf"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == s1
    csv_lines = (out / "summary.csv").read_text().strip().splitlines()
    assert csv_lines[0] == "lr,final" and len(csv_lines) == 3
    # fn run stored with its config and marker
    d = framework.locate(runs(Knobs(), out), out)["analysis"]
    assert framework.is_done(d) and framework.read_result(d) == {"n": 2, "tag": "a"}
    assert json.loads((d / "config.json").read_text())["config"]["tag"] == "a"
    # the torn last metrics line is skipped
    ft = framework.locate(runs(Knobs(), out), out)["ft_0.001"]
    assert [r["step"] for r in framework.read_metrics(ft)] == [0, 1, 2]

    # a second plain run reuses everything
    CALLS.clear(), FN_CALLS.clear()
    s2 = fmain(["--out", str(out)])
    assert CALLS == [] and FN_CALLS == [] and s2 == s1

    # plot_only from the run directories alone: delete the outputs, run nothing
    for name in ("summary.json", "summary.csv", "fake.png", "fake.pdf"):
        (out / name).unlink()
    s3 = fmain(["--out", str(out), "--plot_only"])
    assert s3 == s1 and CALLS == [] and FN_CALLS == []
    assert (out / "fake.png").is_file() and (out / "summary.json").is_file()


def test_unfinished_fn_run_is_rerun(tmp_path):
    out = tmp_path / "o"
    spec = RunSpec("analysis", Knobs(), fn=analysis)
    d = framework.run_dir(spec, out)
    d.mkdir(parents=True)  # started, never finished
    assert framework.execute(spec, out) == {"n": 2, "tag": "a"}
    assert len(FN_CALLS) == 1
    framework.execute(spec, out)
    assert len(FN_CALLS) == 1
    # a different config is a different directory
    other = RunSpec("analysis", Knobs(tag="b"), fn=analysis)
    assert framework.run_dir(other, out) != d


def test_flags_override_preset():
    _, k = framework.parse_args(Knobs, PRESETS, [])
    assert k == PRESETS["mini"]
    _, k = framework.parse_args(Knobs, PRESETS, ["--scale", "paper"])
    assert k == PRESETS["paper"]
    args, k = framework.parse_args(Knobs, PRESETS, ["--scale", "paper", "--steps", "9", "--tag", "z"])
    assert k == Knobs(lrs=PRESETS["paper"].lrs, steps=9, tag="z") and args.scale == "paper"
    _, k = framework.parse_args(Knobs, PRESETS, ["--lrs", "0.1", "0.2", "0.3"])
    assert k.lrs == (0.1, 0.2, 0.3) and k.steps == PRESETS["mini"].steps
    assert framework.knob_flags(k, PRESETS["mini"]) == ["--lrs", "0.1", "0.2", "0.3"]


@pytest.mark.parametrize("argv", [["--bogus", "1"], ["--steps", "x"], ["--scale", "huge"], ["--shard", "3/2"],
                                  ["--shard", "a"]])
def test_bad_flags_exit_with_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        framework.parse_args(Knobs, PRESETS, argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_wave_and_only_exit(tmp_path):
    for argv in (["--wave", "7"], ["--only", "nope"]):
        with pytest.raises(SystemExit) as e:
            fmain(["--out", str(tmp_path), *argv])
        assert e.value.code == 2


def test_help_documents_knobs(capsys):
    with pytest.raises(SystemExit) as e:
        framework.parse_args(Knobs, PRESETS, ["--scale", "paper", "--help"], doc="Fake figure: a claim.")
    assert e.value.code == 0
    text = capsys.readouterr().out
    for s in ("--scale", "--shard", "--list", "--plot_only", "--lrs", "finetuning learning rates",
              "Fake figure: a claim.", "(default: 5)"):
        assert s in text, s


def test_failed_run_exits_nonzero_and_skips_dependents(tmp_path, capsys):
    def boom(cfg, run_dir):
        raise RuntimeError("boom")

    def runs_fail(knobs, out):
        return [RunSpec("a", knobs, fn=boom), RunSpec("b", knobs, fn=analysis, after=("a",))]

    with pytest.raises(SystemExit) as e:
        framework.main(Knobs, PRESETS, runs_fail, summarize, None, argv=["--out", str(tmp_path)], progress=False)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "boom" in err and "skipping run 'b'" in err and FN_CALLS == []


def test_write_summary_nested_csv(tmp_path):
    framework.write_summary({"old": {"a": 1.0, "b": 2}, "x": "y"}, tmp_path)
    assert (tmp_path / "summary.csv").read_text().splitlines() == ["key,value", "old/a,1.0", "old/b,2", "x,y"]
    (tmp_path / "summary.csv").unlink()
    framework.write_summary({"curve": [1, 2, 3]}, tmp_path)
    assert not (tmp_path / "summary.csv").exists() and (tmp_path / "summary.json").exists()
