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
from forgetting.training import cli, runs
from forgetting.stages import evaluate, generate, sample, tokenize, tokenizer, tokenize_hf, train
from forgetting.training.train_config import TrainConfig, replace

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
    "must be at least --model.head_dim": {"model.head_dim": 64},
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
    (run / runs.PARAMS_FILE).write_bytes(b"")  # never read: the config is checked first
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


# ------------------------------------------------------------------------------ shared end-to-end helpers

WALL_CLOCK = ("train_seconds", "wall_time", "tokens_per_s")  # timing fields: excluded from exact comparisons


def without_wall_clock(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in WALL_CLOCK}, sort_keys=True)


def run_record(out: Path) -> tuple[str, list[str]]:
    """(final JSON, metrics rows), each serialized without wall-clock fields: equal means byte-for-byte equal."""
    done = json.loads((out / runs.DONE_FILE).read_text())
    rows = (out / runs.METRICS_FILE).read_text().splitlines()
    return without_wall_clock(done), [without_wall_clock(json.loads(r)) for r in rows]


def stage_process(argv: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "forgetting.stages.train", *argv], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def interrupt_once(cfg: TrainConfig, monkeypatch, after_saves: int = 2) -> None:
    """Runs `cfg` in-process until its `after_saves`-th state checkpoint, then stops it as a crash would."""
    original, calls = train._Trainer.save, {"n": 0}

    def dying_save(self, st, wall_time=None):
        original(self, st, wall_time)
        calls["n"] += 1
        if calls["n"] == after_saves:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(train._Trainer, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train._Trainer, "save", original)


# ------------------------------------------------------------------------------ 2. bound to its inputs


@pytest.mark.slow
def test_resume_refuses_changed_data_and_names_the_file(corpora, tmp_path, monkeypatch):
    data = tmp_path / "x.bin"
    for suffix in ("", ".json"):
        (tmp_path / ("x.bin" + suffix)).write_bytes(Path(corpora[0] + suffix).read_bytes())
    cfg = tiny(str(data), tmp_path / "runs")
    interrupt_once(cfg, monkeypatch)
    out = train.run_dir(cfg)
    inputs = json.loads((out / runs.CONFIG_FILE).read_text())["inputs"]
    assert set(inputs) == {"--data.path"} and inputs["--data.path"]["size"] == data.stat().st_size
    original = {s: (tmp_path / ("x.bin" + s)).read_bytes() for s in ("", ".json")}
    for suffix in ("", ".json"):  # another corpus under the same name
        (tmp_path / ("x.bin" + suffix)).write_bytes(Path(corpora[1] + suffix).read_bytes())
    with pytest.raises(ValueError, match=r"--data.path .*x.bin changed since run .* step 4"):
        train.train(cfg)
    assert json.loads((out / runs.CONFIG_FILE).read_text())["inputs"] == inputs  # config.json not rewritten
    (tmp_path / "x.bin.json").write_bytes(original[".json"])  # only the .bin changed: still refused
    with pytest.raises(ValueError, match="changed since run"):
        train.train(cfg)
    (tmp_path / "x.bin").write_bytes(original[""])
    assert train.train(cfg)["status"] == "finished"


@pytest.fixture(scope="module")
def tokenized_run(corpora, tmp_path_factory) -> tuple[str, Path]:
    """A finished run on data whose sidecar records tokenizer A; and a copy of that data marked tokenizer B."""
    root = tmp_path_factory.mktemp("tokruns")
    paths = {}
    for name, sha in (("a", "a" * 64), ("b", "b" * 64)):
        (root / f"{name}.bin").write_bytes(Path(corpora[0]).read_bytes())
        meta = json.loads(Path(corpora[0] + ".json").read_text())
        (root / f"{name}.bin.json").write_text(json.dumps({**meta, "tokenizer_sha256": sha}))
        paths[name] = root / f"{name}.bin"
    run = train.train(tiny(str(paths["a"]), root / "runs", **{"stop.num_tokens_train": 8 * T * 4}))["run_dir"]
    return run, paths["b"]


@pytest.mark.slow
def test_evaluate_and_sample_check_the_tokenizer(tokenized_run, tmp_path):
    run, other_data = tokenized_run
    assert json.loads((Path(run) / runs.CONFIG_FILE).read_text())["resolved"]["tokenizer_sha256"] == "a" * 64
    ok = evaluate.evaluate(evaluate.EvaluateConfig(model=evaluate.EvalModelArgs(load_path=run)))
    assert np.isfinite(ok["ntp"])
    with pytest.raises(ValueError, match="was tokenized with tokenizer bbbbbbbbbbbb…, but .* trained with aaaa"):
        evaluate.evaluate(evaluate.EvaluateConfig(model=evaluate.EvalModelArgs(load_path=run),
                                                  data=evaluate.EvalDataArgs(path=str(other_data))))
    tok = _tiny_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="is not the tokenizer .* was trained with"):
        sample.sample(sample.SampleConfig(model=sample.SampleModelArgs(load_path=run), tokenizer=str(tok)))


# ------------------------------------------------------------------------------ 3. atomic finishing


@pytest.mark.slow
def test_kill_at_every_phase_boundary_ends_like_the_uninterrupted_run(corpora, tmp_path, capfd):
    """`kill -9` (SIGKILL via $FORGETTING_FAULT_AT) after each state save, during the final params write and
    between the last save and done.json; each resumed run must end with the uninterrupted run's final JSON and
    metrics.jsonl, byte for byte without the wall-clock fields (train_seconds, wall_time, tokens_per_s)."""
    # Stop on a target loss reached before the token budget, so a resume that forgets the stop decision
    # trains past it (the 300 -> 400 steps).
    probe = train.train(tiny(corpora[0], tmp_path / "probe"))
    target = [r["valid_ntp"] for r in runs.read_metrics(probe["run_dir"]) if r["step"] == 8][0]
    extra = ["--stop.num_tokens_train", str(8 * T * 16), "--stop.target_loss", repr(target)]
    cfg = replace(tiny(corpora[0], tmp_path / "reference"), **{"stop.num_tokens_train": 8 * T * 16,
                                                               "stop.target_loss": target})
    reference = train.train(cfg)
    assert reference["metrics"]["stop_reason"] == "target_loss" and reference["metrics"]["steps"] < 16
    expected = run_record(Path(reference["run_dir"]))
    saves = [r["step"] for r in runs.read_metrics(reference["run_dir"])]
    points = [f"state_saved:{s}" for s in saves] + ["params_write", "before_done"]
    for point in points:
        run_dir = tmp_path / point.replace(":", "_")
        proc = stage_process(tiny_argv(corpora[0], run_dir, *extra), env={runs.FAULT_ENV: point})
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, err[-2000:])
        out = train.run_dir(replace(cfg, **{"run.dir": str(run_dir)}))
        assert not runs.is_done(out)
        if point == "params_write":
            assert list(out.glob(".params.msgpack.*.tmp"))  # the kill left a temp file behind
        capfd.readouterr()
        resumed = train.train(replace(cfg, **{"run.dir": str(run_dir)}))
        assert resumed["status"] == "finished", point
        assert "took over the stale lock of pid" in capfd.readouterr().err, point
        assert run_record(out) == expected, point
        assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")), point


@pytest.mark.slow
def test_kill_at_every_phase_boundary_of_a_self_generated_kl_finetune(corpora, tmp_path, capfd):
    """The same for a finetune with self-generated KL replay (the paper's method): the replay sampler's
    buffers and the pending losses resume to the uninterrupted run's numbers, byte for byte."""
    base = train.train(tiny(corpora[0], tmp_path / "base"))["run_dir"]
    extra = ["--model.load_path", base, "--reg.method", "kl_pre", "--reg.synth", "true", "--reg.batch_size", "4",
             "--reg.buffer", "3", "--stop.num_tokens_train", str(8 * T * 8)]
    cfg = replace(tiny(corpora[1], tmp_path / "reference"), **{
        "model.load_path": base, "reg.method": "kl_pre", "reg.synth": True, "reg.batch_size": 4, "reg.buffer": 3,
        "stop.num_tokens_train": 8 * T * 8})
    reference = train.train(cfg)
    expected = run_record(Path(reference["run_dir"]))
    points = [f"state_saved:{r['step']}" for r in runs.read_metrics(reference["run_dir"])] + ["params_write", "before_done"]
    assert points[:3] == ["state_saved:0", "state_saved:4", "state_saved:8"]
    for point in points:
        run_dir = tmp_path / point.replace(":", "_")
        proc = stage_process(tiny_argv(corpora[1], run_dir, *extra), env={runs.FAULT_ENV: point})
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, err[-2000:])
        resumed = train.train(replace(cfg, **{"run.dir": str(run_dir)}))
        assert resumed["status"] == "finished", point
        assert run_record(Path(resumed["run_dir"])) == expected, point


@pytest.mark.slow
def test_resume_at_step_0_and_at_the_final_step_adds_no_rows(corpora, tmp_path, monkeypatch):
    reference = train.train(tiny(corpora[0], tmp_path / "reference"))
    expected = run_record(Path(reference["run_dir"]))
    for after_saves in (1, 4):  # the step-0 checkpoint; the final one (steps 0, 4, 8, 12)
        cfg = tiny(corpora[0], tmp_path / f"cut{after_saves}")
        interrupt_once(cfg, monkeypatch, after_saves)
        assert train.train(cfg)["status"] == "finished"
        assert run_record(train.run_dir(cfg)) == expected, after_saves


# ------------------------------------------------------------------------------ 4. one writer per run


@pytest.mark.slow
def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(corpora, tmp_path, capsys):
    cfg = tiny(corpora[0], tmp_path / "runs", **{"stop.num_tokens_train": 8 * T * 4})
    out = train.run_dir(cfg)
    out.mkdir(parents=True)
    with runs.RunLock(out):
        with pytest.raises(runs.RunInUse, match=f"is in use by pid {os.getpid()} on host"):
            train.train(cfg)
        with pytest.raises(SystemExit) as e:
            train.main(["--config_path", _write_config(tmp_path, cfg)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"in use by pid {os.getpid()}" in err and "Traceback" not in err
    assert not (out / runs.METRICS_FILE).exists()  # the refused runs wrote nothing
    (out / runs.LOCK_FILE).write_text("pid 999999 on host elsewhere\n")  # left by a killed run: not locked
    assert train.train(cfg)["status"] == "finished"
    assert "took over the stale lock of pid 999999 on host elsewhere" in capsys.readouterr().err


def _write_config(tmp_path: Path, cfg: TrainConfig) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cli.to_dict(cfg)))
    return str(path)


# ------------------------------------------------------------------------------ 5. signals, umask, advice


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_and_exits_without_traceback(corpora, tmp_path, sig):
    steps = 400  # long enough that the signal lands mid-run
    argv = tiny_argv(corpora[0], tmp_path / "runs", "--stop.num_tokens_train", str(8 * T * steps),
                     "--log.every_steps", "100")
    cfg = cli.parse(TrainConfig, argv)
    out = train.run_dir(cfg)
    proc = stage_process(argv)
    while not (out / runs.STATE_FILE).exists() and proc.poll() is None:  # the handlers are installed by now
        pass
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Rerun the same command to resume" in err and "Traceback" not in err
    step = checkpoint.read_metadata(out / runs.STATE_FILE)["step"]
    assert 0 <= step < steps and not runs.is_done(out)
    resumed = train.train(cfg)
    reference = train.train(replace(cfg, **{"run.dir": str(tmp_path / "reference")}))
    assert run_record(out) == run_record(Path(reference["run_dir"]))  # train_loss included: pending losses kept
    assert resumed["metrics"]["steps"] == steps


@pytest.mark.slow
def test_files_follow_the_umask(corpora, tmp_path):
    previous = os.umask(0o022)
    try:
        out = Path(train.train(tiny(corpora[0], tmp_path / "runs", **{"stop.num_tokens_train": 8 * T * 4}))["run_dir"])
        tok = _tiny_tokenizer(tmp_path)
    finally:
        os.umask(previous)
    files = [out / n for n in (runs.CONFIG_FILE, runs.METRICS_FILE, runs.STATE_FILE, runs.PARAMS_FILE,
                               runs.DONE_FILE)] + [tok, Path(str(tok) + ".json")]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o644" for f in files}


@pytest.mark.slow
def test_corrupt_checkpoint_advice_recovers(corpora, tmp_path, monkeypatch):
    cfg = tiny(corpora[0], tmp_path / "runs", **{"stop.num_tokens_train": 8 * T * 8})
    out = Path(train.train(cfg)["run_dir"])
    expected = run_record(out)
    blob = bytearray((out / runs.PARAMS_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (out / runs.PARAMS_FILE).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="To recover the run's final weights: delete") as e:
        runs.load_run(out)
    assert str(out / runs.PARAMS_FILE) in str(e.value) and str(out / runs.DONE_FILE) in str(e.value)
    (out / runs.PARAMS_FILE).unlink()  # follow the advice
    (out / runs.DONE_FILE).unlink()
    assert train.train(cfg)["status"] == "finished"
    runs.load_run(out)
    assert run_record(out) == expected

    # A corrupt state checkpoint of an unfinished run: the advice (delete it, rerun) also ends identically.
    cfg2 = replace(cfg, **{"run.dir": str(tmp_path / "cut")})
    interrupt_once(cfg2, monkeypatch)
    state = train.run_dir(cfg2) / runs.STATE_FILE
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(ValueError, match="To recover: delete .*state.msgpack and rerun this command"):
        train.train(cfg2)
    state.unlink()
    assert train.train(cfg2)["status"] == "finished"
    assert run_record(train.run_dir(cfg2)) == expected


@pytest.mark.slow
def test_nan_advice_works(corpora, tmp_path):
    cfg = tiny(corpora[0], tmp_path / "runs", **{"opt.peak_lr": 1e30, "opt.warmup_tokens": 0,
                                                 "opt.weight_decay": 0.0})
    with pytest.raises(FloatingPointError, match="rerunning this command diverges again") as e:
        train.train(cfg)
    assert "Start a new run with a lower --opt.peak_lr" in str(e.value)
    with pytest.raises(FloatingPointError):  # what the advice says: the same command diverges again
        train.train(cfg)
    fixed = train.train(replace(cfg, **{"opt.peak_lr": 3e-3}))  # the advice: a new run with a lower LR
    assert fixed["status"] == "finished" and np.isfinite(fixed["metrics"]["valid_ntp"])
    assert fixed["run_dir"] != str(train.run_dir(cfg))


@pytest.mark.slow
def test_signal_between_evals_keeps_the_pending_losses(corpora, tmp_path, monkeypatch):
    """A SIGTERM at step 5 (between the evals at 4 and 8) checkpoints step 6 with the losses of steps 5-6, so
    the resumed run's train_loss at step 8 (and everything else) equals the uninterrupted run's."""
    reference = train.train(tiny(corpora[0], tmp_path / "reference"))
    cfg = tiny(corpora[0], tmp_path / "runs")
    original = train._Trainer.batch

    def batch_then_signal(self, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: a flag, checked before the next step
        return original(self, step)

    monkeypatch.setattr(train._Trainer, "batch", batch_then_signal)
    with pytest.raises(runs.Interrupted, match="stopped by SIGTERM after step 6") as e:
        train.train(cfg)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    out = train.run_dir(cfg)
    assert checkpoint.read_metadata(out / runs.STATE_FILE)["step"] == 6
    monkeypatch.setattr(train._Trainer, "batch", original)
    assert train.train(cfg)["status"] == "finished"
    assert run_record(out) == run_record(Path(reference["run_dir"]))
