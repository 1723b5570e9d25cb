"""Jitted train and eval steps.

The train objective is `NTP(θ; new batch) + coeff · R(θ)` (see `losses.regularizer`). Gradients flow only
through θ: the frozen reference and a LoRA base enter as constants. The state buffers are donated, and
every metric comes back as an array (no Python floats inside the step, so no host sync per step).

Batches are dicts: `tokens` int32 [B, T] (new data), optional `mask` [B, T] (which target tokens count),
and, for `ntp_pre`/`kl_pre`, `replay` int32 [R, T]. `frozen` holds `ref` (the reference parameters, for
KL terms) and `base` (the frozen base weights when training LoRA adapters); absent ones are None.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from forgetting.core import lora as lora_lib
from forgetting.core import fused_head, losses, model

Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
    params: Any  # the trainable tree: model parameters, or LoRA adapters
    opt_state: Any
    step: jax.Array


def init_state(trainable: Any, opt: optax.GradientTransformation) -> TrainState:
    """A fresh state holding a *copy* of `trainable`: the step donates its state, and the caller's tree
    (often also the frozen reference) must stay valid."""
    trainable = jax.tree.map(jnp.array, trainable)
    return TrainState(trainable, opt.init(trainable), jnp.zeros((), jnp.int32))


def global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_loss_fn(cfg: Any, *, reg_method: str = "none", reg_coeff: float = 0.0,
                 use_lora: bool = False, streams: int | None = None) -> Callable:
    """loss(trainable, frozen, batch) -> (objective, metrics). `streams`: see `model.final_hidden`
    (None: `model.auto_streams` of the forward's batch)."""
    if reg_method not in losses.REGULARIZERS:
        raise ValueError(f"unknown regularizer {reg_method!r}; choose one of {losses.REGULARIZERS}")

    def loss_fn(trainable, frozen: dict, batch: Batch):
        params = lora_lib.merge(cfg, jax.lax.stop_gradient(frozen["base"]), trainable) if use_lora else trainable
        tokens = batch["tokens"]
        replay = batch.get("replay") if reg_method in ("ntp_pre", "kl_pre") else None
        # One forward over new and replay rows together: bigger matmuls, one weight pass.
        rows = tokens if replay is None else jnp.concatenate([tokens, replay], axis=0)
        if isinstance(cfg, model.ModelConfig):
            ntp, reg = _fused_terms(cfg, params, frozen, rows, tokens, replay, batch.get("mask"))
        else:
            ntp, reg = _logit_terms(cfg, params, frozen, rows, tokens, replay, batch.get("mask"))
        objective = ntp + reg_coeff * reg
        return objective, {"loss": objective, "ntp": ntp, "reg": reg}

    def _streams(rows: int) -> int:
        return model.auto_streams(rows) if streams is None else streams

    def _fused_terms(cfg, params, frozen, rows, tokens, replay, mask):
        """The paper's transformer: losses straight from the final hidden states (`core.fused_head`),
        so the [B, T, V] logits never exist whole."""
        B = tokens.shape[0]
        hidden = model.final_hidden(cfg, params, rows, streams=_streams(rows.shape[0]))
        hidden_new, hidden_replay = hidden[:B], hidden[B:]
        w = params["embed_out"]
        ntp = fused_head.next_token_loss(hidden_new, w, tokens, mask, cfg.dtype)
        if reg_method == "none":
            return ntp, jnp.zeros((), jnp.float32)
        if reg_method == "ntp_pre":
            return ntp, fused_head.next_token_loss(hidden_replay, w, replay, None, cfg.dtype)
        ref = frozen["ref"]
        on, h = (replay, hidden_replay) if reg_method == "kl_pre" else (tokens, hidden_new)
        ref_hidden = jax.lax.stop_gradient(model.final_hidden(cfg, ref, on, streams=_streams(on.shape[0])))
        return ntp, fused_head.kl_to_reference(h, w, ref_hidden, ref["embed_out"], None, cfg.dtype)

    def _logit_terms(cfg, params, frozen, rows, tokens, replay, mask):
        """Any other model family: losses on full logits from `model.forward`."""
        B = tokens.shape[0]
        logits = model.forward(cfg, params, rows)
        logits_new, logits_replay = logits[:B], (logits[B:] if replay is not None else None)
        ntp = losses.next_token_loss(logits_new, tokens, mask)
        ref_new = ref_replay = None
        if reg_method == "kl_pre":
            ref_replay = jax.lax.stop_gradient(model.forward(cfg, frozen["ref"], replay))
        elif reg_method == "kl_dwn":
            ref_new = jax.lax.stop_gradient(model.forward(cfg, frozen["ref"], tokens))
        reg = losses.regularizer(reg_method, logits_new=logits_new, ref_logits_new=ref_new,
                                 logits_replay=logits_replay, ref_logits_replay=ref_replay,
                                 replay_tokens=replay)
        return ntp, reg

    return loss_fn


def make_train_step(cfg: Any, opt: optax.GradientTransformation, *, reg_method: str = "none",
                    reg_coeff: float = 0.0, use_lora: bool = False, donate: bool = True,
                    state_sharding: Any = None, batch_sharding: Any = None, streams: int | None = None) -> Callable:
    """step(state, batch, frozen) -> (state, metrics), jitted with the state donated.

    `state_sharding`/`batch_sharding` (pytrees of `jax.sharding.Sharding`, see `core.sharding`) pin the
    placement of the state across steps, e.g. for FSDP; without them placement follows the inputs.
    `streams`: see `model.final_hidden` (None: automatic).
    """
    loss_fn = make_loss_fn(cfg, reg_method=reg_method, reg_coeff=reg_coeff, use_lora=use_lora, streams=streams)
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch, frozen: dict):
        grads, metrics = grad_fn(state.params, frozen, batch)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=global_norm(grads), update_norm=global_norm(updates))
        return TrainState(params, opt_state, state.step + 1), metrics

    jit_kwargs: dict = {"donate_argnums": (0,) if donate else ()}
    if state_sharding is not None:
        jit_kwargs["in_shardings"] = (state_sharding, batch_sharding, None)
        jit_kwargs["out_shardings"] = (state_sharding, None)
    return jax.jit(step, **jit_kwargs)


def make_eval_step(cfg: Any) -> Callable:
    """eval(params, tokens [B, T], ref_params or None, mask [B, T] or None) -> sums for exact averaging.

    Returns `ntp_sum`/`ntp_count` over all predicted positions, `ntp_h2_sum`/`ntp_h2_count` over the
    second half (targets at index >= T//2), and `kl_sum`/`kl_count` of KL(ref ‖ θ) at every position
    (zero when no reference is given). A mask (1 = the token counts, e.g. not padding of packed data)
    drops target positions from the NTP sums and positions from the KL sums.
    """

    def eval_step(params, tokens_bt: jax.Array, ref_params=None, mask_bt: jax.Array | None = None):
        fused = isinstance(cfg, model.ModelConfig)  # the paper's model: no [B, T, V] logits
        streams = model.auto_streams(tokens_bt.shape[0])
        if fused:
            hidden = model.final_hidden(cfg, params, tokens_bt, streams=streams)
            nll = fused_head.nll_per_position(hidden, params["embed_out"], tokens_bt, cfg.dtype)
        else:
            logits = model.forward(cfg, params, tokens_bt)
            nll = losses.next_token_nll(logits, tokens_bt)
        # nll: [B, T-1], column j predicts token j+1
        T = tokens_bt.shape[1]
        target_mask = jnp.ones_like(nll) if mask_bt is None else mask_bt[:, 1:].astype(jnp.float32)
        second_half = (jnp.arange(1, T) >= T // 2).astype(jnp.float32)[None, :] * target_mask
        out = {
            "ntp_sum": jnp.sum(nll * target_mask), "ntp_count": jnp.sum(target_mask),
            "ntp_h2_sum": jnp.sum(nll * second_half), "ntp_h2_count": jnp.sum(second_half),
        }
        if ref_params is None:
            out["kl_sum"], out["kl_count"] = jnp.zeros(()), jnp.zeros(())
        else:
            if fused:
                kl = fused_head.kl_per_position(hidden, params["embed_out"],
                                                model.final_hidden(cfg, ref_params, tokens_bt, streams=streams),
                                                ref_params["embed_out"], cfg.dtype)
            else:
                kl = losses.kl_per_position(logits, model.forward(cfg, ref_params, tokens_bt))
            position_mask = jnp.ones_like(kl) if mask_bt is None else mask_bt.astype(jnp.float32)
            out["kl_sum"], out["kl_count"] = jnp.sum(kl * position_mask), jnp.sum(position_mask)
        return out

    return jax.jit(eval_step)
