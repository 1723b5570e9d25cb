"""The capacity-slices figure: built from the model-size and pretraining-length runs, summarized from them."""
from __future__ import annotations

import json

import pytest

from forgetting.experiments import capacity_slices as CS
from forgetting.experiments import framework
from forgetting.experiments import model_size as MS
from forgetting.experiments import pretrain_length as PL

DATA = ["--old_path", "/d/c4_en.bin", "--new_path", "/d/c4_es.bin"]


@pytest.mark.parametrize("scale,extra", [("mini", []), ("paper", DATA)])
def test_its_runs_are_exactly_the_two_figures_runs(tmp_path, scale, extra):
    _, k = framework.parse_args(CS.Knobs, CS.PRESETS, ["--scale", scale, *extra])
    _, ms = framework.parse_args(MS.Knobs, MS.PRESETS, ["--scale", scale, *extra])
    _, pl = framework.parse_args(PL.Knobs, PL.PRESETS, ["--scale", scale, *extra])
    mine = {framework.run_dir(s, tmp_path) for s in CS.runs(k, tmp_path)}
    theirs = {framework.run_dir(s, tmp_path) for s in [*MS.runs(ms, tmp_path), *PL.runs(pl, tmp_path)]}
    assert mine == theirs  # same directories: runs finished by either figure are reused, nothing new is run
    assert len(mine) == len(CS.runs(k, tmp_path))  # each once (the shared synthetic-data run too)


def _done(path, **metrics):
    path.mkdir(parents=True, exist_ok=True)
    (path / framework.DONE).write_text(json.dumps(metrics))


def test_summary_and_plot_from_finished_runs(tmp_path, capsys):
    argv = ["--out", str(tmp_path), *DATA, "--model_size.widths", "8", "16", "--model_size.kl_coeffs", "0", "1",
            "--pretrain_length.tpps", "10", "100", "--pretrain_length.kl_coeffs", "0", "1"]
    _, k = framework.parse_args(CS.Knobs, CS.PRESETS, argv)
    ms, pl = k.sweeps()
    dirs = framework.locate(CS.runs(k, tmp_path), tmp_path)
    hit = {"stop_reason": "target_loss"}
    for d, pre, plain, kl in ((8, 1.60, 2.50, 1.90), (16, 1.55, 2.40, 1.58)):
        _done(dirs[MS.pre_name(d)], valid_ntp=pre, **hit)
        _done(dirs[MS.fine_name(d, 0)], prev_ntp=plain, valid_ntp=1.6, **hit)
        _done(dirs[MS.fine_name(d, 1)], prev_ntp=kl, valid_ntp=1.6, **hit)
    for t, pre, plain, kl in ((10, 1.80, 1.85, 1.81), (100, 1.62, 2.30, 1.70)):
        _done(dirs[PL.pre_name(t)], valid_ntp=pre, tokens=1000)
        _done(dirs[PL.fine_name(t, 0)], prev_ntp=plain, valid_ntp=1.8, **hit)
        # tpp 100 with KL misses the new-data target: the best among those that reached it is plain finetuning
        _done(dirs[PL.fine_name(t, 1)], prev_ntp=kl, valid_ntp=1.8 if t == 10 else 2.5,
              stop_reason="target_loss" if t == 10 else "num_tokens_train")
    summary = framework.main(CS.Knobs, CS.PRESETS, CS.runs, CS.summarize, CS.plot, argv=[*argv, "--plot_only"],
                             progress=False)
    size = {r["d_model"]: r for r in summary["model_size"]}
    assert size[8]["best_old_loss"] == 1.90 and size[8]["forgetting"] == pytest.approx(0.30)
    assert size[16]["best_old_loss"] == 1.58 and size[16]["params"] == 12 * 16**2 + 16 * ms.vocab_size
    length = {r["tpp"]: r for r in summary["pretrain_length"]}
    assert length[10]["best_old_loss"] == 1.81 and length[10]["forgetting"] == pytest.approx(0.01)
    assert length[100]["best_old_loss"] == 2.30 and length[100]["best_coeff"] == "0"
    assert (tmp_path / "capacity_slices.png").is_file() and (tmp_path / "capacity_slices.pdf").is_file()
    assert pl.finetune_target == PL.PRESETS["mini"].finetune_target
