"""Ablations of the quickstart (same data, encoders and steps; one change each).

  python -m edgeglass_jax.main --config=configs/ablations.py:NAME --workdir=runs/abl_NAME \
      --config.features_dir=runs/quickstart/features     # reuse the quickstart's cache

NAME: pairwise (no cycle loss) | cycle (pairwise + cycle, = quickstart) | hub (image-hub pairs
only, ImageBind style) | softmax (InfoNCE instead of sigmoid) | widths (one full width, no
Matryoshka sum) | separate_heads (one projection per width, MRL without weight tying; the
default ties them, MRL-E, so every width is a prefix of one embedding) | perceiver32 / perceiver64 / perceiver128 (Perceiver resampler over image and
audio tokens with K latents) | mean (masked mean of tokens + MLP).
"""
import importlib.util
import os


def _quickstart():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
  spec = importlib.util.spec_from_file_location("quickstart_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(name: str = "pairwise"):
  config = _quickstart()
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
  elif name.startswith("perceiver"):
    latents = int(name[len("perceiver"):])
    for m in ("image", "audio"):
      config.model.adapters[m].kind = "perceiver"
      config.model.adapters[m].num_latents = latents
  elif name == "mean":
    for m in ("image", "audio"):
      config.model.adapters[m].kind = "mean"
  else:
    raise ValueError(f"unknown ablation {name!r}; see configs/ablations.py")
  return config
