"""The whole-run throughput changes keep the numbers: evals over kept splits with the reference's cached
hidden states, the replay prefetch thread, checkpoints on their own cadence, and `--model.dtype auto`."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from forgetting.core import data as data_lib
from forgetting.core import model as model_lib
from forgetting.core import step as step_lib
from forgetting.training import auto_dtype, replay, runs
from forgetting.evals import evaluation
from forgetting.stages import train

from test_train import T, tiny  # tests/: the train-stage tests' tiny run


@pytest.fixture(scope="module")
def model_and_data(corpora):
    cfg = model_lib.ModelConfig(d_model=32, n_layers=1, head_dim=16, seq_len=T, vocab_size=64, dtype="float32")
    params = model_lib.init(cfg, jax.random.key(0))
    ref = model_lib.init(cfg, jax.random.key(1))
    dataset = data_lib.SequenceDataset(data_lib.TokenFile(corpora[0]), T, num_tokens_valid=2048, split_seed=0)
    return cfg, params, ref, dataset


@pytest.mark.parametrize("batch_size", [8, 6], ids=["even", "short-last-batch"])
@pytest.mark.parametrize("kept_batches", [0, 3, 1000])
def test_kept_split_evals_match_the_plain_eval(model_and_data, batch_size, kept_batches):
    cfg, params, ref, dataset = model_and_data
    eval_step, hidden_fn = step_lib.make_eval_step(cfg), step_lib.make_hidden_fn(cfg)
    expected = evaluation.ntp_and_kl(eval_step, params, dataset, batch_size, ref)
    split = evaluation.EvalSplit(dataset, batch_size, 0, kept_batches * batch_size * T * 32 * 4)
    assert len(split.batches) == -(-dataset.num_valid // batch_size)
    assert {tokens.shape for tokens, _ in split.batches} == {(batch_size, T)}  # one shape: one compilation
    kept = split.ref_hidden(hidden_fn, ref)
    assert sum(h is not None for h in kept) == min(kept_batches, len(split.batches))
    for _ in range(2):  # the second eval reuses the kept hidden states
        got = evaluation.ntp_and_kl_split(eval_step, hidden_fn, params, split, ref)
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-7), k
    assert split.ref_hidden(hidden_fn, ref) is kept
    # θ identical to the reference: KL exactly 0, the reference never runs
    same = evaluation.ntp_and_kl_split(eval_step, hidden_fn, ref, split, ref, same_as_ref=True)
    plain = evaluation.ntp_and_kl(eval_step, ref, dataset, batch_size, ref)
    assert same["kl"] == 0.0 and same["ntp"] == pytest.approx(plain["ntp"], rel=1e-6)
    assert plain["kl"] == pytest.approx(0.0, abs=1e-6)


def test_replay_prefetch_hands_out_the_same_rows(model_and_data):
    cfg, _, ref, _ = model_and_data
    plain = replay.SelfGeneratedReplay(cfg, ref, [0, 1], rows=4, buffer=2, temperature=1.0, seed=3, prefetch=False)
    ahead = replay.SelfGeneratedReplay(cfg, ref, [0, 1], rows=4, buffer=2, temperature=1.0, seed=3, prefetch=True,
                                       last_index=2)
    try:
        for step in (0, 1, 2, 3, 4, 5, 0, 5):  # forward, then a jump back (a resume) and ahead again
            np.testing.assert_array_equal(plain.rows(step), ahead.rows(step))
        assert all(i <= 2 for i in ahead._pending)  # nothing past the last buffer is sampled
    finally:
        ahead.close()


@pytest.mark.slow
def test_checkpoints_on_their_own_cadence_resume_to_the_same_run(corpora, tmp_path, monkeypatch):
    reference = train.train(tiny(corpora, tmp_path / "reference"))
    saved_steps: list[int] = []
    original = train._Trainer.save

    def recording_save(self, st, wall_time=None):
        step = st.step
        saved_steps.append(step)
        original(self, st, wall_time)
        if step == 6 and len(saved_steps) == 3:
            raise KeyboardInterrupt("simulated kill between evals")

    monkeypatch.setattr(train._Trainer, "save", recording_save)
    cfg = tiny(corpora, tmp_path / "cadence", **{"log.checkpoint_every_steps": 3})
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    assert saved_steps == [0, 3, 6]  # step 0, then every 3 steps; the evals at 4 did not checkpoint
    out = train.run_dir(cfg)
    assert [r["step"] for r in runs.read_metrics(out)] == [0, 4]
    resumed = train.train(cfg)
    assert saved_steps == [0, 3, 6, 9, 12]
    wall = {"train_seconds", "wall_time", "tokens_per_s"}
    strip = lambda row: {k: v for k, v in row.items() if k not in wall}
    assert [strip(r) for r in runs.read_metrics(out)] == [strip(r) for r in runs.read_metrics(reference["run_dir"])]
    assert strip(resumed["metrics"]) == strip(reference["metrics"])
    # the cadence does not change the numbers, so it does not change the run's name either
    assert out.name == train.run_dir(tiny(corpora, tmp_path / "cadence")).name


def test_auto_dtype_is_measured_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETTING_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(auto_dtype, "_chosen", None)
    calls = []

    def fake_measure():
        calls.append(1)
        return {"bfloat16_gflops": 100.0, "float32_gflops": 200.0}

    monkeypatch.setattr(auto_dtype, "measure", fake_measure)
    first = auto_dtype.auto_dtype()
    assert first["dtype"] == "float32" and "at 100 GFLOP/s against f32 200" in first["why"]
    monkeypatch.setattr(auto_dtype, "_chosen", None)  # a new process: reads the kept choice
    monkeypatch.setattr(auto_dtype, "measure", lambda: pytest.fail("measured twice"))
    assert auto_dtype.auto_dtype() == first and calls == [1]
    assert auto_dtype.resolve("bfloat16") == "bfloat16"  # an explicit dtype is never probed
    # the rule: bf16 only when clearly faster
    assert auto_dtype.choose({"bfloat16_gflops": 415.0, "float32_gflops": 216.0}) == "bfloat16"
    assert auto_dtype.choose({"bfloat16_gflops": 163.0, "float32_gflops": 297.0}) == "float32"
    assert auto_dtype.choose({"bfloat16_gflops": 210.0, "float32_gflops": 200.0}) == "float32"


def test_auto_dtype_probe_takes_turns_so_a_burst_of_load_slows_both_dtypes():
    # a fake clock: bf16 calls take 1, f32 calls 2, every call 4x as long during a burst of other load that
    # covers the first 12 calls (as a finishing process or a compile in the background might)
    now, n = [0.0], [0]

    def call(cost):
        def run():
            n[0] += 1
            now[0] += cost * (4 if n[0] <= 12 else 1)
        return run

    best = auto_dtype.best_seconds({"bfloat16": call(1.0), "float32": call(2.0)}, 12, lambda: now[0])
    assert best == {"bfloat16": 1.0, "float32": 2.0} and n[0] == 24
    rates = {f"{k}_gflops": 1 / v for k, v in best.items()}
    assert auto_dtype.choose(rates) == "bfloat16"  # one dtype's calls after the other's: 1/4 against 1/2, float32


def test_a_choice_kept_by_an_older_probe_is_measured_again(tmp_path, monkeypatch):
    import json

    import jax

    monkeypatch.setenv("FORGETTING_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(auto_dtype, "_chosen", None)
    old_key = f"{auto_dtype.processor()} | cpu | jax {jax.__version__}"  # the key before the probe had a version
    (tmp_path / "auto_dtype.json").write_text(json.dumps({old_key: {"dtype": "float32", "why": "old probe"}}))
    monkeypatch.setattr(auto_dtype, "measure", lambda: {"bfloat16_gflops": 420.0, "float32_gflops": 215.0})
    assert auto_dtype.auto_dtype()["dtype"] == "bfloat16"
    kept = json.loads((tmp_path / "auto_dtype.json").read_text())
    assert kept[old_key]["why"] == "old probe" and len(kept) == 2


@pytest.mark.slow
def test_auto_dtype_run_records_its_choice_and_a_flag_wins(corpora, tmp_path, monkeypatch):
    monkeypatch.setattr(auto_dtype, "_chosen", {"dtype": "float32", "why": "auto on CPU (test): float32"})
    cfg = tiny(corpora, tmp_path, **{"model.dtype": "auto", "stop.num_tokens_train": 8 * T * 2})
    out = train.run_dir(cfg)
    result = train.train(cfg)
    assert result["run_dir"] == str(out)
    saved = json.loads((out / runs.CONFIG_FILE).read_text())
    assert saved["config"]["model"]["dtype"] == "float32"
    assert saved["dtype_choice"] == {"dtype": "float32", "why": "auto on CPU (test): float32"}
    # the same run as an explicit float32 one: same directory, reused
    explicit = tiny(corpora, tmp_path, **{"model.dtype": "float32", "stop.num_tokens_train": 8 * T * 2})
    assert train.run_dir(explicit) == out and train.train(explicit)["status"] == "reused"
    flag = tiny(corpora, tmp_path, **{"model.dtype": "bfloat16", "stop.num_tokens_train": 8 * T * 2})
    train.train(flag)
    saved = json.loads((train.run_dir(flag) / runs.CONFIG_FILE).read_text())
    assert saved["config"]["model"]["dtype"] == "bfloat16" and saved["dtype_choice"]["why"] == "--model.dtype given"
