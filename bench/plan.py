"""Plan scale by measurement: compile a configuration's train step ahead of time for a mesh of N fake CPU
devices and read XLA's own per-device memory and FLOP counts. Nothing is allocated: the state and batch
are `jax.ShapeDtypeStruct`s carrying their shardings.

    python -m forgetting.bench.plan                                   # the README table (all cases)
    python -m forgetting.bench.plan --cases paper205m --strategies single,fsdp --remat both
    python -m forgetting.bench.plan --cases instruct --strategies fsdp   # the instruct figure's paper preset
    python -m forgetting.bench.plan --train "--data.path es.bin --model.load_path runs/<run> --reg.method kl_pre \
        --reg.synth true --opt.batch_size 64 --stop.num_tokens_train 100_000_000"    # any train config
    python -m forgetting.bench.plan --json plan.json --markdown       # also a Markdown table
    python -m forgetting.bench.plan --hours                           # GPU-hours of every paper sweep

What is compiled: `--cases` (fixed shapes; `instruct` is the instruct figure's `--scale paper`: Llama-3.2-1B
at its T and batch), or `--train` (a train stage's flags: the model of the flags or of `--model.load_path`
(a run directory, or a HF checkpoint directory's config.json), its batch, replay rows and KL/NTP replay
term, LoRA). `--impl reference` (the default) compiles the path a GPU runs (`impl: auto` picks it on an
accelerator); `--impl xla_cpu` the CPU kernels that `auto` picks here.

GPU-hours: every row prints one estimate beside the utilization it assumes (`experiments.paper_cost`'s
ASSUMED_MFU and PEAK_TFLOPS, the same numbers and the same FLOP count as `paper_cost`): seconds per step
always, and hours of the whole run for a `--train` config with a fixed length.

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
paper sweep from FLOP counts at the same assumed MFU: an estimate, not a measured GPU run).
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
    """One model shape and global batch, or (`train`) a whole train config with its resolved model."""

    name: str
    family: str  # a registered family name (`core.families`): "paper", "llama", ...
    shape: dict  # config fields
    batch: int  # sequences per step (global)
    train: Any = None  # a TrainConfig: replay rows and term, LoRA, run length
    model: Any = None  # its model config (any family), when `train` is given

    def config(self) -> Any:
        if self.model is not None:
            return self.model
        from forgetting.core import families

        return families.by_name(self.family).from_dict(self.shape)


def _paper(name: str, d: int, layers: int, batch: int = 256, seq: int = 256) -> Case:
    return Case(name, "paper", dict(vocab_size=4096, d_model=d, n_layers=layers, head_dim=64, seq_len=seq,
                                    dtype="bfloat16"), batch)


# Llama-3.2-1B's shape (HF config: hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocab 128256,
# tied embeddings), at T=1024 with 64 sequences per step (64K tokens).
LLAMA_1B = Case("llama1b", "llama", dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                         head_dim=64, d_mlp=8192, rope_theta=500000.0, tie_embeddings=True,
                                         seq_len=1024, dtype="bfloat16", param_dtype="float32"), 64)



def _instruct() -> Case:
    """The instruct figure's `--scale paper` finetune: Llama-3.2-1B(-Instruct) at the preset's T and batch."""
    from forgetting.experiments import instruct

    knobs = instruct.PRESETS["paper"]
    return Case("instruct", "llama", dict(LLAMA_1B.shape, seq_len=knobs.seq_len, dtype=knobs.dtype), knobs.batch_size)


CASES = {c.name: c for c in [
    _paper("paper205m", 1024, 16),
    *(_paper(f"size_d{d}", d, 6) for d in (256, 384, 512, 640, 768)),
    LLAMA_1B,
    _instruct(),
]}
IMPLS = ("reference", "xla_cpu")


def train_case(flags: list[str]) -> Case:
    """The Case of a train stage's flags (`python -m forgetting.stages.train FLAGS`): its model (from the flags,
    or the shape of `--model.load_path`), batch, replay and LoRA. Raises ValueError naming the flag to fix."""
    from forgetting.training import cli
    from forgetting.training.train_config import TrainConfig

    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # the train stage's own message (it validates), without its usage
            cfg = cli.parse(TrainConfig, flags)
    except SystemExit:
        why = [line.split("error: ", 1)[1] for line in err.getvalue().splitlines() if "error: " in line]
        raise ValueError(why[-1] if why else f"the train stage does not accept {' '.join(flags)!r}") from None
    mc = _train_model(cfg)
    from forgetting.core import families

    return Case("train", families.of(mc).name, {}, cfg.opt.batch_size, train=cfg, model=mc)


def _train_model(cfg: Any) -> Any:
    import json
    from pathlib import Path

    from forgetting.training import runs

    load = cfg.model.load_path
    if not load:
        vocab = cfg.model.vocab_size or _sidecar_vocab(cfg.data.path)
        return cfg.model.model_config(vocab)
    path = Path(load)
    if path.is_dir() and (path / runs.CONFIG_FILE).exists():
        conf = json.loads((path / runs.CONFIG_FILE).read_text())
        if "resolved" in conf:  # a run directory of this project
            model = runs.model_config_from_dict(runs.read_run_config(path)["resolved"]["model"])
        elif "model_type" in conf:  # a Hugging Face checkpoint: the shape from its config.json alone
            from forgetting.formats import hf_checkpoint

            model = hf_checkpoint.family_module(conf["model_type"]).from_hf_config(conf, seq_len=cfg.model.seq_len)
        else:
            raise ValueError(f"--model.load_path {load}: {path / runs.CONFIG_FILE} is neither a run's nor a HF config")
        return dataclasses.replace(model, **cfg.model.numerics())
    raise ValueError(f"--model.load_path {load}: bench.plan reads the model shape from a run directory or a HF "
                     "checkpoint directory (config.json); give the shape with --model.* flags instead")


def _sidecar_vocab(data_path: str) -> int:
    from forgetting.core import data as data_lib

    sidecar = data_lib.sidecar_path(data_path)
    if sidecar.exists():
        import json

        vocab = int(json.loads(sidecar.read_text()).get("vocab_size") or 0)
        if vocab:
            return vocab
    raise ValueError(f"--model.vocab_size is 0 and {data_path} has no sidecar with a vocab_size here; pass "
                     "--model.vocab_size")


def gpu_estimate(case: Case, mfu: float, peak_tflops: float) -> dict:
    """GPU time of a case at the assumed utilization (experiments.paper_cost's count and formula): seconds per
    step always; hours of the run for a train config with a fixed length (else None)."""
    from forgetting.experiments import paper_cost

    cfg = case.config()
    per_token = (paper_cost.train_flops_per_token(case.train, cfg) if case.train is not None
                 else paper_cost.flops_per_token(cfg))
    hours = None
    if case.train is not None and (case.train.stop.num_tokens_train or case.train.stop.tokens_per_param
                                   or case.train.stop.num_epochs):
        hours = paper_cost.gpu_hours(paper_cost.run_cost(case.train, cfg, _sizes(case.train))[0], mfu, peak_tflops)
    return {"gpu_s_per_step": paper_cost.gpu_hours(per_token * case.batch * cfg.seq_len, mfu, peak_tflops) * 3600,
            "gpu_hours": hours, "assumed_mfu": mfu, "peak_tflops": peak_tflops}


def _sizes(cfg: Any) -> dict[str, float]:
    """Token counts of the data files by stem (for lengths in epochs): the file here, else paper_cost.SIZES."""
    from pathlib import Path

    from forgetting.experiments import paper_cost

    sizes = dict(paper_cost.SIZES)
    path = Path(cfg.data.path)
    if path.exists():
        from forgetting.core import data as data_lib

        sizes[path.stem] = data_lib.TokenFile(str(path)).num_tokens
    elif cfg.stop.num_epochs and path.stem not in sizes:
        raise ValueError(f"--stop.num_epochs: {cfg.data.path} is not here, so its size (tokens) is unknown; give the "
                         "length as --stop.num_tokens_train")
    return sizes


def param_count(cfg: Any) -> int:
    from forgetting.training import runs

    return sum(math.prod(s.shape) for s in runs.abstract_params(cfg).values())


def with_remat(cfg: Any, on: bool) -> Any:
    """The config to trace: with `on`, every transformer block is recomputed in the backward pass
    (`remat="block"`) inside a rolled layer loop (`unroll=1`), as remat is used on accelerators. Unrolled,
    XLA:CPU's scheduler runs all recomputations early and nothing is saved."""
    from forgetting.core import backend

    return backend.with_numerics(cfg, remat="block", unroll=1) if on else cfg


def _abstract(tree: Any, shardings: Any) -> Any:
    import jax

    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def measure(case: Case, strategy: str, devices: int, remat: bool, tp: int = 2, impl: str = "reference") -> dict:
    """Compiles one train step and returns XLA's per-device memory and FLOPs. A fixed case trains AdamW on
    the NTP loss; a train config its own optimizer, replay rows and term, and LoRA adapters. `impl`: the
    model's implementation (`reference`, what a GPU runs; `xla_cpu`, the CPU kernels)."""
    if impl not in IMPLS:
        raise ValueError(f"--impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    import jax
    import jax.numpy as jnp

    from forgetting.core import backend, optim, sharding
    from forgetting.core import step as step_lib
    from forgetting.training import runs

    cfg = backend.with_numerics(case.config(), impl=impl)
    train = case.train
    reg_method, replay_rows, lora_rank = "none", 0, 0
    if train is None:
        opt = optim.optimizer("adamw", 1e-3, weight_decay=0.02)
    else:
        from forgetting.training.train_setup import optimizer_for

        opt = optimizer_for(train.opt, 1e-3)
        reg_method = train.reg.method if train.reg.method != "replace" else "none"
        replay_rows = train.reg.batch_size if reg_method in ("ntp_pre", "kl_pre") else 0
        lora_rank = train.model.lora_rank
    params = runs.abstract_params(cfg)
    trainable = params
    if lora_rank:
        from forgetting.core import lora

        trainable = jax.eval_shape(lambda p: lora.init(cfg, p, lora_rank, jax.random.key(0)), params)
    state = jax.eval_shape(lambda p: step_lib.init_state(p, opt), trainable)
    n = 1 if strategy == "single" else devices
    state_sh = batch_sh = None
    if strategy != "single":
        model_axis = {"tp": n, "fsdp_tp": tp}.get(strategy, 1)
        if n % model_axis:
            raise ValueError(f"--tp {model_axis} does not divide --devices {n}")
        mesh = sharding.make_mesh(n // model_axis, model_axis)
        rule = strategy if strategy != "fsdp_tp" else "fsdp_tp"
        param_sh = sharding.param_shardings(cfg, mesh, rule)
        # LoRA: the adapters are replicated and only the frozen base is sharded, as the train stage places them
        state_sh = sharding.state_shardings(state, param_sh, mesh) if not lora_rank else None
        batch_sh = {"tokens": sharding.batch_sharding(mesh)}
        if replay_rows:
            batch_sh["replay"] = batch_sh["tokens"]
        for what, rows in (("batch", case.batch), ("replay rows", replay_rows)):
            if rows % (n // model_axis):
                raise ValueError(f"{what} {rows} is not a multiple of the data axis {n // model_axis}")
    abstract_state = _abstract(state, state_sh)
    row_sharding = None if batch_sh is None else batch_sh["tokens"]
    batch = {"tokens": jax.ShapeDtypeStruct((case.batch, cfg.seq_len), jnp.int32, sharding=row_sharding)}
    if replay_rows:
        batch["replay"] = jax.ShapeDtypeStruct((replay_rows, cfg.seq_len), jnp.int32, sharding=row_sharding)
    frozen_params = _abstract(params, None if strategy == "single" else param_sh)
    needs_ref = train is not None and train.model.loads
    frozen = {"ref": frozen_params if needs_ref else None, "base": frozen_params if lora_rank else None}
    t0 = time.perf_counter()
    step = step_lib.make_train_step(with_remat(cfg, remat), opt, state_sharding=state_sh, batch_sharding=batch_sh,
                                    streams=1, reg_method=reg_method, reg_coeff=1.0 if train is None else train.reg.coeff,
                                    use_lora=bool(lora_rank))
    compiled = step.lower(abstract_state, batch, frozen).compile()
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
            "strategy": strategy, "devices": n, "remat": remat, "impl": impl, "reg": reg_method,
            "replay_rows": replay_rows, "lora_rank": lora_rank,
            "arguments_gib": args / GiB, "outputs_gib": outs / GiB, "aliased_gib": alias / GiB,
            "temporaries_gib": temp / GiB, "peak_gib": (args + outs - alias + temp) / GiB,
            "xla_tflops_per_device": (float(cost.get("flops", float("nan"))) / 1e12
                                      if case.family == "paper" and not remat else None),
            "analytic_tflops_per_step": analytic * (4 / 3 if remat else 1) / 1e12, "compile_s": round(compile_s, 1)}


def _analytic_flops_per_token(cfg: Any) -> float:
    """6·N_matmul (+ causal attention) per trained token (experiments.paper_cost's count)."""
    from forgetting.experiments import paper_cost

    return paper_cost.flops_per_token(cfg)


# ------------------------------------------------------------------------------------------ CLI


def _markdown(rows: list[dict]) -> str:
    head = ("| case | params | batch×T | placement | remat | args GiB | temps GiB | peak GiB/device | "
            "TFLOP/step (analytic; XLA per device) | fits 80 GB | GPU time (assumed MFU) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        xla = f"; {r['xla_tflops_per_device']:.2f}" if r["xla_tflops_per_device"] is not None else ""
        place = r["strategy"] if r["strategy"] == "single" else f"{r['strategy']}×{r['devices']}"
        lines.append(f"| {r['case']} | {r['params'] / 1e6:.0f}M | {r['batch']}×{r['seq_len']} | {place} | "
                     f"{'on' if r['remat'] else 'off'} | {r['arguments_gib']:.2f} | {r['temporaries_gib']:.2f} | "
                     f"{r['peak_gib']:.2f} | {r['analytic_tflops_per_step']:.1f}{xla} | "
                     f"{'yes' if r['peak_gib'] * GiB < 0.9 * 80e9 else 'no'} | {_gpu_cell(r)} |")
    return head + "\n".join(lines)


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # importing jax (paper_cost does) reads no XLA_FLAGS; starting a backend does

    return xla_bridge.backends_are_initialized()


def _gpu_cell(r: dict) -> str:
    time = f"{r['gpu_hours']:,.3g} GPU-h" if r.get("gpu_hours") is not None else f"{r['gpu_s_per_step']:.3g} GPU-s/step"
    return f"{time} (MFU {r['assumed_mfu']:g} of {r['peak_tflops']:g} TFLOP/s)"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m forgetting.bench.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="", help=f"comma-separated, of {', '.join(CASES)} (default: all, or none "
                   "with --train)")
    p.add_argument("--train", default="", help="a train stage's flags, quoted as one argument: plan that config")
    p.add_argument("--impl", default="reference", help="model implementation to compile: reference (the GPU path, "
                   "default) or xla_cpu (the CPU kernels)")
    p.add_argument("--strategies", default="", help="single, dp, fsdp, tp, fsdp_tp (default: single,dp,fsdp,tp, "
                   "or a --train config's own --run.mesh)")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices standing in for accelerators")
    p.add_argument("--tp", type=int, default=2, help="model-axis size for fsdp_tp")
    p.add_argument("--remat", choices=("off", "on", "both"), default="both")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table at the end")
    p.add_argument("--hours", action="store_true", help="only print GPU-hours of the paper sweeps and exit")
    from forgetting.experiments import paper_cost

    p.add_argument("--mfu", type=float, default=paper_cost.ASSUMED_MFU,
                   help="assumed model FLOP utilization of the GPU-hour estimates (default %(default)s, as paper_cost)")
    p.add_argument("--peak_tflops", type=float, default=paper_cost.PEAK_TFLOPS,
                   help="accelerator peak dense bf16 TFLOP/s of the estimates (default %(default)s: H100 SXM)")
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1:
        p.error(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.peak_tflops <= 0:
        p.error(f"--peak_tflops must be positive, got {args.peak_tflops}")
    if args.hours:  # one estimate of the sweeps' cost in the project: experiments.paper_cost
        return paper_cost.main(["--mfu", str(args.mfu), "--peak_tflops", str(args.peak_tflops)])
    if args.impl not in IMPLS:
        p.error(f"--impl must be one of {', '.join(IMPLS)}, got {args.impl!r}")
    names = [c.strip() for c in args.cases.split(",") if c.strip()] or ([] if args.train else list(CASES))
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    cases = [CASES[c] for c in names]
    if args.train:
        import shlex

        try:
            cases.append(train_case(shlex.split(args.train)))
        except (ValueError, FileNotFoundError) as e:
            p.error(f"--train: {e}")
        run = cases[-1].train.run
        if run.mesh and not args.strategies:  # the config's own placement, unless --strategies asks for others
            args.strategies = run.mesh
            args.tp = run.mesh_model if run.mesh == "fsdp_tp" else args.tp
    strategies = [s.strip() for s in (args.strategies or "single,dp,fsdp,tp").split(",") if s.strip()]
    bad = [s for s in strategies if s not in ("single", "dp", "fsdp", "tp", "fsdp_tp")]
    if bad:
        p.error(f"unknown strategies {bad}; choose from single, dp, fsdp, tp, fsdp_tp")
    if args.devices < 1:
        p.error("--devices must be >= 1")
    if not _backends_started():  # fake devices must be requested before JAX starts its backends
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.device_count() < args.devices:
        p.error(f"JAX sees {jax.device_count()} devices, fewer than --devices {args.devices}; run in a fresh "
                "process (XLA_FLAGS is read when JAX starts)")
    remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    rows = []
    print(f"GPU time {paper_cost.assumption(args.mfu, args.peak_tflops)} (an estimate, not a measurement)",
          file=sys.stderr)
    for case in cases:
        estimate = gpu_estimate(case, args.mfu, args.peak_tflops)
        for strategy in strategies:
            for remat in remats:
                try:
                    row = measure(case, strategy, args.devices, remat, args.tp, args.impl)
                except Exception as e:  # noqa: BLE001 - one case that does not compile must not end the table
                    print(json.dumps({"case": case.name, "strategy": strategy, "remat": remat,
                                      "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
                    continue
                rows.append(dict(row, **estimate))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        print(_markdown(rows))
    return rows


if __name__ == "__main__":
    main()
