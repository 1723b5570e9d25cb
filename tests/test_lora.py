"""Properties of LoRA: B = 0 is the base model, merge = W + A·B (checked per leaf against numpy), and
training with LoRA changes the adapters only."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from forgetting.core import lora, model, optim, step

fwd = jax.jit(model.forward, static_argnums=0)
seeds = st.integers(0, 2**31 - 1)


def _np_delta(cfg, adapters) -> dict[str, np.ndarray]:
    """A·B in each leaf's own layout, written out per leaf (independently of lora.delta's permutations)."""
    L, H, hd = cfg.n_layers, cfg.n_heads, cfg.head_dim
    a = {k: np.asarray(v["a"], np.float64) for k, v in adapters.items()}
    b = {k: np.asarray(v["b"], np.float64) for k, v in adapters.items()}
    r = a["up"].shape[-1]
    return {
        # qkv [L,3,H,D,hd]: input D, output (3,H,hd)
        "qkv": np.einsum("ldr,lrche->lchde", a["qkv"], b["qkv"].reshape(L, r, 3, H, hd)),
        # out [L,H,hd,D]: input (H,hd), output D
        "out": np.einsum("lher,lrd->lhed", a["out"].reshape(L, H, hd, r), b["out"]),
        "up": np.einsum("ldr,lrf->ldf", a["up"], b["up"]),
        "down": np.einsum("lfr,lrd->lfd", a["down"], b["down"]),
    }


def _random_adapters(cfg, params, rank, seed, scale=0.3):
    adapters = lora.init(cfg, params, rank, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(adapters)))
    return {k: {"a": v["a"], "b": scale * jax.random.normal(next(keys), v["b"].shape)}
            for k, v in adapters.items()}


def test_lora_init_shapes_and_zero_b(tiny_cfg, tiny_params):
    L, D, F, H, hd = (tiny_cfg.n_layers, tiny_cfg.d_model, tiny_cfg.d_mlp, tiny_cfg.n_heads, tiny_cfg.head_dim)
    r = 4
    adapters = lora.init(tiny_cfg, tiny_params, r, jax.random.key(0))
    assert set(adapters) == {"qkv", "out", "up", "down"}  # all non-embedding matrices, no embeddings
    want_in_out = {"qkv": (D, 3 * H * hd), "out": (H * hd, D), "up": (D, F), "down": (F, D)}
    for name, (d_in, d_out) in want_in_out.items():
        assert adapters[name]["a"].shape == (L, d_in, r)
        assert adapters[name]["b"].shape == (L, r, d_out)
        assert np.all(np.asarray(adapters[name]["b"]) == 0)
        assert np.asarray(adapters[name]["a"]).std() > 0


def test_lora_a_init_std():
    cfg = model.ModelConfig(vocab_size=8, d_model=256, n_layers=2, head_dim=64, seq_len=4)
    params = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    adapters = lora.init(cfg, params, 16, jax.random.key(1))
    for name, ad in adapters.items():
        a = np.asarray(ad["a"], np.float64)
        assert abs(a.std() * np.sqrt(a.shape[1]) - 1) < 0.05, name


@given(seed=seeds, rank=st.sampled_from([1, 4]))
def test_zero_b_equals_base_model(tiny_cfg, tiny_params, seed, rank):
    adapters = lora.init(tiny_cfg, tiny_params, rank, jax.random.key(seed))
    merged = lora.merge(tiny_cfg, tiny_params, adapters)
    for name in tiny_params:
        assert np.array_equal(np.asarray(merged[name]), np.asarray(tiny_params[name])), name
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, 16)), jnp.int32)
    np.testing.assert_array_equal(fwd(tiny_cfg, merged, tokens), fwd(tiny_cfg, tiny_params, tokens))


@given(seed=seeds, rank=st.sampled_from([1, 4]))
def test_merge_equals_w_plus_ab(tiny_cfg, tiny_params, seed, rank):
    adapters = _random_adapters(tiny_cfg, tiny_params, rank, seed)
    merged = lora.merge(tiny_cfg, tiny_params, adapters)
    want_delta = _np_delta(tiny_cfg, adapters)
    for name, leaf in tiny_params.items():
        want = np.asarray(leaf, np.float64) + want_delta.get(name, 0.0)
        assert merged[name].shape == leaf.shape and merged[name].dtype == leaf.dtype
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.array_equal(merged["embed_in"], tiny_params["embed_in"])
    assert np.array_equal(merged["embed_out"], tiny_params["embed_out"])
    # the forward of the merged tree is the forward of the independently updated weights
    updated = {k: jnp.asarray(np.asarray(v, np.float64) + want_delta.get(k, 0.0), jnp.float32)
               for k, v in tiny_params.items()}
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, 16)), jnp.int32)
    np.testing.assert_allclose(fwd(tiny_cfg, merged, tokens), fwd(tiny_cfg, updated, tokens),
                               rtol=1e-4, atol=1e-4)
    # apply_fn is the same map
    applied = lora.apply_fn(tiny_cfg, tiny_params)(adapters)
    for name in tiny_params:
        np.testing.assert_array_equal(applied[name], merged[name])


def test_apply_fn_gradient_reaches_adapters_only(tiny_cfg, tiny_params):
    adapters = _random_adapters(tiny_cfg, tiny_params, 2, 0)
    weights = {k: jnp.asarray(np.random.default_rng(1).standard_normal(v.shape), jnp.float32)
               for k, v in tiny_params.items()}

    def loss(adapters, base):  # any function of the merged weights
        merged = lora.apply_fn(tiny_cfg, base)(adapters)
        return sum(jnp.sum(merged[k] * weights[k]) ** 2 for k in merged)

    g_adapters, g_base = jax.jit(jax.grad(loss, argnums=(0, 1)))(adapters, tiny_params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_base))
    assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(g_adapters))


def test_lora_training_updates_only_adapters(tiny_cfg, tiny_params):
    base_copy = jax.tree.map(np.array, tiny_params)
    opt = optim.optimizer("adamw", 1e-2)
    adapters = lora.init(tiny_cfg, tiny_params, 4, jax.random.key(0))
    state = step.init_state(adapters, opt)
    train = step.make_train_step(tiny_cfg, opt, use_lora=True)
    frozen = {"base": tiny_params, "ref": None}
    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 16)), jnp.int32)}
    losses_seen = []
    for _ in range(5):
        state, metrics = train(state, batch, frozen)
        losses_seen.append(float(metrics["loss"]))
    assert set(state.params) == set(adapters)  # the trainable tree is the adapter tree
    for name in base_copy:  # the base is bitwise unchanged (and was not donated)
        assert np.array_equal(np.asarray(tiny_params[name]), base_copy[name]), name
    for name, ad in state.params.items():
        assert np.abs(np.asarray(ad["b"])).max() > 0, name  # B moved away from 0
        assert not np.array_equal(np.asarray(ad["a"]), np.asarray(adapters[name]["a"])), name
    assert losses_seen[-1] < losses_seen[0]
    assert int(state.step) == 5
