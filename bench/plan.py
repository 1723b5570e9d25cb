"""Plan scale by measurement: compile a configuration's train step ahead of time for a mesh of N fake CPU
devices and read XLA's own per-device memory and FLOP counts. Nothing is allocated: the state and batch
are `jax.ShapeDtypeStruct`s carrying their shardings.

    python -m forgetting.bench.plan                                   # the README table (all cases)
    python -m forgetting.bench.plan --cases paper205m --strategies single,fsdp --remat both
    python -m forgetting.bench.plan --json plan.json --markdown       # also a Markdown table
    python -m forgetting.bench.plan --hours --mfu 0.4                 # GPU-hours of every paper sweep

Per case and placement it prints, per device: arguments (state + batch), outputs, aliased (donated state
reused for the new state), temporaries (activations, gradients, optimizer scratch), the peak estimate
arguments + outputs - aliased + temporaries, and XLA's FLOP count of one step next to the analytic
6·N·tokens (+ attention) count. Placements: `single` (one device), `dp`, `fsdp`, `tp` (all N devices on the
"model" axis) and `fsdp_tp` (N/`--tp` data x `--tp` model), as in `core.sharding`.

Remat: `--remat on` traces the config with `remat="block"` (each transformer block recomputed in the
backward pass) and a rolled layer loop (`unroll=1`).

FLOPs: XLA's cost analysis counts a loop body once, so its count is only shown where the layer loop is
unrolled (the paper model without remat), and even there it undercounts the fused head's chunk loop
(most visible for small D, where the head dominates); the `analytic` column is 6·N_matmul·tokens + causal attention
(x4/3 with remat: one more forward).

Caveats: the numbers are XLA:CPU's compilation of the step (its fusion and buffer assignment), standing in
for an accelerator's; a GPU compile fuses differently, so treat them as +-20%, and keep headroom for the
runtime's own buffers. `--hours` prints `python -m forgetting.experiments.paper_cost` (GPU-hours of every
paper sweep from FLOP counts at an assumed MFU: an estimate, not a measured GPU run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Case:
    """One model shape and global batch."""

    name: str
    family: str  # "paper" (core.model) or "llama"
    shape: dict  # config fields
    batch: int  # sequences per step (global)

    def config(self) -> Any:
        if self.family == "paper":
            from forgetting.core import model

            return model.ModelConfig(**self.shape)
        from forgetting.core import llama

        return llama.LlamaConfig(**self.shape)


def _paper(name: str, d: int, layers: int, batch: int = 256, seq: int = 256) -> Case:
    return Case(name, "paper", dict(vocab_size=4096, d_model=d, n_layers=layers, head_dim=64, seq_len=seq,
                                    dtype="bfloat16"), batch)


# Llama-3.2-1B's shape (HF config: hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocab 128256,
# tied embeddings), at T=1024 with 64 sequences per step (64K tokens).
LLAMA_1B = Case("llama1b", "llama", dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                         head_dim=64, d_mlp=8192, rope_theta=500000.0, tie_embeddings=True,
                                         seq_len=1024, dtype="bfloat16", param_dtype="float32"), 64)

CASES = {c.name: c for c in [
    _paper("paper205m", 1024, 16),
    *(_paper(f"size_d{d}", d, 6) for d in (256, 384, 512, 640, 768)),
    LLAMA_1B,
]}


def param_count(cfg: Any) -> int:
    from forgetting.stages import runs

    return sum(math.prod(s.shape) for s in runs.abstract_params(cfg).values())


def with_remat(cfg: Any, on: bool) -> Any:
    """The config to trace: with `on`, every transformer block is recomputed in the backward pass
    (`remat="block"`) inside a rolled layer loop (`unroll=1`), as remat is used on accelerators. Unrolled,
    XLA:CPU's scheduler runs all recomputations early and nothing is saved."""
    return dataclasses.replace(cfg, remat="block", unroll=1) if on else cfg


def _abstract(tree: Any, shardings: Any) -> Any:
    import jax

    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def measure(case: Case, strategy: str, devices: int, remat: bool, tp: int = 2) -> dict:
    """Compiles one train step (AdamW, NTP loss) and returns XLA's per-device memory and FLOPs."""
    import jax
    import jax.numpy as jnp

    from forgetting.core import optim, sharding
    from forgetting.core import step as step_lib
    from forgetting.stages import runs

    cfg = case.config()
    opt = optim.optimizer("adamw", 1e-3, weight_decay=0.02)
    params = runs.abstract_params(cfg)
    state = jax.eval_shape(lambda p: step_lib.init_state(p, opt), params)
    n = 1 if strategy == "single" else devices
    state_sh = batch_sh = None
    if strategy != "single":
        model_axis = {"tp": n, "fsdp_tp": tp}.get(strategy, 1)
        if n % model_axis:
            raise ValueError(f"--tp {model_axis} does not divide --devices {n}")
        mesh = sharding.make_mesh(n // model_axis, model_axis)
        rule = strategy if strategy != "fsdp_tp" else "fsdp_tp"
        param_sh = sharding.param_shardings(cfg, mesh, rule)
        state_sh = sharding.state_shardings(state, param_sh, mesh)
        batch_sh = {"tokens": sharding.batch_sharding(mesh)}
        if case.batch % (n // model_axis):
            raise ValueError(f"batch {case.batch} is not a multiple of the data axis {n // model_axis}")
    abstract_state = _abstract(state, state_sh)
    tokens = jax.ShapeDtypeStruct((case.batch, cfg.seq_len), jnp.int32,
                                  sharding=None if batch_sh is None else batch_sh["tokens"])
    frozen = {"ref": None, "base": None}
    t0 = time.perf_counter()
    step = step_lib.make_train_step(with_remat(cfg, remat), opt, state_sharding=state_sh, batch_sharding=batch_sh,
                                    streams=1)
    compiled = step.lower(abstract_state, {"tokens": tokens}, frozen).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    tokens_per_step = case.batch * cfg.seq_len
    n_params = param_count(cfg)
    analytic = _analytic_flops_per_token(cfg) * tokens_per_step
    return {"case": case.name, "params": n_params, "batch": case.batch, "seq_len": cfg.seq_len,
            "strategy": strategy, "devices": n, "remat": remat,
            "arguments_gib": args / GiB, "outputs_gib": outs / GiB, "aliased_gib": alias / GiB,
            "temporaries_gib": temp / GiB, "peak_gib": (args + outs - alias + temp) / GiB,
            "xla_tflops_per_device": (float(cost.get("flops", float("nan"))) / 1e12
                                      if case.family == "paper" and not remat else None),
            "analytic_tflops_per_step": analytic * (4 / 3 if remat else 1) / 1e12, "compile_s": round(compile_s, 1)}


def _analytic_flops_per_token(cfg: Any) -> float:
    """6·N_matmul (+ causal attention) per trained token; for Llama, N_matmul counts the unembedding once."""
    from forgetting.core import model

    if isinstance(cfg, model.ModelConfig):
        return model.flops_per_token(cfg)
    D, L, T = cfg.d_model, cfg.n_layers, cfg.seq_len
    per_layer = D * cfg.head_dim * (cfg.n_heads * 2 + cfg.n_kv_heads * 2) + 3 * D * cfg.d_mlp
    return 6 * (L * per_layer + D * cfg.vocab_size) + 12 * L * cfg.n_heads * cfg.head_dim * T / 2


# ------------------------------------------------------------------------------------------ CLI


def _markdown(rows: list[dict]) -> str:
    head = ("| case | params | batch×T | placement | remat | args GiB | temps GiB | peak GiB/device | "
            "TFLOP/step (analytic; XLA per device) | fits 80 GB |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        xla = f"; {r['xla_tflops_per_device']:.2f}" if r["xla_tflops_per_device"] is not None else ""
        place = r["strategy"] if r["strategy"] == "single" else f"{r['strategy']}×{r['devices']}"
        lines.append(f"| {r['case']} | {r['params'] / 1e6:.0f}M | {r['batch']}×{r['seq_len']} | {place} | "
                     f"{'on' if r['remat'] else 'off'} | {r['arguments_gib']:.2f} | {r['temporaries_gib']:.2f} | "
                     f"{r['peak_gib']:.2f} | {r['analytic_tflops_per_step']:.1f}{xla} | "
                     f"{'yes' if r['peak_gib'] * GiB < 0.9 * 80e9 else 'no'} |")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m forgetting.bench.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--strategies", default="single,dp,fsdp,tp", help="single, dp, fsdp, tp, fsdp_tp")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices standing in for accelerators")
    p.add_argument("--tp", type=int, default=2, help="model-axis size for fsdp_tp")
    p.add_argument("--remat", choices=("off", "on", "both"), default="both")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table at the end")
    p.add_argument("--hours", action="store_true", help="only print GPU-hours of the paper sweeps and exit")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilization for --hours")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="accelerator peak dense bf16 TFLOP/s for --hours (989: H100 SXM)")
    args = p.parse_args(argv)
    if args.hours:  # one estimate of the sweeps' cost in the project: experiments.paper_cost
        if not 0 < args.mfu <= 1:
            p.error(f"--mfu must be in (0, 1], got {args.mfu}")
        from forgetting.experiments import paper_cost

        return paper_cost.main(["--mfu", str(args.mfu), "--peak_tflops", str(args.peak_tflops)])
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in ("single", "dp", "fsdp", "tp", "fsdp_tp")]
    if bad:
        p.error(f"unknown strategies {bad}; choose from single, dp, fsdp, tp, fsdp_tp")
    if args.devices < 1:
        p.error("--devices must be >= 1")
    if "jax" not in sys.modules:  # fake devices must be requested before JAX starts
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.device_count() < args.devices:
        p.error(f"JAX sees {jax.device_count()} devices, fewer than --devices {args.devices}; run in a fresh "
                "process (XLA_FLAGS is read when JAX starts)")
    remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    rows = []
    for name in cases:
        for strategy in strategies:
            for remat in remats:
                try:
                    row = measure(CASES[name], strategy, args.devices, remat, args.tp)
                except Exception as e:  # noqa: BLE001 - one case that does not compile must not end the table
                    print(json.dumps({"case": name, "strategy": strategy, "remat": remat,
                                      "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
                    continue
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        print(_markdown(rows))
    return rows


if __name__ == "__main__":
    main()
