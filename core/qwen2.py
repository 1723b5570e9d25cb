"""Qwen2 / Qwen2.5: the Llama block (`core.llama`) with a bias on the q, k and v projections (none on o).

Everything else is Llama's: pre-norm RMSNorm with gain, rotate-half RoPE (default theta 1e6), grouped-query
attention, SwiGLU MLP, tied (0.5B, 1.5B, 3B) or untied (7B and up) embeddings. The config is a
`LlamaConfig` subclass whose `QKV_BIAS` switch adds three stacked leaves to the parameter tree:

    bq  [L, H, hd]   HF model.layers.{i}.self_attn.q_proj.bias [H*hd]
    bk  [L, K, hd]   HF ...k_proj.bias [K*hd]
    bv  [L, K, hd]   HF ...v_proj.bias [K*hd]

Sliding-window attention (`use_sliding_window: true`) is refused by `core.hf_config`; with it off (every
released Qwen2/2.5 config) `sliding_window` / `max_window_layers` change nothing.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from forgetting.core import families, llama


@dataclasses.dataclass(frozen=True)
class Qwen2Config(llama.LlamaConfig):
    """A Qwen2/2.5 decoder: LlamaConfig's fields, Qwen's defaults, q/k/v biases."""

    rope_theta: float = 1000000.0
    norm_eps: float = 1e-6
    QKV_BIAS: ClassVar[bool] = True


def from_hf_config(hf: dict, *, seq_len: int | None = None, dtype: str = "bfloat16",
                   param_dtype: str = "float32", max_seq_len: int = 2048) -> Qwen2Config:
    """A Qwen2Config from a HF `config.json` dict (model_type "qwen2"); see `llama.from_hf_config`."""
    return llama.config_from_hf(hf, Qwen2Config, ("qwen2",), "config.json: model_type {model_type} is not qwen2",
                                "the Qwen2 family", seq_len=seq_len, dtype=dtype, param_dtype=param_dtype,
                                max_seq_len=max_seq_len)


def to_hf_config(cfg: Qwen2Config, *, torch_dtype: str | None = None) -> dict:
    """The HF `config.json` dict (as `transformers` writes for Qwen2ForCausalLM); sliding window off."""
    out = llama.to_hf_config(cfg, torch_dtype=torch_dtype)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):  # not Qwen2 config fields
        out.pop(key)
    return out | {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
                  "sliding_window": None, "max_window_layers": cfg.n_layers}


FAMILY = families.register(dataclasses.replace(
    llama.FAMILY, name="qwen2", config_type=Qwen2Config,
    config_from_dict=lambda d: llama.config_from_dict(d, Qwen2Config)))
