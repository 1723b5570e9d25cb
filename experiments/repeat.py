"""A figure over several seeds: its runs repeated per seed, its summary merged with 95% t intervals.

A figure file writes `runs_one(knobs, out)` and `summarize_one(knobs, out)` for one seed (`knobs.seed`)
and defines `runs(knobs, out)` as `repeat.runs(runs_one, knobs, out)` and `summarize(knobs, out)` as
`repeat.summarize(runs_one, summarize_one, knobs, out)` (in the figure file: the framework names the
figure's command after the file that defines `runs`). Its knobs carry `seed` (the
first seed) and `seeds` (how many). Seed i (0-based) runs the same figure with `seed + i`: every run whose
directory depends on the seed (a train run's `--run.seed`: model init, batch order, replay sampling; a
pretraining run too, so every seed is a full repetition) is repeated; a run that does not depend on it
(the generated data) is shared. Seed 0's runs keep their names (and directories: a one-seed figure is
exactly what it was); the others get the suffix `-s<seed>`. An in-process (`fn`) run's directory is named
after its run name, so a figure whose configs hold such a run's directory (regression_1d's finetunes load
its fit) names its runs itself: its `runs_one` and `summarize_one` take `name_suffix` ("" for seed 0,
`-s<seed>` for the others) and append it to the name of every run of their own.

The summary is `stats.merge` of the per-seed summaries (mean and `<key>_ci95` = {"low", "high"}), over
the seeds with at least one finished run of their own, plus "seeds" (asked for), "seeds_summarized" (how
many were merged), "interval" ("95% t") and, with several, "per_seed" ({seed value: its summary}).
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable

from forgetting.experiments import framework, stats
from forgetting.experiments.framework import RunSpec

RunsFn = Callable[[Any, Path], list[RunSpec]]
SummarizeFn = Callable[[Any, Path], dict]


def seed_knobs(knobs: Any, i: int) -> Any:
    """The knobs of the figure's i-th seed (0-based): one seed, `seed + i`."""
    return dataclasses.replace(knobs, seed=knobs.seed + i, seeds=1)


def suffix(seed: int) -> str:
    return f"-s{seed}"


def _own(specs: list[RunSpec], other: list[RunSpec], out: Path) -> list[RunSpec]:
    """The runs of `specs` that a run of the same name in `other` (another seed) does not share."""
    dirs = {s.name: framework.run_dir(s, out) for s in other}
    return [s for s in specs if dirs.get(s.name) != framework.run_dir(s, out)]


def names_itself(fn: Callable) -> bool:
    """Whether a one-seed function takes `name_suffix` (see the module docstring)."""
    return "name_suffix" in inspect.signature(fn).parameters


def _call(fn: Callable, knobs: Any, i: int, out: Path) -> Any:
    """`fn` (runs_one or summarize_one) for the i-th seed."""
    k = seed_knobs(knobs, i)
    if names_itself(fn):
        return fn(k, out, name_suffix=suffix(k.seed) if i else "")
    return fn(k, out)


def per_seed_runs(runs_one: RunsFn, knobs: Any, out: Path) -> list[tuple[int, list[RunSpec], list[RunSpec]]]:
    """[(seed, all its runs under their one-seed names, the runs it does not share with seed 0)]."""
    out = Path(out)
    first = _call(runs_one, knobs, 0, out)
    if knobs.seeds == 1:
        return [(knobs.seed, first, first)]
    second = _call(runs_one, knobs, 1, out)
    result = [(knobs.seed, first, _own(first, second, out))]
    for i in range(1, knobs.seeds):
        specs = second if i == 1 else _call(runs_one, knobs, i, out)
        result.append((knobs.seed + i, specs, _own(specs, first, out)))
    return result


def runs(runs_one: RunsFn, knobs: Any, out: Path) -> list[RunSpec]:
    """The figure's runs at every seed: seed 0's under their names, the others' own runs suffixed `-s<seed>`."""
    groups = per_seed_runs(runs_one, knobs, out)
    specs = list(groups[0][1])
    for seed, _, own in groups[1:]:
        if names_itself(runs_one):  # its own runs already carry the seed's suffix
            specs += own
            continue
        renamed = {s.name for s in own}
        for s in own:  # a dependency is the seed's own run (renamed too) or a shared one (kept)
            after = tuple(a + suffix(seed) if a in renamed else a for a in s.after)
            specs.append(dataclasses.replace(s, name=s.name + suffix(seed), after=after))
    return specs


def summarize(runs_one: RunsFn, summarize_one: SummarizeFn, knobs: Any, out: Path) -> dict:
    """The per-seed summaries merged (`stats.merge`) over the seeds with a finished run of their own."""
    groups = per_seed_runs(runs_one, knobs, out)
    finished = [i for i, (_, _, own) in enumerate(groups) if any(framework.is_done(framework.run_dir(s, out)) for s in own)]
    finished = finished or [0]  # nothing finished yet: seed 0's (empty) summary
    per = [_call(summarize_one, knobs, i, out) for i in finished]
    summary = dict(stats.merge(per))
    summary.update({"seeds": knobs.seeds, "seeds_summarized": len(finished), "interval": stats.INTERVAL})
    if len(per) > 1:  # keyed by the seed value (dicts keep summary.csv possible)
        summary["per_seed"] = {str(groups[i][0]): s for i, s in zip(finished, per)}
    return summary
