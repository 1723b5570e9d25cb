"""bench.versus: the two sides get the same run, the authors' side is driven through its own entry point,
and the summary's medians, ranges and ratios are the per-pair numbers."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from forgetting.bench import versus
from forgetting.training import cli
from forgetting.training.train_config import TrainConfig

DATA = {"c4_en.bin": Path("/d/c4_en.bin"), "c4_es.bin": Path("/d/c4_es.bin")}


def _dotlist(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args)


@pytest.mark.parametrize("mode", versus.MODES)
def test_both_sides_get_the_same_run(mode, tmp_path):
    cfg = versus.VersusConfig()
    theirs = _dotlist(versus.authors_args(cfg, mode, DATA, "/ckpt/authors", tmp_path / "save"))
    ours = cli.parse(TrainConfig, versus.project_args(cfg, mode, DATA, "/runs/project", tmp_path / "runs"))
    finetune = mode != "pretrain"
    assert theirs["data.path"] == ours.data.path == str(DATA["c4_es.bin" if finetune else "c4_en.bin"])
    assert int(theirs["data.num_tokens_valid"]) == ours.data.num_tokens_valid == 100_000
    assert (int(theirs["model.D"]), int(theirs["model.L"]), int(theirs["model.H"]), int(theirs["model.T"])) == (
        ours.model.d_model, ours.model.n_layers, ours.model.head_dim, ours.model.seq_len) == (128, 4, 32, 128)
    assert int(theirs["opt.batch_size"]) == ours.opt.batch_size == 32
    assert float(theirs["opt.peak_lr"]) == ours.opt.peak_lr == (3e-4 if finetune else 1e-3)
    assert int(theirs["stop.num_tokens_train"]) == ours.stop.num_tokens_train == (500_000 if finetune else 1_000_000)
    assert int(theirs["log.every_tokens"]) == ours.log.every_tokens == 100_000
    # both sides keep the defaults they share (warm-up, AdamW betas, weight decay) and the authors' timing
    assert ours.opt.warmup_tokens == 10_000_000 and ours.opt.weight_decay == 0.02 and ours.opt.b2 == 0.999
    assert theirs["log.measure_time"] == "true"
    assert bool(ours.model.load_path) == finetune == ("model.load_path" in theirs)
    kl = mode in ("kl_real", "kl_self")
    assert (theirs.get("reg.method") == "kl_pre") == kl == (ours.reg.method == "kl_pre")
    if kl:
        assert float(theirs["reg.coeff"]) == ours.reg.coeff == 10.0
        assert int(theirs["reg.batch_size"]) == ours.reg.batch_size == 16
    assert (theirs.get("reg.synth") == "true") == (mode == "kl_self") == ours.reg.synth
    if mode == "kl_self":
        assert int(theirs["reg.buffer"]) == ours.reg.buffer == 8
    assert int(theirs.get("model.lora_rank", 0)) == ours.model.lora_rank == (16 if mode == "lora" else 0)


def test_summary_is_medians_ranges_and_per_pair_ratios():
    def side(wall, rate, rss):
        return {"wall_s": wall, "train_tokens_per_s": rate, "peak_rss_mb": rss}

    runs = [
        {"mode": "finetune", "authors": side(100, 1000, 500), "project": side(20, 4000, 400)},
        {"mode": "finetune", "authors": side(120, 900, 600), "project": side(40, 3000, 300)},
        {"mode": "finetune", "authors": side(90, 1100, 550), "project": side(30, 3300, 500)},
        {"mode": "kl_self", "authors": side(200, 500, 800), "project": side(50, 1650, 700)},
    ]
    s = versus.summarize(runs, with_reference=True)
    assert s["finetune"]["authors"]["wall_s"] == {"median": 100, "min": 90, "max": 120}
    assert s["finetune"]["project"]["train_tokens_per_s"] == {"median": 3300, "min": 3000, "max": 4000}
    # ratios pair by pair, not ratios of medians: 100/20, 120/40, 90/30
    assert s["finetune"]["ratio"]["wall"] == {"median": 3.0, "min": 3.0, "max": 5.0}
    assert s["finetune"]["ratio"]["train_tokens_per_s"] == pytest.approx({"median": 10 / 3, "min": 3.0, "max": 4.0})
    assert s["kl_self_vs_finetune"] == pytest.approx(1650 / 3300)
    alone = [{k: v for k, v in r.items() if k != "authors"} for r in runs]
    assert set(versus.summarize(alone, with_reference=False)["finetune"]) == {"project"}
    table = versus.table(s)
    assert "| finetune | ratio | 3.00 [3.00–5.00]× |" in table


def test_bad_flags_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown \\['kl'\\]"):
        versus.VersusConfig(modes=("kl",)).validate()
    with pytest.raises(ValueError, match="no train_single.py there"):
        versus.VersusConfig(reference=str(tmp_path)).validate()
    with pytest.raises(ValueError, match="at least 1"):
        versus.VersusConfig(pairs=0).validate()


FAKE_TRAINER = '''
    """A stand-in for the authors' train_single.py: records what it was given, logs through `wandb`."""
    import json, os
    from pathlib import Path
    import wandb
    DEFAULT_CFG = """
    model: {D: 256, save_dir: null, load_path: null, lora_rank: null}
    opt: {batch_size: 256}
    stop: {num_tokens_train: null}
    reg: {method: null}
    log: {measure_time: false}
    """
    def train_and_evaluate(c):
        run = wandb.init(project="p", mode="online", tags=None)
        run.config.update({"a": 1})
        run.log({"valid_ntp": 3.0}, step=1)
        run.summary.update({"x": 1})
        out = None
        if c.model.save_dir is not None:
            out = Path(c.model.save_dir) / run.id
            out.mkdir(parents=True)
        Path(os.environ["FAKE_RECORD"]).write_text(json.dumps({"cwd": os.getcwd(), "D": c.model.D,
            "load_path": c.model.load_path, "reg": c.reg.method, "measure_time": c.log.measure_time}))
        steps = 20
        return {"out_dir": None if out is None else str(out), "metrics": {"train_time_elapsed": 2.0,
                "train_tokens_seen": steps * c.opt.batch_size * 16, "valid_ntp": 3.0}}
'''


def test_the_authors_side_runs_their_entry_point_with_a_wandb_stand_in(tmp_path, monkeypatch):
    ref = tmp_path / "authors"
    ref.mkdir()
    (ref / "train_single.py").write_text(textwrap.dedent(FAKE_TRAINER))
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_RECORD", str(record))
    cfg = versus.VersusConfig(reference=str(ref), batch_size=4, seq_len=16)
    pre = versus.run_authors(cfg, sys.executable, "pretrain", DATA, "", tmp_path / "pre")
    got = json.loads(record.read_text())
    assert got == {"cwd": str(ref.resolve()), "D": 128, "load_path": None, "reg": None, "measure_time": True}
    assert Path(pre["checkpoint"]).parent == tmp_path / "pre" / "ckpt"  # the stand-in's run id names it
    # (20 - 5 untimed steps) * 4 rows * 16 tokens / 2 s
    assert pre["steps"] == 20 and pre["train_tokens_per_s"] == pytest.approx(15 * 64 / 2.0)
    assert pre["wall_s"] > 0 and pre["peak_rss_mb"] > 10
    versus.run_authors(cfg, sys.executable, "kl_self", DATA, pre["checkpoint"], tmp_path / "kl")
    got = json.loads(record.read_text())
    assert got["load_path"] == pre["checkpoint"] and got["reg"] == "kl_pre"


def test_a_failing_side_says_where_its_output_is(tmp_path):
    ref = tmp_path / "authors"
    ref.mkdir()
    (ref / "train_single.py").write_text("raise SystemExit('the authors trainer broke')\n")
    with pytest.raises(RuntimeError, match=r"authors' pretrain run failed \(exit 1\); its stderr is in .*log.txt"):
        versus.run_authors(versus.VersusConfig(reference=str(ref)), sys.executable, "pretrain", DATA, "", tmp_path / "x")
