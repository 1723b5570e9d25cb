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

Chat-style scoring (the instruct experiment's protocol; each question also carries its bare "question"
text and "options"): the question goes into one user turn, `chat_mcq_prompt` (the standard "ANSWER:
$LETTER" multiple-choice instruction, options as "A) ..."), rendered with the model's chat template and
its generation prompt (`chat_encode`: user text -> prompt ids). Two ways to read the answer:
- `chat` (`score_chat_generate`): the model's greedy completion (stopped at an end-of-turn id or after
  `max_new_tokens`), its letter read by `parse_answer_letter`; a completion with no readable letter, or a
  letter past the last option, counts as wrong (and is counted in `unparsed`).
- `chat_loglik` (`score_chat_loglik`, what the authors' instruct sweep logs as `chat_mcq/*/accuracy`):
  the completions "ANSWER: A", "ANSWER: B", ... each scored by summed log-likelihood after the chat
  prompt; the prediction is the argmax.
Chat prompts are never cut: a question whose prompt (+ answer) does not fit `cfg.seq_len` is skipped,
left out of the accuracy and counted in `skipped` (as the authors do).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from forgetting.core import files as files_lib
from forgetting.core import losses, model

Question = dict[str, Any]
SCORINGS = ("loglik", "chat", "chat_loglik")
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


def _summed_logprobs(cfg: Any, params: Any, rows: Sequence[tuple[list[int], int]], batch_size: int) -> np.ndarray:
    """Per (tokens, n): the summed log-likelihood of the last n tokens given the ones before (float64 [R])."""
    cap = int(cfg.seq_len)
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
    return scores


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
    scores = _summed_logprobs(cfg, params, rows, batch_size)
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


# --- chat-style multiple choice --------------------------------------------------------------------------
def chat_mcq_prompt(question: str, options: Sequence[str]) -> str:
    """The user turn of a chat-style question: the instruction to answer "ANSWER: $LETTER", the question,
    then the options as "A) text" lines (the wording of inspect_ai's single-answer template, which the
    authors' chat MCQ evaluation uses)."""
    letters = ",".join(LETTERS[i] for i in range(len(options)))
    listed = "\n".join(f"{LETTERS[i]}) {text}" for i, text in enumerate(options))
    return ("Answer the following multiple choice question. The entire content of your response should be of "
            f"the following format: 'ANSWER: $LETTER' (without quotes) where LETTER is one of {letters}.\n\n"
            f"{question.strip()}\n\n{listed}")


def answer_completions(n_options: int) -> list[str]:
    """The answers `chat_loglik` compares: "ANSWER: A", "ANSWER: B", ..."""
    return [f"ANSWER: {LETTERS[i]}" for i in range(n_options)]


def parse_answer_letter(completion: str, n_options: int) -> int | None:
    """The option index a completion names, or None when no valid letter can be read.

    In order: the last "ANSWER: X" (the format asked for; spaces and a "$" allowed around the colon), else
    the last "X)" , else the last letter standing alone as a word; X among the first `n_options` capital
    letters. The last two are the lenient fallback the authors' scorer uses; note that the last one reads
    an English article "A" as option A.
    """
    import re

    valid = LETTERS[:n_options]
    if not valid:
        return None
    for pattern in (rf"ANSWER\s*:\s*\$?([{valid}])\b", rf"([{valid}])\)", rf"\b([{valid}])\b"):
        found = re.findall(pattern, completion)
        if found:
            return valid.index(found[-1])
    return None


def _chat_prompts(chat_encode: Callable[[str], list[int]], questions: Sequence[Question]) -> list[list[int]]:
    prompts = []
    for qi, q in enumerate(questions):
        if "question" not in q or "options" not in q:
            raise ValueError(f"question {qi}: chat scoring needs the 'question' and 'options' fields (the readers "
                             "of this module write them)")
        prompts.append(list(chat_encode(chat_mcq_prompt(q["question"], q["options"]))))
    return prompts


def score_chat_loglik(cfg: Any, params: Any, chat_encode: Callable[[str], list[int]],
                      encode: Callable[[str], list[int]], questions: Sequence[Question], *,
                      batch_size: int = 8) -> dict[str, float]:
    """{"acc", "n", "skipped"}: argmax over options of log p("ANSWER: X" | chat prompt) (module doc)."""
    cap = int(cfg.seq_len)
    rows: list[tuple[list[int], int]] = []
    owners: list[int] = []
    skipped = 0
    kept: list[Question] = []
    for q, prompt in zip(questions, _chat_prompts(chat_encode, questions)):
        answers = [list(encode(a)) for a in answer_completions(len(q["options"]))]
        if any(not a for a in answers) or len(prompt) + max(len(a) for a in answers) > cap:
            skipped += 1
            continue
        for a in answers:
            rows.append((prompt + a, len(a)))
            owners.append(len(kept))
        kept.append(q)
    if not kept:
        return {"acc": float("nan"), "n": 0, "skipped": skipped}
    scores = _summed_logprobs(cfg, params, rows, batch_size)
    per_q: list[list[float]] = [[] for _ in kept]
    for i, qi in enumerate(owners):
        per_q[qi].append(scores[i])
    correct = sum(int(np.argmax(s)) == int(q["answer_index"]) for q, s in zip(kept, per_q))
    return {"acc": correct / len(kept), "n": len(kept), "skipped": skipped}


def chat_completions(cfg: Any, params: Any, prompts: Sequence[list[int]], *, eos_ids: Sequence[int],
                     pad_id: int, max_new_tokens: int, batch_size: int = 8) -> list[list[int]]:
    """Greedy completions (ids after the prompt, through the first EOS id, at most `max_new_tokens`).
    Prompt widths are bucketed to powers of two and batches padded to `batch_size`, so a benchmark
    compiles a few sampling programs."""
    from forgetting.core import sampling

    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    eos = tuple(int(e) for e in eos_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = _bucket(max(len(prompts[i]) for i in idx), 1 << 30, minimum=8)
        ids = np.full((batch_size, width), pad_id, np.int32)
        lens = np.ones(batch_size, np.int32)
        for r, i in enumerate(idx):
            ids[r, :len(prompts[i])] = prompts[i]
            lens[r] = len(prompts[i])
        length = width + max_new_tokens
        # Sampling sizes its KV cache from seq_len: give the chat its own length (same parameters).
        gen_cfg = dataclasses.replace(cfg, seq_len=length) if length != cfg.seq_len else cfg
        rows = np.asarray(sampling.sample(gen_cfg, params, jnp.asarray(ids), jax.random.key(0), 0.0, eos_id=eos,
                                          pad_id=pad_id, length=length, prompt_lengths=lens))
        for r, i in enumerate(idx):
            completion = []
            for t in rows[r, lens[r]:lens[r] + max_new_tokens]:
                completion.append(int(t))
                if int(t) in eos:
                    break
            out[i] = completion
    return out


def score_chat_generate(cfg: Any, params: Any, chat_encode: Callable[[str], list[int]],
                        decode: Callable[[list[int]], str], questions: Sequence[Question], *,
                        eos_ids: Sequence[int], pad_id: int, max_new_tokens: int = 32, max_prompt_len: int = 0,
                        batch_size: int = 8) -> dict[str, Any]:
    """{"acc", "n", "skipped", "unparsed", "completions"}: the letter read from each greedy completion;
    unreadable completions count as wrong (`unparsed` counts them). Prompts longer than `max_prompt_len`
    (0: no limit) are skipped."""
    prompts = _chat_prompts(chat_encode, questions)
    keep = [i for i, p in enumerate(prompts) if not max_prompt_len or len(p) <= max_prompt_len]
    if not keep:
        return {"acc": float("nan"), "n": 0, "skipped": len(questions), "unparsed": 0, "completions": []}
    completions = chat_completions(cfg, params, [prompts[i] for i in keep], eos_ids=eos_ids, pad_id=pad_id,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = unparsed = 0
    texts = []
    eos = {int(e) for e in eos_ids}
    for i, ids in zip(keep, completions):
        text = decode([t for t in ids if t not in eos])
        texts.append(text)
        letter = parse_answer_letter(text, len(questions[i]["options"]))
        unparsed += letter is None
        correct += letter is not None and letter == int(questions[i]["answer_index"])
    return {"acc": correct / len(keep), "n": len(keep), "skipped": len(questions) - len(keep),
            "unparsed": unparsed, "completions": texts}


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
        import pyarrow.parquet as pq  # (optional)

        return pq.read_table(path).to_pylist()
    except ImportError:
        pass
    try:
        import pandas as pd  # (optional)
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
        return files_lib.loads_json_lines(text, path)
    data = files_lib.loads_json(text, path)
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
            import datasets  # (optional `hf` extra)
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
            "answer_index": answer, "question": str(row["question"]).strip(), "options": [str(c) for c in choices]}


def arc_question(row: dict) -> Question | None:
    question, labels, texts = _labelled_choices(row)
    key = str(row.get("answerKey", "")).strip()
    if key not in labels:
        return None
    return {"prompt": f"Question: {question}\nAnswer:", "choices": [f" {t}" for t in texts],
            "answer_index": labels.index(key), "question": question, "options": texts}


def csqa_question(row: dict) -> Question | None:
    question, labels, texts = _labelled_choices(row)
    key = str(row.get("answerKey", "")).strip()
    if key not in labels:
        return None
    body = "".join(f"{LETTERS[i]}. {t}\n" for i, t in enumerate(texts))
    return {"prompt": f"Question: {question}\n{body}Answer:", "choices": [f" {LETTERS[i]}" for i in range(len(texts))],
            "answer_index": labels.index(key), "question": question, "options": texts}


_CONVERTERS = {"mmlu": mmlu_question, "arc_challenge": arc_question, "commonsense_qa": csqa_question}


def shuffled(rows: list, seed: int | None) -> list:
    """`rows` in the order Python's `random.Random(seed).shuffle` leaves them (the authors draw their
    evaluation subsets so: shuffle with seed 42, keep the first N); None keeps the order."""
    import random

    rows = list(rows)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows


def load_benchmark(name: str, source: str | Path | None = None, *, split: str | None = None,
                   limit: int | None = None, shuffle_seed: int | None = None) -> list[Question]:
    """The questions of benchmark `name` (one of BENCHMARKS) from `source` (default: its hub id); with
    `shuffle_seed` the rows are shuffled (`shuffled`) before the first `limit` are kept."""
    if name not in _CONVERTERS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {BENCHMARKS}")
    rows = shuffled(read_rows(source or DEFAULT_HF[name], split=split), shuffle_seed)
    questions = [q for q in (_CONVERTERS[name](r) for r in rows) if q is not None]
    return questions[:limit] if limit else questions


@dataclasses.dataclass(frozen=True)
class ChatScoring:
    """What chat-style scoring needs besides the model: `chat_encode` (user text -> the chat prompt's ids,
    generation prompt included), `decode` (ids -> text), the end-of-turn ids and a padding id, and the
    longest greedy completion (`chat` only)."""

    chat_encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_ids: tuple[int, ...]
    pad_id: int
    max_new_tokens: int = 32


def evaluate_benchmarks(cfg: Any, params: Any, encode: Callable[[str], list[int]],
                        sources: dict[str, str | Path | Iterable[Question]], *, bos_id: int | None = None,
                        limit: int | dict[str, int] | None = None, batch_size: int = 8, scoring: str = "loglik",
                        chat: ChatScoring | None = None, shuffle_seed: int | None = None) -> dict[str, Any]:
    """{"mmlu", "arc_challenge", "commonsense_qa", "average"} accuracies for the benchmarks in `sources` (a
    path/`hf:` id, or the questions), scored by `scoring` (SCORINGS; module doc). loglik adds
    "<name>_norm" and "average_norm" (acc_norm); the chat scorings add "<name>_n" and "<name>_skipped",
    and `chat` "<name>_unparsed" (completions with no readable letter, counted wrong). `limit` is one cap for
    all or {name: cap} (0/None = all); `shuffle_seed` shuffles each benchmark before the cap (`shuffled`)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring != "loglik" and chat is None:
        raise ValueError(f"scoring {scoring!r} needs the chat template (a ChatScoring)")
    out: dict[str, Any] = {"scoring": scoring}
    for name, source in sources.items():
        cap = (limit.get(name) if isinstance(limit, dict) else limit) or None
        if isinstance(source, (str, Path)):
            questions = load_benchmark(name, source, limit=cap, shuffle_seed=shuffle_seed)
        else:
            questions = shuffled(list(source), shuffle_seed)
            questions = questions[:cap] if cap else questions
        if scoring == "loglik":
            result = score_multiple_choice(cfg, params, encode, questions, bos_id=bos_id, batch_size=batch_size)
            out[name], out[f"{name}_norm"] = result["acc"], result["acc_norm"]
            continue
        if scoring == "chat_loglik":
            result = score_chat_loglik(cfg, params, chat.chat_encode, encode, questions, batch_size=batch_size)
        else:
            result = score_chat_generate(cfg, params, chat.chat_encode, chat.decode, questions, eos_ids=chat.eos_ids,
                                         pad_id=chat.pad_id, max_new_tokens=chat.max_new_tokens,
                                         max_prompt_len=max(1, int(cfg.seq_len) - chat.max_new_tokens),
                                         batch_size=batch_size)
            out[f"{name}_unparsed"] = result["unparsed"]
        out[name], out[f"{name}_n"], out[f"{name}_skipped"] = result["acc"], result["n"], result["skipped"]
    names = [n for n in sources]
    if names:
        out["average"] = float(np.mean([out[n] for n in names]))
        if scoring == "loglik":
            out["average_norm"] = float(np.mean([out[f"{n}_norm"] for n in names]))
    return out


def write_tiny_benchmarks(directory: str | Path) -> dict[str, Path]:
    """Writes a few hand-made questions per benchmark in the standard layouts (the tests' stand-ins for the real files):
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
