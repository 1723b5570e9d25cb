"""Every command-line entrypoint prints its help: a field's comment is its flag's help text, and argparse
formats that text with `%`, so a stray `%` in a comment (`i % n`, `95%`) broke `--help` of a whole stage."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = sorted(
    f"forgetting.{path.parent.name}.{path.stem}"
    for folder in ("stages", "experiments", "bench") for path in (ROOT / folder).glob("*.py")
    if path.stem not in ("__init__", "__main__", "sweep_process", "framework")
    and "__name__ == \"__main__\"" in path.read_text())


def test_the_entrypoints_are_found():
    assert {"forgetting.stages.train", "forgetting.stages.sample", "forgetting.experiments.instruct",
            "forgetting.bench.sweep"} <= set(ENTRYPOINTS)


@pytest.mark.parametrize("module", [*ENTRYPOINTS, "forgetting.bench"])
def test_help_is_printed(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout and "--" in r.stdout
