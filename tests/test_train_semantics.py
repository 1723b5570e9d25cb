"""Train-stage semantics a user porting from the authors' code meets: plain SGD, early stopping after MORE
than N evals without improvement, the training-time clock, and the metrics the authors log."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from forgetting.training import runs

from forgetting.stages import train
from forgetting.training.train_config import OptConfig, TrainConfig, replace
from forgetting.training.train_setup import optimizer_for

from conftest import CORPUS_TOKENS  # tests/: the shared synthetic corpora

T = 32




def tiny(corpora, tmp_path, **changes) -> TrainConfig:
    return replace(TrainConfig(), **{
        "data.path": corpora[0], "data.num_tokens_valid": 1024, "model.d_model": 32, "model.n_layers": 1,
        "model.head_dim": 16, "model.seq_len": T, "model.dtype": "float32", "opt.batch_size": 8,
        "opt.warmup_tokens": 0, "opt.peak_lr": 3e-3, "stop.num_tokens_train": 8 * T * 8,
        "log.every_steps": 2, "log.progress": False, "run.dir": str(tmp_path / "runs"), **changes})


def test_sgd_is_plain_sgd_whatever_the_adamw_settings():
    opt = optimizer_for(OptConfig(optimizer="sgd", b1=0.9, weight_decay=0.02), lambda step: 0.5)
    p = {"w": jnp.array([1.0, -2.0])}
    state = opt.init(p)
    for g in (jnp.array([1.0, 1.0]), jnp.array([0.0, 4.0])):  # the 2nd step would show momentum
        updates, state = opt.update({"w": g}, state, p)
        assert np.allclose(np.asarray(updates["w"]), -0.5 * np.asarray(g))  # no decay of p, no memory of g


@pytest.mark.slow
def test_early_stop_after_more_than_n_evals_without_improvement(corpora, tmp_path):
    # LR 1e-30 (LR must be positive): updates vanish below f32 rounding, so the loss never changes. As the
    # authors', the first eval after training starts (step 2) sets the best; evals at steps 4, 6, 8 bring
    # nothing new, and the 3rd of them is more than N=2: stop at step 8.
    cfg = tiny(corpora, tmp_path, **{"opt.peak_lr": 1e-30, "stop.num_tokens_train": 8 * T * 40,
                                     "stop.early_stop_evals": 2})
    final = train.train(cfg)["metrics"]
    assert final["stop_reason"] == "early_stop"
    assert final["steps"] == 4 * 2


@pytest.mark.slow
def test_train_seconds_leave_out_the_first_steps(corpora, tmp_path):
    short = train.train(tiny(corpora, tmp_path, **{"stop.num_tokens_train": 8 * T * train.UNTIMED_STEPS}))
    assert short["metrics"]["train_seconds"] == 0.0
    longer = train.train(tiny(corpora, tmp_path, **{"stop.num_tokens_train": 8 * T * (train.UNTIMED_STEPS + 3)}))
    assert longer["metrics"]["train_seconds"] > 0.0


@pytest.mark.slow
def test_authors_metrics_in_pretraining_and_finetuning(corpora, tmp_path):
    pre = train.train(tiny(corpora, tmp_path, **{"mix.path": corpora[1], "mix.coeff": 0.25}))
    rows = runs.read_metrics(pre["run_dir"])
    num_train = CORPUS_TOKENS // T - 1024 // T
    for r in rows:
        assert r["epoch"] == pytest.approx(r["step"] * 8 / num_train)
        assert "mix_ntp" in r and "mix_ntp_h2" in r  # the mixture's dataset, without extra flags
    assert rows[0]["valid_kl"] == pytest.approx(0.0, abs=1e-6)  # KL to the initialization, at the init
    assert rows[-1]["valid_kl"] > 0.05
    for r in rows[1:]:
        assert r["train_loss_reg"] == 0.0 and r["train_loss_ntp"] == pytest.approx(r["train_loss"], rel=1e-6)
    fine = train.train(tiny(corpora, tmp_path, **{
        "data.path": corpora[1], "model.load_path": pre["run_dir"], "reg.method": "kl_pre", "reg.coeff": 3.0,
        "reg.batch_size": 4, "stop.num_tokens_train": 8 * T * 4}))
    rows = runs.read_metrics(fine["run_dir"])
    for r in rows[1:]:
        assert r["train_loss_reg"] > 0.0
        assert r["train_loss"] == pytest.approx(r["train_loss_ntp"] + 3.0 * r["train_loss_reg"], rel=1e-5)
