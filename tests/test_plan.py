"""bench.plan: XLA's per-device memory of an ahead-of-time compiled train step (nothing allocated), the remat
option, and the GPU-hours estimate of the paper sweeps."""
from __future__ import annotations

import subprocess
import sys

import pytest

from forgetting.bench import plan


def test_measure_counts_state_and_remat_lowers_temporaries():
    case = plan._paper("tiny", 64, 4, batch=32, seq=64)
    off = plan.measure(case, "single", 1, remat=False)
    on = plan.measure(case, "single", 1, remat=True)
    # f32 parameters plus AdamW's two f32 moments are at least 12 bytes a parameter, all donated (aliased)
    assert off["arguments_gib"] * plan.GiB >= 12 * off["params"]
    assert off["aliased_gib"] * plan.GiB >= 12 * off["params"]
    assert on["arguments_gib"] == off["arguments_gib"]
    assert on["temporaries_gib"] < 0.6 * off["temporaries_gib"]  # only block inputs kept for the backward
    assert on["analytic_tflops_per_step"] == pytest.approx(off["analytic_tflops_per_step"] * 4 / 3)
    # XLA counts a loop body once (the fused head's chunk loop), so its count is at most the analytic one
    assert 0.3 * off["analytic_tflops_per_step"] < off["xla_tflops_per_device"] <= 1.1 * off["analytic_tflops_per_step"]


def test_bad_case_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "forgetting.bench.plan", "--cases", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown case(s) ['nope']" in proc.stderr.strip().splitlines()[-1]
