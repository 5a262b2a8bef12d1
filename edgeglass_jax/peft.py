"""LoRA by method interception: low-rank adapters on `layers.Dense`, base parameters untouched.

A LoRA adapter adds `(dropout(x) @ a) @ b * (alpha / rank)` to the output of a `layers.Dense`
(`x [..., D_in]`, kernel `[D_in, F]`), with `a [D_in, r]` (Kaiming-uniform) and `b [r, F]`
(zeros), so a freshly initialised adapter leaves the model exactly as it was (Hu et al. 2021).

No model is rewritten for it (gemma `gm/nn/_lora.py`, `peft/_interceptors.py`): while a model
runs inside `intercept(config)` (a `flax.linen.intercept_methods` context), every call of
`layers.Dense.__call__` whose module path (e.g. "layers_3/attn/query") matches one of
`config.targets` gets its adapter added. The adapter is a child module named "lora" of that
Dense, so its parameters sit next to the kernel in the "params" collection,
`.../query/lora/{a, b}`, carry logical axis names taken from the kernel's (`a`: (kernel_axes[0],
None), `b`: (None, kernel_axes[1])), and follow every lifted transform (`nn.scan`, `nn.remat`)
the Dense is inside. The model's own parameter tree is never changed: the LoRA branches live in
a separate tree (`split_params` / `combine_params`, gemma `peft/_tree_utils.py`), joined to the
frozen base tree only inside `apply_with_lora`, so a train step differentiates the LoRA tree
alone and passes the base tree as a (sharded) argument.

For serving, `merge_params` folds each adapter into its kernel (`W + a @ b * alpha / rank`) and
returns a base tree of the original structure that runs without LoRA.

    cfg = peft.LoRAConfig(rank=8, alpha=16, targets=("query", "value"))
    lora = peft.init_lora(model, params, x, rng=key, config=cfg)
    y = peft.apply_with_lora(model, params, lora, x, config=cfg)
    grads = jax.grad(lambda l: loss(peft.apply_with_lora(model, params, l, x, config=cfg)))(lora)
    served = peft.merge_params(params, lora, cfg)   # model.apply(served, x) == y
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import meta

from edgeglass_jax import layers

Array = jax.Array
LORA = "lora"
DROPOUT_RNG = "dropout"
_SHOWN_PATHS = 8


class LoRAParamsError(ValueError):
  """LoRA or base parameters that do not fit the model or the config they are used with."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """What to adapt and how.

  rank: r of `a [D_in, r]` and `b [r, F]` (>= 1). alpha: the update is scaled by `alpha / rank`.
  dropout: rate applied to the adapter's input only (not to the base path), when not
  deterministic. targets: regular expressions over module paths such as "layers_3/attn/query"; a
  Dense is adapted when a pattern fully matches its whole path or a trailing part of it cut at a
  "/" ("query" takes every `.../query`, not `.../query_norm`; "layers_[01]/mlp/.*" takes the MLPs
  of the first two layers). param_dtype: storage dtype of `a` and `b` (compute follows the Dense).
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: Tuple[str, ...] = ("query", "value")
  param_dtype: str = "float32"

  def __post_init__(self):
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    object.__setattr__(self, "targets", targets)
    if isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1:
      raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
    object.__setattr__(self, "rank", int(self.rank))
    if not self.alpha > 0:
      raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
    if not targets or not all(isinstance(t, str) and t for t in targets):
      raise ValueError(f"LoRA targets must be non-empty strings, got {self.targets!r}")
    for t in targets:
      try:
        re.compile(t)
      except re.error as e:
        raise ValueError(f"LoRA target {t!r} is not a regular expression: {e}") from e
    jnp.dtype(self.param_dtype)

  @classmethod
  def from_config(cls, cfg: Any) -> "LoRAConfig":
    """From a LoRAConfig, a dict or an ml_collections ConfigDict; unknown keys are an error."""
    if isinstance(cfg, cls):
      return cfg
    if hasattr(cfg, "to_dict"):
      cfg = cfg.to_dict()
    cfg = dict(cfg)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
      raise ValueError(f"unknown LoRA config keys {unknown}; known: {known}")
    return cls(**cfg)

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank

  def matches(self, path: str) -> bool:
    """Whether the module at `path` ("a/b/c") is a target."""
    return bool(self.matching(path))

  def matching(self, path: str) -> List[str]:
    """The target patterns that select `path`."""
    parts = path.split("/")
    suffixes = ["/".join(parts[i:]) for i in range(len(parts))]
    return [t for t in self.targets if any(re.fullmatch(t, s) for s in suffixes)]


class LoRAAdapter(nn.Module):
  """`x [..., D_in]` -> `(dropout(x) @ a) @ b * scale`, `[..., features]`.

  `a [D_in, rank]` is Kaiming-uniform (fan-in D_in), `b [rank, features]` zeros, both with the
  logical axes of the adapted kernel (`kernel_axes`) on their outer dimension and None on the rank.
  The matmuls stay in float (no injected dot_general): an adapter is folded into its kernel
  (`merge_params`) before any int8 conversion.
  """
  rank: int
  features: int
  scale: float
  dropout: float = 0.0
  kernel_axes: Sequence[Optional[str]] = ("embed", "mlp")
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    in_axis, out_axis = tuple(self.kernel_axes)
    a = self.param("a", nn.with_logical_partitioning(nn.initializers.kaiming_uniform(),
                                                     (in_axis, None)),
                   (x.shape[-1], self.rank), self.param_dtype)
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, (None, out_axis)),
                   (self.rank, self.features), self.param_dtype)
    if self.dropout > 0 and not deterministic:
      if not self.scope.has_rng(DROPOUT_RNG):
        raise ValueError(f"LoRA dropout {self.dropout} with deterministic=False needs a "
                         f"{DROPOUT_RNG!r} rng (apply_with_lora(..., rng=key))")
      keep = jax.random.bernoulli(self.make_rng(DROPOUT_RNG), 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
    x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=self.dtype)
    return (x @ a) @ b * jnp.asarray(self.scale, x.dtype)


class _Interceptor:
  """Adds a `LoRAAdapter` to the targeted `layers.Dense` calls and records what it saw.

  `expected` (path -> (a shape, b shape)) is the LoRA tree the caller holds; when given, a
  targeted Dense without an entry, or with entries of other shapes, is a `LoRAParamsError`.
  Only the last two dimensions are compared: inside `nn.scan` the tree holds them stacked.
  """

  def __init__(self, config: LoRAConfig, deterministic: bool,
               expected: Optional[Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]] = None):
    self.config = config
    self.deterministic = deterministic
    self.expected = expected
    self.dense_paths: Dict[str, None] = {}
    self.adapted: Dict[str, None] = {}

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, layers.Dense):
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    self.dense_paths[path] = None
    y = next_fun(*args, **kwargs)
    if not self.config.matches(path):
      return y
    x = args[0] if args else kwargs["x"]
    self._check(path, x.shape[-1], module.features)
    self.adapted[path] = None
    adapter = LoRAAdapter(rank=self.config.rank, features=module.features,
                          scale=self.config.scale, dropout=self.config.dropout,
                          kernel_axes=tuple(module.kernel_axes), dtype=module.dtype,
                          param_dtype=jnp.dtype(self.config.param_dtype), parent=module,
                          name=LORA)
    return y + adapter(x, deterministic=self.deterministic).astype(y.dtype)

  def _check(self, path: str, d_in: int, features: int):
    if self.expected is None:
      return
    if path not in self.expected:
      held = sorted(self.expected)
      raise LoRAParamsError(
          f"no LoRA params for the targeted Dense {path!r} (matched by "
          f"{self.config.matching(path)}); the LoRA tree holds {len(held)} adapters: "
          f"{_some(held)}. Were they made for another model or config? (init_lora)")
    a_shape, b_shape = self.expected[path]
    want = ((d_in, self.config.rank), (self.config.rank, features))
    if (a_shape[-2:], b_shape[-2:]) != want or a_shape[:-2] != b_shape[:-2]:
      raise LoRAParamsError(
          f"LoRA params of {path!r} have shapes a {tuple(a_shape)}, b {tuple(b_shape)}; this "
          f"Dense ({d_in} -> {features}) with rank {self.config.rank} needs a {want[0]}, "
          f"b {want[1]}")


@contextlib.contextmanager
def intercept(config: Any, deterministic: bool = True) -> Iterator[_Interceptor]:
  """Within the context, targeted `layers.Dense` calls carry their LoRA adapter.

  For use inside a module's own method (e.g. LoRA on the LM of a larger model: targets
  "lm/.*/query"), with the LoRA branches in the params it is applied with; `init_lora` /
  `apply_with_lora` wrap a whole `model.init` / `model.apply` in it. Yields the interceptor,
  whose `adapted` and `dense_paths` list the module paths seen.
  """
  interceptor = _Interceptor(LoRAConfig.from_config(config), deterministic)
  with nn.intercept_methods(interceptor):
    yield interceptor


class SplitParams(NamedTuple):
  base: Any
  lora: Any


def split_params(params: Any) -> SplitParams:
  """Splits a tree holding "lora" branches into `(base, lora)` trees of the same nesting.

  `base` is `params` without its "lora" branches; `lora` holds only those branches (and the
  dicts leading to them). Works on a variables dict (`{"params": ...}`) or the inner tree.
  """
  def split(tree):
    base, lora = {}, {}
    for key, value in tree.items():
      if key == LORA and isinstance(value, Mapping):
        lora[key] = value
      elif isinstance(value, Mapping):
        b, l = split(value)
        base[key] = b
        if l:
          lora[key] = l
      else:
        base[key] = value
    return base, lora

  return SplitParams(*split(params))


def combine_params(base: Any, lora: Any) -> Any:
  """The inverse of `split_params`: `base` with the "lora" branches of `lora` added."""
  def join(b, l):
    out = dict(b)
    for key, value in l.items():
      if key == LORA:
        if key in out:
          raise LoRAParamsError("the base tree already holds a 'lora' branch; split_params it")
        out[key] = value
      elif key in out and isinstance(out[key], Mapping):
        out[key] = join(out[key], value)
      else:
        raise LoRAParamsError(f"LoRA branch {key!r} has no module of that name in the base tree "
                              f"(holds {_some(sorted(b))}): params of another model?")
    return out
  return join(base, lora)


def lora_shapes(lora: Any) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
  """Module path -> (shape of `a`, shape of `b`) for each adapter in a LoRA tree."""
  out = {}

  def walk(tree, path):
    for key, value in tree.items():
      if key == LORA and isinstance(value, Mapping):
        missing = [n for n in ("a", "b") if n not in value]
        if missing:
          raise LoRAParamsError(f"LoRA branch of {'/'.join(path)!r} lacks {missing}")
        out["/".join(path)] = tuple(tuple(np.shape(meta.unbox(value[n]))) for n in ("a", "b"))
      elif isinstance(value, Mapping):
        walk(value, path + (key,))

  walk(_inner(lora), ())
  return out


def init_lora(model: nn.Module, base_params: Any, *args, rng: Array, config: Any,
              method: Any = None, **kwargs) -> Any:
  """Creates the LoRA tree of `model` under `config` by tracing one call `model(*args, **kwargs)`.

  Returns the "lora" branches (`a [D_in, r]`, `b [r, F]` per targeted Dense, as
  `nn.Partitioned` boxes with logical axes, like `model.init`), in the form of `base_params`
  (`{"params": ...}` or the inner tree). The call runs as a jitted `model.init` of which only the
  adapters are kept, so the base model's weights are neither read nor materialised; `base_params`
  (arrays or `ShapeDtypeStruct`s) is checked against the model's parameter paths and shapes.
  Raises LoRAParamsError when `base_params` belong to another model and ValueError when a target
  pattern selects no Dense.
  """
  config = LoRAConfig.from_config(config)
  found = {}

  def init(key):
    with intercept(config) as seen:
      variables = model.init({"params": key}, *args, method=method, **kwargs)
    found["seen"] = seen
    base, lora = split_params(dict(variables["params"]))
    _check_base(base, _inner(base_params), type(model).__name__)
    return lora

  lora = jax.jit(init)(rng)
  seen = found["seen"]
  unused = [t for t in config.targets
            if not any(t in config.matching(p) for p in seen.dense_paths)]
  if unused:
    raise ValueError(
        f"LoRA target pattern(s) {unused} match no layers.Dense of {type(model).__name__}; its "
        f"{len(seen.dense_paths)} Dense modules include: {_some(list(seen.dense_paths))}")
  return {"params": lora} if _is_variables(base_params) else lora


def apply_with_lora(model: nn.Module, base_params: Any, lora_params: Any, *args, config: Any,
                    rng: Optional[Array] = None, deterministic: bool = True,
                    rngs: Optional[Mapping[str, Array]] = None, method: Any = None,
                    mutable: Any = False, **kwargs) -> Any:
  """`model.apply` on the frozen `base_params` with the adapters of `lora_params` added.

  Both trees come as `init_lora` / `split_params` give them (`{"params": ...}` or the inner tree,
  boxed or not) and are joined only here, so `jax.grad` with respect to `lora_params` alone
  differentiates the adapters and nothing else. `rng` feeds LoRA dropout (the "dropout" stream,
  with the model's own dropout if it has any), active only when `deterministic` is False;
  `rngs`, `method`, `mutable` and `**kwargs` go to `model.apply`. Raises LoRAParamsError when the
  LoRA tree does not fit the model or config.
  """
  config = LoRAConfig.from_config(config)
  rngs = dict(rngs or {})
  if rng is not None:
    rngs.setdefault(DROPOUT_RNG, rng)
  if config.dropout > 0 and not deterministic and DROPOUT_RNG not in rngs:
    raise ValueError(f"LoRA dropout {config.dropout} with deterministic=False needs rng=")
  expected = lora_shapes(lora_params)
  stray = [p for p in expected if not config.matches(p)]
  if stray:
    raise LoRAParamsError(f"LoRA params of {_some(stray)} are not selected by targets "
                          f"{list(config.targets)}: made with another config?")
  base = _as_variables(base_params)
  if split_params(base["params"]).lora:
    raise LoRAParamsError("base_params hold 'lora' branches already; pass "
                          "split_params(params).base as base_params")
  variables = dict(base, params=combine_params(base["params"], _inner(lora_params)))
  interceptor = _Interceptor(config, deterministic, expected)
  with nn.intercept_methods(interceptor):
    return model.apply(variables, *args, rngs=rngs or None, method=method, mutable=mutable,
                       **kwargs)


def merge_params(base_params: Any, lora_params: Any, config: Any) -> Any:
  """Folds each adapter into its kernel: `kernel + (a @ b) * alpha / rank`, for serving.

  Returns a tree of exactly the structure (and boxes) of `base_params`, with new arrays for the
  adapted kernels (computed in float32, stored in the kernel's dtype) and the same arrays
  elsewhere; `model.apply(merged, x)` equals `apply_with_lora(model, base_params, lora_params, x)`.
  Stacked kernels (`nn.scan`: `[L, D_in, F]` with `a [L, D_in, r]`) fold layer by layer. Jittable.
  """
  config = LoRAConfig.from_config(config)
  shapes = lora_shapes(lora_params)
  lora = _inner(lora_params)
  inner = _inner(base_params)

  def fold(tree, lora_tree, path):
    out = dict(tree)
    for key, value in lora_tree.items():
      here = path + (key,)
      if key == LORA:
        name = "/".join(path)
        if "kernel" not in tree:
          raise LoRAParamsError(f"LoRA params of {name!r} have no kernel to fold into in the "
                                f"base tree (it holds {_some(sorted(tree))})")
        kernel = tree["kernel"]
        k = meta.unbox(kernel)
        a, b = (jnp.asarray(meta.unbox(value[n]), jnp.float32) for n in ("a", "b"))
        if a.shape[-1] != config.rank:
          raise LoRAParamsError(f"LoRA params of {name!r} have rank {a.shape[-1]}, the config "
                                f"{config.rank}")
        delta = jnp.matmul(a, b)
        if delta.shape != tuple(k.shape):
          raise LoRAParamsError(f"LoRA update of {name!r} is {delta.shape} (a {shapes[name][0]}, "
                                f"b {shapes[name][1]}), its kernel {tuple(k.shape)}")
        merged = (jnp.asarray(k, jnp.float32) + delta * config.scale).astype(k.dtype)
        out["kernel"] = (kernel.replace_boxed(merged) if isinstance(kernel, meta.AxisMetadata)
                         else merged)
      elif key in tree and isinstance(tree[key], Mapping):
        out[key] = fold(tree[key], value, here)
      else:
        raise LoRAParamsError(f"LoRA params under {'/'.join(here)!r} have no module there in the "
                              "base tree: params of another model?")
    return out

  merged = fold(inner, lora, ())
  if _is_variables(base_params):
    return dict(base_params, params=merged)
  return merged


def _is_variables(tree: Any) -> bool:
  return isinstance(tree, Mapping) and "params" in tree


def _as_variables(tree: Any) -> Dict[str, Any]:
  return dict(tree) if _is_variables(tree) else {"params": tree}


def _inner(tree: Any) -> Any:
  return tree["params"] if _is_variables(tree) else tree


def _some(items: Sequence[str]) -> str:
  items = list(items)
  shown = ", ".join(items[:_SHOWN_PATHS])
  return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOWN_PATHS else "")


def _flat_shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  leaves = jax.tree_util.tree_leaves_with_path(meta.unbox(tree))
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(x))
          for path, x in leaves}


def _check_base(traced: Any, given: Any, model_name: str):
  want, got = _flat_shapes(traced), _flat_shapes(given)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(p for p in set(want) & set(got) if want[p] != got[p])
  if missing or extra or wrong:
    parts = []
    if missing:
      parts.append(f"missing {_some(missing)}")
    if extra:
      parts.append(f"not in the model: {_some(extra)}")
    if wrong:
      parts.append("other shapes: " + _some([f"{p} {got[p]} (model {want[p]})" for p in wrong]))
    raise LoRAParamsError(f"base_params do not belong to this {model_name}: " + "; ".join(parts))
