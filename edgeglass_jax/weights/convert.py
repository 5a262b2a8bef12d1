"""HF tensor names <-> Flax param trees, driven by per-architecture rule tables.

A converter knows architectures, not formats: it takes the `{hf_name: np.ndarray}` dict any
reader returns (`hf.py`, `ct2.py`, `gguf.py`) and a list of `Rule`s that an encoder module writes
for its config (`encoders/*.py: hf_rules`). The same table runs both ways, so export back to HF
names (`flax_to_hf`) is the exact inverse of import.

Kinds of rule (`kind`), PyTorch layout -> Flax layout:
- "copy":    same array.
- "linear":  `[out, in]` -> `[in, out]` (transpose).
- "conv2d":  `[O, I, kh, kw]` -> `[kh * kw * I, O]`, the `layers.Dense` kernel of a conv applied
  to flattened `(kh, kw, I)` windows (ViT patch embedding); `window=(kh, kw)`.
- "conv1d":  `[O, I, k]` -> `[k * I, O]`, likewise for `(k, I)` windows (Whisper); `window=(k,)`.
- "split_linear": one fused `[n*out, in]` (or `[n*out]` bias) tensor -> n Flax leaves, each
  transposed when 2-D (PyTorch's `in_proj_weight` -> query/key/value).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import jax
import numpy as np
from flax import traverse_util
from flax.core import meta

from edgeglass_jax.weights.hf import WeightsError

Path = Tuple[str, ...]
_KINDS = ("copy", "linear", "conv2d", "conv1d", "split_linear")
_CONV_RANK = {"conv2d": 2, "conv1d": 1}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor -> one Flax leaf (or several, "split_linear"); `window` is a conv kind's
  kernel size, which the export back to HF needs to unflatten the Dense kernel."""
  hf: str
  flax: Union[Path, Tuple[Path, ...]]
  kind: str = "copy"
  window: Tuple[int, ...] = ()

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"rule for {self.hf}: unknown kind {self.kind!r}")
    rank = _CONV_RANK.get(self.kind)
    if rank is not None and len(self.window) != rank:
      raise ValueError(f"rule for {self.hf}: kind {self.kind!r} needs window= of {rank} sizes, "
                       f"got {self.window!r}")

  @property
  def targets(self) -> Tuple[Path, ...]:
    return self.flax if self.kind == "split_linear" else (self.flax,)


def _to_flax(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return arr.T if arr.ndim == 2 else arr
  if kind == "conv2d":
    return arr.transpose(2, 3, 1, 0).reshape(-1, arr.shape[0])
  if kind == "conv1d":
    return arr.transpose(2, 1, 0).reshape(-1, arr.shape[0])
  return arr


def _to_hf(arr: np.ndarray, rule: Rule) -> np.ndarray:
  if rule.kind == "linear":
    return arr.T if arr.ndim == 2 else arr
  if rule.kind == "conv2d":
    return arr.reshape(*rule.window, -1, arr.shape[-1]).transpose(3, 2, 0, 1)
  if rule.kind == "conv1d":
    return arr.reshape(*rule.window, -1, arr.shape[-1]).transpose(2, 1, 0)
  return arr


def hf_to_flax(tensors: Mapping[str, np.ndarray], rules: Sequence[Rule], expected: Any,
               source: str = "checkpoint", dtype=np.float32) -> Dict:
  """Builds the Flax `params` tree from HF-named tensors.

  `expected` is the module's abstract params (`jax.eval_shape(module.init, ...)["params"]`):
  every leaf must be produced by exactly one rule with exactly its shape. Errors name the
  tensor, the Flax path and both shapes; HF tensors no rule uses are logged, not loaded.
  """
  expected_flat = traverse_util.flatten_dict(meta.unbox(expected))
  out: Dict[Path, np.ndarray] = {}
  for rule in rules:
    if rule.hf not in tensors:
      raise WeightsError(f"{source}: missing tensor {rule.hf!r} (needed for "
                         f"{'/'.join(rule.targets[0])})")
    arr = np.asarray(tensors[rule.hf])
    if rule.kind == "split_linear":
      n = len(rule.targets)
      if arr.shape[0] % n:
        raise WeightsError(f"{source}: tensor {rule.hf!r} of shape {arr.shape} does not split "
                           f"into {n} equal parts")
      pieces = [p.T if p.ndim == 2 else p for p in np.split(arr, n, axis=0)]
    else:
      rank = _CONV_RANK.get(rule.kind)
      if rank is not None and (arr.ndim != rank + 2 or tuple(arr.shape[2:]) != rule.window):
        raise WeightsError(f"{source}: conv tensor {rule.hf!r} has shape {tuple(arr.shape)}, "
                           f"expected [out, in, {', '.join(map(str, rule.window))}]")
      pieces = [_to_flax(arr, rule.kind)]
    for path, piece in zip(rule.targets, pieces):
      if path not in expected_flat:
        raise WeightsError(f"{source}: rule maps {rule.hf!r} to unknown Flax param "
                           f"{'/'.join(path)}")
      want = tuple(expected_flat[path].shape)
      if tuple(piece.shape) != want:
        raise WeightsError(f"{source}: tensor {rule.hf!r} has shape {tuple(arr.shape)}, which "
                           f"does not fit {'/'.join(path)} of shape {want}")
      out[path] = np.asarray(piece, dtype=dtype)
  missing = [p for p in expected_flat if p not in out]
  if missing:
    raise WeightsError(f"{source}: no rule fills Flax params {['/'.join(p) for p in missing[:5]]}")
  used = {r.hf for r in rules}
  unused = sorted(k for k in tensors if k not in used)
  if unused:
    logging.info("%s: %d tensors not used by this model, e.g. %s", source, len(unused), unused[:5])
  return traverse_util.unflatten_dict(out)


def flax_to_hf(params: Any, rules: Sequence[Rule]) -> Dict[str, np.ndarray]:
  """Inverse of `hf_to_flax`: Flax params -> HF-named float32 numpy tensors."""
  flat = traverse_util.flatten_dict(meta.unbox(jax.device_get(params)))
  out: Dict[str, np.ndarray] = {}
  for rule in rules:
    leaves = [np.asarray(flat[p], np.float32) for p in rule.targets]
    if rule.kind == "split_linear":
      out[rule.hf] = np.concatenate([l.T if l.ndim == 2 else l for l in leaves], axis=0)
    else:
      out[rule.hf] = _to_hf(leaves[0], rule)
  return out


def dense(hf: str, path: Path, bias: bool = True) -> list:
  """Rules for a PyTorch `nn.Linear` named `hf` -> a `layers.Dense` at `path`."""
  rules = [Rule(f"{hf}.weight", tuple(path) + ("kernel",), "linear")]
  if bias:
    rules.append(Rule(f"{hf}.bias", tuple(path) + ("bias",)))
  return rules


def norm(hf: str, path: Path, bias: bool = True) -> list:
  """Rules for a PyTorch LayerNorm/RMSNorm named `hf` -> `layers.LayerNorm`/`RMSNorm`."""
  rules = [Rule(f"{hf}.weight", tuple(path) + ("scale",))]
  if bias:
    rules.append(Rule(f"{hf}.bias", tuple(path) + ("bias",)))
  return rules
