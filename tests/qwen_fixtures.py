"""Tiny random Qwen2 / Qwen3 checkpoints written in the Hugging Face layout by the tests themselves:
config.json as transformers writes it, model.safetensors through the `safetensors` package with HF tensor
names, and a byte-level BPE tokenizer.json trained with the `tokenizers` library (no project code)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b",
          "Forgetting happens when a model is finetuned on new data."] * 10
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(directory: Path, vocab_size: int) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json (Qwen's: no BOS, EOS <|im_end|>); returns the special ids."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(directory / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "tokenizer_class": "Qwen2Tokenizer"}))
    return ids


def qwen_config(model_type: str, *, tie: bool, vocab_size: int = 320, **overrides) -> dict:
    hf = {"architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "Qwen3ForCausalLM"],
          "model_type": model_type, "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48, "hidden_act": "silu",
          "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tie,
          "use_sliding_window": False, "sliding_window": 32, "max_window_layers": 2, "attention_dropout": 0.0,
          "initializer_range": 0.02, "torch_dtype": "float32", "use_cache": True}
    if model_type == "qwen3":
        hf |= {"head_dim": 16, "attention_bias": False}  # head_dim != hidden_size / heads, as in Qwen3
    return hf | overrides


def random_hf_tensors(hf: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named f32 tensors [out, in]; biases and q/k-norm gains large enough to matter."""
    rng = np.random.default_rng(seed)
    V, D, F = hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"]
    H, K = hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = hf.get("head_dim") or D // H

    def n(*shape, std=0.2):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    w = {"model.embed_tokens.weight": n(V, D, std=0.5), "model.norm.weight": 1 + n(D)}
    if not hf["tie_word_embeddings"]:
        w["lm_head.weight"] = n(V, D, std=0.5)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + n(D), p + "post_attention_layernorm.weight": 1 + n(D),
              p + "self_attn.q_proj.weight": n(H * hd, D), p + "self_attn.k_proj.weight": n(K * hd, D),
              p + "self_attn.v_proj.weight": n(K * hd, D), p + "self_attn.o_proj.weight": n(D, H * hd),
              p + "mlp.gate_proj.weight": n(F, D), p + "mlp.up_proj.weight": n(F, D),
              p + "mlp.down_proj.weight": n(D, F)}
        if hf["model_type"] == "qwen2":
            w |= {p + "self_attn.q_proj.bias": n(H * hd, std=1.0), p + "self_attn.k_proj.bias": n(K * hd, std=1.0),
                  p + "self_attn.v_proj.bias": n(K * hd, std=1.0)}
        if hf["model_type"] == "qwen3":
            w |= {p + "self_attn.q_norm.weight": 1 + n(hd, std=0.5), p + "self_attn.k_norm.weight": 1 + n(hd, std=0.5)}
    return w


def write_qwen_checkpoint(directory: Path, model_type: str, *, tie: bool, seed: int = 0,
                          **overrides) -> tuple[dict, dict[str, np.ndarray]]:
    """Writes config.json, model.safetensors, tokenizer files; returns (config dict, tensors)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    hf = qwen_config(model_type, tie=tie, **overrides)
    ids = write_tokenizer(directory, hf["vocab_size"])
    hf |= {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    (directory / "config.json").write_text(json.dumps(hf))
    tensors = random_hf_tensors(hf, seed)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return hf, tensors
