"""Multiple-choice benchmarks scored by answer log-likelihood, and per-token accuracy.

A question is `{"prompt": str, "choices": [str, ...], "answer_index": int}`. Each choice is scored by
sum log p(choice tokens | [BOS] + prompt tokens); the prediction is the argmax (`acc`), and, as
lm-evaluation-harness's `acc_norm`, the argmax of that sum divided by the choice's length in UTF-8 bytes.
Choices carry their own leading space (" A", " Paris"), as the readers below write them.

Scoring is batched: rows of (prompt + choice) are right-padded to a length bucket (a power of two, at
most `cfg.seq_len`; prompts longer than that lose their oldest tokens) and the batch to a fixed size, with
a mask over the choice tokens, so a whole benchmark compiles a handful of programs at most.

Readers (local `.json` list / `.jsonl` / `.parquet` (pandas or pyarrow needed only for parquet) /
a directory of them, or `hf:NAME[:CONFIG][:SPLIT]` through the optional `datasets` package):
- MMLU (cais/mmlu rows: question, subject, choices[4], answer int or letter) -> the harness's prompt
  "The following are multiple choice questions (with answers) about {subject}.\\n\\n{question}\\nA. ..
  \\nD. ..\\nAnswer:" with choices " A".." D".
- ARC-Challenge (allenai/ai2_arc rows: question, choices{text,label}, answerKey; also the original
  nested {"question": {"stem", "choices": [{label, text}]}}) -> "Question: {q}\\nAnswer:" with choices
  " {text}".
- CommonsenseQA (tau/commonsense_qa rows, same shapes as ARC) -> "Question: {q}\\nA. ..\\nE. ..\\nAnswer:"
  with choices " A".." E". Rows without an answer key (the hidden test split) are skipped.
`evaluate_benchmarks` reports each accuracy and their unweighted mean ("average", the paper's number).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from forgetting.core import losses, model

Question = dict[str, Any]
BENCHMARKS = ("mmlu", "arc_challenge", "commonsense_qa")
LETTERS = "ABCDEFGHIJ"
DEFAULT_HF = {"mmlu": "hf:cais/mmlu:all:test", "arc_challenge": "hf:allenai/ai2_arc:ARC-Challenge:test",
              "commonsense_qa": "hf:tau/commonsense_qa:default:validation"}


# --- scoring ------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg",))
def _choice_logprobs(cfg: Any, params: Any, tokens_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Sum over masked target positions of log p(token | prefix), per row [B]."""
    logits = model.forward(cfg, params, tokens_bt)
    nll = losses.next_token_nll(logits, tokens_bt)  # [B, T-1], column j predicts token j+1
    return -jnp.sum(nll * mask_bt[:, 1:].astype(jnp.float32), axis=-1)


def _bucket(n: int, cap: int, minimum: int = 16) -> int:
    size = minimum
    while size < n:
        size *= 2
    return min(size, cap)


def choice_logprobs(cfg: Any, params: Any, encode: Callable[[str], list[int]], questions: Sequence[Question], *,
                    bos_id: int | None = None, batch_size: int = 8) -> list[np.ndarray]:
    """Per question, the summed log-likelihood of each choice (float64 [n_choices])."""
    rows: list[tuple[list[int], int]] = []  # (tokens, number of choice tokens at the end)
    owners: list[int] = []
    cap = int(cfg.seq_len)
    for qi, q in enumerate(questions):
        context = ([] if bos_id is None else [int(bos_id)]) + list(encode(q["prompt"]))
        for choice in q["choices"]:
            cont = list(encode(choice))
            if not cont:
                raise ValueError(f"question {qi}: choice {choice!r} encodes to no tokens")
            if len(cont) >= cap:
                raise ValueError(f"question {qi}: choice of {len(cont)} tokens does not fit seq_len {cap}")
            toks = context + cont
            if len(toks) > cap:  # keep the choice and the most recent context
                toks = toks[-cap:]
            rows.append((toks, len(cont)))
            owners.append(qi)
    scores = np.zeros(len(rows), np.float64)
    # Group rows by length bucket (longest first) so each batch compiles for one (batch, length) shape.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = _bucket(max(len(rows[i][0]) for i in idx), cap)
        tokens = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), np.float32)
        for r, i in enumerate(idx):
            toks, n_cont = rows[i]
            tokens[r, :len(toks)] = toks
            mask[r, len(toks) - n_cont:len(toks)] = 1.0
        out = np.asarray(_choice_logprobs(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
        scores[idx] = out[:len(idx)]
    result: list[list[float]] = [[] for _ in questions]
    for i, qi in enumerate(owners):
        result[qi].append(scores[i])
    return [np.asarray(r) for r in result]


def score_multiple_choice(cfg: Any, params: Any, encode: Callable[[str], list[int]],
                          questions: Sequence[Question], *, bos_id: int | None = None,
                          batch_size: int = 8) -> dict[str, float]:
    """{"acc", "acc_norm", "n"} over `questions` (ties go to the first choice)."""
    if not questions:
        return {"acc": float("nan"), "acc_norm": float("nan"), "n": 0}
    all_scores = choice_logprobs(cfg, params, encode, questions, bos_id=bos_id, batch_size=batch_size)
    correct = correct_norm = 0
    for q, scores in zip(questions, all_scores):
        lengths = np.asarray([max(len(c.encode("utf-8")), 1) for c in q["choices"]], np.float64)
        correct += int(np.argmax(scores)) == int(q["answer_index"])
        correct_norm += int(np.argmax(scores / lengths)) == int(q["answer_index"])
    n = len(questions)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _token_hits(cfg: Any, params: Any, tokens_bt: jax.Array, row_mask_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model.forward(cfg, params, tokens_bt)
    hits = (jnp.argmax(logits[:, :-1], axis=-1) == tokens_bt[:, 1:]).astype(jnp.float32)
    w = row_mask_b.astype(jnp.float32)[:, None]
    return jnp.sum(hits * w), jnp.sum(jnp.broadcast_to(w, hits.shape))


def token_accuracy(cfg: Any, params: Any, tokens_bt: Any, *, batch_size: int = 8) -> float:
    """Fraction of next-token predictions (argmax) equal to the target, over all T-1 positions of every
    row of int tokens [N, T] (e.g. the new domain's validation sequences)."""
    tokens = np.asarray(tokens_bt)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [N, T] with T >= 2, got shape {tokens.shape}")
    hits = count = 0.0
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size].astype(np.int32)
        n = chunk.shape[0]
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, chunk.shape[1]), np.int32)])
        row_mask = (np.arange(batch_size) < n).astype(np.float32)
        h, c = _token_hits(cfg, params, jnp.asarray(chunk), jnp.asarray(row_mask))
        hits += float(h)
        count += float(c)
    return hits / count


# --- reading rows -------------------------------------------------------------------------------------------
def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 (optional)

        return pq.read_table(path).to_pylist()
    except ImportError:
        pass
    try:
        import pandas as pd  # noqa: PLC0415 (optional)
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow or pandas; use a .json/.jsonl file instead") from None
    return [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}
            for row in pd.read_parquet(path).to_dict(orient="records")]


def _rows_of_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):  # {"rows": [...]} / {"data": [...]} / datasets-server {"rows": [{"row": ...}]}
        for key in ("rows", "data", "examples", "questions"):
            if key in data:
                data = data[key]
                break
        else:
            raise ValueError(f"{path}: expected a JSON list of rows or a dict with 'rows'/'data'")
    return [r["row"] if isinstance(r, dict) and set(r) >= {"row"} and isinstance(r["row"], dict) else r for r in data]


def read_rows(source: str | Path, *, split: str | None = None) -> list[dict]:
    """Rows from a local file or directory, or `hf:NAME[:CONFIG][:SPLIT]` via the `datasets` package.
    In a directory, files whose name contains `split` are preferred when given."""
    text = str(source)
    if text.startswith("hf:"):
        parts = text[3:].split(":")
        name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        hf_split = parts[2] if len(parts) > 2 else (split or "test")
        try:
            import datasets  # noqa: PLC0415 (optional `hf` extra)
        except ImportError:
            raise ImportError(f"{text}: reading from the Hugging Face hub needs the optional `hf` extra "
                              "(pip install 'forgetting[hf]'); or pass a local .json/.jsonl/.parquet file") from None
        return [dict(r) for r in datasets.load_dataset(name, config, split=hf_split)]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".json", ".jsonl", ".parquet"))
        if split:
            chosen = [p for p in files if split in p.name]
            files = chosen or files
        if not files:
            raise FileNotFoundError(f"no .json/.jsonl/.parquet files in {path}")
        return [row for p in files for row in _rows_of_file(p)]
    if not path.exists():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    return _rows_of_file(path)


def _labelled_choices(row: dict) -> tuple[str, list[str], list[str]]:
    """(question, labels, texts) for ARC / CommonsenseQA rows (HF flat or original nested layout)."""
    question = row["question"]
    choices = row.get("choices")
    if isinstance(question, dict):  # original release: {"stem", "choices": [{"label", "text"}]}
        choices = question.get("choices", choices)
        question = question["stem"]
    if isinstance(choices, dict):
        labels, texts = list(choices["label"]), list(choices["text"])
    else:
        labels, texts = [c["label"] for c in choices], [c["text"] for c in choices]
    return str(question).strip(), [str(x) for x in labels], [str(x) for x in texts]


def mmlu_question(row: dict) -> Question:
    choices = list(row["choices"])
    answer = row["answer"]
    answer = LETTERS.index(answer.strip()) if isinstance(answer, str) and not answer.strip().isdigit() else int(answer)
    subject = str(row.get("subject", "")).replace("_", " ").strip()
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    body = str(row["question"]).strip() + "\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(choices))
    return {"prompt": header + body + "Answer:", "choices": [f" {LETTERS[i]}" for i in range(len(choices))],
            "answer_index": answer}


def arc_question(row: dict) -> Question | None:
    question, labels, texts = _labelled_choices(row)
    key = str(row.get("answerKey", "")).strip()
    if key not in labels:
        return None
    return {"prompt": f"Question: {question}\nAnswer:", "choices": [f" {t}" for t in texts],
            "answer_index": labels.index(key)}


def csqa_question(row: dict) -> Question | None:
    question, labels, texts = _labelled_choices(row)
    key = str(row.get("answerKey", "")).strip()
    if key not in labels:
        return None
    body = "".join(f"{LETTERS[i]}. {t}\n" for i, t in enumerate(texts))
    return {"prompt": f"Question: {question}\n{body}Answer:", "choices": [f" {LETTERS[i]}" for i in range(len(texts))],
            "answer_index": labels.index(key)}


_CONVERTERS = {"mmlu": mmlu_question, "arc_challenge": arc_question, "commonsense_qa": csqa_question}


def load_benchmark(name: str, source: str | Path | None = None, *, split: str | None = None,
                   limit: int | None = None) -> list[Question]:
    """The questions of benchmark `name` (one of BENCHMARKS) from `source` (default: its hub id)."""
    if name not in _CONVERTERS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {BENCHMARKS}")
    rows = read_rows(source or DEFAULT_HF[name], split=split)
    questions = [q for q in (_CONVERTERS[name](r) for r in rows) if q is not None]
    return questions[:limit] if limit else questions


def evaluate_benchmarks(cfg: Any, params: Any, encode: Callable[[str], list[int]],
                        sources: dict[str, str | Path | Iterable[Question]], *, bos_id: int | None = None,
                        limit: int | None = None, batch_size: int = 8) -> dict[str, float]:
    """{"mmlu", "arc_challenge", "commonsense_qa", "average"} accuracies (plus "<name>_norm" and
    "average_norm" with acc_norm) for the benchmarks in `sources` (a path/`hf:` id, or the questions)."""
    out: dict[str, float] = {}
    for name, source in sources.items():
        if isinstance(source, (str, Path)):
            questions = load_benchmark(name, source, limit=limit)
        else:
            questions = list(source)[:limit] if limit else list(source)
        result = score_multiple_choice(cfg, params, encode, questions, bos_id=bos_id, batch_size=batch_size)
        out[name], out[f"{name}_norm"] = result["acc"], result["acc_norm"]
    names = [n for n in sources]
    if names:
        out["average"] = float(np.mean([out[n] for n in names]))
        out["average_norm"] = float(np.mean([out[f"{n}_norm"] for n in names]))
    return out


def write_tiny_benchmarks(directory: str | Path) -> dict[str, Path]:
    """Writes a few hand-made questions per benchmark in the standard layouts (for `--scale mini`):
    mmlu.jsonl (cais/mmlu), arc_challenge.jsonl (allenai/ai2_arc), commonsense_qa.jsonl
    (tau/commonsense_qa). Returns name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mmlu = [
        {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1},
        {"question": "Which planet is known as the Red Planet?", "subject": "astronomy",
         "choices": ["Venus", "Jupiter", "Mars", "Saturn"], "answer": 2},
        {"question": "Water boils at sea level at how many degrees Celsius?", "subject": "high_school_physics",
         "choices": ["100", "90", "80", "0"], "answer": 0},
        {"question": "Which gas do plants absorb for photosynthesis?", "subject": "high_school_biology",
         "choices": ["Oxygen", "Nitrogen", "Helium", "Carbon dioxide"], "answer": 3},
    ]
    arc = [
        {"id": "tiny-1", "question": "Which of these is a source of light?",
         "choices": {"text": ["the Sun", "a rock", "a shadow", "the Moon's far side"], "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
        {"id": "tiny-2", "question": "What do animals need to breathe?",
         "choices": {"text": ["sand", "oxygen", "plastic", "salt"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
        {"id": "tiny-3", "question": "Ice melting into water is an example of a",
         "choices": {"text": ["chemical reaction", "change of state", "new element"], "label": ["A", "B", "C"]},
         "answerKey": "B"},
    ]
    csqa = [
        {"id": "t1", "question": "Where would you put a plate after washing it?", "question_concept": "plate",
         "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["cupboard", "ocean", "tree", "car engine", "moon"]},
         "answerKey": "A"},
        {"id": "t2", "question": "What do people use to write on paper?", "question_concept": "write",
         "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["spoon", "pen", "pillow", "shoe", "bucket"]},
         "answerKey": "B"},
        {"id": "t3", "question": "If you are hungry, what should you do?", "question_concept": "hungry",
         "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["sleep", "run", "eat", "swim", "sing"]},
         "answerKey": "C"},
    ]
    paths = {}
    for name, rows in (("mmlu", mmlu), ("arc_challenge", arc), ("commonsense_qa", csqa)):
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
