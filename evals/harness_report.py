"""Running lm-evaluation-harness tasks on a `HarnessModel`, and reading, saving and comparing the results.

    results = run_tasks(lm, ["hellaswag", "my_tasks/held_out.yaml"], limit=200)
    flat_metrics(results)        # {"lm_eval/held_out/acc": 0.61, "lm_eval/held_out/acc_stderr": 0.034, ...}
    print(format_comparison(before, after))   # each task's score before and after a finetune, with stderrs

Tasks are harness task names or paths of local YAML task files (their folders are added to the task
index; built-in tasks are indexed only when a name asks for one, since indexing them takes seconds).
Results are the harness's own dictionary (`lm_eval.simple_evaluate`'s), saved as its JSON.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

from forgetting.core.files import write_json_atomic

_TASK_LINE = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


def resolve_tasks(tasks: Sequence[str]) -> tuple[list[str], list[str], bool]:
    """(task names, folders to index, whether built-in tasks are needed) for names and YAML paths."""
    names, folders, builtin = [], [], False
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise FileNotFoundError(f"task file {task} does not exist (--tasks takes harness task names or YAML files)")
            found = _TASK_LINE.search(path.read_text(encoding="utf-8"))
            if not found:
                raise ValueError(f"task file {task} has no top-level 'task: NAME' line; add one")
            names.append(found.group(1))
            if str(path.resolve().parent) not in folders:
                folders.append(str(path.resolve().parent))
        else:
            names.append(task)
            builtin = True
    if not names:
        raise ValueError("no tasks: pass --tasks NAME_OR_YAML ...")
    return names, folders, builtin


def task_manager(tasks: Sequence[str]) -> tuple[list[str], Any]:
    """(task names, a TaskManager that knows them)."""
    from lm_eval.tasks import TaskManager

    names, folders, builtin = resolve_tasks(tasks)
    manager = TaskManager(include_path=folders or None, include_defaults=builtin)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        raise ValueError(f"unknown task(s) {missing}: not harness tasks and not in the given YAML files")
    return names, manager


def run_tasks(lm: Any, tasks: Sequence[str], *, limit: float | None = None, num_fewshot: int | None = None,
              apply_chat_template: bool = False, bootstrap_iters: int = 1000, seed: int = 0,
              log_samples: bool = False, manager: tuple[list[str], Any] | None = None) -> dict:
    """`lm_eval.simple_evaluate` of `tasks` on `lm`: the harness's results dictionary."""
    import lm_eval

    names, tm = manager or task_manager(tasks)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=tm, limit=limit or None, num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=None, fewshot_random_seed=seed)
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned nothing (a non-zero rank?)")
    return results


def scores(results: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{task: {metric: (value, standard error or nan)}} from the harness's results ("acc,none" keys; the
    filter name is kept when it is not "none": "exact_match/strict-match")."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric}/{filt}"
            row[name] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else math.nan)
        out[task] = row
    return out


def flat_metrics(results: dict, prefix: str = "lm_eval") -> dict[str, float]:
    """`prefix/<task>/<metric>` and `.../<metric>_stderr` (metrics.jsonl keys)."""
    flat = {}
    for task, metrics in scores(results).items():
        for metric, (value, stderr) in metrics.items():
            flat[f"{prefix}/{task}/{metric}"] = value
            if not math.isnan(stderr):
                flat[f"{prefix}/{task}/{metric}_stderr"] = stderr
    return flat


def save_results(results: dict, path: str | Path) -> Path:
    """The harness's results dictionary as JSON (what `lm_eval --output_path` writes, samples left out)."""
    from lm_eval.utils import handle_non_serializable

    clean = json.loads(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=handle_non_serializable))
    write_json_atomic(Path(path), clean)
    return Path(path)


def summary_line(results: dict) -> str:
    """One line: each task's metrics with their standard errors."""
    parts = []
    for task, metrics in scores(results).items():
        cells = [f"{m} {v:.4f}" + ("" if math.isnan(se) else f"±{se:.4f}") for m, (v, se) in metrics.items()]
        parts.append(f"{task}: {', '.join(cells)}")
    return "; ".join(parts)


def comparison(before: dict, after: dict) -> list[dict]:
    """Per (task, metric) both results have: before, after, their stderrs, the difference and its stderr
    (the two runs' errors combined as independent, which overstates it for paired questions)."""
    rows = []
    b_scores, a_scores = scores(before), scores(after)
    for task, metrics in a_scores.items():
        for metric, (a, a_se) in metrics.items():
            if metric not in b_scores.get(task, {}):
                continue
            b, b_se = b_scores[task][metric]
            rows.append({"task": task, "metric": metric, "before": b, "before_stderr": b_se, "after": a,
                         "after_stderr": a_se, "diff": a - b, "diff_stderr": math.hypot(a_se, b_se)})
    return rows


def _with_stderr(value: float, stderr: float, sign: str = "") -> str:
    # The harness reports no stderr for some metrics (bits_per_byte): say so instead of printing nan.
    return f"{value:{sign}.4f} ± " + ("n/a" if math.isnan(stderr) else f"{stderr:.4f}")


def format_comparison(rows: Sequence[dict]) -> str:
    """A Markdown table of `comparison` rows."""
    lines = ["| task | metric | before | after | after - before |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {_with_stderr(r['before'], r['before_stderr'])} | "
                     f"{_with_stderr(r['after'], r['after_stderr'])} | {_with_stderr(r['diff'], r['diff_stderr'], '+')} |")
    return "\n".join(lines)


class TrainingScorer:
    """The train stage's `--eval.lm_eval_tasks`: the tasks scored on the current parameters at an eval.

    Built before training starts, so a missing tokenizer or an unknown task fails before any step."""

    def __init__(self, eval_cfg: Any, model_cfg: Any, *, load_path: str, data_path: str):
        from forgetting.evals import harness_model

        source = self._tokenizer_source(eval_cfg.lm_eval_tokenizer, load_path, data_path)
        self.tokenizer = harness_model.load_tokenizer(source)
        self.chat_source = "" if harness_model._is_tiktoken(source) else str(source)
        self.model_cfg, self.eval_cfg = model_cfg, eval_cfg
        self.manager = task_manager(eval_cfg.lm_eval_tasks)

    @staticmethod
    def _tokenizer_source(explicit: str, load_path: str, data_path: str) -> Path:
        from forgetting.evals import harness_model

        if explicit or load_path:
            return harness_model.tokenizer_source(load_path, explicit)
        found = harness_model.data_tokenizer(data_path)
        if found is None:
            raise ValueError(f"--eval.lm_eval_tasks: no tokenizer known for {data_path} (its sidecar names no .tiktoken "
                             "file that exists); pass --eval.lm_eval_tokenizer")
        return found

    def scores(self, params: Any, step: int) -> dict[str, float]:
        """`lm_eval/<task>/<metric>` (and `_stderr`) of the model with `params`."""
        from forgetting.evals import harness_model

        e = self.eval_cfg
        text_model = harness_model.TextModel(self.model_cfg, params, self.tokenizer, f"train-step-{step}",
                                             self.chat_source)
        lm = harness_model.HarnessModel(text_model, batch_size=e.lm_eval_batch_size)
        results = run_tasks(lm, e.lm_eval_tasks, limit=e.lm_eval_limit, manager=self.manager)
        return flat_metrics(results)
