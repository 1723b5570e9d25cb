#!/usr/bin/env bash
# Starts a private one-node Slurm (munged + slurmctld + slurmd) on this machine, for tests/test_slurm.py.
#
#   tests/slurm/start_slurm.sh DIR     # prints `export SLURM_CONF=DIR/slurm.conf`; sbatch/squeue then use it
#   tests/slurm/stop_slurm.sh DIR
#
# Needs Debian's slurm-wlm and munge (`apt-get install -y slurm-wlm munge`) and root (slurmd runs jobs as
# their owner). Everything (config, munge key and socket, state, logs) lives under DIR, on ports of its
# own, so it touches no system-wide Slurm. Process tracking is plain /proc (no cgroups in containers).
set -euo pipefail
DIR=$(realpath -m "${1:?usage: start_slurm.sh DIR}")
for tool in munged slurmctld slurmd sbatch scontrol; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; apt-get install -y slurm-wlm munge" >&2; exit 2; }
done
mkdir -p "$DIR"/{state,spool,log,munge}
chmod 700 "$DIR/munge"
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CTLD_PORT=$(free_port); SLURMD_PORT=$(free_port)

# munge: its own key and socket
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
  --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"

cat > "$DIR/slurm.conf" <<CONF
ClusterName=forgetting-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"
slurmctld -i -f "$SLURM_CONF"   # -i: ignore state left by an earlier start
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do  # wait until the node accepts jobs
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed)'; then echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 1
done
echo "error: the Slurm node did not come up; see $DIR/log/" >&2
sinfo >&2 || true
exit 1
