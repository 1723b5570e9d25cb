"""bench.sweep: each way gets the runs it names (the cache emptied first, or switched off), the summary's
ratios are sitting by sitting, and the cache/no-cache identity check compares metrics, not timings."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from forgetting.bench import sweep, versus
from forgetting.training import cli, replay_cache
from forgetting.training.train_config import TrainConfig

DATA = {"c4_en.bin": Path("/d/c4_en.bin"), "c4_es.bin": Path("/d/c4_es.bin")}


def _metrics(folder: Path, rows: list[dict]) -> str:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_each_way_runs_the_sweep_it_names(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    (checkpoint / replay_cache.CACHE_DIR / "old-stream").mkdir(parents=True)
    seen: list[tuple] = []

    def fake(side):
        def run(cfg, python, mode, data, load, folder):
            cache_left = (checkpoint / replay_cache.CACHE_DIR).exists()
            args = (versus.project_args(cfg, mode, data, load, folder) if side == "project"
                    else versus.authors_args(cfg, mode, data, load, folder))
            seen.append((side, mode, load, cache_left, args))
            return {"wall_s": 1.0, "checkpoint": str(folder), "valid_ntp": 1.0, "prev_ntp": 2.0}
        return run

    monkeypatch.setattr(versus, "run_project", fake("project"))
    monkeypatch.setattr(versus, "run_authors", fake("authors"))
    cfg = sweep.SweepConfig(reference="", coeffs=(0.5, 5.0), project_process="run")
    for way in ("cache", "nocache", "authors"):
        sweep.sweep_one_way(cfg, way, "python", DATA, str(checkpoint), tmp_path / way)
    assert [(s[0], s[1], s[2]) for s in seen] == [("project", "kl_self", str(checkpoint))] * 4 + [
        ("authors", "kl_self", str(checkpoint))] * 2
    assert not seen[0][3]  # the cache way starts from an empty cache
    cache_runs = [cli.parse(TrainConfig, s[4]) for s in seen[:2]]
    nocache_runs = [cli.parse(TrainConfig, s[4]) for s in seen[2:4]]
    assert [c.reg.coeff for c in cache_runs] == [c.reg.coeff for c in nocache_runs] == [0.5, 5.0]
    assert all(c.reg.replay_cache for c in cache_runs) and not any(c.reg.replay_cache for c in nocache_runs)
    assert all(c.reg.synth and c.reg.method == "kl_pre" for c in cache_runs + nocache_runs)
    authors = [dict(a.split("=", 1) for a in s[4]) for s in seen[4:]]
    assert [float(a["reg.coeff"]) for a in authors] == [0.5, 5.0] and all(a["reg.synth"] == "true" for a in authors)


def test_summary_ratios_are_per_sitting_and_identity_ignores_wall_clock(tmp_path):
    row = {"step": 4, "valid_ntp": 1.25, "prev_ntp": 2.5}

    def way(wall, name, **changes):
        run = _metrics(tmp_path / f"{name}-{wall}", [{**row, "train_seconds": wall, "wall_time": wall * 2,
                                                      "tokens_per_s": 1 / wall, **changes}])
        return {"wall_s": wall, "runs": [{"coeff": 1.0, "checkpoint": run, "train_seconds": wall / 2},
                                         {"coeff": 2.0, "checkpoint": run, "train_seconds": 1.0}]}

    sittings = [{"cache": way(10, "c"), "nocache": way(12, "n"), "authors": way(50, "a")},
                {"cache": way(20, "c"), "nocache": way(30, "n"), "authors": way(60, "a")},
                {"cache": way(25, "c"), "nocache": way(25, "n"), "authors": way(100, "a")}]
    s = sweep.summarize(sittings)
    assert s["wall_s"]["cache"] == {"median": 20, "min": 10, "max": 25}
    assert s["ratio"]["authors/cache"] == {"median": 4.0, "min": 3.0, "max": 5.0}  # 50/10, 60/20, 100/25
    assert s["ratio"]["nocache/cache"] == {"median": 1.2, "min": 1.0, "max": 1.5}
    assert s["cache_metrics_identical"] is True
    assert s["train_s"]["authors"] == {"median": 31.0, "min": 26.0, "max": 51.0}  # 50/2 + 1, 60/2 + 1, 100/2 + 1
    assert "| authors | 60.0 [50.0–100.0] | 31.0 [26.0–51.0] |" in sweep.report(s, {"processor": "X", "cpus": 2, "jax": "j",
                                                                                   "python": "p"}, sweep.SweepConfig())
    sittings[1]["nocache"] = way(31, "n", valid_ntp=1.2500001)
    assert sweep.summarize(sittings)["cache_metrics_identical"] is False
    alone = [{k: v for k, v in x.items() if k != "authors"} for x in sittings]
    assert set(sweep.summarize(alone)["ratio"]) == {"nocache/cache"}


def test_bad_flags_are_refused(tmp_path):
    with pytest.raises(ValueError, match="repeats a value"):
        sweep.SweepConfig(coeffs=(1.0, 1.0)).validate()
    with pytest.raises(ValueError, match="--size.reg_coeff: not used by the sweep"):
        sweep.SweepConfig(size=versus.VersusConfig(reg_coeff=3.0)).validate()
    with pytest.raises(ValueError, match="no train_single.py there"):
        sweep.SweepConfig(reference=str(tmp_path)).validate()


TINY = versus.VersusConfig(d_model=16, n_layers=1, head_dim=8, seq_len=32, vocab_size=256, batch_size=4,
                           pretrain_tokens=4096, finetune_tokens=2048, valid_tokens=1024, eval_every_tokens=1024,
                           data_tokens=40_000, replay_batch=2, replay_buffer=2, finetune_lr=1e-2)


def test_the_one_process_sweep_ends_each_run_as_its_own_process_would(tmp_path):
    """The project's sweep in one process, reading the replay cache, logs per coefficient the metrics of a
    train-stage process per coefficient that samples its own replay."""
    data = versus.make_data(TINY, tmp_path / "data")
    checkpoint = versus.run_project(TINY, sys.executable, "pretrain", data, "", tmp_path / "pretrain")["checkpoint"]
    cfg = sweep.SweepConfig(coeffs=(0.3, 3.0), size=TINY)
    together = sweep.sweep_one_way(cfg, "cache", sys.executable, data, checkpoint, tmp_path / "together")
    assert [r["coeff"] for r in together["runs"]] == [0.3, 3.0]
    assert (Path(checkpoint) / replay_cache.CACHE_DIR).is_dir()  # the first run wrote the stream, the second read it
    apart = sweep.sweep_one_way(dataclasses.replace(cfg, project_process="run"), "nocache", sys.executable, data,
                                checkpoint, tmp_path / "apart")
    for one, alone in zip(together["runs"], apart["runs"], strict=True):
        config = json.loads((Path(one["checkpoint"]) / "config.json").read_text())
        assert config["config"]["reg"]["coeff"] == one["coeff"] and config["config"]["reg"]["synth"] is True
        assert one["steps"] == alone["steps"] == 2048 // (4 * 32)
        assert sweep.metrics_without_wall_clock(one["checkpoint"]) == sweep.metrics_without_wall_clock(alone["checkpoint"])
    assert together["runs"][0]["valid_ntp"] != together["runs"][1]["valid_ntp"]  # the coefficients differ in effect
    assert together["wall_s"] >= sum(r["wall_s"] for r in together["runs"]) - 1e-6


def test_bench_module_dispatches_sweep():
    out = subprocess.run([sys.executable, "-m", "forgetting.bench", "sweep", "--coeffs", "1", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--coeffs repeats a value" in out.stderr


def test_a_sweep_started_again_with_its_json_runs_only_the_missing_sittings(tmp_path, monkeypatch):
    calls: list[tuple] = []

    def fake_run(cfg, python, mode, data, load, folder):
        calls.append((mode, folder.parent.name if mode != "pretrain" else "pretrain"))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "valid_ntp": cfg.reg_coeff}) + "\n")
        return {"wall_s": 1.0, "checkpoint": str(folder), "train_seconds": 0.5,
                "valid_ntp": 1.0, "prev_ntp": 2.0}

    monkeypatch.setattr(versus, "run_project", fake_run)
    monkeypatch.setattr(versus, "make_data", lambda cfg, folder: DATA)
    out = tmp_path / "sweep.json"
    flags = ["--coeffs", "1", "2", "--project_process", "run", "--work", str(tmp_path / "w"), "--json", str(out)]
    first = sweep.main([*flags, "--sittings", "1"])
    assert [s["order"] for s in first["sittings"]] == [["cache", "nocache"]]
    assert json.loads(out.read_text())["pretrained"] == first["pretrained"]
    n_first = len(calls)
    assert calls.count(("pretrain", "pretrain")) == 1
    again = sweep.main([*flags, "--sittings", "3"])
    assert calls.count(("pretrain", "pretrain")) == 1  # the pretrained model's folder is still there: reused
    assert len(calls) - n_first == 2 * 2 * 2  # two more sittings of two ways of two coefficients
    assert [s["sitting"] for s in again["sittings"]] == [0, 1, 2]
    assert [s["order"] for s in again["sittings"]] == [["cache", "nocache"], ["nocache", "cache"], ["cache", "nocache"]]
    assert again["sittings"][0] == first["sittings"][0]  # kept as it was, not run again
    assert len(again["summary"]["revisions"]) == 3 and set(again["summary"]["ratio"]) == {"nocache/cache"}
    assert len(json.loads(out.read_text())["sittings"]) == 3
    sweep.main([*flags, "--sittings", "2"])  # fewer than the file holds: nothing runs, nothing is dropped
    assert len(calls) - n_first == 8 and len(json.loads(out.read_text())["sittings"]) == 3
    with pytest.raises(ValueError, match="other flags \\(--coeffs\\)"):
        sweep.main(["--coeffs", "1", "3", *flags[3:], "--sittings", "3"])
    saved = json.loads(out.read_text())
    saved["machine"]["processor"] = "another CPU"
    out.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="another machine"):
        sweep.main([*flags, "--sittings", "4"])


def test_revision_names_the_checkout():
    rev = sweep.revision()
    head = subprocess.run(["git", "-C", str(Path(sweep.__file__).resolve().parents[1]), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    assert rev.rstrip("+") == (head.stdout.strip() if head.returncode == 0 else "")


def test_a_sweep_goes_on_after_its_run_folders_are_gone(tmp_path, monkeypatch):
    """A kept --json outlives the machine's folders: a sitting keeps whether its cache and nocache metrics were
    identical, and one written before sittings kept it takes the summary of its time."""
    import shutil

    calls: list[str] = []

    def fake_run(cfg, python, mode, data, load, folder):
        calls.append(mode)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "valid_ntp": cfg.reg_coeff}) + "\n")
        return {"wall_s": 1.0, "checkpoint": str(folder), "train_seconds": 0.5, "valid_ntp": 1.0, "prev_ntp": 2.0}

    monkeypatch.setattr(versus, "run_project", fake_run)
    monkeypatch.setattr(versus, "make_data", lambda cfg, folder: DATA)
    out, work = tmp_path / "sweep.json", tmp_path / "w"
    flags = ["--coeffs", "1", "2", "--project_process", "run", "--work", str(work), "--json", str(out)]
    first = sweep.main([*flags, "--sittings", "1"])
    assert first["sittings"][0]["cache_metrics_identical"] is True
    for identical in (True, False):  # an older file: no per-sitting answer, its summary's of that time
        saved = json.loads(out.read_text())
        saved["sittings"] = saved["sittings"][:1]
        del saved["sittings"][0]["cache_metrics_identical"]
        saved["summary"]["cache_metrics_identical"] = identical
        out.write_text(json.dumps(saved))
        shutil.rmtree(work)  # the machine was reset: run folders and the pretrained model are gone
        pretrains = calls.count("pretrain")
        again = sweep.main([*flags, "--sittings", "2"])
        assert calls.count("pretrain") == pretrains + 1, "the pretrained model is made again"
        assert [s["cache_metrics_identical"] for s in again["sittings"]] == [identical, True]
        assert again["summary"]["cache_metrics_identical"] is identical
        assert json.loads(out.read_text())["sittings"][1]["cache_metrics_identical"] is True
