"""The paper's toy continual-learning tasks: add, reversal, sort, modadd on n-digit numbers.

Vocabulary (19 ids): pad=0, BOS_add=1, BOS_reversal=2, BOS_sort=3, BOS_modadd=4, SEP=5, EQ=6, NULL=7,
EOS=8, digits 0..9 = ids 9..18. One example (14 tokens for n_digits=3):

    [BOS_task a1 a2 a3 SEP b1 b2 b3 EQ o1 o2 o3 o4 EOS]

Operands are n-digit zero-padded numbers drawn uniformly from [0, 10**n). One-operand tasks (reversal,
sort) put n NULL tokens in place of b. The answer always has n+1 digits, zero-padded on the left:
- add:      a + b
- reversal: the n-digit string of a, reversed, read as a number (a=120 -> "021" -> 0021)
- sort:     the n digits of a in ascending order (a=312 -> "123" -> 0123)
- modadd:   (a + b) mod modulus
The prompt is everything up to and including EQ (2n+3 tokens: 9 for n=3); the answer span follows it.
A task's dataset id is its BOS id, so overwriting token 0 with the dataset id changes nothing.
"""
from __future__ import annotations

import numpy as np

TOY_VOCAB: tuple[str, ...] = ("<pad>", "<bos_add>", "<bos_reversal>", "<bos_sort>", "<bos_modadd>", "<sep>", "<eq>",
                              "<null>", "<eos>", *(str(d) for d in range(10)))
PAD, SEP, EQ, NULL, EOS = 0, 5, 6, 7, 8
DIGIT0 = 9
TASKS: tuple[str, ...] = ("add", "reversal", "sort", "modadd")
ONE_OPERAND = ("reversal", "sort")


def task_bos_id(task: str) -> int:
    if task not in TASKS:
        raise ValueError(f"unknown toy task {task!r}; choose from {', '.join(TASKS)}")
    return 1 + TASKS.index(task)


def seq_len(n_digits: int = 3) -> int:
    return 3 * n_digits + 5


def prompt_len(n_digits: int = 3) -> int:
    """Tokens up to and including EQ."""
    return 2 * n_digits + 3


def answer_span(n_digits: int = 3) -> slice:
    """Positions of the answer digits (9..12 for n_digits=3)."""
    start = prompt_len(n_digits)
    return slice(start, start + n_digits + 1)


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """[n] non-negative ints -> [n, width] decimal digits, most significant first."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers[None, :]) % 10


def answers(task: str, a: np.ndarray, b: np.ndarray, n_digits: int = 3, modulus: int = 1000) -> np.ndarray:
    """[n] answer values for operands a, b (b ignored by one-operand tasks)."""
    if task == "add":
        return a + b
    if task == "modadd":
        return (a + b) % modulus
    digits = _digits(a, n_digits)
    if task == "reversal":
        digits = digits[:, ::-1]
    elif task == "sort":
        digits = np.sort(digits, axis=1)
    else:
        task_bos_id(task)  # raises the unknown-task error
    return digits @ (10 ** np.arange(n_digits - 1, -1, -1, dtype=np.int64))


def make_examples(task: str, n: int, seed: int, n_digits: int = 3, modulus: int = 1000) -> np.ndarray:
    """[n, 3*n_digits+5] int32 token rows of `task`, deterministic in `seed`."""
    bos = task_bos_id(task)
    if n_digits < 1:
        raise ValueError("n_digits must be >= 1")
    if task == "modadd" and not 1 <= modulus <= 10 ** (n_digits + 1):
        raise ValueError(f"modulus must be in [1, 10**{n_digits + 1}] so answers fit {n_digits + 1} digits")
    rng = np.random.default_rng([seed, bos])
    a = rng.integers(0, 10**n_digits, size=n, dtype=np.int64)
    b = rng.integers(0, 10**n_digits, size=n, dtype=np.int64)
    out = np.empty((n, seq_len(n_digits)), dtype=np.int32)
    out[:, 0] = bos
    out[:, 1 : 1 + n_digits] = DIGIT0 + _digits(a, n_digits)
    out[:, 1 + n_digits] = SEP
    b_cols = slice(2 + n_digits, 2 + 2 * n_digits)
    out[:, b_cols] = NULL if task in ONE_OPERAND else DIGIT0 + _digits(b, n_digits)
    out[:, 2 + 2 * n_digits] = EQ
    out[:, answer_span(n_digits)] = DIGIT0 + _digits(answers(task, a, b, n_digits, modulus), n_digits + 1)
    out[:, -1] = EOS
    return out


def exact_match(pred_bt: np.ndarray, target_bt: np.ndarray, n_digits: int = 3) -> float:
    """Fraction of rows whose answer span matches exactly.

    Both arguments are full [B, seq_len] token rows (e.g. greedy continuations of the prompt and the
    reference examples); only the answer span is compared.
    """
    pred, target = np.asarray(pred_bt), np.asarray(target_bt)
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"batch sizes differ: {pred.shape} vs {target.shape}")
    span = answer_span(n_digits)
    return float(np.mean(np.all(pred[:, span] == target[:, span], axis=1)))


def decode(row: np.ndarray) -> str:
    """Human-readable form of one row, e.g. '<bos_add> 1 2 3 <sep> ...'."""
    return " ".join(TOY_VOCAB[int(t)] for t in row)
