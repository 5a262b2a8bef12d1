"""Markdown table comparing finished runs (ablations): `python -m edgeglass_jax.compare DIR...`.

Each argument is a workdir holding `results.json`, optionally named `NAME=DIR` (default name:
the directory's base name). See `evaluate.compare_runs` for the columns.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Sequence

from edgeglass_jax import evaluate


def load_runs(args: Sequence[str]) -> Dict[str, Dict[str, float]]:
  runs = {}
  for arg in args:
    name, _, path = arg.rpartition("=") if "=" in arg else ("", "", arg)
    name = name or os.path.basename(os.path.normpath(path))
    results = os.path.join(path, "results.json")
    if not os.path.isfile(results):
      raise FileNotFoundError(f"{results}: no results.json (is the run finished?)")
    with open(results) as f:
      runs[name] = json.load(f)["metrics"]
  return runs


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("runs", nargs="+", help="workdirs, optionally NAME=DIR")
  p.add_argument("--width", type=int, default=None, help="width of the R@1 columns")
  args = p.parse_args(argv)
  print(evaluate.compare_runs(load_runs(args.runs), args.width))
  return 0


if __name__ == "__main__":
  sys.exit(main())
