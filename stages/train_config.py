"""The training stage's configuration: one tree of frozen dataclasses `run, data, mix, model, reg, opt,
stop, eval, log`. Each field is a flag with a stable dotted name (`--opt.peak_lr 3e-4`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from forgetting.core import data as data_lib
from forgetting.core import model as model_lib

REG_METHODS = ("none", "ntp_pre", "kl_pre", "kl_dwn", "replace")
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

    path: str = ""  # flat uint16 .bin token file with its .json sidecar
    num_tokens_valid: int = 262_144  # tokens held out for validation (a seeded permutation of sequences)
    split_seed: int = 0  # seed of the validation split (taken once; independent of run.seed)


@dataclass(frozen=True)
class MixConfig:
    """Pretraining mixture: the first floor(coeff * B) rows of every batch come from a second dataset."""

    path: str = ""  # the second dataset (.bin); empty = no mixing
    coeff: float = 0.0  # fraction of each batch taken from it


@dataclass(frozen=True)
class ModelArgs(model_lib.ModelConfig):
    """The paper model's config itself (every field a flag: --model.d_model, --model.impl, --model.remat, ...)
    plus where training starts from. When loading, the checkpoint's shape is used and the numerics fields
    (impl, remat, kv_cache_dtype, unroll, loss_chunk, streams; dtype via the loader) apply to it."""

    vocab_size: int = 0  # 0 = take it from the data sidecar
    load_path: str = ""  # finetune from this run directory (or an authors' weights.npz / HF Llama directory)
    lora_rank: int = 0  # >0: train only rank-r LoRA adapters on every non-embedding matrix

    def __post_init__(self) -> None:
        """Checked by `TrainConfig.validate` instead, so a bad flag is a one-line message."""

    def model_config(self, vocab_size: int | None = None) -> model_lib.ModelConfig:
        """The ModelConfig these flags describe (`vocab_size` fills in a 0 = from-the-data vocabulary)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(model_lib.ModelConfig)}
        fields["vocab_size"] = self.vocab_size or vocab_size or 1  # 1: a placeholder for checking the rest
        return model_lib.ModelConfig(**fields)

    def numerics(self) -> dict:
        """The fields that apply to any family's loaded config (not its shape)."""
        return {name: getattr(self, name) for name in NUMERICS_FIELDS}


NUMERICS_FIELDS = ("impl", "remat", "kv_cache_dtype", "unroll", "loss_chunk", "streams")


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


@dataclass(frozen=True)
class OptConfig:
    """Optimizer and learning-rate schedule (the optimizer restarts with warm-up when finetuning)."""

    optimizer: str = "adamw"  # adamw | sgd
    batch_size: int = 256  # sequences per step
    peak_lr: float = 1e-3  # learning rate after warm-up
    warmup_tokens: int = 10_000_000  # linear warm-up length in training tokens
    lr_decay: str = "none"  # none (constant) | cosine (to 0 at the end; needs a fixed length)
    b1: float = 0.9  # AdamW beta1 (SGD momentum when optimizer=sgd)
    b2: float = 0.999  # AdamW beta2
    weight_decay: float = 0.02  # decoupled weight decay


@dataclass(frozen=True)
class StopConfig:
    """When to stop. At most one length criterion (tokens, tokens/param, epochs); any others combine."""

    num_tokens_train: int = 0  # stop after this many training tokens
    tokens_per_param: float = 0.0  # stop after this many tokens per (paper-counted) parameter
    num_epochs: float = 0.0  # stop after this many passes over the training split
    target_loss: float = 0.0  # stop once valid_ntp <= this (checked at every eval)
    train_time: float = 0.0  # stop after this many seconds of training
    early_stop_evals: int = 0  # stop after this many evals without a new best valid_ntp


@dataclass(frozen=True)
class EvalConfig:
    """Extra evaluation sets (e.g. every task of a continual-learning sequence)."""

    extra_paths: tuple[str, ...] = ()  # .bin files evaluated at every eval (their validation split)
    batch_size: int = 0  # eval batch size; 0 = the training batch size
    max_tokens: int = 0  # cap on tokens evaluated per set (0 = the whole validation split)


@dataclass(frozen=True)
class LogConfig:
    """Evaluation cadence and logging."""

    every_tokens: int = 1_000_000  # evaluate, log and checkpoint every this many training tokens
    every_steps: int = 0  # if > 0, overrides every_tokens
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
        """Refuses contradictory or missing settings before any compute; each message says the fix."""
        if not self.data.path:
            raise ValueError("no training data: pass --data.path FILE.bin")
        s = self.stop
        lengths = [n for n, v in (("--stop.num_tokens_train", s.num_tokens_train),
                                  ("--stop.tokens_per_param", s.tokens_per_param),
                                  ("--stop.num_epochs", s.num_epochs)) if v]
        if len(lengths) > 1:
            raise ValueError(f"two length criteria given ({', '.join(lengths)}); keep one of them")
        if not lengths and not (s.target_loss or s.train_time or s.early_stop_evals):
            raise ValueError("no stop criterion: give one of --stop.num_tokens_train, --stop.tokens_per_param, "
                             "--stop.num_epochs, --stop.target_loss, --stop.train_time, --stop.early_stop_evals")
        if self.opt.lr_decay not in ("none", "cosine"):
            raise ValueError(f"--opt.lr_decay must be none or cosine, got {self.opt.lr_decay!r}")
        if self.opt.lr_decay == "cosine" and not lengths:
            raise ValueError("--opt.lr_decay cosine needs a fixed run length: add --stop.num_tokens_train, "
                             "--stop.tokens_per_param or --stop.num_epochs")
        if self.opt.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"--opt.optimizer must be adamw or sgd, got {self.opt.optimizer!r}")
        if self.opt.batch_size <= 0:
            raise ValueError(f"--opt.batch_size must be positive, got {self.opt.batch_size}")
        r = self.reg
        if r.method not in REG_METHODS:
            raise ValueError(f"--reg.method must be one of {', '.join(REG_METHODS)}, got {r.method!r}")
        if r.method in ("kl_pre", "kl_dwn") and not self.model.load_path:
            raise ValueError(f"--reg.method {r.method} needs a frozen reference model: pass --model.load_path RUN_DIR")
        if r.method in ("ntp_pre", "replace") and not (self.model.load_path or (r.path and not r.synth)):
            raise ValueError(f"--reg.method {r.method} needs old data: pass --model.load_path RUN_DIR (replays its "
                             "data, or samples from it with --reg.synth true) or --reg.path OLD.bin")
        if r.synth and r.method not in ("ntp_pre", "kl_pre", "replace"):
            raise ValueError(f"--reg.synth true only applies to ntp_pre, kl_pre or replace, not {r.method}")
        if r.method in ("ntp_pre", "kl_pre"):
            if r.batch_size <= 0:
                raise ValueError(f"--reg.batch_size must be positive for {r.method}, got {r.batch_size}")
            if not r.synth and r.batch_size > self.opt.batch_size:
                raise ValueError(f"real replay batch (--reg.batch_size {r.batch_size}) is larger than the data "
                                 f"batch (--opt.batch_size {self.opt.batch_size}); lower it or use --reg.synth true")
        if r.synth and r.buffer <= 0:
            raise ValueError(f"--reg.buffer must be positive, got {r.buffer}")
        if r.synth and r.temperature < 0:
            raise ValueError(f"--reg.temperature must be >= 0, got {r.temperature}")
        if r.method == "replace" and not 0 < r.coeff < 1:
            raise ValueError(f"--reg.method replace takes --reg.coeff as the replaced fraction in (0, 1), got {r.coeff}")
        if r.coeff < 0:
            raise ValueError(f"--reg.coeff must be >= 0, got {r.coeff}")
        if self.mix.path and not 0 < self.mix.coeff < 1:
            raise ValueError(f"--mix.coeff must be in (0, 1) when --mix.path is given, got {self.mix.coeff}")
        for flag, frac, on in (("--mix.coeff", self.mix.coeff, bool(self.mix.path)),
                               ("--reg.coeff", r.coeff, r.method == "replace")):
            if not on:  # (when on, frac is already checked to lie in (0, 1) above)
                continue
            rows = data_lib.num_rows(frac, self.opt.batch_size)
            if not 1 <= rows < self.opt.batch_size:
                raise ValueError(f"{flag} {frac} takes floor({frac} * {self.opt.batch_size}) = {rows} rows of each "
                                 f"batch of --opt.batch_size {self.opt.batch_size}; it must give 1 to "
                                 f"{self.opt.batch_size - 1} rows: raise the fraction or the batch size")
        if self.mix.coeff and not self.mix.path:
            raise ValueError("--mix.coeff given without --mix.path")
        if self.model.lora_rank < 0:
            raise ValueError(f"--model.lora_rank must be >= 0, got {self.model.lora_rank}")
        if self.model.lora_rank and not self.model.load_path:
            raise ValueError("--model.lora_rank needs --model.load_path (LoRA adapts a loaded model)")
        if self.run.mesh not in MESH_STRATEGIES:
            raise ValueError(f"--run.mesh must be one of dp, fsdp, tp (or empty), got {self.run.mesh!r}")
        if self.model.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--model.dtype must be bfloat16 or float32, got {self.model.dtype!r}")
        if self.model.vocab_size < 0:
            raise ValueError(f"--model.vocab_size must be >= 0 (0 = from the data), got {self.model.vocab_size}")
        try:
            self.model.model_config()
        except ValueError as e:
            raise ValueError(f"--model.{e}") from None
        if self.data.num_tokens_valid <= 0:
            raise ValueError("--data.num_tokens_valid must be positive (validation loss drives metrics and stops)")


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
