"""Task `extract`: frozen encoders over every split of `config.data` into a feature cache.

Writes `{workdir}/features/{split}/` (see `features.py`); rerunning with the same workdir skips
finished shards. Metrics: examples, rejects and examples/s per split.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp

from edgeglass_jax import features, sharding
from edgeglass_jax.data import sources


def features_dir(config, workdir: str) -> str:
  return config.extract.get("output_dir") or os.path.join(workdir, "features")


def build_encoders(config):
  dtype = jnp.dtype(config.extract.get("compute_dtype", "float32"))
  return {m: features.build_encoder(m, config.encoders[m], dtype=dtype)
          for m in config.modalities}


def run(config, workdir: str, on_shard_done=None) -> dict:
  # Each process extracts its own shards, data parallel over its own devices (params
  # replicated): frozen encoders need no cross-host collectives, so hosts never wait on each
  # other until a split ends.
  mesh = sharding.make_mesh({"data": -1, "num_devices": config.mesh.get("num_devices", -1)},
                            devices=jax.local_devices())
  encoders = build_encoders(config)
  out_dir = features_dir(config, workdir)
  metrics = {}
  for split in sources.available_splits(config.data, config.data.splits):
    source = sources.make_source(config.data, split)
    t0 = time.time()
    index = features.extract_split(
        source, os.path.join(out_dir, split), encoders, mesh,
        batch_size=config.extract.batch_size, shard_size=config.extract.shard_size,
        dtype=config.extract.dtype, keep_tokens=tuple(config.extract.keep_tokens),
        captions_per_item=config.data.captions_per_item,
        max_reject_fraction=config.extract.max_reject_fraction,
        progress=config.extract.get("progress", True), on_shard_done=on_shard_done)
    seconds = time.time() - t0
    metrics[f"{split}/examples"] = len(source)
    metrics[f"{split}/rejects"] = index.get("rejects", 0)
    metrics[f"{split}/examples_per_s"] = len(source) / max(seconds, 1e-9)
    logging.info("extracted %s: %d examples in %.1fs", split, len(source), seconds)
  return {"step": 0, "metrics": metrics}
