"""Hugging Face `config.json` -> one normalized, validated description of a decoder (pure Python).

    spec = parse_hf_config(json.loads(Path("config.json").read_text()))
    spec.rope_theta, spec.rope_scaling, spec.qkv_bias, spec.qk_norm, ...

Reads every layout a current checkpoint carries:
- RoPE base and scaling as top-level `rope_theta` + `rope_scaling` (transformers v4), as
  `rope_parameters` = {"rope_theta", "rope_type", ...} (transformers v5), or as `rope_parameters` keyed by
  layer type ({"full_attention": {...}}). When both layouts are present they must agree.
- `head_dim` (else hidden_size / heads), `tie_word_embeddings`, `attention_bias`, `mlp_bias`, the
  `rope_type`s of `core.rope_scaling`, several EOS ids.
- Families: "llama" (Llama 2/3.x, SmolLM/SmolLM2), "mistral" without a sliding window, "qwen2" (Qwen2/2.5:
  bias on q, k, v), "qwen3" (RMSNorm with gain on q and k per head, before RoPE).

Every key of config.json is accounted for (an allowlist): read here (`_UNDERSTOOD`), known not to change
the numbers (`_NEUTRAL`: names, dtype labels, generation defaults, token ids used elsewhere, dropout, ...),
or allowed only at a value that changes nothing (`_MUST_BE_NEUTRAL`). A field that would change the numbers
and is not implemented (a sliding window in use, logit soft-capping, partial rotary, mixture of experts, NoPE
layers, Granite multipliers, an unknown rope type or activation) is refused with a ValueError naming it, and
so is any key not on these lists: a field never heard of might change the numbers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from forgetting.core import rope_scaling as rope_lib

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# field -> the values under which it changes nothing here (absent always counts as harmless).
_MUST_BE_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "final_logit_softcapping": (None, 0, 0.0),
    "attn_logit_softcapping": (None, 0, 0.0),
    "query_pre_attn_scalar": (None,),
    "partial_rotary_factor": (None, 1, 1.0),
    "num_experts": (None, 0),
    "num_local_experts": (None, 0),
    "n_routed_experts": (None, 0),
    "num_experts_per_tok": (None, 0),
    "attention_multiplier": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
    "use_qk_norm": (None, False),
    "attn_temperature_tuning": (None, False, 0),
    "interleave_moe_layer_step": (None, 0),
    "rope_interleaved": (None, False),  # SmolLM2's nanotron field: False is HF's rotate-half RoPE, implemented here
}


# Keys `parse_hf_config` reads (or checks, as the sliding-window fields).
_UNDERSTOOD = frozenset({
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "bos_token_id", "eos_token_id",
    "initializer_range", "hidden_act", "hidden_activation", "no_rope_layers", "layer_types", "sliding_window",
    "use_sliding_window", "max_window_layers"})
# Keys that do not change the numbers of a forward pass or a training step here: names and versions, the
# storage dtype label, caching and output switches, dropout (not used here, as in HF eval), token ids and
# generation defaults (sampling has its own flags), nanotron/transformers.js leftovers, and `pretraining_tp`
# (HF's split matmuls: the same product).
_NEUTRAL = frozenset({
    "architectures", "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop", "pad_token_id", "unk_token_id",
    "sep_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id", "is_llama_config",
    "transformers.js_config", "auto_map", "_attn_implementation", "_attn_implementation_autoset",
    "attn_implementation", "pretraining_tp", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_encoder_decoder", "is_decoder", "is_encoder_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "chunk_size_feed_forward", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix",
    "task_specific_params", "problem_type"})


def _refuse_unknown_keys(hf: Mapping[str, Any]) -> None:
    unknown = sorted(k for k in hf if k not in _UNDERSTOOD and k not in _NEUTRAL and k not in _MUST_BE_NEUTRAL)
    if unknown:
        shown = ", ".join(f"{k}={hf[k]!r}" for k in unknown)
        raise ValueError(f"config.json: unknown field{'s' if len(unknown) > 1 else ''} {shown}: this reader does not "
                         "know whether it changes the model's numbers, so it refuses it; remove the field if it is "
                         "only informational, or load a supported checkpoint")


@dataclasses.dataclass(frozen=True)
class HFModelSpec:
    """What a decoder's numbers depend on, read from a HF config.json (names follow HF)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on the q, k and v projections
    o_bias: bool  # bias on the attention output projection
    mlp_bias: bool  # bias on gate, up and down
    qk_norm: bool  # RMSNorm with gain on each head of q and k, before RoPE (Qwen3)
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None  # the scaling dict (with rope_type) or None for plain RoPE
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    initializer_range: float


def _rope_from_config(hf: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either layout; disagreement between them is refused."""
    params = hf.get("rope_parameters")
    top_theta = hf.get("rope_theta")
    top_scaling = hf.get("rope_scaling") or None
    if params:
        if not isinstance(params, Mapping):
            raise ValueError(f"config.json: rope_parameters must be an object, got {params!r}")
        if "rope_theta" not in params and "rope_type" not in params and "type" not in params:
            # keyed by layer type (transformers v5 for models that mix attention kinds)
            kinds = set(params)
            if kinds - {"full_attention", "sliding_attention"}:
                raise ValueError(f"config.json: rope_parameters has unknown keys {sorted(kinds)}")
            if "full_attention" not in params:
                raise ValueError("config.json: rope_parameters has no full_attention entry")
            params = params["full_attention"]
        params = dict(params)
        if "rope_theta" not in params:
            if top_theta is None:
                raise ValueError("config.json: rope_parameters without rope_theta and no top-level rope_theta")
            params["rope_theta"] = top_theta
        if top_theta is not None and not math.isclose(float(top_theta), float(params["rope_theta"])):
            raise ValueError(f"config.json: rope_theta {top_theta} disagrees with rope_parameters.rope_theta "
                             f"{params['rope_theta']}; remove one of them")
        theta = float(params.pop("rope_theta"))
        if params.get("partial_rotary_factor") in (1, 1.0):
            params.pop("partial_rotary_factor")
        scaling = params if rope_lib.rope_type_of(params) != "default" or set(params) - {"rope_type", "type"} else None
        if top_scaling is not None:
            top = {k: v for k, v in dict(top_scaling).items() if k != "rope_theta"}
            if rope_lib.rope_type_of(top) != rope_lib.rope_type_of(scaling) or any(
                    top.get(k) != v for k, v in (scaling or {}).items() if k not in ("rope_type", "type")):
                raise ValueError(f"config.json: rope_scaling {dict(top_scaling)} disagrees with rope_parameters "
                                 f"{dict(hf['rope_parameters'])}; remove one of them")
    else:
        theta = float(top_theta if top_theta is not None else 10000.0)
        scaling = dict(top_scaling) if top_scaling else None
        if scaling is not None and rope_lib.rope_type_of(scaling) == "default" and not (
                set(scaling) - {"rope_type", "type", "rope_theta"}):
            scaling = None
    if scaling is not None:
        rope_lib.check_scaling(scaling)
        scaling = {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": rope_lib.rope_type_of(scaling)}
    return theta, scaling


def _refuse_sliding_window(hf: Mapping[str, Any], model_type: str) -> None:
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        kinds = sorted(set(layer_types) - {"full_attention"})
        raise ValueError(f"config.json: layer_types has {', '.join(kinds)} layers; only full attention is "
                         "implemented")
    window = hf.get("sliding_window")
    if window is None:
        return
    if model_type in ("qwen2", "qwen3"):
        in_use = bool(hf.get("use_sliding_window", False))
    else:
        in_use = True
    if in_use:
        raise ValueError(f"config.json: sliding_window={window} is in use; sliding-window attention is not "
                         "implemented")


def parse_hf_config(hf: Mapping[str, Any]) -> HFModelSpec:
    """Validates and normalizes a config.json dict (see the module doc); ValueError names what is refused."""
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    _refuse_unknown_keys(hf)
    for key, neutral in _MUST_BE_NEUTRAL.items():
        if key in hf and hf[key] not in neutral:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not implemented (it would change the numbers)")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not implemented (only 'silu', SwiGLU)")
    no_rope = hf.get("no_rope_layers")
    if no_rope and not all(no_rope):
        raise ValueError("config.json: no_rope_layers marks layers without RoPE (NoPE); not implemented")
    _refuse_sliding_window(hf, model_type)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise ValueError(f"config.json: missing {key}")
    n_heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // n_heads
    theta, scaling = _rope_from_config(hf)
    max_pos = int(hf.get("max_position_embeddings") or 2048)
    rope_lib.rope_frequencies(int(head_dim), theta, scaling, max_pos)  # refuses inconsistent yarn fields
    attention_bias = bool(hf.get("attention_bias", False))
    if model_type == "qwen2":  # Qwen2/2.5 always carry q/k/v biases and none on o
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = attention_bias
    mlp_bias = bool(hf.get("mlp_bias", False))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
    bos = hf.get("bos_token_id")
    return HFModelSpec(
        model_type=model_type, vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
        num_hidden_layers=int(hf["num_hidden_layers"]), num_attention_heads=n_heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or n_heads), head_dim=int(head_dim),
        intermediate_size=int(hf["intermediate_size"]), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, o_bias=o_bias,
        mlp_bias=mlp_bias, qk_norm=model_type == "qwen3", rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=max_pos,
        bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
        initializer_range=float(hf.get("initializer_range", 0.02)))
