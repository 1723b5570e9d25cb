"""Figure knobs are checked before anything runs (framework.check_knobs + each figure's CHECKS/validate):
a bad value is one error naming the knob's flag, exit code 2, no run directory, no listed command."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

import pytest

from forgetting.experiments import framework

FIGURES = ("toy_continual", "method_comparison", "regression_1d", "grid_2d", "high_lr", "learning_rate",
           "model_capacity", "model_size", "pretrain_length", "capacity_slices", "instruct")

# (figure, bad knob flags, the start of the error after "error: ")
BAD = [
    ("toy_continual", ["--lr", "0"], "--lr: must be > 0, got 0.0"),
    ("toy_continual", ["--first_lr", "-0.5"], "--first_lr: must be > 0"),
    ("toy_continual", ["--b2", "1"], "--b2: must be in [0, 1)"),
    ("toy_continual", ["--replay_coeff", "-1"], "--replay_coeff: must be >= 0"),
    ("toy_continual", ["--num_examples", "0"], "--num_examples: must be > 0"),
    ("toy_continual", ["--dtype", "float16"], "--dtype: must be one of float32, bfloat16"),
    ("method_comparison", ["--share", "1.2"], "--share: must be in [0, 1], got 1.2"),
    ("method_comparison", ["--lora_rank", "0"], "--lora_rank: must be > 0"),
    ("method_comparison", ["--kl_coeff", "-1"], "--kl_coeff: must be >= 0"),
    ("method_comparison", ["--pretrain_steps", "0"], "pretraining needs a length: --pretrain_steps N"),
    ("regression_1d", ["--noise", "-1"], "--noise: must be > 0, got -1.0"),
    ("regression_1d", ["--sghmc_friction", "2"], "--sghmc_friction: must be in [0, 1]"),
    ("regression_1d", ["--fit_steps", "0"], "--fit_steps: must be > 0"),
    ("grid_2d", ["--widths"], "--widths: must not be empty"),
    ("grid_2d", ["--tpps", "nan"], "--tpps: every value must be > 0, got nan"),
    ("grid_2d", ["--kl_coeff", "-3"], "--kl_coeff: must be >= 0"),
    ("high_lr", ["--lowered_lrs", "0.001", "-0.001"], "--lowered_lrs: every value must be > 0, got -0.001 in (0.001, -0.001)"),
    ("high_lr", ["--replace_fracs", "1.5"], "--replace_fracs: every value must be in [0, 1], got 1.5"),
    ("high_lr", ["--lr", "0"], "--lr: must be > 0"),
    ("high_lr", ["--share", "-0.1"], "--share: must be in [0, 1]"),
    ("high_lr", ["--seq_len", "1"], "--seq_len: must be >= 2"),
    ("learning_rate", ["--finetune_lrs", "0.001", "-1"], "--finetune_lrs: every value must be > 0, got -1.0"),
    ("learning_rate", ["--pretrain_lrs"], "--pretrain_lrs: must not be empty"),
    ("model_capacity", ["--mix_fracs", "0.5", "2"], "--mix_fracs: every value must be in [0, 1], got 2.0"),
    ("model_capacity", ["--light_lrs", "0"], "--light_lrs: every value must be > 0, got 0.0"),
    ("model_capacity", ["--mix_max_tokens", "0"], "the mixture runs need a length: --mix_max_tokens N"),
    ("model_size", ["--widths", "0", "8"], "--widths: every value must be > 0, got 0 in (0, 8)"),
    ("model_size", ["--kl_coeffs"], "--kl_coeffs: must not be empty"),
    ("model_size", ["--batch_size", "0"], "--batch_size: must be > 0"),
    ("pretrain_length", ["--tpps", "-10"], "--tpps: every value must be > 0"),
    ("pretrain_length", ["--finetune_lr_decay", "linear"], "--finetune_lr_decay: must be one of none, cosine"),
    ("capacity_slices", ["--model_size.widths", "0"], "--model_size.widths: every value must be > 0"),
    ("capacity_slices", ["--pretrain_length.kl_coeffs", "-1"], "--pretrain_length.kl_coeffs: every value must be >= 0"),
    ("instruct", ["--coeffs"], "--coeffs: must not be empty"),
    ("instruct", ["--peak_lr", "0"], "--peak_lr: must be > 0"),
    ("instruct", ["--batch_size", "-4"], "--batch_size: must be > 0"),
]


def _main(name: str, argv: list[str]) -> None:
    m = importlib.import_module(f"forgetting.experiments.{name}")
    framework.main(m.Knobs, m.PRESETS, m.runs, m.summarize, getattr(m, "plot", None), doc=m.__doc__, argv=argv,
                   progress=False)


@pytest.mark.parametrize("name,flags,message", BAD, ids=[f"{n}{' '.join(f)}" for n, f, _ in BAD])
@pytest.mark.parametrize("mode", ["run", "list"])
def test_bad_knob_is_one_error_naming_it_and_runs_nothing(name, flags, message, mode, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        _main(name, ["--out", str(out), *flags, *(["--list"] if mode == "list" else [])])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].split("error: ", 1)[1].startswith(message), captured.err[-500:]
    assert captured.out == "" and not out.exists(), "nothing listed, nothing run"


def test_knobs_that_make_an_invalid_stage_run_are_refused_before_any_run(tmp_path, capsys):
    # toy_continual's own checks pass (14 is a multiple of 7), the stage refuses an odd head width
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        _main("toy_continual", ["--out", str(out), "--head_dim", "7", "--d_model", "14"])
    assert e.value.code == 2 and not out.exists()
    assert "the knobs make run 'add' invalid: --model.head_dim 7 must be even" in capsys.readouterr().err


@pytest.mark.parametrize("name", FIGURES)
def test_every_preset_passes_its_checks(name):
    m = importlib.import_module(f"forgetting.experiments.{name}")
    for preset in m.PRESETS.values():
        framework.check_knobs(preset)


@dataclass(frozen=True)
class _Typo:
    lr: float = 1.0
    CHECKS: ClassVar[dict] = {"lrs": (framework.positive,)}


def test_checks_naming_an_unknown_knob_are_a_programming_error():
    with pytest.raises(TypeError, match=r"_Typo.CHECKS names unknown knobs \['lrs'\]"):
        framework.check_knobs(_Typo())
