"""Synthetic languages: related sparse Markov chains over a shared vocabulary, with exact entropy rates.

A language is an order-k Markov chain over `n_symbols` symbols. Each state (the last k symbols) has a
sparse row: `support` successors drawn without replacement with Zipf-like weights (so frequent symbols
exist, as in text) and Dirichlet(alpha) probabilities. Language 0 is the base chain of `seed`; language
j >= 1 keeps a fraction `share` of the base rows and redraws the rest from its own stream, so languages
share vocabulary and part of their structure, and finetuning on one overwrites predictions the other
needs.

Ids in a token file: 0..3 are reserved for dataset ids (token 0 of every training sequence is
overwritten with one, the paper's convention; the generator never emits them), symbols are ids
4..vocab_size-2, and vocab_size-1 is EOS (reserved; a stream has no documents, so it never occurs).

Exact numbers: the stationary distribution pi over states is found by (lazy) power iteration, and the
entropy rate is H = sum_s pi(s) H(P(.|s)). The stream is written as independent chains, each started
from pi and `segment_len` tokens long (a multiple of the training sequence length), so every training
sequence lies inside one stationary chain and `best_sequence_loss(T)` -- the loss of the true predictor
on a sequence whose token 0 is replaced by the dataset id -- is exact too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

N_ID_TOKENS = 4  # ids 0..3: dataset ids
_CHUNK_STATES = 4096
_MIN_PROB = 1e-6  # floor on transition probabilities: no -inf log-likelihoods


@dataclasses.dataclass(frozen=True)
class LanguageSpec:
    """Structure shared by a family of related languages (every member uses the same spec)."""

    seed: int = 0  # seed of the base chain (and of each language's redrawn rows)
    vocab_size: int = 256  # ids in the token file: 4 dataset ids + symbols + 1 EOS
    order: int = 1  # Markov order k (states are the last k symbols)
    support: int = 8  # successors per state
    alpha: float = 0.3  # Dirichlet concentration of each row (small = peaked rows, lower entropy)
    zipf: float = 1.0  # exponent of the Zipf weights used to pick successors (0 = uniform)
    share: float = 0.5  # fraction of rows a language j >= 1 keeps from language 0

    @property
    def n_symbols(self) -> int:
        return self.vocab_size - N_ID_TOKENS - 1

    def validate(self) -> None:
        if self.n_symbols < 2 or self.vocab_size > 65536:
            raise ValueError("vocab_size must be in [7, 65536]")
        if not 1 <= self.support <= self.n_symbols:
            raise ValueError(f"support must be in [1, {self.n_symbols}]")
        if self.order < 1 or self.n_symbols**self.order > 4_000_000:
            raise ValueError("order must be >= 1 with n_symbols**order <= 4e6 states")
        if not 0.0 <= self.share <= 1.0 or self.alpha <= 0:
            raise ValueError("share must be in [0, 1] and alpha > 0")


def _draw_rows(rng: np.random.Generator, spec: LanguageSpec, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Successor symbols and probabilities for `n_rows` states."""
    n = spec.n_symbols
    log_w = -spec.zipf * np.log(np.arange(1, n + 1, dtype=np.float64))
    succ = np.empty((n_rows, spec.support), dtype=np.int64)
    for start in range(0, n_rows, _CHUNK_STATES):  # Gumbel top-k: sampling without replacement, in bounded memory
        m = min(_CHUNK_STATES, n_rows - start)
        keys = log_w[None, :] + rng.gumbel(size=(m, n))
        succ[start : start + m] = np.argpartition(-keys, spec.support - 1, axis=1)[:, : spec.support]
    probs = rng.dirichlet(np.full(spec.support, spec.alpha), size=n_rows)
    probs = np.maximum(probs, _MIN_PROB)
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(succ, axis=1)  # canonical column order
    return np.take_along_axis(succ, order, 1), np.take_along_axis(probs, order, 1)


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


class MarkovLanguage:
    """Language `language` of the family `spec`: transition table, stationary distribution, sampler."""

    def __init__(self, language: int, spec: LanguageSpec = LanguageSpec()):
        spec.validate()
        if language < 0:
            raise ValueError("language must be >= 0")
        self.language = language
        self.spec = spec
        self.n_symbols = spec.n_symbols
        self.n_states = spec.n_symbols**spec.order
        self.successors, self.probs = _draw_rows(np.random.default_rng([spec.seed, 0]), spec, self.n_states)
        if language > 0:
            rng = np.random.default_rng([spec.seed, language])
            redraw = np.flatnonzero(rng.random(self.n_states) >= spec.share)
            succ, probs = _draw_rows(rng, spec, len(redraw))
            self.successors[redraw], self.probs[redraw] = succ, probs
            self.redrawn_states = redraw
        else:
            self.redrawn_states = np.zeros(0, dtype=np.int64)
        self.next_states = (np.arange(self.n_states)[:, None] * self.n_symbols + self.successors) % self.n_states
        self.stationary = self._stationary()

    def _stationary(self, tol: float = 1e-13, max_iter: int = 100_000) -> np.ndarray:
        # Lazy iteration pi <- (pi + pi P) / 2 has the same fixed points and converges for periodic chains too.
        pi = np.full(self.n_states, 1.0 / self.n_states)
        flat_next = self.next_states.ravel()
        for _ in range(max_iter):
            moved = np.bincount(flat_next, weights=(pi[:, None] * self.probs).ravel(), minlength=self.n_states)
            new = 0.5 * (pi + moved)
            new /= new.sum()
            if np.abs(new - pi).sum() < tol:
                return new
            pi = new
        raise RuntimeError("stationary distribution did not converge")

    def entropy_rate(self) -> float:
        """Nats per token of the stationary chain: sum_s pi(s) H(P(.|s))."""
        return float(self.stationary @ _entropy(self.probs))

    def block_entropy(self, m: int) -> float:
        """Entropy of m <= order consecutive symbols under stationarity."""
        k = self.spec.order
        if not 0 <= m <= k:
            raise ValueError(f"m must be in [0, {k}]")
        joint = self.stationary.reshape((self.n_symbols,) * k)
        marginal = joint.sum(axis=tuple(range(k - m))) if m < k else joint
        return float(_entropy(np.ravel(marginal))) if m else 0.0

    def unigram_entropy(self) -> float:
        return self.block_entropy(1)

    def best_sequence_loss(self, seq_len: int) -> float:
        """Mean loss of the true predictor over targets 1..T-1 when token 0 is the dataset id."""
        k = self.spec.order
        n_pred = seq_len - 1
        if n_pred < 1:
            raise ValueError("seq_len must be >= 2")
        # Target j sees symbols 1..j-1: H(X_j | X_1..X_{j-1}) = h(j) - h(j-1) while j <= k, then the rate.
        head = sum(self.block_entropy(j) - self.block_entropy(j - 1) for j in range(1, min(k, n_pred) + 1))
        return (head + max(0, n_pred - k) * self.entropy_rate()) / n_pred

    def sample_symbols(self, n_chains: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """[n_chains, length] symbols (0-based) of independent chains started from stationarity."""
        k = self.spec.order
        state = rng.choice(self.n_states, size=n_chains, p=self.stationary)
        out = np.empty((n_chains, length), dtype=np.int64)
        first = (state[:, None] // self.n_symbols ** np.arange(k - 1, -1, -1)[None, :]) % self.n_symbols
        out[:, : min(k, length)] = first[:, :length]
        cum = np.cumsum(self.probs, axis=1)
        for t in range(k, length):
            u = rng.random(n_chains)
            col = np.minimum((u[:, None] > cum[state]).sum(axis=1), self.spec.support - 1)
            sym = self.successors[state, col]
            out[:, t] = sym
            state = self.next_states[state, col]
        return out

    def log_likelihood(self, symbols: np.ndarray) -> np.ndarray:
        """[n, L - k] log P(x_t | previous k) for rows of symbols (positions k.. of each row)."""
        symbols = np.atleast_2d(symbols)
        k = self.spec.order
        weights = self.n_symbols ** np.arange(k - 1, -1, -1)
        out = np.empty((symbols.shape[0], symbols.shape[1] - k))
        for t in range(k, symbols.shape[1]):
            state = symbols[:, t - k : t] @ weights
            match = self.successors[state] == symbols[:, t : t + 1]
            if not match.any(axis=1).all():
                raise ValueError(f"symbol at position {t} is impossible under language {self.language}")
            out[:, t - k] = np.log((self.probs[state] * match).sum(axis=1))
        return out

    def stream(self, num_tokens: int, segment_len: int, seed: int, block_chains: int = 1024) -> Iterator[np.ndarray]:
        """Token ids (symbols + 4) of `num_tokens` tokens: chains of `segment_len`, in blocks."""
        n_chains = math.ceil(num_tokens / segment_len)
        emitted = 0
        for block, start in enumerate(range(0, n_chains, block_chains)):
            rng = np.random.default_rng([seed, self.language, block])
            rows = self.sample_symbols(min(block_chains, n_chains - start), segment_len, rng)
            tokens = (rows + N_ID_TOKENS).ravel()[: num_tokens - emitted]
            emitted += len(tokens)
            yield tokens.astype(np.uint16)

    def describe(self) -> dict:
        """Numbers for the sidecar."""
        return {
            "entropy_rate_nats": self.entropy_rate(),
            "unigram_entropy_nats": self.unigram_entropy(),
            "n_symbols": self.n_symbols,
            "n_states": self.n_states,
            "first_symbol_id": N_ID_TOKENS,
            "redrawn_fraction": len(self.redrawn_states) / self.n_states,
        }
