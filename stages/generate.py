"""Stage `generate`: write an offline corpus as a `.bin` + sidecar, exactly like tokenized text.

    python -m forgetting.stages.generate --corpus toy --task add --num_examples 100000 --out add.bin
    python -m forgetting.stages.generate --corpus synthetic --language 0 --num_tokens 2000000 --out lang0.bin
    python -m forgetting.stages.generate --corpus synthetic --language 1 --num_tokens 2000000 --out lang1.bin

Toy files are consecutive 3n+5-token examples (train them with seq_len 14 for n=3); the dataset id is
the task's BOS id. Synthetic files are streams of independent stationary chains `segment_len` tokens long
(a multiple of `seq_len`, the training sequence length to align with); the dataset id defaults to the
language index. Both are deterministic in their seeds.
"""
from __future__ import annotations

import dataclasses
import time

from forgetting.core import data
from forgetting.training import cli
from forgetting.corpora import synthetic, toy_tasks


@dataclasses.dataclass(frozen=True)
class Config:
    """Generate an offline corpus (toy arithmetic task or synthetic language) as a .bin token file."""

    corpus: str = "toy"  # 'toy' (the paper's arithmetic tasks) or 'synthetic' (related Markov languages)
    out: str = "corpus.bin"  # output .bin; the sidecar goes to OUT.json
    dataset_id: int = -1  # -1: the task's BOS id (toy) or the language index (synthetic)
    seed: int = 0  # toy: example seed; synthetic: seed of the language family's structure
    task: str = "add"  # toy: add | reversal | sort | modadd
    num_examples: int = 100_000  # toy examples (each 3*n_digits+5 tokens)
    n_digits: int = 3  # digits per operand
    modulus: int = 1000  # modulus of modadd
    language: int = 0  # synthetic: which language of the family (0 = base; j >= 1 share `share` of its rows)
    num_tokens: int = 1_000_000  # synthetic tokens to write
    sample_seed: int = 0  # seed of the sampled stream (different seeds give independent samples)
    vocab_size: int = 256  # ids: 4 dataset ids + symbols + EOS
    order: int = 1  # Markov order of each language
    support: int = 8  # successors per state
    alpha: float = 0.3  # Dirichlet concentration of transition rows
    zipf: float = 1.0  # Zipf exponent for choosing successors
    share: float = 0.5  # fraction of transition rows languages j >= 1 share with language 0
    seq_len: int = 128  # training sequence length: chains restart at multiples of it; sets best_loss_nats
    segment_len: int = 0  # tokens per independent chain (0 = the largest multiple of seq_len <= 4096)

    def validate(self) -> None:
        if self.corpus not in ("toy", "synthetic"):
            raise ValueError(f"corpus must be 'toy' or 'synthetic', got {self.corpus!r}")
        if self.corpus == "toy" and self.task not in toy_tasks.TASKS:
            raise ValueError(f"task must be one of {', '.join(toy_tasks.TASKS)}")
        if self.corpus == "synthetic" and self.segment_len and self.segment_len % self.seq_len:
            raise ValueError("segment_len must be a multiple of seq_len")
        if (self.num_examples if self.corpus == "toy" else self.num_tokens) < 1:
            raise ValueError("the corpus would be empty: ask for at least one example/token")
        if self.seq_len < 2:
            raise ValueError(f"--seq_len must be >= 2 (the training sequence length), got {self.seq_len}")
        if self.segment_len < 0:
            raise ValueError(f"--segment_len must be >= 0 (0 = automatic), got {self.segment_len}")
        if self.dataset_id < -1:
            raise ValueError(f"--dataset_id must be >= 0 (or -1 = automatic), got {self.dataset_id}")
        for flag, value in (("--seed", self.seed), ("--sample_seed", self.sample_seed), ("--language", self.language)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if self.n_digits < 1 or self.modulus < 1:
            raise ValueError(f"--n_digits and --modulus must be >= 1, got {self.n_digits}, {self.modulus}")
        cli.check_output_file("--out", self.out)

    def language_spec(self) -> synthetic.LanguageSpec:
        return synthetic.LanguageSpec(seed=self.seed, vocab_size=self.vocab_size, order=self.order, support=self.support,
                                      alpha=self.alpha, zipf=self.zipf, share=self.share)


def _generate_toy(cfg: Config) -> dict:
    rows = toy_tasks.make_examples(cfg.task, cfg.num_examples, cfg.seed, cfg.n_digits, cfg.modulus)
    dataset_id = toy_tasks.task_bos_id(cfg.task) if cfg.dataset_id < 0 else cfg.dataset_id
    meta = {
        "kind": "toy", "generator": "forgetting.corpora.toy_tasks", "task": cfg.task,
        "dataset_id": dataset_id, "vocab_size": len(toy_tasks.TOY_VOCAB), "eos_id": toy_tasks.EOS,
        "tokenizer_sha256": None, "seq_len": toy_tasks.seq_len(cfg.n_digits),
        "prompt_len": toy_tasks.prompt_len(cfg.n_digits), "n_digits": cfg.n_digits, "modulus": cfg.modulus,
        "num_examples": cfg.num_examples, "seed": cfg.seed, "vocab": list(toy_tasks.TOY_VOCAB),
    }
    return data.write_token_file(cfg.out, rows, meta)


def _generate_synthetic(cfg: Config) -> dict:
    lang = synthetic.MarkovLanguage(cfg.language, cfg.language_spec())
    segment = cfg.segment_len or cfg.seq_len * max(1, 4096 // cfg.seq_len)
    meta = {
        "kind": "synthetic", "generator": "forgetting.corpora.synthetic.MarkovLanguage",
        "dataset_id": cfg.language if cfg.dataset_id < 0 else cfg.dataset_id, "vocab_size": cfg.vocab_size,
        "eos_id": cfg.vocab_size - 1, "tokenizer_sha256": None, "language": cfg.language, "seed": cfg.seed,
        "sample_seed": cfg.sample_seed, "spec": dataclasses.asdict(cfg.language_spec()), "seq_len": cfg.seq_len,
        "segment_len": segment, "best_loss_nats": lang.best_sequence_loss(cfg.seq_len), **lang.describe(),
    }
    if meta["dataset_id"] >= synthetic.N_ID_TOKENS:
        raise ValueError(f"dataset_id {meta['dataset_id']} is not one of the reserved ids 0..{synthetic.N_ID_TOKENS - 1}")
    writer = data.TokenWriter(cfg.out)
    try:
        for block in lang.stream(cfg.num_tokens, segment, cfg.sample_seed):
            writer.write(block)
    except BaseException:
        writer.abort()
        raise
    return writer.close(meta)


def generate(cfg: Config) -> dict:
    """Writes the corpus `cfg` describes; returns its sidecar."""
    cfg.validate()
    start = time.perf_counter()
    meta = _generate_toy(cfg) if cfg.corpus == "toy" else _generate_synthetic(cfg)
    return {**meta, "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> None:
    cfg, meta = cli.run_or_exit(Config, generate, argv, prefix="generate: error")
    extra = f", entropy rate {meta['entropy_rate_nats']:.4f} nats" if meta["kind"] == "synthetic" else ""
    print(f"wrote {cfg.out}: {meta['num_tokens']} tokens ({meta['kind']}){extra}, {meta['seconds']:.1f}s")


if __name__ == "__main__":
    main()
