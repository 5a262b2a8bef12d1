"""Tasks run by `main.py`: each is `run(config, workdir) -> {"step": int, "metrics": {...}}`."""
import importlib

TASKS = {
    "extract": "edgeglass_jax.tasks.extract",
    "align": "edgeglass_jax.tasks.align",
    "lm_lora": "edgeglass_jax.tasks.lm_lora",
    "assistant": "edgeglass_jax.tasks.assistant",
}


def get(name: str):
  if name not in TASKS:
    raise ValueError(f"config.task={name!r} is not a task; known: {sorted(TASKS)}")
  return importlib.import_module(TASKS[name]).run
