"""Llama-family checkpoints in the Hugging Face layout, without PyTorch or `transformers`.

    cfg, params, tok = load_hf("/path/to/Llama-3.2-1B-Instruct")          # a local directory
    cfg, params, tok = load_hf("meta-llama/Llama-3.2-1B-Instruct")        # a hub id: needs the `hf` extra

A directory holds `config.json` (model_type "llama"), `model.safetensors` or shards with
`model.safetensors.index.json`, and a tokenizer: `tokenizer.json` (HF byte-level BPE) or the tiktoken-format
`tokenizer.model` of Llama 3 (also looked for under `original/`). Nothing is downloaded unless a hub id is
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

import base64
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
import tiktoken

from forgetting.core import llama
from forgetting.core import safetensors_io as st

# Llama 3's pre-tokenizer (Meta's tokenizer.py and the Split regex of its tokenizer.json).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BOS_TOKEN, EOS_TOKEN, EOT_TOKEN = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def llama3_special_tokens(n_special: int = 256) -> list[str]:
    """Llama 3.1/3.2's special tokens in id order (placed right after the BPE ranks)."""
    named = [BOS_TOKEN, EOS_TOKEN, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", EOT_TOKEN, "<|python_tag|>"]
    if n_special < 2:
        raise ValueError("a Llama 3 tokenizer needs at least BOS and EOS special tokens")
    named = named[:n_special]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_special - len(named))]


# --- tokenizer ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class HFTokenizer:
    """A tiktoken Encoding plus the ids that matter here. `encode` never adds BOS unless asked and
    treats special-token text as ordinary text."""

    encoding: tiktoken.Encoding
    bos_id: int
    eos_id: int
    eos_ids: tuple[int, ...] = ()

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        ids = self.encoding.encode_ordinary(text)
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by HF byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parses a tiktoken-format file (base64 token, space, rank per line) without tiktoken's path cache."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}: line {line_no} is not 'base64 rank' (a SentencePiece .model? "
                                 "only Llama 3's tiktoken format is supported)")
            try:
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}: malformed tiktoken line {line_no}") from None
    return ranks


def write_tiktoken_ranks(path: str | Path, tokens: Sequence[bytes]) -> None:
    Path(path).write_text("".join(base64.b64encode(t).decode("ascii") + f" {rank}\n" for rank, t in enumerate(tokens)))


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.readline()
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\s*", head) is not None


def _token_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.get("content")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _tokenizer_from_tiktoken_model(path: Path, tok_config: dict, vocab_size: int | None) -> tiktoken.Encoding:
    ranks = read_tiktoken_ranks(path)
    n = len(ranks)
    decoder = tok_config.get("added_tokens_decoder") or {}
    if decoder:
        special = {_token_content(v): int(k) for k, v in decoder.items()}
    else:
        n_special = (vocab_size - n) if vocab_size and vocab_size > n else 256
        special = {name: n + i for i, name in enumerate(llama3_special_tokens(n_special))}
    return tiktoken.Encoding(name=path.parent.name or "llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special)


def _split_pattern(pre: dict | None) -> str:
    """The regex of a tokenizer.json pre_tokenizer (Split + ByteLevel as in Llama 3, or GPT-2 ByteLevel)."""
    if not pre:
        return LLAMA3_PATTERN
    if pre.get("type") == "Sequence":
        for p in pre.get("pretokenizers", []):
            if p.get("type") == "Split" and isinstance(p.get("pattern"), dict) and "Regex" in p["pattern"]:
                return p["pattern"]["Regex"]
        for p in pre.get("pretokenizers", []):
            if p.get("type") == "ByteLevel" and p.get("use_regex", True):
                return GPT2_PATTERN
        return LLAMA3_PATTERN
    if pre.get("type") == "Split" and "Regex" in (pre.get("pattern") or {}):
        return pre["pattern"]["Regex"]
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) else LLAMA3_PATTERN
    raise ValueError(f"unsupported tokenizer.json pre_tokenizer {pre.get('type')!r} (only byte-level BPE)")


def _tokenizer_from_json(path: Path) -> tiktoken.Encoding:
    """HF byte-level BPE tokenizer.json -> tiktoken Encoding. Ranks are the vocab ids: in byte-level BPE
    converted from tiktoken (Llama 3, GPT-2) merge priority equals the merged token's id."""
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not BPE")
    if model.get("byte_fallback"):
        raise ValueError(f"{path}: a SentencePiece-style BPE (byte_fallback) is not supported; only byte-level BPE")
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    ranks: dict[bytes, int] = {}
    for token, idx in model["vocab"].items():
        if token in added:
            continue
        try:
            ranks[bytes(byte_decoder[c] for c in token)] = int(idx)
        except KeyError:
            raise ValueError(f"{path}: token {token!r} is not in the byte-level alphabet; not a byte-level BPE") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: byte-level BPE without single-byte tokens for {len(missing)} bytes")
    pattern = _split_pattern(data.get("pre_tokenizer"))
    return tiktoken.Encoding(name=path.parent.name or "hf", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=added)


def load_tokenizer(directory: str | Path, hf_config: dict | None = None) -> HFTokenizer:
    """The tokenizer of a HF checkpoint directory: `tokenizer.json` if present, else the tiktoken-format
    `tokenizer.model` (or `original/tokenizer.model`). BOS/EOS come from tokenizer_config.json (names),
    falling back to config.json's ids and then Llama 3's names."""
    directory = Path(directory)
    hf_config = hf_config if hf_config is not None else _read_json(directory / "config.json")
    tok_config = _read_json(directory / "tokenizer_config.json")
    if (directory / "tokenizer.json").exists():
        enc = _tokenizer_from_json(directory / "tokenizer.json")
    else:
        for candidate in (directory / "tokenizer.model", directory / "original" / "tokenizer.model"):
            if candidate.exists() and _is_tiktoken_file(candidate):
                enc = _tokenizer_from_tiktoken_model(candidate, tok_config, hf_config.get("vocab_size"))
                break
        else:
            raise FileNotFoundError(f"no tokenizer.json or tiktoken-format tokenizer.model in {directory}")
    special = {t: enc.encode_single_token(t) for t in enc.special_tokens_set}

    def resolve(name_key: str, id_key: str, default_name: str) -> list[int]:
        ids: list[int] = []
        name = _token_content(tok_config.get(name_key))
        if name in special:
            ids.append(special[name])
        cfg_ids = hf_config.get(id_key)
        for i in cfg_ids if isinstance(cfg_ids, list) else [cfg_ids]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
        if not ids and default_name in special:
            ids.append(special[default_name])
        if not ids:
            raise ValueError(f"cannot determine {name_key} for the tokenizer in {directory}")
        return ids

    bos = resolve("bos_token", "bos_token_id", BOS_TOKEN)
    eos = resolve("eos_token", "eos_token_id", EOS_TOKEN)
    return HFTokenizer(enc, bos_id=bos[0], eos_id=eos[0], eos_ids=tuple(eos))


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
            ) -> tuple[llama.LlamaConfig, llama.Params, HFTokenizer]:
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
