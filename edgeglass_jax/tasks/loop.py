"""The one train loop every task shares.

A task supplies a `Task` (its model's init, loss, eval and data); the loop does the rest:
state initialised under the mesh with its shardings, one jitted step with donated state, optax
(AdamW, warmup + cosine, clipping, frozen parts masked), orbax checkpoints (async, keep N, keep
best, exact resume with the data iterator's state, fallback past a damaged latest checkpoint),
clu metrics and writers, progress and periodic eval, and a guard that skips non-finite updates
and stops after `max_nonfinite` in a row.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable, Dict, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers, metrics as clu_metrics, periodic_actions
from flax import linen as nn

from edgeglass_jax import sharding
from edgeglass_jax.data import pipeline


class NonFiniteError(FloatingPointError):
  """Too many consecutive updates had a non-finite loss or gradient."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


@dataclasses.dataclass
class Task:
  """What a task gives the loop.

  init_params(rng) -> params with logical axis boxes (`nn.with_logical_partitioning`);
  loss_fn(params, batch, rng) -> (scalar loss, {name: scalar}); evaluate(params, step) -> flat
  metrics (host side; may be None); train_iter: a checkpointable grain iterator of host batches
  (this process's rows); batch_ids(batch) -> example ids for error messages.
  """
  init_params: Callable[[jax.Array], Any]
  loss_fn: Callable[[Any, Dict[str, jax.Array], jax.Array], Any]
  train_iter: Iterator[Dict[str, np.ndarray]]
  evaluate: Optional[Callable[[Any, int], Dict[str, float]]] = None
  batch_ids: Optional[Callable[[Dict[str, np.ndarray]], Any]] = None


def _path_name(path) -> str:
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return "/".join(str(k) for k in keys if k is not None and k != "value")


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay and global-norm clipping.

  No weight decay on vectors (biases, norm scales, temperatures); params whose path matches
  `cfg.frozen` (a regex, "" = none) get no update at all.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.end_lr_fraction)
  decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) > 1, params)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                   optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2,
                               weight_decay=cfg.weight_decay, mask=decay_mask))
  if not cfg.frozen:
    return tx
  frozen = re.compile(cfg.frozen)
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if frozen.search(_path_name(p)) else "train", params)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(loss_fn, tx):
  """state, batch, rng -> (state, metrics); a non-finite loss or gradient leaves state as it was."""

  def step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    keep = lambda new, old: jnp.where(finite, new, old)
    state = state.replace(
        step=state.step + 1,
        params=jax.tree.map(keep, params, state.params),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads),
                   skipped=(~finite).astype(jnp.float32),
                   nonfinite_streak=state.nonfinite_streak)
    return state, metrics

  return step


class Checkpointer:
  """orbax CheckpointManager for `state` and the data iterator (`data`).

  Keeps the latest `cfg.keep` steps (to resume) and, with `cfg.keep_best_metric` set, also the
  `cfg.keep_best` steps whose eval metric is best (`cfg.best_mode` "max" or "min"); a step
  carries metrics only when eval ran at that step.
  """

  def __init__(self, directory: str, cfg):
    self.best_metric = cfg.get("keep_best_metric") or None
    if cfg.get("best_mode", "max") not in ("max", "min"):
      raise ValueError(f"config.train.best_mode must be 'max' or 'min', got {cfg.best_mode!r}")
    policies = [ocp.checkpoint_managers.LatestN(n=cfg.keep)]
    if self.best_metric:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[self.best_metric], reverse=cfg.best_mode == "min",
          n=cfg.get("keep_best", 1), keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=cfg.async_checkpoint, create=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=(lambda m: m[self.best_metric]) if self.best_metric else None,
        best_mode=cfg.get("best_mode", "max"))
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                         item_names=("state", "data"))

  def save(self, step: int, state, data_iter, metrics=None, force=False):
    if metrics is not None and self.best_metric:
      if self.best_metric not in metrics:
        raise KeyError(f"config.train.keep_best_metric={self.best_metric!r} is not an eval "
                       f"metric; some that are: {sorted(metrics)[:8]}")
      metrics = {self.best_metric: float(metrics[self.best_metric])}
    else:
      metrics = None
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=pipeline.iterator_save_args(data_iter))
    self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(self, abstract_state, data_iter):
    """Latest restorable checkpoint -> state (or None); damaged ones are skipped with a warning."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=pipeline.iterator_restore_args(data_iter)))
        return restored["state"]
      except Exception as e:  # a truncated or corrupt step: fall back to the one before
        logging.warning("checkpoint step %d in %s cannot be restored (%s: %s); falling back to "
                        "the previous one", step, self.manager.directory, type(e).__name__, e)
    return None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class _Averages:
  """Running means of the step metrics as a clu `Collection` (clu wants identifier names)."""

  def __init__(self, names):
    self.names = {n: "m" + re.sub(r"\W", "_", n) for n in names}
    self.collection = clu_metrics.Collection.create(
        **{safe: clu_metrics.Average.from_output(safe) for safe in self.names.values()})
    self.total = None

  def update(self, metrics):
    step = self.collection.single_from_model_output(
        **{self.names[n]: v for n, v in metrics.items()})
    self.total = step if self.total is None else self.total.merge(step)

  def compute(self):
    values = self.total.compute()
    self.total = None
    return {n: float(values[safe]) for n, safe in self.names.items()}


def init_state(task: Task, tx, mesh, rng, rules=None):
  """TrainState initialised directly in its shardings; returns (state, shardings)."""

  def create(r):
    params = task.init_params(r)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite_streak=jnp.zeros((), jnp.int32),
                      nonfinite_total=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(create, rng)
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  state = jax.jit(lambda r: nn.meta.unbox(create(r)), out_shardings=shardings)(rng)
  return state, shardings


def train(config, workdir: str, task: Task, hooks=()) -> Dict[str, Any]:
  """Runs (or resumes) training; returns `{"step": N, "metrics": {...}, "state": TrainState}`.

  `hooks` are called with the step number after each step (and its checkpoint, if any).
  """
  cfg = config.train
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules([tuple(r) for r in config.get("axis_rules", ())])
  tx = make_optimizer(cfg)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  with mesh:
    state, state_shardings = init_state(task, tx, mesh, init_rng, rules)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, state_shardings)
  restored = ckpt.restore(abstract, task.train_iter)
  if restored is not None:
    state = restored
    logging.info("resumed from step %d", int(state.step))
  start = int(state.step)

  batch_shard = sharding.batch_sharding(mesh)
  step_fn = jax.jit(make_train_step(task.loss_fn, tx),
                    in_shardings=(state_shardings, batch_shard, sharding.replicated(mesh)),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(0,))
  is_lead = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_lead,
                                                asynchronous=True)
  progress = [periodic_actions.ReportProgress(num_train_steps=cfg.steps, writer=writer,
                                           every_steps=cfg.log_every)] if is_lead else []
  eval_metrics: Dict[str, float] = {}
  train_metrics: Dict[str, float] = {}
  averages = None
  pending_streak = None

  def run_eval(step):
    nonlocal eval_metrics
    if task.evaluate is None:
      return None
    eval_metrics = {k: float(v) for k, v in task.evaluate(state.params, step).items()}
    writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
    return eval_metrics

  step = start
  try:
    with mesh:
      while step < cfg.steps:
        batch = next(task.train_iter)
        try:
          pipeline.check_batch_finite(batch, task.batch_ids(batch) if task.batch_ids else None)
        except FloatingPointError as e:
          logging.warning("step %d: %s; this update will be skipped", step, e)
        state, metrics = step_fn(state, sharding.shard_batch(batch, mesh), step_rng)
        step += 1
        streak = metrics.pop("nonfinite_streak")
        if averages is None:
          averages = _Averages(sorted(metrics))
        averages.update(metrics)
        if pending_streak is not None and int(pending_streak) >= cfg.max_nonfinite:
          ckpt.save(step, state, task.train_iter, force=True)
          raise NonFiniteError(
              f"{int(pending_streak)} consecutive updates had a non-finite loss or gradient "
              f"(last at step {step - 1}); parameters are those of the last finite update and "
              f"were saved at step {step} in {ckpt.manager.directory}. Check the data (the "
              f"warnings above name the examples) or lower the learning rate.")
        pending_streak = streak
        for report in progress:
          report(step)
        if step % cfg.log_every == 0 or step == cfg.steps:
          train_metrics = {f"train/{k}": v for k, v in averages.compute().items()}
          writer.write_scalars(step, train_metrics)
        fresh = None
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
          fresh = run_eval(step)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
          ckpt.save(step, state, task.train_iter, metrics=fresh)
        for hook in hooks:
          hook(step)
    if int(state.nonfinite_streak) >= cfg.max_nonfinite:
      raise NonFiniteError(f"the last {int(state.nonfinite_streak)} updates were non-finite")
  finally:
    ckpt.close()
    writer.flush()
  if not eval_metrics and task.evaluate is not None:
    run_eval(step)
  metrics = dict(train_metrics, **eval_metrics)
  metrics["train/skipped_total"] = float(state.nonfinite_total)
  if ckpt.best_metric and ckpt.manager.best_step() is not None:
    metrics["checkpoint/best_step"] = float(ckpt.manager.best_step())
  return {"step": step, "metrics": metrics, "state": state}
