"""Reader for local Hugging Face checkpoint directories.

Knows formats, not architectures: `config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json`, returned as `{hf_name: np.ndarray}`. Pickle (`*.bin`) is never
loaded: a directory holding only `pytorch_model.bin` is refused with a message that says so.
"""
from __future__ import annotations

import json
import os
from typing import Dict

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


def _load_safetensors_bf16(file: str) -> Dict[str, np.ndarray]:
  import ml_dtypes
  header_len = int.from_bytes(open(file, "rb").read(8), "little")
  with open(file, "rb") as f:
    f.seek(8)
    header = json.loads(f.read(header_len))
    data = f.read()
  dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    out[name] = arr.astype(np.float32) if info["dtype"] == "BF16" else arr.copy()
  return out


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
