"""Local lm-evaluation-harness tasks (YAML + JSON Lines) written from this project's benchmark questions.

    paths = write_mcq_tasks(questions, "tmp/mmlu_task", name="mmlu_local")
    # paths["plain"]: the question's own prompt ("...\\nAnswer:") and the letters " A".." D" (the harness's MMLU)
    # paths["chat"]: the chat-MCQ user turn and "ANSWER: A".. (the authors' instruct protocol; run it with
    #                apply_chat_template so the harness renders the chat template)

`questions` are `stages.benchmarks` question dicts (`mmlu_question(row)` and friends: prompt, choices,
answer_index, question, options), so the harness scores exactly the text the project's own scorers read.
Nothing here downloads: the data is the JSON Lines file written beside the YAML.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from forgetting.evals import benchmarks


def _yaml(name: str, data: Path, text_field: str, choices: Sequence[str], delimiter: str) -> str:
    listed = ", ".join(json.dumps(c) for c in choices)
    return (f"task: {name}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {json.dumps(str(data))}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            f"doc_to_text: \"{{{{{text_field}}}}}\"\n"
            f"doc_to_choice: [{listed}]\n"
            "doc_to_target: answer\n"
            f"target_delimiter: {json.dumps(delimiter)}\n"
            "metric_list:\n"
            "  - metric: acc\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n")


def write_mcq_tasks(questions: Sequence[dict], directory: str | Path, *, name: str = "mcq_local") -> dict[str, Path]:
    """Writes `<name>` (plain prompt, letter choices) and `<name>_chat` (chat user turn, "ANSWER: X") task
    files and their shared data into `directory`; returns {"plain": yaml, "chat": yaml}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counts = {len(q["choices"]) for q in questions}
    if len(counts) != 1:
        raise ValueError(f"questions must all have the same number of choices for one task, got {sorted(counts)}")
    n = counts.pop()
    data = directory / f"{name}.jsonl"
    rows = [{"prompt": q["prompt"], "chat_prompt": benchmarks.chat_mcq_prompt(q["question"], q["options"]),
             "answer": int(q["answer_index"])} for q in questions]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    letters = [c.strip() for c in questions[0]["choices"]]
    plain, chat = directory / f"{name}.yaml", directory / f"{name}_chat.yaml"
    plain.write_text(_yaml(name, data, "prompt", letters, " "), encoding="utf-8")
    chat.write_text(_yaml(f"{name}_chat", data, "chat_prompt", benchmarks.answer_completions(n), ""), encoding="utf-8")
    return {"plain": plain, "chat": chat}
