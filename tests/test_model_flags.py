"""The train stage's `--model.*` section is the model config itself: every ModelConfig field is a flag,
plus load_path / lora_rank, with vocab_size 0 meaning "from the data"."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from forgetting.core import backend, llama
from forgetting.core import model as model_lib
from forgetting.training import cli, runs, train_setup
from forgetting.training import train_config as tc

REQUIRED = ["--data.path", "x.bin", "--stop.num_tokens_train", "100"]

# A non-default value for every ModelConfig field (a new field without one fails the test below).
NON_DEFAULT = {"vocab_size": 100, "d_model": 64, "n_layers": 3, "head_dim": 32, "seq_len": 32, "mlp_ratio": 2,
               "rope_base": 500.0, "norm_eps": 1e-5, "dtype": "float32", "impl": "reference", "remat": "block",
               "kv_cache_dtype": "bfloat16", "unroll": 2, "loss_chunk": 4096, "streams": 1}


def test_every_model_config_field_is_a_flag():
    # ModelConfig = its architecture fields + one `numerics` sub-config; both are flat --model.* flags
    numerics_fields = {f.name for f in dataclasses.fields(backend.Numerics)}
    fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)} - {"numerics"} | numerics_fields
    assert fields == set(NON_DEFAULT)
    argv = REQUIRED + [a for name, v in NON_DEFAULT.items() for a in (f"--model.{name}", str(v))]
    cfg = cli.parse(tc.TrainConfig, argv)
    shape = {k: v for k, v in NON_DEFAULT.items() if k not in numerics_fields}
    numerics = backend.Numerics(**{k: v for k, v in NON_DEFAULT.items() if k in numerics_fields})
    assert cfg.model.model_config() == model_lib.ModelConfig(**shape, numerics=numerics)
    assert cli.parse(tc.TrainConfig, cli.to_argv(cfg)) == cfg  # flags round-trip


def test_vocab_from_data_and_load_fields():
    cfg = cli.parse(tc.TrainConfig, REQUIRED + ["--model.load_path", "runs/x", "--model.lora_rank", "4"])
    assert cfg.model.vocab_size == 0 and cfg.model.load_path == "runs/x" and cfg.model.lora_rank == 4
    assert cfg.model.model_config(vocab_size=123).vocab_size == 123
    assert tc.replace(cfg, **{"model.vocab_size": 50}).model.model_config(vocab_size=123).vocab_size == 50


@pytest.mark.parametrize("flag, value, message", [
    ("--model.impl", "cuda", "--model.impl must be one of"),
    ("--model.remat", "all", "--model.remat must be one of"),
    ("--model.head_dim", "7", "--model.head_dim 7 must be even"),
    ("--model.head_dim", "512", "must be at least --model.head_dim 512"),
    ("--model.vocab_size", "-1", "--model.vocab_size must be >= 0"),
])
def test_bad_model_flags_are_one_line_errors(flag, value, message):
    cfg = cli.parse(tc.TrainConfig, REQUIRED)
    bad = tc.replace(cfg, **{flag[2:]: type(getattr(cfg.model, flag.split(".")[1]))(value)})
    with pytest.raises(ValueError, match=message):
        bad.validate()


def test_numerics_flags_apply_to_a_loaded_model():
    loaded_cfg = llama.LlamaConfig(dtype="float32")
    loaded = runs.LoadedRun(Path("ckpt"), loaded_cfg, {}, "", 0, 0, (0,), None)
    cfg = cli.parse(tc.TrainConfig, REQUIRED + ["--model.load_path", "ckpt", "--model.remat", "block",
                                                "--model.impl", "reference", "--model.d_model", "64"])
    # (--model.d_model 64 is the checkpoint's own: a contradicting value is refused, issue 28 / test_inputs.py)
    got = train_setup._model_config(cfg, loaded, 0)
    assert got == backend.with_numerics(loaded_cfg, remat="block", impl="reference")  # shape from the checkpoint
