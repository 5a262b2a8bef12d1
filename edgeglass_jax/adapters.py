"""Trainable adapters from cached frozen-encoder features into the shared Matryoshka space.

Inputs are what the feature cache holds per modality: `pooled [B, D_in]` and, when kept,
`tokens [B, N, D_in]` with `token_mask [B, N]` (True = valid token).

- `MLPProjector`: pre-norm residual MLP, or Freeze-Align's `Linear(x) + Linear(GELU(Linear(x)))`;
- `PerceiverResampler`: K learned latents cross-attend to the tokens, then self-attention blocks;
- `TokenCompressor`: OmniVision's space-to-depth (729 x D -> 81 x 9D) followed by a Dense;
- `MatryoshkaHead`: nested widths, each L2-normalised (MRL / MRL-E);
- `ModalityAdapter`: one adapter + a head per modality, described by an `AdapterConfig`.

Logical axes: the adapter's residual width is "embed"; the frozen feature axis, MLP hidden units
and head outputs are "mlp", so every kernel has one fsdp- and one tensor-shardable axis; the
Perceiver's latents are "latents". Every module takes `quant` (`quant.py`: int8 QAT and serving
are a switch) and passes it to each Dense and attention; `dot_general_cls` still works.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from edgeglass_jax import layers
from edgeglass_jax.layers import DotGeneralFactory, Dtype, l2_normalize

Array = jax.Array

KINDS = ("mlp", "mean", "perceiver", "compress")
STYLES = ("residual", "freeze_align")


def masked_mean(x: Array, mask: Optional[Array] = None) -> Array:
  """Mean over axis 1 of `x [B, N, D]` where `mask [B, N]` is True -> `[B, D]` (in float32).

  A row without valid tokens (a modality absent from the example) gives zeros, not NaN.
  """
  x32 = x.astype(jnp.float32)
  if mask is None:
    return x32.mean(axis=1)
  w = mask.astype(jnp.float32)[..., None]
  return (x32 * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)


def grid_side(num_tokens: int, factor: int, has_cls: Optional[bool] = None,
              shape: Any = None) -> Tuple[int, bool]:
  """Side g of the square token grid and whether a leading CLS token is dropped.

  has_cls None infers it: a leading token is dropped when N is not a square but N - 1 is
  (both are squares only for N = 1). Raises when the grid is not square or g % factor != 0.
  """
  shape = tuple(shape) if shape is not None else ("B", num_tokens, "D")
  if factor < 1:
    raise ValueError(f"TokenCompressor: factor must be >= 1, got {factor}")
  is_square = lambda n: n > 0 and math.isqrt(n) ** 2 == n
  inferred = has_cls is None
  if inferred:
    has_cls = not is_square(num_tokens) and is_square(num_tokens - 1)
  n = num_tokens - int(has_cls)
  if not is_square(n):
    what = (f"{num_tokens} tokens (nor {num_tokens - 1} after a leading CLS token)" if inferred
            else f"{num_tokens} tokens less the CLS token = {n}" if has_cls
            else f"{num_tokens} tokens")
    raise ValueError(f"TokenCompressor: tokens [B, N, D] of shape {shape}: {what} do not form a "
                     f"square grid")
  g = math.isqrt(n)
  if g % factor:
    raise ValueError(f"TokenCompressor: tokens [B, N, D] of shape {shape} form a {g}x{g} "
                     f"grid{' after the CLS token' if has_cls else ''}, not divisible by "
                     f"factor {factor}")
  return g, bool(has_cls)


def space_to_depth(tokens: Array, factor: int, has_cls: Optional[bool] = None) -> Array:
  """`[B, N, D]` tokens of a row-major g x g grid -> `[B, (g/f)^2, f*f*D]`.

  Output token (i, j) (row-major over the (g/f) x (g/f) grid) concatenates the f x f
  neighbourhood rows `f*i + di`, columns `f*j + dj` in (di, dj) row-major order, so feature index
  `(di*f + dj)*D + d`. A leading CLS token is dropped (see `grid_side`).
  """
  if tokens.ndim != 3:
    raise ValueError(f"space_to_depth: tokens must be [B, N, D], got shape {tokens.shape}")
  b, n, d = tokens.shape
  g, drop = grid_side(n, factor, has_cls, tokens.shape)
  if drop:
    tokens = tokens[:, 1:]
  s = g // factor
  x = tokens.reshape(b, s, factor, s, factor, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, s * s, factor * factor * d)


def _check_widths(widths: Sequence[int]) -> Tuple[int, ...]:
  """Widths as ints, largest first; empty, non-integer, non-positive or duplicate ones raise."""
  if isinstance(widths, (int, str)) or widths is None:
    raise ValueError(f"MatryoshkaHead: widths must be a sequence of ints, got {widths!r}")
  widths = tuple(widths)
  if not widths:
    raise ValueError("MatryoshkaHead: widths is empty; give at least one width, e.g. (512, 256)")
  bad = [w for w in widths
         if isinstance(w, bool) or not isinstance(w, numbers.Integral) or int(w) <= 0]
  if bad:
    raise ValueError(f"MatryoshkaHead: widths must be positive integers, got {bad} in {widths}")
  widths = tuple(int(w) for w in widths)
  if len(set(widths)) != len(widths):
    raise ValueError(f"MatryoshkaHead: duplicate widths in {widths}")
  return tuple(sorted(widths, reverse=True))


class ResidualMLPBlock(nn.Module):
  """x + Dropout(fc2(GELU(fc1(LayerNorm(x))))) over `x [..., D]`."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot_general_cls: DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.LayerNorm(name="norm", **kw)(x)
    h = layers.MLP(self.mlp_dim, act="gelu", dot_general_cls=self.dot_general_cls,
                   quant=self.quant, name="mlp", **kw)(h)
    return x + nn.Dropout(self.dropout)(h, deterministic=deterministic)


class MLPProjector(nn.Module):
  """Maps features `[..., D_in]` to `[..., out]` (or `[..., hidden]` when `out` is None).

  style "residual": Dense `in_proj` D_in -> hidden (skipped with `in_proj=False`; the input must
  then be `hidden` wide), `depth` pre-norm residual MLP blocks (hidden -> mlp_ratio*hidden ->
  hidden, GELU), a final LayerNorm, then Dense `out_proj` to `out` when `out` is set.
  style "freeze_align": Freeze-Align's single block `skip(x) + fc2(GELU(fc1(x)))`, fc1 of width
  `hidden`; `depth`, `mlp_ratio` and `in_proj` are unused.
  """
  hidden: int
  out: Optional[int] = None
  depth: int = 2
  dropout: float = 0.0
  mlp_ratio: int = 4
  style: str = "residual"
  in_proj: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot_general_cls: DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def _dense(self, features, axes, name):
    return layers.Dense(features, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype,
                        dot_general_cls=self.dot_general_cls, quant=self.quant, name=name)

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    if self.style not in STYLES:
      raise ValueError(f"MLPProjector: unknown style {self.style!r}; use one of {STYLES}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.style == "freeze_align":
      out = self.out or self.hidden
      h = layers.MLP(self.hidden, out_features=out, act="gelu",
                     dot_general_cls=self.dot_general_cls, quant=self.quant, name="mlp", **kw)(x)
      h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
      return self._dense(out, ("mlp", "embed"), "skip")(x) + h
    if self.in_proj:
      x = self._dense(self.hidden, ("mlp", "embed"), "in_proj")(x)
    elif x.shape[-1] != self.hidden:
      raise ValueError(f"MLPProjector(in_proj=False): input [..., D] of shape {x.shape} must be "
                       f"hidden={self.hidden} wide")
    for i in range(self.depth):
      x = ResidualMLPBlock(self.mlp_ratio * self.hidden, self.dropout,
                           dot_general_cls=self.dot_general_cls, quant=self.quant,
                           name=f"block{i}", **kw)(x, deterministic)
    x = layers.LayerNorm(name="norm", **kw)(x)
    if self.out is None:
      return x
    return self._dense(self.out, ("embed", "mlp"), "out_proj")(x)


class PerceiverResampler(nn.Module):
  """K learned latents read a token sequence: `tokens [B, N, D_in]` -> `[B, K, width]`.

  Tokens are projected to `width` (Dense `in_proj`) and normalised; the latents (param
  `latents [K, width]`, logical axes ("latents", "embed")) cross-attend to them under
  `token_mask [B, N]` (padded tokens never contribute), then pass a pre-norm MLP, `depth`
  pre-norm self-attention + MLP blocks and a final LayerNorm. Use `pooled` for `[B, width]`.
  """
  num_latents: int
  width: int
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot_general_cls: DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  @nn.compact
  def __call__(self, tokens: Array, token_mask: Optional[Array] = None) -> Array:
    if tokens.ndim != 3:
      raise ValueError(f"PerceiverResampler: tokens must be [B, N, D], got shape {tokens.shape}")
    if token_mask is not None and token_mask.shape != tokens.shape[:2]:
      raise ValueError(f"PerceiverResampler: token_mask shape {token_mask.shape} does not match "
                       f"tokens [B, N] = {tokens.shape[:2]}")
    if self.width % self.num_heads:
      raise ValueError(f"PerceiverResampler: width {self.width} is not a multiple of num_heads "
                       f"{self.num_heads}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dg = dict(dot_general_cls=self.dot_general_cls, quant=self.quant)
    # No key biases: softmax ignores a per-query constant, so they would get zero gradient.
    latents = self.param("latents", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("latents", "embed")), (self.num_latents, self.width),
                         self.param_dtype)
    x = layers.Dense(self.width, kernel_axes=("mlp", "embed"), name="in_proj", **kw, **dg)(tokens)
    x = layers.LayerNorm(name="kv_norm", **kw)(x)
    lat = jnp.broadcast_to(jnp.asarray(latents, self.dtype),
                           (tokens.shape[0], self.num_latents, self.width))
    q = layers.LayerNorm(name="q_norm", **kw)(lat)
    lat = lat + layers.MultiHeadAttention(self.num_heads, key_bias=False, name="cross_attn",
                                           **kw, **dg)(
        q, kv=x, kv_mask=token_mask)
    lat = ResidualMLPBlock(self.mlp_ratio * self.width, name="cross_mlp", **kw, **dg)(lat)
    for i in range(self.depth):
      lat = layers.PreNormBlock(self.num_heads, self.mlp_ratio * self.width, act="gelu",
                                key_bias=False, name=f"block{i}", **kw, **dg)(lat)
    return layers.LayerNorm(name="norm", **kw)(lat)

  def pooled(self, tokens: Array, token_mask: Optional[Array] = None) -> Array:
    """Mean of the latents: `[B, width]`, in `dtype`."""
    return masked_mean(self(tokens, token_mask)).astype(self.dtype)


class TokenCompressor(nn.Module):
  """OmniVision-style compression: `[B, g*g (+1 CLS), D]` -> `[B, (1 +) (g/f)^2, out]`.

  `space_to_depth` concatenates each f x f neighbourhood (729 x D -> 81 x 9D for a 27x27 grid
  and f = 3), then Dense `proj` maps f*f*D to `out`. has_cls: True drops a leading CLS token,
  False keeps all tokens, None infers it from N (see `grid_side`). keep_cls: the CLS token,
  projected by its own Dense `cls_proj`, leads the output instead of being dropped (it is the
  tokens' summary: DINOv2's CLS alone gives the synthetic colours to a linear probe at .95, its
  4x4 space-to-depth patches, concatenated, at .87); raises when the tokens have none.
  """
  factor: int = 3
  out: int = 256
  has_cls: Optional[bool] = False
  keep_cls: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot_general_cls: DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def _cls(self, tokens: Array) -> bool:
    """Whether a kept CLS token leads the output (checked against the tokens' shape)."""
    if not self.keep_cls:
      return False
    if not grid_side(tokens.shape[1], self.factor, self.has_cls, tokens.shape)[1]:
      raise ValueError(f"TokenCompressor(keep_cls=True): tokens [B, N, D] of shape "
                       f"{tokens.shape} have no leading CLS token (has_cls={self.has_cls})")
    return True

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    kw = dict(kernel_axes=("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
              dot_general_cls=self.dot_general_cls, quant=self.quant)
    x = layers.Dense(self.out, name="proj", **kw)(
        space_to_depth(tokens, self.factor, self.has_cls))
    if not self._cls(tokens):
      return x
    return jnp.concatenate([layers.Dense(self.out, name="cls_proj", **kw)(tokens[:, :1]), x], 1)

  def compress_mask(self, token_mask: Array) -> Array:
    """`[B, N]` -> `[B, (1 +) (g/f)^2]`: a compressed token is valid when any of its tokens is."""
    m = space_to_depth(token_mask[..., None].astype(jnp.float32), self.factor, self.has_cls)
    m = m.max(axis=-1) > 0
    if not self._cls(token_mask[..., None]):
      return m
    return jnp.concatenate([token_mask[:, :1].astype(bool), m], 1)


class MatryoshkaHead(nn.Module):
  """Nested embeddings: `x [..., D]` -> `{width: z [..., width]}`, each z L2-normalised.

  Widths are used largest first whatever order they are given in (`sorted_widths`; the dict is
  built in that order, but jax transforms return dicts with keys sorted ascending).
  mrl_e=True (MRL-E, weight-shared): one Dense `proj` to max(widths); width m is the first m
    output units, normalised on its own; the small embeddings are prefixes of the large one, so
    one stored vector serves every budget (truncate, renormalise).
  mrl_e=False (MRL with separate weights per granularity, as in Kusupati et al.): an independent
    Dense `proj_{m}` per width; all widths share the adapter below the head but the outputs are
    not prefixes of one another, so each width must be computed by its own projection.
  Outputs are float32.
  """
  widths: Sequence[int] = (512, 256, 128, 64)
  mrl_e: bool = False
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot_general_cls: DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def __post_init__(self):
    _check_widths(self.widths)
    super().__post_init__()

  @property
  def sorted_widths(self) -> Tuple[int, ...]:
    return _check_widths(self.widths)

  def _dense(self, features, name):
    return layers.Dense(features, use_bias=self.use_bias, kernel_axes=("embed", "mlp"),
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        dot_general_cls=self.dot_general_cls, quant=self.quant, name=name)

  @nn.compact
  def __call__(self, x: Array) -> Dict[int, Array]:
    widths = self.sorted_widths
    if self.mrl_e:
      z = self._dense(widths[0], "proj")(x)
      return {m: l2_normalize(z[..., :m]) for m in widths}
    return {m: l2_normalize(self._dense(m, f"proj_{m}")(x)) for m in widths}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """How one modality's cached features become its shared-space embedding.

  kind: "mlp" (MLPProjector on `pooled`; tokens are ignored), "mean" (masked mean of the tokens,
    or `pooled` when there are none, then MLPProjector), "perceiver" (PerceiverResampler with
    `num_latents` latents of width `hidden`, mean over latents), "compress" (TokenCompressor by
    `factor` to `hidden`, the projector's blocks on each compressed token, masked mean).
  hidden: adapter width; depth: residual MLP blocks (perceiver: self-attention blocks);
  mlp_ratio: MLP hidden units per adapter unit; style: MLPProjector style ("residual" |
  "freeze_align"); has_cls: compress only, whether tokens start with a CLS token (None: infer);
  keep_cls: compress only, the CLS token becomes a compressed token of its own (see
  `TokenCompressor`).
  """
  kind: str = "mlp"
  hidden: int = 256
  depth: int = 2
  num_latents: int = 32
  num_heads: int = 4
  factor: int = 3
  mlp_ratio: int = 4
  dropout: float = 0.0
  style: str = "residual"
  has_cls: Optional[bool] = None
  keep_cls: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"AdapterConfig.kind must be one of {KINDS}, got {self.kind!r}")
    if self.style not in STYLES:
      raise ValueError(f"AdapterConfig.style must be one of {STYLES}, got {self.style!r}")
    for name in ("hidden", "num_latents", "num_heads", "factor", "mlp_ratio"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"AdapterConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.depth < 0:
      raise ValueError(f"AdapterConfig.depth must be >= 0, got {self.depth}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout}")
    if self.keep_cls and self.kind != "compress":
      raise ValueError(f"AdapterConfig.keep_cls is for kind 'compress', not {self.kind!r}")
    if self.kind == "perceiver" and self.hidden % self.num_heads:
      raise ValueError(f"AdapterConfig: hidden {self.hidden} is not a multiple of num_heads "
                       f"{self.num_heads} (kind='perceiver')")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "AdapterConfig":
    """From a dict or ml_collections ConfigDict; unknown keys raise with their names."""
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
      raise ValueError(f"AdapterConfig: unknown keys {unknown}; known: {sorted(fields)}")
    kw = {}
    for k, v in d.items():
      if k in ("kind", "style"):
        kw[k] = str(v)
      elif k == "dropout":
        kw[k] = float(v)
      elif k == "has_cls":
        kw[k] = None if v is None else bool(v)
      elif k == "keep_cls":
        kw[k] = bool(v)
      else:
        kw[k] = int(v)
    return cls(**kw)


class ModalityAdapter(nn.Module):
  """One modality's adapter + Matryoshka head.

  `__call__(pooled [B, D], tokens [B, N, D] | None, token_mask [B, N] | None)` ->
  `{width: z [B, width]}`, widths largest first, each L2-normalised (float32). See
  `AdapterConfig` for the kinds; "perceiver" and "compress" need tokens.
  """
  config: AdapterConfig
  widths: Sequence[int] = (512, 256, 128, 64)
  mrl_e: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot_general_cls: DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def _check_inputs(self, pooled, tokens, token_mask):
    kind = self.config.kind
    if pooled is not None and pooled.ndim != 2:
      raise ValueError(f"ModalityAdapter(kind={kind!r}): pooled must be [B, D], got shape "
                       f"{pooled.shape}")
    if tokens is None:
      if kind in ("perceiver", "compress"):
        raise ValueError(f"ModalityAdapter(kind={kind!r}) needs tokens [B, N, D]; this modality "
                         f"has only pooled features (keep its tokens at extraction)")
      if pooled is None:
        raise ValueError(f"ModalityAdapter(kind={kind!r}): pooled is None and there are no tokens")
      return
    if tokens.ndim != 3:
      raise ValueError(f"ModalityAdapter(kind={kind!r}): tokens must be [B, N, D], got shape "
                       f"{tokens.shape}")
    if pooled is not None and pooled.shape[0] != tokens.shape[0]:
      raise ValueError(f"ModalityAdapter(kind={kind!r}): pooled shape {pooled.shape} and tokens "
                       f"shape {tokens.shape} disagree on B")
    if token_mask is not None and token_mask.shape != tokens.shape[:2]:
      raise ValueError(f"ModalityAdapter(kind={kind!r}): token_mask shape {token_mask.shape} "
                       f"does not match tokens [B, N] = {tokens.shape[:2]}")

  @nn.compact
  def __call__(self, pooled: Optional[Array], tokens: Optional[Array] = None,
               token_mask: Optional[Array] = None,
               deterministic: bool = True) -> Dict[int, Array]:
    cfg = self.config
    self._check_inputs(pooled, tokens, token_mask)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              dot_general_cls=self.dot_general_cls, quant=self.quant)
    projector = dict(hidden=cfg.hidden, depth=cfg.depth, dropout=cfg.dropout,
                     mlp_ratio=cfg.mlp_ratio, style=cfg.style, name="projector", **kw)
    if cfg.kind == "mlp":
      h = MLPProjector(**projector)(pooled, deterministic)
    elif cfg.kind == "mean":
      x = pooled if tokens is None else masked_mean(tokens, token_mask)
      h = MLPProjector(**projector)(x, deterministic)
    elif cfg.kind == "perceiver":
      lat = PerceiverResampler(cfg.num_latents, cfg.hidden, cfg.depth, cfg.num_heads,
                               cfg.mlp_ratio, name="resampler", **kw)(tokens, token_mask)
      h = masked_mean(lat)
    else:
      compressor = TokenCompressor(cfg.factor, cfg.hidden, cfg.has_cls, cfg.keep_cls,
                                   name="compressor", **kw)
      x = compressor(tokens)
      x = MLPProjector(in_proj=False, **projector)(x, deterministic)
      h = masked_mean(x, None if token_mask is None else compressor.compress_mask(token_mask))
    return MatryoshkaHead(self.widths, self.mrl_e, name="head", **kw)(h.astype(self.dtype))
