"""Device mesh, logical-axis rules and the shardings of states and batches.

Models name their parameter axes logically ("embed", "mlp", "heads", ...); this module alone maps
those names onto the mesh axes `data`, `fsdp` and `tensor`. The same code runs on one CPU device,
8 simulated devices and a multi-host TPU pod slice: the mesh spans `jax.devices()` (all hosts),
and batches are assembled from per-process shards with `make_array_from_process_local_data`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
from jax.experimental import mesh_utils
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. Weights are sharded over `fsdp` on their embedding axis and over
# `tensor` on their wide axis; activations' batch axis over data and fsdp together.
DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("latents", None),
    ("length", None),
    ("conv", None),
    ("channels", None),
)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> Tuple[int, int, int]:
  """Resolves `{data, fsdp, tensor}` sizes; one axis may be -1 ("all remaining devices")."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  unknown = [a for a in mesh_cfg if a not in MESH_AXES]
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {unknown}; use {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(mesh_cfg)}")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(mesh_cfg)} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh {dict(mesh_cfg)} needs {int(np.prod(sizes))} devices, "
                     f"{num_devices} are present")
  return tuple(sizes)


def make_mesh(mesh_cfg: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh over `devices` (default: every device of every host).

  `mesh_cfg` holds the axis sizes and optionally `num_devices` (use the first N; -1 = all).
  """
  mesh_cfg = dict(mesh_cfg or {"data": -1})
  devices = list(jax.devices() if devices is None else devices)
  num = int(mesh_cfg.pop("num_devices", -1))
  if num > len(devices):
    raise ValueError(f"config.mesh.num_devices={num}, but only {len(devices)} devices exist")
  devices = devices[:num] if num > 0 else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, ValueError, NotImplementedError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_rules(overrides: Optional[Sequence[Tuple[str, Any]]] = None):
  """DEFAULT_RULES with `overrides` (pairs of logical name -> mesh axis or None) taking priority."""
  overrides = [tuple(r) for r in (overrides or ())]
  names = {r[0] for r in overrides}
  return tuple(overrides) + tuple(r for r in DEFAULT_RULES if r[0] not in names)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (tiny test models, odd vocab sizes)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes_t = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in axes_t]))
    fitted.append(axes if dim % size == 0 else None)
  return P(*fitted)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules=None) -> Any:
  """NamedShardings for a (boxed, abstract) tree: logical names -> mesh axes; others replicated."""
  rules = logical_rules() if rules is None else rules
  logical_specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  shapes = nn.meta.unbox(abstract_tree)
  # An optimizer state masks frozen params inside their boxes: Partitioned(MaskedNode()) has a
  # spec but no array, and stays an (empty) MaskedNode.
  return jax.tree.map(lambda spec, x: x if isinstance(x, optax.MaskedNode) else
                      NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data` x `fsdp`."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_parallelism(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host batch (this process's rows) on the mesh, split along the leading axis.

  On one host (or a mesh of this process's devices only) the local rows are the global batch;
  on a mesh spanning hosts each process passes its own slice and the global array is their
  concatenation.
  """
  sharding = batch_sharding(mesh)
  local_mesh = all(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def put(x):
    x = np.asarray(x)
    if local_mesh:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)
