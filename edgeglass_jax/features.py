"""The feature-extraction job: frozen encoders run once over a source; features land on disk.

Layout of a cache (`DIR/{split}/`):
  shard-00000.safetensors   "{m}/pooled" [n, D] ("text/pooled" is [n, C, D] for C captions),
                            "{m}/tokens" [n, N, D] and "{m}/token_mask" [n, N] when kept,
                            "{m}/valid" [n] (text: [n, C]), "group" [n]
  shard-00000.json          ids, count, first index, rejects of the shard (written last: a shard
                            is finished iff its .json exists, so a killed job resumes there)
  rejects.jsonl             one line per modality of an example that could not be decoded
  index.json                written when the split ends: shards, dims, encoders, counts

Extraction is data parallel: params replicated, each batch split over the mesh's data axes;
shards go round-robin to processes, so hosts of a pod never wait on each other.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from edgeglass_jax import sharding
from edgeglass_jax.data import sources
from edgeglass_jax.encoders.packages import cache_dir, package_dir  # noqa: F401

SHARD = "shard-{:05d}"


class RejectsExceeded(RuntimeError):
  """More examples failed to decode than `max_reject_fraction` allows."""


@dataclasses.dataclass
class Encoder:
  """A frozen encoder ready for extraction.

  `prepare(values) -> tuple of numpy model inputs` for a list of decoded values of this modality
  (texts: one caption each); `apply(params, *inputs) -> EncoderOutput`; `token_mask(inputs)`
  gives the validity of output tokens `[B, N]`.
  """
  modality: str
  module: Any
  params: Any
  prepare: Callable[[List[Any]], tuple]
  token_mask: Callable[[tuple], np.ndarray]
  info: Dict[str, Any]


# ----------------------------------------------------------------------------- encoders


def _encoder_dir(spec) -> str:
  """Local HF directory for an encoder spec: `path`, or a packaged model named in `package`
  (`encoders.package_dir`)."""
  if spec.get("package"):
    return package_dir(spec["package"])
  if not spec.get("path"):
    raise ValueError("an encoder spec needs `path` (HF directory), `package` or `random`")
  return spec["path"]


def _random_encoder(spec, dtype):
  """A frozen encoder with seeded random weights, from a family and an HF-style config dict."""
  from edgeglass_jax.encoders import registry
  registry._load_family_modules()
  family = registry.FAMILIES[spec["family"]]
  module = family.build(dict(spec["hf_config"]), dtype=dtype, param_dtype=jnp.float32,
                        dot_general_cls=None)
  params = module.init(jax.random.key(int(spec.get("seed", 0))), *family.dummy_inputs(module))
  return module, jax.tree.map(np.asarray, {"params": _unbox(params)["params"]})


def _unbox(tree):
  from flax.core import meta
  return meta.unbox(tree)


def encoder_info(spec) -> Dict[str, Any]:
  """The scalar fields of an encoder spec: what a feature cache records of each encoder."""
  return {k: v for k, v in dict(spec).items() if isinstance(v, (str, int, float, bool))}


def check_cache_encoders(split_dir: str, encoder_specs, modalities: Sequence[str]):
  """Raises ValueError naming the first field where the encoders that wrote the cache in
  `split_dir` differ from `encoder_specs` (a config's `encoders`), for `modalities`: features of
  another encoder or layer would train a model that then sees different ones at inference.
  Fields a cache predates count as their `configs.encoder_spec` default."""
  from edgeglass_jax import configs
  with open(os.path.join(split_dir, "index.json")) as f:
    recorded = json.load(f).get("encoders", {})
  defaults = encoder_info(configs.encoder_spec())
  for m in modalities:
    if m not in recorded:
      raise ValueError(f"{split_dir}: the feature cache holds no {m!r} features (it has "
                       f"{sorted(recorded)})")
    cached, wanted = {**defaults, **recorded[m]}, {**defaults, **encoder_info(encoder_specs[m])}
    for key in sorted(set(cached) | set(wanted)):
      if cached.get(key) != wanted.get(key):
        raise ValueError(
            f"{split_dir}: the feature cache was extracted with encoders.{m}.{key}="
            f"{cached.get(key)!r} but the config asks for {wanted.get(key)!r}; extract a cache "
            f"with this config (task 'extract') or point features_dir at a matching one")


def build_encoder(modality: str, spec, dtype=jnp.float32) -> Encoder:
  """Builds the frozen encoder and its input preparation from `config.encoders.{modality}`."""
  from edgeglass_jax.data import preprocess
  from edgeglass_jax.encoders import from_pretrained
  spec = dict(spec)
  if spec.get("random"):
    module, params = _random_encoder(spec, dtype)
    path = None
  else:
    path = _encoder_dir(spec)
    module, params = from_pretrained(path, tower=spec.get("tower") or None, dtype=dtype)
  layer = int(spec.get("feature_layer", -1))
  if layer != -1:
    if not hasattr(module, "feature_layer"):
      raise ValueError(f"config.encoders.{modality}.feature_layer={layer}: only the Whisper "
                       f"encoder picks a hidden layer; {type(module).__name__} gives its last")
    from edgeglass_jax.encoders import whisper
    try:
      whisper.feature_depth(layer, module.config.num_layers)
    except ValueError as e:
      raise ValueError(f"config.encoders.{modality}.{e}") from None
    module = module.clone(feature_layer=layer)
  info = encoder_info(spec)
  if modality == "image":
    processor = preprocess.image_processor_config(module.config.family, path,
                                                  module.config.image_size)
    if spec.get("image_size"):
      processor = preprocess.sized_settings(processor, int(spec["image_size"]))
    return Encoder(modality, module, params,
                   prepare=lambda images: (preprocess.preprocess_images(images, processor),),
                   token_mask=lambda inputs: None, info=info)
  if modality == "audio":
    from edgeglass_jax.encoders import whisper
    n_samples = int(float(spec.get("max_seconds", 30.0)) * whisper.SAMPLE_RATE)
    n_mels = module.config.n_mels
    return Encoder(modality, module, params,
                   prepare=lambda waves: whisper.log_mel_from_waveforms(waves, n_mels, n_samples),
                   token_mask=lambda inputs: np.asarray(whisper.token_mask(inputs[1])),
                   info=info)
  if modality == "text":
    tokenizer = preprocess.load_tokenizer(spec.get("tokenizer") or path)
    max_len = int(spec.get("max_len", 64))
    return Encoder(modality, module, params,
                   prepare=lambda texts: preprocess.tokenize(tokenizer, texts, max_len),
                   token_mask=lambda inputs: inputs[1], info=info)
  raise ValueError(f"unknown modality {modality!r}")


# ----------------------------------------------------------------------------- running


def _sharded_apply(encoder: Encoder, mesh):
  """One jitted apply: params replicated, inputs and outputs split along the batch."""
  params = jax.device_put(encoder.params, sharding.replicated(mesh))
  batch = sharding.batch_sharding(mesh)
  fn = jax.jit(lambda p, *x: encoder.module.apply(p, *x), out_shardings=batch)
  return lambda *inputs: fn(params, *sharding.shard_batch(inputs, mesh))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


_PLACEHOLDER = {"image": np.zeros((8, 8, 3), np.uint8), "audio": np.zeros((1600,), np.float32),
                "text": "placeholder"}


class Runner:
  """Runs one modality's encoder on lists of decoded values in fixed-size padded batches."""

  def __init__(self, encoder: Encoder, mesh, batch_size: int, keep_tokens: bool, dtype):
    step = sharding.batch_parallelism(mesh)
    self.batch_size = -(-batch_size // step) * step
    self.encoder, self.keep_tokens, self.dtype = encoder, keep_tokens, dtype
    self.apply = _sharded_apply(encoder, mesh)
    self._row_shapes = None

  def row_shapes(self):
    """`(key, per-row shape, dtype)` of the outputs, for a shard where no row has the modality."""
    if self._row_shapes is None:
      out = self([_PLACEHOLDER[self.encoder.modality]])
      self._row_shapes = [(k, v.shape[1:], v.dtype) for k, v in out.items()]
    return self._row_shapes

  def __call__(self, values: List[Any]) -> Dict[str, np.ndarray]:
    out: Dict[str, List[np.ndarray]] = {"pooled": [], "tokens": [], "token_mask": []}
    for start in range(0, len(values), self.batch_size):
      chunk = values[start:start + self.batch_size]
      inputs = tuple(_pad_rows(np.asarray(x), self.batch_size)
                     for x in self.encoder.prepare(chunk))
      result = self.apply(*inputs)
      n = len(chunk)
      out["pooled"].append(np.asarray(result.pooled[:n], np.float32))
      if self.keep_tokens:
        out["tokens"].append(np.asarray(result.tokens[:n], np.float32))
        mask = self.encoder.token_mask(inputs)
        mask = np.ones(result.tokens.shape[:2], bool) if mask is None else mask
        out["token_mask"].append(np.asarray(mask[:n], bool))
    return {k: np.concatenate(v).astype(self.dtype if k != "token_mask" else bool)
            for k, v in out.items() if v}


def _check_finite(name: str, arr: np.ndarray, ids: Sequence[str]):
  bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(-1)
  if bad.any():
    raise FloatingPointError(f"{name}: non-finite features for examples "
                             f"{[ids[i] for i in np.flatnonzero(bad)[:5]]}")


def _extract_shard(records, runners, captions_per_item: int, dtype, rejects: List[dict]):
  """Features of one shard's records; undecodable modalities become rejects, valid=False."""
  n = len(records)
  ids = [r["id"] for r in records]
  tensors = {"group": np.array([r.get("group", -1) for r in records], np.int32)}
  for modality, runner in runners.items():
    values, rows = [], []
    for i, rec in enumerate(records):
      if not sources.present(rec, modality):
        continue
      try:
        value = sources.decode(rec, modality)
      except sources.DecodeError as e:
        rejects.append({"id": rec["id"], "modality": modality, "error": str(e)})
        continue
      if modality == "text":
        value = value[:captions_per_item]
        values.extend(value)
        rows.extend((i, c) for c in range(len(value)))
      else:
        values.append(value)
        rows.append(i)
    feats = runner(values) if values else {}
    if modality == "text":
      lead, valid = (n, captions_per_item), np.zeros((n, captions_per_item), bool)
      index = tuple(np.array(rows, np.int64).reshape(-1, 2).T) if rows else ([], [])
    else:
      lead, valid = (n,), np.zeros((n,), bool)
      index = (np.array(rows, np.int64),)
    valid[index] = True
    tensors[f"{modality}/valid"] = valid
    for key, arr in feats.items():
      _check_finite(f"{modality}/{key}", arr, [ids[r if isinstance(r, int) else r[0]]
                                               for r in rows])
      full = np.zeros(lead + arr.shape[1:], arr.dtype)
      full[index] = arr
      tensors[f"{modality}/{key}"] = full
    if not feats:
      for key, shape, kdtype in runner.row_shapes():
        tensors[f"{modality}/{key}"] = np.zeros(lead + shape, kdtype)
  return ids, tensors


def _write_shard(split_dir: str, shard: int, start: int, ids, tensors, rejects):
  base = os.path.join(split_dir, SHARD.format(shard))
  save_file(tensors, base + ".safetensors.tmp")
  os.replace(base + ".safetensors.tmp", base + ".safetensors")
  with open(base + ".json.tmp", "w") as f:
    json.dump({"ids": ids, "count": len(ids), "start": start, "rejects": rejects}, f)
  os.replace(base + ".json.tmp", base + ".json")


def shard_done(split_dir: str, shard: int) -> bool:
  base = os.path.join(split_dir, SHARD.format(shard))
  return os.path.isfile(base + ".json") and os.path.isfile(base + ".safetensors")


def extract_split(source, split_dir: str, encoders: Dict[str, Encoder], mesh, *,
                  batch_size: int = 64, shard_size: int = 512, dtype: str = "float32",
                  keep_tokens: Sequence[str] = ("image", "audio"), captions_per_item: int = 1,
                  max_reject_fraction: float = 0.01, progress: bool = True,
                  on_shard_done: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
  """Extracts every example of `source` into `split_dir`; finished shards are skipped.

  Returns the split's index (also written to `index.json`). Raises `RejectsExceeded` when
  more than `max_reject_fraction` of the example-modalities fail to decode; the shards written
  so far and `rejects.jsonl` stay on disk.
  """
  from tqdm.auto import tqdm
  os.makedirs(split_dir, exist_ok=True)
  np_dtype = np.dtype(dtype)
  runners = {m: Runner(e, mesh, batch_size, m in keep_tokens, np_dtype)
             for m, e in encoders.items()}
  num_shards = -(-len(source) // shard_size)
  mine = [s for s in range(num_shards) if s % jax.process_count() == jax.process_index()]
  todo = [s for s in mine if not shard_done(split_dir, s)]
  skipped = len(mine) - len(todo)
  if skipped:
    logging.info("%s: %d of %d shards already done, resuming", split_dir, skipped, len(mine))
  bar = tqdm(total=sum(min(shard_size, len(source) - s * shard_size) for s in todo),
             desc=os.path.basename(split_dir), unit="ex", disable=not progress,
             dynamic_ncols=True)
  t0 = time.time()
  for shard in todo:
    start = shard * shard_size
    records = [source[i] for i in range(start, min(start + shard_size, len(source)))]
    rejects: List[dict] = []
    ids, tensors = _extract_shard(records, runners, captions_per_item, np_dtype, rejects)
    _write_shard(split_dir, shard, start, ids, tensors, rejects)
    if rejects:
      with open(os.path.join(split_dir, "rejects.jsonl"), "a") as f:
        for r in rejects:
          f.write(json.dumps(r) + "\n")
          logging.warning("reject %s (%s): %s", r["id"], r["modality"], r["error"])
    bar.update(len(records))
    bar.set_postfix(ex_per_s=f"{bar.n / max(time.time() - t0, 1e-9):.1f}")
    if on_shard_done is not None:
      on_shard_done(shard)
  bar.close()
  _barrier(f"extract shards {split_dir}")
  return _finish_split(split_dir, source, num_shards, encoders, dtype, max_reject_fraction)


def _barrier(name: str):
  """Waits for every process (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _finish_split(split_dir, source, num_shards, encoders, dtype, max_reject_fraction):
  """Writes `index.json` once every process's shards are on disk (process 0 writes it)."""
  metas = []
  for s in range(num_shards):
    if not shard_done(split_dir, s):
      raise FileNotFoundError(
          f"{split_dir}: shard {s} is missing after every process finished its shards; a "
          f"process may have crashed or the directory is not shared. Rerun to resume.")
    with open(os.path.join(split_dir, SHARD.format(s) + ".json")) as f:
      metas.append(json.load(f))
  rejects = sum(len(m["rejects"]) for m in metas)
  attempted = len(source) * len(encoders)
  index = {"num_examples": len(source), "num_shards": num_shards, "dtype": dtype,
           "rejects": rejects, "modalities": sorted(encoders),
           "encoders": {m: e.info for m, e in encoders.items()},
           "shards": [{"file": SHARD.format(s) + ".safetensors", "start": m["start"],
                       "count": m["count"]} for s, m in enumerate(metas)]}
  if jax.process_index() == 0:
    path = os.path.join(split_dir, "index.json")
    with open(path + ".tmp", "w") as f:
      json.dump(index, f, indent=1)
    os.replace(path + ".tmp", path)
  _barrier(f"extract index {split_dir}")
  if attempted and rejects / attempted > max_reject_fraction:
    raise RejectsExceeded(
        f"{split_dir}: {rejects} of {attempted} example-modalities could not be decoded "
        f"(limit {max_reject_fraction:.1%}); see {os.path.join(split_dir, 'rejects.jsonl')}")
  return index


# ----------------------------------------------------------------------------- reading


def load_split(split_dir: str, keys: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """All shards of a finished split concatenated: `{"ids": [...], key: array, ...}`."""
  index_path = os.path.join(split_dir, "index.json")
  if not os.path.isfile(index_path):
    raise FileNotFoundError(f"{split_dir}: no index.json; extraction of this split has not "
                            "finished (rerun the extract task with the same workdir)")
  with open(index_path) as f:
    index = json.load(f)
  parts: Dict[str, List[np.ndarray]] = {}
  ids: List[str] = []
  for shard in index["shards"]:
    path = os.path.join(split_dir, shard["file"])
    try:
      tensors = load_file(path)
    except Exception as e:
      raise IOError(f"feature shard {path} is unreadable ({e}); delete it and its .json and "
                    "rerun extraction to rebuild it") from e
    with open(path.replace(".safetensors", ".json")) as f:
      ids.extend(json.load(f)["ids"])
    for k, v in tensors.items():
      if keys is None or k in keys:
        parts.setdefault(k, []).append(v)
  out: Dict[str, Any] = {k: np.concatenate(v) for k, v in parts.items()}
  out["ids"] = ids
  out["index"] = index
  return out
