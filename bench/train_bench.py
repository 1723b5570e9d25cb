"""Throughput benchmark: matmul peak, then train/eval step and sampler throughput and MFU for each
implementation (`impl`: reference and xla_cpu, see `core.backend`) and dtype, side by side, same shape.

Everything is measured in one process so the MFU is relative to the matmul peak of the same machine in
the same state: MFU = model FLOP/s (from `model.flops_per_token`) / best measured matmul FLOP/s with
bf16 inputs and f32 accumulation (`preferred_element_type=f32`, the model's own matmul recipe).
Each timing is `repeats` runs of `steps` calls after warm-up (compilation excluded, `block_until_ready`
at the end of a run); the table shows the median and the range over the runs.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from forgetting.core import backend, model, optim, sampling, step


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Benchmark the training stack: matmul peak, train/eval/sampler throughput, MFU."""

    d_model: int = 128  # model width D
    n_layers: int = 4  # transformer blocks L
    head_dim: int = 32  # per-head width
    seq_len: int = 128  # sequence length T
    vocab_size: int = 4096  # vocabulary V
    dtype: str = "bfloat16"  # matmul input dtype: bfloat16 (f32 accumulation) or float32
    dtypes: tuple[str, ...] = ()  # several dtypes side by side (e.g. bfloat16 float32); empty = dtype
    impls: tuple[str, ...] = ("reference", "xla_cpu")  # implementations side by side (auto: see the header)
    batch_size: int = 32  # train/eval batch rows
    steps: int = 10  # timed steps per run
    warmup: int = 3  # untimed steps after compilation
    repeats: int = 5  # timed runs; median and range are reported
    sampler_batch: int = 32  # rows sampled at once (0 skips the sampler)
    kl_pre: bool = True  # also time a kl_pre train step with a replay batch of batch_size // 2
    replay_buffer: int = 8  # with kl_pre, self-generated replay: steps per sampled refill (0 skips it)
    matmul_sizes: tuple[int, ...] = (512, 1024, 2048)  # square matmul sizes for the peak
    json: str = ""  # write the results here as JSON (empty: print only)

    def model_config(self, impl: str = "auto", dtype: str | None = None) -> model.ModelConfig:
        return model.ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                                 head_dim=self.head_dim, seq_len=self.seq_len, dtype=dtype or self.dtype,
                                 numerics=backend.Numerics(impl=impl))

    @property
    def replay_rows(self) -> int:
        """Replay rows of a kl_pre step: half the batch."""
        return max(1, self.batch_size // 2)

    def variants(self) -> list[tuple[str, str]]:
        """(impl, dtype) pairs to measure, dtype-major."""
        return [(impl, dtype) for dtype in (self.dtypes or (self.dtype,)) for impl in self.impls]

    def validate(self) -> None:
        if not self.impls:
            raise ValueError("--impls needs at least one of reference, xla_cpu, auto")
        for impl, dtype in self.variants():
            self.model_config(impl, dtype)
        if self.batch_size < 1 or self.steps < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("batch_size, steps and repeats must be >= 1 and warmup >= 0")
        if self.replay_buffer < 0:
            raise ValueError(f"replay_buffer must be >= 0 (0 skips self-generated replay), got {self.replay_buffer}")


def _run_times(fn: Callable[[], Any], n: int, repeats: int) -> list[float]:
    """Mean seconds per call of `n` back-to-back calls (blocking at the end), for each of `repeats` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return times


def _best_time(fn: Callable[[], Any], n: int, repeats: int) -> float:
    """Best over `repeats` runs (for matmul peaks: the attainable rate)."""
    return min(_run_times(fn, n, repeats))


def _summary(times: list[float]) -> dict[str, float]:
    """Median and range of per-run seconds, in ms."""
    ms = np.asarray(times) * 1e3
    return {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "runs": len(times)}


def matmul_peak(sizes: tuple[int, ...], repeats: int = 5) -> dict[str, dict[str, float]]:
    """GFLOP/s of jitted square matmuls per recipe and size."""
    recipes = {
        "bf16_in_f32_acc": (jnp.bfloat16, jnp.float32),
        "f32": (jnp.float32, jnp.float32),
        "bf16_in_bf16_out": (jnp.bfloat16, jnp.bfloat16),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (in_dtype, acc_dtype) in recipes.items():
        f = jax.jit(lambda a, b, acc=acc_dtype: jnp.matmul(a, b, preferred_element_type=acc))
        out[name] = {}
        for n in sizes:
            a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(in_dtype)
            b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(in_dtype)
            jax.block_until_ready(f(a, b))
            calls = max(1, int(2e9 // (2 * n**3)))  # ~2 GFLOP per timed batch of calls
            seconds = _best_time(lambda: f(a, b), calls, repeats)
            out[name][str(n)] = 2 * n**3 / seconds / 1e9
    return out


def shaped_matmuls(cfg: model.ModelConfig, batch_size: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s (bf16 in, f32 acc) of the model's own matmul shapes at this batch: [B·T, D] x [D, N] for
    N = 3D (qkv), 4D (up), V (logits), and [B·T, 4D] x [4D, D] (down). Skinny matmuls (small D) are
    bound by memory traffic, not the multiply units, so they show the attainable ceiling for this model."""
    rows, D = batch_size * cfg.seq_len, cfg.d_model
    shapes = {"qkv": (rows, D, 3 * D), "up": (rows, D, cfg.d_mlp), "down": (rows, cfg.d_mlp, D),
              "logits": (rows, D, cfg.vocab_size)}
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    out = {}
    for name, (m, k, n) in shapes.items():
        a = jnp.ones((m, k), jnp.bfloat16)
        b = jnp.ones((k, n), jnp.bfloat16)
        jax.block_until_ready(f(a, b))
        calls = max(1, int(1e9 // (2 * m * k * n)))
        out[f"{name} {m}x{k}x{n}"] = 2 * m * k * n / _best_time(lambda: f(a, b), calls, repeats) / 1e9
    return out


def _tokens(key: jax.Array, rows: int, cfg: model.ModelConfig) -> jax.Array:
    return jax.random.randint(key, (rows, cfg.seq_len), 0, cfg.vocab_size, jnp.int32)


def _compile_then_time(fn: Callable[[], Any], bc: BenchConfig, calls: int, warmup: int) -> tuple[dict[str, float], float]:
    """(`_summary` of `bc.repeats` runs of `calls` calls, seconds of the first call, i.e. compilation),
    with `warmup` untimed calls between the two."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    return _summary(_run_times(fn, calls, bc.repeats)), compile_s


def _train_stepper(cfg: model.ModelConfig, params: Any, reg: str) -> Callable[[dict], Any]:
    """batch -> metrics: `reg`'s train step (AdamW) on a state of its own; `params` is also the reference."""
    opt = optim.optimizer("adamw", 1e-4)
    fn = step.make_train_step(cfg, opt, reg_method=reg, reg_coeff=1.0)
    frozen = {"ref": params if reg == "kl_pre" else None, "base": None}
    holder = {"state": step.init_state(params, opt)}

    def run(batch: dict) -> Any:
        holder["state"], metrics = fn(holder["state"], batch, frozen)
        return metrics

    return run


def _time_train(cfg: model.ModelConfig, bc: BenchConfig, params: Any, reg: str) -> dict[str, float]:
    run_step = _train_stepper(cfg, params, reg)
    batch = {"tokens": _tokens(jax.random.key(1), bc.batch_size, cfg)}
    replay_rows = 0
    if reg == "kl_pre":
        replay_rows = bc.replay_rows
        batch["replay"] = _tokens(jax.random.key(2), replay_rows, cfg)
    timing, compile_s = _compile_then_time(lambda: run_step(batch), bc, bc.steps, bc.warmup)
    seconds = timing["median_ms"] / 1e3
    new_tokens = bc.batch_size * cfg.seq_len
    per_token = model.flops_per_token(cfg)
    # model FLOPs per step: fwd+bwd over new and replay rows, plus a forward (1/3) of the reference
    flops = per_token * (bc.batch_size + replay_rows + replay_rows / 3) * cfg.seq_len
    return {**timing, "step_ms": seconds * 1e3, "tokens_per_s": new_tokens / seconds,
            "all_tokens_per_s": (bc.batch_size + replay_rows) * cfg.seq_len / seconds,
            "model_gflops": flops / seconds / 1e9, "compile_s": compile_s}


def _time_eval(cfg: model.ModelConfig, bc: BenchConfig, params: Any) -> dict[str, float]:
    fn = step.make_eval_step(cfg)
    tokens = _tokens(jax.random.key(3), bc.batch_size, cfg)
    timing, _ = _compile_then_time(lambda: fn(params, tokens), bc, bc.steps, bc.warmup)
    seconds = timing["median_ms"] / 1e3
    flops = model.flops_per_token(cfg) / 3 * bc.batch_size * cfg.seq_len
    return {**timing, "step_ms": seconds * 1e3, "tokens_per_s": bc.batch_size * cfg.seq_len / seconds,
            "model_gflops": flops / seconds / 1e9}


def _time_sampler(cfg: model.ModelConfig, bc: BenchConfig, params: Any, rows: int,
                  return_hidden: bool = False) -> dict[str, float]:
    prompt = jnp.zeros((rows,), jnp.int32)
    calls = max(1, bc.steps // 5)
    keys = iter(jax.random.split(jax.random.key(4), 2 + bc.repeats * calls))
    # one untimed call after compilation: it still runs about twice as long (first use of the phase caches)
    timing, compile_s = _compile_then_time(
        lambda: sampling.sample(cfg, params, prompt, next(keys), 1.0, return_hidden=return_hidden), bc, calls, 1)
    seconds = timing["median_ms"] / 1e3
    generated = rows * (cfg.seq_len - 1)
    return {**timing, "call_ms": seconds * 1e3, "tokens_per_s": generated / seconds, "compile_s": compile_s}


def kl_self_flops_per_step(cfg: model.ModelConfig, batch_size: int, replay_rows: int) -> float:
    """Model FLOPs of one self-generated kl_pre step as the train stage runs it on one device: fwd+bwd
    over the new and replay rows, the reference's output embedding over the replay rows (its hidden states
    come from the sampler), and the share of sampling for one step (a forward per replay token)."""
    per_token = model.flops_per_token(cfg)
    reference_head = 2 * cfg.d_model * cfg.vocab_size
    return (per_token * (batch_size + replay_rows) + (reference_head + per_token / 3) * replay_rows) * cfg.seq_len


def kl_self_flop_bound(cfg: model.ModelConfig, batch_size: int, replay_rows: int) -> float:
    """The KL-self / plain tokens/s ratio if every FLOP of both ran at the same rate: plain-step FLOPs over
    `kl_self_flops_per_step`. Beating it takes running the extra work faster than the plain step runs its
    own, or hiding it on idle cores."""
    return model.flops_per_token(cfg) * batch_size * cfg.seq_len / kl_self_flops_per_step(cfg, batch_size, replay_rows)


def _time_kl_self(cfg: model.ModelConfig, bc: BenchConfig, params: Any) -> dict[str, Any]:
    """Self-generated kl_pre as the train stage runs it on one device: the step fed the sampler's hidden
    states (no reference forward), one sampler refill of rows × replay_buffer rows, and the two together
    through `SelfGeneratedReplay` with its prefetch thread (whole refills per timed run)."""
    from forgetting.training import replay

    rows, buffer = bc.replay_rows, bc.replay_buffer
    refill = _time_sampler(cfg, bc, params, rows * buffer, return_hidden=True)
    replay_rows, hidden = sampling.sample(cfg, params, jnp.zeros((rows * buffer,), jnp.int32), jax.random.key(5),
                                          1.0, return_hidden=True)
    run_step = _train_stepper(cfg, params, "kl_pre")
    tokens = _tokens(jax.random.key(1), bc.batch_size, cfg)
    batch = {"tokens": tokens, "replay": replay_rows[:rows], "replay_ref_hidden": hidden[:rows]}
    from_hidden, _ = _compile_then_time(lambda: run_step(batch), bc, bc.steps, bc.warmup)

    source = replay.SelfGeneratedReplay(cfg, params, [0], rows, buffer, 1.0, seed=0, prefetch=True, keep_hidden=True)
    step_index = itertools.count()

    def staged():
        s = next(step_index)
        return run_step({"tokens": tokens, "replay": source.rows(s), "replay_ref_hidden": source.ref_hidden(s)})

    try:  # untimed: the first refill, sampled in the foreground while the next one is prefetched
        with_sampling, _ = _compile_then_time(staged, bc, buffer * max(1, -(-bc.steps // buffer)), buffer - 1)
    finally:
        source.close()
    serial_ms = from_hidden["median_ms"] + refill["median_ms"] / buffer
    return {"replay_rows": rows, "replay_buffer": buffer, "step_from_sampler_hidden": from_hidden,
            "sampler_refill": refill, "step_with_sampling": with_sampling, "serial_step_ms": serial_ms,
            "flop_bound": kl_self_flop_bound(cfg, bc.batch_size, rows)}


def _variant_key(impl: str, dtype: str) -> str:
    return f"{impl}/{dtype}"


def run(bc: BenchConfig) -> dict[str, Any]:
    """Runs every measurement and returns the results dict (also written to `bc.json` if set)."""
    bc.validate()
    cfg = bc.model_config()
    params = model.init(cfg, jax.random.key(0))  # the same f32 parameters for every variant
    results: dict[str, Any] = {
        "config": dataclasses.asdict(bc),
        "env": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                "device_kind": jax.devices()[0].device_kind, "machine": platform.machine(),
                "processor": platform.processor(), "auto_impl": backend.auto_impl()},
        "model": {"param_count": model.param_count(cfg), "paper_param_count": model.paper_param_count(cfg),
                  "flops_per_token": model.flops_per_token(cfg)},
    }
    peaks = matmul_peak(tuple(bc.matmul_sizes))
    results["matmul_gflops"] = peaks
    best = {name: max(v.values()) for name, v in peaks.items()}
    results["matmul_best_gflops"] = best
    peak = best["bf16_in_f32_acc"]
    results["model_shaped_matmul_gflops"] = shaped_matmuls(cfg, bc.batch_size)
    results["variants"] = {}
    for impl, dtype in bc.variants():
        vcfg = bc.model_config(impl, dtype)
        r: dict[str, Any] = {"train": _time_train(vcfg, bc, params, "none"), "eval": _time_eval(vcfg, bc, params)}
        if bc.sampler_batch > 0:
            r["sampler"] = _time_sampler(vcfg, bc, params, bc.sampler_batch)
        if bc.kl_pre:
            r["train_kl_pre"] = _time_train(vcfg, bc, params, "kl_pre")
            if bc.replay_buffer > 0:
                kl_self = _time_kl_self(vcfg, bc, params)
                plain_ms = r["train"]["median_ms"]
                kl_self["ratio_to_plain"] = plain_ms / kl_self["step_with_sampling"]["median_ms"]
                kl_self["serial_ratio_to_plain"] = plain_ms / kl_self["serial_step_ms"]
                r["kl_self"] = kl_self
        for key in ("train", "eval", "train_kl_pre"):
            if key in r:
                r[key]["mfu"] = r[key]["model_gflops"] / peak
        results["variants"][_variant_key(impl, dtype)] = r
    if bc.json:
        from forgetting.core.files import write_json_atomic

        write_json_atomic(Path(bc.json), results)
    return results


def _cell(timing: dict[str, float]) -> str:
    return f"{timing['median_ms']:.1f} [{timing['min_ms']:.1f}-{timing['max_ms']:.1f}]"


def table(results: dict[str, Any]) -> str:
    """A readable summary of `run`'s results: one column per (impl, dtype), median [min-max] per cell."""
    c, m = results["config"], results["model"]
    lines = [
        f"model D={c['d_model']} L={c['n_layers']} head={c['head_dim']} T={c['seq_len']} V={c['vocab_size']} "
        f"batch={c['batch_size']}: {m['param_count']:,} params, {m['flops_per_token'] / 1e6:.2f} MFLOP/token "
        "(fwd+bwd)",
        f"backend {results['env']['backend']} x{results['env']['devices']}, jax {results['env']['jax']}; "
        f"impl=auto here is {results['env']['auto_impl']}",
        "",
        "matmul GFLOP/s     " + "".join(f"{n:>9}" for n in next(iter(results["matmul_gflops"].values()))),
    ]
    for name, row in results["matmul_gflops"].items():
        lines.append(f"  {name:<17}" + "".join(f"{v:9.1f}" for v in row.values()))
    peak = results["matmul_best_gflops"]["bf16_in_f32_acc"]
    lines += ["", "model-shaped matmuls (bf16 in, f32 acc), GFLOP/s:"]
    lines += [f"  {name:<26}{v:9.1f}" for name, v in results.get("model_shaped_matmul_gflops", {}).items()]
    variants = results["variants"]
    width = 26
    lines += ["", f"ms per call: median [min-max] of {c['repeats']} runs; MFU of the median", f"{'':<22}"
              + "".join(f"{k:>{width}}" for k in variants)]
    for key, label in (("train", "train step (reg none)"), ("train_kl_pre", "train step (kl_pre)"),
                       ("eval", "eval step"), ("sampler", "sampler (full seq)")):
        if not all(key in v for v in variants.values()):
            continue
        cells = [_cell(v[key]) for v in variants.values()]
        lines.append(f"{label:<22}" + "".join(f"{cell:>{width}}" for cell in cells))
        if key != "sampler":
            mfus = [f"MFU {100 * v[key]['mfu']:.1f}%" for v in variants.values()]
            lines.append(f"{'':<22}" + "".join(f"{cell:>{width}}" for cell in mfus))
    if all("kl_self" in v for v in variants.values()):
        k0 = next(iter(variants.values()))["kl_self"]
        rows = f"{k0['replay_rows']}x{k0['replay_buffer']}"
        for key, label in (("step_from_sampler_hidden", "kl_pre, sampler hidden"),
                           ("sampler_refill", f"sampler refill {rows}"), ("step_with_sampling", "KL-self step")):
            cells = [_cell(v["kl_self"][key]) for v in variants.values()]
            lines.append(f"{label:<22}" + "".join(f"{cell:>{width}}" for cell in cells))
        cells = [f"{v['kl_self']['ratio_to_plain']:.3f}x (serial {v['kl_self']['serial_ratio_to_plain']:.3f}x)"
                 for v in variants.values()]
        lines.append(f"{'  tokens/s vs plain':<22}" + "".join(f"{cell:>{width}}" for cell in cells))
    lines.append(f"MFU = model FLOP/s / best bf16-in f32-acc matmul ({peak:.1f} GFLOP/s)")
    if c["kl_pre"]:
        lines.append("kl_pre: FLOPs include replay fwd+bwd and the reference forward")
    if all("kl_self" in v for v in variants.values()):
        lines.append(f"KL-self (self-generated kl_pre, one refill of {rows} rows every {k0['replay_buffer']} steps, "
                     "sampled on the prefetch thread; serial: step from the sampler's hidden + refill / buffer). "
                     f"At equal FLOP/s for all work it would run at {k0['flop_bound']:.3f}x plain tokens/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from forgetting.training import cli

    bc = cli.parse(BenchConfig, argv)
    results = run(bc)
    print(table(results))
    if bc.json:
        print(f"wrote {bc.json}")
    return results


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=lambda x: np.asarray(x).tolist())
