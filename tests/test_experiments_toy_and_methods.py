"""Toy continual learning and method comparison figure files: --list, the run graph, a tiny end-to-end run."""
from __future__ import annotations

import json
import shlex

import pytest

from forgetting.experiments import framework
from forgetting.experiments import method_comparison as mc
from forgetting.experiments import toy_continual as tc
from forgetting.training import cli
from forgetting.training.train_config import TrainConfig

TRAIN = "forgetting.stages.train"


def _listed(mod, out, capsys, extra=()):
    framework.main(mod.Knobs, mod.PRESETS, mod.runs, mod.summarize, mod.plot, doc=mod.__doc__,
                   argv=["--out", str(out), "--list", *extra], progress=False)
    return capsys.readouterr().out.strip().splitlines()


def _check_list(mod, out, capsys, extra=()):
    lines = _listed(mod, out, capsys, extra)
    _, knobs = framework.parse_args(mod.Knobs, mod.PRESETS, ["--out", str(out), *extra])
    specs = mod.runs(knobs, out)
    wave_list = framework.waves(specs)
    expected: list[str] = []
    for k, w in enumerate(wave_list):
        expected.append(f"# wave {k}")
        expected += [s.name for s in w]
    commands = [line for line in lines if not line.startswith("#")]
    assert [line for line in lines if line.startswith("#")] == [e for e in expected if e.startswith("#")]
    assert len(commands) == len(specs)
    by_name = {s.name: s for s in specs}
    for line, name in zip([l for l in lines], expected):
        if name.startswith("#"):
            assert line == name
            continue
        spec = by_name[name]
        argv = shlex.split(line)
        assert argv[:2] == ["python", "-m"]
        if spec.module is not None:
            assert argv[2] == TRAIN
            assert cli.parse(TrainConfig, argv[3:]) == spec.config
        else:
            assert argv[2] == f"forgetting.experiments.{mod.__name__.rsplit('.', 1)[-1]}"
            assert argv[argv.index("--only") + 1] == name
    return specs


def test_toy_list_round_trips(tmp_path, capsys):
    specs = _check_list(tc, tmp_path / "toy", capsys, ["--seeds", "1"])
    assert len(specs) == 1 + 1 + 2 * 3  # data, shared add, 3 tasks x 2 settings
    # knob flags reach the listed commands
    specs = _check_list(tc, tmp_path / "toy", capsys, ["--seeds", "1", "--steps", "7", "--lr", "0.002"])
    assert all(s.config.opt.peak_lr == 0.002 for s in specs if s.module and s.name != "add")
    assert {s.name: s for s in specs}["add"].config.opt.peak_lr == tc.PRESETS["mini"].first_lr


def test_method_comparison_list_round_trips(tmp_path, capsys):
    specs = _check_list(mc, tmp_path / "mc", capsys, ["--seeds", "1"])
    assert {s.name for s in specs} == {"data", "pretrain", *mc.METHODS}
    # user-provided files: no data run
    specs = _check_list(mc, tmp_path / "mc", capsys, ["--seeds", "1", "--old_path", "/x/old.bin", "--new_path", "/x/new.bin"])
    assert "data" not in {s.name for s in specs}
    assert {s.name: s for s in specs}["pretrain"].config.data.path == "/x/old.bin"


def test_toy_chain_structure(tmp_path):
    out = tmp_path / "toy"
    knobs = tc.PRESETS["mini"]
    specs = {s.name: s for s in tc.runs(knobs, out)}
    dirs = framework.locate(list(specs.values()), out)
    add, rev_r, sort_r, mod_r = (specs[n] for n in ("add", "reversal-replay", "sort-replay", "modadd-replay"))
    rev_p, sort_p, mod_p = (specs[n] for n in ("reversal-plain", "sort-plain", "modadd-plain"))
    # one shared pretraining run on add, loaded by both settings' reversal runs
    assert add.config.model.load_path == "" and add.config.reg.method == "none"
    assert rev_r.config.model.load_path == str(dirs["add"]) == rev_p.config.model.load_path
    assert sort_r.config.model.load_path == str(dirs["reversal-replay"]) and sort_r.after == ("reversal-replay",)
    assert mod_r.config.model.load_path == str(dirs["sort-replay"])
    assert sort_p.config.model.load_path == str(dirs["reversal-plain"])
    assert mod_p.config.model.load_path == str(dirs["sort-plain"])
    for s in (rev_r, sort_r, mod_r):
        r = s.config.reg
        assert (r.method, r.synth, r.coeff) == ("ntp_pre", True, 10.0)
        assert r.batch_size == s.config.opt.batch_size and r.prompt_ids == ()  # earlier tasks' BOS ids
    for s in (add, rev_p, sort_p, mod_p):
        assert s.config.reg.method == "none"
    # each task trains on its own file and every run evaluates all four
    for task, s in (("add", add), ("reversal", rev_r), ("sort", sort_p), ("modadd", mod_r)):
        assert s.config.data.path.endswith(f"{task}.bin")
        assert [p.rsplit("/", 1)[-1] for p in s.config.eval.extra_paths] == [f"{t}.bin" for t in tc.TASKS]
    for s in specs.values():
        if s.module:
            s.config.validate()
    # paper preset: the paper's model and schedule
    p = {s.name: s for s in tc.runs(tc.PRESETS["paper"], out)}["sort-replay"].config
    assert (p.model.d_model, p.model.n_layers, p.model.head_dim, p.opt.batch_size, p.opt.peak_lr, p.opt.b2) == (
        256, 2, 16, 2048, 1e-4, 0.99)
    assert p.stop.num_tokens_train == 2000 * 2048 * 14 and p.opt.warmup_tokens == 200 * 2048 * 14


def test_method_comparison_methods(tmp_path):
    specs = {s.name: s.config for s in mc.runs(mc.PRESETS["mini"], tmp_path)}
    pre = specs["pretrain"]
    for m in mc.METHODS:
        c = specs[m]
        c.validate()
        assert c.model.load_path == str(framework.run_dir(
            framework.RunSpec("pretrain", pre, module=TRAIN), tmp_path))
        assert c.data.path != pre.data.path
    assert specs["standard"].reg.method == "none" and specs["standard"].model.lora_rank == 0
    assert specs["lora"].model.lora_rank == 16 and specs["lora"].reg.method == "none"
    assert (specs["kl_real"].reg.method, specs["kl_real"].reg.synth) == ("kl_pre", False)
    assert (specs["kl_self"].reg.method, specs["kl_self"].reg.synth) == ("kl_pre", True)
    assert (specs["ntp_real"].reg.method, specs["ntp_real"].reg.synth) == ("ntp_pre", False)
    assert (specs["ntp_self"].reg.method, specs["ntp_self"].reg.synth) == ("ntp_pre", True)


TINY_TOY = ["--seeds", "1", "--d_model", "16", "--head_dim", "8", "--n_layers", "1", "--first_steps", "3", "--steps", "2",
            "--batch_size", "8", "--warmup_steps", "1", "--num_examples", "120", "--valid_examples", "8",
            "--eval_every", "2", "--replay_buffer", "2"]


@pytest.mark.slow
def test_toy_tiny_end_to_end(tmp_path):
    out = tmp_path / "toy"
    argv = ["--out", str(out), *TINY_TOY]
    summary = framework.main(tc.Knobs, tc.PRESETS, tc.runs, tc.summarize, tc.plot, doc=tc.__doc__, argv=argv,
                             progress=False)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    for setting in ("without_replay", "with_replay"):
        assert set(on_disk[setting]) == set(tc.TASKS)
        assert all(0.0 <= v <= 1.0 for v in on_disk[setting].values())
    for ext in ("png", "pdf"):
        assert (out / f"toy_continual.{ext}").stat().st_size > 0
    # the curves concatenate the four tasks' evals with a switch line at each task boundary
    _, knobs = framework.parse_args(tc.Knobs, tc.PRESETS, argv)
    c = tc.curves(knobs, out, "with_replay")
    assert c["switches"] == [3, 5, 7] and c["step"][0] == 0 and c["step"][-1] == 9
    assert c["step"] == sorted(c["step"])
    # replay runs really replayed: the modadd run was prompted by the three earlier tasks' BOS ids
    dirs = framework.locate(tc.runs(knobs, out), out)
    resolved = json.loads((dirs["modadd-replay"] / "config.json").read_text())["resolved"]
    assert resolved["lineage_ids"] == [1, 2, 3, 4]
