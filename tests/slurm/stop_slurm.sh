#!/usr/bin/env bash
# Stops what tests/slurm/start_slurm.sh DIR started (by the pid files under DIR only).
DIR=$(realpath -m "${1:?usage: stop_slurm.sh DIR}")
for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
  [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
done
