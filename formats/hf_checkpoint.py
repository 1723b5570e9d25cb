"""Llama-, Qwen2- and Qwen3-family checkpoints in the Hugging Face layout, without PyTorch or `transformers`.

    cfg, params, tok = load_hf("/path/to/Llama-3.2-1B-Instruct")          # a local directory
    cfg, params, tok = load_hf("meta-llama/Llama-3.2-1B-Instruct")        # a hub id: needs the `hf` extra

A directory holds `config.json` (model_type "llama", "mistral", "qwen2" or "qwen3"), `model.safetensors` or
shards with `model.safetensors.index.json`, and a tokenizer: `tokenizer.json` (HF byte-level BPE) or the
tiktoken-format `tokenizer.model` of Llama 3 (also looked for under `original/`); see `stages.hf_tokenizer`.
Nothing is downloaded unless a hub id is given and `huggingface_hub` is importable.

HF names -> `core.llama` layout (HF Linear weights are [out, in]; the q/k rows are already in the
rotate-half order that `core.llama.rope` uses, exactly as HF's LlamaForCausalLM, so no permutation):
    model.embed_tokens.weight [V,D]                    -> embed [V,D]
    lm_head.weight [V,D] (absent when tied)            -> lm_head [V,D]
    model.norm.weight [D]                              -> final_norm [D]
    model.layers.{i}.input_layernorm.weight [D]        -> attn_norm[i]
    model.layers.{i}.self_attn.q_proj.weight [H*hd,D]  -> wq[i] [D,H,hd]   (k_proj, v_proj: [D,K,hd])
    model.layers.{i}.self_attn.o_proj.weight [D,H*hd]  -> wo[i] [H,hd,D]
    model.layers.{i}.post_attention_layernorm.weight   -> mlp_norm[i]
    model.layers.{i}.mlp.{gate,up}_proj.weight [F,D]   -> w_gate[i], w_up[i] [D,F]
    model.layers.{i}.mlp.down_proj.weight [D,F]        -> w_down[i] [F,D]
  Qwen2 (q/k/v biases) and Qwen3 (q/k norm) also have
    model.layers.{i}.self_attn.q_proj.bias [H*hd]      -> bq[i] [H,hd]     (k_proj, v_proj: bk, bv [K,hd])
    model.layers.{i}.self_attn.{q,k}_norm.weight [hd]  -> q_norm[i], k_norm[i] [hd]
A tensor the config does not use is refused (a bias under a Llama config.json would otherwise be dropped).

Memory: tensors are memory-mapped and each stacked leaf is built and moved to the device one at a time,
so the peak is about one copy of the weights (in `param_dtype`) plus one leaf.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import ml_dtypes
import numpy as np

from forgetting.core import families, llama
from forgetting.core import safetensors_io as st

# The tokenizer code lives in formats/hf_tokenizer.py; these names stay importable from here.
from forgetting.formats.hf_tokenizer import (  # noqa: F401
    _read_json,
    BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, LLAMA3_PATTERN, HFTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer,
    llama3_special_tokens, read_tiktoken_ranks, write_tiktoken_ranks)


# --- weights ------------------------------------------------------------------------------------------------
# HF model_type -> the core module whose from_hf_config / to_hf_config read and write it (a family built on
# the `core.llama` block: its leaves and HF names come from `llama.layer_leaves` / `llama.hf_names`).
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def family_module(model_type: str) -> ModuleType:
    """The core module of a HF model_type (`core.llama`, `core.qwen2`, `core.qwen3`)."""
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(HF_MODEL_TYPES)})")
    return importlib.import_module(f"forgetting.core.{HF_MODEL_TYPES[model_type]}")


def module_of_config(cfg: llama.LlamaConfig) -> ModuleType:
    """The core module of a config built on the Llama block (for its to_hf_config)."""
    name = families.of(cfg).name
    if name not in HF_MODEL_TYPES.values():
        raise ValueError(f"a {type(cfg).__name__} has no Hugging Face layout here "
                         f"(families with one: {', '.join(sorted(set(HF_MODEL_TYPES.values())))})")
    return importlib.import_module(f"forgetting.core.{name}")


def _hf_layer_names(i: int) -> dict[str, str]:
    return {leaf: f"model.layers.{i}.{suffix}" for leaf, suffix in llama.HF_LAYER_NAMES.items()}


def _from_hf_layer(cfg: llama.LlamaConfig, leaf: str, w: np.ndarray) -> np.ndarray:
    """One layer's HF tensor -> its slice of the stacked leaf (a view where possible)."""
    H, K, hd, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    if leaf == "wq":
        return w.reshape(H, hd, D).transpose(2, 0, 1)
    if leaf in ("wk", "wv"):
        return w.reshape(K, hd, D).transpose(2, 0, 1)
    if leaf == "wo":
        return w.reshape(D, H, hd).transpose(1, 2, 0)
    if leaf in ("w_gate", "w_up", "w_down"):
        return w.T
    if leaf == "bq":
        return w.reshape(H, hd)
    if leaf in ("bk", "bv"):
        return w.reshape(K, hd)
    return w


def _to_hf_layer(cfg: llama.LlamaConfig, leaf: str, w: np.ndarray) -> np.ndarray:
    H, K, hd, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    if leaf == "wq":
        return w.transpose(1, 2, 0).reshape(H * hd, D)
    if leaf in ("wk", "wv"):
        return w.transpose(1, 2, 0).reshape(K * hd, D)
    if leaf == "wo":
        return w.transpose(2, 0, 1).reshape(D, H * hd)
    if leaf in ("w_gate", "w_up", "w_down"):
        return w.T
    if leaf in ("bq", "bk", "bv"):
        return w.reshape(-1)
    return w


def params_from_hf_tensors(cfg: llama.LlamaConfig, tensors: dict[str, np.ndarray]) -> llama.Params:
    """HF-named tensors (e.g. memory-mapped) -> the `core.llama` parameter tree in cfg.param_dtype,
    built and placed on the device one leaf at a time."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(np.float32)
    specs = llama.param_specs(cfg)
    params: dict[str, jax.Array] = {}

    def put(name: str, arr: np.ndarray) -> None:
        if arr.shape != specs[name].shape:
            raise ValueError(f"{name}: checkpoint shape {arr.shape} != expected {specs[name].shape}")
        # An owned copy (never an alias of the read-only memory map: the train step donates buffers).
        host = np.array(arr, dtype=np_dtype, order="C", copy=True)
        params[name] = jax.device_put(host)
        del host

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return tensors[name]

    put("embed", get("model.embed_tokens.weight"))
    put("final_norm", get("model.norm.weight"))
    if not cfg.tie_embeddings:
        put("lm_head", get("lm_head.weight"))
    for leaf in llama.layer_leaves(cfg):
        stacked = np.empty(specs[leaf].shape, np_dtype)
        for i in range(cfg.n_layers):
            name = _hf_layer_names(i)[leaf]
            w = _from_hf_layer(cfg, leaf, get(name))
            if w.shape != specs[leaf].shape[1:]:
                raise ValueError(f"{name}: checkpoint shape {get(name).shape} does not fit {leaf} "
                                 f"{specs[leaf].shape[1:]} of config.json")
            stacked[i] = w
        params[leaf] = jax.device_put(stacked)  # freshly allocated: safe to hand over
        del stacked
    expected = set(llama.hf_names(cfg))
    unused = sorted(k for k in tensors if k not in expected and not (cfg.tie_embeddings and k == "lm_head.weight")
                    and not k.endswith("rotary_emb.inv_freq"))  # a buffer some old exports wrote; from config
    if unused:  # e.g. biases a config without them would silently drop
        raise ValueError(f"checkpoint tensors not used by a {type(cfg).__name__}: {', '.join(unused[:5])}"
                         f"{' ...' if len(unused) > 5 else ''}")
    return params


def params_to_hf_tensors(cfg: llama.LlamaConfig, params: llama.Params, dtype: Any = None) -> dict[str, np.ndarray]:
    """The inverse of `params_from_hf_tensors`: HF names and [out, in] layouts."""
    def host(x: Any) -> np.ndarray:
        a = np.asarray(jax.device_get(x))
        return a if dtype is None else a.astype(dtype)

    out = {"model.embed_tokens.weight": host(params["embed"]), "model.norm.weight": host(params["final_norm"])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = host(params["lm_head"])
    for leaf in llama.layer_leaves(cfg):
        stacked = host(params[leaf])
        for i in range(cfg.n_layers):
            out[_hf_layer_names(i)[leaf]] = np.ascontiguousarray(_to_hf_layer(cfg, leaf, stacked[i]))
    return out


def _resolve_dir(path_or_hub_id: str | os.PathLike) -> Path:
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith("."):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    try:
        import huggingface_hub  # (optional `hf` extra)
    except ImportError:
        raise FileNotFoundError(
            f"{text!r} is not a local directory; to fetch it as a Hugging Face hub id install the optional "
            "extra (pip install 'forgetting[hf]' huggingface_hub) or download it and pass the directory") from None
    return Path(huggingface_hub.snapshot_download(
        text, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model"]))


def load_hf(path_or_hub_id: str | os.PathLike, *, dtype: str = "bfloat16", param_dtype: str = "float32",
            seq_len: int | None = None, max_seq_len: int = 2048,
            ) -> tuple[llama.LlamaConfig, llama.Params, Tokenizer]:
    """(config, parameters, tokenizer) of a Llama, Qwen2/2.5 or Qwen3 checkpoint in the HF layout (the
    family from config.json's model_type, `HF_MODEL_TYPES`).

    dtype: matmul input dtype of the forward pass; param_dtype: storage of the loaded leaves ("bfloat16"
    halves memory); seq_len: the KV-cache / sampling length (default min(max_position_embeddings,
    max_seq_len)). The config's bos_id/eos_id are the tokenizer's.
    """
    directory = _resolve_dir(path_or_hub_id)
    hf_config = _read_json(directory / "config.json")
    if not hf_config:
        raise FileNotFoundError(f"no config.json in {directory}")
    tokenizer = load_tokenizer(directory, hf_config)
    module = family_module(hf_config.get("model_type", "llama"))
    cfg = module.from_hf_config(hf_config, seq_len=seq_len, dtype=dtype, param_dtype=param_dtype,
                                max_seq_len=max_seq_len)
    cfg = dataclasses.replace(cfg, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    tensors = st.load_dir(directory)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        # Some exports write the tied head anyway; it must equal the embedding then.
        tensors.pop("lm_head.weight")
    params = params_from_hf_tensors(cfg, tensors)
    del tensors
    return cfg, params, tokenizer
