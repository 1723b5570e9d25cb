"""The unembedding fused with its loss: next-token NLL and KL(ref ‖ θ) from final hidden states (the
`impl="xla_cpu"` loss head, see `core.xla_cpu`; the reference head is `core.losses` on the logits).

`hidden @ embed_out.T` is a step's largest array ([B, T, V] f32: 64 MB at B=32, T=128, V=4096), and autodiff
through it costs several full passes over memory plus f32 matmuls in the backward (the cotangent of an
f32-accumulated bf16 matmul is f32). Here the logits exist only one chunk of positions at a time (a few
MB, so they stay in cache), and the gradient is computed in the *forward* pass: for a scalar objective
Σ w·loss with constant weights w, d/dlogits is known as soon as the softmax is, so each chunk yields its
share of dL/dhidden and dL/dW right away, with `cfg.dtype` (bf16) cotangents and f32 accumulation. The
backward then only scales them by the incoming scalar cotangent. Same model FLOPs as autodiff (three
[N, D] x [D, V] matmuls); the loss value is the same formula as `losses.next_token_nll` /
`losses.kl_per_position`.

The weights are constants (no gradient flows to them), and so are the reference's hidden states and
unembedding: the KL's reference is frozen.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from forgetting.core import attention, losses, matmul

# Positions per chunk are chosen so that one chunk's [rows, V] f32 logits hold about this many elements
# (8 MB): small enough to stay in a CPU's last-level cache, large enough for efficient matmuls.
CHUNK_ELEMENTS = 1 << 21


def chunk_length(batch: int, seq_len: int, vocab: int, budget: int = CHUNK_ELEMENTS) -> int:
    """The largest divisor of `seq_len` whose chunk of `batch` rows keeps batch·chunk·vocab <= budget
    (at least 1)."""
    best = 1
    for c in range(1, seq_len + 1):
        if seq_len % c == 0 and batch * c * vocab <= budget:
            best = c
    return best


def _chunks(a: jax.Array, c: int) -> jax.Array:
    """[B, T, ...] -> [T/c, B, c, ...]: scan over position chunks, keeping the batch axis (and its
    sharding) intact."""
    B, T = a.shape[:2]
    return a.reshape(B, T // c, c, *a.shape[2:]).swapaxes(0, 1)


def _unchunk(a: jax.Array) -> jax.Array:
    n, B, c = a.shape[:3]
    return a.swapaxes(0, 1).reshape(B, n * c, *a.shape[3:])


def _log_softmax_parts(logits_bcv: jax.Array):
    """(exp(logits - max), sum of it, logsumexp) in f32."""
    top = jnp.max(logits_bcv, axis=-1, keepdims=True)
    e_bcv = jnp.exp(logits_bcv - top)
    s_bc1 = jnp.sum(e_bcv, axis=-1, keepdims=True)
    return e_bcv, s_bc1, (top + jnp.log(s_bc1))[..., 0]


def _unembed(h_bcd: jax.Array, w_vd: jax.Array) -> jax.Array:
    return matmul.einsum_f32_acc("bcd,vd->bcv", h_bcd, w_vd, w_vd.dtype)


def _head_grads(dlogits_bcv, h_bcd, w_vd, dw, transposed: bool):
    """dL/dh for the chunk and the running dL/dW ([V, D], or [D, V] if `transposed`), from the chunk's
    dL/dlogits (cast to the matmul dtype)."""
    dl = dlogits_bcv.astype(w_vd.dtype)
    dh_bcd = jnp.einsum("bcv,vd->bcd", dl, w_vd, preferred_element_type=jnp.float32)
    h = h_bcd.astype(w_vd.dtype)
    if not transposed:
        return dh_bcd, dw + jnp.einsum("bcv,bcd->vd", dl, h, preferred_element_type=jnp.float32)
    rows = h_bcd.shape[0] * h_bcd.shape[1]
    h_dn = attention.swap_last(h.reshape(rows, -1))  # a real copy: see attention.swap_last
    return dh_bcd, dw + jnp.einsum("dn,nv->dv", h_dn, dl.reshape(rows, -1), preferred_element_type=jnp.float32)


def _scan_head(loss_chunk, h_btd, w_vd, side_bt, consts, weight_bt, dtype: str, chunk: int, with_grad: bool):
    """Runs `loss_chunk(logits_bcv, side_bc, consts) -> (values_bc, dvalues/dlogits_bcv)` over chunks of
    positions. Returns per-position values [B, T] and, with `with_grad`, d(Σ weight·values)/dhidden and
    /dW. `side_bt` is a pytree of per-position inputs [B, T, ...]; `consts` are whole arrays."""
    w_c = w_vd.astype(dtype)
    # Over several chunks dW is accumulated as [D, V]: its matmul then transposes the small hidden chunk
    # where the [V, D] one transposes the [rows, V] cotangent (about 3% of a benchmark train step). With
    # one chunk XLA-CPU folds the final transpose back into that matmul and cannot run the result.
    transposed = h_btd.shape[1] // chunk > 1

    def body(dw, xs):
        h_bcd, side_bc, weight_bc = xs
        values_bc, dvalues_bcv = loss_chunk(_unembed(h_bcd, w_c), side_bc, consts)
        if not with_grad:
            return dw, (values_bc, None)
        dh_bcd, dw = _head_grads(weight_bc[..., None] * dvalues_bcv, h_bcd, w_c, dw, transposed)
        return dw, (values_bc, dh_bcd)

    xs = (_chunks(h_btd, chunk), jax.tree.map(lambda a: _chunks(a, chunk), side_bt), _chunks(weight_bt, chunk))
    dw0 = jnp.zeros(w_vd.shape[::-1] if transposed else w_vd.shape, jnp.float32)
    dw, (values, dh) = jax.lax.scan(body, dw0, xs)
    dw_vd = attention.swap_last(dw) if transposed else dw
    return _unchunk(values), (None if dh is None else _unchunk(dh)), dw_vd


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7))
def _weighted_sum(loss_chunk, h_btd, w_vd, side_bt, consts, weight_bt, dtype, chunk):
    """Σ weight·values with the gradient computed in the forward pass (weights, side inputs and
    constants get no gradient)."""
    values_bt = _scan_head(loss_chunk, h_btd, w_vd, side_bt, consts, weight_bt, dtype, chunk, False)[0]
    return jnp.sum(weight_bt * values_bt)


def _weighted_sum_fwd(loss_chunk, h_btd, w_vd, side_bt, consts, weight_bt, dtype, chunk):
    values_bt, dh_btd, dw_vd = _scan_head(loss_chunk, h_btd, w_vd, side_bt, consts, weight_bt, dtype, chunk, True)
    return jnp.sum(weight_bt * values_bt), (dh_btd.astype(h_btd.dtype), dw_vd.astype(w_vd.dtype))


def _weighted_sum_bwd(loss_chunk, dtype, chunk, residuals, g):
    dh_btd, dw_vd = residuals
    return g * dh_btd, g * dw_vd, None, None, None


_weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)


def _nll_chunk(logits_bcv, next_bc, consts):
    """NLL of the next tokens and its gradient in the logits: softmax − one-hot."""
    e_bcv, s_bc1, lse_bc = _log_softmax_parts(logits_bcv)
    target_bc = jnp.take_along_axis(logits_bcv, next_bc[..., None], axis=-1)[..., 0]  # no [rows, V] pass
    is_target_bcv = jnp.arange(logits_bcv.shape[-1])[None, None, :] == next_bc[..., None]
    return lse_bc - target_bc, e_bcv / s_bc1 - is_target_bcv.astype(jnp.float32)


def _kl_parts(logits_bcv, lse_bc, ref_h_bcd, ref_w_vd):
    """(KL(p_ref ‖ p_θ) per position, p_ref) from θ's logits and their logsumexp."""
    ref_logits_bcv = _unembed(ref_h_bcd, ref_w_vd)
    ref_e_bcv, ref_s_bc1, ref_lse_bc = _log_softmax_parts(ref_logits_bcv)
    p_ref_bcv = ref_e_bcv / ref_s_bc1
    # Σ p_ref (logp_ref − logp) with logp = logits − lse; entries with p_ref = 0 contribute 0.
    diff_bcv = (ref_logits_bcv - ref_lse_bc[..., None]) - (logits_bcv - lse_bc[..., None])
    return jnp.sum(jnp.where(p_ref_bcv > 0, p_ref_bcv * diff_bcv, 0.0), axis=-1), p_ref_bcv


def _kl_chunk(logits_bcv, ref_h_bcd, ref_w_vd):
    """KL(p_ref ‖ p_θ) and its gradient in the logits: softmax·Σ p_ref − p_ref."""
    e_bcv, s_bc1, lse_bc = _log_softmax_parts(logits_bcv)
    kl_bc, p_ref_bcv = _kl_parts(logits_bcv, lse_bc, ref_h_bcd, ref_w_vd)
    mass_bc1 = jnp.sum(p_ref_bcv, axis=-1, keepdims=True)
    return kl_bc, e_bcv / s_bc1 * mass_bc1 - p_ref_bcv


def next_token_loss(hidden_btd: jax.Array, embed_out_vd: jax.Array, tokens_bt: jax.Array,
                    mask_bt: jax.Array | None = None, dtype: str = "bfloat16",
                    chunk_elements: int = CHUNK_ELEMENTS) -> jax.Array:
    """Mean next-token NLL of `tokens_bt` given final (normed) hidden states [B, T, D] and the output
    embedding [V, D]: equals `losses.next_token_loss(hidden @ embed_out.T, tokens, mask)`.
    `chunk_elements` bounds the logits held at once (see `chunk_length`)."""
    B, T, _ = hidden_btd.shape
    next_bt = losses.next_token_targets(tokens_bt)
    target_mask = jnp.ones((B, T - 1), jnp.float32) if mask_bt is None else mask_bt[:, 1:].astype(jnp.float32)
    target_mask = jax.lax.stop_gradient(target_mask)
    weight_bt = jnp.concatenate([target_mask, jnp.zeros((B, 1), jnp.float32)], axis=1)  # last: no target
    weight_bt = weight_bt / jnp.maximum(jnp.sum(target_mask), 1.0)
    chunk = chunk_length(B, T, embed_out_vd.shape[0], chunk_elements)
    return _weighted_sum(_nll_chunk, hidden_btd, embed_out_vd, next_bt, (), weight_bt, dtype, chunk)


def kl_to_reference(hidden_btd: jax.Array, embed_out_vd: jax.Array, ref_hidden_btd: jax.Array,
                    ref_embed_out_vd: jax.Array, mask_bt: jax.Array | None = None,
                    dtype: str = "bfloat16", chunk_elements: int = CHUNK_ELEMENTS) -> jax.Array:
    """Mean over positions of KL(p_ref ‖ p_θ) from final hidden states: equals
    `losses.kl_to_reference(hidden @ embed_out.T, ref_hidden @ ref_embed_out.T, mask)`. The reference
    side is a constant."""
    B, T, _ = hidden_btd.shape
    mask = jnp.ones((B, T), jnp.float32) if mask_bt is None else mask_bt.astype(jnp.float32)
    weight_bt = jax.lax.stop_gradient(mask / jnp.maximum(jnp.sum(mask), 1.0))
    chunk = chunk_length(B, T, embed_out_vd.shape[0], chunk_elements // 2)  # two [rows, V] logits per chunk
    ref_hidden_btd = jax.lax.stop_gradient(ref_hidden_btd)
    ref_w = jax.lax.stop_gradient(ref_embed_out_vd).astype(dtype)
    return _weighted_sum(_kl_chunk, hidden_btd, embed_out_vd, ref_hidden_btd, ref_w, weight_bt, dtype, chunk)


def nll_per_position(hidden_btd: jax.Array, embed_out_vd: jax.Array, tokens_bt: jax.Array,
                     dtype: str = "bfloat16", chunk_elements: int = CHUNK_ELEMENTS) -> jax.Array:
    """Next-token NLL [B, T-1] (as `losses.next_token_nll` of the logits), without materializing the
    logits. For evaluation: its gradient is plain autodiff through the chunk loop."""
    B, T, _ = hidden_btd.shape
    chunk = chunk_length(B, T, embed_out_vd.shape[0], chunk_elements)
    weight_bt = jnp.ones((B, T), jnp.float32)
    next_bt = losses.next_token_targets(tokens_bt)
    values = _scan_head(_nll_chunk, hidden_btd, embed_out_vd, next_bt, (), weight_bt, dtype, chunk, False)
    return values[0][:, :-1]


def kl_per_position(hidden_btd: jax.Array, embed_out_vd: jax.Array, ref_hidden_btd: jax.Array,
                    ref_embed_out_vd: jax.Array, dtype: str = "bfloat16",
                    chunk_elements: int = CHUNK_ELEMENTS) -> jax.Array:
    """KL(p_ref ‖ p_θ) [B, T] (as `losses.kl_per_position` of the logits), without materializing them.
    For evaluation, like `nll_per_position`."""
    B, T, _ = hidden_btd.shape
    chunk = chunk_length(B, T, embed_out_vd.shape[0], chunk_elements // 2)
    weight_bt = jnp.ones((B, T), jnp.float32)
    return _scan_head(_kl_chunk, hidden_btd, embed_out_vd, ref_hidden_btd, ref_embed_out_vd.astype(dtype),
                      weight_bt, dtype, chunk, False)[0]


def nll_and_kl_per_position(hidden_btd: jax.Array, embed_out_vd: jax.Array, tokens_bt: jax.Array,
                            ref_hidden_btd: jax.Array, ref_embed_out_vd: jax.Array, dtype: str = "bfloat16",
                            chunk_elements: int = CHUNK_ELEMENTS) -> tuple[jax.Array, jax.Array]:
    """(`nll_per_position`, `kl_per_position`) from one pass over θ's logits, each chunk unembedded once.
    For evaluation (no gradient)."""
    B, T, _ = hidden_btd.shape
    chunk = chunk_length(B, T, embed_out_vd.shape[0], chunk_elements // 2)
    w_c, ref_w_c = embed_out_vd.astype(dtype), ref_embed_out_vd.astype(dtype)

    def body(_, xs):
        h_bcd, ref_h_bcd, next_bc = xs
        logits_bcv = _unembed(h_bcd, w_c)
        _, _, lse_bc = _log_softmax_parts(logits_bcv)
        target_bc = jnp.take_along_axis(logits_bcv, next_bc[..., None], axis=-1)[..., 0]
        return None, (lse_bc - target_bc, _kl_parts(logits_bcv, lse_bc, ref_h_bcd, ref_w_c)[0])

    xs = (_chunks(hidden_btd, chunk), _chunks(ref_hidden_btd, chunk), _chunks(losses.next_token_targets(tokens_bt), chunk))
    _, (nll, kl) = jax.lax.scan(body, None, xs)
    return _unchunk(nll)[:, :-1], _unchunk(kl)
