"""Train and eval batches from a feature cache (`features.py`), with grain.

`FeatureSource` is a random-access view of one cached split. `make_train_loader` turns it into a
checkpointable grain iterator: each epoch is a fresh global permutation of the split (grain's
index shuffle, seeded by `seed + epoch`), cut into global batches of `batch_size` rows (the last,
incomplete one is dropped); process `p` of `P` takes rows `[p * b, (p + 1) * b)` of every global
batch (`b = batch_size // P`), so the global batch of a step is the same whatever the number of
processes. A loader's state is one integer (the next step), so `get_state`/`set_state` and the
orbax handler (`iterator_save_args`/`iterator_restore_args`) resume with the exact same batches.

Text is cached as `C` captions per item (`text/pooled [n, C, D]`, `text/valid [n, C]`); training
sees one valid caption per item, picked by a hash of `(seed, epoch, index)`, so every epoch draws
anew and a resumed run draws the same. Eval (`make_eval_batches`) visits every item once in order,
zero-pads the last batch and marks real rows in `mask`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import grain
import numpy as np

from edgeglass_jax import features
from edgeglass_jax.weights import hf

FIELDS = ("pooled", "tokens", "token_mask")


def _unreadable_shard(error: Exception) -> IOError:
  return IOError(f"feature shard {error}; delete it and its .json and rerun extraction to "
                 "rebuild it")


def _mmap_safetensors(path: str, keys: Sequence[str]) -> Dict[str, np.ndarray]:
  """Read-only numpy views of `keys` in a feature shard, backed by one memory map."""
  try:
    return hf.memmap_safetensors(path, keys)
  except hf.WeightsError as e:
    raise _unreadable_shard(e) from e


def _shard_keys(path: str) -> List[str]:
  try:
    header, _ = hf.safetensors_header(path)
  except hf.WeightsError as e:
    raise _unreadable_shard(e) from e
  return sorted(k for k in header if k != "__metadata__")


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 arrays: a stable, vectorised hash."""
  x = (x + np.uint64(0x9E3779B97F4A7C15))
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def caption_choice(valid: np.ndarray, seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
  """Which caption each row uses: `valid [B, C]`, `index [B]` -> `[B]` caption numbers.

  Uniform over a row's valid captions, a pure function of `(seed, epoch, index)`; rows without
  a valid caption get 0.
  """
  index = np.asarray(index, np.int64)
  seeds = np.full(index.shape, seed % 2**64, np.uint64)
  h = _mix64(_mix64(_mix64(seeds) ^ np.uint64(epoch % 2**64)) ^ index.astype(np.uint64))
  counts = valid.sum(-1)
  k = (h % np.maximum(counts, 1).astype(np.uint64)).astype(np.int64)
  return np.argmax(np.cumsum(valid, -1) > k[:, None], -1)


class FeatureSource:
  """One cached split (`DIR/{split}/`) as random-access items of numpy arrays.

  `modalities` picks among the cached ones; `keys` the per-modality fields among `pooled`,
  `tokens`, `token_mask`: one list for every modality, or `{modality: fields}` for some of them
  (default: those cached; `valid` always comes). Reading only `pooled` where a model ignores the
  tokens keeps `[B, N, D]` token batches off the host and the device. An item is
  `{"{m}/pooled" [D], "{m}/tokens" [N, D], "{m}/token_mask" [N], "{m}/valid" (), "group" (),
  "index" ()}`, text with the caption picked for `(seed, epoch, index)`. `source[i]` with
  `i >= len(source)` reads item `i % n` as drawn in epoch `i // n` (grain's repeat convention).

  `mmap=False` loads every shard into memory (`features.load_split`); `mmap=True` maps the shard
  files read-only instead (one map per shard), for caches larger than RAM. Pickling keeps only
  the arguments, so grain worker processes reopen the cache themselves (use `mmap=True` there).
  """

  def __init__(self, split_dir: str, modalities: Sequence[str],
               keys: Union[None, Sequence[str], Mapping[str, Sequence[str]]] = None,
               seed: int = 0, mmap: bool = False):
    if keys is not None:
      keys = (tuple((m, tuple(f)) for m, f in keys.items()) if isinstance(keys, Mapping)
              else tuple(keys))
    self._args = (split_dir, tuple(modalities), keys, int(seed), bool(mmap))
    self._open(*self._args)

  def _open(self, split_dir, modalities, keys, seed, mmap):
    self.split_dir, self.modalities, self.seed, self.mmap = split_dir, modalities, seed, mmap
    index_path = os.path.join(split_dir, "index.json")
    if not os.path.isfile(index_path):
      raise FileNotFoundError(f"{split_dir}: no index.json; extraction of this split has not "
                              "finished (rerun the extract task with the same workdir)")
    with open(index_path) as f:
      self.index = json.load(f)
    cached = self.index.get("modalities", [])
    missing = [m for m in modalities if m not in cached]
    if missing:
      raise KeyError(f"{split_dir}: modalities {missing} are not in the cache (it has {cached})")
    if keys is None:
      per_modality = {}
    elif keys and isinstance(keys[0], tuple):  # ((modality, fields), ...)
      per_modality = dict(keys)
    else:
      per_modality = {m: keys for m in modalities}
    for fields in per_modality.values():
      if set(fields) - set(FIELDS):
        raise ValueError(f"keys {sorted(set(fields) - set(FIELDS))} unknown; use some of {FIELDS}")
    shard_paths = [os.path.join(split_dir, s["file"]) for s in self.index["shards"]]
    if not shard_paths:
      raise ValueError(f"{split_dir}: the cache has no shards")
    present = set(_shard_keys(shard_paths[0]))
    wanted = ["group"]
    for m in modalities:
      wanted.append(f"{m}/valid")
      fields = per_modality.get(m)
      for field in (FIELDS if fields is None else fields):
        name = f"{m}/{field}"
        if name in present:
          wanted.append(name)
        elif fields is not None:
          raise KeyError(f"{shard_paths[0]}: no tensor {name!r} (cached: {sorted(present)})")
    self.keys = tuple(wanted)
    if mmap:
      self._parts = [_mmap_safetensors(p, self.keys) for p in shard_paths]
      self._starts = [int(s["start"]) for s in self.index["shards"]]
      self.ids = []
      for p in shard_paths:
        with open(p.replace(".safetensors", ".json")) as f:
          self.ids.extend(json.load(f)["ids"])
    else:
      data = features.load_split(split_dir, keys=self.keys)
      self.ids = data["ids"]
      self._parts, self._starts = [{k: data[k] for k in self.keys}], [0]
    self._n = sum(len(part["group"]) for part in self._parts)
    if self._n != self.index["num_examples"] or len(self.ids) != self._n:
      raise ValueError(f"{split_dir}: shards hold {self._n} rows and {len(self.ids)} ids, "
                       f"index.json says {self.index['num_examples']}")

  def __getstate__(self):
    return {"args": self._args}

  def __setstate__(self, state):
    self._args = state["args"]
    self._open(*self._args)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    epoch, i = divmod(int(index), self._n)
    if epoch < 0:
      raise IndexError(f"index {index} out of range for {self._n} items")
    return self.get(i, epoch)

  def get(self, index: int, epoch: int = 0, all_captions: bool = False) -> Dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.get_batch([index], epoch, all_captions).items()}

  def _gather(self, key: str, indices: np.ndarray) -> np.ndarray:
    if len(self._parts) == 1:
      return np.asarray(self._parts[0][key][indices])
    first = self._parts[0][key]
    out = np.empty((len(indices),) + first.shape[1:], first.dtype)
    shard = np.searchsorted(self._starts, indices, side="right") - 1
    for s in np.unique(shard):
      rows = shard == s
      out[rows] = self._parts[s][key][indices[rows] - self._starts[s]]
    return out

  def get_batch(self, indices: Sequence[int], epoch: int = 0, all_captions: bool = False,
                seed: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Rows `indices` stacked: `[B, ...]` per key; text keeps `[B, C, ...]` if `all_captions`.

    Captions are drawn with `seed` (default: the source's).
    """
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self._n):
      raise IndexError(f"{self.split_dir}: indices outside [0, {self._n})")
    out = {k: self._gather(k, indices) for k in self.keys}
    if "text" in self.modalities and not all_captions:
      valid = out["text/valid"]
      pick = caption_choice(valid, self.seed if seed is None else seed, epoch, indices)
      rows = np.arange(len(indices))
      for k in self.keys:
        if k.startswith("text/"):
          out[k] = out[k][rows, pick]
    out["group"] = out["group"].astype(np.int32)
    out["index"] = indices
    return out

  def batch_ids(self, batch: Dict[str, Any]) -> List[str]:
    """Example ids of a batch's rows (`"<pad>"` for eval padding), for error messages."""
    return [self.ids[i] if i >= 0 else "<pad>" for i in np.asarray(batch["index"]).tolist()]


class _TrainBatch:
  """Map step `t` (with its step-in-epoch) to this process's rows of global batch `t`.

  A source with `pads_to_global_batch` also gets the whole global batch's indices
  (`batch_indices`), to pad its rows to a length every process agrees on."""

  def __init__(self, source, seed: int, global_batch: int, shard_index: int, local_batch: int,
               steps_per_epoch: int):
    self.source, self.seed = source, seed
    self.global_batch, self.local_batch = global_batch, local_batch
    self.offset, self.steps_per_epoch = shard_index * local_batch, steps_per_epoch
    self.order = grain.MapDataset.range(len(source)).shuffle(seed=seed)

  def __call__(self, t: int, step: int) -> Dict[str, np.ndarray]:
    epoch = t // self.steps_per_epoch
    start = epoch * len(self.source) + step * self.global_batch
    indices = [self.order[start + self.offset + r] for r in range(self.local_batch)]
    if getattr(self.source, "pads_to_global_batch", False):
      whole = [self.order[start + r] for r in range(self.global_batch)]
      return self.source.get_batch(indices, epoch, seed=self.seed, batch_indices=whole)
    if hasattr(self.source, "get_batch"):
      return self.source.get_batch(indices, epoch, seed=self.seed)
    items = [self.source[epoch * len(self.source) + i] for i in indices]
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Global steps in one epoch (the incomplete last batch is dropped)."""
  return num_examples // batch_size


def make_train_loader(source, batch_size: int, seed: int, shard_index: int = 0,
                      shard_count: int = 1, num_epochs: Optional[int] = None,
                      worker_count: int = 0, prefetch: int = 2) -> grain.DatasetIterator:
  """A checkpointable iterator over this process's part of each global batch.

  `seed` fixes the order of every epoch and the caption drawn per item. `batch_size` is the
  global batch; each of the `shard_count` processes (`shard_index =
  jax.process_index()`) gets `batch_size // shard_count` rows per step, every array `[b, ...]`.
  `num_epochs=None` repeats forever. `worker_count > 0` builds batches in grain worker
  processes; `prefetch` batches are read ahead in a thread. A saved state restores only into a
  loader built with the same arguments (`worker_count` included: its state has another form).
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
  if batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by shard_count={shard_count} "
                     "(the number of processes)")
  steps = steps_per_epoch(len(source), batch_size)
  if steps == 0:
    raise ValueError(f"batch_size={batch_size} is larger than the {len(source)} examples of "
                     "the split; no full batch can be formed")
  batcher = _TrainBatch(source, seed % 2**32, batch_size, shard_index, batch_size // shard_count,
                        steps)
  ds = grain.MapDataset.range(steps).repeat(num_epochs).map_with_index(batcher)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0,
                                            prefetch_buffer_size=prefetch))
  if worker_count:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app: defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


class EvalBatches:
  """Every item of a source exactly once, in order, in zero-padded batches with `mask [b]`.

  With `shard_count` processes each gets rows `[p * b, (p + 1) * b)` of every global batch of
  `batch_size`; all processes see the same number of batches. Padding rows have `mask`, every
  `valid` False, `group` -1 and `index` -1. Text is the caption drawn for epoch 0, or with
  `all_captions` every caption: `[b, C, ...]` and `text/valid [b, C]`.
  """

  def __init__(self, source: FeatureSource, batch_size: int, shard_index: int = 0,
               shard_count: int = 1, all_captions: bool = False):
    if batch_size % shard_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by shard_count={shard_count}")
    self.source, self.batch_size, self.all_captions = source, batch_size, all_captions
    self.local_batch = batch_size // shard_count
    self.offset = shard_index * self.local_batch

  def __len__(self) -> int:
    return -(-len(self.source) // self.batch_size)

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    n = len(self.source)
    for step in range(len(self)):
      rows = step * self.batch_size + self.offset + np.arange(self.local_batch)
      real = rows[rows < n]
      batch = self.source.get_batch(real, 0, self.all_captions)
      pad = self.local_batch - len(real)
      if pad:
        fill = {"group": -1, "index": -1}
        batch = {k: np.concatenate([v, np.full((pad,) + v.shape[1:], fill.get(k, 0), v.dtype)])
                 for k, v in batch.items()}
      batch["mask"] = np.arange(self.local_batch) < len(real)
      yield batch


def make_eval_batches(source: FeatureSource, batch_size: int, shard_index: int = 0,
                      shard_count: int = 1, all_captions: bool = False) -> EvalBatches:
  """A re-iterable, deterministic pass over `source`; see `EvalBatches`."""
  return EvalBatches(source, batch_size, shard_index, shard_count, all_captions)


def check_batch_finite(batch: Dict[str, Any], ids: Optional[Sequence[str]] = None) -> None:
  """Raises `FloatingPointError` naming the key and rows of any NaN/Inf in a batch.

  `ids` names the rows (e.g. `FeatureSource.batch_ids(batch)`); without it rows are named by
  `batch["index"]` when present.
  """
  import jax.numpy as jnp
  for key, value in batch.items():
    arr = np.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.inexact) or arr.ndim == 0:
      continue
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(-1)
    if not bad.any():
      continue
    rows = np.flatnonzero(bad).tolist()
    if ids is not None:
      names = [ids[r] for r in rows]
    elif "index" in batch:
      names = np.asarray(batch["index"])[rows].tolist()
    else:
      names = rows
    shown = ", ".join(f"row {r} ({name})" for r, name in list(zip(rows, names))[:8])
    more = f" and {len(rows) - 8} more" if len(rows) > 8 else ""
    raise FloatingPointError(f"batch key {key!r} {list(arr.shape)} holds NaN/Inf in "
                             f"{len(rows)} row(s): {shown}{more}")


def iterator_save_args(iterator: grain.DatasetIterator):
  """`ocp.args` that save a grain iterator's state (one JSON file per process)."""
  return grain.checkpoint.CheckpointSave(iterator)


def iterator_checkpoint_handler():
  """The orbax handler of a grain iterator's state (lets a manager read step metadata)."""
  return grain.checkpoint.CheckpointHandler()


def iterator_restore_args(iterator: grain.DatasetIterator):
  """`ocp.args` that restore a saved state into `iterator` (a fresh one of the same pipeline)."""
  return grain.checkpoint.CheckpointRestore(iterator)
