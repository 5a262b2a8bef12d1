"""Whisper encoder vs a tiny random HF `WhisperModel`, and the ct2 reader on synthetic files."""
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from edgeglass_jax import encoders
from edgeglass_jax.encoders import whisper
from edgeglass_jax.weights import WeightsError, ct2

N_FRAMES = 100  # max_source_positions 50 -> HF insists on exactly 100 frames


def tiny_config(**kw):
  cfg = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
             decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=80,
             max_source_positions=N_FRAMES // 2, max_target_positions=16, vocab_size=96,
             decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  cfg.update(kw)
  return transformers.WhisperConfig(**cfg)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  model = transformers.WhisperModel(tiny_config()).eval()
  with torch.no_grad():  # non-trivial norms and biases, so a mapping slip shows
    for name, p in model.named_parameters():
      if "layer_norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("whisper_tiny"))
  hf_model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return encoders.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def apply_fn(loaded):
  module, _ = loaded
  return jax.jit(module.apply)


def hf_encode(hf_model, mel):
  """HF encoder on `mel [B, T, n_mels]`, rebuilt with max_source_positions = T/2 when T < 100."""
  enc = hf_model.encoder
  t = mel.shape[1]
  if t != N_FRAMES:
    enc = transformers.WhisperModel(tiny_config(max_source_positions=t // 2)).encoder.eval()
    state = dict(hf_model.encoder.state_dict())
    state["embed_positions.weight"] = state["embed_positions.weight"][:t // 2]
    enc.load_state_dict(state, strict=True)
  with torch.no_grad():
    out = enc(torch.from_numpy(np.ascontiguousarray(mel.transpose(0, 2, 1))))
  return out.last_hidden_state.numpy()


def test_config_from_hf():
  cfg = whisper.WhisperEncoderConfig.from_hf(tiny_config().to_dict())
  assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.mlp_dim, cfg.n_mels,
          cfg.max_source_positions, cfg.activation, cfg.family) == (
              32, 2, 4, 64, 80, 50, "gelu", "whisper")


def test_sinusoids_equal_hf_table(hf_model):
  from transformers.models.whisper.modeling_whisper import sinusoids
  np.testing.assert_allclose(whisper.sinusoids(50, 32), sinusoids(50, 32).numpy(), atol=1e-6)
  np.testing.assert_allclose(whisper.sinusoids(50, 32),
                             hf_model.encoder.embed_positions.weight.detach().numpy(), atol=1e-6)


def test_tokens_and_pooled_match_hf(hf_model, loaded, apply_fn):
  _, params = loaded
  mel = np.random.default_rng(0).normal(size=(2, N_FRAMES, 80)).astype(np.float32)
  out = apply_fn(params, jnp.asarray(mel))
  ref = hf_encode(hf_model, mel)
  assert out.tokens.shape == (2, N_FRAMES // 2, 32)
  assert rel_err(out.tokens, ref) < 1e-4
  torch_mean = torch.from_numpy(ref).mean(dim=1).numpy()
  assert rel_err(out.pooled, torch_mean) < 1e-4


def test_conditional_generation_checkpoint_loads(hf_model, loaded, tmp_path):
  full = transformers.WhisperForConditionalGeneration(tiny_config()).eval()
  full.model.load_state_dict(hf_model.state_dict(), strict=True)
  full.save_pretrained(tmp_path)
  assert any(k.startswith("model.encoder.") for k in load_file(tmp_path / "model.safetensors"))
  _, params = encoders.from_pretrained(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_shorter_input_uses_first_positions(hf_model, loaded, apply_fn):
  _, params = loaded
  mel = np.random.default_rng(1).normal(size=(1, 40, 80)).astype(np.float32)
  out = apply_fn(params, jnp.asarray(mel))
  assert rel_err(out.tokens, hf_encode(hf_model, mel)) < 1e-4


def test_masked_rows_equal_unpadded_hf(hf_model, loaded, apply_fn):
  _, params = loaded
  rng = np.random.default_rng(2)
  mel = rng.normal(size=(3, N_FRAMES, 80)).astype(np.float32)
  valid = [60, 36, N_FRAMES]
  mask = np.arange(N_FRAMES)[None, :] < np.array(valid)[:, None]
  out = apply_fn(params, jnp.asarray(mel), jnp.asarray(mask))
  tokens = np.asarray(out.tokens)
  for i, t in enumerate(valid):
    ref = hf_encode(hf_model, mel[i:i + 1, :t])
    assert rel_err(tokens[i:i + 1, :t // 2], ref) < 1e-4, f"row {i} ({t} frames)"
    np.testing.assert_allclose(out.pooled[i], tokens[i, :t // 2].mean(0), rtol=1e-5, atol=1e-6)
  unmasked = apply_fn(params, jnp.asarray(mel))
  assert rel_err(unmasked.tokens[0, :30], tokens[0, :30]) > 1e-3  # padding matters without mask


def test_mask_only_for_pooling_keeps_hf_tokens(hf_model, loaded):
  module, params = loaded
  mel = np.random.default_rng(5).normal(size=(2, N_FRAMES, 80)).astype(np.float32)
  mask = np.arange(N_FRAMES)[None, :] < np.array([[44], [N_FRAMES]])
  out = jax.jit(module.clone(mask_attention=False).apply)(params, jnp.asarray(mel),
                                                          jnp.asarray(mask))
  ref = hf_encode(hf_model, mel)
  assert rel_err(out.tokens, ref) < 1e-4
  assert rel_err(out.pooled[0], ref[0, :22].mean(0)) < 1e-4
  assert rel_err(out.pooled[1], ref[1].mean(0)) < 1e-4


def test_odd_valid_length_equals_truncated_input(loaded, apply_fn):
  _, params = loaded
  mel = np.random.default_rng(3).normal(size=(1, N_FRAMES, 80)).astype(np.float32)
  mask = np.arange(N_FRAMES)[None, :] < 37
  out = apply_fn(params, jnp.asarray(mel), jnp.asarray(mask))
  alone = apply_fn(params, jnp.asarray(mel[:, :37]))
  assert alone.tokens.shape[1] == 19 == int(whisper.token_mask(mask).sum())
  assert rel_err(out.tokens[:, :19], alone.tokens) < 1e-5
  assert rel_err(out.pooled, alone.pooled) < 1e-5


def test_feature_layer_equals_hf_hidden_states(hf_model, loaded):
  module, params = loaded
  mel = np.random.default_rng(6).normal(size=(2, N_FRAMES, 80)).astype(np.float32)
  mask = np.arange(N_FRAMES)[None, :] < np.array([[64], [N_FRAMES]])
  with torch.no_grad():
    ref = hf_model.encoder(torch.from_numpy(np.ascontiguousarray(mel.transpose(0, 2, 1))),
                           output_hidden_states=True).hidden_states
  assert len(ref) == 3
  for layer in (0, 1, 2, -1, -2, -3):
    picked = module.clone(feature_layer=layer, mask_attention=False)
    out = picked.apply(params, jnp.asarray(mel), jnp.asarray(mask))
    want = ref[layer].numpy()
    assert rel_err(out.tokens, want) < 1e-4, f"feature_layer={layer}"
    assert rel_err(out.pooled[0], want[0, :32].mean(0)) < 1e-4, f"feature_layer={layer}"
  assert rel_err(ref[1], ref[2]) > 1e-2  # the layers differ, so a wrong pick shows
  for layer in (3, -4):
    with pytest.raises(ValueError, match=f"feature_layer={layer} is out of range for 2 layers"):
      module.clone(feature_layer=layer).apply(params, jnp.asarray(mel))


def test_too_many_frames_raises(loaded):
  module, params = loaded
  with pytest.raises(ValueError, match="max_source_positions=50"):
    module.apply(params, jnp.zeros((1, N_FRAMES + 2, 80)))
  with pytest.raises(ValueError, match=r"\[B, T, 80\]"):
    module.apply(params, jnp.zeros((1, N_FRAMES, 128)))


def test_bf16_compute_close(hf_model, loaded):
  module, params = loaded
  bf16 = module.clone(dtype=jnp.bfloat16)
  mel = np.random.default_rng(4).normal(size=(1, N_FRAMES, 80)).astype(np.float32)
  out = jax.jit(bf16.apply)(params, jnp.asarray(mel))
  assert out.tokens.dtype == jnp.bfloat16
  assert rel_err(out.tokens.astype(jnp.float32), hf_encode(hf_model, mel)) < 5e-2


def test_to_hf_round_trip(hf_dir, loaded):
  module, params = loaded
  exported = encoders.to_hf(module, params)
  saved = load_file(os.path.join(hf_dir, "model.safetensors"))
  encoder_keys = {k for k in saved if k.startswith("encoder.")}
  assert set(exported) == encoder_keys
  for k in encoder_keys:
    np.testing.assert_array_equal(exported[k], saved[k], err_msg=k)


def test_missing_tensor_is_named(hf_dir, tmp_path):
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  del tensors["encoder.layers.1.fc2.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  shutil.copy(os.path.join(hf_dir, "config.json"), tmp_path)
  with pytest.raises(WeightsError, match=r"encoder\.layers\.1\.fc2\.weight"):
    encoders.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- ct2 reader

_CT2_DTYPES = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2,
               np.dtype("int32"): 3, np.dtype("float16"): 4}


def write_ct2(path, variables, aliases=(), version=6, spec="WhisperSpec", revision=3):
  """Writes the binary layout documented in `weights/ct2.py` (CTranslate2 `_serialize`)."""
  def string(s):
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b

  out = [struct.pack("<I", version), string(spec), struct.pack("<II", revision, len(variables))]
  for name, arr in variables.items():
    arr = np.array(arr, order="C")  # ascontiguousarray would turn scalars into [1]
    out += [string(name), struct.pack("<B", arr.ndim), struct.pack(f"<{arr.ndim}I", *arr.shape),
            struct.pack("<BI", _CT2_DTYPES[arr.dtype], arr.nbytes), arr.tobytes()]
  out.append(struct.pack("<I", len(aliases)))
  for alias, target in aliases:
    out += [string(alias), string(target)]
  with open(path, "wb") as f:
    f.write(b"".join(out))


def hf_to_ct2_names(state):
  """The ct2 `WhisperSpec` layout of an HF `WhisperForConditionalGeneration` state dict."""
  s = {k: v.detach().numpy() for k, v in state.items()}
  out = {"encoder/num_heads": np.array(4, np.int16), "decoder/num_heads": np.array(4, np.int16),
         "decoder/activation": np.array(3, np.int8)}

  def lin(ct, hf, bias=True):
    out[f"{ct}/weight"] = s[f"{hf}.weight"]
    if bias:
      out[f"{ct}/bias"] = s[f"{hf}.bias"]

  def ln(ct, hf):
    out[f"{ct}/gamma"], out[f"{ct}/beta"] = s[f"{hf}.weight"], s[f"{hf}.bias"]

  def fused(ct, hfs):
    out[f"{ct}/weight"] = np.concatenate([s[f"{h}.weight"] for h in hfs])
    out[f"{ct}/bias"] = np.concatenate([s.get(f"{h}.bias", np.zeros(s[f"{h}.weight"].shape[0],
                                                                     np.float32)) for h in hfs])

  for conv in ("conv1", "conv2"):
    lin(f"encoder/{conv}", f"model.encoder.{conv}")
  out["encoder/position_encodings/encodings"] = s["model.encoder.embed_positions.weight"]
  out["decoder/position_encodings/encodings"] = s["model.decoder.embed_positions.weight"]
  out["decoder/embeddings/weight"] = s["model.decoder.embed_tokens.weight"]
  for side, n in (("encoder", 2), ("decoder", 1)):
    for i in range(n):
      c, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
      ln(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
      fused(f"{c}/self_attention/linear_0", [f"{h}.self_attn.{p}_proj" for p in "qkv"])
      lin(f"{c}/self_attention/linear_1", f"{h}.self_attn.out_proj")
      ln(f"{c}/ffn/layer_norm", f"{h}.final_layer_norm")
      lin(f"{c}/ffn/linear_0", f"{h}.fc1")
      lin(f"{c}/ffn/linear_1", f"{h}.fc2")
      if side == "decoder":
        ln(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
        lin(f"{c}/attention/linear_0", f"{h}.encoder_attn.q_proj")
        fused(f"{c}/attention/linear_1", [f"{h}.encoder_attn.{p}_proj" for p in "kv"])
        lin(f"{c}/attention/linear_2", f"{h}.encoder_attn.out_proj")
    ln(f"{side}/layer_norm", f"model.{side}.layer_norm")
  return out


@pytest.fixture(scope="module")
def hf_full(hf_model):
  full = transformers.WhisperForConditionalGeneration(tiny_config()).eval()
  full.model.load_state_dict(hf_model.state_dict(), strict=True)
  return full


def test_ct2_whisper_round_trip_loads_strictly(hf_full, tmp_path):
  variables = hf_to_ct2_names(hf_full.state_dict())
  write_ct2(tmp_path / "model.bin", variables, [("decoder/projection/weight",
                                                  "decoder/embeddings/weight")])
  model = ct2.load_ct2(str(tmp_path))
  assert (model.version, model.spec, model.revision) == (6, "WhisperSpec", 3)
  assert model.variables["encoder/num_heads"].dtype == np.int16
  tensors = model.tensors()
  assert tensors["decoder/projection/weight"] is tensors["decoder/embeddings/weight"]
  hf = ct2.whisper_ct2_to_hf(tensors)
  state = hf_full.state_dict()
  assert set(hf) == set(state)
  for k, v in hf.items():
    np.testing.assert_array_equal(v, state[k].numpy(), err_msg=k)
  fresh = transformers.WhisperForConditionalGeneration(tiny_config())
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in hf.items()}, strict=True)
  cfg = ct2.whisper_hf_config_from_ct2(tensors)
  assert {k: cfg[k] for k in ("d_model", "encoder_layers", "decoder_layers", "vocab_size",
                              "encoder_attention_heads", "max_source_positions",
                              "activation_function")} == dict(
                                  d_model=32, encoder_layers=2, decoder_layers=1, vocab_size=96,
                                  encoder_attention_heads=4, max_source_positions=50,
                                  activation_function="gelu")


def test_ct2_int8_weights_are_dequantised(hf_full, tmp_path):
  variables = hf_to_ct2_names(hf_full.state_dict())
  w = variables["encoder/layer_0/ffn/linear_0/weight"]
  scale = (127.0 / np.abs(w).max(axis=1)).astype(np.float32)
  variables["encoder/layer_0/ffn/linear_0/weight"] = np.rint(w * scale[:, None]).astype(np.int8)
  variables["encoder/layer_0/ffn/linear_0/weight_scale"] = scale
  write_ct2(tmp_path / "model.bin", variables)
  hf = ct2.whisper_ct2_to_hf(ct2.read_ct2(str(tmp_path / "model.bin")))
  got = hf["model.encoder.layers.0.fc1.weight"]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, w, atol=float(np.abs(w).max()) / 127)
  assert not np.array_equal(got, w)


def test_ct2_bad_files_name_the_culprit(tmp_path):
  variables = {"a/weight": np.arange(6, dtype=np.float16).reshape(2, 3),
               "b/scalar": np.array(7, np.int32)}
  good = tmp_path / "model.bin"
  write_ct2(good, variables, [("c/alias", "a/weight")])
  data = good.read_bytes()
  np.testing.assert_array_equal(ct2.read_ct2(str(good))["c/alias"], variables["a/weight"])

  cut = data.index(b"a/weight") + 26  # inside the 12 data bytes of a/weight
  (tmp_path / "cut.bin").write_bytes(data[:cut])
  with pytest.raises(WeightsError, match=r"cut\.bin.*truncated.*'a/weight'"):
    ct2.load_ct2(str(tmp_path / "cut.bin"))

  bad = bytearray(data)
  bad[data.index(b"b/scalar") + len(b"b/scalar") + 2] = 9  # dtype byte of a rank-0 variable
  (tmp_path / "dtype.bin").write_bytes(bytes(bad))
  with pytest.raises(WeightsError, match=r"dtype\.bin.*'b/scalar'.*dtype id 9"):
    ct2.load_ct2(str(tmp_path / "dtype.bin"))

  write_ct2(tmp_path / "alias.bin", variables, [("c/alias", "nope")])
  with pytest.raises(WeightsError, match=r"alias\.bin.*'c/alias'.*'nope'"):
    ct2.load_ct2(str(tmp_path / "alias.bin"))

  write_ct2(tmp_path / "v5.bin", variables, version=5)
  with pytest.raises(WeightsError, match=r"v5\.bin.*version 5"):
    ct2.load_ct2(str(tmp_path / "v5.bin"))

  (tmp_path / "tail.bin").write_bytes(data + b"\0\0")
  with pytest.raises(WeightsError, match=r"tail\.bin.*2 unexpected bytes"):
    ct2.load_ct2(str(tmp_path / "tail.bin"))

  with pytest.raises(WeightsError, match="missing ct2 variable 'encoder/conv1/weight'"):
    ct2.whisper_ct2_to_hf(ct2.read_ct2(str(good)))


def test_ct2_dir_to_hf_dir(hf_full, tmp_path):
  """`ct2_whisper_to_hf_dir` output loads in transformers and in our registry alike."""
  src = tmp_path / "ct2"
  src.mkdir()
  write_ct2(src / "model.bin", hf_to_ct2_names(hf_full.state_dict()),
            [("decoder/projection/weight", "decoder/embeddings/weight")])
  vocab = {f"t{i}": i for i in range(90)}
  added = [{"id": 90 + i, "content": c, "special": True, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False} for i, c in enumerate(
                ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"])]
  (src / "tokenizer.json").write_text(json.dumps({
      "version": "1.0", "added_tokens": added, "model": {"type": "WordLevel", "vocab": vocab,
                                                         "unk_token": "t0"}}))
  out = whisper.ct2_whisper_to_hf_dir(str(src), str(tmp_path / "hf"))
  gen = json.load(open(os.path.join(out, "generation_config.json")))
  assert (gen["decoder_start_token_id"], gen["eos_token_id"], gen["no_timestamps_token_id"]) == (
      91, 90, 92)
  reloaded, info = transformers.WhisperForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()), info
  for k, v in hf_full.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[k].numpy(), v.numpy(), err_msg=k)
  module, params = encoders.from_pretrained(out)
  assert module.config.d_model == 32 and "embed_positions" in params["params"]
