"""Markdown table comparing finished runs (ablations): `python -m edgeglass_jax.compare RUN...`.

Each argument is a run: `DIR`, `NAME=DIR`, or `NAME=DIR1,DIR2,...` for several seeds of one
setting (default name: the first directory's base name). Each directory holds `results.json`.
A run of several seeds shows `mean ± std` (sample std, ddof=1) of each cell over its seeds.

Columns: R@1 of the six directions at one width (default: the largest width all runs share),
the Matryoshka curve (mean R@1 over directions, per width) and the mean zero-shot attribute
accuracy of images and of audio. `--split val` reads the `val/`-prefixed metrics.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from edgeglass_jax import evaluate

Metrics = Mapping[str, float]


def load_runs(args: Sequence[str]) -> Dict[str, List[Dict[str, float]]]:
  """`{name: [metrics of each seed]}` from `[NAME=]DIR[,DIR...]` arguments."""
  runs: Dict[str, List[Dict[str, float]]] = {}
  for arg in args:
    name, _, paths = arg.partition("=") if "=" in arg else ("", "", arg)
    dirs = [p for p in paths.split(",") if p]
    if not dirs:
      raise ValueError(f"run {arg!r} names no directory")
    name = name or os.path.basename(os.path.normpath(dirs[0]))
    if name in runs:
      raise ValueError(f"run name {name!r} given twice; name runs NAME=DIR")
    seeds = []
    for path in dirs:
      results = os.path.join(path, "results.json")
      if not os.path.isfile(results):
        raise FileNotFoundError(f"{results}: no results.json (is the run finished?)")
      with open(results) as f:
        seeds.append(json.load(f)["metrics"])
    runs[name] = seeds
  return runs


def split_metrics(metrics: Metrics, split: str) -> Dict[str, float]:
  """The metrics of one eval split with its prefix removed (`test` is the unprefixed last
  split the align task writes; any other split is prefixed `{split}/`)."""
  if split == "test":
    return {k: v for k, v in metrics.items() if not k.startswith("val/")}
  prefix = f"{split}/"
  return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def _cells(metrics: Metrics, width: int, widths: Sequence[int], directions) -> List[list]:
  """Per seed: the numbers behind each table column (None where the run lacks one)."""
  curve = evaluate.matryoshka_curve(metrics)
  cells = [[metrics.get(f"{d}/R@1@d{width}")] for d in directions]
  cells.append([curve.get(w) for w in widths])
  cells.append([_zero_shot_mean(metrics, m, width) for m in ("image", "audio")])
  return cells


def _zero_shot_mean(metrics: Metrics, modality: str, width: int) -> Optional[float]:
  vals = [v for k, v in metrics.items()
          if k.startswith(f"zeroshot/{modality}/") and k.endswith(f"@d{width}")]
  return float(np.mean(vals)) if vals else None


def _aggregate(values: Sequence[Optional[float]]) -> str:
  vals = [v for v in values if v is not None]
  if not vals:
    return "-"
  if len(vals) == 1:
    return f"{100 * vals[0]:.1f}"
  return f"{100 * np.mean(vals):.1f} ± {100 * np.std(vals, ddof=1):.1f}"


def compare_runs(runs: Mapping[str, Sequence[Metrics]], width: Optional[int] = None,
                 split: str = "test") -> str:
  """Markdown table of runs (`name -> [metrics per seed]`) on one eval split; percent."""
  runs = {name: [split_metrics(m, split) for m in seeds] for name, seeds in runs.items()}
  curves = {name: [evaluate.matryoshka_curve(m) for m in seeds] for name, seeds in runs.items()}
  run_widths = {name: set.intersection(*(set(c) for c in cs)) for name, cs in curves.items()}
  if width is None:
    shared = set.intersection(*run_widths.values()) if run_widths else set()
    if not shared:
      raise ValueError(f"compare_runs: the runs share no width: "
                       f"{ {n: sorted(w) for n, w in run_widths.items()} }")
    width = max(shared)
  widths = sorted(set().union(*run_widths.values()), reverse=True)
  directions = [f"{a}_to_{b}" for a, b in itertools.permutations(evaluate.MODALITIES, 2)]
  short = lambda d: d.replace("image", "I").replace("audio", "A").replace("text", "T").replace(
      "_to_", "→")
  counts = {name: len(seeds) for name, seeds in runs.items()}
  several = max(counts.values()) > 1
  head = (["run"] + (["seeds"] if several else []) + [f"{short(d)} R@1" for d in directions] +
          ["mean R@1 " + " / ".join(f"d{w}" for w in widths), "zero-shot I / A"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, seeds in runs.items():
    per_seed = [_cells(m, width, widths, directions) for m in seeds]
    row = [name] + ([str(counts[name])] if several else [])
    for col in range(len(per_seed[0])):
      parts = zip(*(cells[col] for cells in per_seed))  # one tuple of seeds per sub-value
      row.append(" / ".join(_aggregate(p) for p in parts))
    lines.append("| " + " | ".join(row) + " |")
  note = " (mean ± std over the seeds of each run)" if several else ""
  return f"R@1 (%) on the {split} split at d{width}{note}:\n\n" + "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("runs", nargs="+", help="runs: DIR, NAME=DIR or NAME=DIR1,DIR2,... (seeds)")
  p.add_argument("--width", type=int, default=None, help="width of the R@1 columns")
  p.add_argument("--split", default="test", help="eval split: test (default) or val")
  args = p.parse_args(argv)
  print(compare_runs(load_runs(args.runs), args.width, args.split))
  return 0


if __name__ == "__main__":
  sys.exit(main())
