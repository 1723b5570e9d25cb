"""Qwen2/2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm per head, head_dim from config) loaded from tiny HF
directories written by the tests (tests/qwen_fixtures.py): logits equal an independent float64 NumPy
forward (tests/numpy_reference.py) on both implementations; fields that would change the numbers and are
not implemented are refused."""
from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="needs the hf extra")
pytest.importorskip("safetensors", reason="needs the hf extra")

from forgetting.core import families, llama  # noqa: E402
from forgetting.stages import hf_checkpoint, runs  # noqa: E402
import numpy_reference  # noqa: E402 (tests/)
from qwen_fixtures import write_qwen_checkpoint  # noqa: E402 (tests/)

TOKENS = [3, 17, 250, 41, 5, 99, 128, 7, 300, 12, 64, 2]


def _numpy_logits(hf: dict, tensors: dict, **switches) -> np.ndarray:
    return numpy_reference.llama_logits(
        numpy_reference.gguf_names_of_hf(tensors), TOKENS, n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"], theta=hf["rope_theta"],
        eps=hf["rms_norm_eps"], rope_layout="half", **switches)


def _our_logits(path, impl: str) -> tuple[object, np.ndarray]:
    loaded = runs.load_run(path, dtype="float32")
    cfg = dataclasses.replace(loaded.model_cfg, impl=impl)
    logits = families.forward(cfg, loaded.params, jnp.asarray([TOKENS], jnp.int32))
    return loaded.model_cfg, np.asarray(logits[0], np.float64)


@pytest.mark.parametrize("model_type,tie", [("qwen2", True), ("qwen2", False), ("qwen3", True), ("qwen3", False)])
@pytest.mark.parametrize("impl", ["reference", "xla_cpu"])
def test_logits_match_numpy(tmp_path, model_type, tie, impl):
    hf, tensors = write_qwen_checkpoint(tmp_path / "ckpt", model_type, tie=tie)
    cfg, ours = _our_logits(tmp_path / "ckpt", impl)
    assert families.of(cfg).name == model_type
    switches = {"qkv_bias": model_type == "qwen2", "qk_norm": model_type == "qwen3"}
    expected = _numpy_logits(hf, tensors, **switches)
    np.testing.assert_allclose(ours, expected, rtol=2e-4, atol=2e-4)
    # the switch matters on this checkpoint: the plain-Llama numbers are far off
    plain = _numpy_logits(hf, tensors)
    assert np.abs(plain - expected).max() > 0.05


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_cache_decoding_and_run_record(tmp_path, model_type):
    write_qwen_checkpoint(tmp_path / "ckpt", model_type, tie=True)
    loaded = runs.load_run(tmp_path / "ckpt", dtype="float32")
    cfg = dataclasses.replace(loaded.model_cfg, impl="reference")
    tokens = jnp.asarray([TOKENS], jnp.int32)
    full = families.forward(cfg, loaded.params, tokens)
    cache = families.init_cache(cfg, 1)
    steps = []
    for t in range(len(TOKENS)):
        logits, cache = families.forward(cfg, loaded.params, tokens[:, t:t + 1], cache, t)
        steps.append(logits[0, 0])
    np.testing.assert_allclose(np.stack(steps), full[0], rtol=1e-4, atol=1e-4)
    record = runs.model_to_dict(cfg)
    assert record["family"] == model_type
    assert runs.model_config_from_dict(json.loads(json.dumps(record))) == cfg
    # Qwen has no BOS token: tokenizer_config.json's bos_token is null, config.json's id is used
    assert cfg.eos_id != cfg.bos_id


def _write_config(path, **change):
    hf = json.loads((path / "config.json").read_text()) | change
    (path / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("model_type,change,message", [
    ("qwen2", {"use_sliding_window": True}, "sliding_window"),
    ("qwen3", {"use_sliding_window": True}, "sliding_window"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen2", {"mlp_bias": True}, "mlp_bias"),
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3", {"model_type": "llama", "sliding_window": None}, "q_norm"),  # Qwen3 tensors under a Llama config: unused, refused
    ("qwen2", {"model_type": "llama", "sliding_window": None}, "q_proj.bias"),
    ("qwen2", {"model_type": "qwen2_moe"}, "model_type"),
])
def test_refuses_what_it_does_not_implement(tmp_path, model_type, change, message):
    write_qwen_checkpoint(tmp_path / "ckpt", model_type, tie=True)
    _write_config(tmp_path / "ckpt", **change)
    with pytest.raises(ValueError, match=message):
        hf_checkpoint.load_hf(tmp_path / "ckpt", dtype="float32")


def test_qwen3_head_dim_from_config_and_qwen_defaults(tmp_path):
    write_qwen_checkpoint(tmp_path / "ckpt", "qwen3", tie=False)
    cfg, _, _ = hf_checkpoint.load_hf(tmp_path / "ckpt", dtype="float32")
    assert (cfg.head_dim, cfg.d_model, cfg.n_heads) == (16, 32, 4)
    assert set(llama.param_specs(cfg)) >= {"q_norm", "k_norm", "lm_head"} and "bq" not in llama.param_specs(cfg)
