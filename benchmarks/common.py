"""Helpers shared by the benchmark scripts: machine description, load and interleaved timing."""
from __future__ import annotations

import os
import platform
import subprocess
import time


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


def offline_cpu_env(xla_flags: str):
  """The environment every benchmark runs in; call before importing jax (XLA reads its flags
  once): `xla_flags` replaces the caller's XLA_FLAGS, CPU only, no hub access."""
  os.environ["XLA_FLAGS"] = xla_flags
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
