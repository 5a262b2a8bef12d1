"""Family registry: HF `model_type` -> module builder, weight rules and dummy inputs.

Each encoder module registers its families at import; `from_pretrained` reads a local HF
directory, picks the family from `config.json`, builds the linen module and converts the tensors
with the family's rule table (`weights/convert.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from edgeglass_jax.weights import convert, hf
from edgeglass_jax.weights.hf import WeightsError


class EncoderOutput(NamedTuple):
  """pooled `[B, D]` and tokens `[B, N, D]` (HF's `last_hidden_state`)."""
  pooled: jax.Array
  tokens: jax.Array


@dataclasses.dataclass(frozen=True)
class Family:
  """How to build and load one HF architecture.

  build(hf_config, dtype, param_dtype, dot_general_cls=None, quant=None) -> module;
  rules(module) -> [Rule] with canonical HF names (a checkpoint's wrapper prefix, e.g. "model."
  or "bert.", is found and stripped on load); dummy_inputs(module) -> positional args for `module.init`. Every encoder module has a frozen
  dataclass field `config` whose `family` names its entry here.
  checkpoint_rules(module, tensors) -> [Rule], optional: the table for one checkpoint (prefix
  already stripped) when the family's tensor names changed between transformers versions; it
  replaces `rules` on load, while `to_hf` always writes `rules`' names.
  """
  name: str
  modality: str
  build: Callable[..., nn.Module]
  rules: Callable[[nn.Module], Sequence[convert.Rule]]
  dummy_inputs: Callable[[nn.Module], Tuple]
  checkpoint_rules: Optional[Callable[[nn.Module, Mapping[str, np.ndarray]],
                                      Sequence[convert.Rule]]] = None


FAMILIES: Dict[str, Family] = {}
_COMPOSITE = {"clip": ("vision", "text"), "siglip": ("vision", "text")}


def register(family: Family) -> Family:
  FAMILIES[family.name] = family
  return family


def _load_family_modules():
  from edgeglass_jax.encoders import dinov2, text, vit, whisper  # noqa: F401  (registers)


def resolve(hf_config: dict, tower: Optional[str], source: str) -> Tuple[Family, dict]:
  """Returns the family and the (sub-)config dict for a checkpoint's `config.json`."""
  _load_family_modules()
  model_type = hf_config.get("model_type")
  if model_type in _COMPOSITE:
    towers = _COMPOSITE[model_type]
    if tower not in towers:
      raise WeightsError(f"{source}: a full {model_type!r} checkpoint needs tower= one of "
                         f"{towers}, got {tower!r}")
    sub = dict(hf_config.get(f"{tower}_config") or {})
    if "projection_dim" in hf_config:
      sub["projection_dim"] = hf_config["projection_dim"]  # HF uses the top-level one
    sub["_composite"] = model_type
    return FAMILIES[f"{model_type}_{tower}_model"], sub
  if model_type not in FAMILIES:
    raise WeightsError(f"{source}: unknown architecture model_type={model_type!r}; known: "
                       f"{sorted(FAMILIES) + sorted(_COMPOSITE)}")
  return FAMILIES[model_type], hf_config


def _strip_wrapper_prefix(tensors: dict, rules: Sequence[convert.Rule]) -> dict:
  """Finds the prefix the checkpoint puts before the canonical names (e.g. "model.") and drops it."""
  anchor = rules[0].hf
  if anchor in tensors:
    return tensors
  for key in tensors:
    if key.endswith("." + anchor):
      prefix = key[: -len(anchor)]
      return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  return tensors


def abstract_params(module: nn.Module, family: Family):
  return jax.eval_shape(module.init, jax.random.key(0), *family.dummy_inputs(module))["params"]


def from_pretrained(path: str, tower: Optional[str] = None, dtype=jnp.float32,
                    param_dtype=jnp.float32, dot_general_cls=None, quant=None):
  """Loads a local HF checkpoint directory into `(module, {"params": ...})`.

  `quant` (a `layers.Quant`) or the older `dot_general_cls` factory reaches every kernel."""
  hf_config = hf.read_hf_config(path)
  family, cfg = resolve(hf_config, tower, path)
  module = family.build(cfg, dtype=dtype, param_dtype=param_dtype,
                        dot_general_cls=dot_general_cls, quant=quant)
  rules = family.rules(module)
  tensors = _strip_wrapper_prefix(hf.read_hf_dir(path), rules)
  if family.checkpoint_rules is not None:
    rules = family.checkpoint_rules(module, tensors)
  params = convert.hf_to_flax(tensors, rules, abstract_params(module, family), source=path)
  params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params)
  return module, {"params": params}


def to_hf(module: nn.Module, params) -> dict:
  """Exports params back to HF-named float32 numpy tensors (inverse of `from_pretrained`)."""
  _load_family_modules()
  name = module.config.family
  if name not in FAMILIES:
    raise WeightsError(f"module config names unknown family {name!r}")
  family = FAMILIES[name]
  return convert.flax_to_hf(params.get("params", params), family.rules(module))
