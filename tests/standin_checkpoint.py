"""A test fixture: a tiny random Llama checkpoint in the Hugging Face layout (config.json, safetensors, a
tiktoken-format tokenizer.model learned on a built-in text, tokenizer_config.json). Tests import it as a
sibling module (`import standin_checkpoint`; tests/hf_fixtures.py re-exports it). Not library code: the
loader it exercises is `formats.hf_checkpoint`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import regex

from forgetting.core import llama
from forgetting.core import safetensors_io as st
from forgetting.formats.hf_checkpoint import params_to_hf_tensors
from forgetting.formats.hf_tokenizer import (BOS_TOKEN, EOS_TOKEN, LLAMA3_PATTERN, llama3_special_tokens,
                                            write_tiktoken_ranks)


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
    from forgetting.stages import tokenizer as tokenizer_stage

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
