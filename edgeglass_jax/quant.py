"""int8 quantization: QAT, calibration, TRAIN -> CONVERT -> SERVE, post-training quantization.

The only module that imports a quantization library (AQT, `aqtp`). Models never see it: every
matmul of the library is a `layers.Dense` (or `Embed.attend`) that takes a quantization object
`quant` and asks it for its `dot_general` (maxtext `layers/linears.py` + `quantizations.py`);
the attention core asks it for its two einsums. A `Quant` here is that object:

  q = quant.int8()                                   # or quant.from_config(config.quant, "train")
  model = adapters.MLPProjector(256, quant=q)        # QAT: fake-quant int8 forward (TRAIN)
  variables = model.init(key, x)                     # float params, as without quantization
  ...train with quant.train_rngs(model, rng) passed as apply(..., rngs=...)...
  cal = quant.calibrate(model, variables, [(x,), ...])   # representative batches
  served = quant.convert(model, variables, cal)      # {"params": biases/norms, "aqt": int8+scales}
  y = quant.serving_module(model).apply(served, x)   # SERVE: s8 x s8 -> s32 dots, equal to TRAIN

Numerics (AQT `config_v4` / `fully_quantized`, 8 bits): weights are quantized symmetrically per
output channel (absmax over the contracted axis: a Dense kernel `[D_in, F]` gets a scale
`[1, ..., 1, F]`); activations are quantized on the fly per row (absmax over the contracted
axis of each token), so serving needs no stored activation scales. Both sides are int8, the dot
accumulates in int32 and is rescaled to float32. `backward=True` also quantizes the two gradient
matmuls (8 bits, stochastic rounding: TRAIN then needs the rng `RNG_NAME`); the default trains
with float gradients through the fake-quant forward (straight-through). `attention=True` covers
q.k and p.v of every attention layer (`AqtEinsum`, both sides dynamic).

Modes of a `Quant`: "train" (QAT; fake-quant forward, float kernels are the trained params),
"convert" (one forward pass with `mutable=[collection]` writes int8 kernels + float scales),
"serve" (kernels read from the collection; `layers.Dense` creates no float kernel, no rng).
SERVE output equals TRAIN output on the same weights bitwise.

Calibration (`calibrate`) runs the model on representative batches (float matmuls) and records,
per quantized matmul, the largest input magnitude seen. Weights need no data (their scales come
from the kernels) and activations are scaled per token at run time, so the ranges are a report
(`Calibration.summary`, e.g. to spot outlier layers); `convert` needs a `Calibration`, runs
CONVERT on its first batch and refuses when that pass leaves a kernel of the params unreached
(that layer would have no int8 weights). Its batches are also the representative dataset of the
TFLite export (`export.py`).

Post-training quantization (`ptq`) is the same CONVERT on a float-trained model without QAT.

Backends: `Quant` delegates to a `Backend` (registered in `BACKENDS` by name); adding Qwix means
one more class here with the same members (`Backend`), nothing elsewhere.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

Array = jax.Array
Path = Tuple[str, ...]

KINDS = ("none", "int8")
MODES = ("train", "convert", "serve")
RNG_NAME = "quant"
STATS_COLLECTION = "quant_stats"


class QuantError(ValueError):
  """Base class of the named quantization errors."""


class NotConvertedError(QuantError):
  """A SERVE call found no converted int8 weights (run `convert` first and pass its tree)."""


class CalibrationError(QuantError):
  """CONVERT was asked without a `Calibration`, or its batches do not cover the model."""


class ArchitectureMismatchError(QuantError):
  """A param / serving tree belongs to another architecture: a path or a shape differs."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """The one switch: `kind` "none" (float) or "int8"; `backward` also quantizes the gradient
  matmuls (8 bits, stochastic rounding); `attention` quantizes the attention einsums;
  `backend` names an entry of `BACKENDS`."""
  kind: str = "none"
  backward: bool = False
  attention: bool = True
  backend: str = "aqt"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"config.quant.kind must be one of {KINDS}, got {self.kind!r}")
    if self.backend not in BACKENDS:
      raise ValueError(f"config.quant.backend must be one of {sorted(BACKENDS)}, got "
                       f"{self.backend!r}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
    """From a dict or ml_collections ConfigDict; unknown keys raise with their names."""
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"config.quant: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**{k: (str(v) if k in ("kind", "backend") else bool(v)) for k, v in d.items()})


class Backend(Protocol):
  """What a quantization library must provide; `Quant` calls nothing else of it.

  - `collection`: the variable collection that holds converted weights;
  - `dot_general_cls(config, mode, kernel_axes)`: zero-arg factory of a `lax.dot_general`-like
    callable (may be a linen module) for one kernel;
  - `einsum_cls(config, mode)`: zero-arg factory of `einsum(eqn, lhs, rhs)` for the attention
    core, or None;
  - `rng_names(config, mode)`: rng streams an apply in `mode` needs;
  - `converted_kernels(collection_tree)`: `{path of the Dense/Embed: (int8 value, scale)}`,
    the scale broadcastable against the matmul output (`[1, ..., 1, F]`).
  """
  collection: str

  def dot_general_cls(self, config: QuantConfig, mode: str,
                      kernel_axes: Tuple[Optional[str], ...]) -> Callable[[], Callable]:
    ...

  def einsum_cls(self, config: QuantConfig, mode: str) -> Optional[Callable[[], Callable]]:
    ...

  def rng_names(self, config: QuantConfig, mode: str) -> Tuple[str, ...]:
    ...

  def converted_kernels(self, tree: Mapping[str, Any]) -> Dict[Path, Tuple[Array, Array]]:
    ...


class _CalibratingDot(nn.Module):
  """Float `lax.dot_general` that sows `max |lhs|` into `STATS_COLLECTION` (calibration)."""
  kernel_axes: Tuple[Optional[str], ...] = ()

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    self.sow(STATS_COLLECTION, "input_absmax", jnp.max(jnp.abs(lhs)).astype(jnp.float32),
             init_fn=lambda: jnp.float32(0.0), reduce_fn=jnp.maximum)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                               preferred_element_type=preferred_element_type)


class AqtBackend:
  """AQT v2 (`aqt.jax.v2`): `AqtDotGeneral` per kernel, `AqtEinsum` for attention, the legacy
  freezer (plain arrays `{"qrhs": {"value": int8 [kernel shape], "scale": f32 [1.., F]}}`)."""
  collection = "aqt"

  @staticmethod
  def _cfg(config: QuantConfig):
    from aqt.jax.v2 import config as aqt_config
    if config.backward:
      return aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8)
    return aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)

  def rng_names(self, config: QuantConfig, mode: str) -> Tuple[str, ...]:
    return (RNG_NAME,) if (config.backward and mode == "train") else ()

  def _prng(self, config, mode):
    return RNG_NAME if self.rng_names(config, mode) else None

  def dot_general_cls(self, config, mode, kernel_axes):
    if mode == "calibrate":
      return lambda: _CalibratingDot(tuple(kernel_axes))
    module = _make_aqt_dot_general_cls()
    return lambda: module(cfg_fn=lambda: self._cfg(config), mode=mode,
                          prng_name=self._prng(config, mode), kernel_axes=tuple(kernel_axes))

  def einsum_cls(self, config, mode):
    if not config.attention or mode == "calibrate":
      return None
    from aqt.jax.v2.flax import aqt_flax
    prng = self._prng(config, mode)
    return lambda: aqt_flax.AqtEinsum(cfg=self._cfg(config), prng_name=prng)

  def converted_kernels(self, tree):
    flat = traverse_util.flatten_dict(dict(tree))
    out = {}
    for path, value in flat.items():
      if path[-2:] == ("qrhs", "value"):
        owner = path[:-4]  # drop <dot_general module>, "dg", "qrhs", "value"
        out[owner] = (value, flat[path[:-1] + ("scale",)])
    return out


_AQT_DOT_GENERAL = None


def _make_aqt_dot_general_cls():
  """The linen wrapper around `AqtDotGeneral` (built once, on first use, so importing this
  module does not import aqt)."""
  global _AQT_DOT_GENERAL
  if _AQT_DOT_GENERAL is not None:
    return _AQT_DOT_GENERAL
  from aqt.jax.v2.flax import aqt_flax
  modes = {"train": aqt_flax.QuantMode.TRAIN, "convert": aqt_flax.QuantMode.CONVERT,
           "serve": aqt_flax.QuantMode.SERVE}

  class Int8DotGeneral(nn.Module):
    """`lax.dot_general(lhs, rhs, dimension_numbers)` with rhs = the kernel, through AQT in
    `mode`; SERVE raises `NotConvertedError` when the collection holds no weights for it."""
    cfg_fn: Callable[[], Any]
    mode: str
    prng_name: Optional[str]
    kernel_axes: Tuple[Optional[str], ...] = ()

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None):
      if self.mode == "serve" and not self.is_initializing():
        stored = self.variables.get(AqtBackend.collection, {})
        if "dg" not in stored:
          raise NotConvertedError(
              f"SERVE at {'/'.join(self.path[:-1])}: no converted int8 kernel in "
              f"variables[{AqtBackend.collection!r}]; pass the tree `quant.convert(...)` "
              f"returned (it holds 'params' and {AqtBackend.collection!r})")
      dg = aqt_flax.AqtDotGeneral(
          self.cfg_fn(), prng_name=self.prng_name, rhs_quant_mode=modes[self.mode],
          rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE,
          quant_collection=AqtBackend.collection, name="dg")
      (lhs_contract, _), (lhs_batch, _) = dimension_numbers
      free = [a for a in range(lhs.ndim) if a not in lhs_contract and a not in lhs_batch]
      if lhs_batch or not free or math.prod(lhs.shape[a] for a in free) != 1:
        return dg(lhs, rhs, dimension_numbers, precision, preferred_element_type)
      # One row (decoding at batch 1): XLA:CPU's s8 matrix-vector product is 3-10x slower than
      # its s8 two-row product, so the row goes in twice (rows are quantized on their own).
      out = dg(jnp.concatenate([lhs, lhs], free[0]), rhs, dimension_numbers, precision,
               preferred_element_type)
      return jax.lax.slice_in_dim(out, 0, 1, axis=0)

  _AQT_DOT_GENERAL = Int8DotGeneral
  return Int8DotGeneral


BACKENDS: Dict[str, Backend] = {"aqt": AqtBackend()}


@dataclasses.dataclass(frozen=True)
class Quant:
  """The quantization object `layers.Dense(quant=...)` takes (see `layers.Quant`).

  Hashable (a module field, and modules are static jit arguments). `mode` is one of `MODES`
  (or "calibrate", used by `calibrate`).
  """
  config: QuantConfig = QuantConfig("int8")
  mode: str = "train"

  def __post_init__(self):
    if self.mode not in MODES + ("calibrate",):
      raise ValueError(f"Quant.mode must be one of {MODES}, got {self.mode!r}")
    if self.config.kind == "none":
      raise ValueError("Quant needs config.kind='int8'; for kind='none' pass quant=None "
                       "(`from_config` does)")

  @property
  def backend(self) -> Backend:
    return BACKENDS[self.config.backend]

  @property
  def serving(self) -> bool:
    return self.mode == "serve"

  @property
  def converting(self) -> bool:
    return self.mode == "convert"

  @property
  def collection(self) -> str:
    return self.backend.collection

  def stored_kernel(self, tree: Mapping[str, Any]) -> Tuple[Array, Array]:
    """The `(int8 value, scale)` that `tree` (one module's subtree of the collection) holds."""
    kernels = self.backend.converted_kernels(tree)
    if () not in kernels:
      raise NotConvertedError(f"SERVE: no converted int8 table in this module's "
                              f"{self.collection!r} variables (found {sorted(kernels)}); pass "
                              "the tree `quant.convert(...)` returned")
    return kernels[()]

  def with_mode(self, mode: str) -> "Quant":
    return dataclasses.replace(self, mode=mode)

  def dot_general_cls(self, kernel_axes: Tuple[Optional[str], ...] = ()):
    return self.backend.dot_general_cls(self.config, self.mode, tuple(kernel_axes))

  def einsum_cls(self):
    return self.backend.einsum_cls(self.config, self.mode)

  def rng_names(self) -> Tuple[str, ...]:
    return self.backend.rng_names(self.config, self.mode)


def int8(mode: str = "train", backward: bool = False, attention: bool = True,
         backend: str = "aqt") -> Quant:
  """An int8 `Quant`: forward-only QAT by default, `backward=True` for 8-bit gradients too."""
  return Quant(QuantConfig("int8", backward, attention, backend), mode)


def from_config(config: Any, mode: str = "train") -> Optional[Quant]:
  """`config.quant` (ConfigDict / dict / QuantConfig / None) -> a `Quant` in `mode`, or None
  for kind "none" (the float model, unchanged)."""
  if config is None:
    return None
  cfg = config if isinstance(config, QuantConfig) else QuantConfig.from_dict(config)
  return None if cfg.kind == "none" else Quant(cfg, mode)


def module_quant(module: nn.Module) -> Quant:
  """The `Quant` a module was built with; a named error when it has none."""
  q = getattr(module, "quant", None)
  if not isinstance(q, Quant):
    raise QuantError(f"{type(module).__name__} has no int8 quant field (got quant={q!r}); "
                     "build it with quant=quant.int8() (or clone(quant=...)), or use quant.ptq "
                     "for a float model")
  return q


def in_mode(module: nn.Module, mode: str) -> nn.Module:
  """The same module with its `Quant` in `mode` (every submodule gets it from the field)."""
  return module.clone(quant=module_quant(module).with_mode(mode))


def serving_module(module: nn.Module) -> nn.Module:
  """The module in SERVE mode: apply it to the tree `convert` returns."""
  return in_mode(module, "serve")


def train_rngs(module: nn.Module, rng: jax.Array) -> Dict[str, jax.Array]:
  """The `rngs=` a TRAIN apply needs (`{RNG_NAME: rng}` with `backward=True`, else `{}`)."""
  q = getattr(module, "quant", None)
  if not isinstance(q, Quant):
    return {}
  return {name: jax.random.fold_in(rng, i) for i, name in enumerate(q.rng_names())}


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _flat(tree) -> Dict[Path, Any]:
  return traverse_util.flatten_dict(nn.meta.unbox(dict(tree))) if tree else {}


def _describe(leaf) -> Tuple[Tuple[int, ...], str]:
  return tuple(np.shape(leaf)), str(jnp.dtype(getattr(leaf, "dtype", np.float32)))


def check_tree(tree: Mapping[str, Any], expected: Mapping[str, Any], what: str,
               check_dtype: bool = False) -> None:
  """Raises `ArchitectureMismatchError` naming the first path missing, unexpected or of another
  shape (and dtype) in `tree` against `expected` (e.g. a `jax.eval_shape(module.init, ...)`)."""
  got, want = _flat(tree), _flat(expected)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"missing {['/'.join(p) for p in missing[:3]]}"
                   f"{' ...' if len(missing) > 3 else ''}")
    if extra:
      parts.append(f"unexpected {['/'.join(p) for p in extra[:3]]}"
                   f"{' ...' if len(extra) > 3 else ''}")
    raise ArchitectureMismatchError(f"{what} does not fit this architecture: "
                                    + "; ".join(parts))
  for path in sorted(want):
    (gs, gd), (ws, wd) = _describe(got[path]), _describe(want[path])
    if gs != ws or (check_dtype and gd != wd):
      raise ArchitectureMismatchError(
          f"{what} does not fit this architecture: {'/'.join(path)} is {gd}{list(gs)}, "
          f"the model expects {wd}{list(ws)}")


@dataclasses.dataclass
class Calibration:
  """What `calibrate` saw: `batches` (tuples of positional inputs, the first one drives
  CONVERT), `method` (None: `__call__`) and `input_absmax` (`{Dense/Embed path: max |input|}`
  over all batches)."""
  batches: List[tuple]
  method: Optional[str]
  input_absmax: Dict[Path, float]

  @property
  def example(self) -> tuple:
    return self.batches[0]

  def summary(self) -> Dict[str, float]:
    return {"/".join(p): v for p, v in sorted(self.input_absmax.items())}


def calibrate(module: nn.Module, variables: Mapping[str, Any], batches: Iterable[Any],
              method: Optional[str] = None) -> Calibration:
  """Runs the float model on representative `batches` (each a tuple of positional inputs, or
  one input) and records each quantized matmul's input range; see the module docstring."""
  module_quant(module)
  batches = [_as_args(b) for b in batches]
  if not batches:
    raise CalibrationError("calibrate needs at least one representative batch")
  cal = in_mode(module, "calibrate")
  params = {"params": variables["params"]}
  run = jax.jit(lambda p, *a: cal.apply(p, *a, method=method, mutable=[STATS_COLLECTION])[1])
  ranges: Dict[Path, float] = {}
  for args in batches:
    for path, v in _flat(run(params, *args).get(STATS_COLLECTION, {})).items():
      owner = path[:-2]  # drop <dot module>, "input_absmax"
      value = float(np.max(np.asarray(v)))
      ranges[owner] = max(ranges.get(owner, 0.0), value)
  return Calibration(batches, method, ranges)


def expected_trees(module: nn.Module, example: tuple, method: Optional[str] = None,
                   mode: str = "train") -> Dict[str, Any]:
  """Abstract variables (`ShapeDtypeStruct`s) of `module` in `mode` for `example` inputs."""
  m = in_mode(module, mode)
  rngs = {"params": jax.random.key(0), **{n: jax.random.key(0) for n in m.quant.rng_names()}}
  init = lambda r: m.init(r, *example, method=method)
  return nn.meta.unbox(jax.eval_shape(init, rngs))


def convert(module: nn.Module, variables: Mapping[str, Any],
            calibration: Optional[Calibration]) -> Dict[str, Any]:
  """TRAIN params -> the serving tree `{"params": everything but the quantized kernels,
  collection: int8 kernels + float scales}` for `serving_module(module)`.

  `module` carries a `Quant` (any mode); `variables["params"]` are its float params (QAT-trained
  or, for PTQ, float-trained). Raises `CalibrationError` without a `Calibration` (or when its
  batches leave a quantized matmul unreached) and `ArchitectureMismatchError` when the params
  are another model's.
  """
  q = module_quant(module)
  if not isinstance(calibration, Calibration):
    raise CalibrationError(
        f"CONVERT needs a quant.Calibration (got {type(calibration).__name__}): run "
        "quant.calibrate(module, variables, batches) on representative inputs first")
  example, method = calibration.example, calibration.method
  train_tree = expected_trees(module, example, method, "train")
  given, want = _flat(variables["params"]), _flat(train_tree["params"])
  extra = sorted(set(given) - set(want))
  unreached = sorted({p[:-1] for p in extra if p[-1] == "kernel"})
  if unreached:
    raise CalibrationError(
        f"the calibration batches (method={method!r}) never reached {len(unreached)} matmuls "
        f"of these params, e.g. {['/'.join(p) for p in unreached[:3]]}: they would get no int8 "
        "weights; calibrate on batches that exercise every layer (e.g. every modality)")
  if extra:
    raise ArchitectureMismatchError(
        f"variables['params'] does not fit this architecture: unexpected "
        f"{['/'.join(p) for p in extra[:3]]}")
  check_tree({"params": variables["params"]}, {"params": train_tree["params"]},
             "variables['params']")
  serve_tree = expected_trees(module, example, method, "serve")
  collection = q.collection
  conv = in_mode(module, "convert")
  params = {"params": variables["params"]}
  converted = jax.jit(lambda p, *a: conv.apply(p, *a, method=method,
                                               mutable=[collection])[1])(params, *example)
  flat_params = _flat(variables["params"])
  served_params = {p: flat_params[p] for p in _flat(serve_tree["params"])}
  served = {"params": traverse_util.unflatten_dict(served_params),
            collection: converted[collection]}
  check_tree(served, {"params": serve_tree["params"], collection: serve_tree[collection]},
             "the converted tree", check_dtype=True)
  return served


def ptq(module: nn.Module, variables: Mapping[str, Any], batches: Iterable[Any],
        config: QuantConfig = QuantConfig("int8"), method: Optional[str] = None
        ) -> Tuple[nn.Module, Dict[str, Any], Calibration]:
  """Post-training quantization of a float model (its `quant` field None): calibrate, CONVERT
  with `config`, and return `(serving module, serving tree, calibration)`."""
  if not hasattr(module, "quant"):
    raise QuantError(f"{type(module).__name__} has no quant field to quantize through")
  qmodule = module.clone(quant=Quant(config, "train"))
  cal = calibrate(qmodule, variables, batches, method)
  return serving_module(qmodule), convert(qmodule, variables, cal), cal


def check_serving(module: nn.Module, served: Mapping[str, Any], example: tuple,
                  method: Optional[str] = None) -> None:
  """Raises `NotConvertedError` when `served` has no converted weights and
  `ArchitectureMismatchError` when it is another model's serving tree."""
  q = module_quant(module)
  if q.collection not in served:
    raise NotConvertedError(f"the serving tree has no {q.collection!r} collection (keys "
                            f"{sorted(served)}); quant.convert(...) makes it")
  want = expected_trees(module, _as_args(example), method, "serve")
  check_tree(served, {k: want[k] for k in ("params", q.collection) if k in want},
             "the serving tree", check_dtype=True)


def dequantize(module: nn.Module, served: Mapping[str, Any]
               ) -> Tuple[nn.Module, Dict[str, Any]]:
  """The serving tree as a float model: `(module with quant=None, {"params": ...})` whose
  kernels are `int8 value * scale` (the graph TFLite's converter re-quantizes)."""
  q = module_quant(module)
  params = dict(_flat(served["params"]))
  stored = _flat(served[q.collection])
  for owner, (value, scale) in q.backend.converted_kernels(served[q.collection]).items():
    value, scale = np.asarray(value, np.float32), np.asarray(scale, np.float32).reshape(-1)
    if any(p[:len(owner) + 1] == owner + ("attend_dot_general",) for p in stored):
      # layers.Embed: the table [V, D] with one scale per row
      params[owner + ("embedding",)] = jnp.asarray(value * scale[:, None])
      continue
    if value.shape[-1] != scale.size:
      raise ArchitectureMismatchError(f"{'/'.join(owner)}: int8 kernel {list(value.shape)} and "
                                      f"scale of {scale.size} do not match")
    params[owner + ("kernel",)] = jnp.asarray(value * scale)
  return module.clone(quant=None), {"params": traverse_util.unflatten_dict(params)}


def tree_bytes(tree: Any) -> int:
  """Bytes of every array in `tree` (what it takes on disk without compression)."""
  leaves = jax.tree.leaves(nn.meta.unbox(tree))
  return int(sum(np.dtype(getattr(x, "dtype", np.float32)).itemsize * math.prod(np.shape(x))
                 for x in leaves))


def serving_size(served: Mapping[str, Any]) -> Dict[str, int]:
  """`{"bytes", "int8_bytes", "float_bytes"}` of a serving (or float) tree."""
  leaves = jax.tree.leaves(nn.meta.unbox(dict(served)))
  int8_bytes = sum(math.prod(np.shape(x)) for x in leaves
                   if np.dtype(x.dtype) == np.int8)
  total = tree_bytes(dict(served))
  return {"bytes": total, "int8_bytes": int(int8_bytes), "float_bytes": total - int(int8_bytes)}


def save_serving(path: str, served: Mapping[str, Any]) -> int:
  """Writes a serving tree to one safetensors file (keys `collection/a/b/leaf`); returns the
  file's size in bytes."""
  import os
  from safetensors.numpy import save_file
  flat = {"/".join(p): np.asarray(v) for p, v in _flat(dict(served)).items()}
  save_file(flat, path + ".tmp")
  os.replace(path + ".tmp", path)
  return os.path.getsize(path)


def load_serving(path: str, module: nn.Module, example: Any,
                 method: Optional[str] = None) -> Dict[str, Any]:
  """Reads `save_serving`'s file and checks it against `module`'s serving tree for `example`
  inputs (`ArchitectureMismatchError` names the first param that differs, with the file)."""
  from safetensors.numpy import load_file
  flat = load_file(path)
  served = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                         for k, v in flat.items()})
  try:
    check_serving(module, served, _as_args(example), method)
  except QuantError as e:
    raise type(e)(f"{path}: {e}") from e
  return served
