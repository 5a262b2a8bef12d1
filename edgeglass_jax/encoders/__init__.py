"""Frozen pretrained encoders as pure linen modules: ViT (CLIP/SigLIP), text (BERT/MiniLM, CLIP,
SigLIP) and the Whisper encoder, loaded from local HF checkpoints with `from_pretrained`."""
from edgeglass_jax.encoders.registry import (FAMILIES, EncoderOutput, Family, from_pretrained,
                                             register, to_hf)

__all__ = ["FAMILIES", "EncoderOutput", "Family", "from_pretrained", "register", "to_hf"]
