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
    totals: dict[str, float] = {}
    pending = [eval_step(params, batch, ref_params, mask)
               for batch, mask in _limited_batches(dataset, batch_size, max_tokens)]
    if not pending:
        raise ValueError(f"{dataset.token_file.path}: validation split is empty; raise --data.num_tokens_valid")
    for sums in jax.device_get(pending):
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    out = {"ntp": totals["ntp_sum"] / totals["ntp_count"], "ntp_h2": totals["ntp_h2_sum"] / totals["ntp_h2_count"]}
    if ref_params is not None:
        out["kl"] = totals["kl_sum"] / totals["kl_count"]
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
