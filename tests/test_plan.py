"""bench.plan: XLA's per-device memory of an ahead-of-time compiled train step (nothing allocated), the remat
option, and the GPU-hours estimate of the paper sweeps."""
from __future__ import annotations

import json
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


# ---- any config and implementation; one GPU-hour estimate (issue 28) ----

TINY = ["--model.vocab_size", "64", "--model.d_model", "32", "--model.n_layers", "1", "--model.head_dim", "16",
        "--model.seq_len", "32", "--opt.batch_size", "8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    """A finished tiny run to plan finetunes of."""
    from forgetting.stages import generate, train

    root = tmp_path_factory.mktemp("plan")
    data = root / "lang0.bin"
    generate.generate(generate.Config(corpus="synthetic", language=0, num_tokens=20_000, vocab_size=64, seq_len=32,
                                      out=str(data)))
    cfg = train.cli.parse(train.TrainConfig, ["--data.path", str(data), *TINY, "--model.dtype", "float32",
                                              "--stop.num_tokens_train", str(2 * 8 * 32), "--log.progress", "false",
                                              "--run.dir", str(root / "runs"), "--data.num_tokens_valid", "1024"])
    return train.train(cfg)["run_dir"]


def test_train_flags_plan_the_gpu_path_with_replay_and_the_loaded_shape(tiny_run, monkeypatch):
    from forgetting.core import backend
    from forgetting.core import step as step_lib

    case = plan.train_case(["--data.path", "new.bin", "--model.load_path", tiny_run, "--model.d_model", "999",
                            "--reg.method", "kl_pre", "--reg.synth", "true", "--reg.batch_size", "4",
                            "--opt.batch_size", "8", "--stop.num_tokens_train", "1000000"])
    assert (case.config().d_model, case.config().vocab_size, case.batch) == (32, 64, 8)  # the checkpoint's shape
    compiled_impls = []
    make = step_lib.make_train_step

    def recording(cfg, *a, **kw):
        compiled_impls.append((backend.kernels_for(cfg).name, kw.get("reg_method")))
        return make(cfg, *a, **kw)

    monkeypatch.setattr(step_lib, "make_train_step", recording)
    row = plan.measure(case, "single", 1, remat=False)  # the default impl
    # The reference path (what `impl: auto` runs on a GPU), not the CPU kernels `auto` picks on this machine,
    # with the KL replay term
    assert compiled_impls == [("reference", "kl_pre")]
    assert (row["impl"], row["reg"], row["replay_rows"]) == ("reference", "kl_pre", 4)
    # Arguments: f32 params + AdamW's two moments (12 B a parameter) and the frozen f32 reference (4 more)
    assert row["arguments_gib"] * plan.GiB >= 16 * row["params"]


def test_gpu_hours_are_paper_costs_at_the_one_printed_assumption(tiny_run):
    from forgetting.experiments import paper_cost

    flags = ["--data.path", "new.bin", "--model.load_path", tiny_run, "--reg.method", "kl_pre", "--reg.batch_size",
             "4", "--opt.batch_size", "8", "--stop.num_tokens_train", "1000000"]
    case = plan.train_case(flags)
    est = plan.gpu_estimate(case, paper_cost.ASSUMED_MFU, paper_cost.PEAK_TFLOPS)
    flops, _ = paper_cost.run_cost(case.train, case.config(), paper_cost.SIZES)
    assert (est["assumed_mfu"], est["peak_tflops"]) == (0.3, 989.0)  # one assumption: plan's default is paper_cost's
    assert est["gpu_hours"] == pytest.approx(flops / (0.3 * 989e12) / 3600, rel=1e-12)
    # per step: forward+backward of 8 new rows plus 4 replay rows (forward+backward) and the reference's forward
    per_token = paper_cost.flops_per_token(case.config())
    step_flops = 8 * 32 * per_token + 4 * 32 * (per_token + per_token / 3)
    assert est["gpu_s_per_step"] == pytest.approx(step_flops / (0.3 * 989e12), rel=1e-9)
    # --hours and paper_cost print the same numbers, with the assumption beside them
    hours = subprocess.run([sys.executable, "-m", "forgetting.bench.plan", "--hours"], capture_output=True, text=True,
                           timeout=300)
    direct = subprocess.run([sys.executable, "-m", "forgetting.experiments.paper_cost"], capture_output=True,
                            text=True, timeout=300)
    assert hours.returncode == 0 and hours.stdout == direct.stdout
    assert hours.stdout.splitlines()[0].startswith("GPU-hours assuming MFU 0.3 of 989 TFLOP/s")


def test_presets_include_the_instruct_figure_and_bad_flags_name_the_flag(tiny_run):
    from forgetting.experiments import instruct

    knobs = instruct.PRESETS["paper"]
    case = plan.CASES["instruct"]
    cfg = case.config()
    assert (type(cfg).__name__, cfg.d_model, cfg.n_layers, cfg.vocab_size) == ("LlamaConfig", 2048, 16, 128256)
    assert (cfg.seq_len, case.batch) == (knobs.seq_len, knobs.batch_size) == (512, 128)
    bad = subprocess.run([sys.executable, "-m", "forgetting.bench.plan", "--train",
                          f"--data.path new.bin --model.load_path {tiny_run} --opt.batch_size 0 "
                          "--stop.num_tokens_train 1000"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--opt.batch_size must be positive" in bad.stderr.strip().splitlines()[-1]
    impl = subprocess.run([sys.executable, "-m", "forgetting.bench.plan", "--impl", "gpu"], capture_output=True,
                          text=True, timeout=120)
    assert impl.returncode == 2 and "--impl must be one of reference, xla_cpu" in impl.stderr


def test_train_config_cli_plans_its_own_mesh_and_prints_the_assumption(tiny_run):
    proc = subprocess.run([sys.executable, "-m", "forgetting.bench.plan", "--devices", "2", "--remat", "off", "--train",
                           f"--data.path new.bin --model.load_path {tiny_run} --model.lora_rank 2 --run.mesh fsdp "
                           "--opt.batch_size 8 --stop.num_tokens_train 1000000", "--markdown"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["case"], r["strategy"], r["devices"], r["lora_rank"]) for r in rows] == [("train", "fsdp", 2, 2)]
    assert "GPU time assuming MFU 0.3 of 989 TFLOP/s peak" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].endswith(f"| {rows[0]['gpu_hours']:,.3g} GPU-h (MFU 0.3 of 989 TFLOP/s) |")
