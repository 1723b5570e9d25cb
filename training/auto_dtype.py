"""`--model.dtype auto`: the matmul input dtype that is faster on the machine at hand.

Accelerators: bfloat16 (their fast path, and the paper's numerics). CPU: a measured probe. Whether
bf16-in/f32-accumulate matmuls beat f32 depends on the processor: about 1.9x f32 on an AMD EPYC with
avx512_bf16, about 0.55x on an Intel Xeon without AMX (README, Benchmarks). The probe times one square
matmul both ways, taking turns, and picks bfloat16 only when it is at least `MARGIN` faster (f32 is the exact one).

The choice is made once per machine and kept in a small JSON file (keyed by processor, backend, jax
version and the probe's version, under $FORGETTING_CACHE_DIR or ~/.cache/forgetting), so every later run, and every run-directory
hash, sees the same dtype; delete the file to measure again. An explicit --model.dtype always wins.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

MARGIN = 1.1  # bf16 must be this much faster than f32 to be chosen
_SIZE, _REPEATS = 1024, 12
PROBE = 2  # the probe's version, part of the kept choice's key: a choice from an older probe is measured again
_chosen: dict | None = None


def processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    root = os.environ.get("FORGETTING_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "forgetting")
    return Path(root) / "auto_dtype.json"


def measure() -> dict:
    """Best-of GFLOP/s of a [N, N] x [N, N] matmul with bf16 inputs and f32 accumulation, and in f32."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (_SIZE, _SIZE), jnp.float32)
    calls = {}
    for name, dtype in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
        a = x.astype(dtype)
        fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        fn(a, a).block_until_ready()  # compiled outside the timing
        calls[name] = lambda fn=fn, a=a: fn(a, a).block_until_ready()
    seconds = best_seconds(calls, _REPEATS, time.perf_counter)
    return {f"{name}_gflops": 2 * _SIZE**3 / s / 1e9 for name, s in seconds.items()}


def best_seconds(calls: dict, repeats: int, clock) -> dict:
    """{name: the fastest of `repeats` timed calls}, the names taking turns (ABBA...): a burst of load from
    another process (a run finishing, a compile) slows both, where timing one name's calls and then the
    other's had once kept f32 on an AMD EPYC whose bf16 matmuls are twice as fast (218 against 214 GFLOP/s
    measured; 420 against 215 alone)."""
    names = list(calls)
    best = dict.fromkeys(names, float("inf"))
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = clock()
            calls[name]()
            best[name] = min(best[name], clock() - start)
    return best


def choose(rates: dict) -> str:
    return "bfloat16" if rates["bfloat16_gflops"] >= MARGIN * rates["float32_gflops"] else "float32"


def auto_dtype() -> dict:
    """{"dtype": "bfloat16" | "float32", "why": one line, ...the probe's numbers}: once per process."""
    global _chosen
    if _chosen is not None:
        return _chosen
    import jax

    backend = jax.default_backend()
    if backend != "cpu":
        _chosen = {"dtype": "bfloat16", "why": f"auto on {backend}: bfloat16 (the accelerator's fast path)"}
        return _chosen
    key = f"{processor()} | {backend} | jax {jax.__version__} | probe {PROBE}"
    path = _cache_file()
    try:
        kept = json.loads(path.read_text()).get(key)
    except (OSError, ValueError):
        kept = None
    if isinstance(kept, dict) and kept.get("dtype") in ("bfloat16", "float32"):
        _chosen = kept
        return _chosen
    rates = measure()
    dtype = choose(rates)
    _chosen = {"dtype": dtype, **rates, "processor": processor(),
               "why": (f"auto on CPU ({processor()}): {dtype}; measured bf16-in/f32-acc matmuls at "
                       f"{rates['bfloat16_gflops']:.0f} GFLOP/s against f32 {rates['float32_gflops']:.0f} "
                       f"(kept in {path}; --model.dtype overrides)")}
    try:
        from forgetting.core.files import write_json_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        write_json_atomic(path, {**(table if isinstance(table, dict) else {}), key: _chosen})
    except OSError:
        pass  # a read-only home: measure again next process
    return _chosen


def resolve(dtype: str) -> str:
    """`dtype` itself, or for "auto" the probe's choice."""
    return auto_dtype()["dtype"] if dtype == "auto" else dtype
