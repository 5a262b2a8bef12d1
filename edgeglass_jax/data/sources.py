"""Example sources: random-access sequences of raw records, the input of extraction.

A record is a dict `{"id": str, "image": uint8 [H, W, 3] | path | None, "audio": float32 [S] |
path | None, "captions": [str] | None, "group": int}`; `group` ids mark items that are positives
of each other in retrieval (-1 when unknown). Sources do not decode files: `decode` does, per
modality, raising `DecodeError` with the example id and file so extraction can log and skip it.
Every source has `__len__` and `__getitem__`, which is what grain's `RandomAccessDataSource` needs.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from edgeglass_jax import MODALITIES


class DecodeError(ValueError):
  """One modality of one example could not be decoded; the message names the id and file."""


class ManifestError(ValueError):
  """A manifest line is malformed; the message names the file and line."""


class ManifestSource:
  """A `.jsonl` manifest: one item per line.

  Each line: `{"id": "...", "image": "a.jpg", "audio": "a.wav", "captions": ["..", ".."],
  "group": 3}`; `text` (one caption) may stand for `captions`; any modality may be absent; paths
  are relative to the manifest's folder. Malformed lines fail at load with file and line number;
  files that are missing on disk are only reported at decode time (they become rejects, the rest
  of the item is kept) — `missing_files()` lists them upfront.
  """

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"manifest {path} does not exist")
    self.path = path
    self.root = os.path.dirname(os.path.abspath(path))
    self.records: List[Dict[str, Any]] = []
    seen = set()
    with open(path) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          raw = json.loads(line)
        except json.JSONDecodeError as e:
          raise ManifestError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
        self.records.append(self._record(raw, f"{path}:{line_no}", seen))
    if not self.records:
      raise ManifestError(f"{path}: no items")

  def _record(self, raw: Any, where: str, seen: set) -> Dict[str, Any]:
    if not isinstance(raw, dict):
      raise ManifestError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - {"id", "image", "audio", "captions", "text", "group"}
    if unknown:
      raise ManifestError(f"{where}: unknown keys {sorted(unknown)}")
    item_id = str(raw.get("id", ""))
    if not item_id:
      raise ManifestError(f"{where}: missing 'id'")
    if item_id in seen:
      raise ManifestError(f"{where}: duplicate id {item_id!r}")
    seen.add(item_id)
    captions = raw.get("captions", [raw["text"]] if "text" in raw else None)
    if captions is not None and (not isinstance(captions, list)
                                 or not all(isinstance(c, str) for c in captions)):
      raise ManifestError(f"{where}: 'captions' must be a list of strings")
    resolve = lambda p: None if p is None else os.path.join(self.root, p)
    return {"id": item_id, "image": resolve(raw.get("image")), "audio": resolve(raw.get("audio")),
            "captions": captions, "group": int(raw.get("group", -1))}

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    return self.records[index]

  def missing_files(self) -> List[str]:
    return [f"{r['id']}: {r[m]}" for r in self.records for m in ("image", "audio")
            if isinstance(r[m], str) and not os.path.isfile(r[m])]


def present(record: Dict[str, Any], modality: str) -> bool:
  key = "captions" if modality == "text" else modality
  value = record.get(key)
  return value is not None and not (isinstance(value, list) and not value)


def _decode_image(value: Any, item_id: str) -> np.ndarray:
  if isinstance(value, np.ndarray):
    img = value
  else:
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(value):
      raise DecodeError(f"{item_id}: image file {value} does not exist")
    try:
      with Image.open(value) as im:
        img = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      raise DecodeError(f"{item_id}: cannot decode image {value} ({e})") from e
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, -1)
  if img.ndim != 3 or img.shape[-1] != 3 or min(img.shape[:2]) < 1:
    raise DecodeError(f"{item_id}: image has shape {img.shape}, expected [H, W, 3]")
  return img


def _decode_audio(value: Any, item_id: str, sample_rate: int) -> np.ndarray:
  if isinstance(value, np.ndarray):
    audio = value.astype(np.float32)
  else:
    from edgeglass_jax.data.audio import load_audio
    if not os.path.isfile(value):
      raise DecodeError(f"{item_id}: audio file {value} does not exist")
    try:
      audio = load_audio(value, sample_rate)
    except Exception as e:  # any decoder failure is a reject, reported with the file
      raise DecodeError(f"{item_id}: cannot decode audio {value} ({e})") from e
  if audio.ndim != 1 or audio.size == 0:
    raise DecodeError(f"{item_id}: audio has shape {audio.shape}, expected a non-empty [S]")
  if not np.all(np.isfinite(audio)):
    raise DecodeError(f"{item_id}: audio holds NaN or Inf samples")
  return audio


def _decode_text(value: Any, item_id: str) -> List[str]:
  captions = [value] if isinstance(value, str) else list(value)
  if not captions or any(not c.strip() for c in captions):
    raise DecodeError(f"{item_id}: empty caption")
  return captions


def decode(record: Dict[str, Any], modality: str, sample_rate: int = 16000) -> Any:
  """Decoded value of one modality: uint8 `[H, W, 3]`, float32 `[S]` or a list of captions."""
  if modality == "image":
    return _decode_image(record["image"], record["id"])
  if modality == "audio":
    return _decode_audio(record["audio"], record["id"], sample_rate)
  if modality == "text":
    return _decode_text(record["captions"], record["id"])
  raise ValueError(f"unknown modality {modality!r}; use {MODALITIES}")


class SyntheticSource:
  """One split of the embedded procedural tri-modal set (`data/synthetic.py`) as records."""

  def __init__(self, dataset, split: str):
    self.dataset, self.split = dataset, split
    self._source = dataset.source(split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    ex = self._source[index]
    return {"id": ex["id"], "image": ex["image"], "audio": ex["audio"],
            "captions": list(ex["captions"]), "group": int(ex["group"])}


def synthetic_dataset(data_cfg):
  """The embedded synthetic set described by `config.data.synthetic`."""
  from edgeglass_jax.data import synthetic
  fields = dict(data_cfg.synthetic)
  fields["captions_per_item"] = max(int(data_cfg.get("captions_per_item", 1)), 1)
  return synthetic.SyntheticTriModal(synthetic.SyntheticConfig(**fields))


def make_source(data_cfg, split: str):
  """Source for `split` from `config.data` (`source` = synthetic | manifest)."""
  kind = data_cfg.source
  if kind == "synthetic":
    return SyntheticSource(synthetic_dataset(data_cfg), split)
  if kind == "manifest":
    path = data_cfg.manifest.get(split) if hasattr(data_cfg.manifest, "get") else None
    if not path:
      raise ValueError(f"config.data.manifest.{split} is not set")
    return ManifestSource(path)
  if kind == "tfds":
    from edgeglass_jax.data import tfds_source
    return tfds_source.from_config(data_cfg.tfds, split)
  raise ValueError(f"config.data.source={kind!r}: use 'synthetic', 'manifest' or 'tfds'")


class ZeroShot(NamedTuple):
  """Zero-shot classification tasks a data source defines.

  prompts: `{task: [one text prompt per class]}`; labels: example group ids `[N]` ->
  `{task: class index int [N]}` (classes in prompt order).
  """
  prompts: Dict[str, List[str]]
  labels: Callable[[np.ndarray], Dict[str, np.ndarray]]


def zero_shot(data_cfg) -> Optional[ZeroShot]:
  """The zero-shot tasks of `config.data`'s source: the synthetic set's attributes (color,
  shape, size, position); None for manifest and TFDS data, which name no classes, so they get
  no zero-shot metrics."""
  if data_cfg.source != "synthetic":
    return None
  from edgeglass_jax.data import synthetic
  return ZeroShot({a: synthetic.prompts_for(a) for a in synthetic.ATTRIBUTE_NAMES},
                  synthetic.zero_shot_labels)


def available_splits(data_cfg, requested: Sequence[str]) -> List[str]:
  if data_cfg.source == "manifest":
    return [s for s in requested if data_cfg.manifest.get(s)]
  return list(requested)
