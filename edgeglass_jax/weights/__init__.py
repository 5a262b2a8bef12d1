"""Weight formats -> HF-named numpy dicts (readers) and HF names <-> Flax params (convert)."""
from edgeglass_jax.weights.convert import Rule, dense, flax_to_hf, hf_to_flax, norm
from edgeglass_jax.weights.hf import read_hf_config, read_hf_dir, WeightsError

__all__ = ["Rule", "dense", "norm", "flax_to_hf", "hf_to_flax", "read_hf_config", "read_hf_dir", "WeightsError"]
