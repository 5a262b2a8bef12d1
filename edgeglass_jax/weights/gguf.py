"""Reader for GGUF files (llama.cpp's format) through the `gguf` package.

Knows the format, not architectures: it dequantizes every tensor to float32 (whatever type the
`gguf` package can dequantize: F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, Q2_K..Q6_K, ...), names it
as HF's `*ForCausalLM` does and turns the file's metadata into an HF-style `config.json` dict.
GGUF's per-architecture tensor and metadata names are format conventions, listed here for the
architectures read so far (llama, qwen2, gemma3). The values stay as llama.cpp wrote them: its
architecture-specific rewrites (llama's interleaved q/k rows, Gemma's `1 + w` norms) are undone
by the model side (`decoder.gguf_to_hf_layout`).

Numpy shapes are GGUF's dims reversed, which is PyTorch's `[out, in]` for linear weights.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Tuple

import numpy as np

from edgeglass_jax.weights.hf import WeightsError

# GGUF `general.architecture` -> HF `model_type`.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}

_COMMON_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_COMMON_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSORS = {
    "llama": dict(_COMMON_BLOCK, ffn_norm="post_attention_layernorm"),
    "qwen2": dict(_COMMON_BLOCK, ffn_norm="post_attention_layernorm"),
    "gemma3": dict(_COMMON_BLOCK, attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm",
                   post_attention_norm="post_attention_layernorm",
                   ffn_norm="pre_feedforward_layernorm",
                   post_ffw_norm="post_feedforward_layernorm"),
}

# `{arch}.KEY` metadata -> HF config key.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
    "final_logit_softcapping": "final_logit_softcapping",
    "attn_logit_softcapping": "attn_logit_softcapping",
}
_TOKEN_KEYS = {"tokenizer.ggml.bos_token_id": "bos_token_id",
               "tokenizer.ggml.eos_token_id": "eos_token_id",
               "tokenizer.ggml.padding_token_id": "pad_token_id"}


def _open(path: str):
  try:
    import gguf
  except ImportError as e:
    raise WeightsError(f"{path}: reading GGUF needs the `gguf` package (pip install gguf)") from e
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such GGUF file")
  try:
    return gguf, gguf.GGUFReader(path)
  except (ValueError, OSError, KeyError) as e:
    raise WeightsError(f"{path}: not a readable GGUF file ({e})") from e


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    return default
  value = field.contents()
  return value.item() if isinstance(value, np.generic) else value


def architecture(path: str) -> str:
  """The file's `general.architecture`."""
  _, reader = _open(path)
  return str(_field(reader, "general.architecture", ""))


def hf_tensor_name(arch: str, gguf_name: str) -> str:
  """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (for `arch`).

  Raises KeyError for a name the architecture's table does not hold.
  """
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
  if m:
    return f"model.layers.{m[1]}.{_BLOCK_TENSORS[arch][m[2]]}.{m[3]}"
  base, _, kind = gguf_name.rpartition(".")
  if kind not in ("weight", "bias"):
    raise KeyError(gguf_name)
  return f"{_COMMON_TENSORS[base]}.{kind}"


def dequantize(path: str, tensor) -> np.ndarray:
  """One `GGUFReader` tensor -> float32 numpy, shape = GGUF dims reversed."""
  import gguf
  qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
  try:
    values = gguf.quants.dequantize(tensor.data, qtype)
  except NotImplementedError as e:
    raise WeightsError(f"{path}: tensor {tensor.name!r} has GGUF type {qtype.name}, which "
                       f"cannot be dequantized ({e})") from e
  if not np.issubdtype(values.dtype, np.floating):
    raise WeightsError(f"{path}: tensor {tensor.name!r} has GGUF type {qtype.name}, which is "
                       "not a floating-point or quantized weight type")
  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
  return np.asarray(values, np.float32).reshape(shape)


def read_gguf(path: str) -> Tuple[Dict[str, np.ndarray], dict]:
  """Reads a GGUF file into `({hf_name: float32 array}, hf_config_dict)`.

  The config holds `model_type` (HF's name for the architecture), the sizes, RoPE base and
  scaling, norm epsilon, sliding window, special token ids and `tie_word_embeddings` (true when
  the file has no `output.weight`). Errors name the file and the architecture, tensor or type.
  """
  gguf, reader = _open(path)
  arch = str(_field(reader, "general.architecture", ""))
  if arch not in ARCHITECTURES:
    raise WeightsError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                       f"{sorted(ARCHITECTURES)}")
  tensors: Dict[str, np.ndarray] = {}
  for tensor in reader.tensors:
    try:
      name = hf_tensor_name(arch, tensor.name)
    except KeyError:
      raise WeightsError(f"{path}: tensor {tensor.name!r} is not part of a {arch} model as "
                         "read here") from None
    tensors[name] = dequantize(path, tensor)

  config: Dict[str, Any] = {"model_type": ARCHITECTURES[arch]}
  for key, hf_key in _CONFIG_KEYS.items():
    value = _field(reader, f"{arch}.{key}")
    if value is not None:
      config[hf_key] = value
  if "head_dim" not in config and arch == "llama":
    dims = _field(reader, "llama.rope.dimension_count")
    if dims is not None:
      config["head_dim"] = dims
  scaling = _field(reader, f"{arch}.rope.scaling.type")
  if scaling not in (None, "none"):
    config["rope_scaling"] = {"rope_type": scaling,
                              "factor": _field(reader, f"{arch}.rope.scaling.factor", 1.0)}
  if "vocab_size" not in config:
    config["vocab_size"] = int(tensors["model.embed_tokens.weight"].shape[0])
  for key, hf_key in _TOKEN_KEYS.items():
    value = _field(reader, key)
    if value is not None:
      config[hf_key] = int(value)
  config["tie_word_embeddings"] = "lm_head.weight" not in tensors
  return tensors, config


def load_tokenizer(path: str):
  """The tokenizer stored in the GGUF file, through transformers' GGUF support."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                       gguf_file=os.path.basename(path))
