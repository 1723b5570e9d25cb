"""Sharding: placement rules (in-process, abstract meshes) and sharded train steps on 4 fake CPU devices.

The multi-device checks need `XLA_FLAGS=--xla_force_host_platform_device_count=4` before JAX is imported,
and pytest has already imported JAX here, so they run in one subprocess (one round of compilations,
~25 s on 2 cores) that prints JSON; the assertions are made in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from forgetting.core import model, sharding, step, optim

MESH_4x2 = AbstractMesh((4, 2), ("data", "model"))
MESH_4x1 = AbstractMesh((4, 1), ("data", "model"))


def _spec(shape, axes, mesh, strategy):
    return sharding.partition_spec(shape, axes, mesh, strategy)


def test_rules_dp_replicates_everything():
    cfg = model.ModelConfig(vocab_size=64, d_model=64, n_layers=2, head_dim=16, seq_len=16)
    for name, s in model.param_specs(cfg).items():
        assert _spec(s.shape, s.logical_axes, MESH_4x2, "dp") == P(*([None] * len(s.shape))), name


def test_rules_fsdp_picks_largest_divisible_axis_never_layers():
    cfg = model.ModelConfig(vocab_size=4096, d_model=256, n_layers=4, head_dim=64, seq_len=16)
    specs = {n: _spec(s.shape, s.logical_axes, MESH_4x1, "fsdp") for n, s in model.param_specs(cfg).items()}
    assert specs["embed_in"] == P("data", None)  # vocab 4096 > embed 256
    assert specs["up"] == P(None, None, "data")  # mlp 1024 > embed 256
    assert specs["down"] == P(None, "data", None)
    assert specs["qkv"] == P(None, None, None, "data", None)  # embed 256 > heads 4
    assert specs["out"] == P(None, None, None, "data")


def test_rules_only_divisible_axes_are_sharded():
    # vocab 66 and embed 6 are not multiples of 4: nothing to shard
    assert _spec((66, 6), ("vocab", "embed"), MESH_4x1, "fsdp") == P(None, None)
    # vocab 66 indivisible, embed 8 divisible -> embed
    assert _spec((66, 8), ("vocab", "embed"), MESH_4x1, "fsdp") == P(None, "data")
    # 3 heads do not divide model=2: tp falls back to the next rule (here none) -> replicated
    assert _spec((2, 3, 3, 24, 8), ("layers", None, "heads", "embed", "head_dim"), MESH_4x2, "tp") == \
        P(None, None, None, None, None)


def test_rules_tp_and_2d():
    cfg = model.ModelConfig(vocab_size=64, d_model=64, n_layers=2, head_dim=16, seq_len=16)
    tp = {n: _spec(s.shape, s.logical_axes, MESH_4x2, "tp") for n, s in model.param_specs(cfg).items()}
    assert tp["qkv"] == P(None, None, "model", None, None)
    assert tp["out"] == P(None, "model", None, None)
    assert tp["up"] == P(None, None, "model")
    assert tp["down"] == P(None, "model", None)
    assert tp["embed_in"] == P("model", None)
    both = {n: _spec(s.shape, s.logical_axes, MESH_4x2, "fsdp_tp") for n, s in model.param_specs(cfg).items()}
    assert both["up"] == P(None, "data", "model")
    assert both["embed_out"] == P("model", "data")


def test_unknown_strategy_and_too_many_devices():
    with pytest.raises(ValueError, match="strategy"):
        _spec((4,), ("embed",), MESH_4x1, "zero3")
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        sharding.make_mesh(jax.device_count() + 1)


def test_state_shardings_mirror_params_in_optimizer_state():
    cfg = model.ModelConfig(vocab_size=64, d_model=32, n_layers=2, head_dim=16, seq_len=16)
    mesh = sharding.make_mesh(1, 1)
    psh = sharding.param_shardings(cfg, mesh, "fsdp")
    opt = optim.optimizer("adamw", optim.schedule(1e-3, 10))
    abstract = jax.eval_shape(lambda p: step.init_state(p, opt), model.abstract_params(cfg))
    ssh = sharding.state_shardings(abstract, psh, mesh)
    assert isinstance(ssh, step.TrainState)
    assert jax.tree.structure(ssh) == jax.tree.structure(abstract)
    assert ssh.opt_state[0].mu == psh and ssh.opt_state[0].nu == psh
    assert ssh.step == sharding.replicated(mesh)


_SCRIPT = textwrap.dedent("""
    import json, os, time
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from forgetting.core import model, optim, sharding, step

    t0 = time.time()
    cfg = model.ModelConfig(vocab_size=64, d_model=32, n_layers=2, head_dim=8, seq_len=16, dtype="float32")
    opt = optim.optimizer("adamw", 1e-3)
    params = model.init(cfg, jax.random.key(0))
    ref = jax.tree.map(lambda p: p + 0.01, params)
    tokens = jax.random.randint(jax.random.key(1), (8, cfg.seq_len), 0, cfg.vocab_size, jnp.int32)
    replay = jax.random.randint(jax.random.key(2), (4, cfg.seq_len), 0, cfg.vocab_size, jnp.int32)
    cases = {"dp": ("dp", 4, 1, "none"), "fsdp": ("fsdp", 4, 1, "none"), "tp": ("tp", 2, 2, "none"),
             "fsdp_tp": ("fsdp_tp", 2, 2, "none"), "fsdp_kl_pre": ("fsdp", 4, 1, "kl_pre")}
    out = {"n_devices": jax.device_count(), "results": {}}
    reference = {}
    for reg in ("none", "kl_pre"):
        batch = {"tokens": tokens, **({"replay": replay} if reg == "kl_pre" else {})}
        frozen = {"ref": ref if reg == "kl_pre" else None, "base": None}
        fn = step.make_train_step(cfg, opt, reg_method=reg, reg_coeff=1.0, donate=False)
        s, _ = fn(step.init_state(params, opt), batch, frozen)
        s, m = fn(s, batch, frozen)
        reference[reg] = (jax.device_get(s.params), {k: float(v) for k, v in m.items()})
    for name, (strategy, d, mp, reg) in cases.items():
        mesh = sharding.make_mesh(d, mp)
        psh = sharding.param_shardings(cfg, mesh, strategy)
        state = step.init_state(params, opt)
        ssh = sharding.state_shardings(state, psh, mesh)
        state = sharding.shard(state, ssh)
        bsh = sharding.batch_sharding(mesh)
        fn = step.make_train_step(cfg, opt, reg_method=reg, reg_coeff=1.0, state_sharding=ssh, batch_sharding=bsh)
        batch = sharding.shard({"tokens": tokens, **({"replay": replay} if reg == "kl_pre" else {})}, bsh)
        frozen = {"ref": sharding.shard(ref, psh) if reg == "kl_pre" else None, "base": None}
        state, _ = fn(state, batch, frozen)
        state, m = fn(state, batch, frozen)
        new = jax.device_get(state.params)
        ref_params, ref_metrics = reference[reg]
        out["results"][name] = {
            "max_param_diff": max(float(np.max(np.abs(new[k] - ref_params[k]))) for k in new),
            "max_param_change": max(float(np.max(np.abs(new[k] - params[k]))) for k in new),
            "metric_diffs": {k: abs(float(m[k]) - ref_metrics[k]) for k in ref_metrics},
            "metrics": {k: float(v) for k, v in m.items()},
            "specs": {k: str(v.sharding.spec) for k, v in state.params.items()},
            "mu_specs": {k: str(v.sharding.spec) for k, v in state.opt_state[0].mu.items()},
            "step_spec": str(state.step.sharding.spec),
            "shard_shapes": {k: [list(sh.data.shape) for sh in v.addressable_shards]
                             for k, v in state.params.items()},
            "full_shapes": {k: list(v.shape) for k, v in state.params.items()},
            "n_shards": {k: len(v.addressable_shards) for k, v in state.params.items()},
        }
    out["seconds"] = time.time() - t0
    print("RESULT_JSON" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_results():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"sharded subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    line = next(row for row in proc.stdout.splitlines() if row.startswith("RESULT_JSON"))
    return json.loads(line[len("RESULT_JSON"):])


def test_subprocess_sees_four_devices(sharded_results):
    assert sharded_results["n_devices"] == 4


@pytest.mark.parametrize("case", ["dp", "fsdp", "tp", "fsdp_tp", "fsdp_kl_pre"])
def test_sharded_step_matches_single_device(sharded_results, case):
    r = sharded_results["results"][case]
    assert r["max_param_change"] > 1e-4  # the step really moved the weights
    assert r["max_param_diff"] < 1e-5, r
    for k, diff in r["metric_diffs"].items():
        assert diff < 1e-5 * max(1.0, abs(r["metrics"][k])), (k, r)


@pytest.mark.parametrize("case", ["fsdp", "tp", "fsdp_tp", "fsdp_kl_pre"])
def test_params_really_sharded(sharded_results, case):
    r = sharded_results["results"][case]
    assert r["mu_specs"] == r["specs"]  # Adam moments follow the params
    assert r["step_spec"] == "P()"
    for name, shapes in r["shard_shapes"].items():
        assert r["n_shards"][name] == 4
        full = r["full_shapes"][name]
        spec = r["specs"][name]
        assert "'data'" in spec or "'model'" in spec, (name, spec)
        for shard_shape in shapes:
            assert sum(full) > sum(shard_shape)  # each device holds a strict slice
    if case.startswith("fsdp"):
        # 4-way over data on a (4, 1) mesh: every shard is a quarter of the leaf
        for name, shapes in r["shard_shapes"].items():
            if case != "fsdp_tp":
                import math
                assert all(4 * math.prod(s) == math.prod(r["full_shapes"][name]) for s in shapes), name


def test_dp_params_replicated(sharded_results):
    r = sharded_results["results"]["dp"]
    for name, shapes in r["shard_shapes"].items():
        assert all(s == r["full_shapes"][name] for s in shapes)
