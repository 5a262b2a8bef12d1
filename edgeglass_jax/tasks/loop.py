"""The one train loop every task shares.

A task supplies a `Task` (its model's init, loss, eval and data); the loop does the rest:
state initialised under the mesh with its shardings, one jitted step with donated state, optax
(AdamW, warmup + cosine, clipping, frozen parts masked), orbax checkpoints (async, keep N, keep
best, exact resume with the data iterator's state, fallback past a damaged latest checkpoint),
clu metrics and writers, progress and periodic eval, and a guard that skips non-finite updates
and stops after `max_nonfinite` in a row.

A workdir belongs to one run: before anything is created, the stored tree metadata of the
checkpoint to resume is compared with this run's abstract state, and a checkpoint of another
model raises `CheckpointMismatchError` naming the first parameter that differs. Every path out of
`train` (normal end, error, non-finite stop) closes the checkpoint manager and the metric writer.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

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


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint belongs to another model: a parameter's shape or the tree differs.

  Raised before the run writes anything, so the workdir stays as it was.
  """


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
    self.directory = os.path.abspath(directory)
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
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": pipeline.iterator_checkpoint_handler()})

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

  def stored_shapes(self, step: int) -> Dict[str, Tuple[int, ...]]:
    """`{path: shape}` of the state saved at `step`, read from its tree metadata (no arrays)."""
    metadata = self.manager.item_metadata(step)
    state = metadata.get("state") if metadata is not None else None
    if state is None:
      raise FileNotFoundError(f"step {step} has no readable 'state' item metadata")
    return flat_shapes(state)

  def restore(self, abstract_state, data_iter):
    """Latest restorable checkpoint -> state (or None when there is none).

    A step whose metadata or arrays cannot be read (truncated, corrupt) is skipped with a
    warning and the one before is tried. A readable step whose tree differs from
    `abstract_state` raises `CheckpointMismatchError` without restoring anything.
    """
    expected = flat_shapes(abstract_state)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        stored = self.stored_shapes(step)
      except Exception as e:  # unreadable metadata: a damaged step, fall back
        self._warn_damaged(step, e)
        continue
      difference = first_difference(expected, stored)
      if difference is not None:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} belongs to another model: {difference}. "
            f"Nothing was written; rerun with the config that wrote it, or use another --workdir.")
      try:
        with _draining_event_loops():
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=pipeline.iterator_restore_args(data_iter)))
        return restored["state"]
      except Exception as e:  # a truncated or corrupt array file: fall back to the one before
        self._warn_damaged(step, e)
    return None

  def _warn_damaged(self, step: int, error: Exception):
    logging.warning("checkpoint step %d in %s cannot be restored (%s: %s); falling back to the "
                    "previous one", step, self.directory, type(error).__name__, error)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its pending tasks finish before it closes.

  orbax runs a restore in a fresh loop and closes it as soon as the restore coroutine raises
  (`asyncio_utils._run_sync_via_new_loop` skips `asyncio.run`'s task cleanup), so when one array
  of a damaged checkpoint fails, the other arrays' TensorStore reads are still in flight: each
  completion then calls into the closed loop ("RuntimeError: Event loop is closed") or its
  coroutine is destroyed mid-read ("Exception ignored in <coroutine ...>"), one traceback per
  array. Draining the loop turns those into collected, ignored results.
  """

  def close(self):
    while not self.is_closed() and not self.is_running():
      pending = [t for t in asyncio.all_tasks(self) if not t.done()]
      if not pending:
        break
      self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self):
    return _DrainingEventLoop()


@contextlib.contextmanager
def _draining_event_loops():
  """Event loops created inside (by orbax's restore) drain before they close."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def flat_shapes(tree) -> Dict[str, Tuple[int, ...]]:
  """`{"a/b/c": shape}` of a state tree or of orbax's stored tree metadata, in tree order.

  Both are keyed as orbax stores them (dict keys, namedtuple fields, sequence indices), so the
  two sides of a resume compare path by path.
  """
  return {"/".join(str(k) for k in path): tuple(leaf.shape)
          for path, leaf in ocp.tree.to_flat_dict(tree).items()}


def first_difference(expected: Dict[str, Tuple[int, ...]],
                     stored: Dict[str, Tuple[int, ...]]) -> Optional[str]:
  """The first path (in `expected`'s order) whose shape differs or that only one side has,
  described with both shapes; None when the trees agree. Paths only the checkpoint has are
  named in the order of `expected`'s top-level keys (params before optimizer state)."""
  tops = list(dict.fromkeys(p.split("/", 1)[0] for p in expected))
  rank = lambda p: tops.index(p.split("/", 1)[0]) if p.split("/", 1)[0] in tops else len(tops)
  extra = sorted((p for p in stored if p not in expected), key=rank)
  for path, shape in expected.items():
    if path not in stored:
      more = f"; the checkpoint has {len(extra)} this run lacks, first {extra[0]}" if extra else ""
      return f"{path} {shape} is in this run but not in the checkpoint{more}"
    if tuple(stored[path]) != tuple(shape):
      return f"{path} has shape {shape} in this run but {tuple(stored[path])} in the checkpoint"
  if extra:
    return (f"the checkpoint has {len(extra)} entries this run lacks, first {extra[0]} "
            f"{tuple(stored[extra[0]])}")
  return None


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


def _state_fn(task: Task, tx):
  def create(r):
    params = task.init_params(r)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite_streak=jnp.zeros((), jnp.int32),
                      nonfinite_total=jnp.zeros((), jnp.int32))
  return create


def abstract_state(task: Task, tx, mesh, rng, rules=None):
  """(unboxed `ShapeDtypeStruct` TrainState carrying its shardings, shardings); runs no init."""
  boxed = jax.eval_shape(_state_fn(task, tx), rng)
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def init_state(task: Task, tx, mesh, rng, rules=None):
  """TrainState initialised directly in its shardings; returns (state, shardings)."""
  create = _state_fn(task, tx)
  shardings = sharding.tree_shardings(jax.eval_shape(create, rng), mesh, rules)
  with mesh:
    state = jax.jit(lambda r: nn.meta.unbox(create(r)), out_shardings=shardings)(rng)
  return state, shardings


def run(config, workdir: str, make_task: Callable[..., Task], hooks=()) -> Dict[str, Any]:
  """One run of a task: builds the run's mesh once, `make_task(config, workdir, mesh)`, trains."""
  mesh = sharding.make_mesh(config.mesh)
  return train(config, workdir, make_task(config, workdir, mesh), mesh, hooks=hooks)


def train(config, workdir: str, task: Task, mesh, hooks=()) -> Dict[str, Any]:
  """Runs (or resumes) training on `mesh`; returns `{"step": N, "metrics": {...}, "state": ...}`.

  The checkpoint to resume is checked against this run's state before anything is written
  (`CheckpointMismatchError`). `hooks` are called with the step number after each step (and
  its checkpoint, if any).
  """
  cfg = config.train
  rules = sharding.logical_rules([tuple(r) for r in config.get("axis_rules", ())])
  tx = make_optimizer(cfg)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  abstract, state_shardings = abstract_state(task, tx, mesh, init_rng, rules)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg)
  writer = None
  try:
    state = ckpt.restore(abstract, task.train_iter)
    if state is None:
      state, _ = init_state(task, tx, mesh, init_rng, rules)
    else:
      logging.info("resumed from step %d", int(state.step))
    is_lead = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_lead,
                                                  asynchronous=True)
    result = _train_steps(cfg, task, tx, mesh, state, state_shardings, step_rng, ckpt, writer,
                          hooks, is_lead)
    if ckpt.best_metric and ckpt.manager.best_step() is not None:
      result["metrics"]["checkpoint/best_step"] = float(ckpt.manager.best_step())
    return result
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


def _train_steps(cfg, task: Task, tx, mesh, state, state_shardings, step_rng, ckpt, writer,
                 hooks, is_lead) -> Dict[str, Any]:
  """The step/log/eval/checkpoint loop of `train` from `state.step` to `cfg.steps`."""
  batch_shard = sharding.batch_sharding(mesh)
  step_fn = jax.jit(make_train_step(task.loss_fn, tx),
                    in_shardings=(state_shardings, batch_shard, sharding.replicated(mesh)),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(0,))
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

  step = int(state.step)
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
            f"were saved at step {step} in {ckpt.directory}. Check the data (the warnings "
            f"above name the examples) or lower the learning rate.")
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
    if not eval_metrics and task.evaluate is not None:
      run_eval(step)
  metrics = dict(train_metrics, **eval_metrics)
  metrics["train/skipped_total"] = float(state.nonfinite_total)
  return {"step": step, "metrics": metrics, "state": state}
