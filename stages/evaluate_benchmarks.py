"""Stage `evaluate_benchmarks`: multiple-choice benchmark accuracy and per-token accuracy on a new domain.

    python -m forgetting.stages.evaluate_benchmarks --model.load_path RUN_OR_HF_DIR \
        --mmlu mmlu.jsonl --arc arc_challenge.jsonl --csqa commonsense_qa.jsonl [--domain.path verilog.bin]

Prints one JSON object: `mmlu`, `arc_challenge`, `commonsense_qa` (accuracy: argmax of the summed
answer log-likelihood, see `stages.benchmarks`), their unweighted mean `average` (the paper's number),
the `*_norm` variants, and with `--domain.path` the per-token accuracy `domain_token_acc` (argmax next
token == target, over the domain file's validation split as the train stage splits it; padding of packed
files excluded). `--model.load_path` is a Hugging Face Llama directory or a finished run directory; a run
finetuned from a HF checkpoint finds its tokenizer by following `loaded_from` back to that directory.

`--scoring` chooses how a question is answered (`stages.benchmarks`): `loglik` (default; the plain-text
prompts above), `chat_loglik` (the question in the chat template with the generation prompt; the options
"ANSWER: A".. scored by log-likelihood: the authors' instruct evaluation) or `chat` (the same chat prompt;
the letter read from the greedy completion, at most `--max_new_tokens`; unreadable answers count as wrong
and are reported as `<name>_unparsed`). The chat template is the tokenizer's (`chat_template.jinja`,
`tokenizer_config.json`, or the GGUF's), or `--chat_template FILE_OR_DIR`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from forgetting.core import model as model_lib
from forgetting.evals import benchmarks
from forgetting.training import cli, runs


@dataclass(frozen=True)
class BenchModelArgs:
    """The model to evaluate."""

    load_path: str = ""  # a Hugging Face Llama/Qwen checkpoint directory, a .gguf or a finished run directory
    tokenizer: str = ""  # HF directory holding the tokenizer; default: the checkpoint's own (or its lineage's)
    dtype: str = "bfloat16"  # matmul input dtype: bfloat16 or float32
    seq_len: int = 1024  # longest scored prompt + answer (older prompt tokens are cut); 0 = the model's own


@dataclass(frozen=True)
class DomainArgs:
    """The new domain's token file: per-token accuracy over its validation split."""

    path: str = ""  # .bin token file (empty: no domain accuracy)
    seq_len: int = 0  # row length, as the train stage's --model.seq_len; 0 = the loaded model's seq_len
    num_tokens_valid: int = 262_144  # as the train stage's --data.num_tokens_valid
    split_seed: int = 0  # as the train stage's --data.split_seed
    max_rows: int = 0  # cap on validation rows (0 = all)
    batch_size: int = 8  # rows per forward


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark accuracies (MMLU, ARC-Challenge, CommonsenseQA, their average) and domain token accuracy."""

    model: BenchModelArgs = field(default_factory=BenchModelArgs)
    domain: DomainArgs = field(default_factory=DomainArgs)
    mmlu: str = ""  # MMLU questions: .jsonl/.json/.parquet/dir or hf:cais/mmlu:all:test ("" = skip)
    arc: str = ""  # ARC-Challenge questions (allenai/ai2_arc layout) ("" = skip)
    csqa: str = ""  # CommonsenseQA questions (tau/commonsense_qa layout) ("" = skip)
    limit: int = 0  # at most this many questions per benchmark (0 = all)
    mmlu_limit: int = 0  # MMLU's own cap (0 = --limit)
    arc_limit: int = 0  # ARC-Challenge's own cap (0 = --limit)
    csqa_limit: int = 0  # CommonsenseQA's own cap (0 = --limit)
    shuffle_seed: int = -1  # >= 0: shuffle each benchmark with Python's random.Random(seed) before the caps
    batch_size: int = 8  # (question, choice) rows per forward
    scoring: str = "loglik"  # loglik | chat_loglik (chat prompt, "ANSWER: X" log-lik.) | chat (greedy answer's letter)
    chat_template: str = ""  # chat scorings: a .jinja file, directory / tokenizer_config.json or .gguf ("" = the tokenizer's)
    max_new_tokens: int = 32  # --scoring chat: longest greedy answer

    def validate(self) -> None:
        if not self.model.load_path:
            raise ValueError("pass --model.load_path (a HF checkpoint directory or a finished run directory)")
        if not (self.mmlu or self.arc or self.csqa or self.domain.path):
            raise ValueError("nothing to evaluate: pass --mmlu/--arc/--csqa and/or --domain.path")
        if self.model.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--model.dtype must be bfloat16 or float32, got {self.model.dtype!r}")
        if self.scoring not in benchmarks.SCORINGS:
            raise ValueError(f"--scoring must be one of {', '.join(benchmarks.SCORINGS)}, got {self.scoring!r}")
        if self.chat_template and self.scoring == "loglik":
            raise ValueError("--chat_template is used by the chat scorings only; pass --scoring chat or chat_loglik")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("mmlu_limit", "arc_limit", "csqa_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0 (0 = --limit), got {getattr(self, name)}")
        if self.shuffle_seed < -1:
            raise ValueError(f"--shuffle_seed must be >= 0 (or -1: file order), got {self.shuffle_seed}")
        if self.limit < 0 or self.batch_size <= 0:
            raise ValueError(f"--limit must be >= 0 (0 = all) and --batch_size positive, got {self.limit}, "
                             f"{self.batch_size}")


def find_tokenizer_source(path: str | Path, explicit: str = "") -> Path:
    """Where a checkpoint's HF tokenizer lives: `explicit`, the directory (or .gguf file) itself, or the HF
    directory or .gguf a run (or its ancestors) was finetuned from."""
    if explicit:
        return Path(explicit)
    path, seen = Path(path), set()
    while path not in seen:
        seen.add(path)
        if path.suffix == ".gguf" and path.is_file():  # a llama.cpp file carries its tokenizer
            return path
        if runs.is_hf_checkpoint(path):
            return path
        config = path / runs.CONFIG_FILE
        if not config.exists():
            break
        parent = (json.loads(config.read_text()).get("resolved") or {}).get("loaded_from")
        if not parent:
            break
        path = Path(parent)
    raise FileNotFoundError(f"no Hugging Face tokenizer found for {path}; pass --model.tokenizer HF_DIR")


def find_tokenizer(path: str | Path, explicit: str = ""):
    """The HF tokenizer of a checkpoint (found as `find_tokenizer_source` says)."""
    from forgetting.formats import hf_checkpoint

    source = find_tokenizer_source(path, explicit)
    if source.is_dir() and (source / "config.json").exists():
        return hf_checkpoint.load_tokenizer(source, json.loads((source / "config.json").read_text()))
    return hf_checkpoint.load_tokenizer(source)


def chat_scoring(tok: Any, source: str | Path, max_new_tokens: int = 32) -> benchmarks.ChatScoring:
    """Chat-style scoring inputs for tokenizer `tok`: the template and special-token names of `source` (a
    .jinja file, a checkpoint directory / tokenizer_config.json or a .gguf). The prompt is the rendering of
    one user turn with the generation prompt, special-token text read as special ids (no BOS is added:
    templates that want one write it)."""
    from forgetting.formats import chat_template as ct

    source = Path(source)
    template = source.read_text(encoding="utf-8") if source.suffix == ".jinja" else ct.load_chat_template(source)
    special = {} if source.suffix == ".jinja" else ct.special_tokens_of(source)
    if not hasattr(tok, "tokenizer"):
        raise ValueError(f"{source}: chat scoring needs a tokenizer.json or GGUF tokenizer (tokenizers library)")

    def chat_encode(text: str) -> list[int]:
        rendered = ct.render(template, [{"role": "user", "content": text}], add_generation_prompt=True,
                             special_tokens=special)
        return list(tok.tokenizer.encode(rendered, add_special_tokens=False).ids)

    eos = tuple(tok.eos_ids or (tok.eos_id,))
    return benchmarks.ChatScoring(chat_encode=chat_encode, decode=lambda ids: tok.decode(ids), eos_ids=eos,
                                  pad_id=int(tok.eos_id), max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _masked_hits(cfg: Any, params: Any, tokens_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model_lib.forward(cfg, params, tokens_bt)
    hits = (jnp.argmax(logits[:, :-1], axis=-1) == tokens_bt[:, 1:]).astype(jnp.float32)
    w = mask_bt[:, 1:].astype(jnp.float32)
    return jnp.sum(hits * w), jnp.sum(w)


def domain_token_accuracy(cfg: Any, params: Any, dataset, *, batch_size: int = 8, max_rows: int = 0) -> float:
    """Per-token accuracy over a SequenceDataset's validation split (targets that are padding excluded;
    batches padded to a fixed size with zero-weight rows so one program serves all of them)."""
    hits = count = 0.0
    rows_seen = 0
    for batch, mask in dataset.valid_batches(batch_size, with_mask=True):
        if max_rows and rows_seen >= max_rows:
            break
        batch = batch[: max_rows - rows_seen] if max_rows else batch
        mask = None if mask is None else mask[: batch.shape[0]]
        rows_seen += batch.shape[0]
        mask = np.ones(batch.shape, np.float32) if mask is None else mask
        n = batch.shape[0]
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, batch.shape[1]), batch.dtype)])
            mask = np.concatenate([mask, np.zeros((batch_size - n, mask.shape[1]), np.float32)])
        h, c = _masked_hits(cfg, params, jnp.asarray(batch, jnp.int32), jnp.asarray(mask))
        hits, count = hits + float(h), count + float(c)
    if not count:
        raise ValueError(f"{dataset.token_file.path}: no validation tokens; raise --domain.num_tokens_valid")
    return hits / count


def evaluate(cfg: BenchConfig) -> dict:
    from forgetting.training.train_setup import _open_dataset

    cfg.validate()
    loaded = runs.load_run(cfg.model.load_path, dtype=cfg.model.dtype)
    mc = loaded.model_cfg
    train_seq_len = mc.seq_len  # a run's own; a HF directory's min(max_position_embeddings, 2048)
    out: dict = {"run_dir": str(loaded.path)}
    sources = {name: src for name, src in (("mmlu", cfg.mmlu), ("arc_challenge", cfg.arc),
                                           ("commonsense_qa", cfg.csqa)) if src}
    if sources:
        tok_source = find_tokenizer_source(loaded.path, cfg.model.tokenizer)
        tok = find_tokenizer(loaded.path, cfg.model.tokenizer)
        bench_cfg = mc
        if cfg.model.seq_len and hasattr(mc, "bos_id"):  # Llama: seq_len only sizes buffers (RoPE positions)
            bench_cfg = dataclasses.replace(mc, seq_len=cfg.model.seq_len)
        bos = getattr(mc, "bos_id", tok.bos_id)
        chat = None
        if cfg.scoring != "loglik":
            chat = chat_scoring(tok, cfg.chat_template or tok_source, cfg.max_new_tokens)
        out.update(benchmarks.evaluate_benchmarks(bench_cfg, loaded.params, tok.encode, sources, bos_id=bos,
                                                  limit={"mmlu": cfg.mmlu_limit or cfg.limit,
                                                         "arc_challenge": cfg.arc_limit or cfg.limit,
                                                         "commonsense_qa": cfg.csqa_limit or cfg.limit},
                                                  batch_size=cfg.batch_size, scoring=cfg.scoring, chat=chat,
                                                  shuffle_seed=None if cfg.shuffle_seed < 0 else cfg.shuffle_seed))
    if cfg.domain.path:
        d = cfg.domain
        dataset = _open_dataset(d.path, mc.vocab_size, d.seq_len or train_seq_len, d.num_tokens_valid, d.split_seed,
                                "--domain.path")
        out["domain_token_acc"] = domain_token_accuracy(mc, loaded.params, dataset, batch_size=d.batch_size,
                                                        max_rows=d.max_rows)
        out["domain_rows"] = min(dataset.num_valid, d.max_rows) if d.max_rows else dataset.num_valid
    return out


run = evaluate


def main(argv: list[str] | None = None) -> dict:
    return cli.run_and_print(BenchConfig, evaluate, argv)


if __name__ == "__main__":
    main()
