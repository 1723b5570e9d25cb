"""Evaluation over a dataset's validation split, shared by the train and evaluate stages."""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from forgetting.core import data as data_lib
from forgetting.core import sampling


def _limited_batches(dataset: data_lib.SequenceDataset, batch_size: int, max_tokens: int):
    seen = 0
    for batch, mask in dataset.valid_batches(batch_size, with_mask=True):
        if max_tokens and seen >= max_tokens:
            return
        seen += batch.size
        yield batch, mask


def ntp_and_kl(eval_step: Callable, params: Any, dataset: data_lib.SequenceDataset, batch_size: int,
               ref_params: Any = None, max_tokens: int = 0) -> dict[str, float]:
    """Mean NTP loss (all predicted positions and second half) and, with a reference, mean KL(ref ‖ θ)."""
    return ntp_and_kl_split(eval_step, None, params, EvalSplit(dataset, batch_size, max_tokens), ref_params)


class EvalSplit:
    """A dataset's validation batches kept for the repeated evals of one run, with the frozen reference's
    final hidden states computed at the first eval and reused at every later one (the KL term then costs
    the reference's output layer only, not its forward pass). The hidden states are kept while they fit
    `budget_bytes` (f32 [rows, T, D]); beyond it, or with `budget_bytes` 0, the reference runs every time."""

    def __init__(self, dataset: data_lib.SequenceDataset, batch_size: int, max_tokens: int = 0, budget_bytes: int = 0):
        self.dataset = dataset
        batches = list(_limited_batches(dataset, batch_size, max_tokens))
        if not batches:
            raise ValueError(f"{dataset.token_file.path}: validation split is empty; raise --data.num_tokens_valid")
        # One shape and one signature for every batch, so the eval step compiles once: every batch carries a
        # mask (ones where the data has none: the same sums), and a short last batch is filled up with
        # rows whose mask is 0.
        width = batches[0][0].shape[0]
        self.batches = []
        for tokens, mask in batches:
            mask = np.ones(tokens.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
            short = width - tokens.shape[0]
            if short:
                tokens = np.concatenate([tokens, np.zeros((short, tokens.shape[1]), tokens.dtype)])
                mask = np.concatenate([mask, np.zeros((short, mask.shape[1]), np.float32)])
            self.batches.append((tokens, mask))
        self.budget_bytes = budget_bytes
        self._ref_hidden: list | None = None
        self._ref_id: int | None = None

    def ref_hidden(self, hidden_fn: Callable, ref_params: Any) -> list:
        """Per batch, the reference's hidden states (None where they are not kept)."""
        if self._ref_hidden is None or self._ref_id != id(ref_params):
            kept: list = []
            used = 0
            for tokens, _ in self.batches:
                hidden = hidden_fn(ref_params, tokens) if used < self.budget_bytes else None
                used += 0 if hidden is None else hidden.nbytes
                kept.append(hidden if used <= self.budget_bytes else None)
            self._ref_hidden, self._ref_id = kept, id(ref_params)
        return self._ref_hidden


def ntp_and_kl_split(eval_step: Callable, hidden_fn: Callable, params: Any, split: EvalSplit, ref_params: Any = None,
                     same_as_ref: bool = False) -> dict[str, float]:
    """`ntp_and_kl` over a kept `EvalSplit` (`hidden_fn`: `step.make_hidden_fn`, needed only when the split
    keeps hidden states): one pass per batch computes ntp, ntp_h2 and KL together, the
    reference's hidden states come from the split's cache, and `same_as_ref` (θ is bitwise the reference,
    as at step 0) skips the reference altogether: KL(ref ‖ ref) is exactly 0."""
    use_ref = ref_params is not None and not same_as_ref
    hidden = split.ref_hidden(hidden_fn, ref_params) if use_ref else [None] * len(split.batches)
    pending = [eval_step(params, batch, ref_params if use_ref else None, mask, h)
               for (batch, mask), h in zip(split.batches, hidden)]
    totals: dict[str, float] = {}
    for sums in jax.device_get(pending):
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    out = {"ntp": totals["ntp_sum"] / totals["ntp_count"], "ntp_h2": totals["ntp_h2_sum"] / totals["ntp_h2_count"]}
    if ref_params is not None:
        out["kl"] = totals["kl_sum"] / totals["kl_count"] if use_ref else 0.0
    return out


def answer_span(meta: dict) -> tuple[int, int] | None:
    """(start, end) of the scored answer positions for task data whose sidecar names a prompt length."""
    if "prompt_len" not in meta:
        return None
    start = int(meta["prompt_len"])
    if "answer_len" in meta:
        return start, start + int(meta["answer_len"])
    if "answer_span" in meta:
        lo, hi = meta["answer_span"]
        return int(lo), int(hi)
    return start, int(meta.get("seq_len", start + 1)) - 1  # everything up to the final EOS


def exact_match(model_cfg: Any, params: Any, dataset: data_lib.SequenceDataset, batch_size: int,
                span: tuple[int, int], max_tokens: int = 0) -> float:
    """Fraction of validation sequences whose greedy continuation of the prompt matches the answer span."""
    correct = total = 0
    start, end = span
    for batch, _ in _limited_batches(dataset, batch_size, max_tokens):
        predicted = np.asarray(sampling.greedy_complete(model_cfg, params, batch, start))
        correct += int(np.sum(np.all(predicted[:, start:end] == batch[:, start:end], axis=1)))
        total += batch.shape[0]
    return correct / max(total, 1)
