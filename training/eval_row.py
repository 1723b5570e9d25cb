"""The train stage's per-eval row: losses and KL on every dataset, accuracies, harness scores, weight norms and
clocks. `Evaluator.row` builds it in one function, one block per kind of measure (a new measure is a few
lines there)."""
from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from forgetting.core import digest, lora
from forgetting.core import step as step_lib
from forgetting.training.loop import Clock


def same_tree(a: Any, b: Any) -> bool:
    """Bitwise-equal pytrees of arrays (same structure, shapes, dtypes and values)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    if any(x.shape != y.shape or x.dtype != y.dtype for x, y in pairs):
        return False
    return all(bool(v) for v in jax.device_get([jnp.array_equal(x, y) for x, y in pairs]))


def same_rows(a: Any, b: Any) -> bool:
    """Whether two `evaluation.EvalSplit`s hold the same batches (tokens and loss masks)."""
    return len(a.batches) == len(b.batches) and all(
        np.array_equal(ta, tb) and np.array_equal(ma, mb) for (ta, ma), (tb, mb) in zip(a.batches, b.batches))


def _norm(tree: Any) -> float:
    return float(optax.tree.norm(tree))


def _diff_norm(a: Any, b: Any) -> float:
    return _norm(jax.tree.map(lambda x, y: x.astype(jnp.float32) - y.astype(jnp.float32), a, b))


class Evaluator:
    """Evaluates a run's parameters; keeps its eval sets (and the reference's hidden states on them) across evals."""

    def __init__(self, plan: Any):
        self.plan, self.cfg = plan, plan.cfg
        self.eval_step = step_lib.make_eval_step(plan.model_cfg)
        self.hidden_fn = step_lib.make_hidden_fn(plan.model_cfg)
        self._splits: dict[str, Any] = {}  # evaluation.EvalSplit by dataset key
        self._harness = _lm_eval_scorer(plan)
        self._ref_sha256: tuple | None = None  # (reference params, their sha256), hashed once per run
        if self.cfg.eval.prev_every != 1 and plan.data.prev is None:
            print(f"warning: --eval.prev_every {self.cfg.eval.prev_every} has nothing to thin out: the loaded model "
                  "brings no data of its own here, so this run logs no prev_* metrics", file=sys.stderr)

    def params_now(self, train_state: Any) -> Any:
        """The model's parameters in a train state (LoRA adapters merged into their base)."""
        p = self.plan
        return lora.merge(p.model_cfg, p.frozen["base"], train_state.params) if p.model.use_lora else train_state.params

    def row(self, train_state: Any, step: int, losses: list, terms: list, clock: Clock) -> dict:
        """The metrics row of an eval after `step` (`losses`, `terms`: the steps' since the last eval)."""
        p, cfg = self.plan, self.cfg
        params = self.params_now(train_state)
        row: dict = {"step": step, "tokens": step * p.schedule.tokens_per_step, "lr": float(p.schedule.schedule(step)),
                     "epoch": step * cfg.opt.batch_size / p.data.train.num_train}
        row.update(_train_losses(losses, terms))
        row.update(self._datasets(params, step, with_prev=self.prev_due(step)))
        row.update(self._lm_eval_scores(params, step))
        row["weight_norm"] = _norm(params)
        ref = p.reference.params
        if ref is not None:
            moved = _diff_norm(params, ref)
            row["dist_to_ref"] = moved
            if p.reference.init_distance:
                row["rel_dist_to_ref"] = moved / p.reference.init_distance
        row["train_seconds"] = clock.total_train_seconds
        row["wall_time"] = clock.wall()
        # Throughput over steps after the first of this process (that one compiles): new-data tokens per
        # second of training, replay sampling included, evaluation excluded.
        row["tokens_per_s"] = clock.tokens_per_s(step, p.schedule.tokens_per_step)
        return row

    def prev_due(self, step: int) -> bool:
        """Whether the eval after `step` measures the loaded run's data (--eval.prev_every; the last eval
        always does, through `complete`)."""
        every = self.cfg.eval.prev_every
        index = step // self.plan.schedule.eval_every
        return step == 0 or every == 1 or (every > 1 and index % every == 0)

    def complete(self, train_state: Any, row: dict) -> dict:
        """The run's last eval row with what --eval.prev_every left out of it (the other measures as they were)."""
        if self.prev_due(row["step"]) or self.plan.data.prev is None:
            return row
        return {**self._prev_measures(self.params_now(train_state), row["step"]), **row}

    def _reference_args(self, params: Any, step: int) -> tuple:
        """(the model KL is measured against, whether θ is bitwise it, its `reference_memo` key)."""
        ref = self.plan.reference.params
        kl_ref = ref if ref is not None else self.plan.model.init_params  # pretraining: KL to the initialization
        # θ is bitwise the reference at the start of a run: KL is exactly 0 and the reference need not run
        same = step == 0 and kl_ref is not None and same_tree(params, kl_ref)
        return kl_ref, same, self._memo_key(kl_ref)

    def _prev_measures(self, params: Any, step: int) -> dict:
        """What `_datasets(with_prev=False)` leaves out: prev_* and the extra paths with the loaded run's rows."""
        from forgetting.evals import evaluation

        p = self.plan
        split = self._split("prev", p.data.prev)
        m = evaluation.ntp_and_kl_split(self.eval_step, self.hidden_fn, params, split, *self._reference_args(params, step))
        row = {f"prev_{k}": v for k, v in m.items()}
        row.update(self._accuracy(params, p.data.prev, "prev_acc"))
        for name, dataset in p.data.extra.items():
            if self._split(f"extra/{name}", dataset) is split:
                row[f"ntp/{name}"] = m["ntp"]
                row.update(self._accuracy(params, dataset, f"acc/{name}"))
        return row

    def _datasets(self, params: Any, step: int, with_prev: bool = True) -> dict:
        """NTP (and KL to the reference) on the training data's, the loaded run's and the mix's validation
        splits, NTP on --eval.extra_paths; exact-match accuracy where a dataset has answer spans. Without
        `with_prev`, the loaded run's split and the extra paths with its rows are left out."""
        from forgetting.evals import evaluation

        p = self.plan
        ref = p.reference.params
        kl_ref, same, memo_key = self._reference_args(params, step)
        row: dict = {}
        ntp_of: dict[int, float] = {}  # id(EvalSplit) -> its NTP in this eval: rows kept twice are measured once
        left_out: set[int] = set()  # id(EvalSplit) of the loaded run's split when this eval skips it
        for prefix, dataset in (("valid", p.data.train), ("prev", p.data.prev), ("mix", p.data.mix)):
            if dataset is None:
                continue
            split = self._split(prefix, dataset)
            if prefix == "prev" and not with_prev:
                left_out.add(id(split))
                continue
            m = evaluation.ntp_and_kl_split(self.eval_step, self.hidden_fn, params, split, kl_ref, same, memo_key)
            ntp_of.setdefault(id(split), m["ntp"])
            row.update({f"{prefix}_{k}": v for k, v in m.items()})
            row.update(self._accuracy(params, dataset, f"{prefix}_acc"))
        for name, dataset in p.data.extra.items():
            split = self._split(f"extra/{name}", dataset)
            if id(split) in left_out and id(split) not in ntp_of:
                continue
            if id(split) not in ntp_of:
                ntp_of[id(split)] = evaluation.ntp_and_kl_split(self.eval_step, self.hidden_fn, params, split)["ntp"]
            row[f"ntp/{name}"] = ntp_of[id(split)]
            row.update(self._accuracy(params, dataset, f"acc/{name}"))
        if self.cfg.eval.token_accuracy:
            row["valid_token_acc"] = evaluation.split_token_accuracy(p.model_cfg, params, self._split("valid", p.data.train))
        # --eval.ref_paths: whole files at their own row length (NTP with their loss mask, token accuracy, KL(ref ‖ θ))
        row.update(evaluation.ref_path_measures(self._splits, self.cfg.eval.ref_paths, p.model_cfg, params, ref, same,
                                                p.eval_batch_size, p.data.train.token_file.meta.get("tokenizer_sha256")))
        return row

    def _memo_key(self, ref: Any) -> tuple | None:
        """(model config, the reference's sha256): how `reference_memo` knows this run's reference, on the
        one-device, one-process path (elsewhere the reference is not on one host to hash), else None."""
        if ref is None or self.cfg.run.mesh or jax.process_count() > 1:
            return None
        if self._ref_sha256 is None or self._ref_sha256[0] is not ref:
            self._ref_sha256 = (ref, digest.tree_sha256(ref))
        return self.plan.model_cfg, self._ref_sha256[1]

    def _accuracy(self, params: Any, dataset: Any, key: str) -> dict:
        from forgetting.evals import evaluation

        span = evaluation.answer_span(dataset.token_file.meta)
        if not span:
            return {}
        return {key: evaluation.exact_match(self.plan.model_cfg, params, dataset, self.plan.eval_batch_size, span,
                                            self.cfg.eval.max_tokens)}

    def _lm_eval_scores(self, params: Any, step: int) -> dict:
        """--eval.lm_eval_tasks at every --eval.lm_eval_every-th eval: `lm_eval/<task>/<metric>` keys."""
        if self._harness is None or (step // self.plan.schedule.eval_every) % self.cfg.eval.lm_eval_every:
            return {}
        return self._harness.scores(params, step)

    def _split(self, key: str, dataset: Any) -> Any:
        from forgetting.evals import evaluation

        if key not in self._splits:
            cfg = self.cfg
            # The reference's hidden states are kept on the one-device, one-process path only.
            single = not cfg.run.mesh and jax.process_count() == 1
            budget = cfg.eval.reference_cache_mb * 2**20 if single else 0
            split = evaluation.EvalSplit(dataset, self.plan.eval_batch_size, cfg.eval.max_tokens, budget)
            # an --eval.extra_paths file that is the training data (or the old data) has the same validation
            # rows: keep them once, and measure them once per eval (the figures pass both files as extras)
            self._splits[key] = next((kept for kept in self._splits.values() if same_rows(kept, split)), split)
        return self._splits[key]


def _train_losses(losses: list, terms: list) -> dict:
    """The objective and its two terms, averaged over the steps since the last eval."""
    row = {}
    if losses:
        row["train_loss"] = float(np.mean(jax.device_get(losses)))
    if terms:
        ntp, reg = np.mean(np.asarray(jax.device_get(terms), np.float64), axis=0)
        row["train_loss_ntp"], row["train_loss_reg"] = float(ntp), float(reg)
    return row


def _lm_eval_scorer(plan: Any) -> Any:
    """The harness tasks of --eval.lm_eval_tasks, ready before the first step (None without the flag)."""
    cfg = plan.cfg
    if not cfg.eval.lm_eval_tasks:
        return None
    if jax.process_count() > 1:
        raise ValueError(f"--eval.lm_eval_tasks scores in one process; this run has {jax.process_count()}: score its "
                         "checkpoints afterwards with python -m forgetting.stages.lm_eval")
    from forgetting.evals import harness_report

    return harness_report.TrainingScorer(cfg.eval, plan.model_cfg, load_path=plan.model.loaded_from or "",
                                         data_path=cfg.data.path)
