"""The training stage's configuration: one tree of frozen dataclasses `run, data, mix, model, reg, opt,
stop, eval, log`. Each field is a flag with a stable dotted name (`--opt.peak_lr 3e-4`)."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from forgetting.core import backend
from forgetting.core import data as data_lib
from forgetting.core import model as model_lib

REG_METHODS = ("none", "ntp_pre", "kl_pre", "kl_dwn", "replace")
REFERENCE_HIDDEN = ("auto", "sampler", "forward")
MESH_STRATEGIES = ("", "dp", "fsdp", "tp")


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives and what makes it reproducible."""

    dir: str = "runs"  # parent directory; the run directory inside it is named from a hash of the config
    name: str = ""  # optional readable prefix of the run directory name
    seed: int = 0  # seeds model init, training-batch order and replay sampling
    mesh: str = ""  # device placement: "" (one device), dp (data parallel), fsdp, tp (tensor parallel)
    mesh_model: int = 1  # size of the mesh's "model" axis (tp); the rest of the devices form "data"


@dataclass(frozen=True)
class DataConfig:
    """The dataset being trained on (for finetuning: the new data)."""

    path: str = ""  # flat uint16 .bin token file with its .json sidecar (or a raw one: see dataset_id)
    dataset_id: int = -1  # dataset id of a raw .bin without a sidecar (-1: the sidecar's, or the authors' file stem's)
    num_tokens_valid: int = 262_144  # tokens held out for validation (a seeded permutation of sequences)
    split_seed: int = 0  # seed of the validation split (taken once; independent of run.seed)


@dataclass(frozen=True)
class MixConfig:
    """Pretraining mixture: the first floor(coeff * B) rows of every batch come from a second dataset."""

    path: str = ""  # the second dataset (.bin); empty = no mixing
    coeff: float = 0.0  # fraction of each batch taken from it


@dataclass(frozen=True)
class ModelArgs:
    """The `--model.*` flags: every field of the paper model's config (core.model.ModelConfig: same names, same
    defaults, and its own checks validate them) plus where training starts from. When loading, the
    checkpoint's shape is used and the numerics fields (impl, remat, kv_cache_dtype, unroll, loss_chunk,
    streams; dtype via the loader) apply to it."""

    vocab_size: int = 0  # 0 = take it from the data sidecar
    d_model: int = 256  # D: residual width
    n_layers: int = 6  # L: transformer blocks
    head_dim: int = 64  # per-head width; heads = d_model // head_dim (as the authors': D=288 has 4 heads of 64)
    seq_len: int = 256  # T: maximum sequence length (RoPE table and KV-cache size)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    rope_base: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    dtype: str = "auto"  # matmul input dtype: bfloat16 (f32 accumulation) | float32 | auto (the faster one here: training.auto_dtype)
    impl: str = "auto"  # auto | reference | xla_cpu: kernels for attention, loss head, matmul gradients
    remat: str = "none"  # activation checkpointing: none | block (recompute each block) | dots
    kv_cache_dtype: str = "auto"  # auto (f32 on xla_cpu, else dtype) | bfloat16 | float32
    unroll: int = 0  # layer-loop unroll for lax.scan; 0 = backend default (full on xla_cpu, else 1)
    loss_chunk: int = 0  # fused loss head: logits elements per chunk; 0 = default (8 MB of f32)
    streams: int = 0  # independent row groups through the layers; 0 = backend default
    load_path: str = ""  # finetune from this run directory (or an authors' weights.npz / HF / GGUF checkpoint)
    load_dir: str = ""  # with load_idx: finetune from the load_idx-th run in this directory (the authors' load_dir)
    load_idx: int = -1  # index into the sorted finished runs / authors' checkpoints under load_dir
    lora_rank: int = 0  # >0: train only rank-r LoRA adapters on every non-embedding matrix

    @property
    def loads(self) -> bool:
        """Whether the run starts from a loaded model (load_path, or load_dir/load_idx)."""
        return bool(self.load_path or self.load_dir)

    def model_config(self, vocab_size: int | None = None) -> model_lib.ModelConfig:
        """The ModelConfig these flags describe (`vocab_size` fills in a 0 = from-the-data vocabulary)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(model_lib.Architecture)}
        if self.dtype == "auto":  # (a run's plan resolves it before this: `plan.resolve_dtype`, the one place)
            from forgetting.training.plan import resolve_dtype

            fields["dtype"] = resolve_dtype(self.dtype)["dtype"]
        fields["vocab_size"] = self.vocab_size or vocab_size or 1  # 1: a placeholder for checking the rest
        return model_lib.ModelConfig(**fields, **self.numerics())

    def numerics(self) -> dict:
        """{"numerics": these flags' `backend.Numerics`}: the keyword that applies them to any family's
        config, whose shape stays its own (`dataclasses.replace(loaded_cfg, **args.numerics())`). Checks them."""
        return {"numerics": backend.Numerics(**{name: getattr(self, name) for name in NUMERICS_FIELDS})}


NUMERICS_FIELDS = tuple(f.name for f in dataclasses.fields(backend.Numerics))


@dataclass(frozen=True)
class RegConfig:
    """Forgetting prevention: objective NTP(new) + coeff * R, or batch-level replacement."""

    method: str = "none"  # none | ntp_pre | kl_pre | kl_dwn | replace
    coeff: float = 10.0  # c in NTP + c*R; for `replace`, the fraction of each batch replaced
    synth: bool = False  # replay sampled from the frozen reference model instead of real old data
    batch_size: int = 64  # replay rows per step (ntp_pre, kl_pre)
    buffer: int = 16  # self-generated replay: steps of replay sampled at once (fresh key per buffer)
    temperature: float = 1.0  # self-generated replay sampling temperature
    path: str = ""  # real replay data (.bin); default: the loaded run's training data (train split only)
    prompt_ids: tuple[int, ...] = ()  # self-generated replay prompts; default: the loaded run's dataset ids
    # Self-generated replay prompts as text (one or more; row i gets prompt i mod n), tokenized with the loaded
    # checkpoint's tokenizer, special-token text such as <|im_start|> read as its id. Nothing is added for HF
    # and GGUF tokenizers (write <|endoftext|> etc. into the text for a BOS); the paper model's .tiktoken
    # tokenizers put the run's dataset id first. Rows hold the prompt, then samples, to the full length; the
    # KL (or NTP) covers every position as with one-token prompts (the reference's next-token distributions
    # inside the prompt are the reference's too). Ids recorded in config.json (resolved.replay_prompt_ids).
    prompt_text: tuple[str, ...] = ()
    prompt_chat: bool = False  # render each --reg.prompt_text as a user turn of the checkpoint's chat template, assistant header after it
    # The tokenizer of --reg.prompt_text (.tiktoken, HF directory, tokenizer.json or .gguf); default: the
    # checkpoint's own, else the .tiktoken file the data's sidecar names
    prompt_tokenizer: str = ""
    # Self-generated kl_pre: the reference's hidden states on the replay rows, from the sampler that drew
    # them (no second forward of the reference; equal to it up to float rounding) or from a forward in the
    # train step: auto (sampler on one device in one process) | sampler | forward
    reference_hidden: str = "auto"
    # Self-generated replay: read each buffer from the stream's cache beside the reference (written by the
    # first run that samples it; `training.replay_cache`), with the same numbers as sampling. Not in the run's hash.
    replay_cache: bool = True


@dataclass(frozen=True)
class OptConfig:
    """Optimizer and learning-rate schedule (the optimizer restarts with warm-up when finetuning)."""

    optimizer: str = "adamw"  # adamw | sgd (plain SGD as the authors': no momentum, no weight decay)
    batch_size: int = 256  # sequences per step
    peak_lr: float = 1e-3  # learning rate after warm-up
    warmup_tokens: int = 10_000_000  # linear warm-up length in training tokens
    lr_decay: str = "none"  # none (constant) | cosine (to 0 at the end; needs a fixed length)
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.999  # AdamW beta2
    weight_decay: float = 0.02  # AdamW decoupled weight decay


@dataclass(frozen=True)
class StopConfig:
    """When to stop. At most one length criterion (tokens, tokens/param, epochs); any others combine."""

    num_tokens_train: int = 0  # stop after this many training tokens
    tokens_per_param: float = 0.0  # stop after this many tokens per (paper-counted) parameter
    num_epochs: float = 0.0  # stop after this many passes over the training split
    target_loss: float = 0.0  # stop once valid_ntp <= this (checked at every eval)
    train_time: float = 0.0  # stop after this many seconds of training (`train_seconds`: see the train stage)
    early_stop_evals: int = 0  # stop once MORE than this many evals in a row bring no new best valid_ntp (the authors' early_stop_steps)


@dataclass(frozen=True)
class EvalConfig:
    """Extra evaluation sets (e.g. every task of a continual-learning sequence)."""

    extra_paths: tuple[str, ...] = ()  # .bin files evaluated at every eval (their validation split)
    batch_size: int = 0  # eval batch size; 0 = the training batch size
    max_tokens: int = 0  # cap on tokens evaluated per set (0 = the whole validation split)
    # keep the frozen reference's hidden states of the eval sets up to this size, across runs of a process too
    reference_cache_mb: int = 1024  # (0 = recompute at every eval)
    lm_eval_tasks: tuple[str, ...] = ()  # lm-evaluation-harness task names or YAML files scored at evals (the lmeval extra)
    lm_eval_every: int = 1  # score them at every this-many-th eval (eval index = step // eval cadence; step 0 included)
    lm_eval_limit: float = 0.0  # at most this many documents per task (< 1: that fraction); 0 = all
    lm_eval_batch_size: int = 8  # rows per forward while scoring them
    lm_eval_tokenizer: str = ""  # their tokenizer ("" = the loaded model's, or the training data's .tiktoken)
    # Token files scored whole at every eval against the frozen reference (finetuning only): ntp/<stem>,
    # token_acc/<stem> and kl/<stem> = KL(p_ref ‖ θ), over the targets their sidecar's loss_mask marks (else
    # all), at their own row length (sidecar packed_seq_len, else --model.seq_len); no split, token 0 kept
    ref_paths: tuple[str, ...] = ()
    token_accuracy: bool = False  # also log valid_token_acc: argmax next-token accuracy on --data.path's validation split
    # The loaded run's data (prev_*, and the --eval.extra_paths that are its rows) at every this-many-th eval
    # (eval index as --eval.lm_eval_every); 0 = at the first eval only. The run's last eval always has them.
    prev_every: int = 1


@dataclass(frozen=True)
class LogConfig:
    """Evaluation cadence and logging."""

    every_tokens: int = 1_000_000  # evaluate and log every this many training tokens (and checkpoint, unless a checkpoint cadence is set)
    every_steps: int = 0  # if > 0, overrides every_tokens
    checkpoint_every_steps: int = 0  # > 0: checkpoint every this many steps instead of at every eval
    checkpoint_minutes: float = 0.0  # > 0: checkpoint once this much wall time has passed since the last, instead of at every eval
    wandb: bool = False  # also log to Weights & Biases (needs the `wandb` extra)
    wandb_project: str = "forgetting"  # W&B project name
    progress: bool = True  # progress bar on stderr


@dataclass(frozen=True)
class TrainConfig:
    """Pretrain or finetune a transformer LM, measuring and preventing forgetting."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    model: ModelArgs = field(default_factory=ModelArgs)
    reg: RegConfig = field(default_factory=RegConfig)
    opt: OptConfig = field(default_factory=OptConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """Refuses contradictory, out-of-range or missing settings before any compute; each message says the fix.
        Each check has one owner: the model's fields are the model config's (`validate_model_args`), ranges
        are `_check_ranges`', and the combinations below."""
        if not self.data.path:
            raise ValueError("no training data: pass --data.path FILE.bin")
        check_run_name(self.run.name)
        validate_model_args(self.model)
        _check_ranges(self)
        _check_stop_and_opt(self)
        _check_reg(self)
        _check_fractions(self)
        if self.run.mesh not in MESH_STRATEGIES:
            raise ValueError(f"--run.mesh must be one of dp, fsdp, tp (or empty), got {self.run.mesh!r}")


def _check_stop_and_opt(cfg: TrainConfig) -> None:
    """At most one length criterion and at least one stop criterion; the optimizer and its schedule."""
    s, o = cfg.stop, cfg.opt
    lengths = [n for n, v in (("--stop.num_tokens_train", s.num_tokens_train),
                              ("--stop.tokens_per_param", s.tokens_per_param),
                              ("--stop.num_epochs", s.num_epochs)) if v]
    if len(lengths) > 1:
        raise ValueError(f"two length criteria given ({', '.join(lengths)}); keep one of them")
    if not lengths and not (s.target_loss or s.train_time or s.early_stop_evals):
        raise ValueError("no stop criterion: give one of --stop.num_tokens_train, --stop.tokens_per_param, "
                         "--stop.num_epochs, --stop.target_loss, --stop.train_time, --stop.early_stop_evals")
    if o.lr_decay not in ("none", "cosine"):
        raise ValueError(f"--opt.lr_decay must be none or cosine, got {o.lr_decay!r}")
    if o.lr_decay == "cosine" and not lengths:
        raise ValueError("--opt.lr_decay cosine needs a fixed run length: add --stop.num_tokens_train, "
                         "--stop.tokens_per_param or --stop.num_epochs")
    if o.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"--opt.optimizer must be adamw or sgd, got {o.optimizer!r}")
    if o.batch_size <= 0:
        raise ValueError(f"--opt.batch_size must be positive, got {o.batch_size}")


def _check_reg(cfg: TrainConfig) -> None:
    """The regularizer's method and what it needs (a reference, old data); its ranges are `_check_ranges`'."""
    r = cfg.reg
    if r.method not in REG_METHODS:
        raise ValueError(f"--reg.method must be one of {', '.join(REG_METHODS)}, got {r.method!r}")
    if r.method in ("kl_pre", "kl_dwn") and not cfg.model.loads:
        raise ValueError(f"--reg.method {r.method} needs a frozen reference model: pass --model.load_path RUN_DIR")
    if r.method in ("ntp_pre", "replace") and not (cfg.model.loads or (r.path and not r.synth)):
        raise ValueError(f"--reg.method {r.method} needs old data: pass --model.load_path RUN_DIR (replays its "
                         "data, or samples from it with --reg.synth true) or --reg.path OLD.bin")
    if r.synth and r.method not in ("ntp_pre", "kl_pre", "replace"):
        raise ValueError(f"--reg.synth true only applies to ntp_pre, kl_pre or replace, not {r.method}")
    if r.method in ("ntp_pre", "kl_pre") and not r.synth and r.batch_size > cfg.opt.batch_size:
        raise ValueError(f"real replay batch (--reg.batch_size {r.batch_size}) is larger than the data "
                         f"batch (--opt.batch_size {cfg.opt.batch_size}); lower it or use --reg.synth true")
    if r.reference_hidden not in REFERENCE_HIDDEN:
        raise ValueError(f"--reg.reference_hidden must be one of {', '.join(REFERENCE_HIDDEN)}, got {r.reference_hidden!r}")
    if r.reference_hidden == "sampler" and not (r.synth and r.method == "kl_pre"):
        raise ValueError("--reg.reference_hidden sampler applies to self-generated KL replay only "
                         "(--reg.method kl_pre --reg.synth true); drop it or use auto")
    if r.method == "replace" and not 0 < r.coeff < 1:
        raise ValueError(f"--reg.method replace takes --reg.coeff as the replaced fraction in (0, 1), got {r.coeff}")


def _check_fractions(cfg: TrainConfig) -> None:
    """--mix.coeff and the replaced fraction of --reg.method replace each take 1 to B-1 rows of a batch."""
    if cfg.mix.path and not 0 < cfg.mix.coeff < 1:
        raise ValueError(f"--mix.coeff must be in (0, 1) when --mix.path is given, got {cfg.mix.coeff}")
    B = cfg.opt.batch_size
    for flag, frac, on in (("--mix.coeff", cfg.mix.coeff, bool(cfg.mix.path)),
                           ("--reg.coeff", cfg.reg.coeff, cfg.reg.method == "replace")):
        if not on:  # (when on, frac is already checked to lie in (0, 1) above)
            continue
        rows = data_lib.num_rows(frac, B)
        if not 1 <= rows < B:
            raise ValueError(f"{flag} {frac} takes floor({frac} * {B}) = {rows} rows of each batch of "
                             f"--opt.batch_size {B}; it must give 1 to {B - 1} rows: raise the fraction or the "
                             "batch size")
    if cfg.mix.coeff and not cfg.mix.path:
        raise ValueError("--mix.coeff given without --mix.path")


def check_run_name(name: str) -> None:
    """`--run.name` is a prefix of a directory name inside `--run.dir`: it must not leave it."""
    if name and (name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("-")):
        raise ValueError(f"--run.name {name!r} must be a plain name (no '/', '\\', '..'; not starting with '-'): "
                         "it becomes part of a directory name inside --run.dir")


# ---- the model flags: the model config checks its own fields; only what is about training is checked here ----
def validate_model_args(m: ModelArgs) -> None:
    """The `--model.*` flags: ModelConfig's own checks (reported as flags), plus what training adds (a vocab
    from the data, seq_len >= 2, LoRA, loading). When loading, the checkpoint gives the shape (a shape flag
    that contradicts it is refused in the plan), so only the numerics fields and seq_len are checked here."""
    if m.vocab_size < 0:
        raise ValueError(f"--model.vocab_size must be >= 0 (0 = from the data sidecar), got {m.vocab_size}")
    checked = m
    if m.loads:  # the checkpoint gives the shape: only the numerics fields (and seq_len, the HF/GGUF loading length)
        checked = ModelArgs(**{name: getattr(m, name) for name in NUMERICS_FIELDS}, seq_len=m.seq_len, dtype=m.dtype)
    if m.dtype == "auto":  # a placeholder: checking a flag must not run the auto probe
        checked = dataclasses.replace(checked, dtype="float32")
    try:  # (the numerics' own checks run in model_config, through `numerics()`)
        checked.model_config()  # (vocab_size 0 = from the data: model_config puts a placeholder)
    except ValueError as e:
        raise ValueError(_as_model_flags(str(e))) from None
    if m.seq_len < 2:
        raise ValueError(f"--model.seq_len must be >= 2 (a next-token loss needs two positions), got {m.seq_len}")
    if m.lora_rank < 0:
        raise ValueError(f"--model.lora_rank must be >= 0, got {m.lora_rank}")
    if m.lora_rank and not m.loads:
        raise ValueError("--model.lora_rank needs --model.load_path (LoRA adapts a loaded model)")
    # lora_rank <= min(d_in, d_out) needs the loaded model's shape: checked in train_setup.


def _as_model_flags(message: str) -> str:
    """ModelConfig's message in flag words: `head_dim=7 must be even` -> `--model.head_dim 7 must be even`."""
    names = "|".join(f.name for f in dataclasses.fields(ModelArgs))
    message = re.sub(rf"(?<![\w.-])({names})(=| )", lambda g: f"--model.{g[1]} ", message)
    if message.startswith("--model.dtype "):
        message += " (or auto: the faster one on this machine)"
    return message


def _positive(flag: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{flag} must be a positive number, got {value}")


def _non_negative(flag: str, value: float, what: str = "") -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{flag} must be >= 0{what}, got {value}")


def _check_ranges(cfg: "TrainConfig") -> None:
    """Every numeric flag in its range (0 means "off" where the flag's help says so)."""
    o, s, r = cfg.opt, cfg.stop, cfg.reg
    _positive("--opt.peak_lr", o.peak_lr)
    _non_negative("--opt.warmup_tokens", o.warmup_tokens)
    _non_negative("--opt.weight_decay", o.weight_decay)
    for flag, beta in (("--opt.b1", o.b1), ("--opt.b2", o.b2)):
        if not 0 <= beta < 1:
            raise ValueError(f"{flag} must be in [0, 1), got {beta}")
    off = " (0 = off)"
    _non_negative("--stop.num_tokens_train", s.num_tokens_train, off)
    _non_negative("--stop.tokens_per_param", s.tokens_per_param, off)
    _non_negative("--stop.num_epochs", s.num_epochs, off)
    _non_negative("--stop.target_loss", s.target_loss, off)
    _non_negative("--stop.train_time", s.train_time, off)
    _non_negative("--stop.early_stop_evals", s.early_stop_evals, off)
    _non_negative("--reg.coeff", r.coeff)
    _non_negative("--reg.temperature", r.temperature)
    if r.batch_size <= 0:
        raise ValueError(f"--reg.batch_size must be positive, got {r.batch_size}")
    if r.buffer <= 0:
        raise ValueError(f"--reg.buffer must be positive, got {r.buffer}")
    bad_ids = [i for i in r.prompt_ids if i < 0]
    if bad_ids:
        raise ValueError(f"--reg.prompt_ids must be token ids >= 0, got {bad_ids}")  # (< vocab: in train_setup)
    if r.prompt_ids and not r.synth:
        raise ValueError("--reg.prompt_ids only applies to self-generated replay: add --reg.synth true")
    _check_prompt_text(r)
    _non_negative("--mix.coeff", cfg.mix.coeff)
    if cfg.data.num_tokens_valid <= 0:
        raise ValueError("--data.num_tokens_valid must be positive (validation loss drives metrics and stops)")
    if cfg.data.split_seed < 0 or cfg.run.seed < 0:
        raise ValueError(f"--data.split_seed and --run.seed must be >= 0, got {cfg.data.split_seed}, {cfg.run.seed}")
    if cfg.run.mesh_model < 1:
        raise ValueError(f"--run.mesh_model must be >= 1, got {cfg.run.mesh_model}")
    if cfg.log.every_tokens <= 0:
        raise ValueError(f"--log.every_tokens must be positive, got {cfg.log.every_tokens}")
    _non_negative("--log.every_steps", cfg.log.every_steps, " (0 = use --log.every_tokens)")
    _non_negative("--log.checkpoint_every_steps", cfg.log.checkpoint_every_steps, " (0 = at every eval)")
    _non_negative("--log.checkpoint_minutes", cfg.log.checkpoint_minutes, " (0 = at every eval)")
    _non_negative("--eval.reference_cache_mb", cfg.eval.reference_cache_mb, " (0 = recompute at every eval)")
    _non_negative("--eval.batch_size", cfg.eval.batch_size, " (0 = the training batch size)")
    _non_negative("--eval.max_tokens", cfg.eval.max_tokens, " (0 = the whole split)")
    _non_negative("--eval.prev_every", cfg.eval.prev_every, " (0 = the first and the last eval only)")
    if cfg.eval.prev_every != 1 and not (cfg.model.load_path or cfg.model.load_dir):
        raise ValueError(f"--eval.prev_every {cfg.eval.prev_every} thins the loaded run's data (prev_*) out of evals, "
                         "and this run loads none: drop the flag, or add --model.load_path")
    _check_lm_eval(cfg.eval)
    _check_ref_paths(cfg)

    m = cfg.model
    if (m.load_dir != "") != (m.load_idx >= 0):
        raise ValueError("--model.load_dir and --model.load_idx go together (the load_idx-th run in load_dir)")
    if m.load_dir and m.load_path:
        raise ValueError("give either --model.load_path or --model.load_dir/--model.load_idx, not both")
    if cfg.data.dataset_id < -1:
        raise ValueError(f"--data.dataset_id must be >= 0 (or -1: from the sidecar), got {cfg.data.dataset_id}")


def _check_prompt_text(r: RegConfig) -> None:
    """The text-prompt flags: what needs files (the tokenizer, the lengths) is checked in `stages.prompts`."""
    if r.prompt_text and r.prompt_ids:
        raise ValueError("--reg.prompt_text and --reg.prompt_ids both give the replay prompts: keep one")
    if r.prompt_text and not r.synth:
        raise ValueError("--reg.prompt_text only applies to self-generated replay: add --reg.synth true")
    empty = [i for i, text in enumerate(r.prompt_text) if not text]
    if empty:
        raise ValueError(f"--reg.prompt_text entries {empty} are empty strings: give each prompt some text")
    for flag, given in (("--reg.prompt_chat", r.prompt_chat), ("--reg.prompt_tokenizer", r.prompt_tokenizer)):
        if given and not r.prompt_text:
            raise ValueError(f"{flag} applies to --reg.prompt_text, which is not given: add it or drop {flag}")


def replace(cfg, **changes):
    """`dataclasses.replace` with dotted keys: replace(cfg, **{"opt.peak_lr": 1e-4})."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)


def _check_lm_eval(e: EvalConfig) -> None:
    """--eval.lm_eval_*: ranges, and the optional harness installed when tasks are asked for."""
    if e.lm_eval_every < 1 or e.lm_eval_batch_size < 1 or e.lm_eval_limit < 0:
        raise ValueError(f"--eval.lm_eval_every and --eval.lm_eval_batch_size must be >= 1 and --eval.lm_eval_limit >= 0, "
                         f"got {e.lm_eval_every}, {e.lm_eval_batch_size}, {e.lm_eval_limit}")
    if not e.lm_eval_tasks:
        if e.lm_eval_tokenizer:
            raise ValueError("--eval.lm_eval_tokenizer is used with --eval.lm_eval_tasks only")
        return
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--eval.lm_eval_tasks needs lm-evaluation-harness: pip install 'forgetting[lmeval]' "
                         "(or lm-eval>=0.4.9), or drop the flag")


def _check_ref_paths(cfg: "TrainConfig") -> None:
    """--eval.ref_paths: a reference to compare with, and metric names that do not collide."""
    paths = cfg.eval.ref_paths
    if not paths:
        return
    from pathlib import Path

    if not cfg.model.loads:
        raise ValueError("--eval.ref_paths scores KL to the frozen reference, which only a finetune has: add "
                         "--model.load_path, or list the files in --eval.extra_paths instead")
    stems = [Path(p).stem for p in paths]
    twice = sorted({x for x in stems if stems.count(x) > 1})
    shared = sorted(set(stems) & {Path(p).stem for p in cfg.eval.extra_paths})
    if twice or shared:
        raise ValueError(f"--eval.ref_paths: file stems {twice or shared} appear twice (in --eval.ref_paths or also in "
                         "--eval.extra_paths); their metrics ntp/<stem> would collide: rename or link one of them")
