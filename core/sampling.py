"""Autoregressive sampling with a KV cache: one jitted program of fixed-shape `lax.while_loop`s.

Every row starts from its own prompt (one token, or a padded prefix of per-row length) and decodes from
its end to the full sequence length. The compiled program depends only on (config, batch size, prompt
width, EOS setting), never on the prompt contents or lengths, the temperature or the key, so a second
call with the same shapes does not recompile.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from forgetting.core import backend, families, model


def _block_width(vocab: int) -> int:
    """Entries per block of the two-level search: the power of two nearest above sqrt(vocab)."""
    return 1 << max(0, math.ceil(math.log2(max(vocab, 1)) / 2))


def _inverse_cdf(weights_bv: jax.Array, key: jax.Array) -> jax.Array:
    """One draw per row from the categorical with unnormalized weights [B, V] >= 0 (row sums > 0).

    Inverse-CDF sampling in two levels: a cumulative sum over block totals picks the block, one over that
    block's entries picks the token, so the prefix sums cover about 2·sqrt(V) entries per row, not V (a
    cumsum over [128, 4096] was 10% of a decoding step on CPU). One uniform per row. A token of weight 0
    is never drawn: the search returns the first entry whose prefix sum exceeds u, and u stays below
    the row's total (and the chosen block's total) despite rounding.
    """
    B, V = weights_bv.shape
    width = _block_width(V)
    blocks = -(-V // width)
    w_bnk = jnp.pad(weights_bv, ((0, 0), (0, blocks * width - V))).reshape(B, blocks, width)
    block_total_bn = jnp.sum(w_bnk, axis=-1)
    cdf_bn = jnp.cumsum(block_total_bn, axis=-1)
    u_b = jax.random.uniform(key, (B,), jnp.float32) * cdf_bn[:, -1]
    u_b = jnp.minimum(u_b, jnp.nextafter(cdf_bn[:, -1], 0.0))
    block_b = jnp.minimum(jnp.sum(cdf_bn <= u_b[:, None], axis=-1), blocks - 1)
    below_b = jnp.take_along_axis(cdf_bn - block_total_bn, block_b[:, None], axis=1)[:, 0]
    inner_bk = jnp.take_along_axis(w_bnk, block_b[:, None, None], axis=1)[:, 0]
    inner_cdf_bk = jnp.cumsum(inner_bk, axis=-1)
    rest_b = jnp.clip(u_b - below_b, 0.0, jnp.nextafter(inner_cdf_bk[:, -1], 0.0))
    entry_b = jnp.minimum(jnp.sum(inner_cdf_bk <= rest_b[:, None], axis=-1), width - 1)
    return (block_b * width + entry_b).astype(jnp.int32)


def _next_token(logits_bv: jax.Array, key: jax.Array, temperature: jax.Array) -> jax.Array:
    """Categorical sample at `temperature`; temperature 0 means greedy (argmax).

    Inverse-CDF sampling (`_inverse_cdf`): one uniform per row instead of the Gumbel trick's one per
    vocabulary entry, which on CPU made random-bit generation the cost of every decoding step.
    """
    def sampled(logits_bv):
        scaled_bv = logits_bv / temperature
        return _inverse_cdf(jnp.exp(scaled_bv - jnp.max(scaled_bv, axis=-1, keepdims=True)), key)

    def greedy(logits_bv):
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    # A branch, not both and a select: each is a full pass over [B, V] (argmax alone was 15% of sampling).
    return jax.lax.cond(temperature > 0, sampled, greedy, logits_bv)


DECODE_PHASES = 4  # cache lengths the decoding loop steps through (see `_phase_ends`)


def _phase_ends(length: int, phases: int | None = None) -> list[int]:
    """Cache lengths of the decoding phases, increasing to `length`, in multiples of 8 where possible.

    A decoding step reads every cached position (a memory-bound pass over the whole cache), so writing
    position i into a cache of `length` positions reads mostly empty ones early on. Phase k decodes the
    positions below its end with a cache of exactly that many positions: the same math, about
    (phases + 1) / (2 · phases) of the cache reads, and one compiled loop body per phase."""
    def round_up(n: int, multiple: int) -> int:
        return -(-n // multiple) * multiple

    phases = DECODE_PHASES if phases is None else phases
    return sorted({min(length, round_up(round_up(length * k, phases) // phases, 8)) for k in range(1, phases + 1)})


def _grow_cache(cfg: Any, batch: int, cache: Any, old: int, new: int) -> Any:
    """`cache` (of `old` positions) zero-padded to `new` positions along each leaf's time axis: the axis
    whose size follows the cache length, found from the family's own cache shapes (so any layout)."""
    old_shapes = jax.eval_shape(lambda: model.cache_for(cfg, batch, old))
    new_shapes = jax.eval_shape(lambda: model.cache_for(cfg, batch, new))

    def grow(leaf, old_shape, new_shape):
        pad = [(0, n - o) for o, n in zip(old_shape.shape, new_shape.shape)]
        return jnp.pad(leaf, pad) if any(p for _, p in pad) else leaf

    return jax.tree.map(grow, cache, old_shapes, new_shapes)


@functools.partial(jax.jit, static_argnames=("cfg", "eos_ids", "pad_id", "length", "with_hidden"))
def _sample(cfg: Any, params: Any, prompt_bp: jax.Array, prompt_len_b: jax.Array, key: jax.Array,
            temperature: jax.Array, eos_ids: tuple[int, ...], pad_id: int, length: int, with_hidden: bool = False):
    batch, prompt_width = prompt_bp.shape
    column_p = jnp.arange(prompt_width)
    prompt_bp = jnp.where(column_p[None, :] < prompt_len_b[:, None], prompt_bp.astype(jnp.int32), pad_id)
    tokens_bt = jnp.full((batch, length), pad_id, jnp.int32).at[:, :prompt_width].set(prompt_bp)
    hidden_btd = None
    if with_hidden:
        unembedding_vd = families.of(cfg).output_embedding(cfg, params)
        hidden_btd = jnp.zeros((batch, length, unembedding_vd.shape[-1]), jnp.float32)

    def decode(tokens_b1, cache, i):
        """(logits f32 [B, 1, V], hidden f32 [B, 1, D] or None, new cache) at position i."""
        if not with_hidden:
            logits_b1v, cache = model.forward(cfg, params, tokens_b1, cache, i)
            return logits_b1v, None, cache
        # The family's forward is the unembedding of these hidden states (the protocol's contract).
        h_b1d, cache = families.decode_hidden(cfg, params, tokens_b1, cache, i)
        logits_b1v = backend.kernels_for(cfg).dense("btd,vd->btv", h_b1d, unembedding_vd, cfg.compute_dtype)
        return logits_b1v, h_b1d, cache

    def is_eos(tokens_b):
        if not eos_ids:
            return jnp.zeros(tokens_b.shape, bool)
        return jnp.any(tokens_b[:, None] == jnp.asarray(eos_ids, jnp.int32)[None, :], axis=-1)

    # A row whose prompt ends in EOS has nothing to continue: it stops at once.
    last_prompt_b = jnp.take_along_axis(prompt_bp, (prompt_len_b - 1)[:, None], axis=1)[:, 0]
    done_b = is_eos(last_prompt_b)

    def body(state):
        i, tokens_bt, cache, done_b, hidden_btd = state
        # Every row feeds position i; rows still inside their prompt keep the prompt's next token
        # (token-by-token prefill), the others write a sample. The loop's shapes never depend on the
        # prompt lengths, so new prompts reuse the compiled program.
        current_b1 = jax.lax.dynamic_slice_in_dim(tokens_bt, i, 1, axis=1)
        logits_b1v, h_b1d, cache = decode(current_b1, cache, i)
        if with_hidden:
            hidden_btd = jax.lax.dynamic_update_slice_in_dim(hidden_btd, h_b1d, i, axis=1)
        sampled_b = _next_token(logits_b1v[:, 0].astype(jnp.float32), jax.random.fold_in(key, i), temperature)
        in_prompt_b = i + 1 < prompt_len_b
        stored_b = jax.lax.dynamic_slice_in_dim(tokens_bt, i + 1, 1, axis=1)[:, 0]
        next_b = jnp.where(in_prompt_b, stored_b, jnp.where(done_b, pad_id, sampled_b))
        done_b = done_b | (~in_prompt_b & is_eos(next_b))
        tokens_bt = jax.lax.dynamic_update_slice_in_dim(tokens_bt, next_b[:, None], i + 1, axis=1)
        return i + 1, tokens_bt, cache, done_b, hidden_btd

    state, cached = None, 0
    for end in _phase_ends(length):
        # Positions below `end` are written with a cache of `end` positions (see `_phase_ends`).
        if state is None:
            state = (jnp.int32(0), tokens_bt, model.cache_for(cfg, batch, end), done_b, hidden_btd)
        else:
            i, tokens_bt, cache, done_b, hidden_btd = state
            state = (i, tokens_bt, _grow_cache(cfg, batch, cache, cached, end), done_b, hidden_btd)
        cached = end

        def cond(state, end=end):
            i, _, _, done_b, _ = state
            return (i < min(end, length - 1)) & ~jnp.all(done_b)

        state = jax.lax.while_loop(cond, body, state)
    _, tokens_bt, cache, _, hidden_btd = state
    if not with_hidden:
        return tokens_bt
    # The last position is fed once more, for its hidden state alone (nothing is sampled after it).
    _, h_b1d, _ = decode(tokens_bt[:, length - 1:], cache, length - 1)
    return tokens_bt, hidden_btd.at[:, length - 1:].set(h_b1d)


def sample(cfg: Any, params: Any, prompt: jax.Array, key: jax.Array, temperature: float = 1.0, *,
           eos_id: int | Sequence[int] | None = None, pad_id: int = 0, length: int | None = None,
           prompt_lengths: jax.Array | Sequence[int] | None = None,
           return_hidden: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Samples int32 [B, length] (default `cfg.seq_len`) that begin with each row's prompt.

    `prompt` is int [B] (one token per row, column 0) or a padded int [B, P] whose row b holds
    `prompt_lengths[b]` (1..P) real tokens; each row decodes from the end of its own prompt, and the
    padding past it is never read. Only the shapes (B, P, length) and the EOS/pad ids select the
    compiled program: new prompt contents or lengths, keys and temperatures reuse it.

    temperature 0 decodes greedily. With `eos_id` (one id or several), a row stops at its first
    generated EOS (or at once when its prompt ends in one) and every later position holds `pad_id`;
    without it every row runs to full length (the paper's replay setting).

    With `return_hidden` (families with `decode_hidden`), also the normed final hidden states f32
    [B, length, D] at every position of the rows, as decoding computed them: what the output embedding
    turns into the next-token logits the samples were drawn from (unspecified past a row's EOS). A KL
    to this model on these rows can start from them instead of a second forward.
    """
    length = cfg.seq_len if length is None else length
    if not 1 <= length <= cfg.seq_len:
        raise ValueError(f"length must be in [1, seq_len={cfg.seq_len}], got {length}")
    prompt = jnp.asarray(prompt)
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    prompt = prompt.astype(jnp.int32)  # int64 numpy input and int32 share one compiled program
    if prompt.ndim == 1:
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths goes with a padded [B, P] prompt; a [B] prompt is one token per row")
        prompt_bp, prompt_len_b = prompt[:, None], jnp.ones(prompt.shape, jnp.int32)
    elif prompt.ndim == 2:
        prompt_bp = prompt
        if prompt_lengths is None:
            prompt_len_b = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
        else:
            lengths_np = np.asarray(prompt_lengths)
            if lengths_np.shape != (prompt.shape[0],):
                raise ValueError(f"prompt_lengths must be int [B={prompt.shape[0]}], got shape {lengths_np.shape}")
            if lengths_np.size and (lengths_np.min() < 1 or lengths_np.max() > prompt.shape[1]):
                raise ValueError(f"prompt_lengths must lie in [1, P={prompt.shape[1]}] (every row needs a "
                                 f"prompt token), got {lengths_np.min()}..{lengths_np.max()}")
            prompt_len_b = jnp.asarray(lengths_np, jnp.int32)
    else:
        raise ValueError(f"prompt must be int [B] or padded int [B, P] with prompt_lengths, got shape {prompt.shape}")
    if prompt_bp.shape[1] > length:
        raise ValueError(f"prompt width P={prompt_bp.shape[1]} exceeds the sample length {length}")
    eos_ids = () if eos_id is None else tuple(sorted({int(e) for e in np.atleast_1d(eos_id)}))
    if return_hidden and not families.has_decode_hidden(cfg):
        raise ValueError(f"return_hidden needs a model family with decode_hidden; {families.of(cfg).name!r} has none")
    return _sample(cfg, params, prompt_bp, prompt_len_b, key, jnp.asarray(temperature, jnp.float32),
                   eos_ids, pad_id, length, return_hidden)


@functools.partial(jax.jit, static_argnames=("cfg", "prompt_len"))
def greedy_complete(cfg: Any, params: Any, tokens_bt: jax.Array, prompt_len: int) -> jax.Array:
    """Greedy continuation of the first `prompt_len` tokens of each row, filling the rest of [B, T].

    Used for exact-match accuracy on tasks with a known answer span (the toy arithmetic tasks).
    """
    batch, length = tokens_bt.shape
    cache = model.cache_for(cfg, batch)
    logits, cache = model.forward(cfg, params, tokens_bt[:, :prompt_len], cache, 0)
    next_b = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out_bt = tokens_bt.astype(jnp.int32)

    def body(i, state):
        out_bt, cache, next_b = state
        out_bt = jax.lax.dynamic_update_slice_in_dim(out_bt, next_b[:, None], i, axis=1)
        logits, cache = model.forward(cfg, params, next_b[:, None], cache, i)
        return out_bt, cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

    out_bt, _, _ = jax.lax.fori_loop(prompt_len, length, body, (out_bt, cache, next_b))
    return out_bt
