"""The train, evaluate and sample stages end to end on tiny generated data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from forgetting.core import checkpoint
from forgetting.core import model as model_lib
from forgetting.training import cli, runs
from forgetting.stages import evaluate, generate, sample, train
from forgetting.training.train_config import TrainConfig, replace

pytestmark = pytest.mark.slow

T = 32




def tiny(corpora, tmp_path, **changes) -> TrainConfig:
    cfg = TrainConfig()
    cfg = replace(cfg, **{
        "data.path": corpora[0], "data.num_tokens_valid": 2048, "model.d_model": 32, "model.n_layers": 1,
        "model.head_dim": 16, "model.seq_len": T, "model.dtype": "float32", "opt.batch_size": 8,
        "opt.warmup_tokens": 256, "opt.peak_lr": 3e-3, "stop.num_tokens_train": 8 * T * 12,
        "log.every_steps": 4, "log.progress": False, "run.dir": str(tmp_path / "runs"), **changes})
    return cfg


@pytest.fixture(scope="module")
def pretrained(corpora, tmp_path_factory) -> str:
    cfg = tiny(corpora, tmp_path_factory.mktemp("pre"), **{"stop.num_tokens_train": 8 * T * 24})
    return train.train(cfg)["run_dir"]


def test_refuses_bad_settings_before_compute(corpora, tmp_path):
    cases = {
        "no stop criterion": {"stop.num_tokens_train": 0},
        "two length criteria": {"stop.num_epochs": 1.0},
        "larger than the data": {"model.load_path": "x", "reg.method": "kl_pre", "reg.batch_size": 64},
        "fixed run length": {"stop.num_tokens_train": 0, "stop.target_loss": 1.0, "opt.lr_decay": "cosine"},
        "needs a frozen reference": {"reg.method": "kl_pre"},
        "must be one of": {"reg.method": "l2"},
        "= 0 rows of each batch": {"mix.path": "other.bin", "mix.coeff": 0.1},  # floor(0.1 * 8) = 0
        "= 0 rows": {"model.load_path": "x", "reg.method": "replace", "reg.coeff": 0.1, "reg.path": "old.bin"},
        "reference_hidden must be one of": {"reg.reference_hidden": "cache"},
        "applies to self-generated KL replay only": {"model.load_path": "x", "reg.method": "kl_pre", "reg.batch_size": 4,
                                                     "reg.reference_hidden": "sampler"},
    }
    for phrase, changes in cases.items():
        with pytest.raises(ValueError, match=phrase):
            tiny(corpora, tmp_path, **changes).validate()
    assert not (tmp_path / "runs").exists()


def test_cli_bad_flag_exits_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(TrainConfig, ["--data.path", "x.bin", "--opt.batch_size", "many"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.parse(TrainConfig, ["--data.path", "x.bin"])  # no stop criterion: refused by validate()
    assert "stop criterion" in capsys.readouterr().err


def test_pretrain_learns_and_rerun_is_reused(pretrained, corpora, tmp_path):
    out = Path(pretrained)
    rows = runs.read_metrics(out)
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 24
    assert rows[-1]["valid_ntp"] < rows[0]["valid_ntp"] - 0.5  # it learns
    done = json.loads((out / runs.DONE_FILE).read_text())
    assert done["stop_reason"] == "num_tokens_train" and done["steps"] == 24
    saved = json.loads((out / runs.CONFIG_FILE).read_text())
    assert saved["resolved"]["model"]["vocab_size"] == 64  # taken from the data sidecar
    cfg = cli.from_dict(TrainConfig, saved["config"])
    assert train.run_dir(cfg) == out
    again = train.train(cfg)
    assert again["status"] == "reused" and again["metrics"] == done


def test_killed_run_resumes_to_identical_numbers(corpora, tmp_path, monkeypatch):
    cfg = tiny(corpora, tmp_path)
    reference = train.train(replace(cfg, **{"run.dir": str(tmp_path / "uninterrupted")}))["metrics"]

    calls = {"n": 0}
    original = train._Trainer.save

    def dying_save(self, st, wall_time=None):
        original(self, st, wall_time)
        calls["n"] += 1
        if calls["n"] == 2:  # after the checkpoint at step 4
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(train._Trainer, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train._Trainer, "save", original)
    out = train.run_dir(cfg)
    assert not runs.is_done(out) and checkpoint.read_metadata(out / runs.STATE_FILE)["step"] == 4
    resumed = train.train(cfg)
    assert resumed["status"] == "finished"
    for key in ("valid_ntp", "valid_ntp_h2", "train_loss", "weight_norm", "step"):
        assert resumed["metrics"][key] == reference[key], key
    steps = [r["step"] for r in runs.read_metrics(out)]
    assert steps == sorted(set(steps))  # no duplicated rows after the resume


@pytest.mark.parametrize("method,synth", [("kl_pre", True), ("kl_pre", False), ("ntp_pre", True),
                                          ("kl_dwn", False), ("replace", False), ("none", False)])
def test_finetune_methods_measure_forgetting(pretrained, corpora, tmp_path, method, synth):
    coeff = 0.25 if method == "replace" else 1.0
    cfg = tiny(corpora, tmp_path, **{"data.path": corpora[1], "model.load_path": pretrained, "reg.method": method,
                                     "reg.synth": synth, "reg.coeff": coeff, "reg.batch_size": 4,
                                     "reg.buffer": 2, "stop.num_tokens_train": 8 * T * 4})
    final = train.train(cfg)["metrics"]
    first = runs.read_metrics(train.run_dir(cfg))[0]
    pre = json.loads((Path(pretrained) / runs.DONE_FILE).read_text())
    # Before any finetuning step θ = θ_ref: no KL, the old-data loss is the pretrained model's.
    assert first["valid_kl"] == pytest.approx(0.0, abs=1e-6) and first["prev_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["prev_ntp"] == pytest.approx(pre["valid_ntp"], rel=1e-5)
    assert final["valid_kl"] > 0 and final["dist_to_ref"] > 0 and final["rel_dist_to_ref"] > 0
    saved = json.loads((train.run_dir(cfg) / runs.CONFIG_FILE).read_text())
    assert saved["resolved"]["lineage_ids"] == [0, 1]


def test_self_generated_kl_takes_the_samplers_hidden_states(pretrained, corpora, tmp_path):
    """--reg.reference_hidden: `auto` resolves to the sampler's hidden states on one device (recorded in
    config.json). They equal an in-step reference forward's to float rounding (f32 here, about 1e-6), so
    the runs agree closely; not to 1e-6, because at the first step θ = ref makes the KL gradient pure
    rounding, which Adam scales up to a full step for the parameters only the KL reaches (embedding rows
    of tokens only the replay holds; this tiny run has no warm-up to damp it). A misaligned or wrong
    reference would put the KL of the first steps far off (it is 0.007 here)."""
    common = {"data.path": corpora[1], "model.load_path": pretrained, "reg.method": "kl_pre", "reg.synth": True,
              "reg.batch_size": 4, "reg.buffer": 2, "stop.num_tokens_train": 8 * T * 4}
    results = {}
    for choice in ("auto", "forward"):
        cfg = tiny(corpora, tmp_path / choice, **common, **{"reg.reference_hidden": choice})
        train.train(cfg)
        saved = json.loads((train.run_dir(cfg) / runs.CONFIG_FILE).read_text())
        results[saved["resolved"]["reference_hidden"]] = runs.read_metrics(train.run_dir(cfg))
    assert set(results) == {"sampler", "forward"}
    for got, want in zip(results["sampler"], results["forward"], strict=True):
        assert got.keys() == want.keys()
        for key in ("train_loss", "train_loss_reg", "valid_ntp", "valid_kl", "prev_kl"):
            if key in want:  # the step-0 row has no train losses
                assert got[key] == pytest.approx(want[key], rel=2e-2, abs=1e-7), key
    assert results["sampler"][-1]["train_loss_reg"] > 0


def test_lora_trains_adapters_only(pretrained, corpora, tmp_path):
    cfg = tiny(corpora, tmp_path, **{"data.path": corpora[1], "model.load_path": pretrained, "model.lora_rank": 2,
                                     "stop.num_tokens_train": 8 * T * 4})
    out = Path(train.train(cfg)["run_dir"])
    base = runs.load_run(pretrained).params
    tuned = runs.load_run(out).params
    assert np.array_equal(np.asarray(base["embed_in"]), np.asarray(tuned["embed_in"]))  # embeddings frozen
    delta = np.asarray(tuned["up"]) - np.asarray(base["up"])
    assert np.abs(delta).max() > 0
    assert np.linalg.matrix_rank(delta[0], tol=1e-6) <= 2  # a rank-2 update


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(corpora, tmp_path):
    cfg = tiny(corpora, tmp_path, **{"opt.peak_lr": 1e30, "opt.warmup_tokens": 0, "opt.weight_decay": 0.0})
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train.train(cfg)
    out = train.run_dir(cfg)
    assert not runs.is_done(out)
    assert checkpoint.read_metadata(out / runs.STATE_FILE)["step"] == 0  # the step-0 state is intact


def test_checkpoint_vocab_must_match_data(pretrained, tmp_path):
    other = tmp_path / "big.bin"
    generate.generate(generate.Config(corpus="synthetic", num_tokens=20_000, vocab_size=128, seq_len=T, out=str(other)))
    cfg = TrainConfig()
    cfg = replace(cfg, **{"data.path": str(other), "model.load_path": pretrained, "stop.num_tokens_train": 1000,
                          "run.dir": str(tmp_path), "log.progress": False})
    with pytest.raises(ValueError, match="vocab of 64"):
        train.train(cfg)


def test_authors_checkpoint_directory_loads(corpora, tmp_path):
    mc = model_lib.ModelConfig(vocab_size=64, d_model=32, n_layers=1, head_dim=16, seq_len=T, dtype="float32")
    params = jax.device_get(model_lib.init(mc, jax.random.key(7)))
    ckpt = tmp_path / "authors"
    ckpt.mkdir()
    np.savez(ckpt / "weights.npz", **params)
    (ckpt / "config.yaml").write_text(f"model:\n  D: 32\n  L: 1\n  H: 16\n  T: {T}\n  V: 64\n"
                                      f"data:\n  path: {corpora[0]}\n")
    loaded = runs.load_run(ckpt, dtype="float32")
    assert loaded.model_cfg == mc
    for k in params:
        assert np.array_equal(np.asarray(loaded.params[k]), params[k])
    cfg = tiny(corpora, tmp_path, **{"data.path": corpora[1], "model.load_path": str(ckpt),
                                     "stop.num_tokens_train": 8 * T * 2})
    final = train.train(cfg)["metrics"]
    assert "prev_ntp" in final  # the old data named in config.yaml is evaluated


def test_evaluate_and_sample_stages(pretrained, corpora, capsys):
    result = evaluate.main(["--model.load_path", pretrained, "--model.dtype", "float32"])
    done = json.loads((Path(pretrained) / runs.DONE_FILE).read_text())
    assert result["ntp"] == pytest.approx(done["valid_ntp"], rel=1e-5)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ntp"] == result["ntp"]
    samples = sample.sample(sample.SampleConfig(model=sample.SampleModelArgs(load_path=pretrained), num_samples=3,
                                                temperature=0.0))
    assert len(samples) == 3 and all(s["tokens"][0] == 0 and len(s["tokens"]) == T for s in samples)


SHARDED_SCRIPT = """
import json, sys
from forgetting.stages import train
from forgetting.training.train_config import TrainConfig, replace
import jax
out = {"n": jax.device_count()}
for mesh, changes in json.loads(sys.argv[1]).items():
    out[mesh] = train.train(replace(TrainConfig(), **changes))["metrics"]
print(json.dumps(out))
"""


def test_sharded_run_matches_single_device(corpora, tmp_path):
    base = {"data.path": corpora[0], "data.num_tokens_valid": 2048, "model.d_model": 32, "model.n_layers": 1,
            "model.head_dim": 16, "model.seq_len": T, "model.dtype": "float32", "opt.batch_size": 8,
            "opt.warmup_tokens": 256, "stop.num_tokens_train": 8 * T * 6, "log.every_steps": 3,
            "log.progress": False}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    # Same config (the mesh is not part of the run's identity), separate run directories.
    meshes = {mesh: dict(base, **{"run.mesh": mesh, "run.dir": str(tmp_path / (mesh or "single"))})
              for mesh in ("", "dp", "fsdp")}
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, json.dumps(meshes)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["n"] == 4
    for mesh in ("dp", "fsdp"):
        for key in ("valid_ntp", "train_loss", "weight_norm"):
            assert results[mesh][key] == pytest.approx(results[""][key], rel=1e-4), (mesh, key)


def test_extra_paths_that_are_the_runs_data_are_measured_once_per_eval(pretrained, corpora, tmp_path, monkeypatch):
    """--eval.extra_paths naming the training data and the old data (as the LM figures pass them) report the
    NTP of the valid and prev splits, which hold the same rows, without a pass of their own; another file
    still gets its own."""
    from forgetting.evals import evaluation

    other = tmp_path / "lang1_resampled.bin"  # other rows of the same language: a file of its own
    generate.generate(generate.Config(corpus="synthetic", language=1, num_tokens=40_000, vocab_size=64, seq_len=T,
                                      sample_seed=5, out=str(other)))
    passes = []
    real = evaluation.ntp_and_kl_split
    monkeypatch.setattr(evaluation, "ntp_and_kl_split", lambda *a, **k: passes.append(1) or real(*a, **k))
    cfg = tiny(corpora, tmp_path, **{"data.path": corpora[1], "model.load_path": pretrained, "reg.method": "none",
                                     "stop.num_tokens_train": 8 * T * 4,
                                     "eval.extra_paths": (corpora[0], corpora[1], str(other))})
    train.train(cfg)
    rows = runs.read_metrics(train.run_dir(cfg))
    stem0, stem1 = Path(corpora[0]).stem, Path(corpora[1]).stem
    for r in rows:
        assert r[f"ntp/{stem0}"] == r["prev_ntp"] and r[f"ntp/{stem1}"] == r["valid_ntp"]
        assert r[f"ntp/{other.stem}"] != r["valid_ntp"]
    assert len(passes) == 3 * len(rows), "valid, prev and the other file: one pass each per eval"
