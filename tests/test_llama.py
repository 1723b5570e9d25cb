"""The Llama family: HF checkpoint loading vs an independent NumPy implementation, GQA, the KV cache,
sampling, LoRA, the train step, safetensors I/O and the Llama 3 tokenizer."""
from __future__ import annotations

import base64
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as hst

from forgetting.core import llama, lora, sampling, step
from forgetting.core import model as model_lib
from forgetting.core import safetensors_io as st
from forgetting.formats import hf_checkpoint as hc

import hf_fixtures  # tests/: the tiny HF-layout checkpoint

SCALING = llama.RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=16)


# --- an independent NumPy Llama over HF-named tensors (does not use core.llama) --------------------------------
def _np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _np_inv_freq(hf):
    dim = hf["head_dim"]
    inv = 1.0 / hf["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    rs = hf.get("rope_scaling")
    if not rs:
        return inv
    out = []
    for f in inv:  # Meta's apply_scaling, written per frequency
        wavelen = 2 * math.pi / f
        low_wl = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
        high_wl = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
        if wavelen < high_wl:
            out.append(f)
        elif wavelen > low_wl:
            out.append(f / rs["factor"])
        else:
            smooth = (rs["original_max_position_embeddings"] / wavelen - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append((1 - smooth) * f / rs["factor"] + smooth * f)
    return np.asarray(out)


def numpy_llama_logits(hf: dict, w: dict, tokens: np.ndarray) -> np.ndarray:
    """HF LlamaForCausalLM semantics in float64: Linear y = x W^T, rotate-half RoPE, repeat_kv."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    H, K, hd = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    eps = hf["rms_norm_eps"]
    B, T = tokens.shape
    x = w["model.embed_tokens.weight"][tokens]
    ang = np.arange(T)[:, None] * _np_inv_freq(hf)[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rot(v):  # [B, heads, T, hd]
        half = hd // 2
        rotated = np.concatenate([-v[..., half:], v[..., :half]], -1)
        return v * cos + rotated * sin

    causal = np.tril(np.ones((T, T), bool))
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _np_rms(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(B, T, K, hd).transpose(0, 2, 1, 3)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(B, T, K, hd).transpose(0, 2, 1, 3)
        q, k = rot(q), rot(k)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, H * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = _np_rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    x = _np_rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def _random_params(cfg, seed=0):
    """Parameters with non-trivial gains and larger weights than the HF init, so every part matters."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in sorted(llama.param_specs(cfg).items()):
        if llama.is_norm(name):
            out[name] = jnp.asarray(1.0 + 0.3 * rng.standard_normal(spec.shape), spec.dtype)
        else:
            fan_in = spec.shape[1] * spec.shape[2] if name == "wo" else spec.shape[-2] if name == "w_down" else cfg.d_model
            out[name] = jnp.asarray(rng.standard_normal(spec.shape) * 1.5 / math.sqrt(fan_in), spec.dtype)
    return out


_forward = jax.jit(model_lib.forward, static_argnums=0)


@pytest.fixture(scope="module")
def f32_cfg():
    return hf_fixtures.tiny_config(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                          d_mlp=48, seq_len=24, dtype="float32", rope_scaling=SCALING)


@pytest.mark.parametrize("tie", [False, True])
def test_loaded_checkpoint_matches_numpy(tmp_path, f32_cfg, tie):
    cfg = llama.LlamaConfig(**{**f32_cfg.__dict__, "tie_embeddings": tie})
    params = _random_params(cfg, seed=int(tie))
    hf_fixtures.write_tiny_hf_checkpoint(tmp_path, cfg, params=params, max_shard_bytes=20_000 if tie else None)
    if tie:
        assert (tmp_path / st.INDEX_FILE).exists()  # sharded path exercised
    loaded_cfg, loaded, tok = hc.load_hf(tmp_path, dtype="float32")
    assert loaded_cfg.tie_embeddings == tie and loaded_cfg.rope_scaling == SCALING
    assert ("lm_head" in loaded) != tie
    hf = json.loads((tmp_path / "config.json").read_text())
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    ref = numpy_llama_logits(hf, st.load_dir(tmp_path), tokens)
    got = np.asarray(_forward(loaded_cfg, loaded, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())
    assert tok.bos_id == loaded_cfg.bos_id == cfg.vocab_size - 16


def test_bf16_checkpoint_and_storage(tmp_path, f32_cfg):
    params = _random_params(f32_cfg, seed=3)
    hf_fixtures.write_tiny_hf_checkpoint(tmp_path, f32_cfg, params=params, torch_dtype="bfloat16")
    header, _ = st.read_header(tmp_path / "model.safetensors")
    assert header["model.embed_tokens.weight"]["dtype"] == "BF16"
    cfg, loaded, _ = hc.load_hf(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in loaded.values())
    hf = json.loads((tmp_path / "config.json").read_text())
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 10))
    ref = numpy_llama_logits(hf, st.load_dir(tmp_path), tokens)
    got = np.asarray(_forward(cfg, loaded, jnp.asarray(tokens)))
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_from_hf_config_llama32_1b():
    hf = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
          "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
          "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32,
          "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
          "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256}
    cfg = llama.from_hf_config(hf)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp, cfg.n_layers) == (32, 8, 64, 8192, 16)
    assert cfg.seq_len == 2048 and cfg.bos_id == 128000 and cfg.eos_id == 128001 and cfg.tie_embeddings
    assert cfg.rope_scaling == llama.RopeScaling(32.0, 1.0, 4.0, 8192)
    assert 1.2e9 < llama.param_count(cfg) < 1.25e9  # Llama-3.2-1B: 1.24B parameters
    inv = llama.rope_inv_freq(cfg)
    np.testing.assert_allclose(inv, _np_inv_freq(hf), rtol=1e-6)
    assert hash(cfg) == hash(llama.from_hf_config(hf))


# --- attention -----------------------------------------------------------------------------------------------
_attention = jax.jit(llama.attention)


@settings(deadline=None, max_examples=6)
@given(seed=hst.integers(0, 2**16), kv=hst.sampled_from([1, 2, 4]))
def test_gqa(seed, kv):
    """kv heads == heads is ordinary multi-head attention; fewer kv heads equals MHA with repeated kv."""
    B, T, H, e = 2, 6, 4, 8
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, e)).astype(np.float32)
    k = rng.standard_normal((B, T, kv, e)).astype(np.float32)
    v = rng.standard_normal((B, T, kv, e)).astype(np.float32)
    pos = jnp.arange(T)
    got = np.asarray(_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), pos, pos))
    k_full, v_full = np.repeat(k, H // kv, axis=2), np.repeat(v, H // kv, axis=2)
    s = np.einsum("bthe,bshe->bhts", q, k_full) / math.sqrt(e)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("bhts,bshe->bthe", p, v_full)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if kv == H:  # and the same as a generic MHA through jax.nn.dot_product_attention
        mha = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True)
        np.testing.assert_allclose(got, np.asarray(mha), rtol=1e-5, atol=1e-5)


# --- the shared machinery with a LlamaConfig ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = hf_fixtures.tiny_config(vocab_size=288, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_mlp=48,
                         seq_len=16, dtype="float32", rope_scaling=SCALING)
    return cfg, _random_params(cfg, seed=5)


def test_cache_decoding_equals_full_forward(tiny):
    cfg, params = tiny
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, cfg.seq_len)))
    full = np.asarray(_forward(cfg, params, tokens))
    cache = model_lib.cache_for(cfg, 2)
    first, cache = _forward(cfg, params, tokens[:, :5], cache, 0)  # a prefill, then one at a time
    steps = [np.asarray(first)]
    for i in range(5, cfg.seq_len):
        logits, cache = _forward(cfg, params, tokens[:, i:i + 1], cache, jnp.int32(i))
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)


def test_sampling_greedy_is_argmax(tiny):
    cfg, params = tiny
    prompts = llama.bos_prompts(cfg, 3)
    out = np.asarray(sampling.sample(cfg, params, prompts, jax.random.key(0), temperature=0.0))
    assert out.shape == (3, cfg.seq_len) and (out[:, 0] == cfg.bos_id).all()
    logits = np.asarray(_forward(cfg, params, jnp.asarray(out)))
    np.testing.assert_array_equal(out[:, 1:], logits[:, :-1].argmax(-1))
    hot = np.asarray(sampling.sample(cfg, params, prompts, jax.random.key(1), temperature=1.0))
    assert hot.shape == out.shape and hot.min() >= 0 and hot.max() < cfg.vocab_size


def test_lora_zero_b_is_base_and_views_cover_matrices(tiny):
    cfg, params = tiny
    adapters = lora.init(cfg, params, 4, jax.random.key(0))
    assert set(adapters) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    merged = lora.merge(cfg, params, adapters)
    for name in params:
        np.testing.assert_array_equal(np.asarray(merged[name]), np.asarray(params[name]))
    bumped = jax.tree.map(lambda x: x, adapters)
    bumped["wk"] = {"a": adapters["wk"]["a"], "b": jnp.ones_like(adapters["wk"]["b"])}
    delta = lora.delta(cfg, params, bumped)["wk"]
    assert delta.shape == params["wk"].shape and float(jnp.abs(delta).max()) > 0


def test_train_step_kl_pre_reduces_loss(tiny):
    cfg, params = tiny
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (4, cfg.seq_len)), jnp.int32),
             "replay": jnp.asarray(rng.integers(0, cfg.vocab_size, (2, cfg.seq_len)), jnp.int32)}
    opt = optax.adam(1e-2)
    train = step.make_train_step(cfg, opt, reg_method="kl_pre", reg_coeff=1.0)
    state = step.init_state(params, opt)
    frozen = {"ref": params, "base": None}
    losses = []
    for _ in range(8):
        state, metrics = train(state, batch, frozen)
        losses.append(float(metrics["ntp"]))
    assert losses[-1] < losses[0] - 0.1
    assert np.isfinite(float(metrics["reg"])) and float(metrics["reg"]) >= 0


# --- safetensors -----------------------------------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
               "c": rng.integers(-5, 5, (2, 2, 2)).astype(np.int64),
               "d": np.float16(1.5) * np.ones((1,), np.float16), "scalar": np.asarray(3.0, np.float32)}
    st.save(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = st.load(tmp_path / "x.safetensors")
    assert set(back) == set(tensors) and st.metadata(tmp_path / "x.safetensors") == {"format": "pt"}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k].astype(np.float64), v.astype(np.float64))
    _, start = st.read_header(tmp_path / "x.safetensors")
    assert start % 8 == 0
    st.save_sharded(tmp_path / "sharded", tensors, max_shard_bytes=40)
    assert (tmp_path / "sharded" / st.INDEX_FILE).exists()
    merged = st.load_dir(tmp_path / "sharded")
    for k, v in tensors.items():
        np.testing.assert_array_equal(merged[k].astype(np.float64), v.astype(np.float64))


def test_reads_files_of_the_safetensors_package(tmp_path):
    numpy_st = pytest.importorskip("safetensors.numpy")
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.arange(5, dtype=np.int64),
               "h": np.linspace(0, 1, 6).astype(np.float16)}
    numpy_st.save_file(tensors, str(tmp_path / "ref.safetensors"))
    back = st.load(tmp_path / "ref.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
    st.save(tmp_path / "ours.safetensors", tensors)
    theirs = numpy_st.load_file(str(tmp_path / "ours.safetensors"))
    for k, v in tensors.items():
        np.testing.assert_array_equal(theirs[k], v)


# --- tokenizers ---------------------------------------------------------------------------------------------------
TEXTS = ["Hello world!", "  leading spaces and\nnewlines\n\n", "naïve café, 日本語 🙂", "x = 12345 + 678;",
         "I'll say it's done", ""]


def _write_llama3_style_tiktoken(path, merges):
    tokens = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return len(tokens)


def test_llama3_tiktoken_model_round_trip(tmp_path):
    merges = [b"he", b"ll", b"hell", b"hello", b" w", b" wor", b"or", b" world", b"in", b"ing"]
    n = _write_llama3_style_tiktoken(tmp_path / "tokenizer.model", merges)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": n + 256}))  # no tokenizer_config: Llama 3 names
    tok = hc.load_tokenizer(tmp_path)
    assert tok.bos_id == n and tok.eos_id == n + 1 and tok.n_vocab == n + 256
    assert tok.encoding.encode_single_token("<|eot_id|>") == n + 9
    for text in TEXTS:
        ids = tok.encode(text, bos=True)
        assert ids[0] == n and tok.decode(ids[1:]) == text
    assert tok.encode("hello world") == [259, 263]
    # special-token text is encoded as ordinary text, never as the special id
    assert n not in tok.encode("<|begin_of_text|>")


def test_tokenizer_json_matches_tiktoken_model(tmp_path):
    tokens = hf_fixtures.tiny_tokenizer_tokens(300)
    byte_map = hf_fixtures.bytes_to_unicode()
    vocab = {"".join(byte_map[b] for b in t): i for i, t in enumerate(tokens)}
    merges = [["".join(byte_map[b] for b in a), "".join(byte_map[b] for b in b_)]
              for a, b_ in hf_fixtures.bpe_merges(tokens)]
    added = [{"id": 300 + i, "content": name, "special": True, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False} for i, name in enumerate(hc.llama3_special_tokens(12))]
    tj = {"model": {"type": "BPE", "vocab": {**vocab, **{a["content"]: a["id"] for a in added}}, "merges": merges,
                    "byte_fallback": False},
          "added_tokens": added,
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": hc.LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}
    json_dir, tik_dir = tmp_path / "json", tmp_path / "tik"
    json_dir.mkdir()
    tik_dir.mkdir()
    (json_dir / "tokenizer.json").write_text(json.dumps(tj))
    (json_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "eos_token": "<|eot_id|>"}))
    hc.write_tiktoken_ranks(tik_dir / "tokenizer.model", tokens)
    (tik_dir / "config.json").write_text(json.dumps({"vocab_size": 312}))
    a, b = hc.load_tokenizer(json_dir), hc.load_tokenizer(tik_dir)
    assert a.bos_id == b.bos_id == 300 and a.eos_id == 309
    for text in TEXTS + [" the model forgets the old data"]:
        assert a.encode(text) == b.encode(text)
        assert a.decode(a.encode(text)) == text


def test_load_hf_rejects_missing_dir_without_hub(tmp_path):
    with pytest.raises(FileNotFoundError):
        hc.load_hf(tmp_path / "nope")
