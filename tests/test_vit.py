"""CLIP / SigLIP vision towers against tiny random HF PyTorch models saved with save_pretrained."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import flax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from edgeglass_jax.encoders import FAMILIES, from_pretrained, to_hf  # noqa: E402
from edgeglass_jax.encoders import vit  # noqa: E402
from edgeglass_jax.weights import WeightsError  # noqa: E402

VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)
PROJ = 24


def _make(kind):
  """A tiny HF model of `kind` with every tensor perturbed (HF zero-inits many biases)."""
  t = transformers
  if kind == "clip_vision":
    model = t.CLIPVisionModel(t.CLIPVisionConfig(**VISION))
  elif kind == "clip_vision_proj":
    model = t.CLIPVisionModelWithProjection(t.CLIPVisionConfig(**VISION, projection_dim=PROJ))
  elif kind == "clip_full":  # vision_config keeps HF's default projection_dim (512): unused
    model = t.CLIPModel(t.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=PROJ))
  elif kind == "siglip_vision":
    model = t.SiglipVisionModel(t.SiglipVisionConfig(**VISION))
  elif kind == "siglip_full":
    model = t.SiglipModel(t.SiglipConfig(vision_config=VISION, text_config=TEXT))
  else:
    raise ValueError(kind)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def _reference(model, pixels_nhwc, interpolate=False):
  """HF outputs: (pooler_output, last_hidden_state, image features) as numpy."""
  x = torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
  kw = dict(interpolate_pos_encoding=True) if interpolate else {}
  with torch.no_grad():
    tower = getattr(model, "vision_model", model)
    out = tower(pixel_values=x, **kw)
    if isinstance(model, transformers.CLIPVisionModelWithProjection):
      feats = model(pixel_values=x, **kw).image_embeds
    elif hasattr(model, "get_image_features"):
      feats = model.get_image_features(pixel_values=x, **kw).pooler_output
    else:
      feats = out.pooler_output
  return out.pooler_output.numpy(), out.last_hidden_state.numpy(), feats.numpy()


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / np.abs(b).max())


_JITTED = {}


def _apply(module, params, x, method="__call__"):
  """`module.apply` jitted once per (config, dtype, method): tests share compiled programs."""
  key = (module.config, module.dtype, method)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda p, x, m=module: m.apply(p, x, method=method))
  return _JITTED[key](params, x)


KINDS = ("clip_vision", "clip_vision_proj", "clip_full", "siglip_vision", "siglip_full")


@pytest.fixture(scope="module")
def pixels():
  return np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("vit")
  out = {}
  for kind in KINDS:
    model = _make(kind)
    model.save_pretrained(str(root / kind))
    out[kind] = (str(root / kind), model)
  model = out["clip_vision"][1]
  model.save_pretrained(str(root / "clip_sharded"), max_shard_size="20KB")
  out["clip_sharded"] = (str(root / "clip_sharded"), model)
  return out


def _load(path):
  tower = "vision" if path.endswith("_full") else None
  return from_pretrained(path, tower=tower)


@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_hf(ckpts, pixels, kind):
  path, model = ckpts[kind]
  module, params = _load(path)
  assert module.config.family == ("clip_vision_model" if kind.startswith("clip")
                                  else "siglip_vision_model")
  pooled, tokens, feats = _reference(model, pixels)
  out = _apply(module, params, pixels)
  assert out.tokens.shape == tokens.shape and out.pooled.shape == pooled.shape
  assert _rel(out.tokens, tokens) < 1e-4
  assert _rel(out.pooled, pooled) < 1e-4
  features = _apply(module, params, pixels, "image_features")
  assert features.shape == feats.shape
  assert _rel(features, feats) < 1e-4
  if kind in ("clip_vision_proj", "clip_full"):
    assert module.config.projection_dim == PROJ
    assert features.shape[-1] == PROJ
  else:
    assert module.config.projection_dim is None
    with pytest.raises(ValueError, match="no visual projection"):
      module.apply(params, out.pooled, method="project")


@pytest.mark.parametrize("kind", KINDS)
def test_to_hf_round_trip(ckpts, kind):
  path, _ = ckpts[kind]
  module, params = _load(path)
  original = load_file(os.path.join(path, "model.safetensors"))
  exported = to_hf(module, params)
  if kind == "clip_full":  # CLIPModel's own names: the projection keeps vision_model. in them
    original = {k: v for k, v in original.items()
                if k.startswith("vision_model.") or k == "visual_projection.weight"}
  elif kind == "siglip_full":  # canonical SiglipVisionModel names, without the wrapper prefix
    original = {k[len("vision_model."):]: v for k, v in original.items()
                if k.startswith("vision_model.")}
  assert set(exported) == set(original)
  for name, arr in exported.items():
    np.testing.assert_array_equal(arr, original[name], err_msg=name)


def test_sharded_checkpoint_loads_the_same(ckpts, pixels):
  path, _ = ckpts["clip_sharded"]
  assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
  _, sharded = from_pretrained(path)
  _, single = from_pretrained(ckpts["clip_vision"][0])
  jax.tree.map(np.testing.assert_array_equal, sharded, single)


def _copy(ckpts, kind, tmp_path):
  dst = str(tmp_path / kind)
  shutil.copytree(ckpts[kind][0], dst)
  return dst, os.path.join(dst, "model.safetensors")


def test_missing_tensor_is_named(ckpts, tmp_path):
  path, file = _copy(ckpts, "siglip_vision", tmp_path)
  tensors = load_file(file)
  del tensors["head.attention.in_proj_weight"]
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(WeightsError, match="head.attention.in_proj_weight"):
    from_pretrained(path)


def test_wrong_shape_is_named(ckpts, tmp_path):
  path, file = _copy(ckpts, "clip_vision", tmp_path)
  tensors = load_file(file)
  tensors["encoder.layers.1.mlp.fc1.weight"] = np.zeros((63, 32), np.float32)
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(WeightsError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight.*\(63, 32\)"):
    from_pretrained(path)


def test_unknown_model_type_is_named(ckpts, tmp_path):
  path, _ = _copy(ckpts, "clip_vision", tmp_path)
  cfg_file = os.path.join(path, "config.json")
  with open(cfg_file) as f:
    cfg = json.load(f)
  cfg["model_type"] = "dino_vision_model"
  with open(cfg_file, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(WeightsError, match="dino_vision_model"):
    from_pretrained(path)


@pytest.mark.parametrize("kind", ["clip_vision", "siglip_vision"])
def test_bf16_compute_stays_close(ckpts, pixels, kind):
  path, model = ckpts[kind]
  module, params = from_pretrained(path, dtype=jnp.bfloat16)
  pooled, tokens, _ = _reference(model, pixels)
  out = _apply(module, params, pixels)
  assert out.tokens.dtype == jnp.bfloat16 and out.pooled.dtype == jnp.bfloat16
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  assert _rel(out.tokens, tokens) < 3e-2
  assert _rel(out.pooled, pooled) < 3e-2


@pytest.mark.parametrize("kind", ["clip_vision", "siglip_vision"])
@pytest.mark.parametrize("hw", [(48, 48), (40, 24)])
def test_other_resolutions_interpolate_positions_like_hf(ckpts, kind, hw):
  path, model = ckpts[kind]
  module, params = from_pretrained(path)
  x = np.random.default_rng(1).standard_normal((2, *hw, 3)).astype(np.float32)
  pooled, tokens, _ = _reference(model, x, interpolate=True)
  out = _apply(module, params, x)
  assert out.tokens.shape == tokens.shape
  assert _rel(out.tokens, tokens) < 1e-4
  assert _rel(out.pooled, pooled) < 1e-4


def _random_variables(module, *inputs, seed=0):
  """Random params of the module's shapes, without running (slow, eager) initializers."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape).astype(np.float32),
                      flax.core.meta.unbox(shapes))


def _counting_dot_general(calls):
  def factory():
    def dot_general(lhs, rhs, dimension_numbers, *args, **kwargs):
      calls.append(rhs.shape)
      return jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)
    return dot_general
  return factory


@pytest.mark.parametrize("family,per_model", [("clip_vision_model", 1),
                                              ("siglip_vision_model", 1 + 6)])
def test_dot_general_reaches_every_matmul(family, per_model):
  """Patch embedding + 6 per block (+ 6 in SigLIP's head) go through the injected dot_general;
  also builds from a config dict without model_type, as the random-encoder path does."""
  calls = []
  module = FAMILIES[family].build(dict(VISION), dtype=jnp.float32, param_dtype=jnp.float32,
                                  dot_general_cls=_counting_dot_general(calls))
  assert module.config.family == family
  variables = _random_variables(module, *vit.dummy_inputs(module))
  calls.clear()
  jax.jit(module.apply)(variables, np.zeros((1, 32, 32, 3), np.float32))
  assert len(calls) == per_model + 6 * VISION["num_hidden_layers"]
  assert calls[0] == (8 * 8 * 3, 32)


def test_config_from_hf_picks_projection_and_head():
  base = dict(VISION, model_type="clip_vision_model")
  assert vit.ViTConfig.from_hf(base).projection_dim is None
  with_proj = dict(base, architectures=["CLIPVisionModelWithProjection"], projection_dim=16)
  assert vit.ViTConfig.from_hf(with_proj).projection_dim == 16
  composite = dict(VISION, _composite="clip", projection_dim=12)
  assert vit.ViTConfig.from_hf(composite).projection_dim == 12
  sig = vit.ViTConfig.from_hf(dict(VISION, model_type="siglip_vision_model",
                                   vision_use_head=False))
  assert (sig.use_head, sig.hidden_act, sig.layer_norm_eps) == (False, "gelu_pytorch_tanh", 1e-6)
  with pytest.raises(ValueError, match="bert"):
    vit.ViTConfig.from_hf(dict(VISION, model_type="bert"))


def test_siglip_without_head_pools_by_mean(pixels):
  cfg = vit.ViTConfig.from_hf(dict(VISION, model_type="siglip_vision_model",
                                   vision_use_head=False))
  module = vit.ViT(cfg)
  variables = _random_variables(module, pixels)
  assert "head" not in variables["params"]
  assert not any(r.hf.startswith("head.") for r in vit.hf_rules(cfg))
  out = module.apply(variables, pixels)
  np.testing.assert_allclose(out.pooled, out.tokens.mean(1), rtol=1e-6, atol=1e-6)


def test_rejects_channels_first_pixels(ckpts):
  module, params = from_pretrained(ckpts["clip_vision"][0])
  with pytest.raises(ValueError, match="NHWC"):
    module.apply(params, np.zeros((1, 3, 32, 32), np.float32))
