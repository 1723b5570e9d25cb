"""evals.reference_memo: a reference's hidden states and step-0 sums kept across runs of one process, read
with every metric unchanged, and never taken for another model, reference or split."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgetting.core import digest, step
from forgetting.evals import evaluation, reference_memo
from forgetting.stages import train
from tests.conftest import tiny_config
from tests.test_replay_cache import T, metrics_text, tiny

MEMO = reference_memo.MEMO
SIX_STEPS = {"stop.num_tokens_train": 8 * T * 6}


class _Rows:
    """A validation split's stand-in: `valid_batches` over fixed token rows (what `EvalSplit` reads)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.token_file = type("F", (), {"path": "rows"})()

    def valid_batches(self, batch_size: int, with_mask: bool = True):
        for i in range(0, len(self.tokens), batch_size):
            yield self.tokens[i:i + batch_size], None


@pytest.fixture
def memo():
    MEMO.clear()
    yield MEMO
    MEMO.clear()


@pytest.fixture(scope="module")
def small():
    cfg = tiny_config("float32")
    from forgetting.core import model

    ref = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
    theta = jax.tree.map(lambda w: w * 1.01, ref)
    rows = np.asarray(jax.random.randint(jax.random.key(1), (10, cfg.seq_len), 0, cfg.vocab_size), np.int32)
    return cfg, ref, theta, rows, step.make_eval_step(cfg), step.make_hidden_fn(cfg)


def _measure(small, ref, rows, *, same=False, memo_key=None, budget=2**30, params=None):
    cfg, _, theta, _, eval_step, hidden_fn = small
    split = evaluation.EvalSplit(_Rows(rows), 4, 0, budget)
    params = (ref if same else theta) if params is None else params
    return evaluation.ntp_and_kl_split(eval_step, hidden_fn, params, split, ref, same, memo_key)


def _key(small, ref):
    return small[0], digest.tree_sha256(ref)


def test_a_hit_gives_the_numbers_of_computing_and_does_not_compute(small, memo):
    cfg, ref, theta, rows, *_ = small
    want_kl, want_step0 = _measure(small, ref, rows), _measure(small, ref, rows, same=True)
    assert want_kl["kl"] > 0 and want_step0["kl"] == 0.0
    first = _measure(small, ref, rows, memo_key=_key(small, ref))
    step0 = _measure(small, ref, rows, same=True, memo_key=_key(small, ref))
    assert (first, step0, memo.hits, memo.misses) == (want_kl, want_step0, 0, 2)
    again = _measure(small, ref, rows, memo_key=_key(small, ref))
    assert again == want_kl and memo.hits == 1
    # a hit on the step-0 sums runs no eval step at all
    split = evaluation.EvalSplit(_Rows(rows), 4, 0, 2**30)

    def boom(*args):
        raise AssertionError("the eval step ran")

    assert evaluation.ntp_and_kl_split(boom, boom, ref, split, ref, True, _key(small, ref)) == want_step0
    assert memo.hits == 2


def test_another_reference_rows_or_model_is_never_read(small, memo):
    cfg, ref, theta, rows, *_ = small
    _measure(small, ref, rows, memo_key=_key(small, ref))
    _measure(small, ref, rows, same=True, memo_key=_key(small, ref))
    assert memo.misses == 2
    # one weight changed in the last bit
    leaves, tree = jax.tree.flatten(ref)
    nudged = jax.tree.unflatten(tree, [leaves[0].at[(0,) * leaves[0].ndim].set(
        jnp.nextafter(leaves[0][(0,) * leaves[0].ndim], jnp.inf)), *leaves[1:]])
    assert _measure(small, nudged, rows, memo_key=_key(small, nudged)) == _measure(small, nudged, rows)
    # one token changed
    other = rows.copy()
    other[3, 5] = (other[3, 5] + 1) % small[0].vocab_size
    assert _measure(small, ref, other, same=True, memo_key=_key(small, ref)) == _measure(small, ref, other, same=True)
    # another model config (the bf16 program) on the same weights and rows
    bf16 = tiny_config("bfloat16")
    split = evaluation.EvalSplit(_Rows(rows), 4, 0, 2**30)
    programs = step.make_eval_step(bf16), step.make_hidden_fn(bf16)
    got = evaluation.ntp_and_kl_split(*programs, small[2], split, ref, False, (bf16, _key(small, ref)[1]))
    alone = evaluation.EvalSplit(_Rows(rows), 4, 0, 2**30)
    assert got == evaluation.ntp_and_kl_split(*programs, small[2], alone, ref) != _measure(small, ref, rows)
    assert memo.hits == 0 and memo.misses == 5


def test_hidden_states_are_kept_within_the_budget_least_recently_used_first_out(small, memo):
    cfg, ref, theta, rows, *_ = small
    size = 12 * cfg.seq_len * cfg.d_model * 4  # f32 [rows, T, D] of one split (3 batches of 4, the last padded)
    refs = [ref, jax.tree.map(lambda w: w * 0.5, ref)]
    for r in refs:  # a budget of one split: the second evicts the first
        _measure(small, r, rows, memo_key=_key(small, r), budget=size)
    _measure(small, refs[1], rows, memo_key=_key(small, refs[1]), budget=size)
    _measure(small, refs[0], rows, memo_key=_key(small, refs[0]), budget=size)
    assert (memo.hits, memo.misses) == (1, 3)
    memo.clear()  # a budget below one batch keeps nothing, here or in the memo
    for _ in range(2):
        _measure(small, ref, rows, memo_key=_key(small, ref), budget=1)
    assert (memo.hits, memo.misses) == (0, 2)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.data())
def test_the_rows_digest_tells_apart_any_change_of_token_mask_dtype_or_shape(n, width, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    batches = [(rng.integers(0, 50, (2, width)).astype(np.int32), np.ones((2, width), np.float32)) for _ in range(n)]
    base = digest.tree_sha256(batches)
    assert digest.tree_sha256([(t.copy(), m.copy()) for t, m in batches]) == base
    b, which, i, j = (data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, 1)), data.draw(st.integers(0, 1)),
                      data.draw(st.integers(0, width - 1)))
    changed = [(t.copy(), m.copy()) for t, m in batches]
    changed[b][which][i, j] += 1
    assert digest.tree_sha256(changed) != base
    as_uint16 = [(t.astype(np.uint16), m) for t, m in batches]
    assert digest.tree_sha256(as_uint16) != base
    assert digest.tree_sha256([(t.reshape(1, -1), m.reshape(1, -1)) for t, m in batches]) != base


# --- runs of one process ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_after_another_from_the_same_model_ends_with_its_metrics_computed_alone(corpora, tmp_path, memo):
    pretrained = train.train(tiny(corpora, tmp_path / "pre", **{"stop.num_tokens_train": 8 * T * 8}))["run_dir"]
    finetunes = {  # two finetunes of one model (the reference of both), as in a sweep
        "plain": {"data.path": corpora[1], "model.load_path": pretrained},
        "kl": {"data.path": corpora[1], "model.load_path": pretrained, "reg.method": "kl_pre", "reg.coeff": 1.0,
               "reg.batch_size": 4, "opt.peak_lr": 1e-3},
    }
    alone = {}
    for name, changes in finetunes.items():
        memo.clear()
        cfg = tiny(corpora, tmp_path / f"alone-{name}", **SIX_STEPS, **changes)
        train.train(cfg)
        alone[name] = metrics_text(cfg)
    memo.clear()
    in_turn = {}
    for name, changes in finetunes.items():
        cfg = tiny(corpora, tmp_path / f"turn-{name}", **SIX_STEPS, **changes)
        train.train(cfg)
        in_turn[name] = metrics_text(cfg)
        if name == "plain":
            assert memo.hits == 0
    # the second run read the reference's hidden states and step-0 sums on both splits (valid and prev)
    assert memo.hits == 4
    assert in_turn == alone
    assert alone["plain"].count("\n") == 3 and '"valid_kl": 0.0' in alone["plain"].splitlines()[0]
