"""--eval.prev_every: evals between the first and the last leave the loaded run's data out (prev_* and the
extra path with its rows), every other measure is as it was, and the last row (and done.json) is the one
evaluating it everywhere gives, however the run stops."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgetting.stages import train
from forgetting.training import runs
from forgetting.training.train_config import replace
from tests.test_replay_cache import T, WALL_CLOCK, tiny

STEPS, EVERY = 12, 2  # six evals after step 0's


@pytest.fixture(scope="module")
def pretrained(corpora, tmp_path_factory) -> Path:
    cfg = tiny(corpora, tmp_path_factory.mktemp("pre"), **{"stop.num_tokens_train": 8 * T * 16})
    return Path(train.train(cfg)["run_dir"])


def _finetune(corpora, pretrained: Path, run_dir: Path, prev_every: int, **changes) -> tuple[list[dict], dict]:
    cfg = tiny(corpora, run_dir, **{
        "data.path": corpora[1], "model.load_path": str(pretrained), "eval.extra_paths": (corpora[0], corpora[1]),
        "stop.num_tokens_train": 8 * T * STEPS, "log.every_steps": EVERY, "eval.prev_every": prev_every, **changes})
    done = train.train(cfg)
    lines = (Path(done["run_dir"]) / runs.METRICS_FILE).read_text().splitlines()
    done = {k: v for k, v in done.items() if k != "run_dir"}
    return [_clockless(json.loads(line)) for line in lines], {**done, "metrics": _clockless(done["metrics"])}


def _clockless(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in WALL_CLOCK}


def _left_out(row: dict, old_stem: str) -> set[str]:
    return {k for k in row if k.startswith("prev_") or k == f"ntp/{old_stem}"}


@pytest.mark.parametrize("prev_every", [0, 2])
def test_thinned_evals_keep_every_other_measure_and_end_on_the_full_row(corpora, pretrained, tmp_path, prev_every):
    full, full_done = _finetune(corpora, pretrained, tmp_path / "full", 1)
    thin, thin_done = _finetune(corpora, pretrained, tmp_path / "thin", prev_every)
    old_stem = Path(corpora[0]).stem
    assert [r["step"] for r in thin] == [r["step"] for r in full] == list(range(0, STEPS + 1, EVERY))
    assert _left_out(full[0], old_stem) >= {"prev_ntp", "prev_kl", f"ntp/{old_stem}"}
    for f, t in zip(full, thin):
        index = f["step"] // EVERY
        due = f["step"] in (0, STEPS) or (prev_every and index % prev_every == 0)
        want = f if due else {k: v for k, v in f.items() if k not in _left_out(f, old_stem)}
        assert t == want, f"step {f['step']}"
    assert thin[1] != full[1]  # step 2: left out in both settings
    assert thin_done == full_done and thin[-1] == full[-1]


def test_a_run_stopped_by_its_target_ends_on_the_full_row(corpora, pretrained, tmp_path):
    full, _ = _finetune(corpora, pretrained, tmp_path / "probe", 1)
    target = full[3]["valid_ntp"]  # reached at step 6 at the latest: the stop falls between the cadence's evals
    stop = next(r["step"] for r in full if r["valid_ntp"] <= target)
    assert 0 < stop < STEPS
    full, full_done = _finetune(corpora, pretrained, tmp_path / "full", 1, **{"stop.target_loss": target})
    thin, thin_done = _finetune(corpora, pretrained, tmp_path / "thin", 0, **{"stop.target_loss": target})
    assert full_done["metrics"]["stop_reason"] == thin_done["metrics"]["stop_reason"] == "target_loss"
    assert thin_done == full_done and thin[-1] == full[-1] and thin[-1]["step"] == stop
    assert "prev_ntp" in thin[-1] and all("prev_ntp" not in r for r in thin[1:-1])


def test_prev_every_flags_are_checked(corpora, tmp_path):
    cfg = tiny(corpora, tmp_path)
    with pytest.raises(ValueError, match="--eval.prev_every must be >= 0"):
        replace(cfg, **{"eval.prev_every": -1}).validate()
    with pytest.raises(ValueError, match="--model.load_path"):
        replace(cfg, **{"eval.prev_every": 0}).validate()
    replace(cfg, **{"eval.prev_every": 0, "model.load_path": str(tmp_path)}).validate()  # a finetune may thin
