"""Reader for local Hugging Face checkpoint directories.

Knows formats, not architectures: `config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json`, returned as `{hf_name: np.ndarray}`. Pickle (`*.bin`) is never
loaded: a directory holding only `pytorch_model.bin` is refused with a message that says so.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np


class WeightsError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message names the culprit."""


def read_hf_config(path: str) -> dict:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise WeightsError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
  try:
    with open(cfg_path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise WeightsError(f"{cfg_path}: not valid JSON ({e})") from e


def _load_safetensors(file: str) -> Dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(file)
  except (SafetensorError, OSError, ValueError) as e:
    raise WeightsError(f"{file}: unreadable safetensors file ({e})") from e
  except TypeError as e:  # bf16 tensors: numpy has no bfloat16, go through ml_dtypes
    if "bfloat16" not in str(e) and "bf16" not in str(e).lower():
      raise
    return _load_safetensors_bf16(file)


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
                      "U8": "u1", "BOOL": "?"}


def safetensors_dtype(code: str, path: str, key: str) -> np.dtype:
  """numpy dtype of a safetensors dtype code (BF16 as `ml_dtypes.bfloat16`)."""
  if code == "BF16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  if code not in SAFETENSORS_DTYPES:
    raise WeightsError(f"{path}: tensor {key!r} has dtype {code}, which numpy cannot hold")
  return np.dtype(SAFETENSORS_DTYPES[code])


def safetensors_header(path: str) -> Tuple[Dict[str, Any], int]:
  """The header of a `.safetensors` file and the byte offset where its tensor data starts.

  The format: an 8-byte little-endian header length N, N bytes of JSON
  `{name: {"dtype", "shape", "data_offsets": [begin, end]}}` (plus an optional
  `"__metadata__"`), then the data, offsets counted from its start (8 + N).
  """
  try:
    with open(path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) != 8:
        raise ValueError(f"{len(prefix)} bytes, shorter than the 8-byte header length")
      size = int.from_bytes(prefix, "little")
      raw = f.read(size)
      if len(raw) != size:
        raise ValueError(f"header of {size} bytes is cut off after {len(raw)}")
    header = json.loads(raw)
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise WeightsError(f"{path}: unreadable safetensors header ({e})") from e
  if not isinstance(header, dict):
    raise WeightsError(f"{path}: safetensors header is not a JSON object")
  return header, 8 + size


def memmap_safetensors(path: str, keys: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
  """Read-only numpy views of `keys` (default: every tensor) of a `.safetensors` file, backed by
  one memory map (nothing is copied); BF16 tensors come as `ml_dtypes.bfloat16`."""
  header, base = safetensors_header(path)
  names = [k for k in header if k != "__metadata__"] if keys is None else list(keys)
  buf = np.memmap(path, np.uint8, mode="r")
  out = {}
  for key in names:
    if key not in header:
      raise KeyError(f"{path}: no tensor {key!r} (it has {sorted(set(header) - {'__metadata__'})})")
    meta = header[key]
    start, end = meta["data_offsets"]
    if base + end > buf.size:
      raise WeightsError(f"{path}: tensor {key!r} ends at byte {base + end}, past the file's "
                         f"{buf.size} bytes (truncated?)")
    dtype = safetensors_dtype(meta["dtype"], path, key)
    out[key] = buf[base + start:base + end].view(dtype).reshape(meta["shape"])
  return out


def _load_safetensors_bf16(file: str) -> Dict[str, np.ndarray]:
  """Every tensor of `file` in memory, BF16 widened to float32 (numpy has no bfloat16)."""
  import ml_dtypes
  return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else np.array(v)
          for k, v in memmap_safetensors(file).items()}


def read_hf_dir(path: str) -> Dict[str, np.ndarray]:
  """Reads every tensor of a HF directory (single or sharded safetensors) into numpy."""
  if not os.path.isdir(path):
    raise WeightsError(f"{path}: not a directory")
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return _load_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise WeightsError(f"{index}: no 'weight_map'")
    tensors: Dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(path, shard)
      if not os.path.isfile(shard_path):
        raise WeightsError(f"{index} names shard {shard!r}, which is missing from {path}")
      tensors.update(_load_safetensors(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise WeightsError(f"{index} lists tensors no shard holds, e.g. {missing[:3]}")
    return tensors
  if any(f.endswith(".bin") for f in os.listdir(path)):
    raise WeightsError(f"{path}: only PyTorch pickle weights found; edgeglass_jax never loads "
                       "pickle. Re-save with save_pretrained(..., safe_serialization=True).")
  raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json")
