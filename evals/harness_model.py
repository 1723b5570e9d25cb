"""An lm-evaluation-harness model over any model this project loads (the `lmeval` extra).

    lm = HarnessModel.load("runs/<run>")            # or a HF checkpoint directory, or a .gguf file
    lm = HarnessModel(text_model)                   # params in memory (the train stage's current ones)
    lm_eval.simple_evaluate(model=lm, tasks=[...])  # also: lm_eval --model forgetting --model_args load_path=...

Registered with the harness as "forgetting". The three request kinds:
- `loglikelihood(context, continuation)`: the summed log-probability of the continuation's tokens given
  the context, and whether every continuation token is the argmax at its position (`is_greedy`). The
  pair is encoded as the harness's own causal models do (`TemplateLM._encode_pair`: trailing context
  spaces move to the continuation, the whole string is encoded and split at the context's length); an
  empty context is the prefix token. The last `max_length + 1` tokens are kept and the last one is never
  fed (it is only a target).
- `loglikelihood_rolling(text)`: the harness's rolling windows (`lm_eval.utils.get_rolling_token_windows`
  with context 1, made disjoint by `make_disjoint_window`) over the model's `max_length`, each scored as a
  loglikelihood request, summed.
- `generate_until(context, gen_kwargs)`: the project's KV-cache sampler (`core.sampling.sample`),
  greedy at temperature 0 (or `do_sample` false), stopping at the tokenizer's end-of-sequence ids and
  after `max_gen_toks`; the text is cut before the first `until` string.

Batching: requests are sorted longest first (the harness's convention, so a too-long batch fails first),
right-padded to a power-of-two width (at least 16, at most `max_length`) and a fixed batch size, so each
width compiles once; results come back in the requests' order.

Devices: rows are split over the data axis of the mesh the parameters already live on (the train stage's,
during training), or, for parameters on one device while several are visible, over all devices with the
parameters replicated; the batch size is rounded up to a multiple of the data-parallel size. Scoring runs
in one process (a multi-process run is refused with a message).

BOS: `add_bos` "auto" prepends the tokenizer's BOS for the Llama-style families (whose configs carry a
`bos_id`, as `stages.benchmarks` scores them) and not for the paper model (trained without one). Text
rendered by a chat template (`apply_chat_template`) never gets one: templates that want it write it.

Tokenizers: a HF directory's or GGUF's own (following a run's `loaded_from` lineage), or for a
paper-model run the `.tiktoken` file its training data was tokenized with (the data sidecar's
`tokenizer`), or `tokenizer=` explicitly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # the optional extra
    raise ImportError("scoring with lm-evaluation-harness needs it installed: pip install 'forgetting[lmeval]'") from err

from forgetting.core import model as model_lib
from forgetting.core import sampling, sharding

GEN_KWARGS = ("until", "max_gen_toks", "temperature", "do_sample")  # what generate_until honours
MIN_WIDTH = 16


@dataclasses.dataclass(frozen=True)
class TextModel:
    """A model of any family with its parameters and tokenizer: what the adapter scores."""

    cfg: Any
    params: Any
    tokenizer: Any  # stages.hf_tokenizer.HFTokenizer or TiktokenTokenizer
    name: str  # the load path (fingerprints the harness's request cache)
    chat_source: str = ""  # where the chat template lives (.jinja, HF directory, .gguf); "" = none known


def data_tokenizer(data_path: str) -> Path | None:
    """The .tiktoken file a token file was made with (its sidecar's `tokenizer`, absolute or relative to
    the working directory or to the sidecar), or None."""
    sidecar = Path(data_path + ".json")
    if not sidecar.exists():
        return None
    recorded = json.loads(sidecar.read_text()).get("tokenizer")
    if not recorded:
        return None
    for candidate in (Path(recorded), sidecar.parent / recorded):
        if candidate.exists():
            return candidate
    return None


def tokenizer_source(path: str | Path, explicit: str = "") -> Path:
    """Where the tokenizer of the model at `path` lives: `explicit`; a HF directory or .gguf (the path
    itself or its `loaded_from` lineage); else the .tiktoken file of a paper-model run's training data."""
    from forgetting.stages import evaluate_benchmarks
    from forgetting.training import runs

    if explicit:
        if not Path(explicit).exists():
            raise FileNotFoundError(f"tokenizer {explicit} does not exist (a .tiktoken file, HF directory or .gguf)")
        return Path(explicit)
    try:
        return evaluate_benchmarks.find_tokenizer_source(path)
    except FileNotFoundError:
        pass
    seen, current = set(), Path(path)
    while (current / runs.CONFIG_FILE).exists() and current not in seen:
        seen.add(current)
        saved = json.loads((current / runs.CONFIG_FILE).read_text())
        found = data_tokenizer(str(saved.get("config", {}).get("data", {}).get("path", "")))
        if found is not None:
            return found
        parent = (saved.get("resolved") or {}).get("loaded_from")
        if not parent:
            break
        current = Path(parent)
    raise FileNotFoundError(f"no tokenizer found for {path} (no HF directory or .gguf in its lineage, and its data "
                            "sidecar names no .tiktoken file that exists); pass the tokenizer explicitly (--tokenizer)")


def load_tokenizer(source: str | Path) -> Any:
    """The tokenizer at `source`: a .tiktoken file of the tokenizer stage (its EOS doubles as BOS: the paper
    model has none), a HF directory or tokenizer.json, or a .gguf."""
    from forgetting.stages import evaluate_benchmarks, tokenizer as tokenizer_stage
    from forgetting.formats import hf_tokenizer

    source = Path(source)
    if source.is_file() and source.suffix not in (".gguf", ".json"):
        enc = tokenizer_stage.load(source)
        eos = tokenizer_stage.eos_id(enc)
        return hf_tokenizer.TiktokenTokenizer(enc, bos_id=eos, eos_id=eos, eos_ids=(eos,))
    return evaluate_benchmarks.find_tokenizer(source, str(source))


def load_text_model(load_path: str | Path, *, tokenizer: str = "", dtype: str = "float32", seq_len: int = 0,
                    chat_template: str = "") -> TextModel:
    """A run directory, HF checkpoint directory or .gguf file with its tokenizer (see `tokenizer_source`)."""
    from forgetting.training import runs

    loaded = runs.load_run(load_path, dtype=dtype, seq_len=seq_len or None)
    source = tokenizer_source(loaded.path, tokenizer)
    chat = chat_template or ("" if _is_tiktoken(source) else str(source))
    return TextModel(loaded.model_cfg, loaded.params, load_tokenizer(source), str(load_path), chat)


def _is_tiktoken(source: Path) -> bool:
    return source.is_file() and source.suffix not in (".gguf", ".json")


def width_bucket(n: int, cap: int) -> int:
    """The padded width of a batch whose longest row has n tokens: a power of two >= 16, at most `cap`."""
    width = MIN_WIDTH
    while width < n:
        width *= 2
    return min(width, cap)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _target_logprobs(cfg: Any, params: Any, inputs_bt: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array):
    """(summed log p(target) over masked positions [B], every masked target is the argmax [B])."""
    logits_btv = model_lib.forward(cfg, params, inputs_bt).astype(jnp.float32)
    logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    target_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
    greedy_bt = jnp.argmax(logits_btv, axis=-1) == targets_bt
    return jnp.sum(jnp.where(mask_bt, target_bt, 0.0), axis=-1), jnp.all(greedy_bt | ~mask_bt, axis=-1)


def _chat_template_of(source: str) -> tuple[str, dict[str, str]]:
    from forgetting.formats import chat_template as ct

    path = Path(source)
    if path.suffix == ".jinja":
        return path.read_text(encoding="utf-8"), {}
    return ct.load_chat_template(path), ct.special_tokens_of(path)


@register_model("forgetting")
class HarnessModel(TemplateLM):
    """lm-evaluation-harness's model interface over a `TextModel` (module doc)."""

    def __init__(self, text_model: TextModel | None = None, *, load_path: str = "", tokenizer: str = "",
                 dtype: str = "float32", seq_len: int = 0, batch_size: int | str = 8, max_length: int = 0,
                 max_gen_toks: int = 0, add_bos: str | bool = "auto", seed: int = 0, chat_template: str = "",
                 device: str | None = None, max_batch_size: int | None = None):
        super().__init__()
        del device, max_batch_size  # the harness passes them to every model; JAX places arrays itself
        if text_model is None:
            if not load_path:
                raise ValueError("HarnessModel needs a TextModel or load_path= (a run directory, HF directory or .gguf)")
            text_model = load_text_model(load_path, tokenizer=tokenizer, dtype=dtype, seq_len=int(seq_len),
                                         chat_template=chat_template)
        self.model = text_model
        self.tok = text_model.tokenizer
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size auto is not supported here: give a number (rows per forward)")
        self.batch_size = int(batch_size)
        seq = int(text_model.cfg.seq_len)
        self.max_length = int(max_length) or seq
        self.max_gen_toks = int(max_gen_toks) or min(256, self.max_length // 2)  # the default leaves room for a prompt
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 2 <= self.max_length <= seq:
            raise ValueError(f"max_length must lie in [2, the model's seq_len={seq}], got {max_length} (raise seq_len= "
                             "for a HF/GGUF model)")
        if not 1 <= self.max_gen_toks < self.max_length:
            raise ValueError(f"max_gen_toks must lie in [1, max_length={self.max_length}), got {max_gen_toks}")
        self.model, self._rows = _placed(text_model)
        self.batch_size = -(-self.batch_size // self._rows.num_devices) * self._rows.num_devices \
            if self._rows is not None else self.batch_size
        self.add_bos = _resolve_add_bos(add_bos, text_model.cfg)
        self.seed = int(seed)
        self._chat_rendered = False  # set once the harness renders prompts through the chat template
        self._calls = 0  # generate_until batches so far: folded into the sampling key
        self._template: tuple[str, dict[str, str]] | None = None

    def _put(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """A batch's arrays on the devices: rows split over the data axis where there are several."""
        if self._rows is None:
            return tuple(jnp.asarray(a) for a in arrays)
        return tuple(jax.device_put(a, self._rows.sharding) for a in arrays)

    @classmethod
    def load(cls, load_path: str | Path, **kwargs: Any) -> "HarnessModel":
        return cls(load_path=str(load_path), **kwargs)

    # ----- tokenization ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.tok.bos_id) if self.add_bos else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of `string`; special-token text (a chat rendering's) reads as special ids. BOS as
        `add_bos` says unless `add_special_tokens` is False or the text came through a chat template."""
        ids = list(self.tok.encode(string, allow_special=True))
        bos = self.add_bos and add_special_tokens is not False and not self._chat_rendered
        if bos and (not ids or ids[0] != self.tok.bos_id):
            ids = [int(self.tok.bos_id)] + ids
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    # ----- scoring --------------------------------------------------------------------------------------
    def score_tokens(self, rows: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
        """Per (tokens, n): the summed log-probability of the last n tokens given the ones before, and
        whether each of them is the argmax; at most the last max_length + 1 tokens are used."""
        prepared = []
        for i, (tokens, n) in enumerate(rows):
            tokens = list(tokens)[-(self.max_length + 1):]
            if not 1 <= n <= len(tokens) - 1:
                raise ValueError(f"request {i}: {n} continuation tokens do not fit after at least one context token "
                                 f"within max_length={self.max_length}")
            prepared.append((tokens, n))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(prepared)
        order = sorted(range(len(prepared)), key=lambda i: (-len(prepared[i][0]), i))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = width_bucket(max(len(prepared[i][0]) - 1 for i in idx), self.max_length)
            inputs = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            mask = np.zeros((self.batch_size, width), bool)
            for r, i in enumerate(idx):
                tokens, n = prepared[i]
                length = len(tokens) - 1  # the last token is only a target: it is never fed
                inputs[r, :length], targets[r, :length] = tokens[:-1], tokens[1:]
                mask[r, length - n:length] = True
            logp, greedy = _target_logprobs(self.model.cfg, self.model.params, *self._put(inputs, targets, mask))
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for r, i in enumerate(idx):
                out[i] = (float(logp[r]), bool(greedy[r]))
        return out

    def _loglikelihood_tokens(self, requests: Sequence[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self.score_tokens([(list(ctx) + list(cont), len(cont)) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """The harness's disjoint rolling windows of `text` over max_length (module doc)."""
        tokens = list(self.tok.encode(text, allow_special=True))
        return [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for k, request in enumerate(requests):
            for ctx, cont in self.rolling_windows(request.args[0]):
                windows.append((ctx + cont, len(cont)))
                owners.append(k)
        totals = np.zeros(len(requests), np.float64)
        for k, (logp, _) in zip(owners, self.score_tokens(windows)):
            totals[k] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), float(total))
        return [float(t) for t in totals]

    # ----- generation -----------------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float]:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"generation settings {unknown} are not supported by the forgetting model (it honours "
                             f"{', '.join(GEN_KWARGS)}); remove them from the task's generation_kwargs")
        until = gen_kwargs.get("until", [])
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        if not 1 <= max_gen < self.max_length:
            raise ValueError(f"max_gen_toks must lie in [1, max_length={self.max_length}), got {max_gen}")
        temperature = float(gen_kwargs.get("temperature", 0.0))
        do_sample = gen_kwargs.get("do_sample")
        if do_sample is False:
            temperature = 0.0  # as Hugging Face's generate: no sampling means greedy, whatever the temperature
        elif do_sample is True and "temperature" not in gen_kwargs:
            temperature = 1.0
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        return until, max_gen, temperature

    def complete(self, prompts: Sequence[list[int]], until: Sequence[str], max_gen: int,
                 temperature: float) -> list[str]:
        """Completions of token prompts (batched through the KV-cache sampler), cut at EOS and `until`."""
        keep = self.max_length - max_gen  # prompts lose their oldest tokens to leave room for the answer
        prompts = [(list(p) or [self.prefix_token_id])[-keep:] for p in prompts]
        eos = tuple(int(e) for e in (getattr(self.tok, "eos_ids", ()) or (self.tok.eos_id,)))
        out = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = min(width_bucket(max(len(prompts[i]) for i in idx), self.max_length), keep)
            tokens = np.full((self.batch_size, width), eos[0], np.int32)
            lengths = np.ones((self.batch_size,), np.int32)
            for r, i in enumerate(idx):
                tokens[r, :len(prompts[i])], lengths[r] = prompts[i], len(prompts[i])
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self._calls)
            self._calls += 1
            tokens, lengths = self._put(tokens, lengths)
            sampled = np.asarray(sampling.sample(self.model.cfg, self.model.params, tokens, key, temperature,
                                                 eos_id=eos, pad_id=eos[0], length=width + max_gen,
                                                 prompt_lengths=lengths))
            for r, i in enumerate(idx):
                new = [int(t) for t in sampled[r, lengths[r]:lengths[r] + max_gen]]
                stop = next((j for j, t in enumerate(new) if t in eos), len(new))
                out[i] = cut_at_stops(self.tok_decode(new[:stop]), until)
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)  # requests with the same settings share batches
        for k, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(k)
        out = [""] * len(requests)
        for members in groups.values():
            until, max_gen, temperature = self._generation_settings(dict(requests[members[0]].args[1]))
            texts = self.complete([self.tok_encode(requests[k].args[0]) for k in members], until, max_gen, temperature)
            for k, text in zip(members, texts):
                out[k] = text
                self.cache_hook.add_partial("generate_until", requests[k].args, text)
        return out

    # ----- chat templates -------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.model.chat_source or self.model.name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        if not self.model.chat_source:
            raise ValueError(f"{self.model.name} has no chat template (a paper-model run's tokenizer has none); pass "
                             "one (chat_template= a .jinja file, HF directory or .gguf) or drop --apply_chat_template")
        return _chat_template_of(self.model.chat_source)[0]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from forgetting.formats import chat_template as ct

        if self._template is None:
            self.chat_template(True)  # refuses a model without a template, with the fix
            self._template = _chat_template_of(self.model.chat_source)
        template, special = self._template
        self._chat_rendered = True
        return ct.render(template, chat_history, add_generation_prompt=add_generation_prompt, special_tokens=special)


@dataclasses.dataclass(frozen=True)
class _RowPlacement:
    sharding: jax.sharding.NamedSharding  # rows over the mesh's data axis
    num_devices: int  # the data-parallel size: batch sizes are rounded up to a multiple of it


def _placed(text_model: TextModel) -> tuple[TextModel, _RowPlacement | None]:
    """The model with its parameters where they will be read, and where a batch's rows go (None: one
    device, arrays placed by JAX)."""
    if jax.process_count() > 1:
        raise ValueError("lm-evaluation-harness scoring runs in one process; this is one of "
                         f"{jax.process_count()} (score the run's checkpoint afterwards with forgetting.stages.lm_eval)")
    leaf_sharding = getattr(jax.tree.leaves(text_model.params)[0], "sharding", None)
    if isinstance(leaf_sharding, jax.sharding.NamedSharding):  # already on a mesh (the train stage's)
        mesh = leaf_sharding.mesh
    elif jax.device_count() > 1:
        mesh = sharding.make_mesh(jax.device_count())
        text_model = dataclasses.replace(text_model, params=sharding.shard(text_model.params, sharding.replicated(mesh)))
    else:
        return text_model, None
    if sharding.data_parallel_size(mesh) == 1:
        return text_model, None
    return text_model, _RowPlacement(sharding.batch_sharding(mesh), sharding.data_parallel_size(mesh))


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((p for p in (text.find(s) for s in until if s) if p >= 0), default=len(text))
    return text[:cut]


def _resolve_add_bos(add_bos: str | bool, cfg: Any) -> bool:
    value = str(add_bos).lower()
    if value == "auto":
        return hasattr(cfg, "bos_id")  # the Llama-style families; the paper model is trained without a BOS
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"add_bos must be auto, true or false, got {add_bos!r}")
