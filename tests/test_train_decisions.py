"""The train loop's decisions as pure functions, its state as the checkpoint (a bitwise round trip), and run
naming (hash scheme 2: a new field at its default names no run differently; runs named by scheme 1 are found)."""
from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting.core import model as model_lib
from forgetting.core import optim
from forgetting.core import step as step_lib
from forgetting.training import cli, loop, runs
from forgetting.training.run_dir import RunDir
from forgetting.training.train_config import LogConfig, StopConfig, TrainConfig, replace


# ---------------------------------------------------------------------------------------------- decisions


def test_eval_due_on_the_cadence_and_at_the_end():
    assert loop.eval_due(8, 4, at_end=False, out_of_time=False)
    assert not loop.eval_due(7, 4, at_end=False, out_of_time=False)
    assert loop.eval_due(7, 4, at_end=True, out_of_time=False)  # the last step always evaluates
    assert loop.eval_due(7, 4, at_end=False, out_of_time=True)  # so does running out of time


def test_length_and_time():
    assert loop.at_length(12, 12) and loop.at_length(13, 12) and not loop.at_length(11, 12)
    assert not loop.at_length(10**9, None)  # no fixed length: another criterion stops the run
    assert loop.out_of_time(60.0, 60.0) and not loop.out_of_time(59.9, 60.0)
    assert not loop.out_of_time(1e9, 0.0)  # 0: no limit


def test_checkpoint_due_on_its_own_cadence():
    assert loop.checkpoint_due(6, every_steps=3, minutes=0.0, seconds_since_last=0.0)
    assert not loop.checkpoint_due(7, every_steps=3, minutes=0.0, seconds_since_last=1e9)  # minutes off
    assert loop.checkpoint_due(7, every_steps=0, minutes=2.0, seconds_since_last=120.0)
    assert not loop.checkpoint_due(7, every_steps=0, minutes=2.0, seconds_since_last=119.0)
    assert not loop.checkpoint_due(6, every_steps=0, minutes=0.0, seconds_since_last=1e9)  # no cadence of its own


def test_after_eval_tracks_the_best_loss_in_float32():
    stop = StopConfig(num_tokens_train=100)
    first = loop.after_eval(np.float32(np.inf), 0, 2.5, stop, False, False, "num_tokens_train")
    assert first == loop.AfterEval(np.float32(2.5), 0, None)
    worse = loop.after_eval(first.best_valid, first.evals_since_best, 2.6, stop, False, False, "num_tokens_train")
    assert worse.best_valid == np.float32(2.5) and worse.evals_since_best == 1
    # a float64 loss equal to the best in float32 is no new best (else early stopping would never trigger)
    nudged = float(np.float32(2.5)) - 1e-12
    assert loop.after_eval(first.best_valid, 3, nudged, stop, False, False, None).evals_since_best == 4


@pytest.mark.parametrize("stop, valid, since, out_of_time, at_end, reason", [
    (StopConfig(target_loss=2.0), 1.9, 0, False, False, "target_loss"),
    (StopConfig(target_loss=2.0), 2.1, 0, False, False, None),
    (StopConfig(early_stop_evals=2), 3.0, 2, False, False, "early_stop"),  # the 3rd eval without a new best
    (StopConfig(early_stop_evals=2), 3.0, 1, False, False, None),
    (StopConfig(train_time=5.0), 3.0, 0, True, False, "train_time"),
    (StopConfig(num_epochs=1.0), 3.0, 0, False, True, "num_epochs"),
    (StopConfig(target_loss=2.0, num_epochs=1.0), 1.0, 0, True, True, "target_loss"),  # the target wins
])
def test_after_eval_stop_reasons(stop, valid, since, out_of_time, at_end, reason):
    got = loop.after_eval(np.float32(1.0), since, valid, stop, out_of_time, at_end,
                          "num_epochs" if stop.num_epochs else None)
    assert got.stop_reason == reason


class _Recorder:
    """A `loop.Steps` without a model: a fixed loss per step; records what the loop asked for."""

    def __init__(self, total_steps, eval_every, stop, losses, every_steps=0):
        self.total_steps, self.eval_every, self.stop = total_steps, eval_every, stop
        self.length_criterion = "num_tokens_train" if total_steps else None
        self.losses, self.every_steps, self.calls = losses, every_steps, []

    def stop_signal(self, st):
        pass

    def step(self, st):
        st.losses.append(np.float32(self.losses[st.step]))
        st.terms.append((np.float32(self.losses[st.step]), np.float32(0)))
        st.step += 1
        return {"loss": st.losses[-1]}

    def on_step(self, st, metrics):
        pass

    def maybe_checkpoint(self, st, at_eval):
        if at_eval or loop.checkpoint_due(st.step, self.every_steps, 0.0, 0.0):
            self.calls.append(("save", st.step))

    def evaluate(self, st):
        return {"step": st.step, "valid_ntp": float(np.mean(st.losses))}

    def complete(self, st, row):
        self.calls.append(("complete", row["step"]))
        return row

    def log(self, row):
        self.calls.append(("eval", row["step"]))


def test_the_loop_evaluates_checkpoints_and_stops_where_the_decisions_say():
    steps = _Recorder(10, 4, StopConfig(num_tokens_train=1), [3.0] * 10, every_steps=3)
    st = loop.run(steps, loop.LoopState.start(train_state=None))
    assert st.step == 10 and st.stop_reason == "num_tokens_train"
    assert steps.calls == [("save", 3), ("eval", 4), ("save", 4), ("save", 6), ("eval", 8), ("save", 8),
                           ("save", 9), ("complete", 10), ("eval", 10), ("save", 10)]
    # early stop: 2.0 at step 2 is the best; the evals at 4 and 6 bring none (> 1 in a row: stop)
    steps = _Recorder(None, 2, StopConfig(early_stop_evals=1), [2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    st = loop.run(steps, loop.LoopState.start(train_state=None))
    assert st.stop_reason == "early_stop" and st.step == 6 and st.evals_since_best == 2
    assert [c for c in steps.calls if c[0] == "complete"] == [("complete", 6)]  # the last row only, before it is logged
    assert steps.calls.index(("complete", 6)) == steps.calls.index(("eval", 6)) - 1


# ---------------------------------------------------------------------------------------------- state


def _state(pending: int) -> loop.LoopState:
    cfg = model_lib.ModelConfig(vocab_size=16, d_model=8, n_layers=1, head_dim=4, seq_len=8, dtype="float32")
    params = model_lib.init(cfg, jax.random.key(0))
    train = step_lib.init_state(params, optim.optimizer("adamw", 1e-3))
    train = train._replace(params=jax.tree.map(lambda p: p + 0.5, train.params), step=jnp.int32(7))
    st = loop.LoopState.start(train)
    st.step, st.best_valid, st.evals_since_best, st.stop_reason = 7, np.float32(1.2345678), 3, "early_stop"
    st.losses = [jnp.float32(0.1 * i + 1 / 3) for i in range(pending)]
    st.terms = [(jnp.float32(0.2 * i), jnp.float32(1 / 7)) for i in range(pending)]
    st.clock.train_seconds, st.clock.timed_seconds = 12.5, 0.25
    return st


@pytest.mark.parametrize("pending", [0, 3])
def test_state_round_trips_through_a_checkpoint_bitwise(tmp_path, pending):
    st = _state(pending)
    rd = RunDir(tmp_path)
    rd.save_state(st.checkpoint(eval_every=4), st.step)
    template = loop.checkpoint_template(_state(0).train, eval_every=4)
    tree, step = rd.restore_state(template)
    back = loop.LoopState.from_checkpoint(tree, step)
    assert (back.step, back.evals_since_best, back.stop_reason) == (7, 3, "early_stop")
    assert back.best_valid.tobytes() == np.float32(1.2345678).tobytes()
    assert np.asarray(back.losses, np.float32).tobytes() == np.asarray(st.losses, np.float32).tobytes()
    assert np.asarray(back.terms, np.float32).tobytes() == np.asarray(st.terms, np.float32).tobytes()
    assert back.clock.train_seconds == np.float32(12.75)
    same = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes(),
                        back.train, st.train)
    assert all(jax.tree.leaves(same))
    # and the restored state writes the same checkpoint again (the layout is written in one place)
    again = jax.tree.map(np.asarray, back.checkpoint(4, wall_time=1.0))
    first = jax.tree.map(np.asarray, st.checkpoint(4, wall_time=1.0))
    assert jax.tree.structure(again) == jax.tree.structure(first)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(first)))


def test_a_checkpoint_of_another_layout_is_refused_with_advice(tmp_path):
    rd = RunDir(tmp_path)
    rd.save_state({"state": _state(0).train, "extras": {"best_valid": np.float32(1)}}, 3)
    with pytest.raises(ValueError, match="delete .*state.msgpack and rerun"):
        rd.restore_state(loop.checkpoint_template(_state(0).train, eval_every=4))


# ---------------------------------------------------------------------------------------------- naming


@dataclasses.dataclass(frozen=True)
class _LogWithANewField(LogConfig):
    new_knob: int = 7  # a field added later, left at its default


def _cfg(tmp_path: Path, **changes) -> TrainConfig:
    return replace(TrainConfig(), **{"data.path": str(tmp_path / "x.bin"), "model.dtype": "float32",
                                     "stop.num_tokens_train": 100, "run.dir": str(tmp_path / "runs"), **changes})


def test_a_new_field_at_its_default_keeps_every_run_name(tmp_path):
    cfg = _cfg(tmp_path)
    grown = dataclasses.replace(cfg, log=_LogWithANewField(**dataclasses.asdict(cfg.log)))
    assert runs.run_dir(grown) == runs.run_dir(cfg)
    # under scheme 1 every field counted: the same change renamed the run
    assert runs._named(grown, runs.hashed_config(grown, scheme=1)) != runs._named(cfg, runs.hashed_config(cfg, scheme=1))
    # set to another value, the new field does name a different run
    other = dataclasses.replace(grown, log=dataclasses.replace(grown.log, new_knob=8))
    assert runs.run_dir(other) != runs.run_dir(cfg)


def test_hash_scheme_2_hashes_only_changed_fields_and_its_version(tmp_path):
    cfg = _cfg(tmp_path, **{"opt.peak_lr": 3e-4, "log.progress": False})
    hashed = runs.hashed_config(cfg)
    assert hashed["hash_scheme"] == runs.HASH_SCHEME == 2
    assert hashed["opt"] == {"peak_lr": 3e-4} and hashed["model"] == {"dtype": "float32"}
    assert "log" not in hashed and "eval" not in hashed  # log.progress is not hashed; eval is all defaults
    assert hashed["data"]["path"] == str((tmp_path / "x.bin").resolve())
    assert RunDir.of(cfg).hash == cli.config_hash(hashed)


def test_runs_named_by_the_old_scheme_are_found(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    new = runs.run_dir(cfg)
    old = runs._named(cfg, runs.hashed_config(cfg, scheme=1))
    assert old != new
    old.mkdir(parents=True)
    assert runs.run_dir(cfg) == old  # an existing run of the old name is resumed / reused there
    new.mkdir(parents=True)
    assert runs.run_dir(cfg) == new  # the current name wins when both exist
    # the dtype a run computes in names it under both schemes: auto resolves before hashing
    monkeypatch.setattr("forgetting.training.auto_dtype._chosen", {"dtype": "float32", "why": "test"})
    assert runs.run_dir(replace(cfg, **{"model.dtype": "auto"})) == new


def test_the_in_process_api_matches_the_command_line(corpora, tmp_path, capsys):
    from forgetting import training
    from forgetting.stages import train

    argv = ["--data.path", corpora[0], "--data.num_tokens_valid", "2048", "--model.d_model", "32", "--model.n_layers",
            "1", "--model.head_dim", "16", "--model.seq_len", "32", "--model.dtype", "float32", "--opt.batch_size",
            "8", "--stop.num_tokens_train", str(8 * 32 * 4), "--log.every_steps", "2", "--log.progress", "false",
            "--run.dir", str(tmp_path)]
    first = train.main(argv)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = training.run(cli.parse(TrainConfig, argv))
    assert result.status == "reused" and result.run_dir == first["run_dir"] == printed["run_dir"]
    assert result.metrics == first["metrics"] and result["metrics"]["steps"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
