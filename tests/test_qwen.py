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

from forgetting.core import backend, families, llama
from forgetting.formats import hf_checkpoint
from forgetting.training import runs
import numpy_reference  # (tests/)
from qwen_fixtures import write_qwen_checkpoint  # (tests/)

TOKENS = [3, 17, 250, 41, 5, 99, 128, 7, 300, 12, 64, 2]


def _numpy_logits(hf: dict, tensors: dict, **switches) -> np.ndarray:
    return numpy_reference.llama_logits(
        numpy_reference.gguf_names_of_hf(tensors), TOKENS, n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"], theta=hf["rope_theta"],
        eps=hf["rms_norm_eps"], rope_layout="half", **switches)


def _our_logits(path, impl: str) -> tuple[object, np.ndarray]:
    loaded = runs.load_run(path, dtype="float32")
    cfg = backend.with_numerics(loaded.model_cfg, impl=impl)
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
    cfg = backend.with_numerics(loaded.model_cfg, impl="reference")
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
    # Qwen tensors under a Llama config.json: unused tensors, refused by name
    ("qwen3", {"model_type": "llama", "sliding_window": None}, "q_norm"),
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


@pytest.mark.slow
def test_instruct_paper_scale_takes_a_qwen3_directory(tmp_path, capsys):
    """`experiments/instruct.py --scale paper --hf_path QWEN3_DIR --list` prints finetunes loading that
    directory; one of them, cut to a few tiny steps, trains with KL on BOS-prompted self-generated replay."""
    import importlib
    import shlex

    from forgetting.experiments import framework
    from forgetting.training import cli
    from forgetting.stages import tokenize_hf, train
    from forgetting.training.train_config import TrainConfig

    ckpt = tmp_path / "qwen3"
    hf, _ = write_qwen_checkpoint(ckpt, "qwen3", tie=True)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"module m{i}(input a); assign b = a + {i}; endmodule"}) + "\n"
                            for i in range(60)))
    domain = tmp_path / "domain.bin"
    tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(docs),), hf_tokenizer=str(ckpt), out=str(domain)))
    mod = importlib.import_module("forgetting.experiments.instruct")
    argv = ["--list", "--scale", "paper", "--out", str(tmp_path / "exp"), "--hf_path", str(ckpt),
            "--domain_path", str(domain), "--verilog_source", "", "--old_path", str(domain)]
    framework.main(mod.Knobs, mod.PRESETS, mod.runs, mod.summarize, mod.plot, doc=mod.__doc__, argv=argv,
                   progress=False)
    lines = capsys.readouterr().out.splitlines()
    cfgs = [cli.parse(TrainConfig, shlex.split(line)[3:]) for line in lines
            if line.startswith("python -m forgetting.stages.train ")]
    assert len(cfgs) == 13 and all(c.model.load_path == str(ckpt) for c in cfgs)  # none + 2 x 2 x 3 coeffs
    assert any("--only eval_start" in line for line in lines)
    cfg = next(c for c in cfgs if c.reg.method == "kl_pre" and c.reg.synth)
    seq = 16
    cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, dir=str(tmp_path / "runs")),
        model=dataclasses.replace(cfg.model, seq_len=seq, dtype="float32"),
        data=dataclasses.replace(cfg.data, num_tokens_valid=4 * seq),
        reg=dataclasses.replace(cfg.reg, batch_size=2, buffer=2),
        opt=dataclasses.replace(cfg.opt, batch_size=4, warmup_tokens=seq),
        stop=dataclasses.replace(cfg.stop, num_epochs=0.0, num_tokens_train=2 * 4 * seq),
        eval=dataclasses.replace(cfg.eval, max_tokens=4 * seq),
        log=dataclasses.replace(cfg.log, every_steps=2))
    cfg.validate()
    result = train.train(cfg)
    assert result["metrics"]["steps"] == 2 and np.isfinite(result["metrics"]["valid_ntp"])
    assert runs.read_run_config(result["run_dir"])["resolved"]["model"]["family"] == "qwen3"
    assert runs.load_run(result["run_dir"]).model_cfg.bos_id == hf["bos_token_id"]  # the replay prompt
    # the benchmark stage scores the finetuned Qwen3 run (tokenizer found through loaded_from)
    from forgetting.stages import evaluate_benchmarks as eb

    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "subject": "math", "answer": i % 4,
                                        "choices": [str(2 * i + d) for d in range(4)]}) + "\n" for i in range(3)))
    bench = eb.evaluate(eb.BenchConfig(model=eb.BenchModelArgs(load_path=result["run_dir"], dtype="float32", seq_len=64),
                                       domain=eb.DomainArgs(path=str(domain), seq_len=seq, num_tokens_valid=4 * seq),
                                       mmlu=str(mmlu)))
    assert 0.0 <= bench["mmlu"] <= 1.0 and 0.0 <= bench["domain_token_acc"] <= 1.0
