"""Chat-style multiple-choice scoring: the prompt, the letter parser, greedy-answer accuracy (unreadable
answers count as wrong), "ANSWER: X" log-likelihood scoring, and the stage's --scoring flag."""
from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from forgetting.core import families
from forgetting.evals import benchmarks as bm

EOS = 3  # the test vocabulary's end-of-turn byte


@dataclasses.dataclass(frozen=True)
class ChatBigramConfig:
    """Next-token logits depend only on the current token (params["table"][token]); unlike the bigram of
    test_benchmarks.py it also decodes with a (stateless) cache, so the sampler can run it."""

    vocab_size: int = 256
    seq_len: int = 64


def _forward(cfg, params, tokens, cache=None, pos=0):
    logits = params["table"][tokens]
    return logits if cache is None else (logits, cache)


def _unused(*args):
    raise AssertionError("scoring only calls forward and init_cache")


families.register(families.Family(
    name="test_chat_bigram", config_type=ChatBigramConfig,
    param_specs=lambda cfg: {"table": families.ParamSpec((cfg.vocab_size, cfg.vocab_size), ("vocab", None), 1.0)},
    init=_unused, forward=_forward, final_hidden=_unused, output_embedding=_unused,
    init_cache=lambda cfg, batch, length=None: jnp.zeros((batch,), jnp.int32), lora_targets={}))


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def byte_decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def chain_table(chains: dict[str, str]) -> np.ndarray:
    """Planted greedy continuations: after byte s the model writes chains[s] and then EOS."""
    table = np.zeros((256, 256), np.float32)
    for start, text in chains.items():
        seq = [ord(start), *byte_encode(text), EOS]
        for a, b in zip(seq, seq[1:]):
            assert not table[a].any() or table[a, b] == 9.0, f"byte {a} is used by two chains"
            table[a, b] = 9.0
    return table


def test_prompt_layout():
    p = bm.chat_mcq_prompt("  What is 2+2? ", ["3", "4", "5"])
    assert p.startswith("Answer the following multiple choice question.")
    assert "where LETTER is one of A,B,C." in p
    assert p.endswith("\n\nWhat is 2+2?\n\nA) 3\nB) 4\nC) 5")
    assert bm.answer_completions(3) == ["ANSWER: A", "ANSWER: B", "ANSWER: C"]


@pytest.mark.parametrize("text,n,expected", [
    ("ANSWER: C", 4, 2),
    ("answer is ANSWER:$B.", 4, 1),
    ("ANSWER : D", 4, 3),
    ("ANSWER: A\nwait, ANSWER: B", 4, 1),  # the last one counts
    ("I pick C) since ... ", 4, 2),
    ("B) or maybe D)", 4, 3),
    ("The answer is B", 4, 1),
    ("It is D.", 4, 3),
    ("ANSWER: E", 4, None),  # E is not an option of a 4-option question
    ("ANSWER: E", 5, 4),
    ("the answer is four", 4, None),
    ("", 4, None),
    ("ABCD", 4, None),  # no letter standing alone
    ("A cat", 4, 0),  # the lenient fallback reads the article as option A (as the authors' scorer does)
])
def test_parse_answer_letter(text, n, expected):
    assert bm.parse_answer_letter(text, n) == expected


def _question(i: int, answer: int, n: int = 4) -> dict:
    # The last option's last byte (the prompt's last byte when chat_encode is identity) selects the chain.
    options = [f"opt{j}" for j in range(n - 1)] + [f"last{i}"]
    return {"question": f"Question {i}?", "options": options, "answer_index": answer}


def test_chat_generate_accuracy_counts_unreadable_as_wrong():
    chains = {"0": "ANSWER: B", "1": "C)", "2": "q", "3": "Z", "4": "D."}
    # prompts end in "0".."4": q0 says B (right), q1 says C (wrong: answer A), q2 says "q" (unreadable),
    # q3 says "Z" (not a letter of 4 options: unreadable), q4 says D (right).
    questions = [_question(0, 1), _question(1, 0), _question(2, 2), _question(3, 0), _question(4, 3)]
    params = {"table": jnp.asarray(chain_table(chains))}
    cfg = ChatBigramConfig(seq_len=64)
    out = bm.score_chat_generate(cfg, params, byte_encode, byte_decode, questions, eos_ids=(EOS,), pad_id=0,
                                 max_new_tokens=12, batch_size=2)
    assert out["completions"] == ["ANSWER: B", "C)", "q", "Z", "D."]
    assert out["n"] == 5 and out["skipped"] == 0 and out["unparsed"] == 2
    assert out["acc"] == pytest.approx(2 / 5)
    # max_new_tokens cuts the answer: "ANSWER: B" cut to 3 bytes has no letter any more
    short = bm.score_chat_generate(cfg, params, byte_encode, byte_decode, questions[:1], eos_ids=(EOS,), pad_id=0,
                                   max_new_tokens=3, batch_size=2)
    assert short["completions"] == ["ANS"] and short["acc"] == 0.0 and short["unparsed"] == 1
    # prompts longer than max_prompt_len are skipped, not cut
    skip = bm.score_chat_generate(cfg, params, byte_encode, byte_decode, questions, eos_ids=(EOS,), pad_id=0,
                                  max_new_tokens=12, max_prompt_len=10)
    assert skip["n"] == 0 and skip["skipped"] == 5


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_chat_loglik_matches_numpy_reference():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(256, 256)).astype(np.float32)
    table[ord(" "), ord("C")] += 4.0  # "ANSWER: C" is the likeliest answer to every question
    params, cfg = {"table": jnp.asarray(table)}, ChatBigramConfig(seq_len=512)
    questions = [_question(0, 2), _question(1, 1), _question(2, 2, n=5)]
    chat_encode = lambda text: [1, *byte_encode(text), 2]  # a template's markers around the user text

    def reference(q):
        scores = []
        for answer in bm.answer_completions(len(q["options"])):
            ids = chat_encode(bm.chat_mcq_prompt(q["question"], q["options"])) + byte_encode(answer)
            n = len(byte_encode(answer))
            lp = _log_softmax(table[ids[:-1]])
            scores.append(sum(lp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids))))
        return int(np.argmax(scores))

    predicted = [reference(q) for q in questions]
    assert predicted == [2, 2, 2]
    out = bm.score_chat_loglik(cfg, params, chat_encode, byte_encode, questions, batch_size=4)
    assert out == {"acc": pytest.approx(2 / 3), "n": 3, "skipped": 0}
    # a prompt that does not fit is skipped (left out of the accuracy), never cut
    longest = max(len(chat_encode(bm.chat_mcq_prompt(q["question"], q["options"]))) for q in questions)
    small = bm.score_chat_loglik(ChatBigramConfig(seq_len=longest + 8), params, chat_encode, byte_encode, questions)
    assert small["n"] == 2 and small["skipped"] == 1 and small["acc"] == pytest.approx(1 / 2)  # the 5-option one


def test_evaluate_benchmarks_scorings(tmp_path):
    rows = [{"question": "Q1?", "subject": "anatomy", "choices": ["w", "x", "y", "z0"], "answer": 1},
            {"question": "Q2?", "subject": "anatomy", "choices": ["w", "x", "y", "z1"], "answer": 2}]
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"table": jnp.asarray(chain_table({"0": "B)", "1": "xyz"}))}
    chat = bm.ChatScoring(chat_encode=byte_encode, decode=byte_decode, eos_ids=(EOS,), pad_id=0, max_new_tokens=8)
    out = bm.evaluate_benchmarks(ChatBigramConfig(seq_len=512), params, byte_encode,
                                 {"mmlu": tmp_path / "mmlu.jsonl"}, scoring="chat", chat=chat)
    assert out["scoring"] == "chat" and out["mmlu"] == 0.5 and out["mmlu_unparsed"] == 1
    assert out["mmlu_n"] == 2 and out["mmlu_skipped"] == 0 and out["average"] == 0.5
    with pytest.raises(ValueError, match="scoring"):
        bm.evaluate_benchmarks(ChatBigramConfig(), params, byte_encode, {"mmlu": tmp_path / "mmlu.jsonl"},
                               scoring="greedy")
    with pytest.raises(ValueError, match="ChatScoring"):
        bm.evaluate_benchmarks(ChatBigramConfig(), params, byte_encode, {"mmlu": tmp_path / "mmlu.jsonl"},
                               scoring="chat_loglik")
    q = bm.load_benchmark("mmlu", tmp_path / "mmlu.jsonl")[0]
    assert q["question"] == "Q1?" and q["options"] == ["w", "x", "y", "z0"]


def test_subsets_shuffled_as_the_authors_draw_them(tmp_path):
    import random

    rows = [{"question": f"Q{i}?", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(40)]
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    order = list(range(40))
    random.Random(42).shuffle(order)  # the authors: rows = list(ds); random.Random(42).shuffle(rows); rows[:N]
    qs = bm.load_benchmark("mmlu", tmp_path / "mmlu.jsonl", limit=7, shuffle_seed=42)
    assert [q["question"] for q in qs] == [f"Q{i}?" for i in order[:7]]
    assert [q["question"] for q in bm.load_benchmark("mmlu", tmp_path / "mmlu.jsonl", limit=3)] == ["Q0?", "Q1?", "Q2?"]
    # per-benchmark caps through evaluate_benchmarks (chat_loglik: every question fits, so n = the cap)
    params = {"table": jnp.zeros((256, 256), jnp.float32)}
    chat = bm.ChatScoring(chat_encode=byte_encode, decode=byte_decode, eos_ids=(EOS,), pad_id=0)
    out = bm.evaluate_benchmarks(ChatBigramConfig(seq_len=512), params, byte_encode,
                                 {"mmlu": tmp_path / "mmlu.jsonl"}, limit={"mmlu": 5}, scoring="chat_loglik",
                                 chat=chat, shuffle_seed=42)
    # a uniform model ties every option: argmax takes A, so accuracy = share of answer 0 among the 5 drawn
    assert out["mmlu_n"] == 5 and out["mmlu"] == pytest.approx(sum(order[i] % 4 == 0 for i in range(5)) / 5)
