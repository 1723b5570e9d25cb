"""Synthetic Markov languages: exact entropy rates against Monte-Carlo, relatedness, and the stage."""
from __future__ import annotations

import json

import numpy as np
import pytest

from forgetting.core import data
from forgetting.stages import generate
from forgetting.corpora.synthetic import N_ID_TOKENS, LanguageSpec, MarkovLanguage

SMALL2 = LanguageSpec(seed=3, vocab_size=25, order=2, support=4, alpha=0.5)


@pytest.mark.parametrize("language,spec", [(0, LanguageSpec()), (1, LanguageSpec()), (2, SMALL2)])
def test_entropy_rate_matches_monte_carlo(language, spec):
    lang = MarkovLanguage(language, spec)
    rows = lang.sample_symbols(400, 600, np.random.default_rng(11))
    nll = -lang.log_likelihood(rows)  # positions >= order; chains start stationary, so all are stationary
    per_chain = nll.mean(axis=1)
    se = per_chain.std(ddof=1) / np.sqrt(len(per_chain))
    assert abs(per_chain.mean() - lang.entropy_rate()) < 4 * se + 1e-3
    assert lang.entropy_rate() < lang.unigram_entropy() - 1.0  # context helps a lot: learnable structure


@pytest.mark.parametrize("spec", [LanguageSpec(), SMALL2])
def test_stationary_and_best_sequence_loss(spec):
    lang = MarkovLanguage(1, spec)
    pi = lang.stationary
    moved = np.bincount(lang.next_states.ravel(), weights=(pi[:, None] * lang.probs).ravel(), minlength=lang.n_states)
    assert np.allclose(moved, pi, atol=1e-10) and abs(pi.sum() - 1) < 1e-12
    # Monte-Carlo of the best loss on length-T sequences whose token 0 is hidden: the first `order`
    # targets are predicted from the stationary marginals of the visible prefix.
    T, k, n = 6, spec.order, lang.n_symbols
    rows = lang.sample_symbols(20000, T, np.random.default_rng(5))
    joint = pi.reshape((n,) * k)
    losses = []
    for j in range(1, T):
        if j <= k:  # H(X_j | X_1..X_{j-1}) from marginals of the stationary k-gram law
            m_j = joint.sum(axis=tuple(range(k - j))) if j < k else joint
            m_prev = m_j.sum(axis=0)
            p = m_j[tuple(rows[:, 1 : j + 1].T)] / (m_prev[tuple(rows[:, 1:j].T)] if j > 1 else 1.0)
            losses.append(-np.log(p))
        else:
            losses.append(-lang.log_likelihood(rows[:, j - k : j + 1])[:, 0])
    estimate = np.mean(losses)
    se = np.stack(losses).mean(axis=0).std() / np.sqrt(rows.shape[0])
    assert abs(estimate - lang.best_sequence_loss(T)) < 4 * se + 1e-3
    assert lang.best_sequence_loss(10_000) == pytest.approx(lang.entropy_rate(), abs=1e-3)


def test_languages_are_related():
    spec = LanguageSpec(share=0.5)
    l0, l1, l1b = MarkovLanguage(0, spec), MarkovLanguage(1, spec), MarkovLanguage(1, spec)
    same = np.all(l0.successors == l1.successors, axis=1) & np.all(l0.probs == l1.probs, axis=1)
    assert 0.35 < same.mean() < 0.65 and np.array_equal(np.flatnonzero(~same), l1.redrawn_states)
    assert np.array_equal(l1.probs, l1b.probs)  # deterministic in (seed, language)
    # A model that fits language 1 perfectly (smoothed) loses a lot on language 0: forgetting is measurable.
    rows = l0.sample_symbols(200, 300, np.random.default_rng(0))
    smoothed = 0.9 * dense(l1) + 0.1 / l1.n_symbols
    cross = -np.log(smoothed[rows[:, :-1], rows[:, 1:]]).mean()
    assert cross > l0.entropy_rate() + 0.5
    assert MarkovLanguage(1, LanguageSpec(share=1.0)).redrawn_states.size == 0


def dense(lang):
    table = np.zeros((lang.n_states, lang.n_symbols))
    np.put_along_axis(table, lang.successors, lang.probs, axis=1)
    return table


def test_generate_stage(tmp_path):
    out = tmp_path / "l1.bin"
    argv = ["--corpus", "synthetic", "--language", "1", "--num_tokens", "5000", "--seq_len", "64", "--out", str(out)]
    generate.main(argv)
    meta = json.loads((tmp_path / "l1.bin.json").read_text())
    lang = MarkovLanguage(1, LanguageSpec())
    assert meta["kind"] == "synthetic" and meta["dataset_id"] == 1 and meta["language"] == 1
    assert meta["entropy_rate_nats"] == pytest.approx(lang.entropy_rate())
    assert meta["best_loss_nats"] == pytest.approx(lang.best_sequence_loss(64)) and meta["segment_len"] % 64 == 0
    assert meta["num_tokens"] == 5000 and meta["vocab_size"] == 256 and meta["eos_id"] == 255
    tf = data.TokenFile(out, vocab_size=256)
    tokens = np.asarray(tf.tokens)
    assert tokens.min() >= N_ID_TOKENS and tokens.max() < 255
    lang.log_likelihood(tokens[: meta["segment_len"]].astype(np.int64) - N_ID_TOKENS)  # raises if impossible
    first = out.read_bytes()
    generate.main(argv)
    assert out.read_bytes() == first
    with pytest.raises(SystemExit):
        generate.main(["--corpus", "synthetic", "--language", "5", "--num_tokens", "10", "--out", str(out)])
