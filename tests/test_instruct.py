"""Instruction-tuned models in the train stage: HF checkpoints as --model.load_path, BOS-prompted replay,
uint32 token files, packing with a loss mask, tensor parallelism, benchmark evaluation, the figure file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from forgetting.core import data as data_lib
from forgetting.core import llama, losses
from forgetting.formats import hf_checkpoint
from forgetting.training import runs
from forgetting.stages import tokenize_hf

import hf_fixtures  # tests/: the tiny HF-layout checkpoint

SEQ = 32


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny-llama"
    hf_fixtures.write_tiny_hf_checkpoint(d, hf_fixtures.tiny_config(seq_len=SEQ), jax.random.key(0))
    return d


def _corpus(path, docs):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


# ------------------------------------------------------------------------------------------ token files
def test_uint32_token_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128256, size=5 * 8)
    tokens[::8] = 128000
    meta = data_lib.write_token_file(tmp_path / "big.bin", tokens, {"dataset_id": 128000, "vocab_size": 128256})
    assert meta["dtype"] == "uint32" and (tmp_path / "big.bin").stat().st_size == 4 * tokens.size
    tf = data_lib.TokenFile(tmp_path / "big.bin", vocab_size=128256)
    np.testing.assert_array_equal(np.asarray(tf.tokens), tokens)
    ds = data_lib.SequenceDataset(tf, 8, num_tokens_valid=8, split_seed=0)
    rows = ds.train_sequences(np.arange(ds.num_train))
    assert rows.dtype == np.int32 and rows.max() > 65535 and np.all(rows[:, 0] == 128000)
    # uint16 stays the default (and the only choice) for small vocabularies
    assert data_lib.write_token_file(tmp_path / "s.bin", [1, 2, 3], {"dataset_id": 0, "vocab_size": 4096})["dtype"] == "uint16"
    with pytest.raises(ValueError, match="fits uint16"):
        data_lib.write_token_file(tmp_path / "s2.bin", [1, 2], {"dataset_id": 0, "vocab_size": 4096}, dtype="uint32")
    with pytest.raises(ValueError, match="uint16"):
        data_lib.write_token_file(tmp_path / "s3.bin", [70000], {"dataset_id": 0})
    (tmp_path / "odd.bin").write_bytes(b"\0" * 6)
    data_lib.write_json_atomic(tmp_path / "odd.bin.json", {"dataset_id": 0, "dtype": "uint32"})
    with pytest.raises(ValueError, match="multiple of 4"):
        data_lib.TokenFile(tmp_path / "odd.bin")


def test_packing_and_loss_mask(tmp_path, hf_dir):
    pad = 9
    docs = [[1, 5, 5, 2], [1, 6, 2], [1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 2], [1, 8, 2]]
    rows = data_lib.pack_documents(docs, 6, pad)
    np.testing.assert_array_equal(rows, [[1, 5, 5, 2, 9, 9],  # [1 6 2] does not fit: padded, new row
                                         [1, 6, 2, 9, 9, 9],  # the long document starts a new row ...
                                         [1, 7, 7, 7, 7, 7],  # ... and is cut into row-sized pieces
                                         [7, 7, 7, 7, 2, 9],
                                         [1, 8, 2, 9, 9, 9]])
    with pytest.raises(ValueError, match="padding id"):
        data_lib.pack_documents([[1, 9, 2]], 6, pad)
    # every document kept whole (in order) once the padding is dropped
    assert rows[rows != pad].tolist() == sum(docs, [])
    meta = data_lib.write_token_file(tmp_path / "p.bin", rows.ravel(),
                                     {"dataset_id": 1, "vocab_size": 16, "pad_id": pad, "packed_seq_len": 6})
    ds = data_lib.SequenceDataset(data_lib.TokenFile(tmp_path / "p.bin"), 6, num_tokens_valid=6, split_seed=0)
    batch = ds.train_sequences(np.arange(ds.num_train))
    mask = ds.loss_mask(batch)
    np.testing.assert_array_equal(mask, batch != pad)
    with pytest.raises(ValueError, match="packed into rows of 6"):
        data_lib.SequenceDataset(data_lib.TokenFile(tmp_path / "p.bin"), 4, num_tokens_valid=4, split_seed=0)
    # the masked loss is the mean NLL over the non-padding targets only
    logits = jax.random.normal(jax.random.key(1), batch.shape + (16,))
    nll = np.asarray(losses.next_token_nll(logits, batch))
    want = nll[batch[:, 1:] != pad].mean()
    np.testing.assert_allclose(float(losses.next_token_loss(logits, batch, mask)), want, rtol=1e-6)
    # no pad id in the sidecar: no mask (the paper's path, every position counts)
    assert meta["dtype"] == "uint16"
    data_lib.write_token_file(tmp_path / "u.bin", rows.ravel(), {"dataset_id": 1, "vocab_size": 16})
    plain = data_lib.SequenceDataset(data_lib.TokenFile(tmp_path / "u.bin"), 6, num_tokens_valid=6, split_seed=0)
    assert plain.loss_mask(batch) is None
    # tokenize_hf --pack: BOS + text + EOS per document, rows padded with <|finetune_right_pad_id|>
    src = _corpus(tmp_path / "docs.jsonl", ["module a; endmodule", "The quick brown fox.", "x" * 3])
    out = tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(hf_dir),
                                                  out=str(tmp_path / "h.bin"), pack=True, seq_len=SEQ))
    tok = hf_checkpoint.load_tokenizer(hf_dir)
    assert out["pad_id"] == tok.encoding.encode_single_token(tokenize_hf.PAD_TOKEN)
    assert out["dataset_id"] == tok.bos_id and out["num_documents"] == 3 and out["packed_seq_len"] == SEQ
    toks = np.asarray(data_lib.TokenFile(tmp_path / "h.bin").tokens)
    kept = toks[toks != out["pad_id"]].tolist()
    want = sum(([tok.bos_id, *tok.encode(t), tok.eos_id] for t in ["module a; endmodule", "The quick brown fox.", "xxx"]), [])
    assert kept == want


# --------------------------------------------------------------------------------- train / reload
@pytest.mark.slow
def test_hf_checkpoint_finetunes_with_bos_prompted_kl_replay(tmp_path, hf_dir):
    from forgetting.stages import evaluate_benchmarks as eb
    from forgetting.stages import train
    from forgetting.training import train_config as tc
    from forgetting.training.train_setup import build_setup

    verilog = [f"module m{i}(input clk, output reg [{i % 8}:0] q); always @(posedge clk) q <= q + {i}; endmodule"
               for i in range(40)]
    src = _corpus(tmp_path / "v.jsonl", verilog)
    meta = tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(hf_dir),
                                                   out=str(tmp_path / "v.bin"), pack=True, seq_len=SEQ))
    cfg = tc.TrainConfig(
        run=tc.RunConfig(dir=str(tmp_path / "runs"), name="kl"),
        data=tc.DataConfig(path=str(tmp_path / "v.bin"), num_tokens_valid=4 * SEQ),
        model=tc.ModelArgs(load_path=str(hf_dir), seq_len=SEQ, dtype="float32"),
        reg=tc.RegConfig(method="kl_pre", coeff=10.0, synth=True, batch_size=4, buffer=2),
        opt=tc.OptConfig(batch_size=4, peak_lr=1e-3, warmup_tokens=SEQ),
        stop=tc.StopConfig(num_tokens_train=3 * 4 * SEQ),
        log=tc.LogConfig(every_steps=3, progress=False))
    cfg.validate()
    setup = build_setup(cfg)
    mc = setup.model_cfg
    assert isinstance(mc, llama.LlamaConfig) and mc.seq_len == SEQ and mc.bos_id == meta["dataset_id"]
    replay_rows = setup.replay.rows(0)
    assert replay_rows.shape == (4, SEQ) and np.all(replay_rows[:, 0] == mc.bos_id)  # prompted by BOS only
    assert setup.resolved["lineage_ids"] == [mc.bos_id] and setup.resolved["model"]["family"] == "llama"
    assert setup.ref_init_distance is None
    result = train.train(cfg)
    m = result["metrics"]
    assert m["steps"] == 3 and np.isfinite(m["valid_ntp"]) and m["valid_kl"] > 0
    # the finetuned run loads again as a Llama model (and finetunes again: its lineage is BOS)
    again = runs.load_run(result["run_dir"])
    assert again.model_cfg == mc and again.lineage_ids == (mc.bos_id,) and again.data_path == str(tmp_path / "v.bin")
    assert set(again.params) == set(llama.param_specs(mc))
    moved = sum(float(np.abs(np.asarray(again.params[k]) - np.asarray(setup.frozen["ref"][k])).sum())
                for k in again.params)
    assert moved > 0
    # the benchmark stage evaluates it, finding the tokenizer through `loaded_from`
    from forgetting.evals import benchmarks
    paths = benchmarks.write_tiny_benchmarks(tmp_path / "bench")
    out = eb.evaluate(eb.BenchConfig(
        model=eb.BenchModelArgs(load_path=result["run_dir"], dtype="float32", seq_len=64),
        domain=eb.DomainArgs(path=str(tmp_path / "v.bin"), num_tokens_valid=4 * SEQ),
        mmlu=str(paths["mmlu"]), arc=str(paths["arc_challenge"]), csqa=str(paths["commonsense_qa"])))
    assert out["average"] == pytest.approx(np.mean([out["mmlu"], out["arc_challenge"], out["commonsense_qa"]]))
    assert 0 <= out["domain_token_acc"] <= 1 and out["domain_rows"] == 4


def test_domain_token_accuracy_excludes_padding(hf_dir, tmp_path):
    from forgetting.stages import evaluate_benchmarks as eb

    cfg, params, tok = hf_checkpoint.load_hf(hf_dir, dtype="float32", seq_len=SEQ)
    pad = 500
    rows = np.full((5, 8), pad, np.int64)  # identical rows: any 3 of them form the validation split
    rows[:, 0] = cfg.bos_id
    rows[:, 1:4] = [[10, 11, 12]]
    data_lib.write_token_file(tmp_path / "d.bin", rows.ravel(), {"dataset_id": cfg.bos_id, "vocab_size": 512,
                                                                 "pad_id": pad, "packed_seq_len": 8})
    ds = data_lib.SequenceDataset(data_lib.TokenFile(tmp_path / "d.bin"), 8, num_tokens_valid=24, split_seed=0)
    logits = np.asarray(llama.forward(cfg, params, rows[:3].astype(np.int32)))
    hits = (logits[:, :-1].argmax(-1) == rows[:3, 1:]) & (rows[:3, 1:] != pad)
    want = hits.sum() / (rows[:3, 1:] != pad).sum()
    got = eb.domain_token_accuracy(cfg, params, ds, batch_size=2)
    assert got == pytest.approx(want)


@pytest.mark.slow
def test_tensor_parallel_llama_step_matches_single_device(tmp_path, hf_dir):
    script = textwrap.dedent(f"""
        import json, numpy as np, jax
        assert jax.device_count() == 4, jax.devices()
        from forgetting.stages import tokenize_hf, train
        from forgetting.training import train_config as tc, runs
        src = {str(tmp_path / 'd.jsonl')!r}
        open(src, 'w').write(''.join(json.dumps({{"text": f"module m{{i}}; assign y = a + {{i}}; endmodule"}}) + "\\n"
                                     for i in range(40)))
        tokenize_hf.tokenize(tokenize_hf.Config(sources=(src,), hf_tokenizer={str(hf_dir)!r},
                                                out={str(tmp_path / 'd.bin')!r}))
        out = {{}}
        for mesh in ("", "tp"):
            cfg = tc.TrainConfig(
                run=tc.RunConfig(dir={str(tmp_path)!r} + "/runs_" + (mesh or "single"), mesh=mesh,
                                 mesh_model=4 if mesh else 1),
                data=tc.DataConfig(path={str(tmp_path / 'd.bin')!r}, num_tokens_valid=4 * {SEQ}),
                model=tc.ModelArgs(load_path={str(hf_dir)!r}, seq_len={SEQ}, dtype="float32"),
                reg=tc.RegConfig(method="kl_pre", coeff=1.0, path={str(tmp_path / 'd.bin')!r}, batch_size=4),
                opt=tc.OptConfig(batch_size=4, peak_lr=1e-3, warmup_tokens={SEQ}),
                stop=tc.StopConfig(num_tokens_train=2 * 4 * {SEQ}), log=tc.LogConfig(every_steps=2, progress=False))
            if mesh:  # the weights really are split over the 4-device "model" axis
                from forgetting.training.train_setup import build_setup
                spec = build_setup(cfg).frozen["ref"]["wq"].sharding.spec
                assert "model" in tuple(spec), spec
            r = train.train(cfg)
            out[mesh or "single"] = (r["metrics"], runs.load_run(r["run_dir"]).params)
        (a, pa), (b, pb) = out["single"], out["tp"]
        for k in ("train_loss", "valid_ntp", "valid_kl"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
        for k in pa:
            np.testing.assert_allclose(np.asarray(pa[k]), np.asarray(pb[k]), rtol=1e-4, atol=2e-5, err_msg=k)  # Adam: ~1% of one update
        print("TP_OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "TP_OK" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------- the figure file
def _pyranet_rows(n: int) -> list[dict]:
    """`n` templated Verilog modules as PyraNet-Verilog rows (`code`, `description` holding the JSON metadata),
    plus one that did not compile and one with a too-short description: the authors' filters drop those two."""
    rng = np.random.default_rng(2)
    rows = []
    for i in range(n):
        op = str(rng.choice(("+", "-", "^", "&")))
        code = f"module u{i}(input [7:0] a, output [7:0] y);\n  assign y = a {op} {i};\nendmodule"
        meta = {"description": f"Unit {i}: y is a {op} {i}.", "compile_status": "No error!"}
        rows.append({"code": code, "description": json.dumps(meta)})
    bad = [{"description": "A register that never compiled at all.", "compile_status": "Error: syntax"},
           {"description": "Too short.", "compile_status": "No error!"}]
    return rows + [{"code": rows[0]["code"], "description": json.dumps(m)} for m in bad]


def _english_like(n: int) -> list[str]:
    """Templated English-like paragraphs: the old (pretraining-like) text."""
    rng = np.random.default_rng(1)
    words = ("river", "garden", "teacher", "city", "window", "market", "forest", "letter", "winter", "bridge")
    return [" ".join(f"The {a} {v} the {b}." for a, v, b in zip(rng.choice(words, 4), rng.choice(("sees", "finds", "keeps"), 4),
                                                                  rng.choice(words, 4))) for _ in range(n)]


def test_knobs_without_a_model_say_what_to_give():
    """No --model_path and no paper inputs: refused, naming both ways to run (before: a tiny random Llama
    stand-in, `--scale smoke`, was written and trained)."""
    from forgetting.experiments import instruct

    with pytest.raises(ValueError, match=r"nothing to start from: give --model_path .* or --hf_path, --domain_path"):
        instruct.Knobs().validate()


@pytest.mark.slow
def test_instruct_paper_pipeline_end_to_end(tmp_path):
    """`--scale paper` on inputs the test writes (the paper's files cut down): a tiny random HF-layout Llama with
    a chat template, PyraNet-layout Verilog rows (prepare_chat turns them into chat rows), an old-text token file
    made by tokenize_hf, tiny benchmark files; the paper's sizes cut by knobs."""
    pytest.importorskip("jinja2", reason="needs the hf extra (jinja2)")
    pytest.importorskip("tokenizers", reason="needs the hf extra (tokenizers)")
    from forgetting.evals import benchmarks
    from forgetting.experiments import framework, instruct

    seq = 128  # one conversation per row: the chat template's system turn + request + code fit in 128 tokens
    hf = tmp_path / "tiny-llama-instruct"
    cfg = hf_fixtures.write_tiny_hf_checkpoint(hf, hf_fixtures.tiny_config(seq_len=seq), jax.random.key(0))
    hf_fixtures.add_chat_tokenizer(hf, cfg.vocab_size)
    verilog = tmp_path / "pyranet.jsonl"
    verilog.write_text("".join(json.dumps(r) + "\n" for r in _pyranet_rows(30)))
    tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(_corpus(tmp_path / "old.jsonl", _english_like(80))),),
                                            hf_tokenizer=str(hf), out=str(tmp_path / "old.bin")))
    bench = benchmarks.write_tiny_benchmarks(tmp_path / "bench")
    out = tmp_path / "instruct"
    argv = ["--scale", "paper", "--out", str(out), "--hf_path", str(hf), "--verilog_source", str(verilog),
            "--old_path", str(tmp_path / "old.bin"), "--mmlu", str(bench["mmlu"]), "--arc", str(bench["arc_challenge"]),
            "--csqa", str(bench["commonsense_qa"]), "--seq_len", str(seq), "--batch_size", "4", "--replay_batch", "4",
            "--buffer", "2", "--num_epochs", "0", "--num_tokens_train", str(2 * 4 * seq), "--num_tokens_valid",
            str(4 * seq), "--eval_every_tokens", str(2 * 4 * seq), "--warmup_tokens", str(seq), "--peak_lr", "1e-3",
            "--dtype", "float32", "--bench_seq_len", "256", "--coeffs", "10", "--methods", "kl_self"]
    summary = framework.main(instruct.Knobs, instruct.PRESETS, instruct.runs, instruct.summarize, instruct.plot,
                             doc=instruct.__doc__, argv=argv, progress=False)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary["runs"]) == {"ft_kl_self_c10"}
    for r in (summary["start"], *summary["runs"].values()):
        assert {"average", "mmlu", "arc_challenge", "commonsense_qa", "domain_token_acc"} <= set(r)
        assert r["average"] == pytest.approx(np.mean([r["mmlu"], r["arc_challenge"], r["commonsense_qa"]]))
    run = summary["runs"]["ft_kl_self_c10"]
    assert (run["method"], run["source"], run["steps"]) == ("kl_pre", "self", 2)
    assert np.isfinite(run["old_ntp"])  # the old-text file is evaluated beside the domain data
    assert (out / "instruct.png").stat().st_size > 0
    # the paper path on the given inputs: prepare_chat kept the rows passing the authors' filters, the finetune
    # started from the given directory on prepare_chat's chat rows, every question was scored chat-style
    _, knobs = framework.parse_args(instruct.Knobs, instruct.PRESETS, argv)
    dirs = framework.locate(instruct.runs(knobs, out), out)
    prep = framework.read_result(dirs["prepare_chat"])
    assert prep["conversations"] == prep["rows"] == 30 and prep["dropped"]["compile_status"] == 1 and prep["dropped"]["description"] == 1
    saved = runs.read_run_config(dirs["ft_kl_self_c10"])["config"]
    assert saved["model"]["load_path"] == str(hf)
    assert saved["data"]["path"] == str(dirs["prepare_chat"] / instruct.CHAT_FILE)
    assert saved["reg"]["synth"] is True and saved["reg"]["method"] == "kl_pre"
    start = framework.read_result(dirs["eval_start"])
    counts = {n: sum(1 for _ in open(p)) for n, p in bench.items()}
    assert {n: start[f"{n}_n"] for n in counts} == counts and not any(start[f"{n}_skipped"] for n in counts)
