"""The one train loop every task shares.

A task supplies a `Task` (its model's init, loss, eval and data); the loop does the rest:
state initialised under the mesh with its shardings, one jitted step with donated state, optax
(AdamW, warmup + cosine, clipping, frozen parts masked), orbax checkpoints (async, keep N, keep
best, exact resume with the data iterator's state, fallback past a damaged latest checkpoint),
clu metrics and writers, progress and periodic eval, and a guard that skips non-finite updates
and stops after `max_nonfinite` in a row.

A task may bring frozen parameters (`Task.frozen`: encoders, the LM under LoRA, a teacher). They
are read once per run, placed on the mesh in the shardings of their logical axes, and passed to
the jitted step as arguments (never constants captured in a closure); the step differentiates
only the trainable subtree, so gradient norms, clipping and the non-finite guard see trainable
parameters only. Checkpoints hold the trainable state, the optimizer and the data iterator; the
frozen parameters are not saved again: `{workdir}/frozen_params.json` records where they came
from and a fingerprint of their values, and resuming with other frozen weights raises
`FrozenParamsMismatchError`.

A workdir belongs to one run: before anything is created, the stored tree metadata of the
checkpoint to resume is compared with this run's abstract state, and a checkpoint of another
model raises `CheckpointMismatchError` naming the first parameter that differs. Every path out of
`train` (normal end, error, non-finite stop) closes the checkpoint manager and the metric writer.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

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


class FrozenParamsMismatchError(CheckpointMismatchError):
  """The workdir was trained on other frozen parameters than this run loaded (another file,
  seed or model): their fingerprints in `frozen_params.json` differ. Raised before anything is
  written."""


FROZEN_RECORD = "frozen_params.json"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


Evaluator = Callable[..., Dict[str, float]]


@dataclasses.dataclass
class Task:
  """What a task gives the loop.

  init_params(rng) -> trainable params with logical axis boxes (`nn.with_logical_partitioning`).
  train_iter: a checkpointable grain iterator of host batches (this process's rows).
  batch_ids(batch) -> example ids for error messages.

  frozen: None, or the frozen parameters: a pytree, or a loader `() -> pytree` the loop calls
  once per run. Leaves boxed with logical axes (`nn.Partitioned`, e.g. `with_logical_axes`) are
  sharded by those axes, plain leaves replicated. frozen_source: where they come from (a path,
  a package, "random seed 0"), recorded with their fingerprint in the workdir.

  loss_fn -> (scalar loss, {name: scalar}) is `loss_fn(params, batch, rng)` without frozen
  parameters and `loss_fn(trainable, frozen, batch, rng)` with them.

  evaluate: None, one evaluator, a list of them (their metrics merged; a name two evaluators
  return is an error) or a dict `{prefix: evaluator}` (metrics named "prefix/name"). An
  evaluator is `fn(params, step)` without frozen parameters and `fn(trainable, frozen, step)`
  with them (the placed, sharded arrays), and returns flat host-side metrics.
  """
  init_params: Callable[[jax.Array], Any]
  loss_fn: Callable[..., Any]
  train_iter: Iterator[Dict[str, np.ndarray]]
  evaluate: Union[None, Evaluator, Sequence[Evaluator], Mapping[str, Evaluator]] = None
  batch_ids: Optional[Callable[[Dict[str, np.ndarray]], Any]] = None
  frozen: Any = None
  frozen_source: str = ""


def merge_evaluators(evaluate) -> Optional[Evaluator]:
  """One evaluator from `Task.evaluate`'s forms: a list's metrics are merged (a metric name two
  evaluators return raises ValueError naming both), a dict's are prefixed by their key."""
  if evaluate is None or callable(evaluate):
    return evaluate
  if isinstance(evaluate, Mapping):
    named = [(str(k), fn, f"{k}/") for k, fn in evaluate.items()]
  else:
    named = [(f"evaluator {i} ({getattr(fn, '__name__', type(fn).__name__)})", fn, "")
             for i, fn in enumerate(evaluate)]
  for name, fn, _ in named:
    if not callable(fn):
      raise TypeError(f"Task.evaluate: {name} is not callable: {fn!r}")

  def merged(*args):
    out, owner = {}, {}
    for name, fn, prefix in named:
      for k, v in fn(*args).items():
        key = prefix + k
        if key in out:
          raise ValueError(f"eval metric {key!r} is returned by both {owner[key]} and {name}; "
                           "rename one or give the evaluators as a dict (prefixed names)")
        out[key], owner[key] = v, name
    return out

  return merged


def with_logical_axes(template: Any, values: Any) -> Any:
  """`values` (a plain tree, e.g. loaded weights) boxed like `template` (a boxed abstract tree
  of the same structure, e.g. `jax.eval_shape(model.init, ...)`), so the loop shards each
  array by its logical axes. Shapes must agree; the error names the first path that differs."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  flat_t = jax.tree_util.tree_flatten_with_path(template, is_leaf=is_box)[0]
  flat_v, treedef = jax.tree_util.tree_flatten_with_path(values)
  if len(flat_t) != len(flat_v):
    raise ValueError(f"with_logical_axes: the template has {len(flat_t)} arrays, the values "
                     f"{len(flat_v)}")
  out = []
  for (pt, t), (pv, v) in zip(flat_t, flat_v):
    name = jax.tree_util.keystr(pv)
    if jax.tree_util.keystr(pt) != name:
      raise ValueError(f"with_logical_axes: template path {jax.tree_util.keystr(pt)} meets "
                       f"value path {name}")
    shape = tuple(nn.meta.unbox(t).shape)
    if shape != tuple(np.shape(v)):
      raise ValueError(f"with_logical_axes: {name} has shape {tuple(np.shape(v))}, the template "
                       f"{shape}")
    out.append(t.replace_boxed(v) if is_box(t) else v)
  return jax.tree_util.tree_unflatten(treedef, out)


def _path_name(path) -> str:
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return "/".join(str(k) for k in keys if k is not None and k != "value")


def parse_lr_scale(spec: str) -> List[Tuple[re.Pattern, float]]:
  """`"REGEX:FACTOR[,REGEX:FACTOR...]"` -> [(pattern, factor)]; "" -> []."""
  out = []
  for part in filter(None, (p.strip() for p in (spec or "").split(","))):
    pattern, sep, factor = part.rpartition(":")
    try:
      value = float(factor)
    except ValueError:
      value = float("nan")
    if not sep or not pattern or not np.isfinite(value) or value < 0:
      raise ValueError(f"train.lr_scale={spec!r}: {part!r} is not REGEX:FACTOR with a finite "
                       "factor >= 0")
    try:
      out.append((re.compile(pattern), value))
    except re.error as e:
      raise ValueError(f"train.lr_scale={spec!r}: {pattern!r} is not a regex ({e})") from e
  return out


def scale_by_path(rules: Sequence[Tuple[re.Pattern, float]]) -> optax.GradientTransformation:
  """Multiplies the update of each param by the factor of the first rule whose regex its path
  (e.g. "bridge/params/image/to_lm/kernel") matches; 1 when none does. After AdamW this is a
  per-group learning rate: a bridge trained from scratch can move faster than LoRA."""
  def factor(path):
    name = _path_name(path)
    return next((f for pattern, f in rules if pattern.search(name)), 1.0)

  def scale(updates, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * jnp.asarray(factor(p), u.dtype),
                                            updates)
  return optax.stateless(scale)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay and global-norm clipping.

  No weight decay on vectors (biases, norm scales, temperatures); params whose path matches
  `cfg.frozen` (a regex, "" = none) get no update at all; `cfg.lr_scale` ("REGEX:FACTOR,...",
  optional) multiplies the learning rate of the params whose path matches.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.end_lr_fraction)
  decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) > 1, params)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                   optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2,
                               weight_decay=cfg.weight_decay, mask=decay_mask))
  rules = parse_lr_scale(cfg.get("lr_scale", ""))
  if rules:
    tx = optax.chain(tx, scale_by_path(rules))
  if not cfg.frozen:
    return tx
  frozen = re.compile(cfg.frozen)
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if frozen.search(_path_name(p)) else "train", params)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def make_train_step(loss_fn, tx, with_frozen: bool = False):
  """state, batch, rng -> (state, metrics); a non-finite loss or gradient leaves state as it was.

  With `with_frozen`: state, frozen, batch, rng -> (state, metrics) for
  `loss_fn(trainable, frozen, batch, rng)`; only `state.params` (the trainable tree) is
  differentiated, clipped, checked for non-finite values and updated.
  """

  def update(state, loss, aux, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The global norm is finite iff every gradient is (or its square sum overflows float32,
    # which clipping could not scale either). Per-leaf isfinite reductions gathered into one
    # flag made XLA's compile time grow with the square of the leaf count: 163 s for
    # SmolLM2's 420 LoRA leaves, against 13 s this way (benchmarks/RESULTS.md, 2026-12-04).
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    state = state.replace(
        step=state.step + 1,
        params=jax.tree.map(keep, params, state.params),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = dict(aux, loss=loss, grad_norm=grad_norm,
                   skipped=(~finite).astype(jnp.float32),
                   nonfinite_streak=state.nonfinite_streak)
    return state, metrics

  def step_frozen(state: TrainState, frozen, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch,
                                                                   rng)
    return update(state, loss, aux, grads)

  def step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    return update(state, loss, aux, grads)

  return step_frozen if with_frozen else step


def jit_train_step(task: Task, tx, mesh, state_shardings, frozen_shardings=None):
  """The run's one jitted step with explicit in/out shardings and donated state:
  `(state, batch, rng)`, or `(state, frozen, batch, rng)` when the task has frozen parameters
  (`frozen_shardings` given), which then enter the computation as arguments."""
  batch_shard, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  if task.frozen is None:
    return jax.jit(make_train_step(task.loss_fn, tx),
                   in_shardings=(state_shardings, batch_shard, repl),
                   out_shardings=(state_shardings, repl), donate_argnums=(0,))
  if frozen_shardings is None:
    raise ValueError("the task has frozen parameters: jit_train_step needs their shardings")
  return jax.jit(make_train_step(task.loss_fn, tx, with_frozen=True),
                 in_shardings=(state_shardings, frozen_shardings, batch_shard, repl),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))


def load_frozen(task: Task) -> Any:
  """The task's frozen tree (its loader called once), leaves possibly boxed; None without."""
  if task.frozen is None:
    return None
  tree = task.frozen() if callable(task.frozen) else task.frozen
  if not jax.tree.leaves(tree):
    raise ValueError(f"Task.frozen ({task.frozen_source or 'no source given'}) holds no arrays")
  return tree


def frozen_record(tree: Any, source: str) -> Dict[str, Any]:
  """`{"source", "fingerprint", "arrays", "params"}` of a frozen tree.

  The fingerprint hashes every array's path, shape and dtype, 4096 evenly strided values and its
  float64 sum: one pass over the weights, no copy, and any other file, seed or model changes it.
  """
  digest = hashlib.sha256()
  count = 0
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree))
  for path, leaf in leaves:
    x = np.asarray(leaf)
    flat = x.reshape(-1)
    digest.update(f"{jax.tree_util.keystr(path)}|{x.shape}|{x.dtype}|".encode())
    digest.update(np.ascontiguousarray(flat[::max(1, flat.size // 4096)]).tobytes())
    digest.update(np.float64(np.sum(flat, dtype=np.float64)).tobytes())
    count += flat.size
  return {"source": str(source), "fingerprint": digest.hexdigest(), "arrays": len(leaves),
          "params": int(count)}


def check_frozen_record(workdir: str, record: Optional[Dict[str, Any]]):
  """Raises FrozenParamsMismatchError when `{workdir}/frozen_params.json` describes other frozen
  parameters than `record` (None: this run has none). Writes nothing."""
  path = os.path.join(workdir, FROZEN_RECORD)
  if not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      stored = json.load(f)
    stored_fp = stored["fingerprint"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise FrozenParamsMismatchError(f"{path} is unreadable ({type(e).__name__}: {e}); this "
                                    "workdir's frozen parameters cannot be checked") from e
  if record is None:
    raise FrozenParamsMismatchError(
        f"{path}: this workdir was trained with frozen parameters from "
        f"{stored.get('source')!r}, this run has none. Nothing was written; use another "
        "--workdir.")
  if stored_fp != record["fingerprint"]:
    raise FrozenParamsMismatchError(
        f"{path}: this workdir was trained with frozen parameters from {stored.get('source')!r} "
        f"(fingerprint {stored_fp[:16]}, {stored.get('params')} values), this run loaded "
        f"{record['source']!r} (fingerprint {record['fingerprint'][:16]}, {record['params']} "
        "values). Nothing was written; rerun with the frozen weights it was trained on, or use "
        "another --workdir.")
  if stored.get("source") != record["source"]:
    logging.info("frozen parameters now come from %s (recorded: %s); same fingerprint",
                 record["source"], stored.get("source"))


def write_frozen_record(workdir: str, record: Dict[str, Any]):
  """Writes `{workdir}/frozen_params.json` once (atomically); an existing record is kept."""
  path = os.path.join(workdir, FROZEN_RECORD)
  if os.path.exists(path) or jax.process_index() != 0:
    return
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def place_frozen(tree: Any, mesh, rules=None) -> Tuple[Any, Any]:
  """(arrays, shardings): the frozen tree on `mesh`, each array in the sharding of its logical
  axes (plain leaves replicated). Every process holds the whole host tree; each device receives
  only its shard (`make_array_from_callback`), so this also works on a multi-host mesh."""
  shardings = sharding.tree_shardings(tree, mesh, rules)
  host = jax.tree.map(np.asarray, nn.meta.unbox(tree))
  arrays = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      host, shardings)
  return arrays, shardings


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


def restore_params(directory: str, abstract) -> Tuple[int, Any]:
  """(step, params) of the latest readable checkpoint in `directory` (a workdir's
  `checkpoints/`), another run's trained parameters to start from or to freeze, e.g. a
  teacher. `abstract` is that run's abstract TrainState (`abstract_state`); only its `state`
  item is read and nothing is written. A damaged step falls back to the one before; a checkpoint
  of another model raises `CheckpointMismatchError`, none at all `FileNotFoundError`."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} does not exist: the run to restore has not "
                            "checkpointed yet")
  expected = flat_shapes(abstract)
  manager = ocp.CheckpointManager(
      directory, item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(create=False, read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": pipeline.iterator_checkpoint_handler()})
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        stored = flat_shapes(manager.item_metadata(step)["state"])
      except Exception as e:  # unreadable metadata: a damaged step, fall back
        logging.warning("checkpoint step %d in %s is unreadable (%s); trying the one before",
                        step, directory, e)
        continue
      difference = first_difference(expected, stored)
      if difference is not None:
        raise CheckpointMismatchError(f"checkpoint step {step} in {directory} belongs to another "
                                      f"model than the one asked for: {difference}")
      try:
        with _draining_event_loops():
          restored = manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract)))
      except Exception as e:  # a truncated array file: fall back
        logging.warning("checkpoint step %d in %s cannot be restored (%s); trying the one "
                        "before", step, directory, e)
        continue
      return step, restored["state"].params
  finally:
    manager.close()
  raise FileNotFoundError(f"{directory} holds no restorable checkpoint")


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
  """Runs (or resumes) training on `mesh`; returns `{"step": N, "metrics": {...}, "state": ...}`
  (plus `"frozen"`, the placed frozen arrays, when the task has them).

  The checkpoint to resume is checked against this run's state, and the workdir's frozen-params
  record against the loaded frozen parameters, before anything is written
  (`CheckpointMismatchError`, `FrozenParamsMismatchError`). `hooks` are called with the step
  number after each step (and its checkpoint, if any).
  """
  cfg = config.train
  rules = sharding.logical_rules([tuple(r) for r in config.get("axis_rules", ())])
  tx = make_optimizer(cfg)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  abstract, state_shardings = abstract_state(task, tx, mesh, init_rng, rules)
  host_frozen = load_frozen(task)
  record = None if host_frozen is None else frozen_record(host_frozen, task.frozen_source)
  check_frozen_record(workdir, record)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg)
  writer = None
  try:
    state = ckpt.restore(abstract, task.train_iter)
    frozen = frozen_shardings = None
    if host_frozen is not None:
      write_frozen_record(workdir, record)
      frozen, frozen_shardings = place_frozen(host_frozen, mesh, rules)
      del host_frozen
    if state is None:
      state, _ = init_state(task, tx, mesh, init_rng, rules)
    else:
      logging.info("resumed from step %d", int(state.step))
    is_lead = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_lead,
                                                  asynchronous=True)
    result = _train_steps(cfg, task, tx, mesh, state, state_shardings, frozen, frozen_shardings,
                          step_rng, ckpt, writer, hooks, is_lead)
    if ckpt.best_metric and ckpt.manager.best_step() is not None:
      result["metrics"]["checkpoint/best_step"] = float(ckpt.manager.best_step())
    return result
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


def _train_steps(cfg, task: Task, tx, mesh, state, state_shardings, frozen, frozen_shardings,
                 step_rng, ckpt, writer, hooks, is_lead) -> Dict[str, Any]:
  """The step/log/eval/checkpoint loop of `train` from `state.step` to `cfg.steps`."""
  step_fn = jit_train_step(task, tx, mesh, state_shardings, frozen_shardings)
  frozen_args = () if task.frozen is None else (frozen,)
  evaluate = merge_evaluators(task.evaluate)
  progress = [periodic_actions.ReportProgress(num_train_steps=cfg.steps, writer=writer,
                                           every_steps=cfg.log_every)] if is_lead else []
  eval_metrics: Dict[str, float] = {}
  train_metrics: Dict[str, float] = {}
  averages = None
  pending_streak = None

  def run_eval(step):
    nonlocal eval_metrics
    if evaluate is None:
      return None
    eval_metrics = {k: float(v) for k, v in evaluate(state.params, *frozen_args, step).items()}
    writer.write_scalars(step, {k if k.startswith("eval/") else f"eval/{k}": v
                                for k, v in eval_metrics.items()})
    return eval_metrics

  step = int(state.step)
  with mesh:
    while step < cfg.steps:
      batch = next(task.train_iter)
      try:
        pipeline.check_batch_finite(batch, task.batch_ids(batch) if task.batch_ids else None)
      except FloatingPointError as e:
        logging.warning("step %d: %s; this update will be skipped", step, e)
      state, metrics = step_fn(state, *frozen_args, sharding.shard_batch(batch, mesh), step_rng)
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
    if not eval_metrics and evaluate is not None:
      run_eval(step)
  metrics = dict(train_metrics, **eval_metrics)
  metrics["train/skipped_total"] = float(state.nonfinite_total)
  result = {"step": step, "metrics": metrics, "state": state}
  if task.frozen is not None:
    result["frozen"] = frozen
  return result
