"""Llama-family checkpoints in the Hugging Face layout, without PyTorch or `transformers`.

    cfg, params, tok = load_hf("/path/to/Llama-3.2-1B-Instruct")          # a local directory
    cfg, params, tok = load_hf("meta-llama/Llama-3.2-1B-Instruct")        # a hub id: needs the `hf` extra

A directory holds `config.json` (model_type "llama"), `model.safetensors` or shards with
`model.safetensors.index.json`, and a tokenizer: `tokenizer.json` (HF byte-level BPE) or the tiktoken-format
`tokenizer.model` of Llama 3 (also looked for under `original/`); see `stages.hf_tokenizer`. Nothing is downloaded unless a hub id is
given and `huggingface_hub` is importable.

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

Memory: tensors are memory-mapped and each stacked leaf is built and moved to the device one at a time,
so the peak is about one copy of the weights (in `param_dtype`) plus one leaf.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_dtypes
import numpy as np
import regex

from forgetting.core import llama
from forgetting.core import safetensors_io as st

# The tokenizer code lives in stages/hf_tokenizer.py; these names stay importable from here.
from forgetting.stages.hf_tokenizer import (  # noqa: E402,F401
    _read_json,
    BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, LLAMA3_PATTERN, HFTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer,
    llama3_special_tokens, read_tiktoken_ranks, write_tiktoken_ranks)


# --- weights ------------------------------------------------------------------------------------------------
def _hf_layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {"attn_norm": p + "input_layernorm.weight", "mlp_norm": p + "post_attention_layernorm.weight",
            "wq": p + "self_attn.q_proj.weight", "wk": p + "self_attn.k_proj.weight",
            "wv": p + "self_attn.v_proj.weight", "wo": p + "self_attn.o_proj.weight",
            "w_gate": p + "mlp.gate_proj.weight", "w_up": p + "mlp.up_proj.weight",
            "w_down": p + "mlp.down_proj.weight"}


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
    for leaf in llama.LAYER_LEAVES:
        stacked = np.empty(specs[leaf].shape, np_dtype)
        for i in range(cfg.n_layers):
            stacked[i] = _from_hf_layer(cfg, leaf, get(_hf_layer_names(i)[leaf]))
        params[leaf] = jax.device_put(stacked)  # freshly allocated: safe to hand over
        del stacked
    return params


def params_to_hf_tensors(cfg: llama.LlamaConfig, params: llama.Params, dtype: Any = None) -> dict[str, np.ndarray]:
    """The inverse of `params_from_hf_tensors`: HF names and [out, in] layouts."""
    def host(x: Any) -> np.ndarray:
        a = np.asarray(jax.device_get(x))
        return a if dtype is None else a.astype(dtype)

    out = {"model.embed_tokens.weight": host(params["embed"]), "model.norm.weight": host(params["final_norm"])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = host(params["lm_head"])
    for leaf in llama.LAYER_LEAVES:
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
        import huggingface_hub  # noqa: PLC0415 (optional `hf` extra)
    except ImportError:
        raise FileNotFoundError(
            f"{text!r} is not a local directory; to fetch it as a Hugging Face hub id install the optional "
            "extra (pip install 'forgetting[hf]' huggingface_hub) or download it and pass the directory") from None
    return Path(huggingface_hub.snapshot_download(
        text, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model"]))


def load_hf(path_or_hub_id: str | os.PathLike, *, dtype: str = "bfloat16", param_dtype: str = "float32",
            seq_len: int | None = None, max_seq_len: int = 2048,
            ) -> tuple[llama.LlamaConfig, llama.Params, Tokenizer]:
    """(config, parameters, tokenizer) of a Llama checkpoint in the HF layout.

    dtype: matmul input dtype of the forward pass; param_dtype: storage of the loaded leaves ("bfloat16"
    halves memory); seq_len: the KV-cache / sampling length (default min(max_position_embeddings,
    max_seq_len)). The config's bos_id/eos_id are the tokenizer's.
    """
    directory = _resolve_dir(path_or_hub_id)
    hf_config = _read_json(directory / "config.json")
    if not hf_config:
        raise FileNotFoundError(f"no config.json in {directory}")
    tokenizer = load_tokenizer(directory, hf_config)
    cfg = llama.from_hf_config(hf_config, seq_len=seq_len, dtype=dtype, param_dtype=param_dtype,
                               max_seq_len=max_seq_len)
    cfg = dataclasses.replace(cfg, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    tensors = st.load_dir(directory)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        # Some exports write the tied head anyway; it must equal the embedding then.
        tensors.pop("lm_head.weight")
    params = params_from_hf_tensors(cfg, tensors)
    del tensors
    return cfg, params, tokenizer


# --- a tiny random checkpoint written in the HF layout (for --scale mini and the tests) ------------------
_TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Forgetting in language models happens when a model that "
    "was trained on one distribution is finetuned on another, and its predictions on the old data drift. "
    "A penalty on the divergence between the model and a frozen reference keeps them where they were. "
    "module counter(input clk, input rst, output reg [7:0] q); always @(posedge clk) if (rst) q <= 0; "
    "else q <= q + 1; endmodule\n"
    "Question: Which of these is a mammal? Answer: the whale. There are 365 days in a year, 24 hours in a "
    "day, and 60 minutes in an hour. Self-generated replay samples sequences from the model itself, "
    "prompted with only the beginning-of-text token, and uses them with the KL penalty.\n"
)


def tiny_tokenizer_tokens(n_ranks: int, text: str = _TINY_TEXT) -> list[bytes]:
    """`n_ranks` byte-level BPE tokens in rank order: the 256 bytes, then merges learned on `text`."""
    from forgetting.stages import tokenizer as tokenizer_stage  # noqa: PLC0415

    if n_ranks < 256:
        raise ValueError(f"a byte-level vocabulary needs at least 256 ranks, got {n_ranks}")
    words = Counter(w.encode("utf-8") for w in regex.findall(LLAMA3_PATTERN, text))
    merges = tokenizer_stage.learn_merges(dict(words), n_ranks - 256) if n_ranks > 256 else []
    tokens = [bytes([b]) for b in range(256)] + list(merges)
    filler = 0
    while len(tokens) < n_ranks:  # the text ran out of pairs: pad with unreachable two-byte tokens
        candidate = bytes([0xF5 + filler // 256 % 11, filler % 256])
        filler += 1
        if candidate not in tokens:
            tokens.append(candidate)
    return tokens


def tiny_config(vocab_size: int = 512, n_special: int = 16, **overrides: Any) -> llama.LlamaConfig:
    """A tiny Llama config whose BOS/EOS ids match the tokenizer `write_tiny_hf_checkpoint` writes."""
    n_ranks = vocab_size - n_special
    kwargs: dict[str, Any] = dict(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  head_dim=16, d_mlp=128, rope_theta=10000.0, seq_len=128,
                                  bos_id=n_ranks, eos_id=n_ranks + 1)
    kwargs.update(overrides)
    return llama.LlamaConfig(**kwargs)


def write_tiny_hf_checkpoint(directory: str | os.PathLike, cfg: llama.LlamaConfig, key: jax.Array | None = None,
                             *, params: llama.Params | None = None, n_special: int = 16,
                             torch_dtype: str = "float32", max_shard_bytes: int | None = None) -> llama.LlamaConfig:
    """Writes a random (or the given) Llama checkpoint in exactly the HF layout: config.json,
    generation_config.json, model.safetensors (or shards + index when `max_shard_bytes` is exceeded),
    a Llama-3-style tiktoken-format tokenizer.model (256 bytes + merges learned on a built-in text, then
    `n_special` special tokens starting with <|begin_of_text|>, <|end_of_text|>), tokenizer_config.json
    and special_tokens_map.json. Returns the config as written (bos/eos set to the tokenizer's ids)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_ranks = cfg.vocab_size - n_special
    specials = llama3_special_tokens(n_special)
    cfg = dataclasses.replace(cfg, bos_id=n_ranks, eos_id=n_ranks + 1)
    if params is None:
        params = llama.init(cfg, jax.random.key(0) if key is None else key)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[torch_dtype]
    tensors = params_to_hf_tensors(cfg, params, np_dtype)
    meta = {"format": "pt"}
    if max_shard_bytes:
        st.save_sharded(directory, tensors, max_shard_bytes, meta)
    else:
        st.save(directory / "model.safetensors", tensors, meta)
    (directory / "config.json").write_text(json.dumps(llama.to_hf_config(cfg, torch_dtype=torch_dtype), indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "do_sample": True, "temperature": 1.0}, indent=2))
    write_tiktoken_ranks(directory / "tokenizer.model", tiny_tokenizer_tokens(n_ranks))
    added = {str(n_ranks + i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True} for i, name in enumerate(specials)}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": True, "model_max_length": cfg.seq_len,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN},
                                                                  indent=2))
    return cfg
