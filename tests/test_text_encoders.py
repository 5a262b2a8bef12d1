"""Text towers against HF PyTorch references: BERT, CLIP and SigLIP, standalone and full models.

Tiny random HF models are saved with `save_pretrained` and loaded with
`encoders.from_pretrained`; pooled outputs and tokens must match in float32 on padded batches.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from edgeglass_jax import encoders
from edgeglass_jax.encoders import text
from edgeglass_jax.weights.hf import WeightsError

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)
TINY_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                   intermediate_size=64, image_size=32, patch_size=8)
LENGTHS = (12, 7, 3)
CLIP_EOS = 50  # not the largest id, so first-EOS pooling and argmax(input_ids) pooling differ


def _hf_model(case):
  torch.manual_seed(0)
  if case == "bert":
    return transformers.BertModel(transformers.BertConfig(**TINY, hidden_act="gelu"))
  if case == "clip_text_legacy_eos":
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY, eos_token_id=2))
  if case == "clip_text_with_projection":
    return transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TINY, eos_token_id=CLIP_EOS, projection_dim=24))
  if case == "clip_full":
    # text_config keeps CLIPTextConfig's default projection_dim (512); the model uses the top one
    return transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(TINY, eos_token_id=CLIP_EOS), vision_config=TINY_VISION,
        projection_dim=16))
  if case == "siglip_text":
    return transformers.SiglipTextModel(transformers.SiglipTextConfig(**TINY, projection_size=24))
  if case == "siglip_full":
    return transformers.SiglipModel(transformers.SiglipConfig(
        text_config=TINY, vision_config=TINY_VISION))
  raise ValueError(case)


def _batch(case, seed=0):
  """Right-padded ids `[3, 12]` and mask; CLIP rows end in their EOS token."""
  rng = np.random.default_rng(seed)
  pad = 0 if case == "bert" else 1
  ids = np.full((len(LENGTHS), max(LENGTHS)), pad, np.int64)
  mask = np.zeros_like(ids)
  for row, n in enumerate(LENGTHS):
    ids[row, :n] = rng.integers(3, 98, n)
    mask[row, :n] = 1
  if case == "clip_text_legacy_eos":
    ids[ids == 99] = 98
    ids[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1] = 99  # legacy EOT: the largest id
  elif case.startswith("clip"):
    ids[ids == CLIP_EOS] = CLIP_EOS + 1
    ids[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1] = CLIP_EOS
    ids[0, 5] = CLIP_EOS  # an earlier EOS: HF pools at the first one
  return ids, mask


ALL = ["bert", "clip_text_legacy_eos", "clip_text_with_projection", "clip_full", "siglip_text",
         "siglip_full"]


@pytest.fixture(scope="module")
def load(tmp_path_factory):
  """case -> dict(hf model, saved path, module, params, batch, jitted output), built once."""
  cache = {}

  def get(case):
    if case not in cache:
      hf_model = _hf_model(case).eval()
      path = str(tmp_path_factory.mktemp(case))
      hf_model.save_pretrained(path)
      tower = "text" if case.endswith("_full") else None
      module, params = encoders.from_pretrained(path, tower=tower)
      ids, mask = _batch(case)
      out = jax.jit(module.apply)(params, jnp.asarray(ids, jnp.int32),
                                  jnp.asarray(mask, jnp.int32))
      cache[case] = dict(case=case, hf=hf_model, path=path, tower=tower, module=module,
                         params=params, ids=ids, mask=mask, out=jax.device_get(out))
    return cache[case]

  return get


def _hf_text(hf_model):
  return getattr(hf_model, "text_model", hf_model)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("case", ALL)
def test_matches_hf_pooled_and_tokens(load, case):
  m = load(case)
  ids, mask = m["ids"], m["mask"]
  with torch.no_grad():
    ref = _hf_text(m["hf"])(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
  tokens = ref.last_hidden_state.numpy()
  if case == "bert":
    w = mask[..., None].astype(np.float32)
    mean = (tokens * w).sum(1) / np.maximum(w.sum(1), 1e-9)
    pooled = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
  else:
    pooled = ref.pooler_output.numpy()
  out = m["out"]
  assert out.tokens.shape == (len(LENGTHS), max(LENGTHS), TINY["hidden_size"])
  assert out.pooled.shape == pooled.shape
  assert _rel_err(out.tokens, tokens) < 1e-4
  assert _rel_err(out.pooled, pooled) < 1e-4


@pytest.mark.parametrize("case", ["clip_text_legacy_eos", "clip_text_with_projection",
                                  "clip_full"])
def test_clip_pools_at_the_configured_eos_position(load, case):
  """Legacy `eos_token_id == 2` configs pool at argmax(input_ids), others at the first EOS."""
  m = load(case)
  ids, out = m["ids"], m["out"]
  rows = np.arange(len(ids))
  first_eos = (ids == CLIP_EOS).argmax(-1)
  largest = ids.argmax(-1)
  want, other = (largest, first_eos) if case == "clip_text_legacy_eos" else (first_eos, largest)
  assert np.any(want != other)
  np.testing.assert_array_equal(out.pooled, out.tokens[rows, want])
  assert not np.allclose(out.pooled, out.tokens[rows, other])


@pytest.mark.parametrize("case", ["siglip_text", "siglip_full"])
def test_siglip_pools_last_position_even_when_padded(load, case):
  m = load(case)
  head, out = m["params"]["params"]["head"], m["out"]
  manual = out.tokens[:, -1] @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  assert m["mask"][:, -1].min() == 0
  np.testing.assert_allclose(out.pooled, manual, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["clip_full", "clip_text_with_projection"])
def test_projection_matches_hf_text_features(load, case):
  m = load(case)
  module, params = m["module"], m["params"]
  with torch.no_grad():
    kw = dict(input_ids=torch.as_tensor(m["ids"]), attention_mask=torch.as_tensor(m["mask"]))
    if case == "clip_full":
      ref = m["hf"].get_text_features(**kw).pooler_output.numpy()
    else:
      ref = m["hf"](**kw).text_embeds.numpy()
  got = module.apply(params, jnp.asarray(m["out"].pooled), method=module.project)
  assert got.shape == ref.shape
  assert _rel_err(got, ref) < 1e-4


@pytest.mark.parametrize("case", ["clip_text_legacy_eos", "siglip_full"])
def test_project_without_projection_is_refused(load, case):
  m = load(case)
  module = m["module"]
  with pytest.raises(ValueError, match="no text_projection"):
    module.apply(m["params"], jnp.asarray(m["out"].pooled), method=module.project)


@pytest.mark.parametrize("case", ALL)
def test_to_hf_round_trip(load, case):
  m = load(case)
  saved = safetensors.numpy.load_file(os.path.join(m["path"], "model.safetensors"))
  exported = encoders.to_hf(m["module"], m["params"])
  for name, arr in exported.items():
    assert name in saved, name
    np.testing.assert_array_equal(arr, saved[name], err_msg=name)
  left = set(saved) - set(exported)
  if case == "bert":
    assert left == {"pooler.dense.weight", "pooler.dense.bias"}
  elif case.endswith("_full"):
    assert left and all(k.startswith("vision_model.") or k in (
        "visual_projection.weight", "logit_scale", "logit_bias") for k in left), sorted(left)
  else:
    assert not left, sorted(left)


def test_padding_does_not_change_bert_embeddings(load):
  """Extra padding leaves BERT's pooled vector and its real tokens unchanged."""
  m = load("bert")
  wide_ids = np.pad(m["ids"], ((0, 0), (0, 5)))
  wide_mask = np.pad(m["mask"], ((0, 0), (0, 5)))
  wide = jax.jit(m["module"].apply)(m["params"], jnp.asarray(wide_ids), jnp.asarray(wide_mask))
  out = m["out"]
  np.testing.assert_allclose(wide.pooled, out.pooled, rtol=1e-5, atol=1e-6)
  for row, n in enumerate(LENGTHS):
    np.testing.assert_allclose(wide.tokens[row, :n], out.tokens[row, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["bert", "clip_full"])
def test_bfloat16_compute_stays_close(load, case):
  m = load(case)
  module, params = encoders.from_pretrained(m["path"], tower=m["tower"], dtype=jnp.bfloat16)
  out = jax.jit(module.apply)(params, jnp.asarray(m["ids"]), jnp.asarray(m["mask"]))
  assert out.tokens.dtype == jnp.bfloat16
  ref = m["out"].pooled
  got = np.asarray(out.pooled, np.float32)
  cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
  assert cos.min() > 0.99


@pytest.mark.parametrize("case,drop", [
    ("bert", "encoder.layer.1.output.dense.weight"),
    ("clip_full", "text_projection.weight"),
    ("siglip_full", "text_model.head.bias"),
])
def test_missing_tensor_is_named(load, tmp_path, case, drop):
  m = load(case)
  tensors = safetensors.numpy.load_file(os.path.join(m["path"], "model.safetensors"))
  del tensors[drop]
  (tmp_path / "config.json").write_text(open(os.path.join(m["path"], "config.json")).read())
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(WeightsError, match=re.escape(drop)):
    encoders.from_pretrained(str(tmp_path), tower=m["tower"])


@pytest.mark.parametrize("case,dense_layers", [("bert", 2 * 6), ("siglip_text", 2 * 6 + 1)])
def test_every_matmul_goes_through_dot_general_cls(load, case, dense_layers):
  m = load(case)
  calls = []

  def counting_dot_general(*args, **kwargs):
    calls.append(args[1].shape)
    return jax.lax.dot_general(*args, **kwargs)

  module, params = encoders.from_pretrained(m["path"], dot_general_cls=lambda: counting_dot_general)
  calls.clear()  # loading traced `init` once
  out = module.apply(params, jnp.asarray(m["ids"]), jnp.asarray(m["mask"]))
  assert len(calls) == dense_layers
  np.testing.assert_allclose(out.pooled, m["out"].pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["bert", "siglip_text"])
def test_bad_inputs_are_refused(load, case):
  m = load(case)
  module, params = m["module"], m["params"]
  with pytest.raises(ValueError, match="attention_mask shape"):
    module.apply(params, jnp.ones((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="max_position_embeddings=64"):
    module.apply(params, jnp.ones((1, 65), jnp.int32), None)
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    module.apply(params, jnp.ones((5,), jnp.int32), None)


def test_config_from_hf_rejects_unsupported():
  with pytest.raises(ValueError, match="relative_key"):
    text.BertConfig.from_hf(dict(TINY, model_type="bert", position_embedding_type="relative_key"))
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    text.TextTowerConfig.from_hf({"model_type": "gpt2"})
