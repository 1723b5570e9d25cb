"""config.json parsing (core.hf_config) and the rope types (core.rope_scaling).

The expected RoPE frequencies are written here from the published definitions, element by element in plain
Python, independently of core.rope_scaling's vectorized code:
- linear (position interpolation, Chen et al. 2023): theta_i / s;
- llama3 (Meta's Llama 3.1 reference `apply_scaling`): per wavelength, keep / divide / blend;
- yarn (Peng et al. 2023, section 3): ramp gamma(r) over r = L / wavelength between alpha=beta_slow and
  beta=beta_fast, h(theta) = (1 - gamma) theta / s + gamma theta, attention scale sqrt(1/t) = 0.1 ln s + 1.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from forgetting.core import hf_config, llama, rope_scaling

SMOLLM2_135M_V5 = {  # SmolLM2-135M-Instruct's config.json as transformers v5 writes it (rope_parameters)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "max_position_embeddings": 8192,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "dtype": "bfloat16", "transformers_version": "5.0.0", "use_cache": True, "vocab_size": 49152}


def _v4(config: dict) -> dict:
    """The same config in the v4 layout: top-level rope_theta and rope_scaling."""
    out = {k: v for k, v in config.items() if k != "rope_parameters"}
    params = dict(config["rope_parameters"])
    out["rope_theta"] = params.pop("rope_theta")
    out["rope_scaling"] = None if params.get("rope_type") == "default" else params
    return out


def _base(head_dim: int, theta: float) -> list[float]:
    return [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]


# --- rope types against formulas written here ------------------------------------------------------------------
def test_default_and_linear_frequencies():
    expected = _base(64, 100000.0)
    inv, scale = rope_scaling.rope_frequencies(64, 100000.0, None)
    np.testing.assert_allclose(inv, expected, rtol=1e-12)
    assert scale == 1.0
    inv, scale = rope_scaling.rope_frequencies(64, 100000.0, {"rope_type": "linear", "factor": 4.0})
    np.testing.assert_allclose(inv, [f / 4.0 for f in expected], rtol=1e-12)
    assert scale == 1.0
    # the older "type" key names the same thing
    inv2, _ = rope_scaling.rope_frequencies(64, 100000.0, {"type": "linear", "factor": 4.0})
    np.testing.assert_array_equal(inv, inv2)


def test_llama3_frequencies_follow_the_reference_definition():
    factor, low, high, old = 32.0, 1.0, 4.0, 8192
    expected = []
    for f in _base(64, 500000.0):
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            expected.append(f)
        elif wavelen > old / low:
            expected.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            expected.append((1 - smooth) * f / factor + smooth * f)
    inv, scale = rope_scaling.rope_frequencies(64, 500000.0, {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
        "original_max_position_embeddings": old})
    np.testing.assert_allclose(inv, expected, rtol=1e-12)
    assert scale == 1.0
    # all three regimes occur at this base, so the test covers each branch
    wavelens = [2 * math.pi / f for f in _base(64, 500000.0)]
    assert min(wavelens) < old / high and max(wavelens) > old / low
    assert any(old / high <= w <= old / low for w in wavelens)


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_frequencies_and_attention_scale_follow_the_paper(truncate):
    head_dim, base, s, context, fast, slow = 128, 1000000.0, 4.0, 32768, 32.0, 1.0

    def dim_of(rotations):  # the dimension index d at which L / wavelength_d = rotations
        return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_of(fast), dim_of(slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    expected = []
    for i, f in enumerate(_base(head_dim, base)):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        keep = 1.0 - ramp  # gamma: 1 for high frequencies (kept), 0 for low ones (interpolated)
        expected.append((1 - keep) * f / s + keep * f)
    inv, scale = rope_scaling.rope_frequencies(head_dim, base, {
        "rope_type": "yarn", "factor": s, "original_max_position_embeddings": context, "truncate": truncate},
        max_position_embeddings=int(context * s))
    np.testing.assert_allclose(inv, expected, rtol=1e-12)
    assert scale == pytest.approx(0.1 * math.log(s) + 1.0)
    # explicit attention_factor wins; mscale pair gives the DeepSeek ratio
    _, scale = rope_scaling.rope_frequencies(head_dim, base, {"rope_type": "yarn", "factor": s,
                                                              "attention_factor": 1.5}, 131072)
    assert scale == 1.5
    _, scale = rope_scaling.rope_frequencies(head_dim, base, {"rope_type": "yarn", "factor": s, "mscale": 2.0,
                                                              "mscale_all_dim": 1.0}, 131072)
    assert scale == pytest.approx((0.2 * math.log(s) + 1) / (0.1 * math.log(s) + 1))


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "unsupported rope_type 'dynamic'"),
    ({"rope_type": "longrope", "short_factor": [1.0]}, "unsupported rope_type 'longrope'"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, "unsupported field(s) beta_fast"),
    ({"rope_type": "llama3", "factor": 8.0}, "needs field(s) low_freq_factor"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}, "disagrees"),
])
def test_unsupported_or_inconsistent_rope_is_refused(scaling, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rope_scaling.rope_frequencies(64, 10000.0, scaling, max_position_embeddings=32768)


# --- config.json parsing ---------------------------------------------------------------------------------------
def test_rope_parameters_give_the_same_model_as_top_level_rope_theta():
    """The reported bug: a v5 config (rope_parameters) read with base 10000 instead of its rope_theta."""
    v5, v4 = llama.from_hf_config(SMOLLM2_135M_V5), llama.from_hf_config(_v4(SMOLLM2_135M_V5))
    assert v5 == v4
    assert v5.rope_theta == 100000.0 and v5.rope_scaling is None
    np.testing.assert_allclose(llama.rope_inv_freq(v5), np.float32(_base(64, 100000.0)), rtol=1e-6)
    assert (v5.head_dim, v5.n_heads, v5.n_kv_heads, v5.tie_embeddings) == (64, 9, 3, True)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
])
def test_scaled_rope_in_both_layouts_gives_the_same_model(scaling):
    v5 = dict(SMOLLM2_135M_V5, rope_parameters={"rope_theta": 100000.0, **scaling})
    cfg5, cfg4 = llama.from_hf_config(v5), llama.from_hf_config(_v4(v5))
    assert cfg5 == cfg4 and cfg5.rope_scaling.rope_type == scaling["rope_type"]
    expected, scale = rope_scaling.rope_frequencies(64, 100000.0, scaling, 8192)
    np.testing.assert_allclose(llama.rope_inv_freq(cfg5), expected.astype(np.float32), rtol=1e-6)
    assert cfg5.rope_attention_scaling == pytest.approx(scale)
    # the record written for the run directory round-trips
    again = llama.from_hf_config(llama.to_hf_config(cfg5) | {"max_position_embeddings": 8192})
    assert again.rope_scaling == cfg5.rope_scaling


def test_rope_parameters_keyed_by_layer_type():
    cfg = dict(SMOLLM2_135M_V5, rope_parameters={"full_attention": {"rope_theta": 5e5, "rope_type": "default"}})
    assert hf_config.parse_hf_config(cfg).rope_theta == 5e5


def test_yarn_attention_scaling_changes_the_logits_as_scaled_cos_sin():
    """rope(x, scale) equals scale * rope(x): q.k scales by scale**2, as transformers' attention_scaling."""
    x = np.random.default_rng(0).normal(size=(1, 5, 2, 8)).astype(np.float32)
    pos = np.arange(5)
    inv = np.float32(_base(8, 10000.0))
    np.testing.assert_allclose(np.asarray(llama.rope(x, pos, inv, 1.3)), 1.3 * np.asarray(llama.rope(x, pos, inv)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"rope_theta": 10000.0}, "rope_theta 10000.0 disagrees"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling .* disagrees"),
    ({"rope_parameters": {"rope_theta": 1e5, "rope_type": "ntk"}}, "unsupported rope_type 'ntk'"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not implemented"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"num_local_experts": 8}, "num_local_experts=8"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096 is in use"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention layers"),
    ({"no_rope_layers": [1, 0]}, "no_rope_layers"),
    ({"model_type": "gemma2"}, "model_type 'gemma2' is not supported"),
    ({"attention_bias": True}, "attention_bias is not implemented"),
    ({"mlp_bias": True}, "mlp_bias is not implemented"),
    ({"model_type": "qwen3"}, "model_type 'qwen3' is not a Llama"),
])
def test_fields_that_would_change_the_numbers_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        llama.from_hf_config(SMOLLM2_135M_V5 | change)


def test_qwen_families_parse_their_biases_and_norms():
    qwen25 = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_hidden_layers": 24, "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
              "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
              "tie_word_embeddings": True, "eos_token_id": 151645, "bos_token_id": 151643, "rope_scaling": None}
    spec = hf_config.parse_hf_config(qwen25)
    assert (spec.qkv_bias, spec.o_bias, spec.qk_norm, spec.head_dim) == (True, False, False, 64)
    assert spec.rope_theta == 1e6 and spec.rope_scaling is None and spec.eos_token_ids == (151645,)
    qwen3 = {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
             "num_hidden_layers": 28, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
             "attention_bias": False, "rope_theta": 1000000, "sliding_window": None, "use_sliding_window": False,
             "eos_token_id": [151645, 151643], "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 32768},
             "max_position_embeddings": 131072}
    spec = hf_config.parse_hf_config(qwen3)
    assert (spec.qkv_bias, spec.o_bias, spec.qk_norm, spec.head_dim) == (False, False, True, 128)
    assert spec.rope_scaling["rope_type"] == "yarn" and spec.eos_token_ids == (151645, 151643)
    with pytest.raises(ValueError, match="sliding_window=32768 is in use"):
        hf_config.parse_hf_config(qwen25 | {"use_sliding_window": True})
