"""Device meshes and parameter placements: data parallel, FSDP and tensor parallel.

A mesh has two named axes, ("data", "model"). Placements derive from the logical axes of the abstract
parameter tree (`families.param_specs(cfg)[name].logical_axes`: "vocab", "embed", "layers", "heads",
"head_dim", "mlp", None), through these rules:

- "dp": every parameter replicated; the batch is split over "data".
- "fsdp": each parameter sharded over "data" along its largest axis among vocab/embed/mlp/heads whose
  size divides the "data" axis (never "layers", which `lax.scan` walks); the batch is split over "data".
  XLA all-gathers weights where a matmul needs them and reduce-scatters their gradients.
- "tp": Megatron-style tensor parallel over "model": attention heads, the MLP hidden axis and the
  vocabulary are split over "model" (qkv/out by head, up/down by hidden unit, embeddings by vocab row);
  the batch is split over "data".
- "fsdp_tp": both: "tp" over "model", then "fsdp" over "data" on another axis.

An axis is sharded only if its size divides the mesh axis size; otherwise it stays replicated (a
parameter with no divisible axis is simply replicated). The mesh uses `AxisType.Auto` axes (JAX 0.10
defaults `jax.make_mesh` to Explicit), so `jit` with `NamedSharding` in/out shardings partitions the
computation automatically (GSPMD); see `core.step.make_train_step(state_sharding=..., batch_sharding=...)`.

Multi-host: call `initialize_distributed(...)` once per process before anything else touches JAX
devices, then `make_mesh(data=jax.device_count() // model, model=model)` spans every host's devices;
each process feeds its own slice of the global batch (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from forgetting.core import families

DATA, MODEL = "data", "model"
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")
FSDP_AXES = ("vocab", "embed", "mlp", "heads")  # logical axes FSDP may split over "data"
TP_AXES = ("heads", "mlp", "vocab")  # logical axes tensor parallelism splits over "model"


def make_mesh(data: int, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh of `data * model` devices with Auto axis types.

    `devices` defaults to the first `data * model` of `jax.devices()` (all hosts' devices when
    `jax.distributed` is initialized)."""
    if data < 1 or model < 1:
        raise ValueError(f"mesh axes must be positive, got data={data}, model={model}")
    n = data * model
    if devices is None:
        available = jax.devices()
        if len(available) < n:
            raise ValueError(
                f"a ({data}, {model}) mesh needs {n} devices but only {len(available)} are visible; on CPU, "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing JAX")
        devices = available[:n]
    devices = list(devices)
    if len(devices) != n:
        raise ValueError(f"a ({data}, {model}) mesh needs exactly {n} devices, got {len(devices)}")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def partition_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                   strategy: str) -> P:
    """The PartitionSpec of one parameter under `strategy` (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of {STRATEGIES}")
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    spec: list[str | None] = [None] * len(shape)
    data_size, model_size = mesh.shape[DATA], mesh.shape[MODEL]
    if strategy in ("tp", "fsdp_tp") and model_size > 1:
        for wanted in TP_AXES:  # first matching logical axis in priority order
            hits = [i for i, a in enumerate(logical_axes) if a == wanted and shape[i] % model_size == 0]
            if hits:
                spec[hits[0]] = MODEL
                break
    if strategy in ("fsdp", "fsdp_tp") and data_size > 1:
        candidates = [i for i, a in enumerate(logical_axes)
                      if a in FSDP_AXES and spec[i] is None and shape[i] % data_size == 0]
        if candidates:
            best = max(candidates, key=lambda i: (shape[i], -i))  # largest; first on ties
            spec[best] = DATA
    return P(*spec)


def param_shardings(cfg: Any, mesh: Mesh, strategy: str) -> dict[str, NamedSharding]:
    """NamedSharding per parameter name, from the config's abstract parameter tree."""
    return {name: NamedSharding(mesh, partition_spec(s.shape, s.logical_axes, mesh, strategy))
            for name, s in families.param_specs(cfg).items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the leading axis) split over "data", replicated over "model". Used as a pytree prefix for a
    whole batch dict; the batch size must be a multiple of the data axis size."""
    return NamedSharding(mesh, P(DATA))


def state_shardings(state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a `step.TrainState` (or any tree holding the params and an optax state).

    `state.params` gets `params_shardings`; inside the optimizer state, every sub-tree with the params'
    tree structure (Adam's mu/nu, momentum traces, ...) gets the same shardings; any other leaf whose
    shape equals a parameter's shape (with a unique sharding) takes that parameter's sharding; everything
    else (step counters, scalars) is replicated. `state` may hold arrays or `jax.ShapeDtypeStruct`s.
    """
    params = state.params
    params_def = jax.tree.structure(params)
    rep = replicated(mesh)
    by_shape: dict[tuple, Any] = {}
    for leaf, sh in zip(jax.tree.leaves(params), jax.tree.leaves(params_shardings)):
        key = tuple(leaf.shape)
        by_shape[key] = sh if by_shape.get(key, sh) == sh else None  # None: ambiguous shape

    def is_params_like(x: Any) -> bool:
        try:
            return jax.tree.structure(x) == params_def and _same_shapes(x, params)
        except Exception:  # noqa: BLE001 - odd nodes are simply not params-like
            return False

    def place(x: Any) -> Any:
        if is_params_like(x):
            return params_shardings
        return jax.tree.map(lambda leaf: by_shape.get(tuple(np.shape(leaf))) or rep, x)

    opt_sh = jax.tree.map(place, state.opt_state, is_leaf=is_params_like)
    rest = {f: jax.tree.map(lambda _: rep, getattr(state, f)) for f in state._fields
            if f not in ("params", "opt_state")}
    return type(state)(**{"params": params_shardings, "opt_state": opt_sh, **rest})


def _same_shapes(a: Any, b: Any) -> bool:
    return all(np.shape(x) == np.shape(y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def shard(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` of `tree` onto `shardings` (a matching tree, or one Sharding for every leaf)."""
    return jax.device_put(tree, shardings)


def describe(tree: Any) -> dict[str, str]:
    """Key path -> partition spec string, for logs."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sh = getattr(leaf, "sharding", None)
        out[jax.tree_util.keystr(path)] = str(getattr(sh, "spec", sh))
    return out


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Multi-host setup: wraps `jax.distributed.initialize`; call once per process, before any other
    JAX call that touches devices. Returns True if it initialized a multi-process run.

    Arguments fall back to the environment variables `FORGETTING_COORDINATOR` ("host:port" of process
    0), `FORGETTING_NUM_PROCESSES` and `FORGETTING_PROCESS_ID`. When none is given anywhere, JAX's own
    cluster auto-detection runs if a known cluster is detected (Slurm `SLURM_*` with `srun`, Open MPI,
    TPU pods, Kubernetes); with no cluster either, this is a no-op single-process run. Example for two
    hosts::

        # host 0                                         # host 1
        FORGETTING_COORDINATOR=10.0.0.1:1234 \\            FORGETTING_COORDINATOR=10.0.0.1:1234 \\
        FORGETTING_NUM_PROCESSES=2 FORGETTING_PROCESS_ID=0   FORGETTING_NUM_PROCESSES=2 FORGETTING_PROCESS_ID=1
        python -m forgetting.stages.train ...              python -m forgetting.stages.train ...
    """
    env = os.environ
    coordinator = coordinator or env.get("FORGETTING_COORDINATOR")
    if num_processes is None and env.get("FORGETTING_NUM_PROCESSES"):
        num_processes = int(env["FORGETTING_NUM_PROCESSES"])
    if process_id is None and env.get("FORGETTING_PROCESS_ID"):
        process_id = int(env["FORGETTING_PROCESS_ID"])
    if coordinator is None and num_processes is None and process_id is None:
        if not _cluster_detected():
            return False
        jax.distributed.initialize()
        return True
    if num_processes == 1 and coordinator is None:
        return False
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True


def _cluster_detected() -> bool:
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return False


def data_parallel_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA])


def num_devices(mesh: Mesh) -> int:
    return math.prod(mesh.devices.shape)
