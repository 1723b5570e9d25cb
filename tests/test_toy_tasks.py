"""Toy continual-learning tasks: every example checked by an independent string-based reference."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from forgetting.core import data
from forgetting.stages import generate
from forgetting.corpora import toy_tasks as toy

NAMES = ["<pad>", "<bos_add>", "<bos_reversal>", "<bos_sort>", "<bos_modadd>", "<sep>", "<eq>", "<null>", "<eos>"]


def reference_row(row: np.ndarray, n: int, modulus: int) -> None:
    """Re-derives the answer from the row's own text with string arithmetic, independent of the generator."""
    words = [NAMES[t] if t < 9 else str(t - 9) for t in row.tolist()]
    task = words[0][5:-1]
    a = "".join(words[1 : 1 + n])
    b = "".join(words[2 + n : 2 + 2 * n])
    assert words[1 + n] == "<sep>" and words[2 + 2 * n] == "<eq>" and words[-1] == "<eos>"
    assert len(words) == 3 * n + 5 and a.isdigit()
    if task in ("reversal", "sort"):
        assert words[2 + n : 2 + 2 * n] == ["<null>"] * n
        expected = a[::-1] if task == "reversal" else "".join(sorted(a))
    else:
        assert b.isdigit()
        total = int(a) + int(b)
        expected = str(total if task == "add" else total % modulus)
    assert "".join(words[2 * n + 3 : 3 * n + 4]) == expected.zfill(n + 1)


def test_layout():
    assert len(toy.TOY_VOCAB) == 19 and toy.TOY_VOCAB[:9] == tuple(NAMES)
    assert [toy.task_bos_id(t) for t in toy.TASKS] == [1, 2, 3, 4]
    assert toy.seq_len() == 14 and toy.prompt_len() == 9 and toy.answer_span() == slice(9, 13)
    with pytest.raises(ValueError, match="unknown toy task"):
        toy.task_bos_id("mul")


@settings(deadline=None, max_examples=40)
@given(task=st.sampled_from(toy.TASKS), seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5),
       modulus=st.integers(1, 1000))
def test_every_example_correct(task, seed, n, modulus):
    modulus = min(modulus, 10 ** (n + 1))
    rows = toy.make_examples(task, 64, seed, n_digits=n, modulus=modulus)
    assert rows.shape == (64, 3 * n + 5) and rows.dtype == np.int32
    for row in rows:
        reference_row(row, n, modulus)


def test_known_examples_and_determinism():
    assert np.array_equal(toy.make_examples("sort", 10, 3), toy.make_examples("sort", 10, 3))
    assert not np.array_equal(toy.make_examples("add", 10, 3), toy.make_examples("add", 10, 4))
    rows = toy.make_examples("add", 5000, 0)
    a = (rows[:, 1:4] - 9) @ [100, 10, 1]
    assert a.min() < 50 and a.max() > 950  # operands span the whole range


def test_exact_match():
    target = toy.make_examples("modadd", 8, 0)
    pred = target.copy()
    pred[:, 1:9] = 0  # prompt differences do not count
    assert toy.exact_match(pred, target) == 1.0
    pred[:3, 11] = (pred[:3, 11] - 9 + 1) % 10 + 9
    assert toy.exact_match(pred, target) == pytest.approx(5 / 8)


def test_generate_stage_file(tmp_path):
    out = tmp_path / "sort.bin"
    generate.main(["--corpus", "toy", "--task", "sort", "--num_examples", "50", "--seed", "2", "--out", str(out)])
    meta = json.loads((tmp_path / "sort.bin.json").read_text())
    assert meta["kind"] == "toy" and meta["dataset_id"] == 3 and meta["seq_len"] == 14 and meta["prompt_len"] == 9
    assert meta["vocab_size"] == 19 and meta["vocab"] == list(toy.TOY_VOCAB) and meta["tokenizer_sha256"] is None
    ds = data.SequenceDataset(data.TokenFile(out, vocab_size=19), 14, num_tokens_valid=14 * 10, split_seed=0)
    expected = toy.make_examples("sort", 50, 2)
    rows = ds.train_sequences(np.arange(ds.num_train))
    assert np.array_equal(rows, expected[ds.train_indices])  # token 0 = dataset id = BOS: rows unchanged
