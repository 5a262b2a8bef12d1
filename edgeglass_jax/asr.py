"""Speech recognition: HF's Whisper decoder as a linen module and `transcribe()`, the assistant's
"hear" step.

- `WhisperDecoder`: token + learned position embeddings, pre-LN blocks with causal
  self-attention over an explicit KV cache (`layers.Attention`) and cross-attention to the
  encoder output, final LayerNorm, logits through the tied token embedding. Its cross-attention
  keys/values are computed once per utterance (`method="prefill_cross"`) into the `cross_cache`
  collection, which travels with the params; `init_cache` / `decode` then have the LM's
  signatures, so `generate.generate` drives Whisper exactly as it drives `decoder.Decoder`.
- `from_pretrained(path)`: the decoder of a local HF Whisper directory (`model.decoder.*`).
- `load(model)`: encoder + decoder + tokenizer + prompt of a packaged model name
  (`encoders.package_dir`) or an HF directory, loaded once per process.
- `transcribe(waves, sample_rate, model)` / `transcribe_files(paths)`: any sample rate is
  resampled to 16 kHz, clips longer than one window (30 s) are cut into equal windows whose texts
  are joined, silent or empty audio gives "" without running the model; greedy decoding batched
  over windows.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from edgeglass_jax import generate as generate_lib
from edgeglass_jax import layers
from edgeglass_jax.encoders import whisper
from edgeglass_jax.weights import convert, hf
from edgeglass_jax.weights.convert import Rule, dense, norm
from edgeglass_jax.weights.hf import WeightsError

Array = jax.Array
Cache = Dict[str, layers.LayerCache]

SAMPLE_RATE = whisper.SAMPLE_RATE
SILENCE_RMS = 1e-4  # -80 dBFS: below 16-bit dither, far below any speech recording
CROSS_CACHE = "cross_cache"


# ----------------------------------------------------------------------------- decoder

@dataclasses.dataclass(frozen=True)
class WhisperDecoderConfig:
  """Shape of a Whisper decoder; defaults are HF `WhisperConfig`'s (tiny)."""
  vocab_size: int = 51865
  d_model: int = 384
  num_layers: int = 4
  num_heads: int = 6
  mlp_dim: int = 1536
  max_target_positions: int = 448
  activation: str = "gelu"
  layer_norm_eps: float = 1e-5
  family: str = "whisper_decoder"

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not a multiple of "
                       f"decoder_attention_heads={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def max_position_embeddings(self) -> int:
    """The context `generate.generate` checks prompt + new tokens against."""
    return self.max_target_positions

  @classmethod
  def from_hf(cls, cfg: dict) -> "WhisperDecoderConfig":
    """From an HF `config.json` dict (missing keys take `WhisperConfig`'s defaults)."""
    if cfg.get("scale_embedding"):
      raise ValueError("scale_embedding=True is not supported (HF's Whisper decoder ignores it)")
    d = cls()
    return cls(vocab_size=int(cfg.get("vocab_size", d.vocab_size)),
               d_model=int(cfg.get("d_model", d.d_model)),
               num_layers=int(cfg.get("decoder_layers", d.num_layers)),
               num_heads=int(cfg.get("decoder_attention_heads", d.num_heads)),
               mlp_dim=int(cfg.get("decoder_ffn_dim", d.mlp_dim)),
               max_target_positions=int(cfg.get("max_target_positions",
                                                d.max_target_positions)),
               activation=cfg.get("activation_function", d.activation))


class CrossAttention(nn.Module):
  """Attention of decoder queries `x [B, T, D]` over encoder tokens `[B, S, D]` (no mask:
  Whisper attends to the whole padded window, as it was trained).

  With `encoder_tokens` the keys/values are projected on the spot; without, they are read from
  the `cross_cache` collection (`k`, `v [B, H, S, hd]`) that `prefill` wrote. HF's layout:
  q/v/out biases, no k bias, logits scaled by `head_dim ** -0.5`.
  """
  num_heads: int
  head_dim: int
  features: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def setup(self):
    def dense_(features, bias, axes):
      return layers.Dense(features, use_bias=bias, kernel_axes=axes, dtype=self.dtype,
                          param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls,
                          quant=self.quant)
    inner = self.num_heads * self.head_dim
    self.query = dense_(inner, True, ("embed", "heads"))
    self.key = dense_(inner, False, ("embed", "kv_heads"))
    self.value = dense_(inner, True, ("embed", "kv_heads"))
    self.out = dense_(self.features, True, ("heads", "embed"))

  def kv(self, encoder_tokens: Array) -> Tuple[Array, Array]:
    """`[B, S, D]` -> keys, values `[B, H, S, hd]`, head-major so that each decoding step
    reads them without a transpose (a copy of both per layer and step otherwise)."""
    b, s = encoder_tokens.shape[:2]
    shape = (b, s, self.num_heads, self.head_dim)
    return tuple(f(encoder_tokens).reshape(shape).transpose(0, 2, 1, 3)
                 for f in (self.key, self.value))

  def prefill(self, encoder_tokens: Array) -> None:
    """Stores `kv(encoder_tokens)` in the `cross_cache` collection (apply with it mutable)."""
    k, v = self.kv(encoder_tokens)
    self.put_variable(CROSS_CACHE, "k", k)
    self.put_variable(CROSS_CACHE, "v", v)

  def __call__(self, x: Array, encoder_tokens: Optional[Array] = None) -> Array:
    if encoder_tokens is not None:
      k, v = self.kv(encoder_tokens)
    else:
      if not self.has_variable(CROSS_CACHE, "k"):
        raise ValueError(f"{'/'.join(self.scope.path)}: no encoder keys/values; pass "
                         f"encoder_tokens or a '{CROSS_CACHE}' collection from "
                         "method='prefill_cross'")
      k = self.get_variable(CROSS_CACHE, "k").astype(self.dtype)
      v = self.get_variable(CROSS_CACHE, "v").astype(self.dtype)
    b, t = x.shape[:2]
    q = self.query(x).reshape(b, t, self.num_heads, self.head_dim)
    if k.shape[0] != b:
      raise ValueError(f"{b} decoder rows for encoder keys/values of batch {k.shape[0]}")
    logits = jnp.einsum("bqhd,bhsd->bhqs", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (float(self.head_dim) ** -0.5), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqs,bhsd->bqhd", weights, v)
    return self.out(out.reshape(b, t, self.num_heads * self.head_dim))


class WhisperDecoderBlock(nn.Module):
  """HF `WhisperDecoderLayer`: x + self_attn(LN(x)); x + encoder_attn(LN(x)); x + mlp(LN(x)).

  `(x [B, T, D], positions [B, T], cache, mask, encoder_tokens=None) -> (cache, x)`; `cache`
  and `mask` as `layers.Attention`'s.
  """
  config: WhisperDecoderConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              dot_general_cls=self.dot_general_cls, quant=self.quant)
    ln = functools.partial(layers.LayerNorm, c.layer_norm_eps, dtype=self.dtype,
                           param_dtype=self.param_dtype)
    self.self_attn_layer_norm = ln()
    self.self_attn = layers.Attention(c.num_heads, c.num_heads, c.head_dim, qkv_bias=True,
                                      key_bias=False, out_bias=True, rope=None, **kw)
    self.encoder_attn_layer_norm = ln()
    self.encoder_attn = CrossAttention(c.num_heads, c.head_dim, c.d_model, **kw)
    self.final_layer_norm = ln()
    self.mlp = layers.MLP(c.mlp_dim, act=c.activation, **kw)

  def prefill_cross(self, encoder_tokens: Array) -> None:
    self.encoder_attn.prefill(encoder_tokens)

  def __call__(self, x: Array, positions: Array, cache: Optional[layers.LayerCache],
               mask: Optional[Array], encoder_tokens: Optional[Array] = None
               ) -> Tuple[Optional[layers.LayerCache], Array]:
    cache, h = self.self_attn(self.self_attn_layer_norm(x), positions, cache, mask)
    x = x + h
    x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), encoder_tokens)
    return cache, x + self.mlp(self.final_layer_norm(x))


class WhisperDecoder(nn.Module):
  """HF `WhisperDecoder` + tied `proj_out`, with an explicit self-attention KV cache.

  - `apply(params, input_ids [B, T], encoder_tokens [B, S, D])` -> float32 logits `[B, T, V]`
    (causal, no cache; optional `positions [B, T]`, default `arange(T)`).
  - `apply(params, encoder_tokens, method="prefill_cross", mutable=[CROSS_CACHE])` ->
    `(None, {CROSS_CACHE: ...})`: every layer's cross-attention keys/values `[B, H, S, hd]`,
    computed once per utterance.
  - `init_cache(batch, max_len)` (no params) and `apply({"params": ..., CROSS_CACHE: ...},
    input_ids, cache, positions=None, mask=None, method="decode", last_only=False)` ->
    `(logits, cache)`: the LM's signatures (`decoder.Decoder`), so `generate.generate` runs
    the loop.

  `suppress_tokens` get -inf logits everywhere, `begin_suppress_tokens` at the query position
  `begin_index - 1` (the logits of the first generated token), as HF's `generate` does with a
  Whisper generation config; both empty (the default) give the raw logits.
  """
  config: WhisperDecoderConfig
  suppress_tokens: Tuple[int, ...] = ()
  begin_suppress_tokens: Tuple[int, ...] = ()
  begin_index: int = 0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              dot_general_cls=self.dot_general_cls, quant=self.quant)
    self.embed_tokens = layers.Embed(c.vocab_size, c.d_model, **kw)
    self.embed_positions = self.param(
        "embed_positions", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("positions", "embed")),
        (c.max_target_positions, c.d_model), self.param_dtype)
    self.layers = [WhisperDecoderBlock(c, **kw) for _ in range(c.num_layers)]
    self.layer_norm = layers.LayerNorm(c.layer_norm_eps, dtype=self.dtype,
                                       param_dtype=self.param_dtype)

  def init_cache(self, batch: int, max_len: int, dtype: layers.Dtype = jnp.float32) -> Cache:
    """Empty self-attention caches of `max_len` slots per layer (needs no params)."""
    c = self.config
    return {f"layers_{i}": layers.init_attention_cache(batch, max_len, c.num_heads, c.head_dim,
                                                       dtype)
            for i in range(c.num_layers)}

  def prefill_cross(self, encoder_tokens: Array) -> None:
    for block in self.layers:
      block.prefill_cross(encoder_tokens)

  def _embed(self, input_ids: Array, positions: Array) -> Array:
    table = jnp.asarray(self.embed_positions, self.dtype)
    return self.embed_tokens(input_ids) + jnp.take(table, positions, axis=0)

  def _logits(self, x: Array, positions: Array) -> Array:
    logits = self.embed_tokens.attend(self.layer_norm(x)).astype(jnp.float32)
    v = logits.shape[-1]
    neg = jnp.float32(-jnp.inf)
    if self.suppress_tokens:
      always = np.zeros(v, bool)
      always[[i for i in self.suppress_tokens if 0 <= i < v]] = True
      logits = jnp.where(always, neg, logits)
    if self.begin_suppress_tokens:
      begin = np.zeros(v, bool)
      begin[[i for i in self.begin_suppress_tokens if 0 <= i < v]] = True
      at_begin = (positions == self.begin_index - 1)[..., None]
      logits = jnp.where(at_begin & begin, neg, logits)
    return logits

  def __call__(self, input_ids: Array, encoder_tokens: Array,
               positions: Optional[Array] = None) -> Array:
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self._embed(input_ids, positions)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    enc = encoder_tokens.astype(self.dtype)
    for block in self.layers:
      _, x = block(x, positions, None, mask, enc)
    return self._logits(x, positions)

  def decode(self, input_ids: Array, cache: Cache, positions: Optional[Array] = None,
             mask: Optional[Array] = None, *, last_only: bool = False) -> Tuple[Array, Cache]:
    b, t = input_ids.shape
    first = cache["layers_0"]
    start, slots = first["end_index"], first["k"].shape[2]
    if positions is None:
      positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if mask is None:
      query_slot = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
      mask = jnp.arange(slots)[None, None, :] <= query_slot[:, :, None]
    x = self._embed(input_ids, positions)
    new_cache = {}
    for i, block in enumerate(self.layers):
      name = f"layers_{i}"
      new_cache[name], x = block(x, positions, cache[name], mask)
    if last_only:
      x, positions = x[:, -1:], positions[:, -1:]
    return self._logits(x, positions), new_cache


def hf_rules(config: WhisperDecoderConfig) -> List[Rule]:
  """HF `WhisperModel` decoder names (the "model." of `WhisperForConditionalGeneration`
  stripped) -> `WhisperDecoder` param paths. `proj_out` is the tied token embedding."""
  rules = [Rule("decoder.embed_tokens.weight", ("embed_tokens", "embedding")),
           Rule("decoder.embed_positions.weight", ("embed_positions",))]
  for i in range(config.num_layers):
    hf_l, fl = f"decoder.layers.{i}", (f"layers_{i}",)
    for attn in ("self_attn", "encoder_attn"):
      rules += norm(f"{hf_l}.{attn}_layer_norm", fl + (f"{attn}_layer_norm",))
      for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
                         ("out_proj", "out")):
        rules += dense(f"{hf_l}.{attn}.{proj}", fl + (attn, name), bias=proj != "k_proj")
    rules += norm(f"{hf_l}.final_layer_norm", fl + ("final_layer_norm",))
    rules += dense(f"{hf_l}.fc1", fl + ("mlp", "fc1"))
    rules += dense(f"{hf_l}.fc2", fl + ("mlp", "fc2"))
  return rules + norm("decoder.layer_norm", ("layer_norm",))


def _decoder_tensors(tensors: Dict[str, np.ndarray], source: str) -> Dict[str, np.ndarray]:
  """Strips `WhisperForConditionalGeneration`'s "model." prefix; checks that a stored
  `proj_out.weight` is the token embedding (Whisper ties them)."""
  if "model.decoder.embed_tokens.weight" in tensors:
    tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")} | {
        k: v for k, v in tensors.items() if not k.startswith("model.")}
  proj = tensors.get("proj_out.weight")
  embed = tensors.get("decoder.embed_tokens.weight")
  if proj is not None and embed is not None and not np.array_equal(proj, embed):
    raise WeightsError(f"{source}: proj_out.weight differs from decoder.embed_tokens.weight; "
                       "only tied Whisper output projections are supported")
  return tensors


def build(hf_config: dict, source: str, dtype=jnp.float32, param_dtype=jnp.float32,
          dot_general_cls=None, quant=None, **generation) -> WhisperDecoder:
  """The decoder module for an HF Whisper `config.json` dict; `generation` sets the
  suppression fields (`suppress_tokens`, `begin_suppress_tokens`, `begin_index`)."""
  if hf_config.get("model_type") != "whisper":
    raise WeightsError(f"{source}: model_type={hf_config.get('model_type')!r} is not 'whisper'")
  try:
    config = WhisperDecoderConfig.from_hf(hf_config)
  except (ValueError, TypeError) as e:
    raise WeightsError(f"{source}: whisper decoder config: {e}") from e
  return WhisperDecoder(config, dtype=dtype, param_dtype=param_dtype,
                        dot_general_cls=dot_general_cls, quant=quant, **generation)


def from_pretrained(path: str, dtype=jnp.float32, param_dtype=jnp.float32, dot_general_cls=None,
                    quant=None, **generation) -> Tuple[WhisperDecoder, Dict[str, Any]]:
  """Loads the decoder of a local HF Whisper directory into `(module, {"params": ...})`;
  `module.apply(params, input_ids, encoder_tokens)` gives HF's logits."""
  module = build(hf.read_hf_config(path), path, dtype, param_dtype, dot_general_cls, quant,
                 **generation)
  tensors = _decoder_tensors(hf.read_hf_dir(path), path)
  d = module.config.d_model
  expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
                            jnp.zeros((1, 1, d), jnp.float32))["params"]
  params = convert.hf_to_flax(tensors, hf_rules(module.config), expected, source=path)
  params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params)
  return module, {"params": params}


def to_hf(module: WhisperDecoder, params) -> Dict[str, np.ndarray]:
  """Decoder params -> HF-named float32 numpy tensors (inverse of `from_pretrained`)."""
  return convert.flax_to_hf(params.get("params", params), hf_rules(module.config))


# ----------------------------------------------------------------------------- the model

@dataclasses.dataclass(frozen=True, eq=False)
class Whisper:
  """A loaded Whisper model: modules, params, tokenizer and the forced decoder prompt.

  `prompt` is `<|startoftranscript|>` (+ `<|en|><|transcribe|>` for a multilingual model)
  `<|notimestamps|>`; the decoder suppresses the generation config's tokens. `window` is the
  samples of one encoder input (30 s for every released Whisper).
  """
  path: str
  encoder: whisper.WhisperEncoder
  decoder: WhisperDecoder
  params: Dict[str, Any]
  tokenizer: Any
  prompt: Tuple[int, ...]
  eos_id: int

  @property
  def window(self) -> int:
    return 2 * self.encoder.config.max_source_positions * whisper.HOP_LENGTH

  @property
  def max_new_tokens(self) -> int:
    """Default decoding budget: half the context, as OpenAI's `sample_len`."""
    return self.decoder.config.max_target_positions // 2

  @functools.cached_property
  def _encode_fn(self):
    encoder, decoder, window = self.encoder, self.decoder, self.window
    n_mels = encoder.config.n_mels

    def encode(enc_params, dec_params, audio):
      mel = whisper.log_mel_spectrogram(audio, n_mels, n_samples=window)
      tokens = encoder.apply(enc_params, mel).tokens
      _, cross = decoder.apply(dec_params, tokens, method="prefill_cross", mutable=[CROSS_CACHE])
      return cross[CROSS_CACHE]

    return jax.jit(encode)

  def token_ids(self, audio: Any, max_new_tokens: Optional[int] = None) -> np.ndarray:
    """`audio [B, N]` 16 kHz windows (N <= `window`, zero-padded to it) -> greedy tokens
    int32 `[B, max_new_tokens]` after the prompt, `eos_id` after a row's end.

    Log-mel, encoder and the cross-attention keys/values run in one jitted call; the tokens come
    from `generate.generate` (prefill + `lax.while_loop`, compiled per batch and budget).
    """
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 2 or audio.shape[1] > self.window:
      raise ValueError(f"audio must be [B, N] with N <= {self.window} samples, got {audio.shape}")
    audio = np.pad(audio, ((0, 0), (0, self.window - audio.shape[1])))
    max_new = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    cross = self._encode_fn(self.params["encoder"], self.params["decoder"], audio)
    prompt = np.broadcast_to(np.asarray(self.prompt, np.int32), (audio.shape[0],
                                                                 len(self.prompt)))
    out = generate_lib.generate(self.decoder, {**self.params["decoder"], CROSS_CACHE: cross},
                                prompt, max_new, eos_id=self.eos_id)
    return np.asarray(out)

  def decode_text(self, ids: Sequence[int]) -> str:
    """Tokens up to the first `eos_id` -> text without special tokens, stripped."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _model_dir(model: str) -> str:
  from edgeglass_jax import encoders
  if model in encoders.PACKAGES:
    return encoders.package_dir(model)
  if os.path.isdir(model):
    return model
  raise ValueError(f"unknown ASR model {model!r}: neither a packaged model "
                   f"({sorted(encoders.PACKAGES)}) nor a local HF Whisper directory")


def _generation_settings(path: str, hf_config: dict, tokenizer_file: str) -> dict:
  """Start/end/no-timestamps ids, suppression lists and the multilingual flag of `path`'s
  `generation_config.json` (falling back to `config.json` and the tokenizer's tokens)."""
  gen = {}
  gen_file = os.path.join(path, "generation_config.json")
  if os.path.isfile(gen_file):
    try:
      with open(gen_file) as f:
        gen = json.load(f)
    except json.JSONDecodeError as e:
      raise WeightsError(f"{gen_file}: not valid JSON ({e})") from e
  with open(tokenizer_file, encoding="utf-8") as f:
    added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}

  def pick(key, token):
    value = gen.get(key, hf_config.get(key))
    if isinstance(value, list):
      value = value[0] if value else None
    if value is None:
      value = added.get(token)
    if value is None:
      raise WeightsError(f"{path}: no {key} in generation_config.json or config.json and no "
                         f"{token} in {tokenizer_file}")
    return int(value)

  sot = pick("decoder_start_token_id", "<|startoftranscript|>")
  eos = pick("eos_token_id", "<|endoftext|>")
  no_ts = pick("no_timestamps_token_id", "<|notimestamps|>")
  multilingual = gen.get("is_multilingual", int(hf_config.get("vocab_size", 0)) >= 51865)
  prompt = [sot]
  if multilingual:
    missing = [t for t in ("<|en|>", "<|transcribe|>") if t not in added]
    if missing:
      raise WeightsError(f"{tokenizer_file}: multilingual Whisper without tokens {missing}")
    prompt += [added["<|en|>"], added["<|transcribe|>"]]
  prompt.append(no_ts)
  return dict(prompt=tuple(prompt), eos_id=eos,
              suppress_tokens=tuple(int(i) for i in gen.get("suppress_tokens") or ()),
              begin_suppress_tokens=tuple(int(i) for i in gen.get("begin_suppress_tokens") or ()))


@functools.lru_cache(maxsize=4)
def load(model: str = "whisper-tiny.en") -> Whisper:
  """Loads (once per process) a packaged model name (`encoders.package_dir`) or a local HF
  Whisper directory (`config.json`, `model.safetensors`, `tokenizer.json`, optionally
  `generation_config.json`)."""
  import transformers
  from edgeglass_jax import encoders
  path = _model_dir(model)
  tokenizer_file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tokenizer_file):
    raise WeightsError(f"{path}: no tokenizer.json")
  hf_config = hf.read_hf_config(path)
  gen = _generation_settings(path, hf_config, tokenizer_file)
  encoder, enc_params = encoders.from_pretrained(path)
  if not isinstance(encoder, whisper.WhisperEncoder):
    raise WeightsError(f"{path}: not a Whisper checkpoint (encoder family "
                       f"{encoder.config.family!r})")
  decoder, dec_params = from_pretrained(path, suppress_tokens=gen["suppress_tokens"],
                                        begin_suppress_tokens=gen["begin_suppress_tokens"],
                                        begin_index=len(gen["prompt"]))
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
  return Whisper(path=path, encoder=encoder, decoder=decoder,
                 params={"encoder": enc_params, "decoder": dec_params}, tokenizer=tokenizer,
                 prompt=gen["prompt"], eos_id=gen["eos_id"])


# ----------------------------------------------------------------------------- transcribe

def resample(wave: np.ndarray, sample_rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
  """Polyphase (Kaiser-windowed sinc) resampling of a 1-D clip from `sample_rate` to `target`."""
  if sample_rate == target or len(wave) == 0:
    return wave
  from scipy.signal import resample_poly
  g = math.gcd(int(sample_rate), int(target))
  return resample_poly(wave, target // g, int(sample_rate) // g).astype(np.float32)


def split_windows(wave: np.ndarray, window: int) -> List[np.ndarray]:
  """Cuts a clip into `ceil(len / window)` windows of (nearly) equal length, so no window is a
  tiny tail; `[]` for an empty clip."""
  n = -(-len(wave) // window)
  if n == 0:
    return []
  cuts = [round(i * len(wave) / n) for i in range(n + 1)]
  return [wave[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def _batch_sizes(n: int, batch_size: int) -> List[int]:
  """Sizes of the fewest batches of at most `batch_size` that carry `n` windows, as equal as
  they can be (19 by 8 -> 7, 6, 6; 5 -> 5): no row is padding, each batch is one decoding loop
  (a step costs nearly as much at batch 1 as at 5: it reads the weights), and one
  call compiles at most two batch shapes."""
  count = -(-n // batch_size)
  return [n // count + (i < n % count) for i in range(count)]


def _check_wave(wave: Any, index: int) -> np.ndarray:
  arr = np.asarray(wave)
  if arr.ndim != 1:
    raise ValueError(f"waves[{index}]: expected a mono 1-D array, got shape {arr.shape}")
  if arr.dtype.kind not in "fiu":
    raise ValueError(f"waves[{index}]: expected float samples, got dtype {arr.dtype}")
  arr = arr.astype(np.float32)
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"waves[{index}]: contains NaN or infinite samples")
  return arr


def transcribe(waves: Sequence[Any], sample_rate: int = SAMPLE_RATE,
               model: str = "whisper-tiny.en", *, max_new_tokens: Optional[int] = None,
               batch_size: int = 8, silence_rms: float = SILENCE_RMS) -> List[str]:
  """Transcribes mono clips `waves` (a list of 1-D float arrays at `sample_rate` Hz) to text.

  Each clip is resampled to 16 kHz; a clip longer than the model's window (30 s) is cut into
  equal windows whose texts are joined with a space. A window whose RMS is below
  `silence_rms`, and an empty clip, give "" without running the model. Windows are decoded
  greedily (the model's forced prompt and suppressed tokens, as HF's `generate`) in the
  fewest near-equal batches of at most `batch_size` (`_batch_sizes`); `max_new_tokens` defaults to half the decoder context (224).
  """
  if isinstance(waves, np.ndarray) and waves.ndim == 1:
    raise TypeError("waves must be a list of 1-D arrays; wrap a single clip as [wave]")
  if int(sample_rate) != sample_rate or sample_rate <= 0:
    raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  clips = [resample(_check_wave(w, i), int(sample_rate)) for i, w in enumerate(waves)]
  if not any(len(c) for c in clips):
    return ["" for _ in clips]
  asr = load(model)
  windows, owners = [], []
  for i, clip in enumerate(clips):
    for piece in split_windows(clip, asr.window):
      if np.sqrt(np.mean(np.square(piece, dtype=np.float64))) >= silence_rms:
        windows.append(piece)
        owners.append(i)
  texts: List[str] = []
  start = 0
  for size in _batch_sizes(len(windows), batch_size):
    audio = np.zeros((size, asr.window), np.float32)
    for row, piece in enumerate(windows[start:start + size]):
      audio[row, :len(piece)] = piece
    texts += [asr.decode_text(row) for row in asr.token_ids(audio, max_new_tokens)]
    start += size
  joined: List[List[str]] = [[] for _ in clips]
  for owner, text in zip(owners, texts):
    if text:
      joined[owner].append(text)
  return [" ".join(parts) for parts in joined]


def transcribe_files(paths: Sequence[str], model: str = "whisper-tiny.en", **kwargs) -> List[str]:
  """`transcribe` of PCM WAV files (any rate, channels averaged); an unreadable or missing file
  raises an error that names it."""
  waves = []
  for path in paths:
    try:
      waves.append(whisper.load_audio(path))
    except OSError as e:
      raise ValueError(f"{path}: cannot read audio file ({e.strerror or e})") from e
  return transcribe(waves, SAMPLE_RATE, model, **kwargs)
