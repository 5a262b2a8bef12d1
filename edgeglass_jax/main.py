"""Entry point: `python -m edgeglass_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR`.

Runs the task named by `config.task`, then writes `DIR/results.json`
(`{"task", "step", "metrics"}`). Rerunning with the same workdir resumes. Any config key can be
overridden with `--config.KEY=VALUE`; an unknown key is an error that names it.
"""
from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for features, checkpoints, results.")
flags.mark_flags_as_required(["config", "workdir"])


def write_results(workdir: str, task: str, result: dict) -> str:
  path = os.path.join(workdir, "results.json")
  payload = {"task": task, "step": int(result.get("step", 0)),
             "metrics": {k: float(v) for k, v in result.get("metrics", {}).items()}}
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path


def quiet_library_logs():
  """Keeps orbax's per-save INFO chatter out of the console; its warnings still show."""
  import logging as py_logging

  def keep(record):
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname
  logging.get_absl_handler().addFilter(keep)


def run(config, workdir: str) -> dict:
  import jax
  from edgeglass_jax import tasks
  if config.get("jax_platforms"):
    jax.config.update("jax_platforms", config.jax_platforms)
  if config.get("distributed", False):
    jax.distributed.initialize()
  os.makedirs(workdir, exist_ok=True)
  result = tasks.get(config.task)(config, workdir)
  if jax.process_index() == 0:
    logging.info("results: %s", write_results(workdir, config.task, result))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
