"""Ablations of the quickstart (same data, encoders and steps; one change each).

  python -m edgeglass_jax.main --config=configs/ablations.py:NAME --workdir=runs/abl_NAME \
      --config.features_dir=runs/quickstart/features     # reuse the quickstart's cache

NAME:
  losses:   pairwise (no cycle loss) | cycle (pairwise + cycle, = quickstart) | hub (image-hub
            pairs only, ImageBind style) | softmax (InfoNCE instead of sigmoid)
  widths:   widths (one full width, no Matryoshka sum) | separate_heads (one projection per
            width; the default ties them, MRL-E, so every width is a prefix of one embedding)
  image adapter (audio keeps the pooled Whisper feature, the masked mean of its tokens; text
  its pooled sentence embedding):
            pooled (DINOv2's pooled class token + MLP) | mean (masked mean of the tokens + MLP) |
            compress (TokenCompressor 2x2 -> MLP per token -> masked mean) |
            perceiver32 / perceiver64 / perceiver128 (Perceiver resampler with K latents)
  baseline: random_vit (a seeded random ViT instead of DINOv2; extracts its own features, so
            give it no features_dir)

Append `@SIZE` to run at another DINOv2 input size, e.g. `perceiver32@112` (65 image tokens
instead of 257: the Perceiver over 257 tokens is slow on 2 cores); such a run needs features
extracted at that size (its own workdir, or a features_dir extracted at SIZE).
"""
import importlib.util
import os

from edgeglass_jax import configs

ADAPTER_KINDS = {"pooled": "mlp", "mean": "mean", "compress": "compress"}


def _quickstart():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
  spec = importlib.util.spec_from_file_location("quickstart_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg: str = "pairwise"):
  name, _, size = arg.partition("@")
  config = _quickstart()
  if size:
    config.encoders.image.image_size = int(size)
  if name == "pairwise":
    config.loss.cycle_weight = 0.0
  elif name == "cycle":
    config.loss.cycle_weight = max(config.loss.cycle_weight, 0.1)
  elif name == "hub":
    config.loss.pairs = "hub"
    config.loss.hub = "image"
  elif name == "softmax":
    config.loss.kind = "softmax"
  elif name == "separate_heads":
    config.model.mrl_e = False
  elif name == "widths":
    config.model.widths = (config.model.widths[0],)
  elif name in ADAPTER_KINDS:
    config.model.adapters.image.kind = ADAPTER_KINDS[name]
    config.model.adapters.image.factor = 2
  elif name.startswith("perceiver") and name[len("perceiver"):].isdigit():
    config.model.adapters.image.kind = "perceiver"
    config.model.adapters.image.num_latents = int(name[len("perceiver"):])
  elif name == "random_vit":
    config.encoders.image = configs.random_vit_encoder(config.data.synthetic.image_size)
  else:
    raise ValueError(f"unknown ablation {name!r}; see configs/ablations.py")
  return config
