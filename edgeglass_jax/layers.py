"""Building blocks shared by every model: Dense, attention, MLP, norms, RoPE.

Two rules hold for every block here:
- each parameter carries logical axis names (`nn.with_logical_partitioning`), so a config maps
  them onto mesh axes (`sharding.py`) and no module mentions a mesh;
- each weight matmul goes through an injectable `dot_general_cls` (a zero-argument factory of a
  `lax.dot_general`-compatible callable, e.g. AQT's `AqtDotGeneral`), so int8 QAT is a config
  switch (`quant.py`), not a fork of the model.

`dtype` is the compute dtype (bf16 on TPU/GPU), `param_dtype` the storage dtype; norms and
softmax always run in float32.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
Dtype = Any
DotGeneralFactory = Optional[Callable[[], Callable[..., Array]]]

default_kernel_init = nn.initializers.lecun_normal()


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, tuple(axes))


def activation(name: str) -> Callable[[Array], Array]:
  """Maps an HF `hidden_act` name to its function (exact erf GELU for "gelu", as PyTorch)."""
  table = {
      "gelu": functools.partial(nn.gelu, approximate=False),
      "gelu_new": functools.partial(nn.gelu, approximate=True),
      "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
      "gelu_tanh": functools.partial(nn.gelu, approximate=True),
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
      "relu": nn.relu,
      "silu": nn.silu,
      "swish": nn.silu,
      "tanh": jnp.tanh,
  }
  if name not in table:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(table)}")
  return table[name]


class Dense(nn.Module):
  """y = x @ kernel + bias over the last axis; kernel `[D_in, features]` named `kernel_axes`."""
  features: int
  use_bias: bool = True
  kernel_axes: Sequence[str] = ("embed", "mlp")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init
  dot_general_cls: DotGeneralFactory = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _partitioned(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    dot_general = self.dot_general_cls() if self.dot_general_cls else jax.lax.dot_general
    y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      bias = self.param("bias", _partitioned(nn.initializers.zeros, self.kernel_axes[-1:]),
                        (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm computed in float32, cast back to `dtype`."""
  epsilon: float = 1e-5
  use_bias: bool = True
  axis_name: str = "embed"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * self.param("scale", _partitioned(nn.initializers.ones, (self.axis_name,)), (d,),
                       self.param_dtype).astype(jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", _partitioned(nn.initializers.zeros, (self.axis_name,)), (d,),
                         self.param_dtype).astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm in float32; `scale_offset=1` gives Gemma's `(1 + scale)` form."""
  epsilon: float = 1e-6
  scale_offset: float = 0.0
  axis_name: str = "embed"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    init = nn.initializers.zeros if self.scale_offset else nn.initializers.ones
    scale = self.param("scale", _partitioned(init, (self.axis_name,)), (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.epsilon)
    return (y * (self.scale_offset + scale.astype(jnp.float32))).astype(self.dtype)


def make_norm(kind: str, epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str):
  if kind == "layernorm":
    return LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
  if kind == "rmsnorm":
    return RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
  raise ValueError(f"unknown norm {kind!r}; use 'layernorm' or 'rmsnorm'")


def rotary_embedding(x: Array, positions: Array, theta: float = 10000.0) -> Array:
  """Applies RoPE in the HF "rotate_half" layout to `x [B, T, H, hd]` at `positions [B, T]`."""
  hd = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def combine_masks(attn_mask: Optional[Array], kv_mask: Optional[Array],
                  q_len: int) -> Optional[Array]:
  """Merges a `[B, Tq, Tk]` (or `[B, H, Tq, Tk]`) boolean mask with a `[B, Tk]` key padding mask.

  Returns a boolean mask broadcastable to `[B, H, Tq, Tk]`, or None when neither is given.
  """
  mask = None
  if kv_mask is not None:
    mask = kv_mask.astype(bool)[:, None, None, :]
  if attn_mask is not None:
    attn_mask = attn_mask.astype(bool)
    if attn_mask.ndim == 3:
      attn_mask = attn_mask[:, None]
    if attn_mask.ndim != 4 or attn_mask.shape[-2] != q_len:
      raise ValueError(f"attention mask must be [B, Tq, Tk] or [B, H, Tq, Tk] with Tq={q_len}, "
                       f"got shape {attn_mask.shape}")
    mask = attn_mask if mask is None else (mask & attn_mask)
  return mask


# Above this many logits per (batch, head) the CPU lowering walks (batch, kv-head) blocks one at a
# time, so each block's [G, Tq, Tk] logits stay in cache (Whisper's 1500x1500: 3-4x faster).
BLOCKED_CPU_ATTENTION_MIN_LOGITS = 256 * 256


def _masked_softmax(logits: Array, mask: Optional[Array]) -> Array:
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)


def _attention_dense(q, k, v, mask, scale):
  """q `[B, K, G, Tq, hd]`, k/v `[B, K, Tk, hd]`, mask `[B|1, K|1, G|1, Tq|1, Tk]`."""
  logits = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  weights = _masked_softmax(logits, mask).astype(v.dtype)
  return jnp.einsum("bkgqs,bksd->bkgqd", weights, v)


def _attention_blocked(q, k, v, mask, scale):
  """`_attention_dense`, one (batch, kv-head) block at a time (`lax.map`)."""
  b, kv = q.shape[:2]

  def block(i):
    bi, ki = i // kv, i % kv
    logits = jnp.einsum("gqd,sd->gqs", q[bi, ki], k[bi, ki],
                        preferred_element_type=jnp.float32) * scale
    m = None
    if mask is not None:
      m = mask[bi if mask.shape[0] > 1 else 0, ki if mask.shape[1] > 1 else 0]
    return jnp.einsum("gqs,sd->gqd", _masked_softmax(logits, m).astype(v.dtype), v[bi, ki])

  out = jax.lax.map(block, jnp.arange(b * kv))
  return out.reshape(q.shape[:2] + out.shape[1:])


def dot_product_attention(q: Array, k: Array, v: Array, mask: Optional[Array],
                          scale: float) -> Array:
  """Softmax attention with grouped-query heads.

  q `[B, Tq, H, hd]`, k/v `[B, Tk, K, hd]` with H a multiple of K; mask boolean broadcastable to
  `[B, H, Tq, Tk]`. Logits and softmax in float32; a fully masked row gives zeros, not NaN.
  Computed head-major (`[B, K, G, T, hd]`, plain batched matmuls); on CPU, long sequences go
  block by block (see `BLOCKED_CPU_ATTENTION_MIN_LOGITS`), elsewhere in one piece.
  """
  b, tq, h, hd = q.shape
  tk, kv = k.shape[1], k.shape[2]
  if h % kv:
    raise ValueError(f"{h} query heads are not a multiple of {kv} key/value heads")
  g = h // kv
  qh = q.reshape(b, tq, kv, g, hd).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mb, mh, mq, _ = mask.shape
    mask = mask.reshape(mb, kv if mh > 1 else 1, g if mh > 1 else 1, mq, mask.shape[-1])
  dense = lambda *a: _attention_dense(*a, mask, scale)
  if tq * tk >= BLOCKED_CPU_ATTENTION_MIN_LOGITS:
    blocked = lambda *a: _attention_blocked(*a, mask, scale)
    out = jax.lax.platform_dependent(qh, kh, vh, cpu=blocked, default=dense)
  else:
    out = dense(qh, kh, vh)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, hd)


class MultiHeadAttention(nn.Module):
  """Multi-head (or grouped-query) attention with submodules query/key/value/out.

  Call with `x [B, Tq, D]`, optional `kv [B, Tk, D]` (cross-attention; default self), optional
  `mask` (`[B, Tq, Tk]` or `[B, H, Tq, Tk]` boolean, True = attend), optional `kv_mask [B, Tk]`
  (True = valid key) and optional `positions [B, T]` for RoPE when `rope_theta` is set.
  """
  num_heads: int
  head_dim: Optional[int] = None
  num_kv_heads: Optional[int] = None
  out_features: Optional[int] = None
  qkv_bias: bool = True
  key_bias: Optional[bool] = None
  out_bias: bool = True
  rope_theta: Optional[float] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot_general_cls: DotGeneralFactory = None

  def _dense(self, features, use_bias, axes, name):
    return Dense(features, use_bias=use_bias, kernel_axes=axes, dtype=self.dtype,
                 param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls, name=name)

  @nn.compact
  def __call__(self, x: Array, kv: Optional[Array] = None, mask: Optional[Array] = None,
               kv_mask: Optional[Array] = None, positions: Optional[Array] = None) -> Array:
    kv = x if kv is None else kv
    d = x.shape[-1]
    head_dim = self.head_dim or d // self.num_heads
    kv_heads = self.num_kv_heads or self.num_heads
    key_bias = self.qkv_bias if self.key_bias is None else self.key_bias
    b, tq, tk = x.shape[0], x.shape[1], kv.shape[1]
    q = self._dense(self.num_heads * head_dim, self.qkv_bias, ("embed", "heads"), "query")(x)
    k = self._dense(kv_heads * head_dim, key_bias, ("embed", "kv_heads"), "key")(kv)
    v = self._dense(kv_heads * head_dim, self.qkv_bias, ("embed", "kv_heads"), "value")(kv)
    q = q.reshape(b, tq, self.num_heads, head_dim)
    k = k.reshape(b, tk, kv_heads, head_dim)
    v = v.reshape(b, tk, kv_heads, head_dim)
    if self.rope_theta is not None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tq), (b, tq))
      q = rotary_embedding(q, positions, self.rope_theta)
      k = rotary_embedding(k, positions, self.rope_theta)
    out = dot_product_attention(q, k, v, combine_masks(mask, kv_mask, tq),
                                scale=1.0 / np.sqrt(head_dim))
    out = out.reshape(b, tq, self.num_heads * head_dim)
    return self._dense(self.out_features or d, self.out_bias, ("heads", "embed"), "out")(out)


class MLP(nn.Module):
  """Two-layer MLP (`fc1`, `fc2`), or gated (`gate`, `up`, `down`) as in Llama/Gemma."""
  hidden: int
  out_features: Optional[int] = None
  act: str = "gelu"
  gated: bool = False
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot_general_cls: DotGeneralFactory = None

  def _dense(self, features, axes, name):
    return Dense(features, use_bias=self.use_bias, kernel_axes=axes, dtype=self.dtype,
                 param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls, name=name)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out = self.out_features or x.shape[-1]
    fn = activation(self.act)
    if self.gated:
      h = fn(self._dense(self.hidden, ("embed", "mlp"), "gate")(x))
      h = h * self._dense(self.hidden, ("embed", "mlp"), "up")(x)
      return self._dense(out, ("mlp", "embed"), "down")(h)
    h = fn(self._dense(self.hidden, ("embed", "mlp"), "fc1")(x))
    return self._dense(out, ("mlp", "embed"), "fc2")(h)


class PreNormBlock(nn.Module):
  """Pre-LN transformer block: x + attn(norm1(x)); x + mlp(norm2(x)).

  Used by the CLIP/SigLIP towers and the Whisper encoder; BERT (post-LN) has its own block.
  """
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  epsilon: float = 1e-5
  key_bias: Optional[bool] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot_general_cls: DotGeneralFactory = None

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None,
               kv_mask: Optional[Array] = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(self.epsilon, name="norm1", **kw)(x)
    x = x + MultiHeadAttention(self.num_heads, key_bias=self.key_bias,
                               dot_general_cls=self.dot_general_cls, name="attn", **kw)(
                                   h, mask=mask, kv_mask=kv_mask)
    h = LayerNorm(self.epsilon, name="norm2", **kw)(x)
    return x + MLP(self.mlp_dim, act=self.act, dot_general_cls=self.dot_general_cls,
                   name="mlp", **kw)(h)
