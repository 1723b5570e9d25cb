"""Issue 17: every bad value refused with a one-line message, runs bound to their inputs, atomic finishing,
one writer per run directory, clean interrupts. End-to-end tests use the issue's tiny `T` config."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forgetting.core import checkpoint
from forgetting.core import model as model_lib
from forgetting.stages import cli, evaluate, generate, runs, sample, tokenize, tokenizer, tokenize_hf, train
from forgetting.stages.train_config import TrainConfig, replace

T = 32


def tiny(data_path: str, run_dir: Path, **changes) -> TrainConfig:
    return replace(TrainConfig(), **{
        "data.path": data_path, "data.num_tokens_valid": 2048, "model.d_model": 32, "model.n_layers": 1,
        "model.head_dim": 16, "model.seq_len": T, "model.dtype": "float32", "opt.batch_size": 8,
        "opt.warmup_tokens": 256, "opt.peak_lr": 3e-3, "stop.num_tokens_train": 8 * T * 12,
        "log.every_steps": 4, "log.progress": False, "run.dir": str(run_dir), **changes})


def tiny_argv(data_path: str, run_dir: Path, *extra: str) -> list[str]:
    return ["--data.path", data_path, "--data.num_tokens_valid", "2048", "--model.d_model", "32",
            "--model.n_layers", "1", "--model.head_dim", "16", "--model.seq_len", str(T), "--model.dtype", "float32",
            "--opt.batch_size", "8", "--opt.warmup_tokens", "256", "--opt.peak_lr", "3e-3",
            "--stop.num_tokens_train", str(8 * T * 12), "--log.every_steps", "4", "--log.progress", "false",
            "--run.dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("corpora")
    paths = {}
    for lang in (0, 1):
        out = root / f"lang{lang}.bin"
        generate.generate(generate.Config(corpus="synthetic", language=lang, num_tokens=40_000, vocab_size=64,
                                          seq_len=T, out=str(out)))
        paths[lang] = str(out)
    return paths


# ------------------------------------------------------------------------------ 1. range checks


BAD_TRAIN_FLAGS = {  # flag changes -> a phrase of the message
    "--opt.peak_lr must be a positive number": {"opt.peak_lr": -1.0},
    "--opt.peak_lr must be a positive number, got nan": {"opt.peak_lr": float("nan")},
    "--stop.num_tokens_train must be >= 0": {"stop.num_tokens_train": -5},
    "--opt.warmup_tokens must be >= 0": {"opt.warmup_tokens": -100_000},
    "--stop.train_time must be >= 0": {"stop.train_time": -1.0},
    r"--opt.b2 must be in \[0, 1\)": {"opt.b2": 1.5},
    r"--opt.b1 must be in \[0, 1\)": {"opt.b1": -0.1},
    "--opt.weight_decay must be >= 0": {"opt.weight_decay": -0.1},
    "--stop.target_loss must be >= 0": {"stop.target_loss": -1.0},
    "--stop.early_stop_evals must be >= 0": {"stop.early_stop_evals": -2},
    "--stop.tokens_per_param must be >= 0": {"stop.tokens_per_param": -1.0},
    "--model.head_dim must be positive": {"model.head_dim": 0},
    "--model.d_model must be positive": {"model.d_model": -32},
    "--model.seq_len must be >= 2": {"model.seq_len": 1},
    "must be a multiple of --model.head_dim": {"model.head_dim": 24},
    "must be even": {"model.d_model": 30, "model.head_dim": 15},
    "--model.lora_rank must be >= 0": {"model.lora_rank": -1},
    "--reg.prompt_ids must be token ids >= 0": {"reg.prompt_ids": (-3,)},
    "only applies to self-generated replay": {"reg.prompt_ids": (3,)},
    "--log.every_tokens must be positive": {"log.every_tokens": 0},
    "--log.every_steps must be >= 0": {"log.every_steps": -1},
    "--eval.batch_size must be >= 0": {"eval.batch_size": -8},
    "--run.mesh_model must be >= 1": {"run.mesh_model": 0},
    "--reg.coeff must be >= 0": {"reg.coeff": -1.0},
    "--run.name '../../escaped' must be a plain name": {"run.name": "../../escaped"},
    "--run.name 'a/b' must be a plain name": {"run.name": "a/b"},
}


@pytest.mark.parametrize("phrase", sorted(BAD_TRAIN_FLAGS))
def test_train_validate_refuses_out_of_range(phrase, tmp_path):
    cfg = tiny("x.bin", tmp_path)
    cfg.validate()  # the base config is fine
    with pytest.raises(ValueError, match=phrase):
        replace(cfg, **BAD_TRAIN_FLAGS[phrase]).validate()


def test_train_cli_turns_bad_values_into_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(TrainConfig, tiny_argv("x.bin", tmp_path, "--opt.peak_lr", "-1"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--opt.peak_lr must be a positive number, got -1.0" in err and "Traceback" not in err


def test_model_config_head_dim_zero_is_a_message():
    with pytest.raises(ValueError, match="head_dim must be positive, got 0"):
        model_lib.ModelConfig(vocab_size=64, d_model=32, n_layers=1, head_dim=0, seq_len=32)


@pytest.mark.parametrize("content,phrase", [
    ("{bad", "is not valid JSON"),
    ('{"opt": {"peak_lrx": 1}}', "unknown field 'opt.peak_lrx'"),
    ('{"opt": 3}', "field 'opt' must be a JSON object"),
    ("[1]", "the top level must be a JSON object"),
])
def test_config_path_errors_name_the_file_and_field(tmp_path, capsys, content, phrase):
    path = tmp_path / "conf.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        cli.parse(TrainConfig, ["--config_path", str(path), "--data.path", "x.bin"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert phrase in err and str(path) in err and "Traceback" not in err


def test_config_path_good_file_still_seeds_defaults(tmp_path):
    path = tmp_path / "conf.json"
    path.write_text('{"opt": {"peak_lr": 0.002}, "stop": {"num_tokens_train": 1000}}')
    cfg = cli.parse(TrainConfig, ["--config_path", str(path), "--data.path", "x.bin"])
    assert cfg.opt.peak_lr == 0.002 and cfg.stop.num_tokens_train == 1000


@pytest.mark.parametrize("stage,config,phrase", [
    (generate, generate.Config(seq_len=0), "--seq_len must be >= 2"),
    (generate, generate.Config(segment_len=-1), "--segment_len must be >= 0"),
    (generate, generate.Config(dataset_id=-2), "--dataset_id must be >= 0"),
    (tokenize, tokenize.Config(threads=-1), "--threads and --seed must be >= 0"),
    (tokenizer, tokenizer.Config(workers=-1), "--max_chars and --workers must be >= 0"),
    (tokenize_hf, tokenize_hf.Config(hf_tokenizer="d", seq_len=-1), "--seq_len must be >= 0"),
    (tokenize_hf, tokenize_hf.Config(hf_tokenizer="d", pad_id=-5), "--pad_id and --dataset_id must be >= 0"),
    (evaluate, evaluate.EvaluateConfig(model=evaluate.EvalModelArgs(load_path="r"),
                                       data=evaluate.EvalDataArgs(batch_size=0)), "--data.batch_size must be positive"),
    (evaluate, evaluate.EvaluateConfig(model=evaluate.EvalModelArgs(load_path="r"),
                                       data=evaluate.EvalDataArgs(max_tokens=-1)), "must be >= 0"),
    (sample, sample.SampleConfig(model=sample.SampleModelArgs(load_path="r"), length=-4), "--length must be >= 2"),
    (sample, sample.SampleConfig(model=sample.SampleModelArgs(load_path="r"), prompt_id=-7), "--prompt_id must be"),
])
def test_other_stages_refuse_out_of_range(stage, config, phrase):
    with pytest.raises(ValueError, match=phrase):
        config.validate()


def test_output_path_that_is_a_directory_is_refused(tmp_path, capsys):
    for module, argv in ((tokenize, ["--sources", "a.txt", "--out", str(tmp_path)]),
                         (generate, ["--out", str(tmp_path)])):
        with pytest.raises(SystemExit) as e:
            module.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "is an existing directory" in err and "Traceback" not in err


def _tiny_tokenizer(tmp_path: Path) -> Path:
    src = tmp_path / "src.txt"
    src.write_text("the quick brown fox jumps over the lazy dog under a river\n" * 50)
    out = tmp_path / "tok.tiktoken"
    tokenizer.train_tokenizer(tokenizer.Config(sources=(str(src),), vocab_size=270, n_reserved=2, out=str(out),
                                               workers=1, progress=False))
    return out


@pytest.mark.parametrize("change,phrase", [
    (lambda m: m.pop("pattern"), "field 'pattern' is missing"),
    (lambda m: m.update(special_tokens=[1]), "field 'special_tokens' is missing or not a dict"),
])
def test_tokenizer_file_errors_name_file_and_field(tmp_path, change, phrase):
    tok = _tiny_tokenizer(tmp_path)
    meta_path = Path(str(tok) + ".json")
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=phrase) as e:
        tokenizer.load(tok)
    assert str(meta_path) in str(e.value)
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON") as e:
        tokenizer.load(tok)
    assert str(meta_path) in str(e.value)


def _fake_run_dir(tmp_path: Path, saved) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.CONFIG_FILE).write_text(json.dumps(saved))
    (run / runs.DONE_FILE).write_text("{}")
    return run


def _good_saved() -> dict:
    return {"config": {"data": {"path": "", "num_tokens_valid": 2048, "split_seed": 0}, "run": {"seed": 0},
                       "model": {"load_path": ""}},
            "resolved": {"model": {"vocab_size": 64, "d_model": 32, "n_layers": 1, "head_dim": 16, "seq_len": 32,
                                   "dtype": "float32"}, "lineage_ids": [0]}}


@pytest.mark.parametrize("mutate,phrase", [
    (lambda s: [1, 2], "must be a JSON object"),
    (lambda s: {**s, "resolved": {**s["resolved"], "model": {**s["resolved"]["model"], "extra": 1}}},
     "field 'resolved.model' is not a valid model config"),
    (lambda s: {**s, "resolved": {**s["resolved"], "lineage_ids": "0"}}, "field 'resolved.lineage_ids'"),
    (lambda s: {"config": s["config"]}, "field 'resolved' is missing"),
])
def test_bad_run_config_is_a_message_naming_file_and_field(tmp_path, mutate, phrase):
    run = _fake_run_dir(tmp_path, mutate(_good_saved()))
    with pytest.raises(ValueError, match=phrase) as e:
        runs.load_run(run)
    assert str(run / runs.CONFIG_FILE) in str(e.value)


def test_full_disk_is_a_message_not_a_traceback(corpora, tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "state.msgpack"))

    monkeypatch.setattr(checkpoint, "save", no_space)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_argv(corpora[0], tmp_path / "runs"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun" in err and "Traceback" not in err
