"""Autoregressive sampling with a KV cache: one jitted, fixed-shape `lax.while_loop`.

Every row starts from its own prompt (one token, or a padded prefix of per-row length) and decodes from
its end to the full sequence length. The compiled program depends only on (config, batch size, prompt
width, EOS setting), never on the prompt contents or lengths, the temperature or the key, so a second
call with the same shapes does not recompile.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from forgetting.core import model


def _next_token(logits_bv: jax.Array, key: jax.Array, temperature: jax.Array) -> jax.Array:
    """Categorical sample at `temperature`; temperature 0 means greedy (argmax).

    Inverse-CDF sampling: one uniform per row instead of the Gumbel trick's one per vocabulary entry,
    which on CPU made random-bit generation the cost of every decoding step.
    """
    def sampled(logits_bv):
        cdf_bv = jnp.cumsum(jax.nn.softmax(logits_bv / temperature, axis=-1), axis=-1)
        u_b1 = jax.random.uniform(key, (logits_bv.shape[0], 1), jnp.float32) * cdf_bv[:, -1:]
        return jnp.minimum(jnp.sum(cdf_bv <= u_b1, axis=-1), logits_bv.shape[-1] - 1).astype(jnp.int32)

    def greedy(logits_bv):
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    # A branch, not both and a select: each is a full pass over [B, V] (argmax alone was 15% of sampling).
    return jax.lax.cond(temperature > 0, sampled, greedy, logits_bv)


@functools.partial(jax.jit, static_argnames=("cfg", "eos_ids", "pad_id", "length"))
def _sample(cfg: Any, params: Any, prompt_bp: jax.Array, prompt_len_b: jax.Array, key: jax.Array,
            temperature: jax.Array, eos_ids: tuple[int, ...], pad_id: int, length: int) -> jax.Array:
    batch, prompt_width = prompt_bp.shape
    column_p = jnp.arange(prompt_width)
    prompt_bp = jnp.where(column_p[None, :] < prompt_len_b[:, None], prompt_bp.astype(jnp.int32), pad_id)
    tokens_bt = jnp.full((batch, length), pad_id, jnp.int32).at[:, :prompt_width].set(prompt_bp)
    cache = model.cache_for(cfg, batch)

    def is_eos(tokens_b):
        if not eos_ids:
            return jnp.zeros(tokens_b.shape, bool)
        return jnp.any(tokens_b[:, None] == jnp.asarray(eos_ids, jnp.int32)[None, :], axis=-1)

    # A row whose prompt ends in EOS has nothing to continue: it stops at once.
    last_prompt_b = jnp.take_along_axis(prompt_bp, (prompt_len_b - 1)[:, None], axis=1)[:, 0]
    done_b = is_eos(last_prompt_b)

    def cond(state):
        i, _, _, done_b = state
        return (i < length - 1) & ~jnp.all(done_b)

    def body(state):
        i, tokens_bt, cache, done_b = state
        # Every row feeds position i; rows still inside their prompt keep the prompt's next token
        # (token-by-token prefill), the others write a sample. The loop's shapes never depend on the
        # prompt lengths, so new prompts reuse the compiled program.
        current_b1 = jax.lax.dynamic_slice_in_dim(tokens_bt, i, 1, axis=1)
        logits_b1v, cache = model.forward(cfg, params, current_b1, cache, i)
        sampled_b = _next_token(logits_b1v[:, 0].astype(jnp.float32), jax.random.fold_in(key, i), temperature)
        in_prompt_b = i + 1 < prompt_len_b
        stored_b = jax.lax.dynamic_slice_in_dim(tokens_bt, i + 1, 1, axis=1)[:, 0]
        next_b = jnp.where(in_prompt_b, stored_b, jnp.where(done_b, pad_id, sampled_b))
        done_b = done_b | (~in_prompt_b & is_eos(next_b))
        tokens_bt = jax.lax.dynamic_update_slice_in_dim(tokens_bt, next_b[:, None], i + 1, axis=1)
        return i + 1, tokens_bt, cache, done_b

    _, tokens_bt, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tokens_bt, cache, done_b))
    return tokens_bt


def sample(cfg: Any, params: Any, prompt: jax.Array, key: jax.Array, temperature: float = 1.0, *,
           eos_id: int | Sequence[int] | None = None, pad_id: int = 0, length: int | None = None,
           prompt_lengths: jax.Array | Sequence[int] | None = None) -> jax.Array:
    """Samples int32 [B, length] (default `cfg.seq_len`) that begin with each row's prompt.

    `prompt` is int [B] (one token per row, column 0) or a padded int [B, P] whose row b holds
    `prompt_lengths[b]` (1..P) real tokens; each row decodes from the end of its own prompt, and the
    padding past it is never read. Only the shapes (B, P, length) and the EOS/pad ids select the
    compiled program: new prompt contents or lengths, keys and temperatures reuse it.

    temperature 0 decodes greedily. With `eos_id` (one id or several), a row stops at its first
    generated EOS (or at once when its prompt ends in one) and every later position holds `pad_id`;
    without it every row runs to full length (the paper's replay setting).
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
    return _sample(cfg, params, prompt_bp, prompt_len_b, key, jnp.asarray(temperature, jnp.float32),
                   eos_ids, pad_id, length)


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
