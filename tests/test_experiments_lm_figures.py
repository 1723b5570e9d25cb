"""The six language-model figure files (model size, pretraining length, 2-D grid, learning rate, high LR,
model capacity): --list / --help, and the pure summary math."""
from __future__ import annotations

import math
import shlex
import subprocess
import sys

import pytest

from forgetting.experiments import common_lm as C
from forgetting.training import cli
from forgetting.training.train_config import TrainConfig

FILES = ("model_size", "pretrain_length", "grid_2d", "learning_rate", "high_lr", "model_capacity")
KNOBS = {"model_size": ("--widths", "--pretrain_target", "--kl_coeffs"),
         "pretrain_length": ("--tpps", "--d_model", "--kl_coeffs"),
         "grid_2d": ("--widths", "--tpps", "--kl_coeff"),
         "learning_rate": ("--pretrain_lrs", "--finetune_lrs"),
         "high_lr": ("--lowered_lrs", "--replace_fracs", "--high_lr"),
         "model_capacity": ("--mix_fracs", "--over_tpp", "--light_tpp")}


def _main(name: str, argv: list[str], capsys) -> str:
    import importlib

    from forgetting.experiments import framework

    mod = importlib.import_module(f"forgetting.experiments.{name}")
    framework.main(mod.Knobs, mod.PRESETS, mod.runs, mod.summarize, mod.plot, doc=mod.__doc__, argv=argv)
    return capsys.readouterr().out


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("scale", ("mini", "paper"))
def test_list_prints_parseable_waves(name, scale, tmp_path, capsys):
    argv = ["--list", "--scale", scale, "--out", str(tmp_path)]
    if scale == "paper":
        argv += ["--old_path", "/data/en.bin", "--new_path", "/data/es.bin"]
    text = _main(name, argv, capsys)
    lines = text.splitlines()
    assert lines[0] == "# wave 0"
    assert sum(l.startswith("# wave") for l in lines) >= 2
    train_cmds = [l for l in lines if "forgetting.stages.train" in l]
    assert train_cmds
    for cmd in (train_cmds[0], train_cmds[-1]):  # a pretraining and a finetuning run
        flags = shlex.split(cmd)[3:]
        cfg = cli.parse(TrainConfig, flags)
        assert cfg.data.path
    last = cli.parse(TrainConfig, shlex.split(train_cmds[-1])[3:])
    assert last.model.load_path  # finetunes a finished run
    if scale == "paper":
        assert "--only data" not in text and "/data/en.bin" in text
        assert last.model.d_model % 64 == 0 and last.model.seq_len == 256
    else:
        assert "--only data" in text


@pytest.mark.parametrize("name", FILES)
def test_help_mentions_knobs(name):
    r = subprocess.run([sys.executable, "-m", f"forgetting.experiments.{name}", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for knob in KNOBS[name] + ("--old_path", "--new_path", "--scale"):
        assert knob in r.stdout


def test_compute_multiplier_on_hand_made_curve():
    tokens = [0, 100, 200, 300, 400]
    losses = [5.0, 3.0, 2.0, 1.5, 1.0]
    assert C.compute_multiplier(tokens, losses, 2.0) == pytest.approx(0.5)   # reached exactly at 200 of 400
    assert C.compute_multiplier(tokens, losses, 2.5) == pytest.approx(0.375)  # halfway between 100 and 200
    assert C.compute_multiplier(tokens, losses, 1.0) == 1.0  # nothing forgotten
    assert C.compute_multiplier(tokens, losses, 0.5) == 1.0  # better than the end of pretraining
    assert C.compute_multiplier(tokens, losses, 6.0) == 0.0  # worse than the initial model
    assert C.first_crossing(tokens, losses, 2.5, interpolate=False) == 200


def test_pareto_frontier():
    pts = [(1.0, 5.0), (2.0, 3.0), (2.5, 4.0), (3.0, 1.0), (4.0, 1.0), (2.0, 2.5)]
    assert C.pareto_frontier(pts) == [(1.0, 5.0), (2.0, 2.5), (3.0, 1.0)]
    assert C.pareto_frontier([]) == []
    front = [(1.0, 5.0), (2.0, 2.5), (3.0, 1.0)]
    assert C.behind_frontier(front, 1.5, 4.0) == pytest.approx(0.25)  # frontier at 1.5 is 3.75
    assert C.behind_frontier(front, 2.5, 1.5) == pytest.approx(-0.25)  # beyond: frontier there is 1.75
    assert C.behind_frontier(front, 2.0, 2.5) == pytest.approx(0.0)
    assert C.behind_frontier(front, 0.5, 9.0) is None and C.behind_frontier(front, 3.5, 0.0) is None


def test_compute_ratio_at_equal_old_loss():
    slow = [(10.0, 3.6), (100.0, 3.5), (1000.0, 3.4)]  # lowered LR: old loss falls with time
    fast = [(5.0, 3.6), (10.0, 3.4), (12.0, 3.3)]  # replay
    r = C.compute_ratio_at_equal_loss(slow, fast)
    assert r["level"] == pytest.approx(3.4)
    assert r["ratio"] == pytest.approx(100.0)
    # log-time interpolation between frontier points
    assert C.time_to_reach(slow, 3.45) == pytest.approx(math.sqrt(100.0 * 1000.0))
    assert C.time_to_reach(slow, 3.0) is None
    assert C.compute_ratio_at_equal_loss(slow, fast, level=3.0)["ratio"] is None


def test_steps_to_target_and_best_over():
    from forgetting.experiments.model_size import best_over

    rows = [{"step": 0, "valid_ntp": 4.0}, {"step": 10, "valid_ntp": 2.5}, {"step": 20, "valid_ntp": 1.9}]
    assert C.steps_to_target(rows, 2.0) == 20
    assert C.steps_to_target(rows, 1.0) is None
    per = {"0": {"prev_ntp": 3.0, "valid_ntp": 1.9, "stop_reason": "target_loss"},
           "10": {"prev_ntp": 2.2, "valid_ntp": 2.4, "stop_reason": "num_tokens_train"},
           "1": {"prev_ntp": 2.6, "valid_ntp": 2.0, "stop_reason": "target_loss"}}
    assert best_over(per, 2.0) == (2.6, "1", True)  # the KL-10 run never reached the target


def test_configs_validate_and_name_runs(tmp_path):
    from forgetting.experiments import high_lr, model_capacity

    for mod in (high_lr, model_capacity):
        specs = mod.runs(mod.PRESETS["mini"], tmp_path)
        for s in specs:
            if s.module:
                s.config.validate()
    specs = {s.name: s.config for s in high_lr.runs(high_lr.PRESETS["mini"], tmp_path)}
    assert specs["ft-replace0.125"].reg.method == "replace" and specs["ft-replace0.125"].reg.coeff == 0.125
    caps = {s.name: s.config for s in model_capacity.runs(model_capacity.PRESETS["mini"], tmp_path)}
    assert caps["mix1"].data.path.endswith("new.bin") and not caps["mix1"].mix.path
    assert caps["mix0.5"].mix.coeff == 0.5 and caps["ft-over-kl3"].reg.synth
    assert C.fmt(3e-3) == "3e-3" and C.fmt(0.125) == "0.125" and C.fmt(100.0) == "100"
