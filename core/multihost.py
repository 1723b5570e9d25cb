"""Multi-process helpers: who writes, barriers, and agreeing on one process's decision.

In a `jax.distributed` run every process runs the same program on the same global batches and computes
identical metrics; only process 0 (`is_writer()`) writes files that must exist once (metrics rows,
config, done marker, wandb, the final stdout JSON). Everything here is a no-op in a single process, so
callers need no `if multi-process` branches.
"""
from __future__ import annotations

import jax
import numpy as np


def is_writer() -> bool:
    """True on the one process that writes shared files (process 0; the only process when not distributed)."""
    return jax.process_index() == 0


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Blocks until every process has reached the barrier called `name` (a no-op on one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: bool) -> bool:
    """Process 0's `value` on every process, for decisions that depend on per-process clocks (stop after a
    time budget): processes that decided differently would wait on each other's collectives forever."""
    if not is_multiprocess():
        return value
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def agree_max(value: int) -> int:
    """The largest `value` over all processes, on every process: an OR of per-process flags (a stop signal
    that reached only some processes), so all of them take the same decision at the same step."""
    if not is_multiprocess():
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def shared_token() -> str:
    """A random hex token, the same on every process (process 0 draws it): names one save attempt."""
    token = np.frombuffer(np.random.default_rng().bytes(8), np.uint32)
    if is_multiprocess():
        from jax.experimental import multihost_utils

        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    return "".join(f"{int(t):08x}" for t in token)
