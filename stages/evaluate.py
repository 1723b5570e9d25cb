"""The evaluate stage: NTP (and KL to a reference) of a finished run on a token file's validation split.

    python -m forgetting.stages.evaluate --model.load_path runs/<run> --data.path es.bin
"""
from __future__ import annotations

from dataclasses import dataclass, field

from forgetting.core import data as data_lib
from forgetting.core import step as step_lib
from forgetting.training import cli, runs
from forgetting.evals import evaluation
from forgetting.training.train_setup import _open_dataset


@dataclass(frozen=True)
class EvalModelArgs:
    """The model to evaluate."""

    load_path: str = ""  # a finished run directory (or an authors' weights.npz directory)
    ref_path: str = ""  # optional reference run: also report KL(ref ‖ model)
    dtype: str = "bfloat16"  # matmul input dtype: bfloat16 or float32


@dataclass(frozen=True)
class EvalDataArgs:
    """The data to evaluate on (its validation split, as the train stage splits it)."""

    path: str = ""  # .bin token file; default: the run's own training data
    num_tokens_valid: int = 0  # 0 = the run's own setting when evaluating its own data, else 262144
    split_seed: int = -1  # -1 = the run's own split seed
    batch_size: int = 32  # sequences per eval batch
    max_tokens: int = 0  # cap on evaluated tokens (0 = the whole split)


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate a trained model: mean NTP loss, second-half NTP, KL to a reference, task accuracy."""

    model: EvalModelArgs = field(default_factory=EvalModelArgs)
    data: EvalDataArgs = field(default_factory=EvalDataArgs)

    def validate(self) -> None:
        if not self.model.load_path:
            raise ValueError("pass --model.load_path RUN_DIR (a finished run)")
        if self.model.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--model.dtype must be bfloat16 or float32, got {self.model.dtype!r}")
        d = self.data
        if d.batch_size <= 0:
            raise ValueError(f"--data.batch_size must be positive, got {d.batch_size}")
        if d.num_tokens_valid < 0 or d.max_tokens < 0:
            raise ValueError(f"--data.num_tokens_valid and --data.max_tokens must be >= 0 (0 = default), got "
                             f"{d.num_tokens_valid}, {d.max_tokens}")
        if d.split_seed < -1:
            raise ValueError(f"--data.split_seed must be >= 0 (or -1 = the run's own), got {d.split_seed}")


def evaluate(cfg: EvaluateConfig) -> dict:
    cfg.validate()
    loaded = runs.load_run(cfg.model.load_path, dtype=cfg.model.dtype)
    path = cfg.data.path or loaded.data_path
    if not path:
        raise ValueError(f"{loaded.path} does not record its data; pass --data.path FILE.bin")
    own = path == loaded.data_path
    n_valid = cfg.data.num_tokens_valid or (loaded.num_tokens_valid if own else 0) or 262_144
    seed = cfg.data.split_seed if cfg.data.split_seed >= 0 else (loaded.split_seed if own else 0)
    mc = loaded.model_cfg
    try:
        data_tokenizer = data_lib.TokenFile(path).meta.get("tokenizer_sha256")  # checked before any other complaint
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--data.path: {e}") from None
    if not loaded.tokenizer_matches(data_tokenizer):
        raise ValueError(f"{path} was tokenized with tokenizer {data_tokenizer[:12]}…, but {loaded.path} was trained "
                         f"with {loaded.tokenizer_sha256[:12]}…; its loss on this file means nothing: re-tokenize "
                         "the text with the run's tokenizer")
    dataset = _open_dataset(path, mc.vocab_size, mc.seq_len, n_valid, seed, "--data.path")
    ref = None
    if cfg.model.ref_path:
        ref_run = runs.load_run(cfg.model.ref_path, dtype=cfg.model.dtype)
        if ref_run.model_cfg.vocab_size != mc.vocab_size or ref_run.model_cfg.seq_len != mc.seq_len:
            raise ValueError("--model.ref_path has a different vocab or sequence length than --model.load_path")
        ref = ref_run.params
    eval_step = step_lib.make_eval_step(mc) if ref is None or ref_run.model_cfg == mc else None
    if eval_step is None:
        raise ValueError("KL across different architectures is not supported; use runs of the same shape")
    metrics = evaluation.ntp_and_kl(eval_step, loaded.params, dataset, cfg.data.batch_size, ref, cfg.data.max_tokens)
    span = evaluation.answer_span(dataset.token_file.meta)
    if span:
        metrics["acc"] = evaluation.exact_match(mc, loaded.params, dataset, cfg.data.batch_size, span,
                                                cfg.data.max_tokens)
    return {"run_dir": str(loaded.path), "data": str(path), "num_valid_sequences": dataset.num_valid, **metrics}


run = evaluate


def main(argv: list[str] | None = None) -> dict:
    return cli.run_and_print(EvaluateConfig, evaluate, argv)


if __name__ == "__main__":
    main()
