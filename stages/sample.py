"""The sample stage: print sequences sampled from a finished run.

    python -m forgetting.stages.sample --model.load_path runs/<run> --tokenizer tok.tiktoken
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import jax
import numpy as np

from forgetting.core import sampling
from forgetting.training import cli, runs


@dataclass(frozen=True)
class SampleModelArgs:
    """The model to sample from."""

    load_path: str = ""  # a finished run directory (or an authors' weights.npz directory)
    dtype: str = "bfloat16"  # matmul input dtype: bfloat16 or float32


@dataclass(frozen=True)
class SampleConfig:
    """Sample text (or token ids) from a trained model, prompted by a dataset id token or by text."""

    model: SampleModelArgs = field(default_factory=SampleModelArgs)
    tokenizer: str = ""  # .tiktoken file to decode with; empty = print token ids
    num_samples: int = 4  # sequences to sample
    prompt_id: int = -1  # first token of every sample; -1 = the run's dataset id
    # Prompts as text instead (one or more; sample i gets prompt i mod n), tokenized as --reg.prompt_text is in
    # the train stage (training/prompts.py): with --tokenizer, else the checkpoint's own (GGUF / HF), which then
    # also decodes. The printed text is what follows the prompt; --json adds the prompt.
    prompt_text: tuple[str, ...] = ()
    prompt_chat: bool = False  # render each --prompt_text as a user turn of the checkpoint's chat template, assistant header after it
    temperature: float = 1.0  # 0 = greedy
    length: int = 0  # tokens per sample including the prompt; 0 = the model's sequence length
    stop_at_eos: bool = True  # end a sample at the tokenizer's EOS (the rest is padding, not printed)
    seed: int = 0  # sampling key
    json: bool = False  # print one JSON object per sample instead of plain text

    def validate(self) -> None:
        if not self.model.load_path:
            raise ValueError("pass --model.load_path RUN_DIR (a finished run)")
        if self.num_samples <= 0:
            raise ValueError(f"--num_samples must be positive, got {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.model.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--model.dtype must be bfloat16 or float32, got {self.model.dtype!r}")
        if self.length < 0 or self.length == 1:
            raise ValueError(f"--length must be >= 2 (the prompt plus at least one token), or 0 = the model's "
                             f"sequence length; got {self.length}")
        if self.prompt_id < -1 or self.seed < 0:
            raise ValueError(f"--prompt_id must be >= 0 (or -1 = the run's dataset id) and --seed >= 0, got "
                             f"{self.prompt_id}, {self.seed}")
        if self.prompt_text and self.prompt_id != -1:
            raise ValueError("--prompt_text and --prompt_id both give the prompt: keep one")
        empty = [i for i, text in enumerate(self.prompt_text) if not text]
        if empty:
            raise ValueError(f"--prompt_text entries {empty} are empty strings: give each prompt some text")
        if self.prompt_chat and not self.prompt_text:
            raise ValueError("--prompt_chat applies to --prompt_text, which is not given: add it or drop --prompt_chat")


def sample(cfg: SampleConfig) -> list[dict]:
    cfg.validate()
    loaded = runs.load_run(cfg.model.load_path, dtype=cfg.model.dtype)
    if cfg.prompt_text:
        return _sample_text_prompts(cfg, loaded)
    mc = loaded.model_cfg
    encoding = eos_id = None
    if cfg.tokenizer:
        from forgetting.stages import tokenizer as tokenizer_stage

        encoding = tokenizer_stage.load(cfg.tokenizer)
        if loaded.tokenizer_sha256 and tokenizer_stage.file_sha256(cfg.tokenizer) != loaded.tokenizer_sha256:
            raise ValueError(f"--tokenizer {cfg.tokenizer} is not the tokenizer {loaded.path} was trained with "
                             f"(sha256 {loaded.tokenizer_sha256[:12]}…); decoding with it prints gibberish: pass the "
                             "tokenizer its data was made with")
        if encoding.n_vocab != mc.vocab_size:
            raise ValueError(f"tokenizer {cfg.tokenizer} has {encoding.n_vocab} ids but the model has "
                             f"{mc.vocab_size}; pass the tokenizer the run's data was made with")
        eos_id = encoding.eot_token if cfg.stop_at_eos else None
    prompt_id = cfg.prompt_id if cfg.prompt_id >= 0 else loaded.lineage_ids[-1]
    if not 0 <= prompt_id < mc.vocab_size:
        raise ValueError(f"--prompt_id {prompt_id} is outside the model's vocab [0, {mc.vocab_size})")
    prompts = np.full((cfg.num_samples,), prompt_id, np.int32)
    tokens = np.asarray(sampling.sample(mc, loaded.params, prompts, jax.random.key(cfg.seed), cfg.temperature,
                                        eos_id=eos_id, length=cfg.length or None))
    out = []
    for row in tokens:
        ids = row.tolist()
        if eos_id is not None and eos_id in ids[1:]:
            ids = ids[: ids.index(eos_id, 1) + 1]
        item = {"tokens": ids}
        if encoding is not None:
            # Column 0 is the dataset-id prompt, not text: decode from column 1.
            item["text"] = encoding.decode([t for t in ids[1:] if t != eos_id])
        out.append(item)
    return out


def _sample_text_prompts(cfg: SampleConfig, loaded: runs.LoadedRun) -> list[dict]:
    """`--prompt_text`: samples prompted by the texts' token ids (`stages.prompts`), the continuation
    decoded with the tokenizer that encoded the prompts."""
    from forgetting.training import prompts

    mc = loaded.model_cfg
    length = cfg.length or mc.seq_len
    tok = prompts.find_tokenizer(loaded.path, explicit=cfg.tokenizer, data_paths=(loaded.data_path,),
                                 tokenizer_sha256=loaded.tokenizer_sha256, flag="--tokenizer")
    ids = prompts.encode_prompts(cfg.prompt_text, tok, start_id=loaded.lineage_ids[-1], seq_len=length,
                                 vocab_size=mc.vocab_size, chat=cfg.prompt_chat, flag="--prompt_text",
                                 chat_flag="--prompt_chat")
    prompt_bp, lengths_b = prompts.spread(ids, cfg.num_samples)
    eos_ids = tok.eos_ids if cfg.stop_at_eos else None
    tokens = np.asarray(sampling.sample(mc, loaded.params, prompt_bp, jax.random.key(cfg.seed), cfg.temperature,
                                        eos_id=eos_ids, length=length, prompt_lengths=lengths_b))
    out = []
    for i, row in enumerate(tokens):
        n = int(lengths_b[i])
        new = row[n:].tolist()
        ends = [k for k, t in enumerate(new) if eos_ids and t in eos_ids]
        new = new[: ends[0] + 1] if ends else new
        text = tok.decode([t for t in new if not (eos_ids and t in eos_ids)])
        out.append({"tokens": row[:n].tolist() + new, "prompt": cfg.prompt_text[i % len(ids)],
                    "prompt_tokens": n, "text": text})
    return out


run = sample


def main(argv: list[str] | None = None) -> list[dict]:
    cfg, samples = cli.run_or_exit(SampleConfig, sample, argv)
    for i, item in enumerate(samples):
        if cfg.json:
            print(json.dumps(item))
        else:
            print(f"--- sample {i} ---")
            print(item.get("text", " ".join(map(str, item["tokens"]))))
    return samples


if __name__ == "__main__":
    main()
