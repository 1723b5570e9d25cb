"""core.step's reuse of jitted steps within a process: a later run of the same program gets the function an
earlier run compiled, and a run of any other program never does."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from forgetting.core import optim, step
from forgetting.stages import train
from forgetting.training import plan as plan_lib
from tests.conftest import tiny_config
from tests.test_replay_cache import T, metrics_text, tiny


@pytest.fixture
def fresh():
    step.clear_reused_steps()
    yield
    step.clear_reused_steps()


def _opt(lr: float = 1e-3):
    return optim.optimizer("adamw", optim.schedule(lr, 2))


def program(train_step):
    """The compiled program behind a train step (a kept one is bound to its coefficient)."""
    return getattr(train_step, "func", train_step)


def test_equal_keys_share_one_program_and_other_arguments_do_not(fresh):
    cfg, other_cfg = tiny_config("float32"), tiny_config("bfloat16")
    build = lambda **kw: program(step.make_train_step(**{"cfg": cfg, "opt": _opt(), "reuse_key": "adamw-1e-3", **kw}))
    first = build(reg_method="kl_pre", reg_coeff=1.0)
    assert build(reg_method="kl_pre", reg_coeff=1.0) is first
    assert build(reg_method="kl_pre", reg_coeff=30.0) is first  # the coefficient is an input of the program
    others = [build(reg_method="ntp_pre", reg_coeff=1.0), build(reg_method="kl_pre", reg_coeff=1.0, reuse_key="adamw-3e-3"),
              build(reg_method="kl_pre", reg_coeff=1.0, cfg=other_cfg), build(reg_method="kl_pre", reg_coeff=1.0, donate=False),
              build(reg_method="kl_pre", reg_coeff=1.0, streams=1), build(reg_method="kl_pre", reg_coeff=1.0, reuse_key=None)]
    assert all(o is not first for o in others) and len({id(o) for o in others}) == len(others)
    assert step.make_eval_step(cfg) is step.make_eval_step(cfg) is not step.make_eval_step(other_cfg)
    assert step.make_hidden_fn(cfg) is step.make_hidden_fn(cfg) is not step.make_hidden_fn(other_cfg)
    # with shardings nothing is kept (the placement is part of the program)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state_sh = jax.tree.map(lambda _: one, step.init_state(jnp.zeros(3), _opt()))
    sharded = [build(state_sharding=state_sh, batch_sharding=one) for _ in range(2)]
    assert sharded[0] is not sharded[1]
    with pytest.raises(ValueError, match="unknown regularizer"):
        step.make_train_step(cfg, _opt(), reg_method="nope", reuse_key="k")


@pytest.mark.parametrize("method", ["kl_pre", "ntp_pre", "none"])
def test_a_kept_step_gives_the_numbers_of_the_coefficient_as_a_constant(tiny_cfg, tiny_params, tiny_ref_params, fresh,
                                                                       method):
    tokens = jax.random.randint(jax.random.key(1), (4, tiny_cfg.seq_len), 0, tiny_cfg.vocab_size)
    batch = {"tokens": tokens, "replay": jnp.flip(tokens, 0)}
    frozen = {"ref": tiny_ref_params, "base": None}
    for coeff in (0.0, 0.3, 7.0):
        ends = []
        for key in (None, "k"):
            train_step = step.make_train_step(tiny_cfg, _opt(3e-2), reg_method=method, reg_coeff=coeff, reuse_key=key)
            state = step.init_state(tiny_params, _opt(3e-2))
            for _ in range(3):
                state, metrics = train_step(state, batch, frozen)
            ends.append(jax.tree.map(lambda x: jax.device_get(x).tobytes(), (state.params, metrics)))
        assert ends[0] == ends[1], coeff


def test_kept_steps_are_bounded_least_recently_used_first_out(fresh, monkeypatch):
    monkeypatch.setattr(step, "REUSED_STEPS", 2)
    cfg = tiny_config("float32")
    build = lambda key: program(step.make_train_step(cfg, _opt(), reuse_key=key))
    a, b = build("a"), build("b")
    assert build("a") is a  # a is now the most recent
    build("c")  # drops b
    assert build("a") is a and build("b") is not b


REPLAY = {"reg.method": "ntp_pre", "reg.coeff": 0.5, "reg.batch_size": 4}
COSINE = {"opt.lr_decay": "cosine"}


@pytest.mark.parametrize("base,change", [
    ({}, {"opt.peak_lr": 1e-3}), ({}, {"opt.warmup_tokens": 8 * T * 3}), ({}, COSINE), ({}, {"opt.b2": 0.95}),
    ({}, {"opt.weight_decay": 0.1}), ({}, {"opt.optimizer": "sgd"}),
    (COSINE, {"stop.num_tokens_train": 8 * T * 10}),  # a cosine schedule's length
    ({}, {"reg.method": "none", "reg.path": "", "reg.batch_size": 64, "reg.coeff": 10.0}),
    ({}, {"model.d_model": 16}), ({}, {"model.dtype": "bfloat16"}),
])
def test_a_run_of_another_program_gets_its_own_step(corpora, tmp_path, fresh, base, change):
    both = {**REPLAY, "reg.path": corpora[0], **base}
    first = plan_lib.resolve(tiny(corpora, tmp_path / "a", **both))
    for same in ({}, {"run.seed": 3}, {"reg.coeff": 2.0}, {"reg.coeff": 0.0}):
        again = plan_lib.resolve(tiny(corpora, tmp_path / "again", **{**both, **same}))
        assert program(again.train_step) is program(first.train_step)
    other = plan_lib.resolve(tiny(corpora, tmp_path / "b", **{**both, **change}))
    assert program(other.train_step) is not program(first.train_step)


def test_runs_of_one_program_share_it_and_end_with_the_metrics_of_running_alone(corpora, tmp_path, fresh):
    # seed, coefficient and run folder are not part of the compiled train step; the peak LR is
    runs = {"a": {}, "seed": {"run.seed": 7}, "coeff": {"reg.coeff": 2.0}, "lr": {"opt.peak_lr": 1e-3}}
    replay = {**REPLAY, "reg.path": corpora[0]}
    alone = {}
    for name, changes in runs.items():
        step.clear_reused_steps()
        cfg = tiny(corpora, tmp_path / f"alone-{name}", **{**replay, **changes})
        train.train(cfg)
        alone[name] = metrics_text(cfg)
    step.clear_reused_steps()
    programs, in_turn = {}, {}
    for name, changes in runs.items():
        cfg = tiny(corpora, tmp_path / f"turn-{name}", **{**replay, **changes})
        programs[name] = program(plan_lib.resolve(cfg).train_step)
        train.train(cfg)
        in_turn[name] = metrics_text(cfg)
    assert programs["seed"] is programs["a"] is programs["coeff"] is not programs["lr"]
    assert in_turn == alone and len(set(alone.values())) == len(runs)
