"""`python -m forgetting.stages.export --format hf`: a finetuned run (LoRA merged) or a loadable checkpoint
written back in the Hugging Face layout. Export then reload gives identical logits; the exported
tokenizer.json encodes as the source's with the `tokenizers` library; config.json keeps rope scaling."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers", reason="needs the hf extra")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="needs the hf extra")

from forgetting.core import backend, families, llama  # noqa: E402
from forgetting.stages import export  # noqa: E402
from forgetting.formats import hf_checkpoint  # noqa: E402
from forgetting.training import runs  # noqa: E402
from qwen_fixtures import CHAT_TEMPLATE, write_qwen_checkpoint  # noqa: E402 (tests/)

TEXT = "The quick brown fox <|im_start|> jumps over 123 lazy dogs; def add(a, b): return a + b"
TOKENS = [3, 17, 250, 41, 5, 99, 128, 7, 200, 12]


def _logits(cfg, params, tokens=TOKENS) -> np.ndarray:
    cfg = backend.with_numerics(dataclasses.replace(cfg, dtype="float32"), impl="reference")
    return np.asarray(families.forward(cfg, params, jnp.asarray([tokens], jnp.int32))[0])


def _finetune(tmp_path, source, lora_rank: int) -> str:
    from forgetting.stages import tokenize_hf, train
    from forgetting.training import train_config as tc

    seq = 16
    src = tmp_path / "text.jsonl"
    src.write_text("".join(json.dumps({"text": f"the fox {i} jumps over the dog {i * 7}"}) + "\n" for i in range(80)))
    data = tmp_path / "text.bin"
    tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(source), out=str(data)))
    cfg = tc.TrainConfig(
        run=tc.RunConfig(dir=str(tmp_path / "runs"), name="ft"),
        data=tc.DataConfig(path=str(data), num_tokens_valid=4 * seq),
        model=tc.ModelArgs(load_path=str(source), seq_len=seq, dtype="float32", lora_rank=lora_rank),
        opt=tc.OptConfig(batch_size=4, peak_lr=3e-2, warmup_tokens=seq),
        stop=tc.StopConfig(num_tokens_train=2 * 4 * seq),
        log=tc.LogConfig(every_steps=2, progress=False))
    cfg.validate()
    return train.train(cfg)["run_dir"]


@pytest.mark.slow
def test_lora_finetuned_qwen3_run_exports_and_reloads(tmp_path):
    src_hf, src_tensors = write_qwen_checkpoint(tmp_path / "qwen3", "qwen3", tie=False)
    run_dir = _finetune(tmp_path, tmp_path / "qwen3", lora_rank=2)
    out = tmp_path / "exported"
    result = export.main(["--load_path", run_dir, "--out", str(out), "--format", "hf"])
    assert result["family"] == "qwen3" and result["tokenizer_from"] == str(tmp_path / "qwen3")
    run = runs.load_run(run_dir)
    cfg, params, tok = hf_checkpoint.load_hf(out, dtype="float32")
    assert type(cfg) is type(run.model_cfg) and cfg.head_dim == 16
    np.testing.assert_array_equal(_logits(cfg, params), _logits(run.model_cfg, run.params))
    # the LoRA update is in the exported weights (merged): attention/MLP matrices moved, embeddings did not
    exported = safetensors_numpy.load_file(str(out / "model.safetensors"))
    assert set(exported) == set(src_tensors)
    moved = [k for k in src_tensors if not np.array_equal(exported[k], src_tensors[k])]
    assert moved and all(("proj" in k) for k in moved)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "qwen3" and hf["architectures"] == ["Qwen3ForCausalLM"]
    assert hf["max_position_embeddings"] == src_hf["max_position_embeddings"]
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (src_hf["bos_token_id"], src_hf["eos_token_id"])
    # tokenizer: same ids from the library on both files, chat template and specials kept
    lib_src = tokenizers.Tokenizer.from_file(str(tmp_path / "qwen3" / "tokenizer.json"))
    lib_out = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert lib_out.encode(TEXT).ids == lib_src.encode(TEXT).ids and len(lib_src.encode(TEXT).ids) > 10
    assert tok.encode(TEXT) == hf_checkpoint.load_tokenizer(tmp_path / "qwen3").encode(TEXT)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE and tok_config["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}])
def test_llama_checkpoint_round_trips_with_rope_scaling(tmp_path, scaling):
    from standin_checkpoint import tiny_config, write_tiny_hf_checkpoint

    cfg = tiny_config(tie_embeddings=False, dtype="float32",
                      rope_scaling=None if scaling is None else llama.RopeScaling.from_hf(scaling, 128))
    params = llama.init(cfg, jax.random.key(3))
    params = {k: v + 0.1 * jax.random.normal(jax.random.key(4), v.shape) for k, v in params.items()}  # norms != 1
    cfg = write_tiny_hf_checkpoint(tmp_path / "src", cfg, params=params)
    out = tmp_path / "out"
    export.export(export.ExportConfig(load_path=str(tmp_path / "src"), out=str(out), format="hf", dtype="bfloat16"))
    hf = json.loads((out / "config.json").read_text())
    assert hf["torch_dtype"] == "bfloat16"
    assert hf["rope_scaling"] == (None if scaling is None else llama.RopeScaling.from_hf(scaling, 128).to_hf())
    again, again_params, tok = hf_checkpoint.load_hf(out, dtype="float32")
    src_cfg, src_params, src_tok = hf_checkpoint.load_hf(tmp_path / "src", dtype="float32")
    assert again == src_cfg  # every field, rope scaling included
    rounded = {k: jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32) for k, v in src_params.items()}
    np.testing.assert_array_equal(_logits(again, again_params), _logits(src_cfg, rounded))
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "src" / "tokenizer.model").read_bytes()
    assert tok.encode(TEXT) == src_tok.encode(TEXT)


def test_refusals(tmp_path):
    write_qwen_checkpoint(tmp_path / "q", "qwen2", tie=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds model-00001-of-00002.safetensors"):
        export.export(export.ExportConfig(load_path=str(tmp_path / "q"), out=str(out), format="hf"))
    with pytest.raises(ValueError, match="--dtype"):
        export.export(export.ExportConfig(load_path=str(tmp_path / "q"), out=str(out), format="hf", dtype="int8"))
    # a finished paper-model run has no HF layout (no family module with to_hf_config)
    from forgetting.core import model as model_lib

    with pytest.raises(ValueError, match="has no Hugging Face layout"):
        hf_checkpoint.module_of_config(model_lib.ModelConfig())


def test_qwen2_export_reloads_identically(tmp_path):
    hf, _ = write_qwen_checkpoint(tmp_path / "q", "qwen2", tie=True)
    out = tmp_path / "out"
    export.export(export.ExportConfig(load_path=str(tmp_path / "q"), out=str(out), format="hf"))
    a = hf_checkpoint.load_hf(tmp_path / "q", dtype="float32")
    b = hf_checkpoint.load_hf(out, dtype="float32")
    assert a[0] == b[0] and json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    np.testing.assert_array_equal(_logits(a[0], a[1]), _logits(b[0], b[1]))
    assert not (out / "lm_head.weight").exists()
    assert "lm_head.weight" not in safetensors_numpy.load_file(str(out / "model.safetensors"))
