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

Tokenizer: byte-level BPE ("gpt2" tokenizer model) from tokens, merges and token types, with the
pre-tokenizer named by `tokenizer.ggml.pre`; built as a tokenizer.json and read by `tokenizers`. Control
tokens become special added tokens, user-defined ones plain added tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from forgetting.core import llama
from forgetting.formats import hf_tokenizer

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

# tokenizer.ggml.pre -> the tokenizer.json pre_tokenizer of the family (regexes from the families' own files).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS: dict[str, tuple[dict, bool]] = {  # pre -> (pre_tokenizer, ignore_merges)
    "default": (_byte_level(True), False),
    "gpt-2": (_byte_level(True), False),
    "smollm": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      _byte_level(True)]}, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [_split(hf_tokenizer.LLAMA3_PATTERN), _byte_level(False)]},
                  True),
    "llama3": ({"type": "Sequence", "pretokenizers": [_split(hf_tokenizer.LLAMA3_PATTERN), _byte_level(False)]},
               True),
    "qwen2": ({"type": "Sequence", "pretokenizers": [_split(_QWEN2_REGEX), _byte_level(False)]}, False),
}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4


def _import_gguf() -> Any:
    try:
        import gguf  # (the optional `gguf` extra)
    except ImportError:
        raise ImportError("reading .gguf files needs the gguf package: pip install 'forgetting[gguf]'") from None
    return gguf


class GGUFFile:
    """Metadata and tensors of one GGUF file (memory-mapped by gguf.GGUFReader)."""

    def __init__(self, path: str | os.PathLike):
        gguf = _import_gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as err:  # noqa: BLE001 - gguf's reader fails in many ways on a damaged file
            raise ValueError(f"{self.path} is not a readable GGUF file: {err}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: GGUF metadata has no {key}")
        return value

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in numpy (row-major, HF [out, in]) order."""
        gguf = _import_gguf()
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(f"{self.path}: tensor {name} has type {kind}; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")
        out = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(out, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """A GGUFFile, reused while the file is unchanged (parsing the metadata of a real file takes seconds:
    the tokenizer, the chat template and the weights of one file are read from one parse)."""
    p = Path(path).resolve()
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = p.stat()
    return _open_cached(str(p), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


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
    from forgetting.formats import hf_checkpoint

    g = open_gguf(path)
    cfg = llama.from_hf_config(hf_config_from_gguf(g), seq_len=seq_len, dtype=dtype, param_dtype=param_dtype,
                               max_seq_len=max_seq_len)
    tokenizer = _tokenizer(g)
    cfg = dataclasses.replace(cfg, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    params = hf_checkpoint.params_from_hf_tensors(cfg, _HFNamedTensors(g, cfg))
    return cfg, params, tokenizer


def tokenizer_json_from_gguf(g: GGUFFile) -> dict:
    """A tokenizer.json dict equivalent to the GGUF's tokenizer metadata (byte-level BPE only)."""
    model = g.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{g.path}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{g.path}: tokenizer.ggml.pre {pre!r} is not supported "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    tokens = list(g.require("tokenizer.ggml.tokens"))
    types = list(g.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [m.split(" ") for m in g.require("tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{g.path}: a tokenizer.ggml.merges entry is not two space-separated tokens")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == _TOKEN_TYPE_CONTROL}
             for i, t in enumerate(tokens) if types[i] in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


def _tokenizer(g: GGUFFile) -> hf_tokenizer.HFTokenizer:
    full, ordinary = hf_tokenizer.tokenizers_from_json(tokenizer_json_from_gguf(g))
    bos, eos = g.get("tokenizer.ggml.bos_token_id"), g.get("tokenizer.ggml.eos_token_id")
    if bos is None or eos is None:
        raise ValueError(f"{g.path}: GGUF metadata lacks tokenizer.ggml.bos_token_id or eos_token_id")
    eos_ids = [int(eos)]
    eot = g.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    return hf_tokenizer.HFTokenizer(full, ordinary, bos_id=int(bos), eos_id=int(eos), eos_ids=tuple(eos_ids))


def load_gguf_tokenizer(path: str | os.PathLike) -> hf_tokenizer.HFTokenizer:
    """The tokenizer in a GGUF file's metadata (see the module doc)."""
    return _tokenizer(open_gguf(path))


def gguf_chat_template(path: str | os.PathLike) -> str | None:
    """The GGUF's tokenizer.chat_template (a Jinja template, as in tokenizer_config.json), or None."""
    return open_gguf(path).get("tokenizer.chat_template")
