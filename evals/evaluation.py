"""Evaluation over a dataset's validation split, shared by the train and evaluate stages."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from forgetting.core import data as data_lib
from forgetting.core import digest
from forgetting.core import sampling
from forgetting.evals import reference_memo


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

    @functools.cached_property
    def rows_sha256(self) -> str:
        return digest.tree_sha256(self.batches)

    def ref_hidden(self, hidden_fn: Callable, ref_params: Any, memo_key: tuple | None = None) -> list:
        """Per batch, the reference's hidden states (None where they are not kept); with `memo_key`, those an
        earlier run of this process kept for the same model, reference and rows (`reference_memo`)."""
        if self._ref_hidden is None or self._ref_id != id(ref_params):
            def compute() -> list:
                kept: list = []
                used = 0
                for tokens, _ in self.batches:
                    hidden = hidden_fn(ref_params, tokens) if used < self.budget_bytes else None
                    used += 0 if hidden is None else hidden.nbytes
                    kept.append(hidden if used <= self.budget_bytes else None)
                return kept

            use_memo = memo_key is not None and self.budget_bytes > 0
            kept = reference_memo.MEMO.hidden(("hidden", *memo_key), compute, self.budget_bytes) if use_memo else compute()
            self._ref_hidden, self._ref_id = kept, id(ref_params)
        return self._ref_hidden


def ntp_and_kl_split(eval_step: Callable, hidden_fn: Callable, params: Any, split: EvalSplit, ref_params: Any = None,
                     same_as_ref: bool = False, memo_key: tuple | None = None) -> dict[str, float]:
    """`ntp_and_kl` over a kept `EvalSplit` (`hidden_fn`: `step.make_hidden_fn`, needed only when the split
    keeps hidden states): one pass per batch computes ntp, ntp_h2 and KL together, the
    reference's hidden states come from the split's cache, and `same_as_ref` (θ is bitwise the reference,
    as at step 0) skips the reference altogether: KL(ref ‖ ref) is exactly 0. With `memo_key` (the model
    config and the reference's sha256, `reference_memo`), the reference's hidden states and its step-0 sums
    are taken from earlier runs in this process when they evaluated the same rows."""
    use_ref = ref_params is not None and not same_as_ref
    key = None if memo_key is None else (*memo_key, split.rows_sha256)
    hidden = split.ref_hidden(hidden_fn, ref_params, key) if use_ref else [None] * len(split.batches)

    def compute() -> dict[str, float]:
        pending = [eval_step(params, batch, ref_params if use_ref else None, mask, h)
                   for (batch, mask), h in zip(split.batches, hidden)]
        sums: dict[str, float] = {}
        for batch_sums in jax.device_get(pending):
            for k, v in batch_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return sums

    totals = reference_memo.MEMO.sums(("step0", *key), compute) if same_as_ref and key is not None else compute()
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


# --- whole-file sets scored against the frozen reference (--eval.ref_paths) and token accuracy -----------
@functools.partial(jax.jit, static_argnums=0)
def _masked_sums(cfg: Any, params: Any, ref_params: Any, tokens_bt, target_mask_bt) -> dict:
    """Sums over the target positions `target_mask_bt[:, 1:]` marks of NLL, argmax hits and (with a
    reference) KL(ref ‖ θ) at the positions that predict those targets."""
    import jax.numpy as jnp

    from forgetting.core import model

    logp = jax.nn.log_softmax(model.forward(cfg, params, tokens_bt)[:, :-1].astype(jnp.float32), axis=-1)
    targets = tokens_bt[:, 1:]
    mask = target_mask_bt[:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hits = (jnp.argmax(logp, axis=-1) == targets).astype(jnp.float32)
    out = {"nll": jnp.sum(nll * mask), "hits": jnp.sum(hits * mask), "count": jnp.sum(mask)}
    if ref_params is not None:
        ref_logp = jax.nn.log_softmax(model.forward(cfg, ref_params, tokens_bt)[:, :-1].astype(jnp.float32), axis=-1)
        out["kl"] = jnp.sum(jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1) * mask)
    return out


def masked_means(cfg: Any, params: Any, batches, ref_params: Any = None) -> dict[str, float]:
    """{"ntp", "token_acc"[, "kl"]}: means over the masked targets of (tokens [B, T], mask [B, T]) batches
    (the mask marks the tokens that count as targets; KL(ref ‖ θ) at the positions predicting them)."""
    totals: dict[str, float] = {}
    for tokens, mask in batches:
        for k, v in jax.device_get(_masked_sums(cfg, params, ref_params, tokens, mask)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if not totals.get("count"):
        raise ValueError("no target position to score: every mask is 0")
    out = {"ntp": totals["nll"] / totals["count"], "token_acc": totals["hits"] / totals["count"]}
    if "kl" in totals:
        out["kl"] = totals["kl"] / totals["count"]
    return out


def split_token_accuracy(model_cfg: Any, params: Any, split: EvalSplit) -> float:
    """Fraction of the split's (masked) next-token targets the argmax predicts (`--eval.token_accuracy`)."""
    return masked_means(model_cfg, params, split.batches)["token_acc"]


class RowSet:
    """Every row of a token file, scored whole (no split; the first token is not overwritten): rows of the
    sidecar's `packed_seq_len` (else `seq_len`), targets where its `loss_mask` file says 1 (else all), in
    fixed batches of `batch_size` rows (a short last batch is filled with rows of mask 0)."""

    def __init__(self, path: str | Path, vocab_size: int, seq_len: int, batch_size: int, tokenizer_sha256: str | None = None):
        token_file = data_lib.TokenFile(path, vocab_size=vocab_size)
        sha = token_file.meta.get("tokenizer_sha256")
        if sha and tokenizer_sha256 and sha != tokenizer_sha256:
            raise ValueError(f"--eval.ref_paths {path} was tokenized with tokenizer {sha[:12]}…, but the run's data with "
                             f"{tokenizer_sha256[:12]}…; re-tokenize it with the run's tokenizer")
        self.path, self.seq_len = token_file.path, int(token_file.meta.get("packed_seq_len") or seq_len)
        n = token_file.num_tokens // self.seq_len
        if n == 0:
            raise ValueError(f"--eval.ref_paths {path}: {token_file.num_tokens} tokens, fewer than one row of {self.seq_len}")
        tokens = np.asarray(token_file.tokens[: n * self.seq_len], np.int32).reshape(n, self.seq_len)
        mask = np.ones(tokens.shape, np.float32)
        if token_file.meta.get("loss_mask"):
            mask_file = token_file.path.parent / token_file.meta["loss_mask"]
            mask = np.fromfile(mask_file, np.uint8)[: n * self.seq_len].reshape(n, self.seq_len).astype(np.float32)
        self.batches = []
        for start in range(0, n, batch_size):
            t, m = tokens[start:start + batch_size], mask[start:start + batch_size]
            short = batch_size - t.shape[0]
            self.batches.append((np.concatenate([t, np.zeros((short, self.seq_len), np.int32)]),
                                 np.concatenate([m, np.zeros((short, self.seq_len), np.float32)])))


def ref_path_measures(cache: dict, paths: tuple[str, ...], model_cfg: Any, params: Any, ref_params: Any,
                      same_as_ref: bool, batch_size: int, tokenizer_sha256: str | None = None) -> dict[str, float]:
    """`--eval.ref_paths`: per file (by stem), `ntp/<stem>`, `token_acc/<stem>` and `kl/<stem>` =
    KL(p_ref ‖ θ) over its whole rows (`RowSet`), at the file's own row length. `cache` keeps the opened sets
    between evals; `same_as_ref` (θ is bitwise the reference) makes the KL exactly 0 without running it."""
    import dataclasses

    row: dict[str, float] = {}
    for path in paths:
        key = f"ref_path/{path}"
        if key not in cache:
            cache[key] = RowSet(path, model_cfg.vocab_size, model_cfg.seq_len, batch_size, tokenizer_sha256)
        rows: RowSet = cache[key]
        cfg = model_cfg if rows.seq_len <= model_cfg.seq_len else dataclasses.replace(model_cfg, seq_len=rows.seq_len)
        m = masked_means(cfg, params, rows.batches, None if same_as_ref else ref_params)
        stem = Path(path).stem
        row.update({f"ntp/{stem}": m["ntp"], f"token_acc/{stem}": m["token_acc"], f"kl/{stem}": m.get("kl", 0.0)})
    return row
