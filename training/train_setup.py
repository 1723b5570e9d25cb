"""The building blocks of a run's plan (`training.plan.resolve` calls them in order): opening and checking
the datasets, the model config of the flags or the checkpoint, the replay source, the optimizer and the
placement on devices. All validation that needs files happens here, before any training compute."""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Callable

import jax

from forgetting.core import data as data_lib
from forgetting.core import families, optim, sharding
from forgetting.core import model as model_lib
from forgetting.core import sharded_checkpoint
from forgetting.core import step as step_lib
from forgetting.training import prompts, replay, replay_cache, runs
from forgetting.training.train_config import TrainConfig


def build_setup(cfg: TrainConfig) -> Any:
    """The run's plan (`training.plan.Plan`) of `cfg`: kept under its old name for callers and tests."""
    from forgetting.training import plan

    return plan.resolve(cfg)


def _open_dataset(path: str, vocab_size: int, seq_len: int, num_tokens_valid: int, split_seed: int,
                  what: str, dataset_id: int | None = None) -> data_lib.SequenceDataset:
    try:
        token_file = data_lib.TokenFile(path, vocab_size=vocab_size, dataset_id=dataset_id)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what}: {e}") from None
    return data_lib.SequenceDataset(token_file, seq_len, num_tokens_valid=num_tokens_valid, split_seed=split_seed)


def _model_config(cfg: TrainConfig, loaded: runs.LoadedRun | None, data_vocab: int) -> Any:
    if loaded is not None:
        if data_vocab and data_vocab != loaded.model_cfg.vocab_size:
            raise ValueError(f"the checkpoint {loaded.path} has a vocab of {loaded.model_cfg.vocab_size} but "
                             f"{cfg.data.path} was made with a vocab of {data_vocab}; tokenize the new data with "
                             "the checkpoint's tokenizer")
        _refuse_contradicting_shape(cfg, loaded)
        # The checkpoint fixes the shape; how it is computed (impl, remat, ...) comes from the flags.
        return dataclasses.replace(loaded.model_cfg, **cfg.model.numerics())
    vocab = cfg.model.vocab_size or data_vocab
    if not vocab:
        raise ValueError(f"{cfg.data.path}: no sidecar gives a vocab_size (a raw .bin has none); pass "
                         "--model.vocab_size")
    if data_vocab and vocab < data_vocab:
        raise ValueError(f"--model.vocab_size {vocab} is smaller than the data's vocab {data_vocab}")
    return cfg.model.model_config(vocab)


# Shape flags a loaded checkpoint fixes (seq_len too, except for HF/GGUF checkpoints, which are loaded at it).
_SHAPE_FLAGS = ("vocab_size", "d_model", "n_layers", "head_dim", "seq_len", "mlp_ratio", "rope_base", "norm_eps")


def _refuse_contradicting_shape(cfg: TrainConfig, loaded: runs.LoadedRun) -> None:
    """A shape flag given (not left at its default) with a value other than the checkpoint's is refused:
    the checkpoint's shape is the one trained, and a config.json holding both would misstate the run."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(cfg.model))}
    sized_by_flag = loaded.path.suffix == ".gguf" or runs.is_hf_checkpoint(loaded.path)
    wrong = {}
    for name in _SHAPE_FLAGS:
        given = getattr(cfg.model, name)
        if given == defaults[name] or (name == "seq_len" and sized_by_flag):
            continue
        if given != getattr(loaded.model_cfg, name, None):
            wrong[name] = given
    if wrong:
        flags = ", ".join(f"--model.{k} {v}" for k, v in wrong.items())
        has = ", ".join(f"{k}={getattr(loaded.model_cfg, k, 'not a field of its family')}" for k in wrong)
        raise ValueError(f"{flags} contradict{'s' if len(wrong) == 1 else ''} the loaded checkpoint "
                         f"{loaded.path}, which has {has}; a finetune keeps the checkpoint's shape: drop the "
                         "flag(s) or pass the checkpoint's values")


def _check_tokenizer(token_file: data_lib.TokenFile, flag: str, loaded: runs.LoadedRun | None,
                     run_tokenizer: tuple[str, str | None]) -> None:
    """Every token file a run reads was made with the run's tokenizer: the loaded checkpoint's, else the
    tokenizer of --data.path (`run_tokenizer`: (what it is, its sha256)). Unknown on either side: allowed."""
    sha = token_file.meta.get("tokenizer_sha256")
    if loaded is not None:
        if loaded.tokenizer_matches(sha):
            return
        theirs = f"the checkpoint {loaded.path} was trained with {loaded.tokenizer_sha256[:12]}…"
    elif not (sha and run_tokenizer[1]) or sha == run_tokenizer[1]:
        return
    else:
        theirs = f"{run_tokenizer[0]} was tokenized with {run_tokenizer[1][:12]}…"
    raise ValueError(f"{flag} {token_file.path} was tokenized with tokenizer {sha[:12]}…, but {theirs}; "
                     "re-tokenize it with the run's tokenizer")


def _loaded_split(cfg: TrainConfig, loaded: runs.LoadedRun) -> tuple[int, int]:
    """(num_tokens_valid, split_seed) of the loaded run's own validation split (the rows prev_* measure)."""
    return loaded.num_tokens_valid or cfg.data.num_tokens_valid, loaded.split_seed


def _is_loaded_runs_data(path: str, loaded: runs.LoadedRun | None) -> bool:
    """Whether `path` holds the loaded run's training data, by content (however either path is spelled, or
    where the data was moved to): its fingerprint equals the one the loaded run recorded, or the file there."""
    if loaded is None or not Path(path).is_file():
        return False  # (a missing file is reported by the dataset's own opening, naming the flag)
    mine = runs.fingerprint(path)
    recorded = None
    if (loaded.path / runs.CONFIG_FILE).is_file() and not runs.is_hf_checkpoint(loaded.path):
        recorded = (runs.read_run_config(loaded.path).get("inputs") or {}).get("--data.path")
    if recorded is None and loaded.data_path and Path(loaded.data_path).is_file():
        recorded = runs.fingerprint(loaded.data_path)
    return recorded is not None and runs.same_content(mine, recorded)


def _steps(cfg: TrainConfig, model_cfg: Any, dataset: data_lib.SequenceDataset,
           tokens_per_step: int) -> tuple[int | None, str | None]:
    s = cfg.stop
    if s.num_tokens_train:
        return max(1, math.ceil(s.num_tokens_train / tokens_per_step)), "num_tokens_train"
    if s.tokens_per_param:
        tokens = s.tokens_per_param * model_lib.paper_param_count(model_cfg)
        return max(1, math.ceil(tokens / tokens_per_step)), "tokens_per_param"
    if s.num_epochs:
        return max(1, math.ceil(s.num_epochs * dataset.num_train / cfg.opt.batch_size)), "num_epochs"
    return None, None


def load_checkpoint(cfg: TrainConfig) -> runs.LoadedRun | None:
    """The model a finetune starts from (--model.load_path, or the --model.load_idx-th run of --model.load_dir)."""
    load_path = cfg.model.load_path
    if cfg.model.load_dir:
        load_path = str(runs.run_in_dir(cfg.model.load_dir, cfg.model.load_idx))
    if not load_path:
        return None
    return runs.load_run(load_path, dtype=cfg.model.dtype, seq_len=cfg.model.seq_len, shardings=_load_shardings(cfg))


@dataclasses.dataclass(frozen=True)
class Datasets:
    """The token files a run reads, opened and checked against the run's tokenizer and model."""

    train: data_lib.SequenceDataset
    prev: data_lib.SequenceDataset | None  # the loaded run's data (its validation split: the prev_* metrics)
    mix: data_lib.SequenceDataset | None
    extra: dict[str, data_lib.SequenceDataset]
    run_tokenizer: tuple[str, str | None]  # (what it is, its sha256): every token file must match it


def open_datasets(cfg: TrainConfig, loaded: runs.LoadedRun | None) -> tuple[Any, Datasets]:
    """(model config, datasets): the training data first (its sidecar gives the vocab), then the others."""
    data_id = cfg.data.dataset_id if cfg.data.dataset_id >= 0 else None
    probe = data_lib.TokenFile(cfg.data.path, dataset_id=data_id)
    run_tokenizer = (f"--data.path {cfg.data.path}", probe.meta.get("tokenizer_sha256"))
    _check_tokenizer(probe, "--data.path", loaded, run_tokenizer)
    model_cfg = _model_config(cfg, loaded, int(probe.meta.get("vocab_size") or 0))
    T, V = model_cfg.seq_len, model_cfg.vocab_size
    dataset = _open_dataset(cfg.data.path, V, T, cfg.data.num_tokens_valid, cfg.data.split_seed, "--data.path",
                            data_id)
    dataset.check_batch_size(cfg.opt.batch_size)
    prev_dataset = None
    if loaded is not None and loaded.data_path:
        if Path(loaded.data_path).exists():
            prev_dataset = _open_dataset(loaded.data_path, V, T, *_loaded_split(cfg, loaded), "the loaded run's data")
            _check_tokenizer(prev_dataset.token_file, "the loaded run's data", loaded, run_tokenizer)
        else:
            print(f"warning: {loaded.path} was trained on {loaded.data_path}, which is not here; prev_* metrics "
                  "are skipped", file=sys.stderr)
    mix_dataset = None
    if cfg.mix.path:
        mix_dataset = _open_dataset(cfg.mix.path, V, T, cfg.data.num_tokens_valid, cfg.data.split_seed, "--mix.path")
        _check_tokenizer(mix_dataset.token_file, "--mix.path", loaded, run_tokenizer)
    extra = _extra_datasets(cfg, loaded, run_tokenizer, V, T)
    if dataset.has_assistant_mask and (mix_dataset is not None or cfg.reg.method == "replace"):
        raise ValueError(f"{cfg.data.path} has an assistant-only loss mask, which --mix and --reg.method replace "
                         "would misalign (they swap rows); use kl/ntp replay or tokenize without --chat")
    return model_cfg, Datasets(dataset, prev_dataset, mix_dataset, extra, run_tokenizer)


def _extra_datasets(cfg: TrainConfig, loaded: runs.LoadedRun | None, run_tokenizer: tuple[str, str | None],
                    V: int, T: int) -> dict[str, data_lib.SequenceDataset]:
    extra = {Path(p).stem: _open_dataset(p, V, T, cfg.data.num_tokens_valid, cfg.data.split_seed,
                                         "--eval.extra_paths") for p in cfg.eval.extra_paths}
    if len(extra) < len(cfg.eval.extra_paths):  # metrics are named by file stem: two would share one column
        stems = [Path(p).stem for p in cfg.eval.extra_paths]
        raise ValueError(f"--eval.extra_paths names two files with the same stem ({sorted({x for x in stems if stems.count(x) > 1})}); "
                         "their metrics ntp/<stem> would collide: rename or link one of them")
    for extra_dataset in extra.values():
        _check_tokenizer(extra_dataset.token_file, "--eval.extra_paths", loaded, run_tokenizer)
    return extra


def build_replay(cfg: TrainConfig, loaded: runs.LoadedRun | None, data: Datasets, model_cfg: Any, ref_params: Any,
                 total_steps: int | None) -> tuple[replay.ReplaySource | None, dict]:
    """The replay source of --reg.* built complete (on the placed reference), and what it records in
    config.json (the prompts' ids, what --reg.reference_hidden came to)."""
    r = cfg.reg
    if r.method not in ("ntp_pre", "kl_pre", "replace"):
        return None, {}
    T, V = model_cfg.seq_len, model_cfg.vocab_size
    rows = r.batch_size if r.method != "replace" else data_lib.num_rows(r.coeff, cfg.opt.batch_size)
    if not r.synth:
        return replay.RealReplay(_replay_dataset(cfg, loaded, data, T, V), rows, cfg.run.seed), {}
    if r.prompt_text:  # token-id prompts of the texts, recorded in config.json (`stages.prompts`)
        prompt_ids, record = prompts.replay_prompts(r, loaded, cfg.data.path, T, V)
    else:
        prompt_ids, record = r.prompt_ids or loaded.lineage_ids, {}
        outside = [i for i in prompt_ids if not 0 <= i < V]
        if outside:
            raise ValueError(f"--reg.prompt_ids {outside} are outside the model's vocab [0, {V})")
    # Prefetching on a second thread only on one device in one process: a sharded sampler's
    # collectives must not interleave with the train step's. The sampler's hidden states are handed
    # to the step only there too (a batch of one device's arrays).
    one_device = not cfg.run.mesh and jax.process_count() == 1
    keep_hidden = r.method == "kl_pre" and r.reference_hidden != "forward"
    if keep_hidden and not (one_device and families.has_decode_hidden(model_cfg)):
        if r.reference_hidden == "sampler":
            raise ValueError("--reg.reference_hidden sampler needs one device in one process (no --run.mesh) "
                             f"and a model family with decode_hidden ({families.of(model_cfg).name!r}); "
                             "use auto or forward")
        keep_hidden = False
    if r.method == "kl_pre":  # what --reg.reference_hidden came to (self-generated kl_pre)
        record = {"reference_hidden": "sampler" if keep_hidden else "forward", **record}
    last_index = None if total_steps is None else (total_steps - 1) // r.buffer  # no buffer past the last step
    cache = None  # --reg.replay_cache: a sharded or multi-process sampler samples its own (replay_cache's docstring)
    if r.replay_cache and one_device:
        cache = replay_cache.factory(loaded.path, cfg.run.dir, runs.model_to_dict(model_cfg))
    source = replay.SelfGeneratedReplay(model_cfg, ref_params, prompt_ids, rows, r.buffer, r.temperature,
                                        cfg.run.seed, prefetch=one_device, keep_hidden=keep_hidden,
                                        last_index=last_index, cache=cache)
    return source, record


def _replay_dataset(cfg: TrainConfig, loaded: runs.LoadedRun | None, data: Datasets, T: int,
                    V: int) -> data_lib.SequenceDataset:
    """The old data real replay draws from (its training split only: the validation split stays unseen)."""
    r = cfg.reg
    if r.path and _is_loaded_runs_data(r.path, loaded):
        # The loaded run's data, however spelled: its own training split, so that replay never draws
        # the validation rows prev_ntp / prev_kl measure forgetting on.
        old = _open_dataset(r.path, V, T, *_loaded_split(cfg, loaded), "--reg.path")
        print(f"note: --reg.path {r.path} holds the data {loaded.path} was trained on: replay draws from that "
              f"run's training split (split_seed {loaded.split_seed}), never from the validation rows "
              "prev_* are measured on", file=sys.stderr)
    elif r.path:
        old = _open_dataset(r.path, V, T, cfg.data.num_tokens_valid, cfg.data.split_seed, "--reg.path")
    elif data.prev is not None:
        old = data.prev
    else:
        raise ValueError("real replay needs old data: the loaded run's data is not available; pass "
                         "--reg.path OLD.bin or use --reg.synth true")
    _check_tokenizer(old.token_file, "--reg.path" if r.path else "the loaded run's data", loaded, data.run_tokenizer)
    return old


def schedule_and_length(cfg: TrainConfig, model_cfg: Any, dataset: data_lib.SequenceDataset) -> dict:
    """Run length (steps and the criterion that sets it), warm-up, learning-rate schedule and eval cadence."""
    tokens_per_step = cfg.opt.batch_size * model_cfg.seq_len
    total_steps, length_criterion = _steps(cfg, model_cfg, dataset, tokens_per_step)
    warmup_steps = round(cfg.opt.warmup_tokens / tokens_per_step)
    return {"tokens_per_step": tokens_per_step, "total_steps": total_steps, "length_criterion": length_criterion,
            "warmup_steps": warmup_steps, "eval_every": cfg.log.every_steps or max(1, round(cfg.log.every_tokens / tokens_per_step)),
            "schedule": optim.schedule(cfg.opt.peak_lr, warmup_steps, total_steps, cfg.opt.lr_decay)}


def input_files(cfg: TrainConfig, loaded: runs.LoadedRun | None, data: Datasets,
                replay_source: replay.ReplaySource | None, resolved: dict) -> dict[str, str]:
    """Every file the run reads, by the flag (or role) that names it: token files and their assistant-mask
    files, the loaded checkpoint's files (a run's weights, a GGUF file, a HF directory's weights,
    config and tokenizer; a --model.load_dir run is named by that flag), and the tokenizer that turned
    --reg.prompt_text into ids (a resumed run tokenizes the text again)."""
    files = {"--data.path": cfg.data.path, "--mix.path": cfg.mix.path, "--reg.path": cfg.reg.path}
    files.update({f"--eval.extra_paths[{i}]": p for i, p in enumerate(cfg.eval.extra_paths)})
    for i, p in enumerate(cfg.eval.ref_paths):  # (and the loss mask their sidecar names)
        files[f"--eval.ref_paths[{i}]"] = p
        mask = data_lib.TokenFile(p).meta.get("loss_mask") if Path(p).is_file() else None
        files.update({f"--eval.ref_paths[{i}] (loss mask)": str(Path(p).parent / mask)} if mask else {})
    if data.prev is not None:
        files["the loaded run's data"] = str(data.prev.token_file.path)
    old = replay_source.dataset if isinstance(replay_source, replay.RealReplay) else None
    named = [("--data.path", data.train), ("the loaded run's data", data.prev), ("--mix.path", data.mix),
             ("--reg.path", old if cfg.reg.path else None),
             *((f"--eval.extra_paths[{i}]", data.extra[Path(p).stem]) for i, p in enumerate(cfg.eval.extra_paths))]
    for role, d in named:
        mask = d.token_file.meta.get("loss_mask") if d is not None else None
        if mask:
            files[f"{role} (loss mask)"] = str(d.token_file.path.parent / mask)
    if loaded is not None:
        flag = "--model.load_dir" if cfg.model.load_dir else "--model.load_path"
        for f in _checkpoint_files(loaded.path):
            files[f"{flag} ({f.name})"] = str(f)
    prompt_tokenizer = Path(resolved.get("replay_prompt_tokenizer") or "")
    if prompt_tokenizer.is_dir():
        files.update({f"--reg.prompt_text (tokenizer {f.name})": str(f) for f in runs.checkpoint_tokenizer_files(prompt_tokenizer)})
    elif prompt_tokenizer.is_file():
        files["--reg.prompt_text (tokenizer)"] = str(prompt_tokenizer)
    return {role: path for role, path in files.items() if path}


def _checkpoint_files(path: Path) -> list[Path]:
    """The files of a loaded checkpoint that its numbers come from."""
    if path.is_file():  # a GGUF file: weights, config and tokenizer in one
        return [path]
    weights = [path / runs.PARAMS_FILE, sharded_checkpoint.manifest_path(path / runs.PARAMS_FILE), path / "weights.npz",
               path / "config.yaml", *sorted(path.glob("*.safetensors"))]
    if runs.is_hf_checkpoint(path):
        weights += [path / runs.CONFIG_FILE, *runs.checkpoint_tokenizer_files(path)]
    return [w for w in weights if w.is_file()]


def optimizer_for(opt_cfg: Any, schedule: Callable) -> Any:
    """The optimizer of `--opt.*`: AdamW(b1, b2, weight_decay), or for `sgd` plain SGD as the authors'
    (`optax.sgd(lr)`: no momentum, no weight decay; b1, b2 and weight_decay are AdamW's settings)."""
    if opt_cfg.optimizer == "sgd":
        return optim.optimizer("sgd", schedule, weight_decay=0.0, momentum=0.0)
    return optim.optimizer(opt_cfg.optimizer, schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay)


def _identity(x):
    return x


class _Placer:
    """Moves states (and params-shaped trees) onto the mesh."""

    def __init__(self, state_sharding, param_sharding):
        self.state_sharding, self.param_sharding = state_sharding, param_sharding

    def __call__(self, state):
        return sharding.shard(state, self.state_sharding) if self.state_sharding is not None else state

    def params_like(self, tree):
        return sharding.shard(tree, self.param_sharding)


def _mesh(cfg: TrainConfig) -> Any:
    n = jax.device_count()
    if n % cfg.run.mesh_model:
        raise ValueError(f"--run.mesh_model {cfg.run.mesh_model} does not divide the {n} devices")
    return sharding.make_mesh(n // cfg.run.mesh_model, cfg.run.mesh_model)


def _load_shardings(cfg: TrainConfig) -> Callable[[Any], dict] | None:
    """In a multi-process run, where the loaded parameters go, so that each host reads only its slices of the
    params file (`runs.load_run(shardings=...)`); the placement below then finds them already in place."""
    if not cfg.run.mesh or jax.process_count() == 1:
        return None
    return lambda model_cfg: sharding.param_shardings(model_cfg, _mesh(cfg), cfg.run.mesh)


def _placement(cfg: TrainConfig, model_cfg, trainable, opt, use_lora: bool, masked: bool = False):
    """(put_batch, put_state, state_sharding, batch_sharding) for `--run.mesh`; identity on one device."""
    if not cfg.run.mesh:
        return _identity, _identity, None, None
    mesh = _mesh(cfg)
    data_size = mesh.shape[sharding.DATA]
    if cfg.opt.batch_size % data_size or (cfg.reg.method in ("ntp_pre", "kl_pre") and cfg.reg.batch_size % data_size):
        raise ValueError(f"--opt.batch_size and --reg.batch_size must be multiples of the data axis ({data_size} "
                         "devices) with --run.mesh")
    strategy = cfg.run.mesh
    param_sh = sharding.param_shardings(model_cfg, mesh, strategy)
    batch_sh = sharding.batch_sharding(mesh)
    if use_lora:  # adapters are small: replicate them, shard only the frozen base
        state_sh = None
        placer = _Placer(None, param_sh)
    else:
        abstract = jax.eval_shape(lambda p: step_lib.init_state(p, opt), trainable)
        state_sh = sharding.state_shardings(abstract, param_sh, mesh)
        placer = _Placer(state_sh, param_sh)

    def put_batch(batch: dict) -> dict:
        # Every process builds the same global batch (the order is a pure function of the step), and each
        # device takes its own rows: the same code serves one host and many (`jax.distributed`).
        return {k: jax.make_array_from_callback(v.shape, batch_sh, lambda index, v=v: v[index])
                for k, v in batch.items()}

    batch_shardings = ({"tokens": batch_sh, "replay": batch_sh}
                       if cfg.reg.method in ("ntp_pre", "kl_pre") else {"tokens": batch_sh})
    if masked:  # packed data: the loss mask travels with the tokens
        batch_shardings["mask"] = batch_sh
    return put_batch, placer, state_sh, batch_shardings
