"""Issue 28: inputs that never mix. Every file a run reads is bound to the run's tokenizer and fingerprinted,
replay never draws the rows that measure forgetting, a run is named by its content, the HF config reader
works from an allowlist, and messages name the right cause. Uses the issue-17 tiny config (`T` = 32)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from forgetting.core import data as data_lib
from forgetting.core import hf_config
from forgetting.evals import benchmarks
from forgetting.training import run_dir, runs, train_setup
from forgetting.stages import train
from forgetting.training.train_config import replace
from forgetting.experiments import framework
from test_authors_interop import finetune_cfg, raw_bin, write_authors_checkpoint
from test_integrity import T, interrupt_once, tiny, tiny_argv

try:
    from test_gguf import tiny_gguf  # the fixture: a tiny Llama GGUF with its tokenizer
except (ImportError, pytest.skip.Exception):
    @pytest.fixture
    def tiny_gguf():
        pytest.skip("needs the gguf extra and tokenizers")

A, B = "a" * 64, "b" * 64  # two tokenizers' sha256


def _copy_marked(src: str, dst: Path, tokenizer: str | None) -> Path:
    """A copy of a token file whose sidecar records `tokenizer` (None: no record)."""
    dst.write_bytes(Path(src).read_bytes())
    meta = json.loads(Path(src + ".json").read_text())
    data_lib.sidecar_path(dst).write_text(json.dumps({**meta, "tokenizer_sha256": tokenizer}))
    return dst


@pytest.fixture(scope="module")
def base(corpora, tmp_path_factory) -> dict:
    """A finished pretraining run on tokenizer-A data, and new data of tokenizer A and of tokenizer B."""
    root = tmp_path_factory.mktemp("inputs")
    old = _copy_marked(corpora[0], root / "old.bin", A)
    run = train.train(tiny(str(old), root / "runs", **{"stop.num_tokens_train": 8 * T * 4}))["run_dir"]
    return {"root": root, "run": run, "old": old, "new_a": _copy_marked(corpora[1], root / "new_a.bin", A),
            "new_b": _copy_marked(corpora[1], root / "new_b.bin", B), "old_b": _copy_marked(corpora[0], root / "old_b.bin", B)}


def _finetune(base: dict, tmp_path: Path, **changes):
    return tiny(str(base["new_a"]), tmp_path / "runs", **{"model.load_path": base["run"], **changes})


# ------------------------------------------------------------------------------ every file bound to the tokenizer

@pytest.mark.slow
@pytest.mark.parametrize("flag,changes", [
    ("--reg.path", lambda b: {"reg.method": "kl_pre", "reg.batch_size": 8, "reg.path": str(b["old_b"])}),
    ("--reg.path", lambda b: {"reg.method": "replace", "reg.coeff": 0.5, "reg.path": str(b["old_b"])}),
    ("--mix.path", lambda b: {"mix.path": str(b["old_b"]), "mix.coeff": 0.5}),
    ("--eval.extra_paths", lambda b: {"eval.extra_paths": (str(b["old"]), str(b["new_b"]))}),
])
def test_every_token_file_is_checked_against_the_checkpoints_tokenizer(base, tmp_path, flag, changes):
    """Before: only --data.path was checked; these finetunes ran (exit 0) on tokens of another tokenizer."""
    cfg = _finetune(base, tmp_path, **changes(base))
    cfg.validate()
    with pytest.raises(ValueError, match=rf"{flag} \S+_b.bin was tokenized with tokenizer bbbbbbbbbbbb…, but the "
                                         rf"checkpoint \S+ was trained with aaaaaaaaaaaa…"):
        train_setup.build_setup(cfg)
    # the same flags on tokenizer-A files are fine
    fixed = {k: (str(base["old"]) if isinstance(v, str) and v.endswith("_b.bin") else v) for k, v in changes(base).items()}
    fixed = {k: ((str(base["old"]),) if isinstance(v, tuple) else v) for k, v in fixed.items()}
    assert train_setup.build_setup(_finetune(base, tmp_path, **fixed)).model_cfg.d_model == 32


@pytest.mark.slow
def test_pretraining_files_share_the_datas_tokenizer(base, tmp_path):
    cfg = tiny(str(base["old"]), tmp_path / "runs", **{"mix.path": str(base["new_b"]), "mix.coeff": 0.5})
    with pytest.raises(ValueError, match=r"--mix.path \S+new_b.bin was tokenized with tokenizer bbbbbbbbbbbb…, but "
                                         r"--data.path \S+old.bin was tokenized with aaaaaaaaaaaa…"):
        train_setup.build_setup(cfg)


@pytest.mark.slow
def test_load_dir_runs_and_mask_files_are_fingerprinted(tmp_path, monkeypatch):
    """Before: a --model.load_dir checkpoint and an assistant-mask file were read but not recorded, so a resume
    after they changed went on silently."""
    ckpt = tmp_path / "sweep" / "run0"
    write_authors_checkpoint(ckpt, "c4_en.bin")
    raw_bin(ckpt / "c4_en.bin", 0)
    new = raw_bin(tmp_path / "c4_es.bin", 1)
    mask = tmp_path / "c4_es.mask.bin"
    n = new.stat().st_size // 2
    np.tile(np.asarray([0, 1], np.uint8), n // 2).tofile(mask)
    data_lib.sidecar_path(new).write_text(json.dumps({"dataset_id": 1, "dtype": "uint16", "num_tokens": n,
                                                      "loss_mask": mask.name}))
    cfg = finetune_cfg(tmp_path, new, **{"model.load_dir": str(tmp_path / "sweep"), "model.load_idx": 0,
                                         "reg.method": "kl_pre", "reg.batch_size": 8, "log.every_steps": 1})
    interrupt_once(cfg, monkeypatch)
    saved = json.loads((train.run_dir(cfg) / runs.CONFIG_FILE).read_text())
    inputs = saved["inputs"]
    assert inputs["--model.load_dir (weights.npz)"]["size"] == (ckpt / "weights.npz").stat().st_size
    assert inputs["--model.load_dir (config.yaml)"]["path"].endswith("config.yaml")
    assert inputs["--data.path (loss mask)"]["size"] == n and saved["inputs_version"] == runs.INPUTS_VERSION
    flipped = 1 - np.fromfile(mask, np.uint8)  # same size, other tokens count
    flipped.tofile(mask)
    with pytest.raises(ValueError, match=r"--data.path \(loss mask\) \S+c4_es.mask.bin changed since run"):
        train.train(cfg)


@pytest.mark.slow
def test_gguf_checkpoint_is_fingerprinted_and_binds_the_tokenizer(tiny_gguf, tmp_path):
    """A GGUF --model.load_path is recorded (before: nothing, the run directory's file names did not match a
    file), and data tokenized with another tokenizer is refused (before: a GGUF had no tokenizer identity)."""
    from forgetting.stages import tokenize_hf

    path = tiny_gguf[0]
    src = tmp_path / "text.jsonl"
    src.write_text("".join(json.dumps({"text": f"the {i} the {i * 7} the"}) + "\n" for i in range(60)))
    data = tmp_path / "text.bin"
    meta = tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(path), out=str(data)))
    cfg = replace(tiny(str(data), tmp_path / "runs"), **{
        "model.load_path": str(path), "model.d_model": 256, "model.n_layers": 6, "model.head_dim": 64,
        "data.num_tokens_valid": 4 * T, "opt.batch_size": 2, "stop.num_tokens_train": 2 * T})
    recorded = run_dir.fingerprints(train_setup.build_setup(cfg).input_files)
    assert recorded[f"--model.load_path ({path.name})"]["size"] == path.stat().st_size
    data_lib.sidecar_path(data).write_text(json.dumps({**meta, "tokenizer_sha256": B}))
    with pytest.raises(ValueError, match=r"--data.path \S+text.bin was tokenized with tokenizer bbbbbbbbbbbb…, but the "
                                         r"checkpoint \S+tiny.gguf was trained with"):
        train_setup.build_setup(cfg)


@pytest.mark.slow
def test_hf_directory_binds_its_tokenizer_and_fingerprints_config_and_tokenizer(tmp_path):
    """Data tokenized with the directory (or one of its tokenizer files alone) is accepted; another tokenizer's is
    refused (before: a HF checkpoint had no tokenizer identity); its config.json and tokenizer files are
    recorded beside the weights."""
    pytest.importorskip("tokenizers")
    import jax

    import standin_checkpoint  # tests/: the tiny HF-layout checkpoint
    from forgetting.stages import tokenize_hf

    hf = tmp_path / "tiny-llama"
    standin_checkpoint.write_tiny_hf_checkpoint(hf, standin_checkpoint.tiny_config(seq_len=T), jax.random.key(0))
    src = tmp_path / "text.jsonl"
    src.write_text("".join(json.dumps({"text": f"the fox {i} jumps over the dog {i * 7}"}) + "\n" for i in range(80)))
    data = tmp_path / "text.bin"
    meta = tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(hf), out=str(data)))
    cfg = replace(tiny(str(data), tmp_path / "runs"), **{
        "model.load_path": str(hf), "model.d_model": 256, "model.n_layers": 6, "model.head_dim": 64,
        "data.num_tokens_valid": 4 * T, "opt.batch_size": 2, "stop.num_tokens_train": 2 * T})
    recorded = run_dir.fingerprints(train_setup.build_setup(cfg).input_files)
    assert {"--model.load_path (config.json)", "--model.load_path (tokenizer.model)"} <= set(recorded)
    loaded = runs.load_run(hf)  # data tokenized with one of its tokenizer files alone names the same tokenizer
    assert loaded.tokenizer_matches(tokenize_hf.tokenizer_sha256(hf / "tokenizer.model"))
    assert not loaded.tokenizer_matches(B) and loaded.tokenizer_matches(None)
    data_lib.sidecar_path(data).write_text(json.dumps({**meta, "tokenizer_sha256": B}))
    with pytest.raises(ValueError, match=r"--data.path \S+ was tokenized with tokenizer bbbbbbbbbbbb…, but the "
                                         r"checkpoint \S+tiny-llama was trained with"):
        train_setup.build_setup(cfg)


# ------------------------------------------------------------------------------ replay never sees the measured rows

def _rows(rows: np.ndarray) -> set[bytes]:
    return {np.asarray(r[1:], np.int32).tobytes() for r in rows}  # token 0 is the dataset id


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["same", "relative", "copy"])
def test_replay_from_the_loaded_runs_data_never_draws_its_validation_rows(base, tmp_path, monkeypatch, capsys,
                                                                          spelling):
    """Real replay of the base run's data given as --reg.path (spelled as recorded, relative, or a copy
    elsewhere) with --data.split_seed 1 on the finetune: row by row, no replay row is one of the base run's
    validation rows (the rows prev_ntp / prev_kl are computed on). Before: the finetune's split was used and
    about 1 in 20 of the base run's validation rows came back as replay every epoch."""
    old = Path(base["old"])
    if spelling == "relative":
        monkeypatch.chdir(old.parent.parent)
        reg_path = os.path.relpath(old)
    elif spelling == "copy":
        reg_path = str(_copy_marked(str(old), tmp_path / "moved.bin", A))
    else:
        reg_path = str(old)
    cfg = _finetune(base, tmp_path, **{"reg.method": "kl_pre", "reg.batch_size": 8, "reg.path": reg_path,
                                       "data.split_seed": 1})
    s = train_setup.build_setup(cfg)
    assert "replay draws from that run's training split (split_seed 0)" in capsys.readouterr().err
    base_valid = _rows(np.concatenate(list(s.prev_dataset.valid_batches(64))))
    assert len(base_valid) == s.prev_dataset.num_valid == 64  # rows are distinct: the comparison is exact
    epoch = s.replay.dataset.num_train // 8 + 1
    replayed = _rows(np.concatenate([s.replay.rows(step) for step in range(epoch)]))
    assert len(replayed) > 1000  # a whole epoch of the training split was drawn
    assert not replayed & base_valid
    # the finetune's own split of that file (seed 1) would have leaked
    own = data_lib.SequenceDataset(data_lib.TokenFile(old), T, num_tokens_valid=2048, split_seed=1)
    assert _rows(own.train_sequences(np.arange(own.num_train))) & base_valid


# ------------------------------------------------------------------------------ a run is named by its content

@pytest.mark.slow
def test_path_spelling_does_not_change_the_run_and_a_killed_run_resumes(base, tmp_path, monkeypatch, capfd):
    """Before: `x.bin` vs `$PWD/x.bin` (and `run/` vs `run`) hashed differently, so the killed run restarted from
    step 0 in a new directory."""
    monkeypatch.chdir(base["root"])
    relative = _finetune(base, tmp_path, **{"data.path": "new_a.bin", "model.load_path": base["run"] + "/"})
    absolute = _finetune(base, tmp_path)
    assert train.run_dir(relative) == train.run_dir(absolute)
    interrupt_once(relative, monkeypatch)
    capfd.readouterr()
    result = train.train(absolute)
    assert result["status"] == "finished" and result["run_dir"] == str(train.run_dir(relative))
    assert "at step 4" in capfd.readouterr().err  # resumed, not restarted
    again = train.train(replace(relative, **{"data.path": "./new_a.bin"}))
    assert again["status"] == "reused"


def test_a_run_named_before_normalization_keeps_its_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny("x.bin", tmp_path / "runs")
    legacy = runs._named(cfg, runs.hashed_config(cfg, normalize=False, scheme=1))
    assert runs.run_dir(cfg) != legacy  # a relative path is now named by its absolute form
    legacy.mkdir(parents=True)
    assert runs.run_dir(cfg) == legacy  # ... but an existing run of the old name is still found and resumed


@pytest.mark.slow
def test_shape_flags_that_contradict_the_checkpoint_are_refused(base, tmp_path):
    """Before: ignored without a word, and config.json kept both shapes."""
    with pytest.raises(ValueError, match=r"--model.d_model 64, --model.n_layers 3 contradict the loaded checkpoint "
                                         r"\S+, which has d_model=32, n_layers=1"):
        train_setup.build_setup(_finetune(base, tmp_path, **{"model.d_model": 64, "model.n_layers": 3}))
    with pytest.raises(ValueError, match="--model.seq_len 64 contradicts .* seq_len=32"):
        train_setup.build_setup(_finetune(base, tmp_path, **{"model.seq_len": 64}))
    # flags equal to the checkpoint's (tiny's own) or left at their defaults are fine
    same = train_setup.build_setup(_finetune(base, tmp_path))
    defaults = train_setup.build_setup(_finetune(base, tmp_path, **{"model.d_model": 256, "model.n_layers": 6,
                                                                    "model.head_dim": 64, "model.seq_len": 256}))
    assert same.model_cfg == defaults.model_cfg and same.model_cfg.d_model == 32


# ------------------------------------------------------------------------------ the HF config allowlist

REAL_CONFIGS = {  # published config.json files (values as released)
    "Llama-3.2-1B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
    "Qwen2.5-0.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "SmolLM2-135M-Instruct": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
        "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
        "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152},
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_configs_pass_the_allowlist_and_an_unknown_field_is_refused(name):
    hf = REAL_CONFIGS[name]
    spec = hf_config.parse_hf_config(hf)
    assert (spec.hidden_size, spec.vocab_size) == (hf["hidden_size"], hf["vocab_size"])
    with pytest.raises(ValueError, match=r"config.json: unknown field logit_scale=2.0: .*refuses it"):
        hf_config.parse_hf_config(hf | {"logit_scale": 2.0})  # (Cohere's logit multiplier: it changes every logit)


def test_allowlist_accounts_for_every_key_and_neutral_fields_stay_neutral():
    with pytest.raises(ValueError, match="unknown fields quantization_config=.*, rope_skew=0.5"):
        hf_config.parse_hf_config(REAL_CONFIGS["Qwen3-0.6B"] | {"quantization_config": {"bits": 4}, "rope_skew": 0.5})
    with pytest.raises(ValueError, match="rope_interleaved=True is not implemented"):
        hf_config.parse_hf_config(REAL_CONFIGS["SmolLM2-135M-Instruct"] | {"rope_interleaved": True})
    plain = hf_config.parse_hf_config(REAL_CONFIGS["Qwen3-0.6B"])
    chatty = hf_config.parse_hf_config(REAL_CONFIGS["Qwen3-0.6B"] | {"use_cache": False, "temperature": 0.6,
                                                                   "pad_token_id": 0, "_name_or_path": "x"})
    assert plain == chatty
    assert not hf_config._UNDERSTOOD & hf_config._NEUTRAL  # one list per key


# ------------------------------------------------------------------------------ messages that name the right cause

@pytest.mark.slow
def test_directory_as_input_and_output_under_a_file_get_their_own_messages(corpora, tmp_path, capsys):
    """Before: both got the failed-write text ('free disk space, permissions')."""
    with pytest.raises(SystemExit) as e:
        train.main(tiny_argv(str(tmp_path), tmp_path / "runs"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"token file {tmp_path} is a directory" in err and "disk space" not in err
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_argv(corpora[0], blocker / "runs"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "part of this path is a regular file, not a directory" in err
    assert "disk space" not in err
    from forgetting.stages import tokenize

    with pytest.raises(SystemExit) as e:
        tokenize.main(["--sources", "a.txt", "--out", str(blocker / "x.bin")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "lies under" in err and "which is a regular file" in err


@pytest.mark.slow
def test_nan_from_a_model_field_is_not_blamed_on_the_learning_rate(corpora, tmp_path):
    """Before: --model.rope_base -1 trained to a NaN loss 'with a lower --opt.peak_lr' as the advice."""
    with pytest.raises(ValueError, match=r"--model.rope_base must be a positive number .* got -1.0"):
        tiny(corpora[0], tmp_path / "runs", **{"model.rope_base": -1.0}).validate()
    # a checkpoint whose weights hold a NaN: the message names the weights, not the learning rate
    ckpt = tmp_path / "their_runs" / "nan"
    weights = write_authors_checkpoint(ckpt, "c4_en.bin")
    weights["out"][0, 0, 0, 0] = np.nan
    np.savez(ckpt / "weights.npz", **weights)
    cfg = finetune_cfg(tmp_path, raw_bin(tmp_path / "c4_es.bin", 1), **{"model.load_path": str(ckpt)})
    with pytest.raises(FloatingPointError, match=r"already holds non-finite weights \(\['out'\]\), so the learning "
                                                 r"rate is not the cause") as e:
        train.train(cfg)
    assert "--opt.peak_lr" not in str(e.value)


def test_json_errors_name_the_file_and_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.METRICS_FILE).write_text('{"step": 0}\n{"step": 4, oops}\n{"step": 8}\n')
    for read in (runs.read_metrics, framework.read_metrics):
        with pytest.raises(ValueError, match=rf"{run / runs.METRICS_FILE}, line 2 column 13: not valid JSON"):
            read(run)
    (run / runs.METRICS_FILE).write_text('{"step": 0}\n{"step": 4, "valid_nt')  # a torn last line: dropped
    assert runs.read_metrics(run) == framework.read_metrics(run) == [{"step": 0}]
    bench = tmp_path / "mmlu.jsonl"
    bench.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n\n{"question": "r",\n')
    with pytest.raises(ValueError, match=rf"{bench}, line 3 column"):
        benchmarks.read_rows(bench)
    bench = tmp_path / "mmlu.json"
    bench.write_text('[\n  {"question": "q"},\n  {"question": }\n]')
    with pytest.raises(ValueError, match=rf"{bench}, line 3 column 16"):
        benchmarks.read_rows(bench)


def test_a_sidecar_naming_the_wrong_dtype_is_a_dtype_mismatch(tmp_path):
    """Before: 'says 100 tokens but ... holds 200' (a count mismatch)."""
    path = tmp_path / "big.bin"
    np.arange(100, dtype="<u4").tofile(path)
    data_lib.sidecar_path(path).write_text(json.dumps({"dataset_id": 0, "dtype": "uint16", "num_tokens": 100}))
    with pytest.raises(ValueError, match=r"names dtype uint16, but \S+big.bin holds 100 tokens of uint32"):
        data_lib.TokenFile(path)
    np.arange(101, dtype="<u2").tofile(path)  # odd bytes for uint32: not 'truncated?' either
    data_lib.sidecar_path(path).write_text(json.dumps({"dataset_id": 0, "dtype": "uint32", "num_tokens": 101}))
    with pytest.raises(ValueError, match=r"names dtype uint32, but \S+big.bin holds 101 tokens of uint16"):
        data_lib.TokenFile(path)
    np.arange(90, dtype="<u2").tofile(path)  # a real count mismatch keeps its message
    data_lib.sidecar_path(path).write_text(json.dumps({"dataset_id": 0, "dtype": "uint16", "num_tokens": 100}))
    with pytest.raises(ValueError, match="says 100 tokens but .* holds 90"):
        data_lib.TokenFile(path)
