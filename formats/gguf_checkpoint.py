"""llama.cpp GGUF checkpoints (Llama architecture) read with the `gguf` package (the `gguf` extra).

    cfg, params, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")     # also: --model.load_path model.gguf
    tok = load_gguf_tokenizer("model.gguf")                              # also: tokenize_hf --hf_tokenizer model.gguf
    template = gguf_chat_template("model.gguf")                          # tokenizer.chat_template, or None

Weights: every tensor is dequantized by `gguf.quants.dequantize` (f32, f16, bf16, Q8_0, Q4_0, Q4_1, Q4_K,
Q6_K; other types are refused by name) into `param_dtype`, one stacked leaf at a time. llama.cpp's
converter permutes the rows of q and k so that RoPE rotates adjacent pairs (GPT-J style); the permutation is
undone here to get Hugging Face's rotate-half layout that `core.llama` uses:

    GGUF row (head h, pair j, member m) = HF row (head h, member m, pair j)    [rows = h * hd + ...]

The config is rebuilt from the `llama.*` metadata as a HF config.json dict and goes through
`llama.from_hf_config`, so the same fields are refused (and a GGUF-only field such as the Llama-3
`rope_freqs` tensor or an expert count is refused here by name).

Tokenizer: `formats.hf_tokenizer.load_gguf_tokenizer` (byte-level BPE from the metadata, built as a
tokenizer.json); the file reader is `formats.gguf_file`. Both sit below this module: no import cycle.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np

from forgetting.core import llama
from forgetting.formats import hf_checkpoint, hf_tokenizer
# The reader and the GGUF tokenizer live below this module (no import cycle); these names stay importable here.
from forgetting.formats.gguf_file import SUPPORTED_TENSOR_TYPES, GGUFFile, open_gguf  # noqa: F401
from forgetting.formats.hf_tokenizer import PRE_TOKENIZERS, load_gguf_tokenizer, tokenizer_json_from_gguf  # noqa: F401

def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: [n_heads*hd, D] interleaved pairs -> HF rotate-half rows."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_config_from_gguf(g: GGUFFile) -> dict:
    """The `llama.*` metadata as a HF config.json dict (then validated by llama.from_hf_config)."""
    arch = g.require("general.architecture")
    if arch != "llama":
        raise ValueError(f"{g.path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    for key in ("llama.expert_count", "llama.attention.sliding_window"):
        if g.get(key):
            raise ValueError(f"{g.path}: {key}={g.get(key)} is not implemented")
    if "rope_freqs.weight" in g.tensors:
        raise ValueError(f"{g.path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 scaling in GGUF) "
                         "are not implemented; load the HF checkpoint directory instead")
    n_heads = int(g.require("llama.attention.head_count"))
    d_model = int(g.require("llama.embedding_length"))
    head_dim = int(g.get("llama.attention.key_length") or d_model // n_heads)
    rope_dim = g.get("llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"{g.path}: llama.rope.dimension_count={rope_dim} != head_dim {head_dim} (partial rotary) "
                         "is not implemented")
    tokens = g.get("tokenizer.ggml.tokens")
    hf: dict[str, Any] = {
        "model_type": "llama", "hidden_act": "silu", "hidden_size": d_model, "head_dim": head_dim,
        "intermediate_size": int(g.require("llama.feed_forward_length")),
        "num_hidden_layers": int(g.require("llama.block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": int(g.get("llama.attention.head_count_kv") or n_heads),
        "vocab_size": int(g.get("llama.vocab_size") or len(tokens or [])),
        "rms_norm_eps": float(g.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g.get("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"), "eos_token_id": g.get("tokenizer.ggml.eos_token_id"),
    }
    scaling_type = g.get("llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling: dict[str, Any] = {"rope_type": scaling_type, "factor": float(g.require("llama.rope.scaling.factor"))}
        if g.get("llama.rope.scaling.original_context_length") is not None and scaling_type == "yarn":
            scaling["original_max_position_embeddings"] = int(g.get("llama.rope.scaling.original_context_length"))
        hf["rope_scaling"] = scaling  # an unknown type is refused by from_hf_config
    return hf


class _HFNamedTensors(Mapping):
    """GGUF tensors under their HF names, dequantized (and q/k un-permuted) when read."""

    def __init__(self, g: GGUFFile, cfg: llama.LlamaConfig):
        self.g, self.cfg = g, cfg
        self.names: dict[str, str] = {"model.embed_tokens.weight": "token_embd.weight",
                                      "model.norm.weight": "output_norm.weight"}
        if "output.weight" in g.tensors:
            self.names["lm_head.weight"] = "output.weight"
        gguf_of = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
        for i in range(cfg.n_layers):
            for hf_name, gguf_name in gguf_of.items():
                self.names[f"model.layers.{i}.{hf_name}.weight"] = f"blk.{i}.{gguf_name}.weight"

    def __getitem__(self, hf_name: str) -> np.ndarray:
        w = self.g.dequantize(self.names[hf_name])
        if hf_name.endswith("self_attn.q_proj.weight"):
            return unpermute_qk(w, self.cfg.n_heads)
        if hf_name.endswith("self_attn.k_proj.weight"):
            return unpermute_qk(w, self.cfg.n_kv_heads)
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def load_gguf(path: str | os.PathLike, *, dtype: str = "bfloat16", param_dtype: str = "float32",
              seq_len: int | None = None, max_seq_len: int = 2048,
              ) -> tuple[llama.LlamaConfig, llama.Params, hf_tokenizer.HFTokenizer]:
    """(config, parameters, tokenizer) of a Llama GGUF file; arguments as `hf_checkpoint.load_hf`."""
    g = open_gguf(path)
    cfg = llama.from_hf_config(hf_config_from_gguf(g), seq_len=seq_len, dtype=dtype, param_dtype=param_dtype,
                               max_seq_len=max_seq_len)
    tokenizer = hf_tokenizer.tokenizer_from_gguf(g)
    cfg = dataclasses.replace(cfg, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    params = hf_checkpoint.params_from_hf_tensors(cfg, _HFNamedTensors(g, cfg))
    return cfg, params, tokenizer


def gguf_chat_template(path: str | os.PathLike) -> str | None:
    """The GGUF's tokenizer.chat_template (a Jinja template, as in tokenizer_config.json), or None."""
    return open_gguf(path).get("tokenizer.chat_template")
