"""Vision towers of CLIP and SigLIP as one linen ViT, loadable from local HF checkpoints.

CLIP: class token, bias-free patch conv, `pre_layrnorm`, pre-LN blocks (quick_gelu), and
`post_layernorm` on the class token as the pooled output; `last_hidden_state` is the encoder output
before that norm. Full `clip` and `CLIPVisionModelWithProjection` checkpoints also carry
`visual_projection` (bias-free), exposed by `ViT.project` / `ViT.image_features`, never in `pooled`.
SigLIP: no class token, patch conv with bias, gelu (tanh), `post_layernorm` over all tokens and
the MAP head (`SiglipMultiheadAttentionPoolingHead`: a learned probe attends to the tokens through
torch's `nn.MultiheadAttention`, then layernorm + MLP residual) as the pooled output.

Pixels come in NHWC (`[B, H, W, 3]`, already normalised); HF's are NCHW. A grid other than the
checkpoint's gets its position table resized the way HF's `interpolate_pos_encoding=True` does
(torch bicubic, `align_corners=False`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from edgeglass_jax import layers
from edgeglass_jax.encoders import registry
from edgeglass_jax.encoders.registry import EncoderOutput, Family
from edgeglass_jax.weights.convert import Rule, dense, norm
from edgeglass_jax.weights.hf import WeightsError

Array = jax.Array
FAMILIES = ("clip_vision_model", "siglip_vision_model")

_HF_DEFAULTS = {
    "clip_vision_model": dict(image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_vision_model": dict(image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a CLIP or SigLIP vision tower; `family` is the HF `model_type`.

  `projection_dim` is set only when the checkpoint holds CLIP's `visual_projection`;
  `use_head` is SigLIP's `vision_use_head` (without it `pooled` is the mean of the tokens).
  """
  family: str = "clip_vision_model"
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: Optional[int] = None
  use_head: bool = True

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ViTConfig.family must be one of {FAMILIES}, got {self.family!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")

  @property
  def class_token(self) -> bool:
    return self.family == "clip_vision_model"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid ** 2 + int(self.class_token)

  @classmethod
  def from_hf(cls, hf: dict, family: Optional[str] = None) -> "ViTConfig":
    """From a HF vision `config.json` dict (or the `vision_config` of a full clip/siglip one).

    The family is `hf["model_type"]`, else `{hf["_composite"]}_vision_model` (set by
    `registry.resolve`), else `family`. The projection is kept for full `clip` checkpoints and
    for `CLIPVisionModelWithProjection`, whose config names it in `architectures`.
    """
    name = hf.get("model_type")
    if name not in FAMILIES:
      name = f"{hf['_composite']}_vision_model" if hf.get("_composite") else (family or name)
    if name not in FAMILIES:
      raise ValueError(f"vision config has model_type={hf.get('model_type')!r}; expected one of "
                       f"{FAMILIES}")
    defaults = _HF_DEFAULTS[name]
    get = lambda key: hf.get(key, defaults.get(key, getattr(cls, key, None)))
    projection = None
    if name == "clip_vision_model":
      with_proj = (hf.get("_composite") == "clip"
                   or "CLIPVisionModelWithProjection" in (hf.get("architectures") or ()))
      projection = int(hf.get("projection_dim", 512)) if with_proj else None
    return cls(family=name, image_size=int(get("image_size")), patch_size=int(get("patch_size")),
               num_channels=int(get("num_channels")), hidden_size=int(get("hidden_size")),
               intermediate_size=int(get("intermediate_size")),
               num_hidden_layers=int(get("num_hidden_layers")),
               num_attention_heads=int(get("num_attention_heads")),
               hidden_act=str(get("hidden_act")), layer_norm_eps=float(get("layer_norm_eps")),
               projection_dim=projection, use_head=bool(hf.get("vision_use_head", True)))


def _cubic_weights(n_in: int, n_out: int) -> np.ndarray:
  """`[n_out, n_in]` matrix of torch's bicubic resize (A=-0.75, align_corners=False, edge clamp)."""
  a = -0.75
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  out = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = scale * (i + 0.5) - 0.5
    base = int(np.floor(src))
    t = src - base
    for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      out[i, min(max(base + offset, 0), n_in - 1)] += w
  return out


def resize_positions(table: Array, grid_hw: Sequence[int]) -> Array:
  """Resizes a square `[g*g, D]` patch position table to `[gh*gw, D]` (HF bicubic)."""
  g = int(round(np.sqrt(table.shape[0])))
  if g * g != table.shape[0]:
    raise ValueError(f"position table of {table.shape[0]} patches is not a square grid")
  gh, gw = grid_hw
  if (gh, gw) == (g, g):
    return table
  wh = jnp.asarray(_cubic_weights(g, gh), jnp.float32)
  ww = jnp.asarray(_cubic_weights(g, gw), jnp.float32)
  grid = table.astype(jnp.float32).reshape(g, g, -1)
  out = jnp.einsum("ij,kl,jld->ikd", wh, ww, grid, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(gh * gw, -1).astype(table.dtype)


def patchify(pixels: Array, patch_size: int) -> Array:
  """Non-overlapping patches, flattened: `[B, H, W, C]` -> `[B, H/p, W/p, p*p*C]` in `(row,
  column, channel)` order; leftover rows/columns are dropped, as a "valid" conv does."""
  p = patch_size
  b, h, w, c = pixels.shape
  gh, gw = h // p, w // p
  if gh == 0 or gw == 0:
    raise ValueError(f"image of {h}x{w} pixels is smaller than one {p}x{p} patch")
  x = pixels[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh, gw, p * p * c)


class PatchEmbed(layers.Dense):
  """The patch conv (stride = size = p) as a `layers.Dense` on `patchify`'s flattened patches:
  `[B, H, W, C]` -> `[B, H/p, W/p, features]`.

  Being a Dense, it is the same injectable matmul (and `quant` object) as every other kernel.
  Its kernel is `[p*p*C, features]` with logical axes `("conv", "embed")`: HF's conv2d weight
  `[D, C, p, p]` transposed to `[p, p, C, D]` and flattened (`convert` kind "conv2d",
  `window=(p, p)`).
  """
  patch_size: int = 0
  kernel_axes: Sequence[Optional[str]] = ("conv", "embed")

  def __call__(self, pixels: Array) -> Array:
    if self.patch_size < 1:
      raise ValueError(f"PatchEmbed needs patch_size >= 1, got {self.patch_size}")
    return super().__call__(patchify(pixels, self.patch_size))


class ViTEmbeddings(nn.Module):
  """Patches (+ CLIP class token) plus learned positions, stored in HF shape `[N, D]`.

  `[B, H, W, C]` -> `[B, T, D]` with T = (H/p)(W/p) (+1 for the class token, first).
  """
  config: ViTConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    c = self.config
    if pixels.ndim != 4 or pixels.shape[-1] != c.num_channels:
      raise ValueError(f"pixels must be [B, H, W, {c.num_channels}] (NHWC), got {pixels.shape}")
    x = PatchEmbed(c.hidden_size, patch_size=c.patch_size, use_bias=not c.class_token,
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   dot_general_cls=self.dot_general_cls, quant=self.quant,
                   name="patch_embedding")(pixels)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    init = nn.initializers.normal(0.02)
    table = self.param("position_embedding", nn.with_logical_partitioning(init, (None, "embed")),
                       (c.num_positions, d), self.param_dtype)
    if c.class_token:
      cls = self.param("class_embedding", nn.with_logical_partitioning(init, ("embed",)), (d,),
                       self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype), (b, 1, d)), x], 1)
      table = jnp.concatenate([table[:1], resize_positions(table[1:], (gh, gw))], 0)
    else:
      table = resize_positions(table, (gh, gw))
    return x + jnp.asarray(table, self.dtype)[None]


class MAPHead(nn.Module):
  """SigLIP's multihead attention pooling: `[B, N, D]` -> `[B, D]`.

  A learned probe `[1, 1, D]` queries the tokens; then `h + mlp(norm(h))`.
  """
  num_heads: int
  mlp_dim: int
  act: str
  epsilon: float
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, _, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              dot_general_cls=self.dot_general_cls, quant=self.quant)
    probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                             (None, None, "embed")),
                       (1, 1, d), self.param_dtype)
    probe = jnp.broadcast_to(jnp.asarray(probe, self.dtype), (b, 1, d))
    h = layers.MultiHeadAttention(self.num_heads, name="attn", **kw)(probe, kv=x)
    y = layers.LayerNorm(self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="norm")(h)
    h = h + layers.MLP(self.mlp_dim, act=self.act, name="mlp", **kw)(y)
    return h[:, 0]


class ViT(nn.Module):
  """CLIP / SigLIP vision tower: `pixels [B, H, W, C]` -> `EncoderOutput(pooled [B, D],
  tokens [B, T, D])`, equal to HF's `pooler_output` and `last_hidden_state`.

  Other methods (through `module.apply(params, x, method=...)`): `project(pooled) -> [B, P]`
  (CLIP's `visual_projection`) and `image_features(pixels)`, HF's `get_image_features`.
  """
  config: ViTConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mm = dict(kw, dot_general_cls=self.dot_general_cls, quant=self.quant)
    self.embeddings = ViTEmbeddings(c, **mm)
    self.pre_norm = layers.LayerNorm(c.layer_norm_eps, **kw) if c.class_token else None
    self.layers = [layers.PreNormBlock(c.num_attention_heads, c.intermediate_size, act=c.hidden_act,
                                       epsilon=c.layer_norm_eps, **mm)
                   for _ in range(c.num_hidden_layers)]
    self.post_norm = layers.LayerNorm(c.layer_norm_eps, **kw)
    self.head = (MAPHead(c.num_attention_heads, c.intermediate_size, c.hidden_act,
                         c.layer_norm_eps, **mm)
                 if c.use_head and not c.class_token else None)
    self.projection = (layers.Dense(c.projection_dim, use_bias=False, kernel_axes=("embed", "mlp"),
                                    **mm)
                       if c.projection_dim else None)

  def __call__(self, pixels: Array) -> EncoderOutput:
    x = self.embeddings(pixels)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    for block in self.layers:
      x = block(x)
    if self.config.class_token:
      tokens, pooled = x, self.post_norm(x[:, 0])
    else:
      tokens = self.post_norm(x)
      pooled = self.head(tokens) if self.head is not None else tokens.mean(1)
    if self.projection is not None and self.is_initializing():
      self.projection(pooled)
    return EncoderOutput(pooled=pooled, tokens=tokens)

  def project(self, pooled: Array) -> Array:
    """CLIP's `visual_projection`: `[B, D]` -> `[B, projection_dim]`."""
    if self.projection is None:
      raise ValueError(f"this {self.config.family} tower has no visual projection (only full "
                       "'clip' and CLIPVisionModelWithProjection checkpoints carry one)")
    return self.projection(pooled)

  def image_features(self, pixels: Array) -> Array:
    """HF `get_image_features`: the projected pooled output when there is a projection."""
    pooled = self(pixels).pooled
    return self.project(pooled) if self.projection is not None else pooled


def hf_rules(config: ViTConfig) -> list:
  """HF tensor names -> Flax paths, named as transformers 5 writes them for the tower's class.

  Without projection (CLIPVisionModel, SiglipVisionModel, a SigLIP tower) the names are bare
  (`embeddings.patch_embedding.weight`): the registry finds any wrapper prefix such as
  `vision_model.` by suffix match. With a projection (CLIPModel,
  CLIPVisionModelWithProjection) the first rule is the unprefixed `visual_projection.weight`, so
  the checkpoint is taken as is, and the tower's names carry `vision_model.`.
  """
  c = config
  rules = []
  tower = ""
  if c.projection_dim:
    rules += dense("visual_projection", ("projection",), bias=False)
    tower = "vision_model."
  emb = tower + "embeddings."
  rules.append(Rule(emb + "patch_embedding.weight", ("embeddings", "patch_embedding", "kernel"),
                    "conv2d", window=(c.patch_size, c.patch_size)))
  if not c.class_token:
    rules.append(Rule(emb + "patch_embedding.bias", ("embeddings", "patch_embedding", "bias")))
  else:
    rules.append(Rule(emb + "class_embedding", ("embeddings", "class_embedding")))
  rules.append(Rule(emb + "position_embedding.weight", ("embeddings", "position_embedding")))
  if c.class_token:
    rules += norm(tower + "pre_layrnorm", ("pre_norm",))
  for i in range(c.num_hidden_layers):
    hf, fl = f"{tower}encoder.layers.{i}.", f"layers_{i}"
    rules += norm(hf + "layer_norm1", (fl, "norm1"))
    for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
                       ("out_proj", "out")):
      rules += dense(hf + "self_attn." + proj, (fl, "attn", name))
    rules += norm(hf + "layer_norm2", (fl, "norm2"))
    rules += dense(hf + "mlp.fc1", (fl, "mlp", "fc1"))
    rules += dense(hf + "mlp.fc2", (fl, "mlp", "fc2"))
  rules += norm(tower + "post_layernorm", ("post_norm",))
  if not c.class_token and c.use_head:
    head = tower + "head."
    qkv = lambda leaf: tuple(("head", "attn", n, leaf) for n in ("query", "key", "value"))
    rules += [Rule(head + "probe", ("head", "probe")),
              Rule(head + "attention.in_proj_weight", qkv("kernel"), "split_linear"),
              Rule(head + "attention.in_proj_bias", qkv("bias"), "split_linear")]
    rules += dense(head + "attention.out_proj", ("head", "attn", "out"))
    rules += norm(head + "layernorm", ("head", "norm"))
    rules += dense(head + "mlp.fc1", ("head", "mlp", "fc1"))
    rules += dense(head + "mlp.fc2", ("head", "mlp", "fc2"))
  return rules


def dummy_inputs(module: ViT) -> tuple:
  c = module.config
  return (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)


def _builder(family: str):
  def build(hf_config: dict, dtype=jnp.float32, param_dtype=jnp.float32,
            dot_general_cls=None, quant=None) -> ViT:
    try:
      config = ViTConfig.from_hf(hf_config, family=family)
    except (ValueError, TypeError) as e:
      raise WeightsError(f"{family} config: {e}") from e
    return ViT(config, dtype=dtype, param_dtype=param_dtype, dot_general_cls=dot_general_cls,
               quant=quant)
  return build


for _name in FAMILIES:
  registry.register(Family(name=_name, modality="image", build=_builder(_name),
                           rules=lambda module: hf_rules(module.config),
                           dummy_inputs=dummy_inputs))
