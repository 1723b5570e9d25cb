"""Whole runs side by side: this project's train stage against the authors' released trainer.

    python -m forgetting.bench.versus --reference ~/src/forgetting-authors     # both, alternating
    python -m forgetting.bench.versus                                          # the project alone

`--reference` is a checkout of github.com/martin-marek/forgetting (their `train_single.py`, `model.py`,
...). Nothing of it is part of this project: it is imported at run time, in a child process, from that
folder, and needs `omegaconf` (`pip install omegaconf`). wandb is replaced by a stand-in that, like wandb, reads
every logged metric to the host and writes nothing (no wandb service process in the timing).

Both sides get the same run: the authors' tutorial configuration by default (D=128, L=4, head 32, T=128,
V=4096, batch 32; pretraining 1M tokens at LR 1e-3, finetuning 500K tokens at LR 3e-4, evals every 100K
tokens on 100K validation tokens) on the same two generated synthetic languages, written as raw uint16
files named as the authors' loader wants them (`c4_en.bin` dataset id 0, `c4_es.bin` dataset id 1).
Modes: `pretrain`, `finetune` (plain), `kl_real` (KL to the loaded model on real old data), `kl_self` (on
self-generated replay), `lora` (plain finetuning of rank-r adapters). Finetunes load each side's own
pretrained checkpoint (from the first pair).

Each run is its own process, timed from spawn to exit (imports, compilation, data, evals, checkpoints,
everything). Measured per run:
- `wall_s`: whole-process wall time;
- `train_tokens_per_s`: training tokens per second of training time, both sides by the authors'
  `log.measure_time` definition (steps after the first 5, evaluations left out);
- `peak_rss_mb`: the child's peak resident memory (`wait4` rusage).
Pairs alternate which side goes first; ratios are per pair (authors' wall / project's wall, project's
tokens/s / authors'), reported as the median and range over pairs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from forgetting.training import cli

MODES = ("pretrain", "finetune", "kl_real", "kl_self", "lora")
UNTIMED_STEPS = 5  # the authors' measure_time leaves out the first 5 steps


@dataclasses.dataclass(frozen=True)
class VersusConfig:
    """Whole-run throughput of the train stage, side by side with the authors' trainer."""

    reference: str = ""  # checkout of the authors' code (has train_single.py); empty = the project alone
    modes: tuple[str, ...] = MODES  # any of pretrain finetune kl_real kl_self lora
    pairs: int = 3  # alternating runs per side and mode
    d_model: int = 128  # model width D
    n_layers: int = 4  # blocks L
    head_dim: int = 32  # per-head width (the authors' H)
    seq_len: int = 128  # sequence length T
    vocab_size: int = 4096  # vocabulary V
    batch_size: int = 32  # sequences per step
    pretrain_tokens: int = 1_000_000  # pretraining length
    finetune_tokens: int = 500_000  # finetuning length (every finetune mode)
    pretrain_lr: float = 1e-3  # pretraining peak LR
    finetune_lr: float = 3e-4  # finetuning peak LR (LoRA too)
    valid_tokens: int = 100_000  # validation tokens per dataset
    eval_every_tokens: int = 100_000  # evaluation interval
    data_tokens: int = 2_000_000  # tokens per generated language file
    reg_coeff: float = 10.0  # KL weight
    replay_batch: int = 16  # replay rows per step
    replay_buffer: int = 8  # self-generated replay: steps sampled at once
    lora_rank: int = 16  # LoRA rank
    project_flags: tuple[str, ...] = ()  # extra train-stage flags for the project side, e.g. --model.dtype float32
    work: str = ""  # working folder (data, runs, logs); empty = a fresh temporary folder
    json: str = ""  # also write every run and the summary here
    python: str = ""  # interpreter for both sides (empty = this one)

    def validate(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"--modes: unknown {unknown}; choose from {' '.join(MODES)}")
        if self.pairs < 1:
            raise ValueError("--pairs must be at least 1")
        if self.reference:
            ref = Path(self.reference).expanduser()
            if not (ref / "train_single.py").is_file():
                raise ValueError(f"--reference {self.reference}: no train_single.py there; give the folder of a "
                                 "checkout of github.com/martin-marek/forgetting")


# ----- data ------------------------------------------------------------------------------------------
DATA_FILES = {"c4_en.bin": (0, 0), "c4_es.bin": (1, 1)}  # authors' stem -> (synthetic language, dataset id)


def make_data(cfg: VersusConfig, folder: Path) -> dict[str, Path]:
    from forgetting.stages import generate

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (language, dataset_id) in DATA_FILES.items():
        out = folder / name
        if not out.exists():
            generate.generate(generate.Config(corpus="synthetic", language=language, dataset_id=dataset_id,
                                              num_tokens=cfg.data_tokens, vocab_size=cfg.vocab_size,
                                              seq_len=cfg.seq_len, out=str(out)))
        paths[name] = out
    return paths


# ----- the two sides ---------------------------------------------------------------------------------
# The authors' trainer is imported from --reference in the child; its result dict goes to a JSON file.
_AUTHORS_DRIVER = r"""
import json, os, sys, types
reference, result_path = sys.argv[1], sys.argv[2]

# wandb stand-in: like wandb.log it reads every logged value to the host (so evaluations finish where
# they are logged, outside the timed steps, as in a logged run); it writes nothing and starts no service.
class _Run:
    def __init__(self):
        self.id = os.urandom(4).hex()
        self.config = types.SimpleNamespace(update=lambda *a, **k: None)
        self.summary = {}
    def log(self, metrics, step=None):
        for value in metrics.values():
            float(value)
    def finish(self):
        pass
sys.modules["wandb"] = types.SimpleNamespace(init=lambda **kw: _Run())

sys.path.insert(0, reference)
os.chdir(reference)
from omegaconf import OmegaConf
import train_single
cfg = OmegaConf.merge(OmegaConf.create(train_single.DEFAULT_CFG), OmegaConf.from_dotlist(sys.argv[3:]))
result = train_single.train_and_evaluate(cfg)
with open(result_path, "w") as f:
    json.dump(result, f)
"""


def _common(cfg: VersusConfig, mode: str) -> dict:
    finetune = mode != "pretrain"
    return {"tokens": cfg.finetune_tokens if finetune else cfg.pretrain_tokens,
            "lr": cfg.finetune_lr if finetune else cfg.pretrain_lr,
            "data": "c4_es.bin" if finetune else "c4_en.bin"}


def authors_args(cfg: VersusConfig, mode: str, data: dict[str, Path], load: str, save_dir: Path) -> list[str]:
    c = _common(cfg, mode)
    args = [f"data.path={data[c['data']]}", f"data.num_tokens_valid={cfg.valid_tokens}",
            f"model.D={cfg.d_model}", f"model.L={cfg.n_layers}", f"model.H={cfg.head_dim}", f"model.T={cfg.seq_len}",
            f"model.V={cfg.vocab_size}", f"opt.batch_size={cfg.batch_size}", f"opt.peak_lr={c['lr']}",
            f"stop.num_tokens_train={c['tokens']}", f"log.every_tokens={cfg.eval_every_tokens}",
            "log.measure_time=true"]
    if mode == "pretrain":
        args.append(f"model.save_dir={save_dir}")
    else:
        args.append(f"model.load_path={load}")
    if mode in ("kl_real", "kl_self"):
        args += ["reg.method=kl_pre", f"reg.coeff={cfg.reg_coeff}", f"reg.batch_size={cfg.replay_batch}"]
    if mode == "kl_self":
        args += ["reg.synth=true", f"reg.buffer={cfg.replay_buffer}"]
    if mode == "lora":
        args.append(f"model.lora_rank={cfg.lora_rank}")
    return args


def project_args(cfg: VersusConfig, mode: str, data: dict[str, Path], load: str, run_dir: Path) -> list[str]:
    c = _common(cfg, mode)
    args = ["--data.path", str(data[c["data"]]), "--data.num_tokens_valid", str(cfg.valid_tokens),
            "--model.d_model", str(cfg.d_model), "--model.n_layers", str(cfg.n_layers),
            "--model.head_dim", str(cfg.head_dim), "--model.seq_len", str(cfg.seq_len),
            "--opt.batch_size", str(cfg.batch_size), "--opt.peak_lr", str(c["lr"]),
            "--stop.num_tokens_train", str(c["tokens"]), "--log.every_tokens", str(cfg.eval_every_tokens),
            "--log.progress", "false", "--run.dir", str(run_dir)]
    if mode != "pretrain":
        args += ["--model.load_path", load]
    if mode in ("kl_real", "kl_self"):
        args += ["--reg.method", "kl_pre", "--reg.coeff", str(cfg.reg_coeff), "--reg.batch_size", str(cfg.replay_batch)]
    if mode == "kl_self":
        args += ["--reg.synth", "true", "--reg.buffer", str(cfg.replay_buffer)]
    if mode == "lora":
        args += ["--model.lora_rank", str(cfg.lora_rank)]
    return args + list(cfg.project_flags)


def _timed(argv: list[str], log: Path, env: dict | None = None) -> tuple[float, float, int]:
    """Runs argv to completion; (wall seconds, peak RSS MiB, exit code). stderr goes to `log`, stdout to
    `log` with suffix .out."""
    with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def _rate(steps: int, tokens_per_step: int, seconds: float) -> float:
    """Training tokens per second over the timed steps (NaN for a run too short to time any)."""
    timed = steps - UNTIMED_STEPS
    return timed * tokens_per_step / seconds if timed > 0 and seconds > 0 else float("nan")


def _failed(side: str, mode: str, code: int, log: Path) -> RuntimeError:
    tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
    return RuntimeError(f"{side} {mode} run failed (exit {code}); its stderr is in {log}, stdout beside it. "
                        f"Last lines:\n{tail}")


def _fresh(folder: Path) -> None:
    """An empty run folder: a project run left there would be reused, not timed."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def run_authors(cfg: VersusConfig, python: str, mode: str, data: dict, load: str, folder: Path) -> dict:
    _fresh(folder)
    result_path, log = folder / "result.json", folder / "log.txt"
    argv = [python, "-c", _AUTHORS_DRIVER, str(Path(cfg.reference).expanduser().resolve()), str(result_path),
            *authors_args(cfg, mode, data, load, folder / "ckpt")]
    wall, rss, code = _timed(argv, log)
    if code != 0:
        raise _failed("authors'", mode, code, log)
    result = json.loads(result_path.read_text())
    m = result["metrics"]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    steps = round(m["train_tokens_seen"] / tokens_per_step)
    return {"wall_s": wall, "peak_rss_mb": rss, "steps": steps, "train_seconds": m["train_time_elapsed"],
            "train_tokens_per_s": _rate(steps, tokens_per_step, m["train_time_elapsed"]),
            "checkpoint": result.get("out_dir") or "", "valid_ntp": m.get("valid_ntp"), "prev_ntp": m.get("prev_ntp")}


def run_project(cfg: VersusConfig, python: str, mode: str, data: dict, load: str, folder: Path) -> dict:
    _fresh(folder)
    log = folder / "log.txt"
    argv = [python, "-m", "forgetting.stages.train", *project_args(cfg, mode, data, load, folder / "runs")]
    wall, rss, code = _timed(argv, log)
    if code != 0:
        raise _failed("project", mode, code, log)
    final = json.loads(log.with_suffix(".out").read_text().strip().splitlines()[-1])
    tokens_per_step = cfg.batch_size * cfg.seq_len
    steps = int(final["steps"])
    resolved = json.loads((Path(final["run_dir"]) / "config.json").read_text()).get("resolved", {})
    return {"wall_s": wall, "peak_rss_mb": rss, "steps": steps, "train_seconds": final["train_seconds"],
            "train_tokens_per_s": _rate(steps, tokens_per_step, final["train_seconds"]),
            "checkpoint": final["run_dir"], "valid_ntp": final.get("valid_ntp"), "prev_ntp": final.get("prev_ntp"),
            "numerics": resolved.get("numerics")}


# ----- the comparison --------------------------------------------------------------------------------
def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict], with_reference: bool) -> dict:
    summary: dict = {}
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        if not rows:
            continue
        entry: dict = {}
        for side in ("authors", "project"):
            mine = [r[side] for r in rows if side in r]
            if mine:
                entry[side] = {k: _spread([m[k] for m in mine]) for k in ("wall_s", "train_tokens_per_s", "peak_rss_mb")}
        if with_reference:
            entry["ratio"] = {
                "wall": _spread([r["authors"]["wall_s"] / r["project"]["wall_s"] for r in rows]),
                "train_tokens_per_s": _spread([r["project"]["train_tokens_per_s"] / r["authors"]["train_tokens_per_s"]
                                               for r in rows]),
                "peak_rss": _spread([r["project"]["peak_rss_mb"] / r["authors"]["peak_rss_mb"] for r in rows]),
            }
        summary[mode] = entry
    if "finetune" in summary and "kl_self" in summary:
        ft, ks = summary["finetune"]["project"], summary["kl_self"]["project"]
        summary["kl_self_vs_finetune"] = ks["train_tokens_per_s"]["median"] / ft["train_tokens_per_s"]["median"]
    return summary


def _fmt(s: dict, spec: str) -> str:
    return f"{s['median']:{spec}} [{s['min']:{spec}}–{s['max']:{spec}}]"


def table(summary: dict) -> str:
    lines = ["| mode | side | whole-process wall s | training tokens/s | peak RSS MiB |", "|---|---|---|---|---|"]
    for mode in MODES:
        entry = summary.get(mode)
        if entry is None:
            continue
        for side in ("authors", "project"):
            if side in entry:
                e = entry[side]
                lines.append(f"| {mode} | {side} | {_fmt(e['wall_s'], ',.1f')} | {_fmt(e['train_tokens_per_s'], ',.0f')} "
                             f"| {_fmt(e['peak_rss_mb'], ',.0f')} |")
        if "ratio" in entry:
            r = entry["ratio"]
            lines.append(f"| {mode} | ratio | {_fmt(r['wall'], '.2f')}× | {_fmt(r['train_tokens_per_s'], '.2f')}× "
                         f"| {_fmt(r['peak_rss'], '.2f')}× |")
    if "kl_self_vs_finetune" in summary:
        lines.append(f"\nproject kl_self / finetune training tokens/s: {summary['kl_self_vs_finetune']:.2f}×")
    return "\n".join(lines)


def machine() -> dict:
    import jax

    from forgetting.training.auto_dtype import processor

    return {"processor": processor(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "python": platform.python_version()}


def bench(cfg: VersusConfig) -> dict:
    cfg.validate()
    python = cfg.python or sys.executable
    work = Path(cfg.work).expanduser() if cfg.work else Path(tempfile.mkdtemp(prefix="versus_"))
    data = make_data(cfg, work / "data")
    sides = {"project": run_project}
    if cfg.reference:
        sides = {"authors": run_authors, "project": run_project}
    modes = [m for m in MODES if m in cfg.modes]
    need_pretrain = any(m != "pretrain" for m in modes)
    checkpoints: dict[str, str] = {}
    runs: list[dict] = []
    for pair in range(cfg.pairs):
        order = list(sides) if pair % 2 == 0 else list(reversed(sides))
        pair_modes = modes if ("pretrain" in modes or pair > 0 or not need_pretrain) else ["pretrain", *modes]
        for mode in pair_modes:
            row = {"pair": pair, "mode": mode, "order": order}
            for side in order:
                folder = work / "runs" / f"{side}-{mode}-{pair}"
                result = sides[side](cfg, python, mode, data, checkpoints.get(side, ""), folder)
                if mode == "pretrain" and side not in checkpoints:
                    checkpoints[side] = result["checkpoint"]
                row[side] = result
                print(f"pair {pair} {mode:<8} {side:<7} wall {result['wall_s']:7.1f} s  "
                      f"{result['train_tokens_per_s']:9,.0f} tokens/s  RSS {result['peak_rss_mb']:6,.0f} MiB", flush=True)
            if mode in cfg.modes:
                runs.append(row)
    summary = summarize(runs, bool(cfg.reference))
    return {"config": cli.to_dict(cfg), "machine": machine(), "runs": runs, "summary": summary}


def main(argv: list[str] | None = None) -> dict:
    cfg = cli.parse(VersusConfig, argv)
    result = bench(cfg)
    m = result["machine"]
    print(f"\n{m['processor']}, {m['cpus']} CPUs, jax {m['jax']}, Python {m['python']}; "
          f"median [range] over {cfg.pairs} pair(s)")
    print(table(result["summary"]))
    if cfg.json:
        cli.write_json_atomic(Path(cfg.json), result)
    return result


if __name__ == "__main__":
    main()
