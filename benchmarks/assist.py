"""Latency of one see-hear-answer turn (`assist.respond`), broken down by step.

The turn a user waits for: a spoken question of about `--question-seconds` (espeak-ng, the
synthetic set's `synthesize_speech`) is transcribed by Whisper tiny.en, the assistant trained in
`--workdir` answers it about one image (scikit-image's astronaut, or `--image`) with at most
`--new-tokens` tokens, and espeak-ng speaks the answer into a WAV. After one untimed warm-up turn
(JAX compiles there), `--reps` turns are timed; each step's median (and best), their total
and the turn's wall clock are printed as a markdown table, with the machine and its load.
Target (issue 9): under 3 s in total (wall clock) on the 2-core CPU with SmolLM2-135M.

  python benchmarks/assist.py --workdir=DIR [--reps 5] [--question-seconds 3]
      [--new-tokens 15] [--image photo.png] [--xla-flags "..."]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile

import common  # noqa: E402  (benchmarks/common.py: no jax import)

QUESTION = "what color is the shape in the picture"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="directory of a trained assistant")
  p.add_argument("--reps", type=int, default=5, help="timed turns")
  p.add_argument("--question", default=QUESTION, help="the question espeak-ng speaks")
  p.add_argument("--question-seconds", type=float, default=3.0, help="length of the question")
  p.add_argument("--new-tokens", type=int, default=15, help="max_new_tokens of the answer")
  p.add_argument("--image", default="", help="image file (default: scikit-image's astronaut)")
  p.add_argument("--xla-flags", default="", help="XLA_FLAGS for this run (replaces the env's)")
  args = p.parse_args(argv)
  if args.reps < 1:
    p.error("--reps must be at least 1")
  return args


def main(argv=None):
  args = parse_args(argv)
  load_before = common.load()
  common.offline_cpu_env(args.xla_flags)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import time

  import jax
  import numpy as np

  from edgeglass_jax import asr, assist
  from edgeglass_jax.data import synthetic
  from edgeglass_jax.tasks import assistant as assistant_lib

  if not synthetic.espeak_available():
    sys.exit("benchmarks/assist.py needs espeak-ng (the spoken question and answer)")
  if args.image:
    image = assist.load_image(args.image, args.image)
  else:
    from skimage import data as skimage_data
    image = skimage_data.astronaut()
  question = synthetic.synthesize_speech(args.question, np.random.default_rng(0),
                                         args.question_seconds, assist.SAMPLE_RATE)
  t = time.perf_counter()
  model = assistant_lib.load_assistant(args.workdir)
  asr.load()
  load_s = time.perf_counter() - t

  out_wav = os.path.join(tempfile.mkdtemp(prefix="assist_bench_"), "answer.wav")

  def turn():
    return assist.respond(model, image=image, question_wave=question, speak_to=out_wav,
                          max_new_tokens=args.new_tokens)

  t = time.perf_counter()
  first = turn()
  first_s = time.perf_counter() - t
  turns = [turn() for _ in range(args.reps)]
  steps = [s for s in assist.STEPS if all(s in tr.timings for tr in turns)]
  totals = [tr.total_seconds for tr in turns]
  total = statistics.median(totals)

  print(f"date: {datetime.date.today()}  machine: {common.cpu_model()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, jax {jax.__version__} "
        f"({jax.devices()[0].platform}, {jax.device_count()} device)")
  print(f"before: {load_before}; after: {common.load()}; {args.reps} timed turns after one "
        "warm-up")
  print(f"workdir: {args.workdir}  image: {args.image or 'skimage astronaut'} "
        f"{image.shape[1]}x{image.shape[0]}")
  print(f"question: {len(question) / assist.SAMPLE_RATE:.1f} s spoken {args.question!r}, "
        f"heard {first.question!r}")
  print(f"answer ({first.num_tokens} tokens before EOS, {len(first.text.split())} words, "
        f"max_new_tokens={args.new_tokens}): {first.text!r}; spoken {first.speech_seconds:.1f} s")
  print(f"loading assistant + Whisper: {load_s:.2f} s; first turn (compiles): {first_s:.2f} s")
  print()
  print("| step | median s | best s |")
  print("|---|---|---|")
  for s in steps:
    values = [tr.timings[s] for tr in turns]
    print(f"| {assist.STEP_NAMES[s]} | {statistics.median(values):.3f} | {min(values):.3f} |")
  print(f"| **total of the steps** | **{total:.3f}** | {min(totals):.3f} |")
  walls = [tr.wall_seconds for tr in turns]
  wall = statistics.median(walls)
  print(f"| wall clock of the turn | {wall:.3f} | {min(walls):.3f} |")
  print()
  print(f"target < 3 s in total: {'met' if wall < 3.0 else 'not met'} (wall clock {wall:.2f} s, "
        f"steps {total:.2f} s)")


if __name__ == "__main__":
  main()
