"""GGUF files written here with `gguf.GGUFWriter`: tiny random HF Llama and Gemma 3 models in
llama.cpp's layout (interleaved q/k rows for llama, `1 + w` norms for Gemma) load through
`decoder.from_pretrained` with HF's logits; unsupported architectures, tensors and types are
named errors."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="reading GGUF needs the `gguf` package")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeglass_jax import decoder  # noqa: E402
from edgeglass_jax.weights import WeightsError  # noqa: E402
from edgeglass_jax.weights import gguf as gguf_reader  # noqa: E402

HF_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def llama_cpp_permute(w, heads):
  """llama.cpp's `LlamaModel.permute`: per head, rotate-half rows -> interleaved pairs."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def write_gguf(path, arch, model):
  """Writes an HF llama / gemma3_text model as llama.cpp would (float32 tensors)."""
  c = model.config
  writer = gguf.GGUFWriter(str(path), arch)
  for key, value in (("block_count", c.num_hidden_layers), ("context_length", 64),
                     ("embedding_length", c.hidden_size),
                     ("feed_forward_length", c.intermediate_size),
                     ("attention.head_count", c.num_attention_heads),
                     ("attention.head_count_kv", c.num_key_value_heads),
                     ("attention.key_length", c.head_dim)):
    writer.add_uint32(f"{arch}.{key}", value)
  writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
  theta = c.rope_parameters.get("full_attention", c.rope_parameters)["rope_theta"]
  writer.add_float32(f"{arch}.rope.freq_base", theta)
  if arch == "gemma3":
    writer.add_uint32("gemma3.attention.sliding_window", c.sliding_window)
  for name, tensor in model.state_dict().items():
    arr = tensor.numpy().astype(np.float32)
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    if arch == "llama" and ".q_proj." in name:
      arr = llama_cpp_permute(arr, c.num_attention_heads)
    if arch == "llama" and ".k_proj." in name:
      arr = llama_cpp_permute(arr, c.num_key_value_heads)
    if arch == "gemma3" and name.endswith("norm.weight"):
      arr = arr + 1.0
    if name.startswith("model.layers."):
      _, _, i, rest = name.split(".", 3)
      module, kind = rest.rsplit(".", 1)
      if arch == "gemma3" and module == "post_attention_layernorm":
        gname = f"blk.{i}.post_attention_norm.{kind}"
      elif module == "post_attention_layernorm":
        gname = f"blk.{i}.ffn_norm.{kind}"
      else:
        gname = f"blk.{i}.{HF_TO_GGUF[module]}.{kind}"
    else:
      gname = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[name]
    writer.add_tensor(gname, arr)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def tiny(kind):
  torch.manual_seed(0)
  base = dict(vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64)
  if kind == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **base, rope_theta=1e4, tie_word_embeddings=True))
  else:  # GGUF stores neither layer_types nor query_pre_attn_scalar: HF's defaults (llama.cpp's)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **dict(base, num_hidden_layers=6), sliding_window=3, tie_word_embeddings=False))
  model.config._attn_implementation = "eager"
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model.eval()


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("gemma3", "gemma3")])
def test_written_gguf_loads_with_hf_logits(tmp_path, kind, arch):
  model = tiny(kind)
  path = write_gguf(tmp_path / f"{kind}.gguf", arch, model)
  ids = np.random.default_rng(1).integers(0, 53, (2, 7))
  with torch.no_grad():
    ref = model(torch.from_numpy(ids)).logits.numpy()
  module, params = decoder.from_pretrained(path)
  assert module.config.family == ("llama" if kind == "llama" else "gemma3_text")
  assert module.config.tie_word_embeddings == (kind == "llama")
  ours = np.asarray(module.apply(params, ids))
  assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


def test_reader_keeps_llama_cpp_values_and_the_model_side_undoes_them(tmp_path):
  model = tiny("llama")
  path = write_gguf(tmp_path / "llama.gguf", "llama", model)
  tensors, config = gguf_reader.read_gguf(path)
  hf_q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
  np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                                llama_cpp_permute(hf_q, 6))
  np.testing.assert_array_equal(decoder.unpermute_llama_qk(llama_cpp_permute(hf_q, 6), 6), hf_q)
  assert config["model_type"] == "llama" and config["tie_word_embeddings"]
  assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == \
      (6, 2, 8)


def _minimal(path, arch, name="token_embd.weight", array=None):
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_tensor(name, np.ones((4, 8), np.float32) if array is None else array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def test_unsupported_architecture_is_a_named_error(tmp_path):
  path = _minimal(tmp_path / "m.gguf", "mamba")
  with pytest.raises(WeightsError, match=r"architecture 'mamba' is not supported") as e:
    decoder.from_pretrained(path)
  assert path in str(e.value)


def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path):
  path = _minimal(tmp_path / "t.gguf", "llama", "blk.0.attn_q.weight",
                  np.ones((4, 8), np.int32))
  with pytest.raises(WeightsError, match=r"'blk\.0\.attn_q\.weight' has GGUF type I32") as e:
    gguf_reader.read_gguf(path)
  assert path in str(e.value)


def test_unknown_tensor_name_is_a_named_error(tmp_path):
  path = _minimal(tmp_path / "n.gguf", "llama", "blk.0.ssm_conv.weight")
  with pytest.raises(WeightsError, match=r"'blk\.0\.ssm_conv\.weight' is not part of a llama"):
    gguf_reader.read_gguf(path)
