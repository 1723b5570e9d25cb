"""Autoregressive sampling with a KV cache: one jitted, fixed-shape `lax.while_loop`.

Every row starts from its own prompt token (column 0) and decodes to the full sequence length. The
compiled program depends only on (config, batch size, EOS setting), never on the temperature or key,
so a second call with the same shapes does not recompile.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

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


@functools.partial(jax.jit, static_argnames=("cfg", "eos_id", "pad_id", "length"))
def _sample(cfg: Any, params: Any, prompt_b: jax.Array, key: jax.Array, temperature: jax.Array,
            eos_id: int | None, pad_id: int, length: int) -> jax.Array:
    batch = prompt_b.shape[0]
    tokens_bt = jnp.full((batch, length), pad_id, jnp.int32).at[:, 0].set(prompt_b.astype(jnp.int32))
    cache = model.cache_for(cfg, batch)
    done_b = jnp.zeros((batch,), bool) if eos_id is None else prompt_b == eos_id

    def cond(state):
        i, _, _, done_b = state
        return (i < length - 1) & ~jnp.all(done_b)

    def body(state):
        i, tokens_bt, cache, done_b = state
        current_b1 = jax.lax.dynamic_slice_in_dim(tokens_bt, i, 1, axis=1)
        logits_b1v, cache = model.forward(cfg, params, current_b1, cache, i)
        next_b = _next_token(logits_b1v[:, 0].astype(jnp.float32), jax.random.fold_in(key, i), temperature)
        if eos_id is not None:
            next_b = jnp.where(done_b, pad_id, next_b)  # rows that already stopped emit padding
            done_b = done_b | (next_b == eos_id)
        tokens_bt = jax.lax.dynamic_update_slice_in_dim(tokens_bt, next_b[:, None], i + 1, axis=1)
        return i + 1, tokens_bt, cache, done_b

    _, tokens_bt, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tokens_bt, cache, done_b))
    return tokens_bt


def sample(cfg: Any, params: Any, prompt: jax.Array, key: jax.Array, temperature: float = 1.0, *,
           eos_id: int | None = None, pad_id: int = 0, length: int | None = None) -> jax.Array:
    """Samples int32 [B, length] (default `cfg.seq_len`) from int prompts [B]; column 0 is the prompt.

    temperature 0 decodes greedily. With `eos_id`, a row stops at its first EOS and every later
    position holds `pad_id`; without it every row runs to full length (the paper's replay setting).
    """
    length = cfg.seq_len if length is None else length
    if not 1 <= length <= cfg.seq_len:
        raise ValueError(f"length must be in [1, seq_len={cfg.seq_len}], got {length}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 1:
        raise ValueError(f"prompt must be int [B] (one token per row), got shape {prompt.shape}")
    return _sample(cfg, params, prompt, key, jnp.asarray(temperature, jnp.float32), eos_id, pad_id, length)


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
