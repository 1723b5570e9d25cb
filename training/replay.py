"""Replay sources for the train stage: rows of old-distribution sequences for a given step.

Both are stateless in the step, so a resumed run replays exactly what an uninterrupted one would:
real replay draws from the old dataset's training split (never its validation split) by the same
seeded, step-indexed order as training batches; self-generated replay samples `buffer × rows`
sequences at once from the frozen reference, with key fold_in(seed key, buffer index) — a fresh key per
buffer, never reused — and hands out one slice per step.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np

from forgetting.core import data as data_lib
from forgetting.core import sampling
from forgetting.training import prompts as prompts_lib

# Offsets keep the replay streams independent of the training-batch stream of the same seed.
_REAL_REPLAY_SEED_OFFSET = 1_000_003
_SYNTH_REPLAY_KEY_SALT = 0x5E1F


class ReplaySource(Protocol):
    """What the train loop asks of a replay source, built complete (nothing is set on it afterwards)."""

    def rows(self, step: int) -> Any:
        """The replay rows of `step` (int32 [rows, T])."""

    def ref_hidden(self, step: int) -> jax.Array | None:
        """The reference's final hidden states on `rows(step)` when the source has them (else None: the train
        step runs the reference itself)."""

    def close(self) -> None:
        """Releases what the source holds (a prefetch thread)."""


class RealReplay:
    """Old-data rows from a dataset's training split."""

    def __init__(self, dataset: data_lib.SequenceDataset, rows: int, seed: int):
        dataset.check_batch_size(rows)
        self.dataset, self.rows_per_step, self.seed = dataset, rows, seed + _REAL_REPLAY_SEED_OFFSET

    def rows(self, step: int) -> np.ndarray:
        return self.dataset.train_batch(step, self.rows_per_step, self.seed)

    def ref_hidden(self, step: int) -> None:
        return None

    def close(self) -> None:
        pass


class SelfGeneratedReplay:
    """Sequences sampled from the frozen reference model, prompted by old dataset ids in equal shares (or by
    token-id prompts of any lengths, each row the prompt then samples).

    While the training steps of one buffer run, the next buffer is sampled on a background thread: the
    sampler's decoding loop leaves cores idle that the train step uses, and the reverse. Each buffer's
    key depends only on its index, so the rows are the same with or without the prefetch. With
    `keep_hidden`, the sampler's final hidden states of the rows are kept too (`ref_hidden`): a KL to the
    reference on these rows then needs no second forward of the reference."""

    def __init__(self, model_cfg: Any, ref_params: Any, prompt_ids: Sequence[int] | Sequence[Sequence[int]],
                 rows: int, buffer: int, temperature: float, seed: int, prefetch: bool = True,
                 keep_hidden: bool = False, last_index: int | None = None,
                 cache: Callable[[Any], Any] | None = None):
        if not prompt_ids:
            raise ValueError("self-generated replay needs at least one prompt id (--reg.prompt_ids)")
        self.model_cfg, self.ref_params = model_cfg, ref_params
        self.rows_per_step, self.buffer, self.temperature = rows, buffer, temperature
        n = rows * buffer
        self.prompt_lengths = None  # one token per row; [n] lengths of padded multi-token prompts
        if isinstance(prompt_ids[0], (int, np.integer)):
            # Cycling the ids gives every step's slice equal shares whenever rows is a multiple of len(ids).
            self.prompts = np.asarray(prompt_ids, np.int32)[np.arange(n) % len(prompt_ids)]
        else:  # token sequences (`--reg.prompt_text`), spread over the rows the same way
            self.prompts, self.prompt_lengths = prompts_lib.spread(prompt_ids, n)
        self.key = jax.random.fold_in(jax.random.key(seed), _SYNTH_REPLAY_KEY_SALT)
        self._buffer_index, self._buffer = -1, None
        self._pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="replay") if prefetch else None
        self.last_index = last_index  # buffers past the run's last step are not prefetched (None: no last step)
        self.sampling_seconds = 0.0
        self.keep_hidden = keep_hidden
        self._hidden: jax.Array | None = None
        # `cache(self)`: the stream's `replay_cache.ReplayCache` (built last: its key reads the finished source)
        self.cache: Any = cache(self) if cache is not None else None

    def _draw(self, index: int) -> tuple[np.ndarray, jax.Array | None]:
        """Buffer `index`: from the stream's cache when there is one (which samples and writes it once)."""
        return self._sample(index) if self.cache is None else self.cache.draw(index, self._sample)

    def _sample(self, index: int) -> tuple[np.ndarray, jax.Array | None]:
        out = sampling.sample(self.model_cfg, self.ref_params, self.prompts, jax.random.fold_in(self.key, index),
                              self.temperature, prompt_lengths=self.prompt_lengths, return_hidden=self.keep_hidden)
        tokens, hidden = out if self.keep_hidden else (out, None)
        return np.asarray(tokens), hidden

    def _load(self, step: int) -> None:
        index = step // self.buffer
        if index != self._buffer_index:
            start = time.perf_counter()
            future = self._pending.pop(index, None)
            self._buffer, self._hidden = future.result() if future is not None else self._draw(index)
            self._buffer_index = index
            for stale in [i for i in self._pending if i < index]:
                self._pending.pop(stale).cancel()
            nxt = index + 1
            if self._pool is not None and nxt not in self._pending and (self.last_index is None or nxt <= self.last_index):
                self._pending[nxt] = self._pool.submit(self._draw, nxt)
            self.sampling_seconds += time.perf_counter() - start

    def _rows_of(self, buffer: Any, step: int) -> Any:
        """`step`'s slice of a buffer-long array (tokens or hidden states)."""
        offset = (step % self.buffer) * self.rows_per_step
        return buffer[offset: offset + self.rows_per_step]

    def rows(self, step: int) -> np.ndarray:
        self._load(step)
        return self._rows_of(self._buffer, step)

    def ref_hidden(self, step: int) -> jax.Array | None:
        """With `keep_hidden`: the reference's final hidden states f32 [rows, T, D] on `rows(step)`, as the
        sampler computed them while drawing the rows (`sampling.sample(return_hidden=True)`); else None."""
        self._load(step)
        return None if self._hidden is None else self._rows_of(self._hidden, step)

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pending = {}
        if self.cache is not None:
            print(f"note: {self.cache.summary()}", file=sys.stderr)
