"""Decoder-only language models: one transformer, family presets read from HF configs.

- `DecoderConfig.from_hf(config_dict)` reads a HF `config.json` of model_type `llama` (SmolLM2,
  Llama 2/3 with "llama3" RoPE scaling), `qwen2` (q/k/v biases) or `gemma3_text` (`(1 + w)`
  RMSNorm, embeddings times sqrt(width), q/k norms, `query_pre_attn_scalar`, sliding-window
  local layers with their own RoPE base next to global ones, GeGLU, norms before and after
  attention and MLP, optional final-logit soft-capping; HF's Gemma 3 stores but never applies
  `attn_logit_softcapping`, so neither does this). Each family has tied or untied
  embeddings.
- `Decoder` is the linen module: `apply(params, input_ids [B, T])` gives float32 logits
  `[B, T, V]` (causal, no cache); `decode(input_ids, cache, positions, mask)` runs the same
  stack over an explicit KV cache (`init_cache`) and returns `(logits, cache)`.
- `from_pretrained(path)` loads a local HF directory or a `.gguf` file (`weights/gguf.py` reads
  the format; undoing llama.cpp's own layout choices, which depend on the architecture, is done
  here: `gguf_to_hf_layout`).
- `make_prefix_lm_mask(input_mask, mask_ar)`: big_vision's prefix-LM mask (PaliGemma).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from edgeglass_jax import layers
from edgeglass_jax.weights import convert, hf
from edgeglass_jax.weights.convert import Rule, dense, norm
from edgeglass_jax.weights.hf import WeightsError

Array = jax.Array
Cache = Dict[str, layers.LayerCache]

FAMILIES = ("llama", "qwen2", "gemma3_text")
SLIDING, FULL = "sliding_attention", "full_attention"


def make_prefix_lm_mask(input_mask: Any, mask_ar: Any) -> Array:
  """`[B, T]`, `[B, T]` -> `[B, T, T]` boolean attention mask (big_vision `make_attn_mask`).

  Token i attends to token j when both are valid (`input_mask`) and
  `cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]`: prefix tokens (`mask_ar = 0`) see each other
  bidirectionally, suffix tokens (`mask_ar = 1`) are causal. All ones is a causal mask.
  Padding rows see nothing.
  """
  input_mask = jnp.asarray(input_mask, bool)
  cumsum = jnp.cumsum(jnp.asarray(mask_ar, jnp.int32), axis=1)
  attend = cumsum[:, None, :] <= cumsum[:, :, None]
  valid = input_mask[:, None, :] & input_mask[:, :, None]
  return attend & valid


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and numerics of one decoder-only LM; `family` is the HF `model_type`.

  `layer_types[i]` is "full_attention" or "sliding_attention" (window `sliding_window`, RoPE
  `rope_local`); full layers use `rope`. `norm_offset=1` is Gemma's `(1 + w)` RMSNorm.
  `attn_logit_softcapping` (Gemma 2 style) is supported by the module; no family here sets it.
  """
  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  norm_offset: float = 0.0
  embed_scale: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  post_norms: bool = False
  query_pre_attn_scalar: Optional[float] = None
  attn_logit_softcapping: Optional[float] = None
  final_logit_softcapping: Optional[float] = None
  layer_types: Tuple[str, ...] = ()
  sliding_window: Optional[int] = None
  rope: layers.RoPE = layers.RoPE()
  rope_local: layers.RoPE = layers.RoPE()
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int] = None
  pad_token_id: Optional[int] = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"DecoderConfig.family must be one of {FAMILIES}, got {self.family!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"{self.num_attention_heads} attention heads are not a multiple of "
                       f"{self.num_key_value_heads} key/value heads")
    if len(self.layer_types) != self.num_hidden_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                       f"{self.num_hidden_layers} layers")
    unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
    if unknown:
      raise ValueError(f"unsupported layer types {unknown}; supported: {FULL}, {SLIDING}")
    if SLIDING in self.layer_types and not self.sliding_window:
      raise ValueError("sliding_attention layers need a sliding_window")

  @classmethod
  def from_hf(cls, hf_config: dict) -> "DecoderConfig":
    """From a HF `config.json` dict (transformers 5 `rope_parameters` or older `rope_theta`,
    `rope_scaling`, `rope_local_base_freq`)."""
    c = dict(hf_config)
    family = c.get("model_type")
    if family not in FAMILIES:
      raise ValueError(f"unknown decoder model_type={family!r}; known: {list(FAMILIES)}")
    if float(c.get("partial_rotary_factor") or 1.0) != 1.0:
      raise ValueError("partial_rotary_factor != 1 is not supported")
    if c.get("use_bidirectional_attention"):
      raise ValueError("use_bidirectional_attention is not supported (use a prefix-LM mask)")
    gemma = family == "gemma3_text"
    heads = int(c["num_attention_heads"])
    layers_n = int(c["num_hidden_layers"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    sliding_window = c.get("sliding_window")
    layer_types = c.get("layer_types")
    if not layer_types:
      if gemma:
        pattern = int(c.get("sliding_window_pattern", 6))
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers_n)]
      elif family == "qwen2" and c.get("use_sliding_window") and sliding_window:
        first = int(c.get("max_window_layers", 28))
        layer_types = [SLIDING if i >= first else FULL for i in range(layers_n)]
      else:
        layer_types = [FULL] * layers_n
    if family == "qwen2" and not c.get("use_sliding_window", False):
      sliding_window = None if SLIDING not in layer_types else sliding_window
    rope, rope_local = _rope_from_hf(c, family)
    attention_bias = bool(c.get("attention_bias", False))
    return cls(
        family=family, vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]), num_hidden_layers=layers_n,
        num_attention_heads=heads,
        num_key_value_heads=int(c.get("num_key_value_heads") or heads), head_dim=head_dim,
        hidden_act=str(c.get("hidden_activation") or c.get("hidden_act") or
                       ("gelu_pytorch_tanh" if gemma else "silu")),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), norm_offset=1.0 if gemma else 0.0,
        embed_scale=gemma, qkv_bias=True if family == "qwen2" else attention_bias,
        out_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(c.get("mlp_bias", False)), qk_norm=gemma, post_norms=gemma,
        query_pre_attn_scalar=(float(c.get("query_pre_attn_scalar", 256)) if gemma else None),
        attn_logit_softcapping=None,
        final_logit_softcapping=_opt_float(c.get("final_logit_softcapping")),
        layer_types=tuple(layer_types),
        sliding_window=int(sliding_window) if sliding_window else None,
        rope=rope, rope_local=rope_local,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
        bos_token_id=_first_id(c.get("bos_token_id")),
        eos_token_id=_first_id(c.get("eos_token_id")),
        pad_token_id=_first_id(c.get("pad_token_id")))


def _opt_float(x) -> Optional[float]:
  return None if x is None else float(x)


def _first_id(x) -> Optional[int]:
  if isinstance(x, (list, tuple)):
    return int(x[0]) if x else None
  return None if x is None else int(x)


_DEFAULT_THETA = {"llama": 10000.0, "qwen2": 10000.0, "gemma3_text": 1_000_000.0}


def _rope(params: dict, theta: float, max_positions: int) -> layers.RoPE:
  kind = params.get("rope_type", params.get("type", "default"))
  theta = float(params.get("rope_theta") or theta)
  if kind == "default":
    return layers.RoPE(theta)
  if kind == "linear":
    return layers.RoPE(theta, "linear", factor=float(params["factor"]))
  if kind == "llama3":
    return layers.RoPE(theta, "llama3", factor=float(params["factor"]),
                       low_freq_factor=float(params["low_freq_factor"]),
                       high_freq_factor=float(params["high_freq_factor"]),
                       original_max_position_embeddings=int(
                           params.get("original_max_position_embeddings") or max_positions))
  raise ValueError(f"unsupported RoPE type {kind!r}; supported: default, linear, llama3")


def _rope_from_hf(c: dict, family: str) -> Tuple[layers.RoPE, layers.RoPE]:
  """(global RoPE, sliding-layer RoPE) from either config format."""
  max_positions = int(c.get("max_position_embeddings", 2048))
  params = c.get("rope_parameters") or {}
  theta = float(c.get("rope_theta") or _DEFAULT_THETA[family])
  if FULL in params or SLIDING in params:
    full = _rope(params.get(FULL) or {}, theta, max_positions)
    local = _rope(params.get(SLIDING) or {}, float(c.get("rope_local_base_freq") or 10000.0),
                  max_positions)
    return full, local
  if not params:
    params = dict(c.get("rope_scaling") or {})
    params.setdefault("rope_theta", theta)
  full = _rope(params, theta, max_positions)
  if family == "gemma3_text":
    return full, layers.RoPE(float(c.get("rope_local_base_freq") or 10000.0))
  return full, full


class DecoderBlock(nn.Module):
  """One pre-norm block: `x + [post_norm](attn(norm(x)))`, then the same with the gated MLP.

  `(x [B, T, D], positions [B, T], cache, mask) -> (cache, x [B, T, D])`.
  """
  config: DecoderConfig
  layer: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def _norm(self, name):
    c = self.config
    return layers.RMSNorm(c.rms_norm_eps, scale_offset=c.norm_offset, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: Array, positions: Array, cache: Optional[layers.LayerCache],
               mask: Array) -> Tuple[Optional[layers.LayerCache], Array]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              dot_general_cls=self.dot_general_cls, quant=self.quant)
    local = c.layer_types[self.layer] == SLIDING
    attn = layers.Attention(
        c.num_attention_heads, c.num_key_value_heads, c.head_dim, qkv_bias=c.qkv_bias,
        out_bias=c.out_bias, rope=c.rope_local if local else c.rope,
        query_pre_attn_scalar=c.query_pre_attn_scalar,
        attn_logit_softcap=c.attn_logit_softcapping,
        sliding_window=c.sliding_window if local else None, qk_norm=c.qk_norm,
        qk_norm_offset=c.norm_offset, norm_epsilon=c.rms_norm_eps, name="attn", **kw)
    cache, h = attn(self._norm("pre_attn_norm")(x), positions, cache, mask)
    if c.post_norms:
      h = self._norm("post_attn_norm")(h)
    x = x + h
    h = layers.MLP(c.intermediate_size, act=c.hidden_act, gated=True, use_bias=c.mlp_bias,
                   name="mlp", **kw)(self._norm("pre_mlp_norm")(x))
    if c.post_norms:
      h = self._norm("post_mlp_norm")(h)
    return cache, x + h


class Decoder(nn.Module):
  """Decoder-only LM over `DecoderConfig`.

  - `apply(params, input_ids [B, T])` -> float32 logits `[B, T, V]`, causal; optional
    `positions [B, T]`, `mask [B, T, T]` (e.g. `make_prefix_lm_mask`) and `inputs_embeds
    [B, T, D]` in place of `input_ids` (already scaled: see `embed`). `logits_slice=(start,
    stop)` gives the logits of positions `start:stop` only, `[B, stop - start, V]`: a prefix-LM
    loss skips the vocabulary projection of its soft tokens.
  - `apply(params, input_ids, cache, positions=None, mask=None, method="decode")` ->
    `(logits [B, T, V], cache)`: writes the T tokens into `cache` (`init_cache`, keys/values
    head-major `[B, K, S, hd]`) at its `end_index` and attends over its S slots; `mask
    [B, T, S]` defaults to causal over the slots, `positions` to `end_index + arange(T)`.
    `last_only=True` gives the logits of the last position only, `[B, 1, V]`: a prefill that
    samples one token skips the vocabulary projection of the other T - 1 (for SmolLM2 a fifth
    of the prefill's FLOPs).
  - `apply(params, input_ids, method="embed")` -> `[B, T, D]` input embeddings.
  """
  config: DecoderConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              dot_general_cls=self.dot_general_cls, quant=self.quant)
    self.embedder = layers.Embed(c.vocab_size, c.hidden_size, **kw)
    self.layers = [DecoderBlock(c, i, **kw) for i in range(c.num_hidden_layers)]
    self.final_norm = layers.RMSNorm(c.rms_norm_eps, scale_offset=c.norm_offset,
                                     dtype=self.dtype, param_dtype=self.param_dtype)
    self.lm_head = (None if c.tie_word_embeddings else
                    layers.Dense(c.vocab_size, use_bias=False, kernel_axes=("embed", "vocab"),
                                 **kw))

  def init_cache(self, batch: int, max_len: int, dtype: layers.Dtype = jnp.float32) -> Cache:
    """Empty per-layer caches of `max_len` slots (needs no params)."""
    c = self.config
    return {f"layers_{i}": layers.init_attention_cache(batch, max_len, c.num_key_value_heads,
                                                       c.head_dim, dtype)
            for i in range(c.num_hidden_layers)}

  def embed(self, input_ids: Array) -> Array:
    """`[B, T]` token ids -> `[B, T, D]` (times sqrt(D), in the compute dtype, for Gemma)."""
    x = self.embedder(input_ids)
    if self.config.embed_scale:
      x = x * jnp.asarray(np.float32(np.sqrt(self.config.hidden_size)), self.dtype)
    return x

  def _logits(self, x: Array) -> Array:
    x = self.final_norm(x)
    logits = self.embedder.attend(x) if self.lm_head is None else self.lm_head(x)
    logits = logits.astype(jnp.float32)
    cap = self.config.final_logit_softcapping
    return logits if cap is None else jnp.tanh(logits / cap) * cap

  def _inputs(self, input_ids, inputs_embeds):
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    return self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)

  def __call__(self, input_ids: Optional[Array] = None, positions: Optional[Array] = None,
               mask: Optional[Array] = None, *,
               inputs_embeds: Optional[Array] = None,
               logits_slice: Optional[Tuple[int, int]] = None) -> Array:
    x = self._inputs(input_ids, inputs_embeds)
    b, t = x.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if mask is None:
      mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    for block in self.layers:
      _, x = block(x, positions, None, mask)
    if logits_slice is not None:
      start, stop = logits_slice
      if not 0 <= start <= stop <= t:
        raise ValueError(f"logits_slice {logits_slice} is not inside the {t} positions")
      x = x[:, start:stop]
    return self._logits(x)

  def decode(self, input_ids: Optional[Array], cache: Cache, positions: Optional[Array] = None,
             mask: Optional[Array] = None, *, inputs_embeds: Optional[Array] = None,
             last_only: bool = False) -> Tuple[Array, Cache]:
    x = self._inputs(input_ids, inputs_embeds)
    b, t = x.shape[:2]
    first = cache["layers_0"]
    start, slots = first["end_index"], first["k"].shape[2]
    if positions is None:
      positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if mask is None:
      query_slot = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
      mask = jnp.arange(slots)[None, None, :] <= query_slot[:, :, None]
    new_cache = {}
    for i, block in enumerate(self.layers):
      name = f"layers_{i}"
      new_cache[name], x = block(x, positions, cache[name], mask)
    return self._logits(x[:, -1:] if last_only else x), new_cache


def hf_rules(config: DecoderConfig) -> list:
  """HF `*ForCausalLM` tensor names -> `Decoder` param paths for the config's family."""
  c = config
  gemma = c.family == "gemma3_text"
  rules = [Rule("model.embed_tokens.weight", ("embedder", "embedding"))]
  for i in range(c.num_hidden_layers):
    hf_l, fl = f"model.layers.{i}.", f"layers_{i}"
    rules += norm(hf_l + "input_layernorm", (fl, "pre_attn_norm"), bias=False)
    for proj, name, bias in (("q_proj", "query", c.qkv_bias), ("k_proj", "key", c.qkv_bias),
                             ("v_proj", "value", c.qkv_bias), ("o_proj", "out", c.out_bias)):
      rules += dense(hf_l + "self_attn." + proj, (fl, "attn", name), bias=bias)
    if c.qk_norm:
      rules += norm(hf_l + "self_attn.q_norm", (fl, "attn", "query_norm"), bias=False)
      rules += norm(hf_l + "self_attn.k_norm", (fl, "attn", "key_norm"), bias=False)
    if gemma:
      rules += norm(hf_l + "post_attention_layernorm", (fl, "post_attn_norm"), bias=False)
      rules += norm(hf_l + "pre_feedforward_layernorm", (fl, "pre_mlp_norm"), bias=False)
      rules += norm(hf_l + "post_feedforward_layernorm", (fl, "post_mlp_norm"), bias=False)
    else:
      rules += norm(hf_l + "post_attention_layernorm", (fl, "pre_mlp_norm"), bias=False)
    for proj, name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
      rules += dense(hf_l + "mlp." + proj, (fl, "mlp", name), bias=c.mlp_bias)
  rules += norm("model.norm", ("final_norm",), bias=False)
  if not c.tie_word_embeddings:
    rules += dense("lm_head", ("lm_head",), bias=False)
  return rules


def unpermute_llama_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row order for rotate-half RoPE, per head of `hd` rows:
  HF row `i` <- GGUF row `2i`, HF row `hd/2 + i` <- GGUF row `2i + 1`. `w` is `[H*hd, ...]`."""
  hd = w.shape[0] // num_heads
  return w.reshape(num_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_layout(config: DecoderConfig, tensors: Dict[str, np.ndarray]
                      ) -> Dict[str, np.ndarray]:
  """Turns HF-named tensors read from a GGUF file into HF's values.

  llama.cpp's converter changes two things per architecture: for `llama` it interleaves the
  rows of q and k per head (its RoPE rotates adjacent pairs); for Gemma it stores every RMSNorm
  weight as `1 + w`. Both are undone here.
  """
  out = dict(tensors)
  for name, arr in tensors.items():
    if config.family == "llama" and (".self_attn.q_proj." in name or
                                     ".self_attn.k_proj." in name):
      heads = (config.num_attention_heads if ".q_proj." in name
               else config.num_key_value_heads)
      out[name] = unpermute_llama_qk(arr, heads)
    elif config.family == "gemma3_text" and ("norm.weight" in name or name.endswith("_norm")):
      out[name] = arr - np.float32(1.0)
  return out


def dummy_inputs() -> Tuple[Array]:
  return (jnp.zeros((1, 1), jnp.int32),)


def build(hf_config: dict, source: str, dtype=jnp.float32, param_dtype=jnp.float32,
          dot_general_cls=None, quant=None) -> Decoder:
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise WeightsError(f"{source}: unknown decoder architecture model_type={model_type!r}; "
                       f"known: {list(FAMILIES)}")
  try:
    config = DecoderConfig.from_hf(hf_config)
  except (ValueError, TypeError, KeyError) as e:
    raise WeightsError(f"{source}: {model_type} config: {e}") from e
  return Decoder(config, dtype=dtype, param_dtype=param_dtype, dot_general_cls=dot_general_cls,
                 quant=quant)


def from_pretrained(path: str, dtype=jnp.float32, param_dtype=jnp.float32,
                    dot_general_cls=None, quant=None) -> Tuple[Decoder, Dict[str, Any]]:
  """Loads a local HF directory (`model_type` llama, qwen2, gemma3_text) or a `.gguf` file into
  `(module, {"params": ...})`; `module.apply(params, input_ids)` gives HF's logits."""
  is_gguf = os.path.isfile(path) and path.lower().endswith(".gguf")
  if is_gguf:
    from edgeglass_jax.weights import gguf
    tensors, hf_config = gguf.read_gguf(path)
  else:
    hf_config = hf.read_hf_config(path)
  module = build(hf_config, path, dtype, param_dtype, dot_general_cls, quant)
  if is_gguf:
    tensors = gguf_to_hf_layout(module.config, tensors)
  else:
    tensors = hf.read_hf_dir(path)
  expected = jax.eval_shape(module.init, jax.random.key(0), *dummy_inputs())["params"]
  params = convert.hf_to_flax(tensors, hf_rules(module.config), expected, source=path)
  params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params)
  return module, {"params": params}
