"""Figures over seeds (experiments/repeat.py): per-seed runs differ only in the seed, the summary is the mean
and the 95% t interval of the per-seed results, and one seed is exactly the one-seed figure."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math

import pytest

from forgetting.experiments import framework, model_size as MS

T_975_1 = 12.706205  # t_{0.975, 1} from a printed table: two seeds have one degree of freedom

TINY_SIZE = ["--widths", "8", "--kl_coeffs", "0", "--vocab_size", "64", "--data_tokens", "20000", "--seq_len", "16",
             "--batch_size", "4", "--valid_tokens", "256", "--evals", "2", "--warmup_steps", "1",
             "--pretrain_target", "0.01", "--pretrain_max_tokens", "256", "--finetune_target", "0.01",
             "--finetune_max_tokens", "128"]


def _leaves(obj, prefix=""):
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            out.update(_leaves(getattr(obj, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix[:-1]: obj}


def _differences(a, b) -> dict:
    la, lb = _leaves(a), _leaves(b)
    return {k: (la[k], lb[k]) for k in la if la[k] != lb[k]}


FIGURES = ("model_size", "pretrain_length", "grid_2d", "learning_rate", "high_lr", "model_capacity",
           "method_comparison", "toy_continual")


@pytest.mark.parametrize("name", FIGURES)
def test_mini_has_three_seeds_and_paper_keeps_one(name, tmp_path):
    mod = importlib.import_module(f"forgetting.experiments.{name}")
    mini, paper = mod.PRESETS["mini"], mod.PRESETS["paper"]
    assert mini.seeds >= 3 and paper.seeds == 1
    one = {s.name: s for s in mod.runs(dataclasses.replace(mini, seeds=1), tmp_path)}
    three = {s.name: s for s in mod.runs(mini, tmp_path)}
    # seed 0 is the one-seed figure, run for run; every other run is a seed's own copy (-s1, -s2)
    assert {n: framework.run_dir(s, tmp_path) for n, s in three.items() if n in one} == \
           {n: framework.run_dir(s, tmp_path) for n, s in one.items()}
    train = [n for n, s in one.items() if s.module]
    for seed in (1, 2):
        for n in train:
            copy = three[f"{n}-s{seed}"]
            diff = _differences(one[n].config, copy.config)
            assert diff.pop("run.seed") == (mini.seed, mini.seed + seed)
            # a finetune loads its own seed's checkpoint; nothing else differs
            assert set(diff) <= {"model.load_path"}, diff
            if "model.load_path" in diff:
                dep = [d for d in copy.after if d.endswith(f"-s{seed}")]
                assert diff["model.load_path"][1] == str(framework.run_dir(three[dep[0]], tmp_path))
    shared = set(three) - set(train) - {f"{n}-s{s}" for n in train for s in (1, 2)}
    assert shared == set(one) - set(train)  # the data run (no seed in it) is shared by every seed


def test_regression_1d_seeds_vary_its_seed_only(tmp_path):
    from forgetting.experiments import regression_1d as r1d

    specs = {s.name: s for s in r1d.runs(r1d.PRESETS["mini"], tmp_path)}
    assert set(specs) == {f"{n}{sfx}" for n in ("fit_old", "finetuned", "kl") for sfx in ("", "-s1", "-s2")}
    diff = _differences(specs["fit_old"].config, specs["fit_old-s2"].config)
    assert diff == {"knobs.seed": (0, 2)}
    # every seed's finetunes load that seed's own fit (an in-process run's directory follows its name)
    for sfx in ("", "-s1", "-s2"):
        for n in ("finetuned", "kl"):
            assert specs[n + sfx].config.load_path == str(framework.run_dir(specs["fit_old" + sfx], tmp_path))
            assert specs[n + sfx].after == ("fit_old" + sfx,)


def _main(argv):
    return framework.main(MS.Knobs, MS.PRESETS, MS.runs, MS.summarize, MS.plot, argv=argv, progress=False)


@pytest.mark.slow
def test_two_seeds_summary_is_mean_and_t_interval_of_the_runs(tmp_path):
    out = tmp_path / "ms"
    summary = _main(["--out", str(out), "--seeds", "2", *TINY_SIZE])
    _, k = framework.parse_args(MS.Knobs, MS.PRESETS, ["--seeds", "2", *TINY_SIZE])
    dirs = framework.locate(MS.runs(k, out), out)
    assert set(dirs) == {"data", "pre-d8", "ft-d8-kl0", "pre-d8-s1", "ft-d8-kl0-s1"}
    # the two pretraining runs' recorded configs differ only in the seed
    a, b = (json.loads((dirs[n] / "config.json").read_text()) for n in ("pre-d8", "pre-d8-s1"))
    assert a["config"]["run"]["seed"] == 0 and b["config"]["run"]["seed"] == 1
    a["config"]["run"]["seed"] = b["config"]["run"]["seed"]
    assert a["config"] == b["config"]
    # hand-computed from the runs' own done.json: mean and mean ± t_{0.975,1} · s / √2 = mean ± t · |x0 - x1| / 2
    pre = [json.loads((dirs[n] / "done.json").read_text())["valid_ntp"] for n in ("pre-d8", "pre-d8-s1")]
    old = [json.loads((dirs[n] / "done.json").read_text())["prev_ntp"] for n in ("ft-d8-kl0", "ft-d8-kl0-s1")]
    assert pre[0] != pre[1] and old[0] != old[1]  # the seed changed the runs
    row = summary["rows"][0]
    for key, xs in (("pretrain_loss", pre), ("best_old_loss", old),
                    ("forgetting", [o - p for o, p in zip(old, pre)])):
        m, half = (xs[0] + xs[1]) / 2, T_975_1 * abs(xs[0] - xs[1]) / 2
        assert row[key] == pytest.approx(m, rel=1e-12)
        assert row[f"{key}_ci95"] == {"low": pytest.approx(m - half, rel=1e-5), "high": pytest.approx(m + half, rel=1e-5)}
    assert row["d_model"] == 8 and "d_model_ci95" not in row  # the same in both seeds: no interval
    assert summary["interval"] == "95% t" and summary["seeds"] == 2 and summary["seeds_summarized"] == 2
    assert [summary["per_seed"][s]["rows"][0]["best_old_loss"] for s in ("0", "1")] == old
    assert "best_old_loss_ci95/low" in (out / "summary.csv").read_text().splitlines()[0]  # the table has the intervals
    assert json.loads((out / "summary.json").read_text()) == summary
    # one seed of the same figure: exactly seed 0's values, and its runs are reused (nothing new runs)
    before = sorted(p.name for p in out.iterdir() if p.is_dir())
    one = _main(["--out", str(out), "--seeds", "1", *TINY_SIZE])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == before
    assert one["rows"][0]["best_old_loss"] == old[0] and one["rows"][0]["pretrain_loss"] == pre[0]
    assert "best_old_loss_ci95" not in one["rows"][0] and "per_seed" not in one
    assert math.isfinite(one["rows"][0]["forgetting"])


PLOTTED = ("model_size", "pretrain_length", "grid_2d", "learning_rate", "high_lr", "model_capacity", "method_comparison",
           "toy_continual", "capacity_slices")


def _fake_finished(specs, out, rng):
    """done.json and metrics.jsonl of a finished train run with random losses, for every train run."""
    keys = ("valid_ntp", "prev_ntp", "ntp/old", "ntp/new", "acc/add", "acc/reversal", "acc/sort", "acc/modadd")
    for s in specs:
        if not s.module:
            continue
        d = framework.run_dir(s, out)
        d.mkdir(parents=True, exist_ok=True)
        rows = [{"step": step, "tokens": 1000 * step, "train_seconds": 1.0 + step, **{k: rng.uniform(0.2, 0.9) for k in keys}}
                for step in (0, 5, 10)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "done.json").write_text(json.dumps({**rows[-1], "steps": 10, "stop_reason": "target_loss"}))


@pytest.mark.parametrize("name", PLOTTED)
def test_summary_and_plot_over_three_seeds_from_finished_runs(name, tmp_path, capsys):
    import random

    mod = importlib.import_module(f"forgetting.experiments.{name}")
    _, k = framework.parse_args(mod.Knobs, mod.PRESETS, [])
    _fake_finished(mod.runs(k, tmp_path), tmp_path, random.Random(0))
    summary = framework.main(mod.Knobs, mod.PRESETS, mod.runs, mod.summarize, mod.plot,
                             argv=["--out", str(tmp_path), "--plot_only"], progress=False)
    text = json.dumps(summary)
    assert '_ci95": {"low"' in text  # random per-seed losses: every measured number has an interval
    assert (tmp_path / f"{name}.png").stat().st_size > 0
