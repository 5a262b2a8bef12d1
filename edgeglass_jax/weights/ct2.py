"""Reader for CTranslate2 `model.bin` files (binary version 6), pure Python + numpy.

Knows the format, not architectures, except for `whisper_ct2_to_hf`, which renames a
`WhisperSpec` checkpoint into HF `WhisperForConditionalGeneration` names (the ct2 spec layout
is format knowledge: which fused `linear_i` holds what).

Layout (little endian), as written by CTranslate2's `ModelSpec._serialize`:
  u32 version | str spec_name | u32 revision | u32 n_variables
  n_variables x (str name | u8 rank | rank x u32 dim | u8 dtype_id | u32 n_bytes | data)
  u32 n_aliases | n_aliases x (str alias | str target)
where `str` is a u16 byte count (including a trailing NUL) followed by UTF-8 bytes and the NUL.
Scalars (rank 0) hold config values such as `encoder/num_heads`; string options are int8 arrays.
"""
from __future__ import annotations

import dataclasses
import os
import re
import struct
from typing import Dict, List, Tuple

import numpy as np

from edgeglass_jax.weights.hf import WeightsError

SUPPORTED_VERSION = 6
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # ct2 DataType enum order
_MAX_RANK = 8


@dataclasses.dataclass
class Ct2Model:
  """A parsed `model.bin`: header fields, variables (ct2 names) and aliases (alias -> target)."""
  path: str
  version: int
  spec: str
  revision: int
  variables: Dict[str, np.ndarray]
  aliases: Dict[str, str]

  def tensors(self) -> Dict[str, np.ndarray]:
    """Variables plus every alias resolved to the array it names."""
    out = dict(self.variables)
    out.update({alias: self.variables[target] for alias, target in self.aliases.items()})
    return out


class _Cursor:
  """Bounds-checked reads over the file's bytes; errors name the file and what was being read."""

  def __init__(self, data: bytes, path: str):
    self.data, self.path, self.pos = data, path, 0

  def take(self, n: int, what: str) -> bytes:
    if self.pos + n > len(self.data):
      raise WeightsError(f"{self.path}: truncated file: {what} needs {n} bytes at offset "
                         f"{self.pos}, but the file ends at {len(self.data)}")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def unpack(self, fmt: str, what: str):
    return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

  def string(self, what: str) -> str:
    (n,) = self.unpack("H", what)
    raw = self.take(n, what)
    if n == 0 or raw[-1] != 0:
      raise WeightsError(f"{self.path}: corrupt file: {what} at offset {self.pos - n} is not a "
                         "NUL-terminated string")
    try:
      return raw[:-1].decode("utf-8")
    except UnicodeDecodeError as e:
      raise WeightsError(f"{self.path}: corrupt file: {what} is not UTF-8 ({e})") from e


def _read_variable(cur: _Cursor, index: int) -> Tuple[str, np.ndarray]:
  name = cur.string(f"name of variable #{index}")
  (rank,) = cur.unpack("B", f"rank of variable {name!r}")
  if rank > _MAX_RANK:
    raise WeightsError(f"{cur.path}: corrupt file: variable {name!r} has rank {rank}")
  shape = cur.unpack(f"{rank}I", f"shape of variable {name!r}")
  (dtype_id,) = cur.unpack("B", f"dtype of variable {name!r}")
  if dtype_id >= len(_DTYPES):
    raise WeightsError(f"{cur.path}: corrupt file: variable {name!r} has unknown dtype id "
                       f"{dtype_id} (known: {dict(enumerate(_DTYPES))})")
  dtype = _DTYPES[dtype_id]
  (n_bytes,) = cur.unpack("I", f"byte count of variable {name!r}")
  itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
  want = int(np.prod(shape, dtype=np.int64)) * itemsize
  if n_bytes != want:
    raise WeightsError(f"{cur.path}: corrupt file: variable {name!r} of shape {shape} and dtype "
                       f"{dtype} declares {n_bytes} bytes, expected {want}")
  raw = cur.take(n_bytes, f"data of variable {name!r}")
  if dtype == "bfloat16":
    arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
  else:
    arr = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).astype(dtype)
  return name, arr.reshape(shape)


def load_ct2(path: str) -> Ct2Model:
  """Parses a CTranslate2 `model.bin` (or a directory holding one) into a `Ct2Model`.

  Raises `WeightsError` naming the file and the variable for unsupported versions, truncated or
  corrupt files, duplicate names and aliases that point nowhere.
  """
  file = os.path.join(path, "model.bin") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise WeightsError(f"{file}: no such CTranslate2 model file")
  with open(file, "rb") as f:
    cur = _Cursor(f.read(), file)
  (version,) = cur.unpack("I", "binary version")
  if version != SUPPORTED_VERSION:
    raise WeightsError(f"{file}: CTranslate2 binary version {version} is not supported (this "
                       f"reader handles version {SUPPORTED_VERSION}; re-convert with a recent "
                       "ct2 converter)")
  spec = cur.string("spec name")
  (revision,) = cur.unpack("I", "spec revision")
  (n_vars,) = cur.unpack("I", "variable count")
  variables: Dict[str, np.ndarray] = {}
  for i in range(n_vars):
    name, arr = _read_variable(cur, i)
    if name in variables:
      raise WeightsError(f"{file}: corrupt file: variable {name!r} appears twice")
    variables[name] = arr
  (n_aliases,) = cur.unpack("I", "alias count")
  aliases: Dict[str, str] = {}
  for i in range(n_aliases):
    alias = cur.string(f"name of alias #{i}")
    target = cur.string(f"target of alias {alias!r}")
    if target not in variables:
      raise WeightsError(f"{file}: alias {alias!r} points to missing variable {target!r}")
    aliases[alias] = target
  if cur.pos != len(cur.data):
    raise WeightsError(f"{file}: corrupt file: {len(cur.data) - cur.pos} unexpected bytes after "
                       "the alias table")
  return Ct2Model(file, version, spec, revision, variables, aliases)


def read_ct2(path: str) -> Dict[str, np.ndarray]:
  """`{ct2_name: np.ndarray}` for every variable of a `model.bin`, aliases resolved."""
  return load_ct2(path).tensors()


def _weight(tensors: Dict[str, np.ndarray], name: str, source: str) -> np.ndarray:
  """A float32 weight; int8/int16 weights are dequantised with their `<name>_scale`."""
  if name not in tensors:
    raise WeightsError(f"{source}: missing ct2 variable {name!r}")
  arr = tensors[name]
  if arr.dtype.kind in "iu":
    scale = tensors.get(name + "_scale")
    if scale is None:
      raise WeightsError(f"{source}: quantised variable {name!r} has no {name + '_scale'!r}")
    scale = np.asarray(scale, np.float32)
    scale = scale.reshape(-1, *([1] * (arr.ndim - 1))) if scale.ndim else scale
    return arr.astype(np.float32) / scale
  return np.asarray(arr, np.float32)


def _split(arr: np.ndarray, n: int, name: str, source: str) -> List[np.ndarray]:
  if arr.shape[0] % n:
    raise WeightsError(f"{source}: ct2 variable {name!r} of shape {arr.shape} does not split "
                       f"into {n} equal parts")
  return np.split(arr, n, axis=0)


def _layer_ids(tensors, stack: str) -> List[int]:
  pat = re.compile(rf"^{stack}/layer_(\d+)/")
  return sorted({int(m.group(1)) for k in tensors for m in [pat.match(k)] if m})


def whisper_ct2_to_hf(tensors: Dict[str, np.ndarray], source: str = "ct2 checkpoint",
                      prefix: str = "model.") -> Dict[str, np.ndarray]:
  """Renames a ct2 `WhisperSpec` checkpoint into HF `WhisperForConditionalGeneration` tensors.

  `tensors` is `read_ct2(...)` output. Fused projections are split: self-attention
  `linear_0 = [q; k; v]`, cross-attention `linear_0 = q`, `linear_1 = [k; v]`, `linear_2 = out`.
  ct2 stores a key bias that HF lacks; it is dropped, which is exact because a per-query constant
  added to every logit leaves the softmax unchanged. Outputs are float32; `proj_out.weight` is the
  (tied) token embedding. `prefix=""` gives `WhisperModel` names (without `proj_out`).
  """
  out: Dict[str, np.ndarray] = {}

  def w(name):
    return _weight(tensors, name, source)

  def linear(ct2: str, hf: str, bias: bool = True):
    out[f"{hf}.weight"] = w(f"{ct2}/weight")
    if bias:
      out[f"{hf}.bias"] = w(f"{ct2}/bias")

  def layer_norm(ct2: str, hf: str):
    out[f"{hf}.weight"] = w(f"{ct2}/gamma")
    out[f"{hf}.bias"] = w(f"{ct2}/beta")

  def fused(ct2: str, hfs: List[str]):
    weight, bias = w(f"{ct2}/weight"), w(f"{ct2}/bias")
    for hf, wi, bi in zip(hfs, _split(weight, len(hfs), f"{ct2}/weight", source),
                          _split(bias, len(hfs), f"{ct2}/bias", source)):
      out[f"{hf}.weight"] = wi
      if not hf.endswith("k_proj"):
        out[f"{hf}.bias"] = bi

  def self_attention_and_ffn(src, dst):
    layer_norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
    fused(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"])
    linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
    layer_norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
    linear(f"{src}/ffn/linear_1", f"{dst}.fc2")

  enc, dec = f"{prefix}encoder", f"{prefix}decoder"
  for conv in ("conv1", "conv2"):
    linear(f"encoder/{conv}", f"{enc}.{conv}")
  out[f"{enc}.embed_positions.weight"] = w("encoder/position_encodings/encodings")
  enc_layers = _layer_ids(tensors, "encoder")
  if not enc_layers:
    raise WeightsError(f"{source}: no 'encoder/layer_N/...' variables (is this a WhisperSpec?)")
  for i in enc_layers:
    self_attention_and_ffn(f"encoder/layer_{i}", f"{enc}.layers.{i}")
  layer_norm("encoder/layer_norm", f"{enc}.layer_norm")

  out[f"{dec}.embed_tokens.weight"] = w("decoder/embeddings/weight")
  out[f"{dec}.embed_positions.weight"] = w("decoder/position_encodings/encodings")
  for i in _layer_ids(tensors, "decoder"):
    src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
    self_attention_and_ffn(src, dst)
    layer_norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
    linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
    fused(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.{p}_proj" for p in "kv"])
    linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
  layer_norm("decoder/layer_norm", f"{dec}.layer_norm")
  if prefix:
    out["proj_out.weight"] = w("decoder/projection/weight" if "decoder/projection/weight" in
                               tensors else "decoder/embeddings/weight")
  return out


_ACTIVATIONS = ("relu", "gelu_new", "silu", "gelu", "gelu_sigmoid", "tanh")  # ct2 enum order


def whisper_hf_config_from_ct2(tensors: Dict[str, np.ndarray],
                               source: str = "ct2 checkpoint") -> dict:
  """The architecture fields of an HF `WhisperConfig`, read off a ct2 Whisper checkpoint."""
  def get(name):
    if name not in tensors:
      raise WeightsError(f"{source}: missing ct2 variable {name!r}")
    return np.asarray(tensors[name])

  d_model, n_mels, _ = get("encoder/conv1/weight").shape
  activation = int(get("decoder/activation")) if "decoder/activation" in tensors else 3
  if activation >= len(_ACTIVATIONS):
    raise WeightsError(f"{source}: unknown ct2 activation id {activation}")
  return {
      "model_type": "whisper",
      "d_model": int(d_model),
      "num_mel_bins": int(n_mels),
      "encoder_layers": len(_layer_ids(tensors, "encoder")),
      "decoder_layers": len(_layer_ids(tensors, "decoder")),
      "encoder_attention_heads": int(get("encoder/num_heads")),
      "decoder_attention_heads": int(get("decoder/num_heads")),
      "encoder_ffn_dim": int(get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
      "decoder_ffn_dim": int(get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
      "max_source_positions": int(get("encoder/position_encodings/encodings").shape[0]),
      "max_target_positions": int(get("decoder/position_encodings/encodings").shape[0]),
      "vocab_size": int(get("decoder/embeddings/weight").shape[0]),
      "activation_function": _ACTIVATIONS[activation],
  }
