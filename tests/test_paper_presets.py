"""`--list --scale paper` of every figure prints the authors' released sweep (their experiments/*/ configs).

Every expected value below is written out literally from the authors' sweep files; target losses are the
authors' values times T/(T-1) = 256/255 (their NTP loss sums over T-1 positions and divides by T).
"""
from __future__ import annotations

import importlib
import shlex

import pytest

from forgetting.experiments import framework
from forgetting.training import cli
from forgetting.training.train_config import TrainConfig

OLD, NEW = "/data/c4_en.bin", "/data/c4_es.bin"
WARMUP_TOKENS = 153 * 256 * 256  # their 10M warm-up tokens, rounded up to whole steps of 256 x 256


def listed(name: str, tmp_path, capsys, extra: tuple[str, ...] = ()) -> dict[str, TrainConfig]:
    """{run.name: parsed config} of the train commands `--list --scale paper` prints."""
    mod = importlib.import_module(f"forgetting.experiments.{name}")
    argv = ["--list", "--scale", "paper", "--out", str(tmp_path), "--old_path", OLD, "--new_path", NEW, *extra]
    framework.main(mod.Knobs, mod.PRESETS, mod.runs, mod.summarize, mod.plot, doc=mod.__doc__, argv=argv,
                   progress=False)
    out = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("python -m forgetting.stages.train "):
            cfg = cli.parse(TrainConfig, shlex.split(line)[3:])
            assert cfg.run.name not in out
            out[cfg.run.name] = cfg
    return out


def split(runs: dict[str, TrainConfig]) -> tuple[list[TrainConfig], list[TrainConfig]]:
    pre = [c for c in runs.values() if not c.model.load_path]
    fine = [c for c in runs.values() if c.model.load_path]
    return pre, fine


def check_common(c: TrainConfig) -> None:
    assert (c.model.n_layers, c.model.head_dim, c.model.seq_len, c.opt.batch_size) == (6, 64, 256, 256)
    assert c.opt.warmup_tokens == WARMUP_TOKENS
    assert c.data.num_tokens_valid == 10_000_000
    assert c.opt.optimizer == "adamw" and c.opt.weight_decay == 0.02 and (c.opt.b1, c.opt.b2) == (0.9, 0.999)
    assert c.eval.extra_paths == ()  # valid_* and prev_* are the figure's numbers: no duplicate evals


def test_model_size(tmp_path, capsys):
    pre, fine = split(listed("model_size", tmp_path, capsys))
    assert sorted(c.model.d_model for c in pre) == [256, 384, 512, 640, 768]
    for c in pre:
        check_common(c)
        assert c.stop.target_loss == pytest.approx(3.0 * 256 / 255)
        assert c.opt.lr_decay == "none" and c.opt.peak_lr == 1e-3
        assert c.log.every_tokens == 1_000_000 and c.log.every_steps == 0
    assert len(fine) == 5 * 10
    assert sorted({c.reg.coeff for c in fine}) == [0.01, 0.022, 0.046, 0.1, 0.22, 0.46, 1.0, 2.2, 4.6, 10.0]
    for c in fine:
        check_common(c)
        assert c.reg.method == "kl_pre" and not c.reg.synth and c.reg.batch_size == 256 and c.reg.path == OLD
        assert c.opt.peak_lr == 3e-4 and c.opt.lr_decay == "cosine"
        assert c.stop.target_loss == pytest.approx(2.76 * 256 / 255)
        assert c.stop.num_epochs == 10 and c.stop.num_tokens_train == 0
        assert c.log.every_tokens == 1_000_000 and c.log.every_steps == 0


def test_pretrain_length(tmp_path, capsys):
    pre, fine = split(listed("pretrain_length", tmp_path, capsys))
    assert sorted(c.stop.tokens_per_param for c in pre) == [10, 31.6, 100, 316, 1000, 3162, 10000]
    for c in pre:
        check_common(c)
        assert c.model.d_model == 256 and c.opt.lr_decay == "cosine" and c.stop.target_loss == 0
    assert len(fine) == 7 * 7
    assert sorted({c.reg.coeff for c in fine}) == [0.01, 0.032, 0.1, 0.32, 1.0, 3.2, 10.0]
    for c in fine:
        assert c.reg.method == "kl_pre" and c.reg.batch_size == 256 and not c.reg.synth
        assert c.opt.peak_lr == 1e-3 and c.opt.lr_decay == "cosine" and c.stop.num_epochs == 10
        assert c.stop.target_loss == pytest.approx(2.9 * 256 / 255)
        assert c.log.every_tokens == 1_000_000


def test_grid_2d(tmp_path, capsys):
    pre, fine = split(listed("grid_2d", tmp_path, capsys))
    assert sorted({c.model.d_model for c in pre}) == [256, 288, 320, 352, 384, 416, 448, 480, 512, 544, 576, 608, 640]
    assert sorted({c.stop.tokens_per_param for c in pre}) == [20, 28, 40, 57, 80, 113, 160, 226, 320, 453, 640, 905,
                                                              1280]
    assert len(pre) == 169 and all(c.opt.lr_decay == "cosine" for c in pre)
    assert len(fine) == 2 * 169
    assert sorted(c.reg.method for c in fine) == ["kl_pre"] * 169 + ["none"] * 169
    for c in fine:
        assert c.opt.peak_lr == 1e-4 and c.stop.target_loss == pytest.approx(2.2 * 256 / 255)
        assert c.log.every_tokens == 1_000_000
        if c.reg.method == "kl_pre":
            assert c.reg.coeff == 10 and c.reg.batch_size == 256


def test_learning_rate(tmp_path, capsys):
    pre, fine = split(listed("learning_rate", tmp_path, capsys))
    assert sorted(c.opt.peak_lr for c in pre) == [2.15e-4, 4.64e-4, 1e-3, 2.15e-3, 4.64e-3, 1e-2]
    for c in pre:
        check_common(c)
        assert c.stop.target_loss == pytest.approx(3.2 * 256 / 255) and c.stop.tokens_per_param == 0
        assert c.opt.lr_decay == "none"
    assert len(fine) == 6 * 7 * 2
    assert sorted({c.opt.peak_lr for c in fine}) == [1e-6, 3.16e-6, 1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3]
    assert {(c.reg.method, c.reg.coeff if c.reg.method == "kl_pre" else None) for c in fine} == {
        ("none", None), ("kl_pre", 10.0)}
    for c in fine:
        assert c.stop.target_loss == pytest.approx(3.2 * 256 / 255) and c.log.every_tokens == 1_000_000


def test_high_lr(tmp_path, capsys):
    pre, fine = split(listed("high_lr", tmp_path, capsys))
    assert len(pre) == 1
    plain = [c for c in fine if c.reg.method == "none"]
    assert sorted(c.opt.peak_lr for c in plain) == [
        1e-7, 1.78e-7, 3.16e-7, 5.62e-7, 1e-6, 1.78e-6, 3.16e-6, 5.62e-6, 1e-5, 1.78e-5, 3.16e-5, 5.62e-5,
        1e-4, 1.78e-4, 3.16e-4, 5.62e-4, 1e-3]
    replaced = [c for c in fine if c.reg.method == "replace"]
    # fraction 0 is the plain LR-1e-3 run; 1/256 runs twice, as theirs
    assert sorted(c.reg.coeff for c in replaced) == [0.00390625, 0.00390625, 0.0078125, 0.015625, 0.03125, 0.0625,
                                                      0.125, 0.25, 0.5]
    assert all(c.opt.peak_lr == 1e-3 for c in replaced)
    for c in fine:
        assert c.stop.target_loss == pytest.approx(3.3 * 256 / 255) and c.opt.lr_decay == "none"
        assert c.log.every_tokens == 1_000_000


def test_high_lr_starts_from_a_given_checkpoint(tmp_path, capsys):
    pre, fine = split(listed("high_lr", tmp_path, capsys, ("--start_from", "/ckpt/uht1a3m7")))
    assert pre == [] and {c.model.load_path for c in fine} == {"/ckpt/uht1a3m7"}


def test_model_capacity(tmp_path, capsys):
    runs = listed("model_capacity", tmp_path, capsys)
    mixes = [c for c in runs.values() if c.mix.path]
    assert sorted(c.mix.coeff for c in mixes if c.run.name.startswith("mix")) == [
        0.0078125, 0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 0.75, 0.875, 0.9375, 0.96875, 0.984375, 0.9921875]
    for c in mixes:
        if c.run.name.startswith("mix"):
            assert c.stop.num_epochs == 10 and c.opt.lr_decay == "cosine"
    assert all(c.eval.extra_paths == (OLD, NEW) for c in runs.values())  # the frontier needs both datasets
    light = runs["pre-light"]
    assert light.stop.tokens_per_param == 20 and light.mix.coeff == 0.3 and light.opt.lr_decay == "none"
    over = [c for c in runs.values() if c.run.name.startswith("ft-over")]
    assert sorted(c.reg.coeff for c in over) == [0.01, 0.018, 0.032, 0.056, 0.1, 0.18, 0.32, 0.56, 1.0, 1.78, 3.16,
                                                  5.62, 10.0]
    over_start = {c.model.load_path for c in over}
    assert len(over_start) == 1 and "/mix" in next(iter(over_start))  # a mixture run, not an old-only one
    for c in over:
        assert (c.reg.method, c.reg.synth, c.reg.batch_size, c.reg.buffer) == ("kl_pre", True, 64, 16)
        assert c.opt.peak_lr == 1e-4 and c.opt.lr_decay == "cosine" and c.stop.num_epochs == 10
    chin = [c for c in runs.values() if c.run.name.startswith("ft-light")]
    assert sorted((c.opt.peak_lr, c.reg.coeff) for c in chin) == [
        (3e-4, 1.0), (3e-4, 3.0), (3e-4, 10.0), (1e-3, 1.0), (1e-3, 3.0), (1e-3, 10.0)]
    for c in chin:
        assert (c.reg.method, c.reg.synth, c.reg.batch_size, c.reg.buffer) == ("kl_pre", True, 64, 16)
        assert c.opt.warmup_tokens == 1_000_000_000 and c.stop.num_epochs == 100 and c.opt.lr_decay == "cosine"


def test_method_comparison(tmp_path, capsys):
    runs = listed("method_comparison", tmp_path, capsys)
    pre = runs["pretrain"]
    assert (pre.model.d_model, pre.model.n_layers) == (1024, 16)
    assert pre.stop.num_epochs == 3 and pre.opt.peak_lr == 1e-3 and pre.opt.lr_decay == "cosine"
    fine = {n: c for n, c in runs.items() if n != "pretrain"}
    assert sorted(fine) == ["kl_real", "kl_self", "lora", "ntp_real", "ntp_self", "standard"]
    for n, c in fine.items():
        assert c.opt.peak_lr == 1e-5 and c.stop.early_stop_evals == 10 and c.stop.num_tokens_train == 0
        assert c.opt.lr_decay == "none"
    assert fine["lora"].model.lora_rank == 16
    for n in ("kl_real", "kl_self", "ntp_real", "ntp_self"):
        c = fine[n]
        assert c.reg.coeff == 10 and c.reg.batch_size == 64 and c.reg.synth == n.endswith("self")
        assert c.reg.method == ("kl_pre" if n.startswith("kl") else "ntp_pre")
        if c.reg.synth:
            assert c.reg.buffer == 16


def test_instruct(tmp_path, capsys):
    mod = importlib.import_module("forgetting.experiments.instruct")
    _, knobs = framework.parse_args(mod.Knobs, mod.PRESETS, ["--scale", "paper"])
    sweep = mod._sweep(knobs)
    assert sorted((m, s, c) for _, m, s, c in sweep if m != "none") == sorted(
        (m, s, c) for m in ("kl_pre", "ntp_pre") for s in ("real", "self") for c in (1.0, 3.0, 10.0))
    assert [m for _, m, _, _ in sweep].count("none") == 1
    # the authors' data and evaluation: chat-formatted PyraNet Verilog, chat-style multiple choice
    assert (knobs.verilog_source, knobs.domain_path, knobs.scoring) == ("data/instruct/PyraNet-Verilog", "",
                                                                         "chat_loglik")
    inputs = {"out": str(tmp_path), "domain": "/d/verilog.bin", "old": "/d/olmo.bin", "hf": "/d/llama"}
    cfg = mod.finetune_config(knobs, inputs, "kl_pre", "self", 3.0)
    assert (cfg.model.seq_len, cfg.opt.batch_size, cfg.reg.batch_size, cfg.reg.buffer) == (512, 128, 32, 32)
    assert cfg.stop.num_epochs == 5 and cfg.stop.num_tokens_train == 0
    assert (cfg.opt.peak_lr, cfg.opt.b2, cfg.opt.weight_decay, cfg.opt.warmup_tokens) == (1e-5, 0.997, 0.02,
                                                                                           10_000_000)
    bench = mod.bench_config(knobs, "/d/run", dict(inputs, mmlu="m", arc="a", csqa="c"))
    assert (bench.scoring, bench.model.seq_len, bench.limit) == ("chat_loglik", 512, 0)
    assert (bench.mmlu_limit, bench.arc_limit, bench.csqa_limit, bench.shuffle_seed) == (2048, 1024, 1024, 42)

    # `--list --scale paper`: prepare_chat first (chat data, one conversation per 512-token row), then the
    # 13 finetunes on its token file and the chat-scored evaluations
    argv = ["--list", "--scale", "paper", "--out", str(tmp_path)]
    framework.main(mod.Knobs, mod.PRESETS, mod.runs, mod.summarize, mod.plot, doc=mod.__doc__, argv=argv,
                   progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["# wave 0", f"python -m forgetting.experiments.instruct --scale paper --out {tmp_path} "
                                     "--only prepare_chat"]
    prep = mod._prepare_chat_spec(knobs)
    assert (prep.config.verilog_source, prep.config.hf_path, prep.config.seq_len) == (
        "data/instruct/PyraNet-Verilog", "data/instruct/Llama-3.2-1B-Instruct", 512)
    chat_file = str(framework.run_dir(prep, tmp_path) / "verilog_chat.bin")
    trains = [cli.parse(TrainConfig, shlex.split(line)[3:]) for line in lines
              if line.startswith("python -m forgetting.stages.train ")]
    assert len(trains) == 13 and all(c.data.path == chat_file for c in trains)
    assert sorted((c.reg.method, c.reg.synth, c.reg.coeff) for c in trains if c.reg.method != "none") == sorted(
        (m, s, c) for m in ("kl_pre", "ntp_pre") for s in (False, True) for c in (1.0, 3.0, 10.0))
    evals = [line for line in lines if "--only eval_" in line]
    assert len(evals) == 14  # the start and every finetune


def test_paper_cost_counts_training_replay_and_evaluation_flops():
    from forgetting.core import model as model_lib
    from forgetting.experiments import paper_cost

    mc = model_lib.ModelConfig(vocab_size=4096, d_model=256, n_layers=6, head_dim=64, seq_len=256)
    per_token = 6 * (12 * 6 * 256**2 + 256 * 4096) + 12 * 6 * 256 * 256 / 2  # 6·N_matmul + causal attention
    assert model_lib.flops_per_token(mc) == per_token == 36_962_304
    pre = cli.parse(TrainConfig, ["--data.path", OLD, "--stop.tokens_per_param", "10", "--data.num_tokens_valid",
                                  "10000000", "--log.every_tokens", "10000000"])
    flops, capped = paper_cost.run_cost(pre, mc, paper_cost.SIZES)
    tokens = 10 * (12 * 6 * 256**2 + 256 * 4096)  # 57.7M: 7 evals (at 0 and every 10M) of 10M tokens, valid + KL to init
    assert not capped
    assert flops == pytest.approx(tokens * per_token + 7 * 10_000_000 * per_token / 3 * 2)
    fine = cli.parse(TrainConfig, ["--data.path", NEW, "--model.load_path", "x", "--reg.method", "kl_pre",
                                   "--reg.batch_size", "64", "--stop.num_epochs", "2", "--stop.target_loss", "3",
                                   "--data.num_tokens_valid", "1000000", "--log.every_tokens", "100000000"])
    flops, capped = paper_cost.run_cost(fine, mc, {"c4_es": 1e9})
    replay = 64 / 256 * (per_token + per_token / 3)  # replay rows forward+backward, and the reference's forward
    assert capped  # a target stop: the 2-epoch cap is counted
    assert flops == pytest.approx(2e9 * (per_token + replay) + 21 * 1_000_000 * per_token / 3 * 4)
