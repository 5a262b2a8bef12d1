"""A TensorFlow Datasets split as a source of records (see `data/sources.py`).

Reads an already prepared dataset (`download=False` by default: nothing is fetched at run time)
through `tfds.data_source` (random access over array_record files, no TensorFlow needed by the
reader) or, when the dataset was prepared as tfrecord, through `tfds.as_numpy`, which needs
TensorFlow and holds the whole split in memory. Feature keys are paths into the example's nested
dicts: COCO captions are `captions/text`, LibriSpeech's audio is `speech` with text `text`.
Some builders (e.g. `coco_captions`, every `Audio` dataset) import TensorFlow to declare their
features, whichever reader is used.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np


def _lookup(example: Dict[str, Any], path: str, where: str) -> Any:
  value = example
  for part in path.split("/") if path not in example else [path]:
    if not isinstance(value, dict) or part not in value:
      raise KeyError(f"{where}: no feature {path!r}; the example has {sorted(_paths(example))}")
    value = value[part]
  return value


def _paths(example: Dict[str, Any], prefix: str = "") -> List[str]:
  out = []
  for k, v in example.items():
    out.extend(_paths(v, f"{prefix}{k}/") if isinstance(v, dict) else [prefix + k])
  return out


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource:
  """Records `{"id", "image" uint8 [H, W, 3], "audio" float32 [S], "captions": [str], "group"}`.

  `image_key`, `caption_key`, `audio_key` name the features to read (None: modality absent);
  captions may be one string or a list of them, empty ones are dropped. `id_key` names an id
  feature (default `"{name}:{split}:{index}"`), `group_key` an integer feature that marks
  positives of each other (default -1). Integer audio is scaled to [-1, 1], multi-channel audio
  averaged, and audio resampled to `sample_rate` when the feature declares another rate.
  `random_access=None` tries `tfds.data_source` and falls back to `tfds.as_numpy`; True/False
  forces one.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
               image_key: Optional[str] = "image", caption_key: Optional[str] = "captions/text",
               audio_key: Optional[str] = None, id_key: Optional[str] = None,
               group_key: Optional[str] = None, sample_rate: int = 16000,
               random_access: Optional[bool] = None, download: bool = False):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:
      raise ImportError("TfdsSource needs `pip install tensorflow-datasets`") from e
    self.name, self.split = name, split
    self.image_key, self.caption_key, self.audio_key = image_key, caption_key, audio_key
    self.id_key, self.group_key, self.sample_rate = id_key, group_key, sample_rate
    where = f"tfds {name!r} split {split!r}" + (f" in {data_dir}" if data_dir else "")
    self._where = where
    builder = tfds.builder(name, data_dir=data_dir)
    self._audio_rate = None
    if audio_key:
      feature = builder.info.features
      for part in audio_key.split("/"):
        feature = feature[part]
      self._audio_rate = getattr(feature, "sample_rate", None)
    self._data = None
    if random_access is not False:
      try:
        self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
      except (NotImplementedError, ValueError) as e:
        if random_access:
          raise ValueError(f"{where}: no random access ({e})") from e
    self.random_access = self._data is not None
    if self._data is None:
      ds = tfds.load(name, split=split, data_dir=data_dir, download=download)
      self._data = list(tfds.as_numpy(ds))

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"{self._where}: index {index} out of range for {len(self)} examples")
    index = index % len(self)
    ex = self._data[index]
    where = f"{self._where} example {index}"
    item_id = (_text(np.asarray(_lookup(ex, self.id_key, where)).item()) if self.id_key
               else f"{self.name}:{self.split}:{index}")
    return {"id": item_id,
            "image": self._image(ex, where) if self.image_key else None,
            "audio": self._audio(ex, where) if self.audio_key else None,
            "captions": self._captions(ex, where) if self.caption_key else None,
            "group": int(_lookup(ex, self.group_key, where)) if self.group_key else -1}

  def _image(self, ex, where) -> np.ndarray:
    img = np.asarray(_lookup(ex, self.image_key, where))
    if img.dtype != np.uint8:
      raise ValueError(f"{where}: image {self.image_key!r} has dtype {img.dtype}, expected uint8")
    if img.ndim == 2:
      img = img[..., None]
    if img.ndim == 3 and img.shape[-1] == 1:
      img = np.repeat(img, 3, -1)
    return img

  def _captions(self, ex, where) -> Optional[List[str]]:
    value = np.asarray(_lookup(ex, self.caption_key, where))
    captions = [_text(c).strip() for c in value.reshape(-1).tolist()]
    return [c for c in captions if c] or None

  def _audio(self, ex, where) -> np.ndarray:
    wave = np.asarray(_lookup(ex, self.audio_key, where))
    if np.issubdtype(wave.dtype, np.integer):
      wave = wave.astype(np.float32) / float(np.iinfo(wave.dtype).max + 1)
    wave = wave.astype(np.float32)
    if wave.ndim == 2:
      wave = wave.mean(-1)
    rate = self._audio_rate
    if rate and rate != self.sample_rate and wave.size:
      from scipy.signal import resample_poly
      g = math.gcd(int(rate), int(self.sample_rate))
      wave = resample_poly(wave, self.sample_rate // g, int(rate) // g).astype(np.float32)
    return wave


def from_config(tfds_cfg, split: str) -> TfdsSource:
  """`TfdsSource` from `config.data.tfds`: `name`, `data_dir`, `splits` (our split -> TFDS
  split, e.g. `{"eval": "validation"}`), and optionally the `*_key` fields and `sample_rate`."""
  kwargs = {}
  for k in ("image_key", "caption_key", "audio_key", "id_key", "group_key", "sample_rate"):
    if k in tfds_cfg:
      kwargs[k] = None if tfds_cfg[k] == "" else tfds_cfg[k]
  splits = tfds_cfg.get("splits") or {}
  return TfdsSource(tfds_cfg.name, splits.get(split, split),
                    data_dir=tfds_cfg.get("data_dir") or None, **kwargs)
