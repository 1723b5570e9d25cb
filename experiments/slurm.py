"""Slurm job arrays for a figure's runs: one array task per run, one array per wave, waves chained with
`--dependency=afterok`, then one job that summarizes and plots.

`python -m forgetting.experiments.<figure> --slurm DIR [--slurm_cpus 8 --slurm_gpus 1 ...]` writes into DIR:

- `wave<k>.txt`: the wave's commands, one per line (the same commands `--list` prints);
- `wave<k>.sbatch`: a job array (`--array=0-<n-1>`) whose task i runs line i+1 of `wave<k>.txt`;
- `plot.sbatch`: the figure with `--plot_only` (summary.json, CSV and plots) once every wave succeeded;
- `submit.sh`: submits them in order, each with `--dependency=afterok:<previous job>`; prints the job ids.

Run directories are the figure's `--out`, resolved to an absolute path, so every node must see it (a shared
file system). Finished runs are reused and unfinished ones resume, so resubmitting after a failure or a
preemption redoes only what is missing. With `--slurm_requeue` a preempted or timed-out task does that by
itself: its run checkpoints on the signal and the task requeues (see REQUEUE_TASK). Each task runs
`--slurm_setup` first (default: put this Python's bin directory first on PATH, so `python` is the
interpreter that wrote the script).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

SBATCH_OPTIONS = {  # framework flag -> sbatch option
    "slurm_cpus": "--cpus-per-task", "slurm_mem": "--mem", "slurm_gpus": "--gpus-per-task",
    "slurm_time": "--time", "slurm_partition": "--partition", "slurm_account": "--account",
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("slurm (with --slurm DIR)")
    g.add_argument("--slurm", default=None, metavar="DIR",
                   help="write Slurm job-array scripts (one task per run, one array per wave, chained with "
                        "afterok) and DIR/submit.sh into DIR, and exit")
    g.add_argument("--slurm_cpus", type=int, default=2, metavar="N", help="CPUs per task (default: %(default)s)")
    g.add_argument("--slurm_mem", default="8G", metavar="SIZE", help="memory per task (default: %(default)s)")
    g.add_argument("--slurm_gpus", type=int, default=0, metavar="N", help="GPUs per task (default: %(default)s)")
    g.add_argument("--slurm_time", default="24:00:00", metavar="HH:MM:SS",
                   help="time limit per task (default: %(default)s)")
    g.add_argument("--slurm_partition", default="", metavar="NAME", help="partition (default: the cluster's)")
    g.add_argument("--slurm_account", default="", metavar="NAME", help="account to charge (default: yours)")
    g.add_argument("--slurm_parallel", type=int, default=0, metavar="N",
                   help="at most N tasks of a wave at once (0: no limit)")
    g.add_argument("--slurm_requeue", action="store_true",
                   help="preempted or timed-out tasks checkpoint and requeue themselves (sbatch --requeue; "
                        "--slurm_signal_secs before the time limit the task is asked to checkpoint)")
    g.add_argument("--slurm_signal_secs", type=int, default=300, metavar="S",
                   help="with --slurm_requeue: seconds before the time limit at which a task checkpoints and "
                        "requeues (default: %(default)s)")
    g.add_argument("--slurm_setup", default=None, metavar="SHELL",
                   help="shell line every task runs first, e.g. 'source ~/venv/bin/activate' (default: put this "
                        "Python's bin directory first on PATH)")


def check_flags(args: argparse.Namespace) -> str | None:
    """A one-line error for bad Slurm flags, or None."""
    if args.slurm_cpus < 1:
        return f"--slurm_cpus must be >= 1, got {args.slurm_cpus}"
    if args.slurm_gpus < 0 or args.slurm_parallel < 0:
        return "--slurm_gpus and --slurm_parallel must be >= 0"
    if args.slurm_signal_secs < 1:
        return f"--slurm_signal_secs must be >= 1, got {args.slurm_signal_secs}"
    return None


def _header(args: argparse.Namespace, name: str, log: Path, workdir: Path) -> list[str]:
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={log}",
             f"#SBATCH --chdir={workdir}", "#SBATCH --ntasks=1"]
    for flag, option in SBATCH_OPTIONS.items():
        value = getattr(args, flag)
        if value and not (flag == "slurm_gpus" and value == 0):
            lines.append(f"#SBATCH {option}={value}")
    if getattr(args, "slurm_requeue", False):  # see REQUEUE_TASK; append: a requeued task's log keeps every attempt
        lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --signal=B:USR1@{args.slurm_signal_secs}"]
    setup = args.slurm_setup if args.slurm_setup is not None else (
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\"")
    return lines + ["set -euo pipefail", setup]


# With --slurm_requeue a task runs its command in the background and waits for it, so the batch shell can
# answer signals while the run checkpoints:
# - USR1, sent by Slurm --slurm_signal_secs before the time limit (--signal=B:USR1@S, to this shell only):
#   the shell passes SIGTERM on; the run checkpoints and exits 143; the shell requeues the task.
# - SIGTERM to the run alone (a host-level preemption, or `kill` of the task): the run checkpoints and exits
#   143; the shell was not signalled, so it requeues the task.
# - SIGTERM to the whole job (Slurm preempting it, `scontrol requeue`, scancel): the run got it too and
#   checkpoints; the shell waits for it and leaves the decision to Slurm (with --requeue a preempted or
#   requeued task runs again; a cancelled one stays cancelled).
# A requeued task reruns the same command, which resumes from the checkpoint (finished runs are reused).
REQUEUE_TASK = [
    "set +e",
    '( eval "exec $line" ) &  # exec: the run itself is the child that gets the signals',
    "child=$!",
    "job_signalled=0",
    """trap 'echo "near the time limit: the run checkpoints, then the task requeues"; kill -TERM "$child"' USR1""",
    """trap 'job_signalled=1; echo "SIGTERM to the job: the run checkpoints; Slurm decides on the requeue"' TERM""",
    'while kill -0 "$child" 2>/dev/null; do wait "$child"; done',
    'wait "$child"; rc=$?',
    'if { [ "$rc" -eq 143 ] || [ "$rc" -eq 130 ]; } && [ "$job_signalled" -eq 0 ]; then',
    '  echo "the run stopped at a checkpoint (exit $rc): requeueing job $SLURM_JOB_ID"',
    '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
    "fi",
    'exit "$rc"',
]


def write(args: argparse.Namespace, waves: Sequence[tuple[int, Sequence[str]]], plot_command: str,
          name: str) -> Path:
    """Writes the scripts for `waves` ((wave number, commands) pairs, empty waves left out) into
    `args.slurm`; returns the path of `submit.sh`."""
    folder = Path(args.slurm).resolve()
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    workdir = Path.cwd()
    submit = ["#!/usr/bin/env bash", f"# Submits {name}: {len(waves)} wave(s) as job arrays, then the summary/plot job.",
              "set -euo pipefail", f"cd {shlex.quote(str(folder))}", "dep=()"]
    for k, commands in waves:
        (folder / f"wave{k}.txt").write_text("".join(c + "\n" for c in commands))
        throttle = f"%{args.slurm_parallel}" if args.slurm_parallel else ""
        script = _header(args, f"{name}-w{k}", folder / "logs" / f"wave{k}-%A_%a.out", workdir)
        script.insert(5, f"#SBATCH --array=0-{len(commands) - 1}{throttle}")
        script += [f'line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(folder / f"wave{k}.txt"))})',
                   'echo "task $SLURM_ARRAY_TASK_ID: $line"']
        script += REQUEUE_TASK if args.slurm_requeue else ['eval "$line"']
        (folder / f"wave{k}.sbatch").write_text("\n".join(script) + "\n")
        submit += [f'job=$(sbatch --parsable "${{dep[@]}}" wave{k}.sbatch)', f'echo "wave {k}: job $job"',
                   'dep=(--dependency=afterok:"${job%%;*}")']
    plot = _header(args, f"{name}-plot", folder / "logs" / "plot-%j.out", workdir) + [plot_command]
    (folder / "plot.sbatch").write_text("\n".join(plot) + "\n")
    submit += ['job=$(sbatch --parsable "${dep[@]}" plot.sbatch)', 'echo "plot: job $job"']
    path = folder / "submit.sh"
    path.write_text("\n".join(submit) + "\n")
    path.chmod(0o755)
    return path
