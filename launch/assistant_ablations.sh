#!/usr/bin/env bash
# The assistant's full-size stages and README's ablation table, side by side on one machine.
#
# One accelerator (or a big CPU host) has far more room than one SmolLM2-135M + LoRA run needs
# (an H200 ran 7 of them side by side at 11 steps/s each), and compiling and evaluating are
# host work: so the runs go as parallel processes sharing the device (no preallocation), after
# the one feature extraction they all read. Each run is an ordinary resumable workdir under
# ROOT; rerunning this script resumes the unfinished ones and skips the finished.
#
#   ROOT/qa          stage 2 from a fresh bridge (the full-size recipe: `compact` bridges on
#                    whitened tokens, Whisper's block 1), spoken eval
#   ROOT/dpo         stage 3 (DPO) from ROOT/qa
#   ROOT/caption     stage 1 (bridge only, LM frozen); it extracts the feature cache
#   ROOT/cqa         stage 2 from ROOT/caption (the README chain)
#   ROOT/qa_OPTION   stage 2 ablations, each one change to the recipe: the image connector
#                    (perceiver32 perceiver64 perceiver128: visual tokens; compress: 2x2
#                    groups, 64 tokens; mlp: every patch), nosink, nowhiten, audiolayer-1
#                    (Whisper's top), v1 (the earlier defaults) and scratch (ROOT/qa_v1_compact
#                    for "v1,compact": commas become underscores). An option with `audiolayer`
#                    or `v1` reads other Whisper tokens and extracts its own feature cache
#
# usage: launch/assistant_ablations.sh ROOT [SECONDS]
#   SECONDS  stop every run after this long (default: no limit); a stopped run resumes on rerun
# environment: PYTHON (default .venv/bin/python if present, else python3); EXTRA: more
# --config.KEY=VALUE for every run; EXTRA_ARG: options appended to every config ARG (",tiny");
# ABLATIONS: the qa_OPTION runs (default "perceiver32 perceiver64 perceiver128 compress mlp
# nosink nowhiten audiolayer-1 v1 scratch").
# Without the weight packages (an offline GPU box), copy the converted HF dirs
# (~/.cache/edgeglass_jax/{dinov2-small,whisper-tiny.en}) and the GGUF over and set
# EXTRA="--config.encoders.image.package= --config.encoders.image.path=DIR
# --config.encoders.audio.package= --config.encoders.audio.path=DIR --config.lm.path=FILE
# --config.eval.asr_model=DIR" (the Whisper dir).
set -uo pipefail

[ $# -ge 1 ] || { sed -n 2,32p "$0" >&2; exit 2; }
root=$1
limit=${2:-0}
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
arg=${EXTRA_ARG:-}
cfg=configs/assistant.py
mkdir -p "$root"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# A rerun (a resumed, time-limited run) takes its programs from this cache; GPU autotuning is
# skipped, since these small models' steps are not worth its compile time.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$root/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-5}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
start=$(date +%s)

stage() {  # stage NAME CONFIG_ARG [--config.KEY=VALUE ...]: one run, logged to ROOT/NAME.log
  local name=$1 carg=$2
  shift 2
  if [ -f "$root/$name/assistant/params.msgpack" ]; then
    echo "$name: finished before"
    return 0
  fi
  local left=0
  if [ "$limit" -gt 0 ]; then
    left=$((limit - ($(date +%s) - start)))
    [ "$left" -gt 0 ] || { echo "$name: no time left"; return 1; }
  fi
  echo "$name: start $(date +%T)"
  # TERM, not INT: a background job of a non-interactive shell ignores SIGINT.
  timeout --kill-after=20 $([ "$left" -gt 0 ] && echo "$left" || echo 0) \
    "$py" -m edgeglass_jax.main --config="$cfg:$carg$arg" --workdir="$root/$name" \
    ${EXTRA:-} "$@" >"$root/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(date +%T)"
  return $rc
}

features_ready() {
  [ -f "$root/caption/features/train/index.json" ] && [ -f "$root/caption/features/test/index.json" ]
}

stage caption caption &
caption=$!
until features_ready; do
  sleep 5
  kill -0 $caption 2>/dev/null || features_ready || { echo "caption failed before its features" >&2
    tail -30 "$root/caption.log" >&2; exit 1; }
done
F="--config.features_dir=$root/caption/features"

(stage qa qa "$F" && stage dpo dpo --config.init_from="$root/qa") &
ablations="perceiver32 perceiver64 perceiver128 compress mlp nosink nowhiten audiolayer-1 v1 scratch"
for option in ${ABLATIONS-$ablations}; do
  if [[ $option == *audiolayer* || $option == *v1* ]]; then  # other Whisper tokens than caption's
    stage "qa_${option//,/_}" "qa,$option" &
  else
    stage "qa_${option//,/_}" "qa,$option" "$F" &
  fi
done
wait $caption && stage cqa qa --config.init_from="$root/caption"
wait
echo "all done in $(( $(date +%s) - start )) s"
