#!/usr/bin/env bash
# Runs an edgeglass_jax job on every worker of a Cloud TPU VM slice (single- or multi-host):
# creates the slice, copies this checkout to each worker, installs it (launch/setup.sh + jax[tpu])
# and starts `python -m edgeglass_jax.main ... --config.distributed=True` on all workers at once;
# jax.distributed.initialize() finds the other hosts by itself on Cloud TPU.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: TPU_NAME=NAME ZONE=ZONE [CONFIG=configs/X.py[:ARG]] [WORKDIR=DIR] \
         bash launch/tpu_vm.sh COMMAND [--config.KEY=VALUE ...]
commands:
  create   create the slice (ACCELERATOR_TYPE, RUNTIME_VERSION, SPOT=1)
  setup    copy this checkout to every worker and install it there
  run      run main on every worker (needs CONFIG and WORKDIR); extra args are config overrides
  all      create (unless the slice exists), setup, run
  ssh      interactive shell on WORKER (default 0)
  delete   delete the slice
environment:
  TPU_NAME, ZONE     the slice (required)
  PROJECT            gcloud project (default: gcloud's configured one)
  CONFIG             config file relative to the repo, e.g. configs/align_full.py
  WORKDIR            one directory every worker can reach, e.g. gs://BUCKET/runs/NAME
  ACCELERATOR_TYPE   for create (default v4-8); RUNTIME_VERSION (default tpu-ubuntu2204-base)
  REMOTE_DIR         checkout directory on the workers (default edgeglass_jax)
  DETACH=1           run in the background on the workers (log: REMOTE_DIR/run.log) and return
EOF
  exit 2
}

command=${1:-}
case "$command" in
  create | setup | run | all | ssh | delete) shift ;;
  -h | --help | help | "") usage ;;
  *) echo "unknown command '$command'" >&2; usage ;;
esac
required=(TPU_NAME ZONE)
[[ $command =~ ^(run|all)$ ]] && required+=(CONFIG WORKDIR)
for var in "${required[@]}"; do
  [ -n "${!var:-}" ] || { echo "$var is not set (needed by '$command')" >&2; usage; }
done
accelerator=${ACCELERATOR_TYPE:-v4-8}
runtime=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
remote_dir=$(printf '%q' "${REMOTE_DIR:-edgeglass_jax}")
root=$(cd "$(dirname "$0")/.." && pwd)

gcloud_tpu() {
  gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

create() {
  gcloud_tpu create "$TPU_NAME" --accelerator-type="$accelerator" --version="$runtime" \
    ${SPOT:+--spot}
}

setup() {
  local tmp
  tmp=$(mktemp -d)
  tar -C "$root" --exclude=./.venv --exclude=./runs --exclude=__pycache__ --exclude=./.git \
    -czf "$tmp/edgeglass_src.tar.gz" .
  gcloud_tpu scp "$tmp/edgeglass_src.tar.gz" "$TPU_NAME:edgeglass_src.tar.gz" --worker=all
  rm -rf "$tmp"
  on_all_workers "set -e; mkdir -p $remote_dir && tar -xzf edgeglass_src.tar.gz -C $remote_dir \
&& cd $remote_dir && bash launch/setup.sh \
&& .venv/bin/python -m pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
}

run() {
  local cmd
  cmd=$(printf '%q ' .venv/bin/python -m edgeglass_jax.main --config="$CONFIG" \
    --workdir="$WORKDIR" --config.distributed=True "$@")
  if [ -n "${DETACH:-}" ]; then
    cmd="nohup $cmd > run.log 2>&1 < /dev/null &"
  fi
  on_all_workers "cd $remote_dir && $cmd"
}

case "$command" in
  create) create ;;
  setup) setup ;;
  run) run "$@" ;;
  all)
    gcloud_tpu describe "$TPU_NAME" >/dev/null 2>&1 || create
    setup
    run "$@"
    ;;
  ssh) gcloud_tpu ssh "$TPU_NAME" --worker="${WORKER:-0}" ;;
  delete) gcloud_tpu delete "$TPU_NAME" --quiet ;;
esac
