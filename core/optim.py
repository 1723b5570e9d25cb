"""Optimizers and learning-rate schedules (optax): AdamW or SGD, warm-up then constant or cosine."""
from __future__ import annotations

import optax


def schedule(peak_lr: float, warmup_steps: int, total_steps: int | None = None,
             decay: str = "none") -> optax.Schedule:
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then constant or cosine to 0."""
    warmup_steps = max(int(warmup_steps), 0)
    warm = optax.linear_schedule(0.0, peak_lr, warmup_steps) if warmup_steps else None
    if decay == "none":
        after = optax.constant_schedule(peak_lr)
    elif decay == "cosine":
        if total_steps is None:
            raise ValueError("a cosine schedule needs a fixed run length (total_steps)")
        after = optax.cosine_decay_schedule(peak_lr, max(int(total_steps) - warmup_steps, 1))
    else:
        raise ValueError(f"lr decay must be 'none' or 'cosine', got {decay!r}")
    if warm is None:
        return after
    return optax.join_schedules([warm, after], [warmup_steps])


def optimizer(name: str, lr: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999,
              weight_decay: float | None = None, momentum: float = 0.0) -> optax.GradientTransformation:
    """AdamW (the paper's default: β 0.9/0.999, weight decay 0.02, no clipping) or SGD (plain by default,
    as the authors': no momentum, no weight decay). `weight_decay` None means each one's default."""
    if name == "adamw":
        return optax.adamw(lr, b1=b1, b2=b2, weight_decay=0.02 if weight_decay is None else weight_decay)
    if name == "sgd":
        weight_decay = weight_decay or 0.0
        sgd = optax.sgd(lr, momentum=momentum or None)
        return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")
