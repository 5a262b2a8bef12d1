#!/usr/bin/env bash
# Runs one edgeglass_jax job as N local processes forming one JAX cluster (CPU by default): a
# rehearsal of a multi-host run on one machine (per-process data shards, collectives, process-0
# results). Every process gets EDGEGLASS_COORDINATOR=localhost:PORT, EDGEGLASS_NUM_PROCESSES=N and
# EDGEGLASS_PROCESS_ID=i, which main.py passes to jax.distributed.initialize.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/local_multiprocess.sh N CONFIG WORKDIR [--config.KEY=VALUE ...]
  N        number of processes (>= 1)
  CONFIG   config file, e.g. configs/tiny_random.py[:ARG]
  WORKDIR  shared local work directory (features, checkpoints, results.json)
environment:
  PYTHON               interpreter (default: .venv/bin/python if present, else python3)
  EDGEGLASS_PORT       coordinator port on localhost (default: a free one)
  DEVICES_PER_PROCESS  simulated CPU devices per process (default 1)
  JAX_PLATFORMS        default cpu
  LOG_DIR              per-process logs (default WORKDIR/logs); process 0 also prints to the console
EOF
  exit 2
}

[ $# -ge 3 ] || usage
num=$1
config=$2
workdir=$3
shift 3
[[ $num =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got '$num'" >&2; usage; }
[ -f "${config%%:*}" ] || { echo "config file '${config%%:*}' does not exist" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=python3; fi
fi
port=${EDGEGLASS_PORT:-$("$python" -c 'import socket
s = socket.socket()
s.bind(("localhost", 0))
print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$workdir/logs}
mkdir -p "$log_dir"

export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export EDGEGLASS_COORDINATOR=localhost:$port EDGEGLASS_NUM_PROCESSES=$num
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${DEVICES_PER_PROCESS:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

echo "starting $num processes, coordinator $EDGEGLASS_COORDINATOR, logs in $log_dir" >&2
for ((i = 0; i < num; i++)); do
  log=$log_dir/process_$i.log
  if [ "$i" = 0 ]; then
    EDGEGLASS_PROCESS_ID=$i "$python" -m edgeglass_jax.main --config="$config" \
      --workdir="$workdir" --config.distributed=True "$@" > >(tee "$log") 2>&1 &
  else
    EDGEGLASS_PROCESS_ID=$i "$python" -m edgeglass_jax.main --config="$config" \
      --workdir="$workdir" --config.distributed=True "$@" >"$log" 2>&1 &
  fi
  pids+=($!)
done

# The first process to fail stops the others (they would wait on it in a collective forever).
status=0
while :; do
  running=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [ -n "$pid" ] || continue
    if kill -0 "$pid" 2>/dev/null; then
      running=1
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[$i]=""
    if [ "$rc" != 0 ]; then
      echo "process $i exited with status $rc; stopping the others. Last lines of its log:" >&2
      tail -n 40 "$log_dir/process_$i.log" >&2 || true
      status=$rc
      stop_all
    fi
  done
  [ "$running" = 1 ] && [ "$status" = 0 ] || break
  sleep 0.5
done
for pid in "${pids[@]}"; do
  [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
done
exit "$status"
