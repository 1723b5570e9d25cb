"""The resolve step: a validated TrainConfig becomes a frozen `Plan`, grouped as data, model, reference,
replay, schedule+optimizer and placement. Everything "auto" is resolved here, once, and recorded
(`--model.dtype auto`: `resolve_dtype`; `--reg.reference_hidden auto`: the replay group's record).

    cfg, dtype_choice = resolve_config(cfg)  # cheap: names the run directory (training.run_dir)
    plan = build(cfg, dtype_choice)          # loads, opens, checks, places: before any training compute

The plan holds no clocks and no counters: what changes while a run trains is the loop's state
(`training.loop.LoopState`)."""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from forgetting.core import data as data_lib
from forgetting.core import families, lora, multihost
from forgetting.core import model as model_lib
from forgetting.core import step as step_lib
from forgetting.training import replay, runs, train_setup
from forgetting.training.train_config import TrainConfig, replace


def resolve_dtype(dtype: str) -> dict:
    """{"dtype", "why"} of a --model.dtype: itself when given, else the machine's choice (`auto_dtype`), the same
    in every process of a multi-process run (process 0's). The one place `auto` becomes a dtype."""
    if dtype != "auto":
        return {"dtype": dtype, "why": "--model.dtype given"}
    from forgetting.training import auto_dtype

    choice = auto_dtype.auto_dtype()
    bf16 = multihost.agree(choice["dtype"] == "bfloat16")
    return {**choice, "dtype": "bfloat16" if bf16 else "float32"}


def resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """(`cfg` with its auto fields resolved, the dtype choice to record in config.json)."""
    choice = resolve_dtype(cfg.model.dtype)
    if cfg.model.dtype == "auto":
        cfg = replace(cfg, **{"model.dtype": choice["dtype"]})
    return cfg, choice


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    config: Any  # a config of any registered family
    trainable: Any  # the parameters trained (or the LoRA adapters), before placement
    use_lora: bool
    init_params: Any  # pretraining: the initialization, the reference of `valid_kl` (as the authors'); placed
    loaded_from: str | None


@dataclasses.dataclass(frozen=True)
class ReferencePlan:
    frozen: dict  # {"ref": p_ref (finetuning) or None, "base": the LoRA base or None}, placed
    init_distance: float | None  # ||p_ref - its initialization|| when known (rel_dist_to_ref)

    @property
    def params(self) -> Any:
        return self.frozen.get("ref")


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
    optimizer: Any
    schedule: Callable[[int], Any]
    total_steps: int | None  # None: the run ends on another criterion (target loss, time, early stop)
    length_criterion: str | None  # the flag that sets total_steps
    warmup_steps: int
    eval_every: int  # steps between evals
    tokens_per_step: int


@dataclasses.dataclass(frozen=True)
class Placement:
    put_batch: Callable[[dict], dict]
    put_state: Callable[[Any], Any]
    state_sharding: Any
    batch_sharding: Any


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run needs, resolved once from its config."""

    cfg: TrainConfig  # resolved: no "auto" dtype
    dtype_choice: dict
    data: train_setup.Datasets
    model: ModelPlan
    reference: ReferencePlan
    replay: replay.ReplaySource | None
    schedule: SchedulePlan
    placement: Placement
    train_step: Callable
    eval_batch_size: int
    resolved: dict  # what config.json records under "resolved"
    input_files: dict  # role (the flag) -> every file the run reads

    # shortcuts for the names callers use most
    @property
    def model_cfg(self) -> Any:
        return self.model.config

    @property
    def frozen(self) -> dict:
        return self.reference.frozen

    @property
    def dataset(self) -> data_lib.SequenceDataset:
        return self.data.train

    @property
    def prev_dataset(self) -> data_lib.SequenceDataset | None:
        return self.data.prev

    @property
    def ref_init_distance(self) -> float | None:
        return self.reference.init_distance

    def initial_state(self) -> step_lib.TrainState:
        return self.placement.put_state(step_lib.init_state(self.model.trainable, self.schedule.optimizer))

    def abstract_state(self) -> step_lib.TrainState:
        """The initial state's shapes, dtypes and shardings with nothing allocated: what a resume restores
        into (a materialized template would hold a second, zeroed optimizer state beside the restored one)."""
        abstract = jax.eval_shape(lambda p: step_lib.init_state(p, self.schedule.optimizer), self.model.trainable)
        if self.placement.state_sharding is None:
            return abstract
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.placement.state_sharding)


def resolve(cfg: TrainConfig) -> Plan:
    """`resolve_config` then `build`."""
    return build(*resolve_config(cfg))


def build(cfg: TrainConfig, dtype_choice: dict) -> Plan:
    """The plan of a resolved config, in order: checkpoint, data, model, schedule, placement, reference,
    replay, train step, record."""
    loaded = train_setup.load_checkpoint(cfg)
    model_cfg, data = train_setup.open_datasets(cfg, loaded)
    model, base = _model(cfg, model_cfg, loaded)
    s = train_setup.schedule_and_length(cfg, model_cfg, data.train)
    opt = train_setup.optimizer_for(cfg.opt, s["schedule"])
    schedule = SchedulePlan(optimizer=opt, **s)
    placement = Placement(*train_setup._placement(cfg, model_cfg, model.trainable, opt, model.use_lora,
                                                  masked=data.train.pad_id is not None))
    model, reference = _placed_reference(cfg, model, base, placement, loaded)
    replay_source, replay_record = train_setup.build_replay(cfg, loaded, data, model_cfg, reference.params,
                                                            schedule.total_steps)
    r = cfg.reg
    # `opt` is optimizer_for(cfg.opt, optim.schedule(peak_lr, warmup, total_steps, lr_decay)): this key fixes it,
    # so a later run of this process with the same program reuses the compiled step
    opt_key = (cfg.opt, schedule.warmup_steps, schedule.total_steps)
    train_step = step_lib.make_train_step(
        model_cfg, opt, reg_method=r.method if r.method != "replace" else "none", reg_coeff=r.coeff,
        use_lora=model.use_lora, state_sharding=placement.state_sharding, batch_sharding=placement.batch_sharding,
        reuse_key=opt_key)
    record = _record(model_cfg, loaded, data, schedule) | replay_record
    return Plan(cfg=cfg, dtype_choice=dtype_choice, data=data, model=model, reference=reference, replay=replay_source,
                schedule=schedule, placement=placement, train_step=train_step,
                eval_batch_size=cfg.eval.batch_size or cfg.opt.batch_size, resolved=record,
                input_files=train_setup.input_files(cfg, loaded, data, replay_source, record))


def _model(cfg: TrainConfig, model_cfg: Any, loaded: runs.LoadedRun | None) -> tuple[ModelPlan, Any]:
    """(the model group before placement, the full parameters: loaded, or initialized from --run.seed)."""
    key = jax.random.key(cfg.run.seed)
    params = loaded.params if loaded is not None else families.init(model_cfg, key)
    params = jax.tree.map(jnp.asarray, params)
    use_lora = cfg.model.lora_rank > 0
    if use_lora and cfg.model.lora_rank > lora.max_rank(model_cfg, params):
        raise ValueError(f"--model.lora_rank {cfg.model.lora_rank} exceeds min(d_in, d_out) = "
                         f"{lora.max_rank(model_cfg, params)} of the loaded model's matrices; a larger rank adds "
                         "cost, not capacity: lower it")
    trainable = lora.init(model_cfg, params, cfg.model.lora_rank, jax.random.fold_in(key, 1)) if use_lora else params
    model = ModelPlan(model_cfg, trainable, use_lora, init_params=params if loaded is None else None,
                      loaded_from=str(loaded.path) if loaded else None)
    return model, params


def _placed_reference(cfg: TrainConfig, model: ModelPlan, params: Any, placement: Placement,
                      loaded: runs.LoadedRun | None) -> tuple[ModelPlan, ReferencePlan]:
    """The frozen trees (p_ref: the loaded model; the LoRA base) and the initialization, on the mesh."""
    frozen = {"ref": params if loaded is not None else None, "base": params if model.use_lora else None}
    init_params = model.init_params
    placed = placement.put_batch is not train_setup._identity
    if placed:
        frozen = {k: (None if v is None else placement.put_state.params_like(v)) for k, v in frozen.items()}
        init_params = None if init_params is None else placement.put_state.params_like(init_params)
    init_distance = None
    if (loaded is not None and not (loaded.path / "weights.npz").exists()
            and (loaded.path / runs.CONFIG_FILE).exists()):  # a run of this project: its init is known
        loaded_config = json.loads((loaded.path / runs.CONFIG_FILE).read_text()).get("config", {})  # (a HF one has none)
        if loaded_config.get("model", {}).get("load_path") == "":  # trained from scratch here
            init_params = families.init(model.config, jax.random.key(int(loaded_config["run"]["seed"])))
            if placed:  # beside the placed (in a multi-process run: global) loaded params
                init_params = placement.put_state.params_like(init_params)
            init_distance = float(optax.tree.norm(jax.tree.map(jnp.subtract, loaded.params, init_params)))
    return dataclasses.replace(model, init_params=init_params), ReferencePlan(frozen, init_distance)


def _record(model_cfg: Any, loaded: runs.LoadedRun | None, data: train_setup.Datasets,
            schedule: SchedulePlan) -> dict:
    """What config.json records as resolved (other runs and stages read `model`, `lineage_ids`)."""
    lineage = tuple(dict.fromkeys((*(loaded.lineage_ids if loaded else ()), data.train.token_file.dataset_id)))
    return {"model": runs.model_to_dict(model_cfg), "lineage_ids": list(lineage),
            "dataset_id": data.train.token_file.dataset_id,
            "tokenizer_sha256": data.train.token_file.meta.get("tokenizer_sha256"),
            "total_steps": schedule.total_steps, "warmup_steps": schedule.warmup_steps,
            "eval_every": schedule.eval_every, "param_count": families.param_count(model_cfg),
            "paper_param_count": model_lib.paper_param_count(model_cfg),
            "loaded_from": str(loaded.path) if loaded else None}


def announce(dtype_choice: dict) -> None:
    """Says on stderr what --model.dtype auto came to (process 0)."""
    if dtype_choice.get("why") != "--model.dtype given" and multihost.is_writer():
        print(f"--model.dtype {dtype_choice['why']}", file=sys.stderr)
