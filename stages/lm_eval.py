"""Stage `lm_eval`: lm-evaluation-harness tasks on a run directory, HF checkpoint directory or .gguf file.

    python -m forgetting.stages.lm_eval --load_path runs/<run> --tasks hellaswag my_tasks/held_out.yaml --limit 200
    python -m forgetting.stages.lm_eval --load_path SmolLM2.gguf --out evals/smol --tasks mmlu_local.yaml \
        --apply_chat_template true
    python -m forgetting.stages.lm_eval --load_path runs/<finetuned> --base runs/<pretrained> --tasks ...

Needs the `lmeval` extra (`pip install 'forgetting[lmeval]'`). `--tasks` takes harness task names (their
data must be reachable: the Hugging Face hub or its cache) or local YAML task files (a `task: NAME` line;
their data can be local JSON Lines: `dataset_path: json`, `dataset_kwargs: {data_files: ...}`). The model
is scored through `forgetting.evals.harness_model` (its doc says how each request kind is computed).

Writes the harness's results JSON (its own format, per-sample logs left out) to `<run>/lm_eval/results.json`
or `--out DIR/results.json` (needed for a HF directory or .gguf), and prints one summary line per model.
With `--base` (the run it was finetuned from; `loaded_from` = the run's own `loaded_from`), the base is
scored on the same tasks too and a before/after table with standard errors is printed (the forgetting
report); the base's results go to its own run directory's `lm_eval/`, or beside the run's as
`base_results.json`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetting.training import cli, runs


@dataclass(frozen=True)
class LmEvalConfig:
    """Score a model on lm-evaluation-harness tasks (names or local YAML files); optionally against its base."""

    load_path: str = ""  # a run directory, a HF checkpoint directory or a .gguf file
    tasks: tuple[str, ...] = ()  # harness task names or local YAML task files
    limit: float = 0.0  # at most this many documents per task (< 1: that fraction); 0 = all
    num_fewshot: int = -1  # few-shot examples per prompt; -1 = each task's own setting
    batch_size: int = 8  # rows per forward (and per sampler call)
    apply_chat_template: bool = False  # render prompts with the model's chat template (instruct models)
    chat_template: str = ""  # with --apply_chat_template: a .jinja file, HF directory or .gguf ("" = the tokenizer's)
    tokenizer: str = ""  # .tiktoken file, HF directory or .gguf ("" = the model's own, or its training data's)
    dtype: str = "float32"  # matmul input dtype: float32 or bfloat16
    seq_len: int = 0  # HF/GGUF models: positions to size for (0 = min(max_position_embeddings, 2048))
    max_length: int = 0  # longest scored window (0 = the model's seq_len)
    max_gen_toks: int = 0  # generation tasks: default cap on new tokens, 0 = min(256, max_length / 2) (a task's own wins)
    add_bos: str = "auto"  # auto (Llama-style families: yes; the paper model: no) | true | false
    seed: int = 0  # harness seeds (few-shot sampling) and the sampler's key
    bootstrap_iters: int = 1000  # bootstrap resamples for the stderrs of non-mean metrics (perplexities)
    out: str = ""  # results directory ("" = <run>/lm_eval; required for a HF directory or .gguf)
    base: str = ""  # the model it was finetuned from (or 'loaded_from'): also score it and print before/after

    def validate(self) -> None:
        if not self.load_path:
            raise ValueError("pass --load_path (a run directory, a HF checkpoint directory or a .gguf file)")
        if not self.tasks:
            raise ValueError("pass --tasks NAME_OR_YAML ... (harness task names or local YAML task files)")
        if self.limit < 0 or self.batch_size < 1 or self.num_fewshot < -1:
            raise ValueError(f"--limit must be >= 0, --batch_size >= 1 and --num_fewshot >= -1, got {self.limit}, "
                             f"{self.batch_size}, {self.num_fewshot}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.add_bos not in ("auto", "true", "false"):
            raise ValueError(f"--add_bos must be auto, true or false, got {self.add_bos!r}")
        if self.chat_template and not self.apply_chat_template:
            raise ValueError("--chat_template is used with --apply_chat_template true only")
        if self.seq_len < 0 or self.max_length < 0 or self.max_gen_toks < 0 or self.bootstrap_iters < 0:
            raise ValueError("--seq_len, --max_length, --max_gen_toks and --bootstrap_iters must be >= 0")
        require_lm_eval("the lm_eval stage")


def require_lm_eval(what: str) -> None:
    """Refuses clearly when the optional harness is missing."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"{what} needs lm-evaluation-harness: pip install 'forgetting[lmeval]' (or lm-eval>=0.4.9)")


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / runs.CONFIG_FILE).exists() and not runs.is_hf_checkpoint(path)


def base_path(cfg: LmEvalConfig) -> str:
    """--base, with 'loaded_from' resolved through the run's config."""
    if cfg.base != "loaded_from":
        return cfg.base
    if not is_run_dir(cfg.load_path):
        raise ValueError("--base loaded_from needs --load_path to be a run directory (it reads its loaded_from)")
    parent = (json.loads((Path(cfg.load_path) / runs.CONFIG_FILE).read_text()).get("resolved") or {}).get("loaded_from")
    if not parent:
        raise ValueError(f"{cfg.load_path} was not finetuned from anything (no loaded_from); pass --base PATH")
    return str(parent)


def results_file(load_path: str, out: str, name: str = "results.json") -> Path:
    if out:
        return Path(out) / name
    if is_run_dir(load_path):
        return Path(load_path) / "lm_eval" / name
    raise ValueError(f"{load_path} is not a run directory: pass --out DIR for its results")


def score(cfg: LmEvalConfig, load_path: str, manager: Any) -> dict:
    """The harness's results for the model at `load_path`."""
    from forgetting.evals import harness_model, harness_report

    lm = harness_model.HarnessModel.load(load_path, tokenizer=cfg.tokenizer, dtype=cfg.dtype, seq_len=cfg.seq_len,
                                         batch_size=cfg.batch_size, max_length=cfg.max_length,
                                         max_gen_toks=cfg.max_gen_toks, add_bos=cfg.add_bos, seed=cfg.seed,
                                         chat_template=cfg.chat_template)
    return harness_report.run_tasks(lm, cfg.tasks, limit=cfg.limit, apply_chat_template=cfg.apply_chat_template,
                                    num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot,
                                    bootstrap_iters=cfg.bootstrap_iters, seed=cfg.seed, manager=manager)


def evaluate(cfg: LmEvalConfig) -> dict:
    """Scores the model (and --base); writes the results JSON; returns paths, summaries and the comparison."""
    from forgetting.evals import harness_report

    cfg.validate()
    path = results_file(cfg.load_path, cfg.out)
    base = base_path(cfg) if cfg.base else ""
    base_file = (results_file(base, "") if is_run_dir(base) else path.parent / "base_results.json") if base else None
    manager = harness_report.task_manager(cfg.tasks)  # checks the task names before any model loads
    results = score(cfg, cfg.load_path, manager)
    out: dict = {"results_path": str(harness_report.save_results(results, path)),
                 "summary": harness_report.summary_line(results), "metrics": harness_report.flat_metrics(results)}
    if base:
        before = score(cfg, base, manager)
        out["base_results_path"] = str(harness_report.save_results(before, base_file))
        out["base_summary"] = harness_report.summary_line(before)
        out["comparison"] = harness_report.comparison(before, results)
    return out


def main(argv: list[str] | None = None) -> dict:
    from forgetting.evals import harness_report

    cfg, out = cli.run_or_exit(LmEvalConfig, evaluate, argv, prefix="lm_eval: error")
    if "comparison" in out:
        print(f"base {base_path(cfg)}: {out['base_summary']}")
        print(f"run  {cfg.load_path}: {out['summary']}")
        print(harness_report.format_comparison(out["comparison"]))
    else:
        print(f"lm_eval {cfg.load_path}: {out['summary']} -> {out['results_path']}")
    return out


if __name__ == "__main__":
    main()
