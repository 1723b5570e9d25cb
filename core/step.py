"""Jitted train and eval steps.

The train objective is `NTP(θ; new batch) + coeff · R(θ)` (see `losses.regularizer`). Gradients flow only
through θ: the frozen reference and a LoRA base enter as constants. The state buffers are donated, and
every metric comes back as an array (no Python floats inside the step, so no host sync per step).

Batches are dicts: `tokens` int32 [B, T] (new data), optional `mask` [B, T] (which target tokens count),
and, for `ntp_pre`/`kl_pre`, `replay` int32 [R, T]; for `kl_pre` optionally `replay_ref_hidden` f32
[R, T, D], the reference's final hidden states on the replay rows when they are known already (the
sampler that drew the rows computed them), instead of a forward of the reference inside the step.
`frozen` holds `ref` (the reference parameters, for KL terms) and `base` (the frozen base weights when
training LoRA adapters); absent ones are None.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Hashable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from forgetting.core import backend, families, losses, lru, xla_cpu
from forgetting.core import lora as lora_lib

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


class _Head:
    """The loss head of a config's family and kernels (`backend.Kernels.head`: on xla_cpu the chunked fused
    head, `core.fused_head`, no [B, T, V] logits; on reference `core.losses` on the logits). `streams` None
    means the config's (`backend.Kernels.streams`)."""

    def __init__(self, cfg: Any, streams: int | None):
        self.cfg, self.family = cfg, families.of(cfg)
        self.kernels = backend.kernels_for(cfg)
        self.streams = streams

    def hidden(self, params, tokens_bt):
        streams = self.kernels.streams(tokens_bt.shape[0]) if self.streams is None else self.streams
        return xla_cpu.in_streams(lambda t: self.family.final_hidden(self.cfg, params, t), tokens_bt, streams)

    def _w(self, params):
        return self.family.output_embedding(self.cfg, params)

    def next_token_loss(self, params, hidden_btd, tokens_bt, mask_bt):
        return self.kernels.head.next_token_loss(hidden_btd, self._w(params), tokens_bt, mask_bt, self.cfg.dtype,
                                                 self.kernels.loss_chunk)

    def kl_to_reference(self, params, hidden_btd, ref, ref_hidden_btd):
        return self.kernels.head.kl_to_reference(hidden_btd, self._w(params), ref_hidden_btd, self._w(ref), None,
                                                 self.cfg.dtype, self.kernels.loss_chunk)

    def nll_per_position(self, params, hidden_btd, tokens_bt):
        return self.kernels.head.nll_per_position(hidden_btd, self._w(params), tokens_bt, self.cfg.dtype,
                                                  self.kernels.loss_chunk)

    def nll_and_kl_per_position(self, params, hidden_btd, tokens_bt, ref, ref_hidden_btd):
        return self.kernels.head.nll_and_kl_per_position(hidden_btd, self._w(params), tokens_bt, ref_hidden_btd,
                                                         self._w(ref), self.cfg.dtype, self.kernels.loss_chunk)

    def kl_per_position(self, params, hidden_btd, ref, ref_hidden_btd):
        return self.kernels.head.kl_per_position(hidden_btd, self._w(params), ref_hidden_btd, self._w(ref),
                                                 self.cfg.dtype, self.kernels.loss_chunk)


def make_loss_fn(cfg: Any, *, reg_method: str = "none", reg_coeff: float = 0.0,
                 use_lora: bool = False, streams: int | None = None) -> Callable:
    """loss(trainable, frozen, batch) -> (objective, metrics), for a config of any registered family.
    `streams`: see `xla_cpu.in_streams` (None: the config's `numerics.streams`, 0 there = backend default)."""
    if reg_method not in losses.REGULARIZERS:
        raise ValueError(f"unknown regularizer {reg_method!r}; choose one of {losses.REGULARIZERS}")
    head = _Head(cfg, streams)

    def loss_fn(trainable, frozen: dict, batch: Batch):
        params = lora_lib.merge(cfg, jax.lax.stop_gradient(frozen["base"]), trainable) if use_lora else trainable
        tokens = batch["tokens"]
        replay = batch.get("replay") if reg_method in ("ntp_pre", "kl_pre") else None
        # One forward over new and replay rows together: bigger matmuls, one weight pass.
        rows = tokens if replay is None else jnp.concatenate([tokens, replay], axis=0)
        B = tokens.shape[0]
        hidden = head.hidden(params, rows)
        hidden_new, hidden_replay = hidden[:B], hidden[B:]
        ntp = head.next_token_loss(params, hidden_new, tokens, batch.get("mask"))
        if reg_method == "none":
            reg = jnp.zeros((), jnp.float32)
        elif reg_method == "ntp_pre":
            reg = head.next_token_loss(params, hidden_replay, replay, None)
        elif reg_method in ("kl_pre", "kl_dwn"):
            ref = jax.lax.stop_gradient(frozen["ref"])
            on, h = (replay, hidden_replay) if reg_method == "kl_pre" else (tokens, hidden_new)
            ref_hidden = batch.get("replay_ref_hidden") if reg_method == "kl_pre" else None
            if ref_hidden is None:
                ref_hidden = head.hidden(ref, on)
            reg = head.kl_to_reference(params, h, ref, jax.lax.stop_gradient(ref_hidden))
        else:
            raise ValueError(f"regularizer {reg_method!r} has no train-step term")
        objective = ntp + reg_coeff * reg
        return objective, {"loss": objective, "ntp": ntp, "reg": reg}

    return loss_fn


# Jitted steps kept for reuse within the process: a later run of the same program (another seed, another
# run of a sweep at the same shapes) then neither traces nor lowers it again, nor reads the persistent
# compilation cache. Bounded: the least recently used program is dropped first.
REUSED_STEPS = 32
_reused: collections.OrderedDict = collections.OrderedDict()


def _reuse(key: Hashable | None, build: Callable[[], Callable]) -> Callable:
    """`build()`, or the function an earlier call with an equal `key` built (None or unhashable: no reuse)."""
    try:
        hash(key)
    except TypeError:
        key = None
    return build() if key is None else lru.get_or_compute(_reused, key, build, REUSED_STEPS)


def clear_reused_steps() -> None:
    """Forgets every kept step (tests that count traces or compiles)."""
    _reused.clear()


def make_train_step(cfg: Any, opt: optax.GradientTransformation, *, reg_method: str = "none",
                    reg_coeff: float = 0.0, use_lora: bool = False, donate: bool = True,
                    state_sharding: Any = None, batch_sharding: Any = None, streams: int | None = None,
                    reuse_key: Hashable | None = None) -> Callable:
    """step(state, batch, frozen) -> (state, metrics), jitted with the state donated.

    `state_sharding`/`batch_sharding` (pytrees of `jax.sharding.Sharding`, see `core.sharding`) pin the
    placement of the state across steps, e.g. for FSDP; without them placement follows the inputs.
    `streams`: see `make_loss_fn`.

    `reuse_key`: a hashable value that determines `opt` (its kind, hyperparameters and schedule); with it,
    and without shardings (one device), the step is one compiled program per key and other arguments, kept
    for the rest of the process, with the coefficient an input of it rather than a constant: a later run
    with an equal key (another seed, another coefficient of a sweep) neither traces nor compiles.
    """
    if reuse_key is not None and state_sharding is None and batch_sharding is None:
        key = ("train", reuse_key, cfg, reg_method, use_lora, donate, streams)
        program = _reuse(key, lambda: _jit_step(cfg, opt, reg_method, None, use_lora, donate, None, None, streams))
        coeff = jnp.asarray(reg_coeff, jnp.float32)
        return functools.partial(program, reg_coeff=coeff)
    return _jit_step(cfg, opt, reg_method, reg_coeff, use_lora, donate, state_sharding, batch_sharding, streams)


def _jit_step(cfg: Any, opt: optax.GradientTransformation, reg_method: str, reg_coeff: float | None,
              use_lora: bool, donate: bool, state_sharding: Any, batch_sharding: Any, streams: int | None) -> Callable:
    """The jitted step: `reg_coeff` a constant of the program (the default of its `reg_coeff` argument, which
    jit does not trace), or None for a program that takes it as a keyword input."""
    make_loss_fn(cfg, reg_method=reg_method, use_lora=use_lora, streams=streams)  # checks reg_method now

    def step(state: TrainState, batch: Batch, frozen: dict, reg_coeff=reg_coeff):
        loss_fn = make_loss_fn(cfg, reg_method=reg_method, reg_coeff=reg_coeff, use_lora=use_lora, streams=streams)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, frozen, batch)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates))
        return TrainState(params, opt_state, state.step + 1), metrics

    jit_kwargs: dict = {"donate_argnums": (0,) if donate else ()}
    if state_sharding is not None:
        jit_kwargs["in_shardings"] = (state_sharding, batch_sharding, None)
        jit_kwargs["out_shardings"] = (state_sharding, None)
    return jax.jit(step, **jit_kwargs)


def make_eval_step(cfg: Any) -> Callable:
    """eval(params, tokens [B, T], ref_params or None, mask [B, T] or None, ref_hidden or None) -> sums
    for exact averaging.

    Returns `ntp_sum`/`ntp_count` over all predicted positions, `ntp_h2_sum`/`ntp_h2_count` over the
    second half (targets at index >= T//2), and `kl_sum`/`kl_count` of KL(ref ‖ θ) at every position
    (zero when no reference is given). A mask (1 = the token counts, e.g. not padding of packed data)
    drops target positions from the NTP sums and positions from the KL sums. `ref_hidden` [B, T, D], the
    reference's final hidden states of these tokens (`make_hidden_fn`), saves its forward pass: a
    frozen reference on a fixed validation split gives the same ones at every eval.

    Kept for reuse: a later call with an equal config returns the same jitted function.
    """
    return _reuse(("eval", cfg), lambda: _build_eval_step(cfg))


def _build_eval_step(cfg: Any) -> Callable:
    head = _Head(cfg, None)

    def eval_step(params, tokens_bt: jax.Array, ref_params=None, mask_bt: jax.Array | None = None,
                  ref_hidden_btd: jax.Array | None = None):
        hidden = head.hidden(params, tokens_bt)
        kl = None
        if ref_params is None:
            nll = head.nll_per_position(params, hidden, tokens_bt)  # [B, T-1], column j predicts token j+1
        else:  # one pass over θ's logits for both
            ref_hidden = head.hidden(ref_params, tokens_bt) if ref_hidden_btd is None else ref_hidden_btd
            nll, kl = head.nll_and_kl_per_position(params, hidden, tokens_bt, ref_params, ref_hidden)
        T = tokens_bt.shape[1]
        target_mask = jnp.ones_like(nll) if mask_bt is None else mask_bt[:, 1:].astype(jnp.float32)
        second_half = (jnp.arange(1, T) >= T // 2).astype(jnp.float32)[None, :] * target_mask
        out = {
            "ntp_sum": jnp.sum(nll * target_mask), "ntp_count": jnp.sum(target_mask),
            "ntp_h2_sum": jnp.sum(nll * second_half), "ntp_h2_count": jnp.sum(second_half),
        }
        if kl is None:
            out["kl_sum"], out["kl_count"] = jnp.zeros(()), jnp.zeros(())
        else:
            position_mask = jnp.ones_like(kl) if mask_bt is None else mask_bt.astype(jnp.float32)
            out["kl_sum"], out["kl_count"] = jnp.sum(kl * position_mask), jnp.sum(position_mask)
        return out

    return jax.jit(eval_step)


def make_hidden_fn(cfg: Any) -> Callable:
    """hidden(params, tokens [B, T]) -> the final hidden states f32 [B, T, D] the loss heads start from,
    exactly as `make_eval_step` computes them (the eval step's `ref_hidden`). Kept for reuse, as the eval step."""
    return _reuse(("hidden", cfg), lambda: jax.jit(_Head(cfg, None).hidden))
