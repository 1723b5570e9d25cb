"""The model-family protocol and registry: lookup by config type and by recorded name, run records,
the HF name mapping, and that shared code (step, LoRA, sharding) works for a family it has never
heard of."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting.core import backend, families, layers, llama, lora, sharding, step
from forgetting.core import model as model_lib
from forgetting.formats import hf_checkpoint
from forgetting.training import runs


def test_lookup_by_config_type_and_name():
    assert families.of(model_lib.ModelConfig()) is model_lib.FAMILY
    assert families.of(llama.LlamaConfig()) is llama.FAMILY
    assert families.by_name("paper") is model_lib.FAMILY and families.by_name("llama") is llama.FAMILY
    with pytest.raises(TypeError, match="not a registered model config"):
        families.of(object())
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        families.by_name("nope")
    with pytest.raises(ValueError, match="unknown model family"):
        families.by_name("../x")


@pytest.mark.parametrize("cfg", [
    model_lib.ModelConfig(vocab_size=64, d_model=32, n_layers=2, head_dim=16, seq_len=16,
                          numerics=backend.Numerics(remat="block")),
    llama.LlamaConfig(rope_scaling=llama.RopeScaling(), numerics=backend.Numerics(impl="reference"),
                      tie_embeddings=False),
])
def test_run_record_round_trip(cfg):
    record = runs.model_to_dict(cfg)
    assert ("family" in record) == (not isinstance(cfg, model_lib.ModelConfig))  # paper records keep their form
    assert runs.model_config_from_dict(record) == cfg
    old_paper_record = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "head_dim": 16, "seq_len": 16}
    assert runs.model_config_from_dict(old_paper_record).numerics.impl == "auto"  # records before the switch still load


def test_every_leaf_has_logical_axes_and_lora_targets_are_leaves():
    for cfg in (model_lib.ModelConfig(), llama.LlamaConfig(tie_embeddings=False)):
        fam = families.of(cfg)
        specs = fam.param_specs(cfg)
        for name, spec in specs.items():
            assert len(spec.shape) == len(spec.logical_axes), name
        assert set(fam.lora_targets) <= set(specs)
        assert families.param_count(cfg) == sum(int(np.prod(s.shape)) for s in specs.values())


@pytest.mark.parametrize("tie", [True, False])
def test_llama_hf_names_match_the_checkpoint_writer(tie):
    cfg = llama.LlamaConfig(tie_embeddings=tie, dtype="float32")
    params = llama.init(cfg, jax.random.key(0))
    written = hf_checkpoint.params_to_hf_tensors(cfg, params)
    names = llama.hf_names(cfg)
    assert set(names) == set(written)
    assert {leaf for leaf, _ in names.values()} == set(llama.param_specs(cfg))
    for hf_name, (leaf, layer) in names.items():  # same sizes: the mapping names the right tensors
        ours = params[leaf] if layer is None else params[leaf][layer]
        assert ours.size == written[hf_name].size, hf_name


def test_shared_blocks():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 3.0
    gain = jnp.arange(1.0, 9.0)
    np.testing.assert_allclose(layers.rms_norm(x, 1e-6, gain), layers.rms_norm(x, 1e-6) * gain[None, None], rtol=1e-6)
    # The paper model's RoPE and Llama's are one function: same frequencies for the same base.
    np.testing.assert_array_equal(layers.rope_inv_freq(16, 10000.0),
                                  llama.rope_inv_freq(llama.LlamaConfig(head_dim=16, rope_theta=10000.0)))
    # Grouped-query attention with K kv heads = multi-head attention with each kv head repeated.
    q = jax.random.normal(jax.random.key(1), (1, 5, 4, 8))
    kv = jax.random.normal(jax.random.key(2), (2, 1, 5, 2, 8))
    pos = jnp.arange(5)
    for impl in ("reference", "xla_cpu"):
        attention = backend.kernels(backend.Numerics(impl=impl), "float32").attention
        grouped = attention(q, kv[0], kv[1], pos, pos, jnp.float32)
        full = attention(q, jnp.repeat(kv[0], 2, axis=2), jnp.repeat(kv[1], 2, axis=2), pos, pos, jnp.float32)
        np.testing.assert_allclose(grouped, full, rtol=1e-6, atol=1e-6)
        # No key positions = causal over the queries' own positions (is_causal on the reference path).
        np.testing.assert_allclose(attention(q, kv[0], kv[1], pos, None, jnp.float32), grouped,
                                   rtol=1e-6, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class _OtherConfig(model_lib.ModelConfig):
    """A config type nothing in core knows: registered below as a new family."""


def test_a_new_family_plugs_into_step_lora_and_sharding():
    with pytest.raises(TypeError):
        families.of(_OtherConfig())
    fam = dataclasses.replace(model_lib.FAMILY, name="other_test_family", config_type=_OtherConfig)
    families.register(fam)
    cfg = _OtherConfig(vocab_size=64, d_model=32, n_layers=1, head_dim=16, seq_len=8, dtype="float32")
    paper = model_lib.ModelConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    params = families.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    frozen = {"ref": None, "base": None}
    ours = step.make_loss_fn(cfg)(params, frozen, {"tokens": tokens})[0]
    theirs = step.make_loss_fn(paper)(params, frozen, {"tokens": tokens})[0]
    chex.assert_trees_all_close(ours, theirs)
    assert set(lora.init(cfg, params, 2, jax.random.key(2))) == set(model_lib.FAMILY.lora_targets)
    mesh = sharding.make_mesh(1, 1)
    assert set(sharding.param_shardings(cfg, mesh, "fsdp")) == set(params)
    assert runs.model_config_from_dict(runs.model_to_dict(cfg)) == cfg


def test_flat_numerics_records_of_older_runs_load_into_the_sub_config():
    """Run records written before `numerics` was a sub-config hold its six fields flat beside the shape."""
    old_llama = {**runs.model_to_dict(llama.LlamaConfig()), "impl": "reference", "remat": "dots", "streams": 2}
    old_llama.pop("numerics")
    got = runs.model_config_from_dict(old_llama)
    assert got == llama.LlamaConfig(numerics=backend.Numerics(impl="reference", remat="dots", streams=2))
    new = runs.model_to_dict(got)
    assert new["numerics"]["remat"] == "dots" and "remat" not in new  # written nested, read back equal
    assert runs.model_config_from_dict(new) == got
    with pytest.raises(ValueError, match="remat must be one of"):
        runs.model_config_from_dict({**new, "numerics": {"remat": "all"}})


def test_kernels_record_is_chosen_once_from_the_numerics():
    paper = model_lib.ModelConfig(vocab_size=64, d_model=32, n_layers=2, head_dim=16, seq_len=16)
    ref = backend.kernels_for(backend.with_numerics(paper, impl="reference"))
    cpu = backend.kernels_for(backend.with_numerics(paper, impl="xla_cpu", unroll=3))
    assert backend.kernels_for(backend.with_numerics(paper, impl="reference")) is ref  # one record per config
    assert (ref.name, ref.fused_attention, ref.unroll, ref.streams(32)) == ("reference", None, 1, 1)
    assert (cpu.name, cpu.unroll, cpu.fused_attention is not None) == ("xla_cpu", 3, True)
    # One cache protocol: the paper model's fused xla_cpu attention reads head-major buffers, everything
    # else token-major; the time axis (from the end) is the layout's, whatever the family stacks.
    assert model_lib.init_cache(backend.with_numerics(paper, impl="xla_cpu"), 3, 8)["k"][0].shape == (3, 2, 8, 16)
    assert model_lib.init_cache(backend.with_numerics(paper, impl="reference"), 3, 8)["k"][0].shape == (3, 8, 2, 16)
    small = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_mlp=32)
    for impl in ("reference", "xla_cpu"):
        cache = llama.init_cache(backend.with_numerics(small, impl=impl), 3, 8)
        assert cache["k"].shape == (2, 3, 8, 1, 8) and backend.kernels_for(small).cache.length(cache) == 8
