"""The authors' files: raw uint16 .bin data without a sidecar, their checkpoint directories (weights.npz +
config.yaml, written here exactly as their train_single.py writes them), load_dir/load_idx sweeps, and the
export of this project's runs to their layout (round trip)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from forgetting.core import data as data_lib
from forgetting.core import model as model_lib
from forgetting.stages import export, train
from forgetting.training import runs
from forgetting.training.train_config import TrainConfig, replace

T, V, D, L, H = 32, 64, 32, 1, 16


def raw_bin(path: Path, language: int, n_tokens: int = 24_000) -> Path:
    """A raw uint16 token file, no sidecar, as the authors' tokenizer writes it (two distinguishable
    'languages': different token ranges)."""
    rng = np.random.default_rng(language)
    lo = 2 + 30 * language
    np.asarray(rng.integers(lo, lo + 30, n_tokens), np.uint16).tofile(path)
    return path


def authors_config_yaml(data_path: str, split_seed: int = 0, num_tokens_valid: int = 2048) -> str:
    """config.yaml as their OmegaConf.to_yaml(c, resolve=True) writes it (DEFAULT_CFG merged, load_cfg null)."""
    return f"""run:
  seed: 0
  tags: null
data:
  path: {data_path}
  split_seed: {split_seed}
  num_tokens_valid: {num_tokens_valid}
mix:
  path: null
  coeff: 0
model:
  D: {D}
  L: {L}
  H: {H}
  T: {T}
  V: {V}
  lora_rank: null
  remat: false
  dp_shard: false
  tp_size: 1
  activ_dtype: bfloat16
  load_path: null
  load_dir: null
  load_idx: null
  save_dir: /runs/model_size_v3
reg:
  method: null
  coeff: 1
  synth: false
  batch_size: null
  buffer: 1
opt:
  batch_size: 8
  peak_lr: 0.001
  warmup_tokens: 10000000
  lr_decay: null
  optimizer: adamw
  b1: 0.9
  b2: 0.999
  weight_decay: 0.02
stop:
  num_tokens_train: null
  tokens_per_param: null
  num_epochs: null
  target_loss: 3.0
  train_time: null
  early_stop_steps: null
log:
  every_tokens: 1000000
  measure_time: false
  project: ptx-mini
  mode: online
load_cfg: null
"""


def authors_weights(seed: int) -> dict[str, np.ndarray]:
    """Their create_sharded_model's arrays: float32, N = D // H heads of width H, F = 4D."""
    N, F = D // H, 4 * D
    rng = np.random.default_rng(seed)
    shapes = {"embed_in": (V, D), "embed_out": (V, D), "qkv": (L, 3, N, D, H), "out": (L, N, H, D),
              "up": (L, D, F), "down": (L, F, D)}
    return {k: (rng.standard_normal(s) * (F if k == "down" else D) ** -0.5).astype(np.float32)
            for k, s in shapes.items()}


def write_authors_checkpoint(ckpt: Path, data_path: str, seed: int = 0) -> dict[str, np.ndarray]:
    ckpt.mkdir(parents=True)
    weights = authors_weights(seed)
    np.savez(ckpt / "weights.npz", **weights)  # their np.savez(out_dir / "weights.npz", **weights_host)
    (ckpt / "config.yaml").write_text(authors_config_yaml(data_path))
    return weights


def finetune_cfg(tmp_path: Path, new: Path, **changes) -> TrainConfig:
    return replace(TrainConfig(), **{
        "data.path": str(new), "data.num_tokens_valid": 2048, "model.dtype": "float32", "opt.batch_size": 8,
        "opt.warmup_tokens": 0, "opt.peak_lr": 3e-3, "stop.num_tokens_train": 8 * T * 4, "log.every_steps": 2,
        "log.progress": False, "run.dir": str(tmp_path / "runs"), **changes})


# ------------------------------------------------------------------------------------ raw token files


def test_raw_bin_takes_the_authors_id_of_its_stem_or_a_given_one(tmp_path):
    en = raw_bin(tmp_path / "c4_en.bin", 0, 1000)
    es = raw_bin(tmp_path / "c4_es.bin", 1, 1000)
    assert data_lib.TokenFile(en).dataset_id == 0 and data_lib.TokenFile(es).dataset_id == 1
    assert data_lib.TokenFile(en).vocab_size == 0  # unknown: the model gives it
    other = raw_bin(tmp_path / "mine.bin", 0, 1000)
    with pytest.raises(FileNotFoundError, match="--data.dataset_id"):
        data_lib.TokenFile(other)
    assert data_lib.TokenFile(other, dataset_id=5).dataset_id == 5
    assert data_lib.TokenFile(en, dataset_id=1).dataset_id == 1  # an explicit id wins for a raw file


def test_given_dataset_id_must_agree_with_a_sidecar(tmp_path):
    path = tmp_path / "x.bin"
    data_lib.write_token_file(path, np.arange(100) % 50, {"dataset_id": 3, "vocab_size": 64})
    assert data_lib.TokenFile(path, dataset_id=3).dataset_id == 3
    with pytest.raises(ValueError, match="sidecar says 3"):
        data_lib.TokenFile(path, dataset_id=4)


@pytest.mark.slow
def test_raw_bin_pretrains_with_the_vocab_from_the_model(tmp_path):
    data = raw_bin(tmp_path / "mine.bin", 0)
    cfg = finetune_cfg(tmp_path, data, **{"data.dataset_id": 7, "model.d_model": D, "model.n_layers": L,
                                          "model.head_dim": H, "model.seq_len": T})
    with pytest.raises(ValueError, match="--model.vocab_size"):
        train.train(cfg)
    result = train.train(replace(cfg, **{"model.vocab_size": V}))
    saved = json.loads((Path(result["run_dir"]) / runs.CONFIG_FILE).read_text())
    assert saved["resolved"]["dataset_id"] == 7 and saved["resolved"]["model"]["vocab_size"] == V
    rows = runs.read_metrics(result["run_dir"])
    assert rows[-1]["valid_ntp"] < rows[0]["valid_ntp"]


# ------------------------------------------------------------------------------------ their checkpoints


@pytest.mark.parametrize("where", ["relative", "absolute elsewhere"])
def test_authors_checkpoint_data_path_resolves_beside_it(tmp_path, where):
    ckpt = tmp_path / "runs" / "uht1a3m7"
    path = "c4_en.bin" if where == "relative" else "/dev/shm/c4_10B/c4_en.bin"
    write_authors_checkpoint(ckpt, path)
    raw_bin(ckpt / "c4_en.bin", 0, 1000)
    loaded = runs.load_run(ckpt, dtype="float32")
    assert Path(loaded.data_path) == ckpt / "c4_en.bin"
    assert loaded.lineage_ids == (0,)
    assert loaded.model_cfg == model_lib.ModelConfig(vocab_size=V, d_model=D, n_layers=L, head_dim=H, seq_len=T,
                                                     dtype="float32")


@pytest.mark.slow
def test_authors_checkpoint_finetunes_with_kl_on_real_replay_through_the_cli(tmp_path, capsys):
    ckpt = tmp_path / "their_runs" / "uht1a3m7"
    weights = write_authors_checkpoint(ckpt, "/dev/shm/c4_10B/c4_en.bin")
    raw_bin(ckpt / "c4_en.bin", 0)  # their raw .bin beside the checkpoint
    new = raw_bin(tmp_path / "c4_es.bin", 1)
    # the sweep form of their finetune configs: model.load_dir + model.load_idx
    argv = ["--data.path", str(new), "--data.num_tokens_valid", "2048", "--model.load_dir", str(ckpt.parent),
            "--model.load_idx", "0",
            "--model.dtype", "float32", "--reg.method", "kl_pre", "--reg.coeff", "10", "--reg.batch_size", "8",
            "--opt.batch_size", "8", "--opt.warmup_tokens", "0", "--stop.num_tokens_train", str(8 * T * 4),
            "--log.every_steps", "2", "--log.progress", "false", "--run.dir", str(tmp_path / "runs")]
    train.main(argv)
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "prev_ntp" in final and final["prev_kl"] > 0.0
    rows = runs.read_metrics(final["run_dir"])
    assert rows[0]["prev_kl"] == pytest.approx(0.0, abs=1e-6)  # θ starts at their weights
    assert all(r["train_loss_reg"] > 0.0 for r in rows[1:])  # the KL on replayed old rows is in the objective
    start = runs.load_run(ckpt, dtype="float32")
    for k, w in weights.items():
        assert np.array_equal(np.asarray(start.params[k]), w)


def test_load_dir_and_load_idx_index_the_sorted_runs(tmp_path):
    for name in ("b2", "a1", "c3"):
        write_authors_checkpoint(tmp_path / "sweep" / name, "c4_en.bin")
    (tmp_path / "sweep" / "not_a_run").mkdir()
    found = runs.runs_in_dir(tmp_path / "sweep")
    assert [p.name for p in found] == ["a1", "b2", "c3"]
    assert runs.run_in_dir(tmp_path / "sweep", 2).name == "c3"
    with pytest.raises(ValueError, match="out of range"):
        runs.run_in_dir(tmp_path / "sweep", 3)
    with pytest.raises(ValueError, match="go together"):
        finetune_cfg(tmp_path, tmp_path / "x.bin", **{"model.load_dir": str(tmp_path / "sweep")}).validate()
    finetune_cfg(tmp_path, tmp_path / "x.bin", **{"model.load_dir": str(tmp_path / "sweep"), "model.load_idx": 0,
                                                  "reg.method": "kl_pre", "reg.batch_size": 8}).validate()  # a loaded model


# ------------------------------------------------------------------------------------ export


@pytest.mark.slow
def test_export_to_the_authors_layout_round_trips(tmp_path):
    data = raw_bin(tmp_path / "c4_en.bin", 0)
    pre = train.train(finetune_cfg(tmp_path, data, **{"model.vocab_size": V, "model.d_model": D, "model.n_layers": L,
                                                      "model.head_dim": H, "model.seq_len": T}))
    out = tmp_path / "exported" / "run0"
    export.main(["--load_path", pre["run_dir"], "--out", str(out), "--format", "authors"])
    ours = runs.load_run(pre["run_dir"])
    theirs = runs.load_run(out, dtype="float32")
    assert theirs.model_cfg == ours.model_cfg
    with np.load(out / "weights.npz") as npz:
        assert sorted(npz.files) == ["down", "embed_in", "embed_out", "out", "qkv", "up"]
        for k in npz.files:
            assert npz[k].dtype == np.float32
            assert np.array_equal(npz[k], np.asarray(jax.device_get(ours.params[k])))
    conf = runs.parse_simple_yaml((out / "config.yaml").read_text())
    assert (conf["model"]["D"], conf["model"]["L"], conf["model"]["H"], conf["model"]["T"], conf["model"]["V"]) == (
        D, L, H, T, V)
    assert conf["opt"]["batch_size"] == 8 and conf["data"]["num_tokens_valid"] == 2048
    assert Path(theirs.data_path) == data.resolve() and theirs.lineage_ids == (0,)


def test_export_refuses_what_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export.main(["--load_path", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "not a run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ their model shapes


@pytest.mark.slow
def test_width_not_a_multiple_of_the_head_dim_has_floor_heads_as_theirs():
    # their grid sweep has D=288 with head dim 64: N = D // H = 4 heads, attention width 256 < D
    import jax.numpy as jnp

    cfg = model_lib.ModelConfig(vocab_size=V, d_model=40, n_layers=2, head_dim=16, seq_len=8, dtype="float32")
    assert cfg.n_heads == 2
    params = model_lib.init(cfg, jax.random.key(0))
    assert params["qkv"].shape == (2, 3, 2, 40, 16) and params["out"].shape == (2, 2, 16, 40)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, V)
    full = model_lib.forward(cfg, params, tokens)
    assert full.shape == (2, 8, V) and bool(jnp.all(jnp.isfinite(full)))
    cache = model_lib.init_cache(cfg, 2)
    for t in range(8):  # cached decoding reproduces the full forward position by position
        step, cache = model_lib.forward(cfg, params, tokens[:, t:t + 1], cache=cache, pos=t)
        assert np.allclose(np.asarray(step[:, 0]), np.asarray(full[:, t]), atol=1e-4)
    from forgetting.core import losses
    from forgetting.core import step as step_lib

    loss_fn = step_lib.make_loss_fn(cfg)  # the train step's fused loss and hand-written attention gradients
    fused, grads = jax.value_and_grad(lambda p: loss_fn(p, {"ref": None, "base": None}, {"tokens": tokens})[0])(params)
    assert float(fused) == pytest.approx(float(losses.next_token_loss(full, tokens)), rel=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(g))) and g.shape == params[k].shape for k, g in grads.items())
    with pytest.raises(ValueError, match="at least head_dim"):
        model_lib.ModelConfig(d_model=32, head_dim=64)
