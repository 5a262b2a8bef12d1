"""Building blocks shared by every model: Dense, embeddings, attention, MLP, norms, RoPE.

Two rules hold for every block here:
- each parameter carries logical axis names (`nn.with_logical_partitioning`), so a config maps
  them onto mesh axes (`sharding.py`) and no module mentions a mesh;
- each weight matmul is a `Dense` (the ViT patch embedding and Whisper's convolutions are
  `Dense` subclasses applied to flattened windows) and goes through an injectable dot_general,
  so int8 QAT is a config switch (`quant.py`), not a fork of the model. The injection is a quantization object `quant` with a
  method `dot_general_cls(kernel_axes)` returning a zero-argument factory of a
  `lax.dot_general`-compatible callable (maxtext `layers/linears.py`): the object sees the
  kernel's logical axes, which AQT needs to place its scales. The older `dot_general_cls`
  field (the zero-argument factory itself) still works; a module takes one or the other.
  A quantization object may also give the attention core's einsums (`einsum_cls()`, see
  `make_einsum`) and say it is `serving`: then `Dense` creates no float kernel, because the
  matmul reads the converted int8 kernel from its own variable collection.

`dtype` is the compute dtype (bf16 on TPU/GPU), `param_dtype` the storage dtype; norms and
softmax always run in float32.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
Dtype = Any
DotGeneralFactory = Optional[Callable[[], Callable[..., Array]]]
LayerCache = Dict[str, Array]


class Quant(Protocol):
  """What `Dense` (and every module that passes `quant` down) asks of a quantization object.

  Optional members, read with `getattr`: `serving` (bool; True: the kernels live in the quant
  object's collection, `Dense` makes no float kernel), `converting` (bool; True: this pass
  writes the serving kernels) and `einsum_cls()` (a zero-argument factory of an
  `einsum(eqn, lhs, rhs)` callable for the attention core, or None). A serving quant also has
  `collection` and `stored_kernel(tree) -> (int8 value, scale)`, the kernel stored in `tree`
  (the collection's subtree of one module), which `Embed` reads its rows from.
  """

  def dot_general_cls(self, kernel_axes: Tuple[Optional[str], ...]
                      ) -> Callable[[], Callable[..., Array]]:
    ...


def is_serving(quant: Optional[Quant]) -> bool:
  """True when `quant` serves converted weights (no float kernels in the param tree)."""
  return bool(getattr(quant, "serving", False))


def make_einsum(quant: Optional[Quant]) -> Optional[Callable[..., Array]]:
  """The attention core's `einsum(eqn, lhs, rhs)` from `quant.einsum_cls()`, or None (plain
  `jnp.einsum`). Call it inside a compact method, like `make_dot_general`."""
  factory = getattr(quant, "einsum_cls", None)
  factory = factory() if factory is not None else None
  return None if factory is None else factory()

default_kernel_init = nn.initializers.lecun_normal()


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, tuple(axes))


def make_dot_general(quant: Optional[Quant], dot_general_cls: DotGeneralFactory,
                     kernel_axes: Sequence[Optional[str]]) -> Callable[..., Array]:
  """The matmul of one kernel: `quant`'s for `kernel_axes`, else the factory's, else lax's.

  Call it inside a compact method: a factory that builds a linen module (AQT) then gets a
  submodule of the caller, auto-named like `AqtDotGeneral_0`.
  """
  if quant is not None and dot_general_cls is not None:
    raise ValueError("pass either quant= or dot_general_cls=, not both")
  if quant is not None:
    return quant.dot_general_cls(tuple(kernel_axes))()
  if dot_general_cls is not None:
    return dot_general_cls()
  return jax.lax.dot_general


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
  """y = x @ kernel + bias over the last axis: `[..., D_in]` -> `[..., features]`.

  The kernel `[D_in, features]` carries the logical names `kernel_axes`; the matmul comes from
  `quant.dot_general_cls(kernel_axes)` (or the `dot_general_cls` factory, or `lax.dot_general`).
  """
  features: int
  use_bias: bool = True
  kernel_axes: Sequence[str] = ("embed", "mlp")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init
  dot_general_cls: DotGeneralFactory = None
  quant: Optional[Quant] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = (x.shape[-1], self.features)
    if is_serving(self.quant):
      kernel = jnp.zeros(shape, self.dtype)  # only its shape is read: the int8 kernel is stored
    else:
      kernel = self.param("kernel", _partitioned(self.kernel_init, self.kernel_axes), shape,
                          self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    dot_general = make_dot_general(self.quant, self.dot_general_cls, self.kernel_axes)
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


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """`x / max(||x||, eps)` along `axis`: the one L2 normalisation of embeddings.

  Runs in float32 (float64 stays float64). A numpy array in gives a numpy array out (host-side
  eval on gathered embeddings); anything else gives a jax array (model heads, losses). The floor
  keeps a zero row zero, with a finite gradient.
  """
  xp = np if isinstance(x, np.ndarray) else jnp
  x = xp.asarray(x)
  if not xp.issubdtype(x.dtype, xp.floating) or xp.finfo(x.dtype).bits < 32:
    x = x.astype(xp.float32)
  sq = xp.sum(x * x, axis=axis, keepdims=True)
  return x / xp.sqrt(xp.maximum(sq, eps * eps))


def make_norm(kind: str, epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str):
  if kind == "layernorm":
    return LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
  if kind == "rmsnorm":
    return RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
  raise ValueError(f"unknown norm {kind!r}; use 'layernorm' or 'rmsnorm'")


@dataclasses.dataclass(frozen=True)
class RoPE:
  """Rotary position embedding parameters, as HF's `rope_parameters` for one layer type.

  `kind` is HF's `rope_type`: "default"; "linear" (positions divided by `factor`); "llama3"
  (Llama 3.1 frequency-dependent scaling by `factor`, `low_freq_factor`, `high_freq_factor`
  around `original_max_position_embeddings`).
  """
  theta: float = 10000.0
  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ("default", "linear", "llama3"):
      raise ValueError(f"unsupported RoPE type {self.kind!r}; supported: default, linear, llama3")

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """`[head_dim / 2]` float32 inverse frequencies, computed in float32 as transformers does."""
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(self.theta), exponent)).astype(np.float32)
    if self.kind == "linear":
      return (inv / np.float32(self.factor)).astype(np.float32)
    if self.kind == "llama3":
      old = self.original_max_position_embeddings
      low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
      wavelen = 2 * np.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
      smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor -
                                                         self.low_freq_factor)
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
      return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: Array, positions: Array, inv_freq: Any) -> Array:
  """Rotates `x [B, T, H, hd]` at `positions [B, T]` in HF's "rotate_half" layout (float32)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]  # [B, T, 1, hd]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def rotary_embedding(x: Array, positions: Array, theta: float = 10000.0) -> Array:
  """Applies plain RoPE (base `theta`) to `x [B, T, H, hd]` at `positions [B, T]`."""
  return apply_rope(x, positions, RoPE(theta).inv_freq(x.shape[-1]))


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


# Above this many logits per (batch, head) the CPU lowering walks blocks of queries one at a
# time (`_attention_blocked`), so each block's logits stay in cache; below it one piece is faster
# (DINOv2 at 224, 257 tokens). A block holds at most `BLOCKED_CPU_ATTENTION_BLOCK_LOGITS`
# logits (3 MiB of float32): Whisper's 1500x1500 runs as 3 blocks of 500 queries per head
# (alone at [4, 1500, 6, 64] on 2 cores: 107 ms a layer, 164 ms with one 9 MiB block per head).
BLOCKED_CPU_ATTENTION_MIN_LOGITS = 320 * 320
BLOCKED_CPU_ATTENTION_BLOCK_LOGITS = 3 << 18


def _masked_softmax(logits: Array, mask: Optional[Array]) -> Array:
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)


def _softmax_mix(eqn: str, logits: Array, mask: Optional[Array], v: Array) -> Array:
  """`einsum(eqn, softmax(logits), v)` with the division moved after the product.

  Dividing the `[.., Tq, hd]` output instead of the `[.., Tq, Tk]` weights saves a pass over
  the logits (25.7 -> 22.7 ms per DINOv2 layer on 2 CPU cores); fully masked rows give zeros.
  """
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  unnormalized = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  if mask is not None:
    unnormalized = jnp.where(mask, unnormalized, 0.0)
  total = unnormalized.sum(-1, keepdims=True)
  out = jnp.einsum(eqn, unnormalized.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / jnp.where(total > 0, total, 1.0)).astype(v.dtype)


def _soft_cap(logits: Array, cap: Optional[float]) -> Array:
  return logits if cap is None else jnp.tanh(logits / cap) * cap


def _attention_dense(q, k, v, mask, scale, softcap=None, einsum=None):
  """q `[B, K, G, Tq, hd]`, k/v `[B, K, Tk, hd]`, mask `[B|1, K|1, G|1, Tq|1, Tk]`."""
  if einsum is None:
    logits = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32)
    return _softmax_mix("bkgqs,bksd->bkgqd", _soft_cap(logits * scale, softcap), mask, v)
  logits = einsum("bkgqd,bksd->bkgqs", q, k).astype(jnp.float32)
  weights = _masked_softmax(_soft_cap(logits * scale, softcap), mask).astype(v.dtype)
  return einsum("bkgqs,bksd->bkgqd", weights, v)


def _attention_blocked(q, k, v, mask, scale, softcap=None):
  """`_attention_dense`, one block of queries of one (batch, kv-head) at a time (`lax.map`).

  Each (batch, kv-head) splits its `Tq` queries into the fewest equal chunks whose `[G, C, Tk]`
  logits fit `BLOCKED_CPU_ATTENTION_BLOCK_LOGITS` (the last chunk padded); a block is two
  plain matmuls that XLA:CPU runs on all cores, where a batched matmul runs on one.
  """
  b, kv, g, tq, hd = q.shape
  tk = k.shape[2]
  fewest = min(tq, max(1, -(-g * tq * tk // BLOCKED_CPU_ATTENTION_BLOCK_LOGITS)))
  c = -(-tq // fewest)  # queries per block
  n = -(-tq // c)  # blocks per (batch, kv-head), <= fewest
  pad = n * c - tq
  chunks = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0))).reshape(b, kv, g, n, c, hd)
  if mask is not None and mask.shape[3] > 1:
    mask = jnp.pad(mask, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    mask = mask.reshape(mask.shape[:3] + (n, c, tk))
  else:
    mask = None if mask is None else mask[:, :, :, None]

  def block(i):
    bi, ki, ci = i // (kv * n), (i // n) % kv, i % n
    logits = jnp.einsum("gqd,sd->gqs", chunks[bi, ki, :, ci], k[bi, ki],
                        preferred_element_type=jnp.float32) * scale
    m = None
    if mask is not None:
      m = mask[bi if mask.shape[0] > 1 else 0, ki if mask.shape[1] > 1 else 0, :,
               ci if mask.shape[3] > 1 else 0]
    return _softmax_mix("gqs,sd->gqd", _soft_cap(logits, softcap), m, v[bi, ki])

  out = jax.lax.map(block, jnp.arange(b * kv * n))
  out = out.reshape(b, kv, n, g, c, hd).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, kv, g, n * c, hd)[:, :, :, :tq]


def _attention_cudnn(q: Array, k: Array, v: Array, scale: float) -> Optional[Array]:
  """cuDNN's fused (flash) attention for unmasked half-precision attention on a GPU backend.

  The frozen encoders' path on GPUs (ViT, DINOv2, Whisper's encoder in bf16): it never writes
  the `[B, H, T, T]` logits to memory (DINOv2-S/14 at batch 128 in bf16 on an H200: 0.69x HF
  PyTorch's sdpa with the materialized logits). None where cuDNN cannot take it (another
  backend, no cuDNN, an unsupported head size or dtype): the caller computes it with XLA.
  """
  if jax.default_backend() != "gpu":
    return None
  try:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  except (RuntimeError, ValueError, NotImplementedError, TypeError):
    return None


def dot_product_attention(q: Array, k: Array, v: Array, mask: Optional[Array],
                          scale: float, softcap: Optional[float] = None,
                          einsum: Optional[Callable[..., Array]] = None) -> Array:
  """Softmax attention with grouped-query heads.

  q `[B, Tq, H, hd]`, k/v `[B, Tk, K, hd]` with H a multiple of K; mask boolean broadcastable to
  `[B, H, Tq, Tk]`. Logits (`scale * q.k`, then `softcap * tanh(logits / softcap)` when
  `softcap` is set) and softmax in float32; a fully masked row gives zeros, not NaN.
  Computed head-major (`[B, K, G, T, hd]`, plain batched matmuls); on CPU, long sequences go
  block by block (see `BLOCKED_CPU_ATTENTION_MIN_LOGITS`), elsewhere in one piece; on a GPU,
  unmasked bf16/fp16 attention goes to cuDNN's fused kernel (`_attention_cudnn`).
  `einsum(eqn, lhs, rhs)` replaces `jnp.einsum` for both products (`make_einsum`: int8
  attention); it may be a linen module, so that path is always computed in one piece.
  """
  b, tq, h, hd = q.shape
  tk, kv = k.shape[1], k.shape[2]
  if h % kv:
    raise ValueError(f"{h} query heads are not a multiple of {kv} key/value heads")
  if (mask is None and softcap is None and einsum is None
      and q.dtype in (jnp.bfloat16, jnp.float16) and q.dtype == k.dtype == v.dtype):
    out = _attention_cudnn(q, k, v, scale)
    if out is not None:
      return out
  g = h // kv
  qh = q.reshape(b, tq, kv, g, hd).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mb, mh, mq, _ = mask.shape
    mask = mask.reshape(mb, kv if mh > 1 else 1, g if mh > 1 else 1, mq, mask.shape[-1])
  dense = lambda *a: _attention_dense(*a, mask, scale, softcap, einsum)
  if einsum is None and tq * tk >= BLOCKED_CPU_ATTENTION_MIN_LOGITS:
    blocked = lambda *a: _attention_blocked(*a, mask, scale, softcap)
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
  quant: Optional[Quant] = None

  def _dense(self, features, use_bias, axes, name):
    return Dense(features, use_bias=use_bias, kernel_axes=axes, dtype=self.dtype,
                 param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls,
                 quant=self.quant, name=name)

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
                                scale=1.0 / np.sqrt(head_dim), einsum=make_einsum(self.quant))
    out = out.reshape(b, tq, self.num_heads * head_dim)
    return self._dense(self.out_features or d, self.out_bias, ("heads", "embed"), "out")(out)


class Embed(nn.Module):
  """Token embedding table `[V, D]` (axes `vocab`, `embed`).

  `__call__(ids [B, T]) -> [B, T, D]` looks rows up; `attend(x [B, T, D]) -> [B, T, V]` is the
  tied output projection `x @ table.T`, through the injectable dot_general.

  Under an int8 `quant`, `attend` is an int8 matmul whose converted kernel is the table in int8
  with one scale per row (per vocabulary entry), and serving keeps no float table: the lookup
  reads the same int8 rows times their scales (CONVERT stores the table even when the model
  never calls `attend`, as an untied LM's input embedding). So the table is stored once, at a
  quarter of its float size, and the serving lookup differs from the float (TRAIN) one by that
  rounding (at most half a step, about `max|row| / 255`, per entry).
  """
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=1.0)
  dot_general_cls: DotGeneralFactory = None
  quant: Optional[Quant] = None

  def setup(self):
    shape = (self.num_embeddings, self.features)
    if is_serving(self.quant):
      self.embedding = jnp.zeros(shape, self.dtype)  # only its shape is read, as in `Dense`
    else:
      self.embedding = self.param("embedding", _partitioned(self.embedding_init,
                                                            ("vocab", "embed")),
                                  shape, self.param_dtype)
    self.attend_dot_general = make_dot_general(self.quant, self.dot_general_cls,
                                               ("vocab", "embed"))

  def __call__(self, ids: Array) -> Array:
    serving = is_serving(self.quant)
    if getattr(self.quant, "converting", False) or (serving and self.is_initializing()):
      # [1, 1, D] like the [B, T, D] calls: the stored scale takes the matmul output's rank
      self.attend(jnp.zeros((1, 1, self.features), self.dtype))  # writes / declares the table
    if not serving:
      return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)
    value, scale = self.quant.stored_kernel(self.variables.get(self.quant.collection, {}))
    rows = jnp.take(value, ids, axis=0).astype(self.dtype)
    return rows * jnp.take(jnp.reshape(scale, (-1,)), ids, axis=0)[..., None].astype(self.dtype)

  def attend(self, x: Array) -> Array:
    x, table = nn.dtypes.promote_dtype(x, self.embedding, dtype=self.dtype)
    return self.attend_dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())))


def init_attention_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                         dtype: Dtype = jnp.float32) -> LayerCache:
  """Empty `Attention` cache: `k`, `v [B, K, S, hd]`, `positions [B, S]`, `end_index [B]`.

  Head-major, the layout the attention einsums read: a decoding step writes its `[B, K, 1, hd]`
  keys/values in place and reads the S slots without transposing (copying) the whole cache in
  every layer.
  """
  shape = (batch, num_kv_heads, max_len, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "positions": jnp.zeros((batch, max_len), jnp.int32),
          "end_index": jnp.zeros((batch,), jnp.int32)}


class Attention(nn.Module):
  """Self-attention with an explicit KV cache, mapping `(x, positions, cache, mask)` to
  `(new_cache, y)` (gemma `gm/nn/_modules.py`).

  - `x [B, T, D]`, `positions [B, T]` int (RoPE and sliding-window positions of the queries).
  - `cache` None: keys are the T inputs, at the queries' positions; `mask [B, T, T]`.
  - `cache` from `init_cache` (`k`, `v [B, K, S, hd]`, `positions [B, S]`, `end_index [B]`):
    the T new keys/values and positions are written at slot `end_index[0]` (all rows advance
    together: ragged prompts are left-padded and masked out), queries attend to all S slots under
    `mask [B, T, S]`, and key positions are the cache's. The cache must hold the whole sequence
    (no ring buffer); `new_cache["end_index"]` is `end_index + T`.
  - `mask` boolean, True = attend (None: every key); a sliding window (`|q_pos - k_pos| <
    sliding_window`, HF's exclusive bound) further restricts it.
  Returns `y [B, T, features or D]`. Options: GQA (`num_kv_heads`), q/k/v biases (`key_bias`
  overrides `qkv_bias` for k: Whisper has none), q/k RMSNorm
  over `head_dim` (Gemma 3, `(1 + w)` when `qk_norm_offset=1`), logit scale
  `query_pre_attn_scalar ** -0.5` (default `head_dim ** -0.5`), logit soft-capping.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  features: Optional[int] = None
  qkv_bias: bool = False
  key_bias: Optional[bool] = None
  out_bias: bool = False
  rope: Optional[RoPE] = RoPE()
  query_pre_attn_scalar: Optional[float] = None
  attn_logit_softcap: Optional[float] = None
  sliding_window: Optional[int] = None
  qk_norm: bool = False
  qk_norm_offset: float = 0.0
  norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot_general_cls: DotGeneralFactory = None
  quant: Optional[Quant] = None

  @property
  def scale(self) -> float:
    return float((self.query_pre_attn_scalar or self.head_dim) ** -0.5)

  def init_cache(self, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> LayerCache:
    """An empty cache of `max_len` slots (needs no params: call it on the unbound module)."""
    return init_attention_cache(batch, max_len, self.num_kv_heads, self.head_dim, dtype)

  def _dense(self, features, use_bias, axes, name):
    return Dense(features, use_bias=use_bias, kernel_axes=axes, dtype=self.dtype,
                 param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls,
                 quant=self.quant, name=name)

  def _head_norm(self, name):
    return RMSNorm(self.norm_epsilon, scale_offset=self.qk_norm_offset, axis_name="head_dim",
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: Array, positions: Array, cache: Optional[LayerCache] = None,
               mask: Optional[Array] = None) -> Tuple[Optional[LayerCache], Array]:
    b, t, d = x.shape
    h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
    q = self._dense(h * hd, self.qkv_bias, ("embed", "heads"), "query")(x).reshape(b, t, h, hd)
    key_bias = self.qkv_bias if self.key_bias is None else self.key_bias
    k = self._dense(kv * hd, key_bias, ("embed", "kv_heads"), "key")(x).reshape(b, t, kv, hd)
    v = self._dense(kv * hd, self.qkv_bias, ("embed", "kv_heads"), "value")(x)
    v = v.reshape(b, t, kv, hd)
    if self.qk_norm:
      q, k = self._head_norm("query_norm")(q), self._head_norm("key_norm")(k)
    positions = jnp.asarray(positions, jnp.int32)
    if self.rope is not None:
      inv_freq = self.rope.inv_freq(hd)
      q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

    new_cache = None
    key_positions = positions
    if cache is not None:
      start = cache["end_index"][0]
      if cache["k"].shape[1] != kv:
        raise ValueError(f"cache k must be [B, {kv}, S, {hd}] (head-major, init_cache), got "
                         f"{cache['k'].shape}")
      write = lambda buf, new: jax.lax.dynamic_update_slice(
          buf, new.transpose(0, 2, 1, 3).astype(buf.dtype), (0, 0, start, 0))
      k_cache, v_cache = write(cache["k"], k), write(cache["v"], v)
      key_positions = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, start))
      new_cache = {"k": k_cache, "v": v_cache, "positions": key_positions,
                   "end_index": cache["end_index"] + t}
      # dot_product_attention takes [B, S, K, hd] and goes head-major itself: XLA folds the two
      # transposes away, so the cache is read where it lies.
      k = k_cache.astype(self.dtype).transpose(0, 2, 1, 3)
      v = v_cache.astype(self.dtype).transpose(0, 2, 1, 3)

    if self.sliding_window is not None:
      distance = positions[:, :, None] - key_positions[:, None, :]
      window = jnp.abs(distance) < self.sliding_window
      mask = window if mask is None else (jnp.asarray(mask, bool) & window)
    if mask is not None:
      mask = jnp.asarray(mask, bool)
      if mask.shape[-2:] != (t, k.shape[1]):
        raise ValueError(f"mask must be [B, {t}, {k.shape[1]}] (queries x "
                         f"{'cache slots' if cache is not None else 'keys'}), got {mask.shape}")
      mask = mask[:, None]
    out = dot_product_attention(q, k, v, mask, self.scale, self.attn_logit_softcap,
                                make_einsum(self.quant))
    y = self._dense(self.features or d, self.out_bias, ("heads", "embed"), "out")(
        out.reshape(b, t, h * hd))
    return new_cache, y


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
  quant: Optional[Quant] = None

  def _dense(self, features, axes, name):
    return Dense(features, use_bias=self.use_bias, kernel_axes=axes, dtype=self.dtype,
                 param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls,
                 quant=self.quant, name=name)

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
  quant: Optional[Quant] = None

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None,
               kv_mask: Optional[Array] = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              dot_general_cls=self.dot_general_cls, quant=self.quant)
    norm_kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(self.epsilon, name="norm1", **norm_kw)(x)
    x = x + MultiHeadAttention(self.num_heads, key_bias=self.key_bias, name="attn", **kw)(
        h, mask=mask, kv_mask=kv_mask)
    h = LayerNorm(self.epsilon, name="norm2", **norm_kw)(x)
    return x + MLP(self.mlp_dim, act=self.act, name="mlp", **kw)(h)
