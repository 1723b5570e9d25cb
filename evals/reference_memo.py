"""What a frozen reference gives on a validation split, kept in this process from one run to the next.

Runs that start from one model (a sweep of coefficients, a figure's finetunes in one worker, the
`bench.sweep` process) evaluate that model on the same validation rows: its final hidden states (the
reference side of every eval's KL) and, at step 0, where θ is bitwise the reference, its own NTP. The
first such run computes them and the later ones read them.

Entries are keyed by the model config (which fixes the compiled program), the reference's content and the
split's rows (`core.digest.tree_sha256` of the parameters and of the token and mask batches: every array's
dtype, shape and bytes), so a hit returns the arrays and sums a fresh process computes for the same inputs,
and runs read it with their metrics unchanged (tests/test_reference_memo.py). Hidden states are kept up to a byte budget (the run's
`--eval.reference_cache_mb`), least recently used first out.
"""
from __future__ import annotations

import collections
from typing import Callable, Hashable

NTP_ENTRIES = 256  # step-0 sums kept (a few floats each)


class ReferenceMemo:
    """Hidden states (per batch, None where a run did not keep them) and step-0 sums, by (model config,
    reference sha256, rows sha256). `hits`/`misses` count lookups of either kind."""

    def __init__(self) -> None:
        self._hidden: collections.OrderedDict[Hashable, tuple[list, int]] = collections.OrderedDict()
        self._sums: collections.OrderedDict[Hashable, dict] = collections.OrderedDict()
        self.hits = self.misses = 0

    def hidden(self, key: Hashable, compute: Callable[[], list], budget_bytes: int) -> list:
        """The kept hidden states of `key`, else `compute()`'s, kept while the memo's total fits `budget_bytes`."""
        if key in self._hidden:
            self.hits += 1
            self._hidden.move_to_end(key)
            return self._hidden[key][0]
        self.misses += 1
        kept = compute()
        size = sum(int(h.nbytes) for h in kept if h is not None)
        if 0 < size <= budget_bytes:
            self._hidden[key] = (kept, size)
            while sum(s for _, s in self._hidden.values()) > budget_bytes:
                self._hidden.popitem(last=False)
        return kept

    def sums(self, key: Hashable, compute: Callable[[], dict]) -> dict:
        """The kept step-0 sums of `key`, else `compute()`'s (kept)."""
        if key in self._sums:
            self.hits += 1
            self._sums.move_to_end(key)
            return dict(self._sums[key])
        self.misses += 1
        totals = compute()
        self._sums[key] = dict(totals)
        while len(self._sums) > NTP_ENTRIES:
            self._sums.popitem(last=False)
        return totals

    def clear(self) -> None:
        self._hidden.clear()
        self._sums.clear()
        self.hits = self.misses = 0


MEMO = ReferenceMemo()  # this process's
