"""Properties of the sampler: greedy = argmax of the full forward, key determinism, the sampled
distribution equals the model's (chi-square), EOS padding, and no recompilation per call."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgetting.core import backend, model, sampling

fwd = jax.jit(model.forward, static_argnums=0)
B = 8
seeds = st.integers(0, 2**31 - 1)


def _assert_is_argmax(tokens_bt: np.ndarray, logits_btv: np.ndarray, start: int = 1) -> None:
    """tokens[:, i] is the argmax of logits[:, i-1] for i >= start (up to float ties of 1e-4)."""
    chosen = np.take_along_axis(logits_btv[:, start - 1:-1], tokens_bt[:, start:, None], axis=-1)[..., 0]
    best = logits_btv[:, start - 1:-1].max(-1)
    assert np.all(chosen >= best - 1e-4)
    top2 = np.sort(logits_btv[:, start - 1:-1], axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4
    assert np.array_equal(tokens_bt[:, start:][clear], logits_btv[:, start - 1:-1].argmax(-1)[clear])


@given(seed=seeds)
def test_greedy_sampling_is_argmax_of_full_forward(tiny_cfg, tiny_params, seed):
    prompt = jnp.asarray(np.random.default_rng(seed).integers(0, tiny_cfg.vocab_size, B), jnp.int32)
    out = sampling.sample(tiny_cfg, tiny_params, prompt, jax.random.key(seed), temperature=0.0)
    assert out.shape == (B, tiny_cfg.seq_len) and out.dtype == jnp.int32
    assert np.array_equal(np.asarray(out[:, 0]), np.asarray(prompt))
    _assert_is_argmax(np.asarray(out), np.asarray(fwd(tiny_cfg, tiny_params, out)))
    # greedy ignores the key
    again = sampling.sample(tiny_cfg, tiny_params, prompt, jax.random.key(seed + 1), temperature=0.0)
    assert np.array_equal(np.asarray(again), np.asarray(out))


@given(seed=seeds, prompt_len=st.sampled_from([1, 9]))
def test_greedy_complete_is_argmax_of_full_forward(tiny_cfg, tiny_params, seed, prompt_len):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, tiny_cfg.vocab_size, (B, tiny_cfg.seq_len)),
                         jnp.int32)
    out = np.asarray(sampling.greedy_complete(tiny_cfg, tiny_params, tokens, prompt_len))
    assert np.array_equal(out[:, :prompt_len], np.asarray(tokens[:, :prompt_len]))
    _assert_is_argmax(out, np.asarray(fwd(tiny_cfg, tiny_params, jnp.asarray(out))), start=prompt_len)


def test_greedy_bf16_matches_its_own_forward(tiny_cfg_bf16, tiny_params):
    prompt = jnp.arange(B, dtype=jnp.int32)
    out = np.asarray(sampling.sample(tiny_cfg_bf16, tiny_params, prompt, jax.random.key(0), temperature=0.0))
    logits = np.asarray(fwd(tiny_cfg_bf16, tiny_params, jnp.asarray(out)))
    chosen = np.take_along_axis(logits[:, :-1], out[:, 1:, None], axis=-1)[..., 0]
    assert np.all(chosen >= logits[:, :-1].max(-1) - 0.05)  # bf16 cache vs full forward: loose


@given(seed=seeds, temperature=st.sampled_from([0.7, 1.0, 1.5]))
def test_same_key_same_samples_different_key_different(tiny_cfg, tiny_params, seed, temperature):
    prompt = jnp.asarray(np.random.default_rng(seed).integers(0, tiny_cfg.vocab_size, B), jnp.int32)
    key = jax.random.key(seed)
    a = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompt, key, temperature))
    b = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompt, key, temperature))
    c = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompt, jax.random.fold_in(key, 1), temperature))
    assert np.array_equal(a, b)
    # 8 rows x 15 sampled tokens from ~64-way distributions: equal by chance with probability ~0
    assert not np.array_equal(a[:, 1:], c[:, 1:])
    assert np.all((a >= 0) & (a < tiny_cfg.vocab_size))


# ---------------------------------------------------------------- distribution

def _chi2_stat(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic, with categories of expected count < 5 pooled into one."""
    n = counts.sum()
    expected = n * probs
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(np.sum((obs - exp) ** 2 / exp)), len(obs) - 1


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(df) at P(Z > z) (z=3.719: p = 1e-4), Wilson-Hilferty approximation."""
    c = 2.0 / (9.0 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


N_ROWS = 4096


@pytest.fixture(scope="module")
def peaked_params(tiny_params):
    """A sharper next-token distribution than at init, so temperature changes it visibly."""
    return dict(tiny_params, embed_out=tiny_params["embed_out"] * 6.0)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampled_frequencies_match_softmax(tiny_cfg, peaked_params, temperature):
    prompt_token = 7
    logits = np.asarray(fwd(tiny_cfg, peaked_params, jnp.array([[prompt_token]], jnp.int32)))[0, 0]
    logits = logits.astype(np.float64)

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    out = sampling.sample(tiny_cfg, peaked_params, jnp.full((N_ROWS,), prompt_token, jnp.int32),
                          jax.random.key(1234), temperature, length=2)
    counts = np.bincount(np.asarray(out[:, 1]), minlength=tiny_cfg.vocab_size)
    stat, df = _chi2_stat(counts, softmax(logits / temperature))
    assert stat < _chi2_critical(df), (stat, df)
    # the test has power: the same counts reject the untempered (or T=1 vs T=2) distribution
    wrong = softmax(logits / (1.0 if temperature != 1.0 else 2.0))
    wstat, wdf = _chi2_stat(counts, wrong)
    assert wstat > _chi2_critical(wdf), (wstat, wdf)


def test_rows_are_independent(tiny_cfg, tiny_params):
    """Identical prompts in one batch give different continuations (per-row randomness)."""
    out = np.asarray(sampling.sample(tiny_cfg, tiny_params, jnp.full((B,), 3, jnp.int32), jax.random.key(9)))
    assert len({tuple(r) for r in out}) > 1


# ---------------------------------------------------------------- EOS

@settings(max_examples=3)  # eos_id/pad_id are static: each drawn pair compiles a program
@given(seed=seeds)
def test_eos_stop_pads_after_first_eos(tiny_cfg, tiny_params, seed):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, tiny_cfg.vocab_size, B)
    key = jax.random.key(seed)
    free = np.asarray(sampling.sample(tiny_cfg, tiny_params, jnp.asarray(prompt, jnp.int32), key, 1.0))
    # the most frequent sampled token as EOS, so that some rows stop; pad is another id
    eos = int(np.bincount(free[:, 1:].ravel(), minlength=tiny_cfg.vocab_size).argmax())
    pad = (eos + 1) % tiny_cfg.vocab_size
    prompt[0] = eos  # a row that starts with EOS stops at once
    free = np.asarray(sampling.sample(tiny_cfg, tiny_params, jnp.asarray(prompt, jnp.int32), key, 1.0))
    out = np.asarray(sampling.sample(tiny_cfg, tiny_params, jnp.asarray(prompt, jnp.int32), key, 1.0,
                                     eos_id=eos, pad_id=pad))
    assert out.shape == free.shape
    stopped = 0
    for row_out, row_free in zip(out, free):
        hits = np.flatnonzero(row_free == eos)
        if hits.size == 0:  # rows without EOS are unaffected by the EOS setting
            assert np.array_equal(row_out, row_free)
            continue
        first = hits[0]
        stopped += 1
        assert np.array_equal(row_out[:first + 1], row_free[:first + 1])  # same draws up to the EOS
        assert np.all(row_out[first + 1:] == pad)
    assert stopped >= 1
    assert np.all(out[0, 1:] == pad)


def test_sampling_length_and_prompt_validation(tiny_cfg, tiny_params):
    with pytest.raises(ValueError):
        sampling.sample(tiny_cfg, tiny_params, jnp.zeros((2,), jnp.int32), jax.random.key(0),
                        length=tiny_cfg.seq_len + 1)
    with pytest.raises(ValueError):
        sampling.sample(tiny_cfg, tiny_params, jnp.zeros((2, 3, 1), jnp.int32), jax.random.key(0))


# ---------------------------------------------------------------- compilation

def test_sampler_does_not_recompile(tiny_cfg, tiny_params, tiny_ref_params):
    length = 5  # a shape no other test uses, so the first call must compile
    prompt = jnp.arange(3, dtype=jnp.int32)
    before = sampling._sample._cache_size()
    first = sampling.sample(tiny_cfg, tiny_params, prompt, jax.random.key(0), 1.0, length=length)
    after_first = sampling._sample._cache_size()
    assert after_first == before + 1
    # new key, temperature (incl. greedy), parameter values and prompt values: same program
    sampling.sample(tiny_cfg, tiny_params, prompt, jax.random.key(1), 0.5, length=length)
    sampling.sample(tiny_cfg, tiny_params, prompt, jax.random.key(2), 0.0, length=length)
    sampling.sample(tiny_cfg, tiny_ref_params, prompt + 1, jax.random.key(3), 2, length=length)
    sampling.sample(tiny_cfg, tiny_params, np.arange(3), jax.random.key(4), 1.0, length=length)
    assert sampling._sample._cache_size() == after_first
    # a real cache miss is seen by the counter
    sampling.sample(tiny_cfg, tiny_params, prompt, jax.random.key(0), 1.0, length=length + 1)
    assert sampling._sample._cache_size() == after_first + 1
    assert first.shape == (3, length)


# ---------------------------------------------------------------- per-row prompts

P = 6  # prompt width of the padded [B, P] prompts below


def _padded_prompts(rng: np.random.Generator, vocab: int, lengths: np.ndarray) -> np.ndarray:
    """[B, P] prompts whose padding past each row's length is junk, so reading it would show."""
    return rng.integers(0, vocab, (len(lengths), P)).astype(np.int32)


@settings(max_examples=4)
@given(seed=seeds)
def test_per_row_prompts_match_each_row_alone(tiny_cfg, tiny_params, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, P + 1, B)
    prompts = _padded_prompts(rng, tiny_cfg.vocab_size, lengths)
    out = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompts, jax.random.key(seed), 0.0,
                                     prompt_lengths=lengths))
    assert out.shape == (B, tiny_cfg.seq_len)
    for b in range(B):
        n = lengths[b]
        assert np.array_equal(out[b, :n], prompts[b, :n])  # the prompt is kept verbatim
        # the row alone, without padding: its prompt as the full [1, n] prompt
        alone = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompts[b:b + 1, :n], jax.random.key(0), 0.0))
        assert np.array_equal(out[b], alone[0]), (b, n, out[b], alone[0])
    # and it is the argmax of a full forward from each row's own prompt end
    logits = np.asarray(fwd(tiny_cfg, tiny_params, jnp.asarray(out)))
    for b in range(B):
        _assert_is_argmax(out[b:b + 1], logits[b:b + 1], start=int(lengths[b]))


def test_one_token_prompt_equals_width_one_padded_prompt(tiny_cfg, tiny_params):
    prompt = jnp.arange(B, dtype=jnp.int32) * 5
    key = jax.random.key(3)
    a = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompt, key, 1.0))
    b = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompt[:, None], key, 1.0, prompt_lengths=np.ones(B)))
    assert np.array_equal(a, b)


def test_eos_stop_with_several_ids_and_per_row_prompts(tiny_cfg, tiny_params):
    rng = np.random.default_rng(11)
    lengths = rng.integers(1, P + 1, B)
    prompts = _padded_prompts(rng, tiny_cfg.vocab_size, lengths)
    key = jax.random.key(5)
    free = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompts, key, 1.0, prompt_lengths=lengths))
    generated = np.concatenate([free[b, lengths[b]:] for b in range(B)])
    eos_ids = [int(t) for t in np.bincount(generated, minlength=tiny_cfg.vocab_size).argsort()[-2:]]
    # an EOS id inside a prompt (not at its end) must not stop the row
    prompts[0, 0], lengths[0] = eos_ids[0], max(lengths[0], 2)
    prompts[0, lengths[0] - 1] = (eos_ids[0] + 7) % tiny_cfg.vocab_size
    free = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompts, key, 1.0, prompt_lengths=lengths))
    pad = next(t for t in range(tiny_cfg.vocab_size) if t not in eos_ids)
    out = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompts, key, 1.0, prompt_lengths=lengths,
                                     eos_id=eos_ids, pad_id=pad))
    stopped_on = set()
    for b in range(B):
        # the last prompt token counts: a prompt that ends in EOS stops the row at once
        hits = [i for i in range(lengths[b] - 1, tiny_cfg.seq_len) if free[b, i] in eos_ids]
        if not hits:
            assert np.array_equal(out[b], free[b])
            continue
        first = hits[0]
        stopped_on.add(int(free[b, first]))
        assert np.array_equal(out[b, :first + 1], free[b, :first + 1])
        assert np.all(out[b, first + 1:] == pad)
    assert stopped_on, "no row met an EOS: the test would prove nothing"


def test_per_row_prompts_do_not_recompile(tiny_cfg, tiny_params):
    length = 7  # a shape no other test uses
    rng = np.random.default_rng(0)
    before = sampling._sample._cache_size()
    for trial in range(4):  # new prompt contents and lengths each time
        lengths = rng.integers(1, 4, 3)
        sampling.sample(tiny_cfg, tiny_params, rng.integers(0, 64, (3, 3)), jax.random.key(trial), 1.0,
                        prompt_lengths=lengths, eos_id=(1, 2), length=length)
    assert sampling._sample._cache_size() == before + 1
    # the EOS set is part of the program (order and repeats are not)
    sampling.sample(tiny_cfg, tiny_params, np.zeros((3, 3), np.int64), jax.random.key(0), 1.0,
                    prompt_lengths=[1, 2, 3], eos_id=[2, 1, 2], length=length)
    assert sampling._sample._cache_size() == before + 1


@pytest.mark.parametrize("prompt_lengths, match", [
    ([0, 1], r"prompt_lengths must lie in \[1, P=3\]"),
    ([1, 4], r"prompt_lengths must lie in \[1, P=3\]"),
    ([1, 2, 3], r"prompt_lengths must be int \[B=2\]"),
])
def test_bad_prompt_lengths_are_refused(tiny_cfg, tiny_params, prompt_lengths, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample(tiny_cfg, tiny_params, np.zeros((2, 3), np.int32), jax.random.key(0),
                        prompt_lengths=prompt_lengths)


def test_prompt_lengths_need_a_padded_prompt_and_fit_the_length(tiny_cfg, tiny_params):
    with pytest.raises(ValueError, match="goes with a padded"):
        sampling.sample(tiny_cfg, tiny_params, np.zeros((2,), np.int32), jax.random.key(0), prompt_lengths=[1, 1])
    with pytest.raises(ValueError, match="integer token ids"):
        sampling.sample(tiny_cfg, tiny_params, np.zeros((2,)), jax.random.key(0))
    with pytest.raises(ValueError, match="exceeds the sample length"):
        sampling.sample(tiny_cfg, tiny_params, np.zeros((2, 5), np.int32), jax.random.key(0), length=4)


# ---------------------------------------------------------------- the two-level inverse CDF

@settings(max_examples=12, deadline=None)
@given(seed=seeds, vocab=st.sampled_from([1, 2, 5, 37, 64, 100]))
def test_inverse_cdf_draws_the_categorical_and_never_a_zero_weight(seed, vocab):
    """Weights with zero runs (whole blocks of them too) and a vocabulary that is not a multiple of the
    block width: every draw has positive weight, and the frequencies match the normalized weights."""
    rng = np.random.default_rng(seed)
    weights = rng.exponential(1.0, vocab) * (rng.random(vocab) < 0.6)
    weights[rng.integers(vocab)] += 1.0  # at least one positive entry
    rows = 4096
    draws = np.asarray(jax.jit(sampling._inverse_cdf)(jnp.asarray(np.tile(weights, (rows, 1)), jnp.float32),
                                                      jax.random.key(seed)))
    assert draws.min() >= 0 and draws.max() < vocab
    assert np.all(weights[draws] > 0)
    counts = np.bincount(draws, minlength=vocab)
    stat, df = _chi2_stat(counts, weights / weights.sum())
    if df > 0:
        assert stat < _chi2_critical(df), (stat, df)


def test_inverse_cdf_follows_each_rows_own_weights():
    """Rows are independent categoricals: a one-hot row always gives its token, whatever the others hold."""
    vocab = 50
    weights = np.zeros((vocab, vocab), np.float32)
    weights[np.arange(vocab), np.arange(vocab)[::-1]] = 3.0
    draws = np.asarray(sampling._inverse_cdf(jnp.asarray(weights), jax.random.key(0)))
    np.testing.assert_array_equal(draws, np.arange(vocab)[::-1])


# ---------------------------------------------------------------- decoding phases

@given(length=st.integers(1, 2048), phases=st.integers(1, 8))
def test_phase_ends_cover_the_sequence(length, phases):
    ends = sampling._phase_ends(length, phases)
    assert ends == sorted(set(ends)) and ends[-1] == length and 1 <= len(ends) <= phases
    assert all(e % 8 == 0 for e in ends[:-1])
    # every phase but the first starts where the previous ended and holds at most one share (rounded to 8)
    assert all(b - a <= -(-length // phases) + 8 for a, b in zip([0] + ends[:-1], ends))


@settings(max_examples=4, deadline=None)
@given(seed=seeds)
def test_phased_decoding_equals_decoding_with_the_full_cache(tiny_cfg, tiny_params, seed):
    """The phased sampler (caches of 8 and then 16 positions here) draws the same tokens as the plain loop:
    one full-length cache, the same per-position keys and the same token choice."""
    assert len(sampling._phase_ends(tiny_cfg.seq_len)) > 1
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.integers(0, tiny_cfg.vocab_size, B), jnp.int32)
    key = jax.random.key(seed)
    out = np.asarray(sampling.sample(tiny_cfg, tiny_params, prompt, key, 1.0))

    @jax.jit
    def one_step(tokens_b1, cache, i):
        logits, cache = model.forward(tiny_cfg, tiny_params, tokens_b1, cache, i)
        return sampling._next_token(logits[:, 0], jax.random.fold_in(key, i), jnp.float32(1.0)), cache

    cache, tokens = model.cache_for(tiny_cfg, B), [np.asarray(prompt)]
    for i in range(tiny_cfg.seq_len - 1):
        nxt, cache = one_step(jnp.asarray(tokens[-1])[:, None], cache, jnp.int32(i))
        tokens.append(np.asarray(nxt))
    np.testing.assert_array_equal(out, np.stack(tokens, axis=1))


def test_grow_cache_pads_the_time_axis_of_every_layout(tiny_cfg):
    """Both cache layouts of the paper model (head-major on xla_cpu, time-major on reference) and the
    Llama family's stacked cache keep their values and gain zero positions at the end."""
    from forgetting.core import llama

    cfgs = [tiny_cfg, backend.with_numerics(tiny_cfg, impl="reference"),
            llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_mlp=32,
                              seq_len=16)]
    for cfg in cfgs:
        small = jax.tree.map(lambda a: jnp.ones_like(a) * 3, model.cache_for(cfg, 2, 8))
        grown = sampling._grow_cache(cfg, 2, small, 8, 16)
        for g, s, want in zip(jax.tree.leaves(grown), jax.tree.leaves(small),
                              jax.tree.leaves(model.cache_for(cfg, 2, 16))):
            assert g.shape == want.shape
            axis = next(ax for ax, (a, b) in enumerate(zip(s.shape, g.shape)) if a != b)
            head, tail = jnp.split(g, [8], axis=axis)
            assert bool((head == 3).all()) and bool((tail == 0).all())


# ---------------------------------------------------------------- hidden states from decoding

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_returned_hidden_states_are_the_forwards(tiny_cfg, peaked_params, dtype):
    """`return_hidden`: the tokens are the plain sampler's, and the hidden states at every position
    (the last one too) give the distribution a full forward of the rows gives, to float rounding. In
    bf16 that holds because decoding rounds the attention's matmul inputs as the forward does (without
    it the KL here reached 1e-3)."""
    from forgetting.core import losses

    cfg, tiny_params = dataclasses.replace(tiny_cfg, dtype=dtype), peaked_params
    prompt = jnp.arange(B, dtype=jnp.int32)
    tokens, hidden = sampling.sample(cfg, tiny_params, prompt, jax.random.key(5), return_hidden=True)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(sampling.sample(cfg, tiny_params, prompt,
                                                                                 jax.random.key(5))))
    assert hidden.shape == (B, cfg.seq_len, cfg.d_model) and hidden.dtype == jnp.float32
    full = model.final_hidden(cfg, tiny_params, tokens)
    kl = losses.kl_per_position(model.unembed(cfg, tiny_params, full), model.unembed(cfg, tiny_params, hidden))
    assert float(jnp.max(jnp.abs(kl))) < 1e-5
    if dtype == "float32":
        np.testing.assert_allclose(np.asarray(hidden), np.asarray(full), atol=1e-5)


def test_return_hidden_needs_a_family_that_decodes_to_hidden_states(tiny_cfg, tiny_params, monkeypatch):
    from forgetting.core import families

    monkeypatch.setattr(families, "has_decode_hidden", lambda cfg: False)
    with pytest.raises(ValueError, match="decode_hidden"):
        sampling.sample(tiny_cfg, tiny_params, jnp.zeros((2,), jnp.int32), jax.random.key(0), return_hidden=True)
