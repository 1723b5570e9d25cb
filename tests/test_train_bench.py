"""bench.train_bench: the self-generated replay breakdown and its FLOP bound."""
from __future__ import annotations

import jax
import pytest

from forgetting.bench import train_bench
from forgetting.core import model


def test_kl_self_flop_bound_by_hand_for_the_tutorial_model():
    cfg = model.ModelConfig(vocab_size=4096, d_model=128, n_layers=4, head_dim=32, seq_len=128)
    params = model.init(cfg, jax.random.key(0))
    # the matmul weights the FLOPs count: every leaf but the input embedding (a gather, not a matmul)
    matmul_params = sum(leaf.size for name, leaf in params.items() if name != "embed_in")
    assert matmul_params == 12 * 4 * 128**2 + 128 * 4096 == 1_310_720
    # fwd+bwd per token: 6 FLOPs per matmul weight, plus causal attention 6·L·D·T (half of 12·L·D·T)
    per_token = 6 * 1_310_720 + 6 * 4 * 128 * 128
    sampled_token = per_token / 3  # one forward
    reference_head = 2 * 128 * 4096  # the reference's logits from the sampler's hidden states
    plain = 32 * per_token * 128
    kl_self = (48 * per_token + 16 * (reference_head + sampled_token)) * 128
    assert train_bench.kl_self_flops_per_step(cfg, 32, 16) == pytest.approx(kl_self, rel=1e-12)
    assert train_bench.kl_self_flop_bound(cfg, 32, 16) == pytest.approx(plain / kl_self, rel=1e-12)
    assert train_bench.kl_self_flop_bound(cfg, 32, 16) == pytest.approx(0.578, abs=5e-4)


def test_kl_self_breakdown_runs_the_stage_path_and_reports_its_parts():
    bc = train_bench.BenchConfig(d_model=32, n_layers=1, head_dim=16, seq_len=16, vocab_size=64, batch_size=4,
                                 impls=("xla_cpu",), steps=3, warmup=1, repeats=2, matmul_sizes=(64,),
                                 sampler_batch=0, replay_buffer=2)
    results = train_bench.run(bc)
    kl_self = results["variants"]["xla_cpu/bfloat16"]["kl_self"]
    assert (kl_self["replay_rows"], kl_self["replay_buffer"]) == (2, 2)
    assert kl_self["serial_step_ms"] == pytest.approx(
        kl_self["step_from_sampler_hidden"]["median_ms"] + kl_self["sampler_refill"]["median_ms"] / 2)
    assert kl_self["step_with_sampling"]["runs"] == 2
    plain_ms = results["variants"]["xla_cpu/bfloat16"]["train"]["median_ms"]
    assert kl_self["ratio_to_plain"] == pytest.approx(plain_ms / kl_self["step_with_sampling"]["median_ms"])
    assert f"{kl_self['flop_bound']:.3f}x plain tokens/s" in train_bench.table(results)


def test_negative_replay_buffer_is_refused():
    with pytest.raises(ValueError, match="replay_buffer must be >= 0"):
        train_bench.BenchConfig(replay_buffer=-1).validate()
