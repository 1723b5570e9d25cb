"""Multiple-choice scoring by answer log-likelihood, the benchmark readers, and per-token accuracy."""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as hst

from forgetting.core import families, llama, losses
from forgetting.evals import benchmarks as bm

import hf_fixtures  # tests/: the tiny HF-layout checkpoint


@dataclasses.dataclass(frozen=True)
class BigramConfig:
    """A model whose next-token logits depend only on the current token: params["table"][token]."""

    vocab_size: int = 256
    seq_len: int = 64



def _bigram_forward(cfg, params, tokens, cache=None, pos=0):
    assert cache is None
    return params["table"][tokens]


def _unused(*args):
    raise AssertionError("the benchmark scorers only call forward")


# A family of its own, found through the registry like any other (scoring never asks which family it is).
families.register(families.Family(
    name="test_bigram", config_type=BigramConfig,
    param_specs=lambda cfg: {"table": families.ParamSpec((cfg.vocab_size, cfg.vocab_size), ("vocab", None), 1.0)},
    init=_unused, forward=_bigram_forward, final_hidden=_unused, output_embedding=_unused, init_cache=_unused,
    lora_targets={}))


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _table(pairs: dict[tuple[int, int], float]) -> dict:
    table = np.zeros((256, 256), np.float32)
    for (a, b), v in pairs.items():
        table[a, b] = v
    return {"table": jnp.asarray(table)}


def test_known_answers_and_acc_norm():
    """Successor model: after byte c, c+1 is likely. The continuation of "abc" is "d"."""
    table = np.zeros((256, 256), np.float32)
    table[np.arange(255), np.arange(1, 256)] = 6.0
    cfg, params = BigramConfig(), {"table": jnp.asarray(table)}
    questions = [
        {"prompt": "abc", "choices": ["x", "d", "q"], "answer_index": 1},
        {"prompt": "mn", "choices": ["op", "zz", "oq"], "answer_index": 0},  # multi-token choices
        {"prompt": "12", "choices": ["3", "4"], "answer_index": 0},
        {"prompt": "ab", "choices": ["z", "c"], "answer_index": 0},  # mislabelled on purpose: the model says c
    ]
    result = bm.score_multiple_choice(cfg, params, byte_encode, questions, batch_size=3)
    assert result == {"acc": 0.75, "acc_norm": 0.75, "n": 4}
    # acc vs acc_norm: a long, individually likely choice loses on the sum but wins per byte
    q = [{"prompt": "a", "choices": ["bcdefgh", "z"], "answer_index": 0}]
    table2 = np.full((256, 256), 0.0, np.float32)
    table2[np.arange(255), np.arange(1, 256)] = 3.0
    r = bm.score_multiple_choice(cfg, {"table": jnp.asarray(table2)}, byte_encode, q)
    scores = bm.choice_logprobs(cfg, {"table": jnp.asarray(table2)}, byte_encode, q)[0]
    assert scores[0] < scores[1] and scores[0] / 7 > scores[1]
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = hf_fixtures.tiny_config(vocab_size=288, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_mlp=48,
                         seq_len=32, dtype="float32")
    params = llama.init(cfg, jax.random.key(0))
    params = {k: v * 20 if not llama.is_norm(k) else v for k, v in params.items()}  # non-uniform predictions
    return cfg, params


@functools.partial(jax.jit, static_argnums=0)
def _nll(cfg, params, toks):
    return losses.next_token_nll(llama.forward(cfg, params, toks), toks)


@settings(deadline=None, max_examples=5)
@given(seed=hst.integers(0, 1000))
def test_batched_padded_scores_equal_one_at_a_time(tiny_llama, seed):
    cfg, params = tiny_llama
    rng = np.random.default_rng(seed)
    encode = lambda s: [ord(c) % 256 for c in s]
    letters = "abcdefghij"
    questions = []
    for _ in range(3):
        prompt = "".join(rng.choice(list(letters), rng.integers(1, 12)))
        choices = ["".join(rng.choice(list(letters), rng.integers(1, 5))) for _ in range(rng.integers(2, 5))]
        questions.append({"prompt": prompt, "choices": choices, "answer_index": 0})
    got = bm.choice_logprobs(cfg, params, encode, questions, bos_id=cfg.bos_id, batch_size=4)
    for q, scores in zip(questions, got):
        for choice, score in zip(q["choices"], scores):
            row = [cfg.bos_id] + encode(q["prompt"]) + encode(choice)
            toks = jnp.asarray([row + [0] * (cfg.seq_len - len(row))])  # causal: right padding is inert
            nll = np.asarray(_nll(cfg, params, toks))[0, :len(row) - 1]
            expected = -float(np.sum(nll[-len(choice):]))
            assert abs(score - expected) < 1e-4 * max(1.0, abs(expected))


def test_readers_and_evaluate_benchmarks(tmp_path):
    """Standard layouts from local files; a bigram model that always answers "B" after a space."""
    mmlu = [{"question": "Q1?", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 1},
            {"question": "Q2?", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": "B"},
            {"question": "Q3?", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 2}]
    arc = [{"id": "1", "question": "Which?", "choices": {"text": ["Xa", "Ba", "Ca"], "label": ["A", "B", "C"]},
            "answerKey": "B"},
           {"id": "2", "question": {"stem": "Nested?", "choices": [{"label": "1", "text": "Bb"},
                                                                   {"label": "2", "text": "Zb"}]},
            "answerKey": "1"}]
    csqa = [{"id": "c1", "question": "Where?", "question_concept": "x",
             "choices": {"label": list("ABCDE"), "text": ["v", "w", "x", "y", "z"]}, "answerKey": "B"},
            {"id": "c2", "question": "Hidden test row", "question_concept": "x",
             "choices": {"label": list("ABCDE"), "text": ["v", "w", "x", "y", "z"]}, "answerKey": ""}]
    (tmp_path / "mmlu.json").write_text(json.dumps(mmlu))
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "ARC-Challenge-test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    (tmp_path / "csqa.json").write_text(json.dumps({"rows": [{"row": r} for r in csqa]}))

    qs = bm.load_benchmark("mmlu", tmp_path / "mmlu.json")
    assert qs[0]["prompt"] == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                               "Q1?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert qs[0]["choices"] == [" A", " B", " C", " D"] and [q["answer_index"] for q in qs] == [1, 1, 2]
    arc_qs = bm.load_benchmark("arc_challenge", tmp_path / "arc", split="test")
    assert arc_qs[1] == {"prompt": "Question: Nested?\nAnswer:", "choices": [" Bb", " Zb"], "answer_index": 0,
                         "question": "Nested?", "options": ["Bb", "Zb"]}  # the bare texts, for chat scoring
    csqa_qs = bm.load_benchmark("commonsense_qa", tmp_path / "csqa.json")
    assert len(csqa_qs) == 1 and csqa_qs[0]["prompt"].endswith("E. z\nAnswer:")

    cfg, params = BigramConfig(seq_len=128), _table({(32, ord("B")): 8.0})
    result = bm.evaluate_benchmarks(cfg, params, byte_encode, {
        "mmlu": tmp_path / "mmlu.json", "arc_challenge": tmp_path / "arc", "commonsense_qa": tmp_path / "csqa.json"})
    assert result["mmlu"] == pytest.approx(2 / 3) and result["arc_challenge"] == 1.0
    assert result["commonsense_qa"] == 1.0
    assert result["average"] == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_tiny_benchmarks_and_missing_sources(tmp_path):
    paths = bm.write_tiny_benchmarks(tmp_path)
    for name, path in paths.items():
        qs = bm.load_benchmark(name, path)
        assert len(qs) >= 3 and all(0 <= q["answer_index"] < len(q["choices"]) for q in qs)
    with pytest.raises(FileNotFoundError):
        bm.load_benchmark("mmlu", tmp_path / "absent.jsonl")
    with pytest.raises(ValueError):
        bm.load_benchmark("hellaswag", paths["mmlu"])


def test_token_accuracy():
    table = np.zeros((256, 256), np.float32)
    table[np.arange(255), np.arange(1, 256)] = 5.0
    cfg, params = BigramConfig(), {"table": jnp.asarray(table)}
    rows = np.asarray([[1, 2, 3, 4, 5], [10, 11, 12, 0, 0], [7, 8, 9, 10, 11]])  # 6 + 2... of 12 are successors
    hits = sum(int(r[i + 1] == r[i] + 1) for r in rows for i in range(4))
    assert bm.token_accuracy(cfg, params, rows, batch_size=2) == pytest.approx(hits / 12)
