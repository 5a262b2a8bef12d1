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


COORDINATOR_ENV = ("EDGEGLASS_COORDINATOR", "EDGEGLASS_NUM_PROCESSES", "EDGEGLASS_PROCESS_ID")


def initialize_distributed():
  """Joins this process to its JAX cluster.

  With `EDGEGLASS_COORDINATOR=host:port`, `EDGEGLASS_NUM_PROCESSES` and `EDGEGLASS_PROCESS_ID`
  set (launch/local_multiprocess.sh, clusters JAX cannot detect), those are used; otherwise
  `jax.distributed.initialize()` detects the cluster itself (Cloud TPU, SLURM, Open MPI).
  """
  import jax
  values = {k: os.environ.get(k) for k in COORDINATOR_ENV}
  if not any(values.values()):
    jax.distributed.initialize()
    return
  missing = [k for k, v in values.items() if not v]
  if missing:
    raise ValueError(f"distributed run: {missing} not set (set all of {list(COORDINATOR_ENV)})")
  try:
    num, pid = int(values["EDGEGLASS_NUM_PROCESSES"]), int(values["EDGEGLASS_PROCESS_ID"])
  except ValueError as e:
    raise ValueError(f"distributed run: EDGEGLASS_NUM_PROCESSES / EDGEGLASS_PROCESS_ID must be "
                     f"integers, got {values}") from e
  if not 0 <= pid < num:
    raise ValueError(f"distributed run: EDGEGLASS_PROCESS_ID={pid} is not in [0, {num})")
  jax.distributed.initialize(coordinator_address=values["EDGEGLASS_COORDINATOR"],
                             num_processes=num, process_id=pid)


def run(config, workdir: str) -> dict:
  import jax
  from edgeglass_jax import tasks
  if config.get("jax_platforms"):
    jax.config.update("jax_platforms", config.jax_platforms)
  if config.get("distributed", False):
    initialize_distributed()
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
