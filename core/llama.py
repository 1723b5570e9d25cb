"""The Llama architecture (Llama 2/3, 3.1, 3.2) as pure functions over a layer-stacked parameter pytree.

Pre-norm decoder: RMSNorm with a learned gain before attention, MLP and unembedding; grouped-query
causal attention (`n_kv_heads` key/value heads shared by groups of `n_heads // n_kv_heads` query heads;
query head h reads kv head h // group, as Hugging Face's `repeat_kv`); RoPE in the rotate-half convention
of Hugging Face's `LlamaForCausalLM` (whose converted q/k weights are permuted for it, so HF checkpoints
load without any permutation) with the checkpoint's theta and optional Llama-3 frequency scaling; SwiGLU
MLP `down(silu(gate(x)) * up(x))`; no biases; tied or untied input/output embeddings.

The family registers itself with `core.families` (param specs, forward, final hidden states, cache,
LoRA targets, Hugging Face tensor names), so `sampling.sample`, `step.make_train_step`, `lora`,
`sharding` and the run records work unchanged. It shares RMSNorm (with gain), RoPE and grouped-query
attention with the paper model (`core.layers`), and the backend (`cfg.numerics`, `core.backend`) with it.

Parameter layout (a flat dict; "L" = layers stacked on the leading axis and run with `lax.scan`):

    embed       [V, D]          token embedding (HF model.embed_tokens.weight)
    lm_head     [V, D]          output embedding, only when untied (HF lm_head.weight)
    final_norm  [D]             gain of the last RMSNorm (HF model.norm.weight)
    attn_norm   [L, D]          HF input_layernorm.weight
    wq          [L, D, H, hd]   HF q_proj.weight [H*hd, D] transposed
    wk          [L, D, K, hd]   HF k_proj.weight [K*hd, D] transposed (K = n_kv_heads)
    wv          [L, D, K, hd]   HF v_proj.weight
    wo          [L, H, hd, D]   HF o_proj.weight [D, H*hd] transposed
    mlp_norm    [L, D]          HF post_attention_layernorm.weight
    w_gate      [L, D, F]       HF mlp.gate_proj.weight [F, D] transposed
    w_up        [L, D, F]       HF mlp.up_proj.weight
    w_down      [L, F, D]       HF mlp.down_proj.weight [D, F] transposed

Numerics: leaves are stored in `param_dtype` (f32 by default, bf16 to halve memory); matmuls take
`dtype` inputs (bf16 by default) with f32 accumulation; the residual stream, norms, softmax, RoPE and
logits are f32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from forgetting.core import backend, families, layers
from forgetting.core import hf_config as hf_config_lib
from forgetting.core import rope_scaling as rope_lib
from forgetting.core.families import ParamSpec

Params = dict[str, jax.Array]
Cache = dict[str, jax.Array]

LAYER_LEAVES = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
BIAS_LEAVES = ("bq", "bk", "bv")  # per-layer q/k/v biases, present when the config's QKV_BIAS (Qwen2)
QK_NORM_LEAVES = ("q_norm", "k_norm")  # per-layer q/k RMSNorm gains [hd], present when QK_NORM (Qwen3)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_scaling` / `rope_parameters`): rope_type "llama3", "linear" or
    "yarn" (see `core.rope_scaling`; only the fields of the type are read). Defaults are Llama 3.1's."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None = 0.1 ln(factor) + 1 (or from the mscales)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    def to_hf(self) -> dict:
        """The HF scaling dict of this rope type (its own fields only)."""
        fields = {"linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                  "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                           "attention_factor", "mscale", "mscale_all_dim", "truncate")}.get(self.rope_type, ())
        return {"rope_type": self.rope_type, **{k: getattr(self, k) for k in fields if getattr(self, k) is not None}}

    @classmethod
    def from_hf(cls, scaling: dict, max_position_embeddings: int) -> "RopeScaling":
        kwargs = {k: v for k, v in scaling.items() if k in {f.name for f in dataclasses.fields(cls)}}
        if scaling["rope_type"] == "yarn" and kwargs.get("original_max_position_embeddings") is None:
            kwargs["original_max_position_embeddings"] = max_position_embeddings
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family decoder, and how it is computed (`numerics`); hashable: a static jit argument."""

    vocab_size: int = 512  # V
    d_model: int = 64  # D (HF hidden_size)
    n_layers: int = 2  # L (HF num_hidden_layers)
    n_heads: int = 4  # H (HF num_attention_heads)
    n_kv_heads: int = 2  # K (HF num_key_value_heads); H must be a multiple of K
    head_dim: int = 16  # hd (HF head_dim, default hidden_size // heads)
    d_mlp: int = 128  # F (HF intermediate_size)
    rope_theta: float = 500000.0  # RoPE base
    rope_scaling: RopeScaling | None = None  # Llama-3 frequency scaling, or None for plain RoPE
    norm_eps: float = 1e-5  # RMSNorm epsilon (HF rms_norm_eps)
    tie_embeddings: bool = True  # output embedding = input embedding (HF tie_word_embeddings)
    seq_len: int = 256  # maximum sequence length used here (KV-cache size, sampler length)
    dtype: str = "bfloat16"  # matmul input dtype (f32 accumulation); "float32" for exact arithmetic
    param_dtype: str = "float32"  # storage dtype of the parameters: "float32" or "bfloat16"
    bos_id: int = 0  # beginning-of-text token (the self-generated replay prompt)
    eos_id: int = 1  # end-of-text token
    init_std: float = 0.02  # HF initializer_range, for `init`
    numerics: backend.Numerics = backend.Numerics()  # how it is computed (see core.backend)

    # Architecture switches of the families built on this block (class constants, not fields: a family
    # is a config subclass that sets them, so a run record's family name fixes them).
    QKV_BIAS: ClassVar[bool] = False  # bias on the q, k and v projections (not o): Qwen2/2.5
    QK_NORM: ClassVar[bool] = False  # RMSNorm with gain on each q and k head, before RoPE: Qwen3

    def __post_init__(self) -> None:
        if self.rope_scaling is not None:
            rope_lib.check_scaling(self.rope_scaling.to_hf())
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_mlp",
                     "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        layers.check_rope_and_norm(self.rope_theta, "rope_theta", self.norm_eps, "norm_eps")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("bfloat16", "float32"):
                raise ValueError(f"{name} must be 'bfloat16' or 'float32', got {getattr(self, name)!r}")
        if not isinstance(self.numerics, backend.Numerics):
            raise TypeError(f"numerics must be a core.backend.Numerics, got {type(self.numerics).__name__}")

    @property
    def rope_attention_scaling(self) -> float:
        """The factor on cos and sin of the rope type (1 except for yarn)."""
        return rope_attention_scaling(self)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


# leaf -> (permutation to [L, in..., out...], number of "in" axes): every non-embedding matrix.
_LORA_VIEWS: dict[str, tuple[tuple[int, ...], int]] = {
    "wq": ((0, 1, 2, 3), 1),  # [L, D | H, hd]
    "wk": ((0, 1, 2, 3), 1),
    "wv": ((0, 1, 2, 3), 1),
    "wo": ((0, 1, 2, 3), 2),  # [L, H, hd | D]
    "w_gate": ((0, 1, 2), 1),
    "w_up": ((0, 1, 2), 1),
    "w_down": ((0, 1, 2), 1),
}


def layer_leaves(cfg: LlamaConfig) -> tuple[str, ...]:
    """The stacked per-layer leaves of this config (the Llama ones plus its family's switches)."""
    return LAYER_LEAVES + (BIAS_LEAVES if cfg.QKV_BIAS else ()) + (QK_NORM_LEAVES if cfg.QK_NORM else ())


def param_specs(cfg: LlamaConfig) -> dict[str, ParamSpec]:
    """The abstract parameter tree. Norm gains have init_std 0 and are initialized to 1 by `init`;
    biases have init_std 0 (zeros, as HF initializes them)."""
    V, D, L, H, K, hd, F = (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                            cfg.head_dim, cfg.d_mlp)
    std, dt = cfg.init_std, cfg.storage_dtype
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), std, dt),
        "final_norm": ParamSpec((D,), (None,), 0.0, dt),
        "attn_norm": ParamSpec((L, D), ("layers", None), 0.0, dt),
        "wq": ParamSpec((L, D, H, hd), ("layers", "embed", "heads", "head_dim"), std, dt),
        "wk": ParamSpec((L, D, K, hd), ("layers", "embed", "heads", "head_dim"), std, dt),
        "wv": ParamSpec((L, D, K, hd), ("layers", "embed", "heads", "head_dim"), std, dt),
        "wo": ParamSpec((L, H, hd, D), ("layers", "heads", "head_dim", "embed"), std, dt),
        "mlp_norm": ParamSpec((L, D), ("layers", None), 0.0, dt),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), std, dt),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), std, dt),
        "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), std, dt),
    }
    if cfg.QKV_BIAS:
        specs["bq"] = ParamSpec((L, H, hd), ("layers", "heads", "head_dim"), 0.0, dt)
        specs["bk"] = ParamSpec((L, K, hd), ("layers", "heads", "head_dim"), 0.0, dt)
        specs["bv"] = ParamSpec((L, K, hd), ("layers", "heads", "head_dim"), 0.0, dt)
    if cfg.QK_NORM:
        specs["q_norm"] = ParamSpec((L, hd), ("layers", None), 0.0, dt)
        specs["k_norm"] = ParamSpec((L, hd), ("layers", None), 0.0, dt)
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((V, D), ("vocab", "embed"), std, dt)
    return specs


def is_norm(name: str) -> bool:
    return name.endswith("norm")


def init(cfg: LlamaConfig, key: jax.Array) -> Params:
    """Random parameters as HF initializes Llama: N(0, init_std) matrices, unit norm gains."""
    return _init_jit(cfg, key)


@functools.partial(jax.jit, static_argnums=0)
def _init_jit(cfg: LlamaConfig, key: jax.Array) -> Params:
    # One normal draw sliced into the matrices (sorted by name): a single RNG op compiles several times
    # faster on CPU than one per leaf.
    specs = param_specs(cfg)
    mats = [(name, spec) for name, spec in sorted(specs.items()) if not is_norm(name)]
    z = jax.random.normal(key, (sum(math.prod(s.shape) for _, s in mats),), jnp.float32)
    out, offset = {}, 0
    for name, spec in mats:
        size = math.prod(spec.shape)
        out[name] = (spec.init_std * z[offset:offset + size].reshape(spec.shape)).astype(spec.dtype)
        offset += size
    for name, spec in specs.items():
        if is_norm(name):
            out[name] = jnp.ones(spec.shape, spec.dtype)
    return out


def param_count(cfg: LlamaConfig) -> int:
    return sum(math.prod(s.shape) for s in param_specs(cfg).values())


def bos_prompts(cfg: LlamaConfig, n: int) -> jax.Array:
    """int32 [n] of BOS: the one-token prompts of self-generated replay (no chat template)."""
    return jnp.full((n,), cfg.bos_id, jnp.int32)


# --- the computation -----------------------------------------------------------------------------------
def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [hd/2] (f32) of the configured rope type (`core.rope_scaling`, as HF computes)."""
    scaling = None if cfg.rope_scaling is None else cfg.rope_scaling.to_hf()
    inv_freq, _ = rope_lib.rope_frequencies(cfg.head_dim, cfg.rope_theta, scaling)
    return inv_freq.astype(np.float32)


def rope_attention_scaling(cfg: LlamaConfig) -> float:
    scaling = None if cfg.rope_scaling is None else cfg.rope_scaling.to_hf()
    return rope_lib.rope_frequencies(cfg.head_dim, cfg.rope_theta, scaling)[1]


def rms_norm(x: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with gain, in f32 (`layers.rms_norm`)."""
    return layers.rms_norm(x, eps, gain)


def rope(x_bthd: jax.Array, positions_t: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> jax.Array:
    """Rotate-half RoPE (HF convention) at integer positions, cos and sin times `scale` (yarn); f32 out."""
    sin, cos = layers.rope_tables(positions_t, inv_freq)
    return layers.apply_rope(x_bthd, sin * scale, cos * scale)


def rope_tables(cfg: LlamaConfig, positions_t: jax.Array, pos: jax.Array | int = 0,
                cache_length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) [t, hd/2] of the configured rope type, times its attention scaling (1 except yarn).
    With a cache of `cache_length` positions, from `layers.rope_tables_at` (pos is the first position)."""
    if cache_length is None:
        sin, cos = layers.rope_tables(positions_t, rope_inv_freq(cfg))
    else:
        sin, cos = layers.rope_tables_at(pos, positions_t.shape[0], rope_inv_freq(cfg), cache_length)
    scale = cfg.rope_attention_scaling
    return (sin, cos) if scale == 1.0 else (sin * scale, cos * scale)


def attention(q_bthe: jax.Array, k_bske: jax.Array, v_bske: jax.Array, q_positions_t: jax.Array,
              k_positions_s: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Causal grouped-query attention written out (`layers.softmax_attention`): q [B,t,H,e], k/v [B,s,K,e]; f32 out."""
    return layers.softmax_attention(q_bthe, k_bske, v_bske, q_positions_t, k_positions_s, dtype)


def init_cache(cfg: LlamaConfig, batch_size: int, length: int | None = None) -> Cache:
    """Empty KV cache for keys and values: one stacked [L, B, length, K, hd] buffer each (scanned with the
    layers), in the kernels' `layers.CacheLayout`; length defaults to seq_len."""
    layout = backend.kernels_for(cfg).cache
    length = cfg.seq_len if length is None else length
    return {name: layout.empty((cfg.n_layers,), batch_size, length, cfg.n_kv_heads, cfg.head_dim) for name in ("k", "v")}


def _block(cfg: LlamaConfig, kernels: backend.Kernels, x_btd: jax.Array, layer: Params, positions_t: jax.Array,
           rope_sin_cos: tuple[jax.Array, jax.Array], kv_cache: tuple[jax.Array, jax.Array] | None,
           pos: jax.Array | int):
    cdt = cfg.compute_dtype

    def dense(spec, a, w):
        return kernels.dense(spec, a, w, cdt)

    h = layers.rms_norm(x_btd, cfg.norm_eps, layer["attn_norm"])
    q = dense("btd,dhe->bthe", h, layer["wq"])
    k = dense("btd,dke->btke", h, layer["wk"])
    v = dense("btd,dke->btke", h, layer["wv"])
    if cfg.QKV_BIAS:  # added in f32 to the f32 projections
        q, k, v = (a + layer[b].astype(jnp.float32)[None, None] for a, b in ((q, "bq"), (k, "bk"), (v, "bv")))
    if cfg.QK_NORM:  # per head over hd, one gain shared by the heads, before RoPE
        q = layers.rms_norm(q, cfg.norm_eps, layer["q_norm"])
        k = layers.rms_norm(k, cfg.norm_eps, layer["k_norm"])
    q = layers.apply_rope(q, *rope_sin_cos)
    k = layers.apply_rope(k, *rope_sin_cos)
    attended, kv_cache = layers.cached_attention(q, k, v, positions_t, kv_cache, pos, cdt, kernels.attention,
                                                 kernels.cache)
    x_btd = x_btd + dense("bthe,hed->btd", attended, layer["wo"])
    h = layers.rms_norm(x_btd, cfg.norm_eps, layer["mlp_norm"])
    hidden = jax.nn.silu(dense("btd,df->btf", h, layer["w_gate"])) * dense("btd,df->btf", h, layer["w_up"])
    return x_btd + dense("btf,fd->btd", hidden, layer["w_down"]), kv_cache


def _run(cfg: LlamaConfig, params: Params, tokens_bt: jax.Array, cache: Cache | None, pos: jax.Array | int):
    """(normed final hidden states f32 [B, t, D], new cache or None)."""
    kernels = backend.kernels_for(cfg)
    positions_t = pos + jnp.arange(tokens_bt.shape[1])
    rope_sin_cos = rope_tables(cfg, positions_t, pos, None if cache is None else kernels.cache.length(cache))
    x_btd = jnp.take(params["embed"], tokens_bt, axis=0).astype(jnp.float32)
    stacked = {name: params[name] for name in layer_leaves(cfg)}
    new_cache = None
    if cache is None:
        def body(x, layer):
            return _block(cfg, kernels, x, layer, positions_t, rope_sin_cos, None, pos)[0], None

        x_btd, _ = jax.lax.scan(kernels.checkpoint_block(body), x_btd, stacked, unroll=kernels.unroll)
    else:
        def body(x, layer_and_cache):
            layer, k, v = layer_and_cache
            return _block(cfg, kernels, x, layer, positions_t, rope_sin_cos, (k, v), pos)

        x_btd, (ks, vs) = jax.lax.scan(body, x_btd, (stacked, cache["k"], cache["v"]))
        new_cache = {"k": ks, "v": vs}
    return layers.rms_norm(x_btd, cfg.norm_eps, params["final_norm"]), new_cache


def output_embedding(cfg: LlamaConfig, params: Params) -> jax.Array:
    """The unembedding [V, D]: the input embedding when tied."""
    return params["embed"] if cfg.tie_embeddings else params["lm_head"]


def final_hidden(cfg: LlamaConfig, params: Params, tokens_bt: jax.Array) -> jax.Array:
    """The normed last hidden states f32 [B, t, D] of a causal forward without a cache."""
    return _run(cfg, params, tokens_bt, None, 0)[0]


def decode_hidden(cfg: LlamaConfig, params: Params, tokens_bt: jax.Array, cache: Cache, pos: jax.Array | int):
    """(normed final hidden states f32 [B, t, D], new cache) of a forward with a cache."""
    return _run(cfg, params, tokens_bt, cache, pos)


def forward(cfg: LlamaConfig, params: Params, tokens_bt: jax.Array, cache: Cache | None = None,
            pos: jax.Array | int = 0):
    """Logits f32 [B, t, V] for int tokens [B, t] at positions pos..pos+t-1; with a cache (from
    `init_cache`) also returns the updated cache (same contract as `core.model.forward`)."""
    h, new_cache = _run(cfg, params, tokens_bt, cache, pos)
    logits_btv = backend.kernels_for(cfg).dense("btd,vd->btv", h, output_embedding(cfg, params), cfg.compute_dtype)
    return logits_btv if cache is None else (logits_btv, new_cache)


HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
}


def hf_names(cfg: LlamaConfig) -> dict[str, tuple[str, int | None]]:
    """Hugging Face tensor name -> (leaf, layer index or None for unstacked leaves)."""
    names: dict[str, tuple[str, int | None]] = {"model.embed_tokens.weight": ("embed", None),
                                                "model.norm.weight": ("final_norm", None)}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ("lm_head", None)
    for i in range(cfg.n_layers):
        for leaf in layer_leaves(cfg):
            names[f"model.layers.{i}.{HF_LAYER_NAMES[leaf]}"] = (leaf, i)
    return names


def config_from_dict(d: dict, cls: type = LlamaConfig) -> LlamaConfig:
    """A LlamaConfig (or the subclass `cls`) from its `cli.to_dict` record (rope_scaling a dict or None)."""
    d = dict(d)
    rs = d.pop("rope_scaling", None)
    return cls(**d, rope_scaling=RopeScaling(**rs) if rs else None)


# --- Hugging Face config.json ----------------------------------------------------------------------------
def from_hf_config(hf: dict, *, seq_len: int | None = None, dtype: str = "bfloat16",
                   param_dtype: str = "float32", max_seq_len: int = 2048) -> LlamaConfig:
    """A LlamaConfig from a HF `config.json` dict (model_type "llama").

    `seq_len` defaults to min(max_position_embeddings, `max_seq_len`): the KV cache and the sampler's
    length are sized by it, and Llama 3.2's 131072 positions would not fit a cache.
    """
    return config_from_hf(hf, LlamaConfig, ("llama", "mistral"),
                          "model_type {model_type} is not a Llama; this loader reads Llama checkpoints",
                          "the Llama family", seq_len=seq_len, dtype=dtype, param_dtype=param_dtype,
                          max_seq_len=max_seq_len)


def config_from_hf(hf: dict, cls: type, model_types: tuple[str, ...], refusal: str, family: str, *,
                   seq_len: int | None, dtype: str, param_dtype: str, max_seq_len: int) -> Any:
    """A config of class `cls` (LlamaConfig or a subclass) from a HF `config.json` dict whose model_type is
    one of `model_types` (else ValueError(refusal.format(model_type=repr(...))))."""
    spec = hf_config_lib.parse_hf_config(hf)  # validates; refuses what would change the numbers
    if spec.model_type not in model_types:
        raise ValueError(refusal.format(model_type=repr(spec.model_type)))
    check_switches(spec, cls, family)
    return cls(**config_kwargs(spec, seq_len=seq_len, dtype=dtype, param_dtype=param_dtype, max_seq_len=max_seq_len))


def check_switches(spec: hf_config_lib.HFModelSpec, cls: type, family: str) -> None:
    """Refuses a parsed config whose biases / q-k norm differ from what `cls` implements (one line each)."""
    for present, implemented, name in ((spec.qkv_bias, cls.QKV_BIAS, "attention_bias (q/k/v bias)"),
                                       (spec.o_bias, False, "attention_bias (o_proj bias)"),
                                       (spec.mlp_bias, False, "mlp_bias"), (spec.qk_norm, cls.QK_NORM, "q/k norm")):
        if present and not implemented:
            field, _, what = name.partition(" (")
            raise ValueError(f"config.json: {field} is not implemented for {family}{' (' + what if what else ''}")
        if implemented and not present:
            raise ValueError(f"config.json: {family} needs {name}, which this config does not have")


def config_kwargs(spec: hf_config_lib.HFModelSpec, *, seq_len: int | None, dtype: str, param_dtype: str,
                  max_seq_len: int) -> dict:
    """The LlamaConfig fields of a parsed HF config (shared by the families built on this block)."""
    scaling = (None if spec.rope_scaling is None
               else RopeScaling.from_hf(dict(spec.rope_scaling), spec.max_position_embeddings))
    eos = spec.eos_token_ids[0] if spec.eos_token_ids else 1
    return dict(
        vocab_size=spec.vocab_size, d_model=spec.hidden_size, n_layers=spec.num_hidden_layers,
        n_heads=spec.num_attention_heads, n_kv_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        d_mlp=spec.intermediate_size, rope_theta=spec.rope_theta, rope_scaling=scaling,
        norm_eps=spec.rms_norm_eps, tie_embeddings=spec.tie_word_embeddings,
        seq_len=int(seq_len or min(spec.max_position_embeddings, max_seq_len)), dtype=dtype,
        param_dtype=param_dtype, bos_id=0 if spec.bos_token_id is None else spec.bos_token_id, eos_id=eos,
        init_std=spec.initializer_range)


def to_hf_config(cfg: LlamaConfig, *, torch_dtype: str | None = None) -> dict:
    """The HF `config.json` dict of a LlamaConfig (as `transformers` writes for LlamaForCausalLM)."""
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "hidden_act": "silu",
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_mlp, "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "initializer_range": cfg.init_std, "max_position_embeddings": cfg.seq_len,
        "pretraining_tp": 1, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": torch_dtype or cfg.param_dtype, "use_cache": True, "vocab_size": cfg.vocab_size,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = cfg.rope_scaling.to_hf()
    return out


FAMILY = families.register(families.Family(
    name="llama", config_type=LlamaConfig, param_specs=param_specs, init=init, forward=forward,
    final_hidden=final_hidden, output_embedding=output_embedding, init_cache=init_cache,
    lora_targets=_LORA_VIEWS, hf_names=hf_names, config_from_dict=config_from_dict, decode_hidden=decode_hidden))
