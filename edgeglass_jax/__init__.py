"""edgeglass_jax: frozen unimodal encoders aligned into one budget-aware embedding space.

`MODALITIES` is the one list of modalities every module (configs, data, losses, eval) uses, in
the order of result tables and loss pairs.
"""

MODALITIES = ("image", "audio", "text")
