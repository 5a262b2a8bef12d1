"""Building blocks of the experiment configs in `configs/` (ml_collections).

Every field a config may set exists here with its default, so `--config.KEY=VALUE` overrides are
checked against a complete, locked tree and a typo fails with the key's name.
"""
from __future__ import annotations

import ml_collections as mlc

MODALITIES = ("image", "audio", "text")


def synthetic_data(num_train=1024, num_val=256, num_test=256, image_size=64,
                   audio_seconds=1.0, audio_mode="sound", captions_per_item=2, seed=0):
  return mlc.ConfigDict(dict(
      source="synthetic", splits=("train", "val", "test"), captions_per_item=captions_per_item,
      synthetic=dict(seed=seed, num_train=num_train, num_val=num_val, num_test=num_test,
                     image_size=image_size, audio_seconds=audio_seconds, audio_mode=audio_mode,
                     heldout_fraction=0.15),
      manifest=dict(train="", val="", test="")))


def encoder_spec(**overrides):
  """Where a frozen encoder comes from: `path` (HF dir), `package` or `random` (family+config)."""
  spec = mlc.ConfigDict(dict(
      path="", package="", tower="", tokenizer="", random=False, family="", seed=0,
      hf_config=mlc.ConfigDict(type_safe=False), max_len=64, max_seconds=30.0))
  for k, v in overrides.items():
    spec[k] = mlc.ConfigDict(v, type_safe=False) if isinstance(v, dict) else v
  return spec


def demo_encoders(image_size=64, audio_seconds=1.0):
  """Encoders usable offline: real MiniLM and Whisper tiny.en from packages, and a seeded
  random ViT (no CLIP/SigLIP weights ship offline; point `image.path` at one to use it)."""
  return mlc.ConfigDict(dict(
      image=encoder_spec(random=True, family="clip_vision_model", seed=0, hf_config=dict(
          image_size=image_size, patch_size=8, hidden_size=128, intermediate_size=256,
          num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")),
      audio=encoder_spec(package="whisper-tiny.en", max_seconds=audio_seconds),
      text=encoder_spec(package="all-MiniLM-L6-v2", max_len=32)))


def extract(batch_size=64, shard_size=256, dtype="float16"):
  return mlc.ConfigDict(dict(
      batch_size=batch_size, shard_size=shard_size, dtype=dtype, compute_dtype="float32",
      keep_tokens=("image", "audio"), max_reject_fraction=0.01, progress=True, output_dir=""))


def mesh(data=-1, fsdp=1, tensor=1):
  return mlc.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def base(task: str):
  config = mlc.ConfigDict()
  config.task = task
  config.seed = 0
  config.modalities = MODALITIES
  config.jax_platforms = ""
  config.distributed = False
  config.mesh = mesh()
  return config
