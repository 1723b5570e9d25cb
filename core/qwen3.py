"""Qwen3 (dense): the Llama block (`core.llama`) with an RMSNorm with gain on every q and k head.

After the q and k projections and before RoPE, each head's vector [hd] is RMS-normalized (eps
`rms_norm_eps`) and multiplied by a gain shared by the heads of the layer. No q/k/v bias; `head_dim`
comes from the config (Qwen3 sets it independently of hidden_size / heads). The config is a `LlamaConfig`
subclass whose `QK_NORM` switch adds two stacked leaves:

    q_norm  [L, hd]   HF model.layers.{i}.self_attn.q_norm.weight [hd]
    k_norm  [L, hd]   HF model.layers.{i}.self_attn.k_norm.weight [hd]

Refused by `core.hf_config` / `llama.check_switches`: sliding window in use, `attention_bias: true`,
mixture of experts (Qwen3-MoE is another model_type).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from forgetting.core import families, llama


@dataclasses.dataclass(frozen=True)
class Qwen3Config(llama.LlamaConfig):
    """A Qwen3 decoder: LlamaConfig's fields, Qwen's defaults, q/k RMSNorm per head."""

    rope_theta: float = 1000000.0
    norm_eps: float = 1e-6
    QK_NORM: ClassVar[bool] = True


def from_hf_config(hf: dict, *, seq_len: int | None = None, dtype: str = "bfloat16",
                   param_dtype: str = "float32", max_seq_len: int = 2048) -> Qwen3Config:
    """A Qwen3Config from a HF `config.json` dict (model_type "qwen3"); see `llama.from_hf_config`."""
    return llama.config_from_hf(hf, Qwen3Config, ("qwen3",), "config.json: model_type {model_type} is not qwen3",
                                "the Qwen3 family", seq_len=seq_len, dtype=dtype, param_dtype=param_dtype,
                                max_seq_len=max_seq_len)


def to_hf_config(cfg: Qwen3Config, *, torch_dtype: str | None = None) -> dict:
    """The HF `config.json` dict (as `transformers` writes for Qwen3ForCausalLM); sliding window off."""
    out = llama.to_hf_config(cfg, torch_dtype=torch_dtype)
    for key in ("mlp_bias", "pretraining_tp"):  # not Qwen3 config fields
        out.pop(key)
    return out | {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
                  "sliding_window": None, "max_window_layers": cfg.n_layers}


FAMILY = families.register(dataclasses.replace(
    llama.FAMILY, name="qwen3", config_type=Qwen3Config,
    config_from_dict=lambda d: llama.config_from_dict(d, Qwen3Config)))
