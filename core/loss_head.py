"""Loss heads: the unembedding and the losses of the train and eval steps, from final hidden states.

One `LossHead` record per implementation, same functions, same arguments (hidden states [B, T, D], the
output embedding [V, D], the matmul `dtype`, the fused head's `chunk` budget):
- `FUSED` is `core.fused_head` (xla_cpu): chunked, the [B, T, V] logits never whole, reverse mode only.
- `REFERENCE` forms the logits (`dtype` inputs, f32 accumulation) and applies `core.losses` to them: plain
  autodiff plus `losses`' custom JVP, so forward mode (`jax.jvp`, `jax.jacfwd`) works through every function.
  The `chunk` argument does not apply to it.
The KL's reference side (its hidden states and unembedding) is a constant in both.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from forgetting.core import fused_head, layers, losses

CHUNK_ELEMENTS = fused_head.CHUNK_ELEMENTS


class LossHead(NamedTuple):
    # (hidden, w, tokens, mask or None, dtype, chunk) -> mean next-token NLL
    next_token_loss: Callable[..., jax.Array]
    # (hidden, w, ref_hidden, ref_w, mask or None, dtype, chunk) -> mean KL(p_ref ‖ p_θ)
    kl_to_reference: Callable[..., jax.Array]
    # (hidden, w, tokens, dtype, chunk) -> NLL [B, T-1]
    nll_per_position: Callable[..., jax.Array]
    # (hidden, w, ref_hidden, ref_w, dtype, chunk) -> KL [B, T]
    kl_per_position: Callable[..., jax.Array]
    # (hidden, w, tokens, ref_hidden, ref_w, dtype, chunk) -> (NLL [B, T-1], KL [B, T])
    nll_and_kl_per_position: Callable[..., tuple[jax.Array, jax.Array]]


def logits(hidden_btd: jax.Array, w_vd: jax.Array, dtype: str) -> jax.Array:
    """f32 logits [B, T, V] of final hidden states under the output embedding (`dtype` matmul inputs)."""
    return layers.einsum_f32_acc("btd,vd->btv", hidden_btd, w_vd, dtype)


def _next_token_loss(hidden_btd, w_vd, tokens_bt, mask_bt, dtype, chunk):
    return losses.next_token_loss(logits(hidden_btd, w_vd, dtype), tokens_bt, mask_bt)


def _kl_to_reference(hidden_btd, w_vd, ref_hidden_btd, ref_w_vd, mask_bt, dtype, chunk):
    ref_logits = jax.lax.stop_gradient(logits(ref_hidden_btd, ref_w_vd, dtype))
    return losses.kl_to_reference(logits(hidden_btd, w_vd, dtype), ref_logits, mask_bt)


def _nll_per_position(hidden_btd, w_vd, tokens_bt, dtype, chunk):
    return losses.next_token_nll(logits(hidden_btd, w_vd, dtype), tokens_bt)


def _kl_per_position(hidden_btd, w_vd, ref_hidden_btd, ref_w_vd, dtype, chunk):
    return losses.kl_per_position(logits(hidden_btd, w_vd, dtype), logits(ref_hidden_btd, ref_w_vd, dtype))


def _nll_and_kl_per_position(hidden_btd, w_vd, tokens_bt, ref_hidden_btd, ref_w_vd, dtype, chunk):
    logits_btv = logits(hidden_btd, w_vd, dtype)
    return (losses.next_token_nll(logits_btv, tokens_bt),
            losses.kl_per_position(logits_btv, logits(ref_hidden_btd, ref_w_vd, dtype)))


REFERENCE = LossHead(_next_token_loss, _kl_to_reference, _nll_per_position, _kl_per_position, _nll_and_kl_per_position)
FUSED = LossHead(fused_head.next_token_loss, fused_head.kl_to_reference, fused_head.nll_per_position,
                 fused_head.kl_per_position, fused_head.nll_and_kl_per_position)
