"""`layers.Dense` is the only weight matmul of every encoder, and a `quant` object reaches it.

A recording quantization object is handed to tiny random encoders (CLIP and SigLIP ViT with the
MAP head, DINOv2 with MLP and SwiGLU, the Whisper encoder with its two convolutions, BERT and the
CLIP/SigLIP text towers). Each forward pass must ask it for exactly one matmul per kernel in the
param tree, with that kernel's logical axes, and give the same output as without it.
"""
import collections

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from edgeglass_jax.encoders import dinov2, text, vit, whisper
from tiny import RecordingQuant


VIT = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
           num_hidden_layers=2, num_attention_heads=4)
DINO = dict(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, mlp_ratio=2)
TEXT = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
            max_positions=16)
IDS = (np.arange(12, dtype=np.int32).reshape(2, 6) % 50, np.ones((2, 6), np.int32))

CASES = {
    "clip_vit": (lambda **kw: vit.ViT(vit.ViTConfig(family="clip_vision_model", **VIT), **kw),
                 (np.ones((2, 32, 32, 3), np.float32),)),
    "siglip_vit_map_head": (
        lambda **kw: vit.ViT(vit.ViTConfig(family="siglip_vision_model",
                                           hidden_act="gelu_pytorch_tanh", **VIT), **kw),
        (np.ones((2, 32, 32, 3), np.float32),)),
    "dinov2": (lambda **kw: dinov2.Dinov2(dinov2.Dinov2Config(**DINO), **kw),
               (np.ones((2, 28, 28, 3), np.float32),)),
    "dinov2_swiglu": (lambda **kw: dinov2.Dinov2(dinov2.Dinov2Config(use_swiglu_ffn=True, **DINO),
                                                 **kw),
                      (np.ones((2, 28, 28, 3), np.float32),)),
    "whisper": (lambda **kw: whisper.WhisperEncoder(whisper.WhisperEncoderConfig(
        d_model=32, num_layers=2, num_heads=4, mlp_dim=48, n_mels=16, max_source_positions=20),
        **kw), (np.ones((2, 40, 16), np.float32),)),
    "bert": (lambda **kw: text.BertEncoder(text.BertConfig(**TEXT), **kw), IDS),
    "clip_text": (lambda **kw: text.TextTower(text.TextTowerConfig(family="clip_text_model",
                                                                    eos_token_id=2, **TEXT),
                                               **kw), IDS),
    "siglip_text": (lambda **kw: text.TextTower(text.TextTowerConfig(family="siglip_text_model",
                                                                      head_size=24, **TEXT),
                                                 **kw), IDS),
}


def _kernel_axes(boxed_params):
  """Logical axes of every leaf named "kernel" (a Dense's weight) in the boxed param tree."""
  flat = traverse_util.flatten_dict(boxed_params, is_leaf=lambda _, v: isinstance(
      v, flax.core.meta.Partitioned))
  return {path: tuple(box.names) for path, box in flat.items() if path[-1] == "kernel"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_quant_reaches_every_kernel_with_its_axes(case):
  build, inputs = CASES[case]
  quant = RecordingQuant()
  module = build(quant=quant)
  boxed = module.init(jax.random.key(0), *inputs)["params"]
  kernels = _kernel_axes(boxed)
  assert kernels, "no kernels found"
  for path, axes in kernels.items():
    assert len(axes) == 2 and all(a is not None for a in axes), (path, axes)
  variables = {"params": flax.core.meta.unbox(boxed)}
  quant.axes.clear()
  quant.calls = 0
  out = jax.jit(module.apply)(variables, *inputs)
  assert quant.calls == len(kernels), (quant.calls, sorted(kernels))
  assert collections.Counter(quant.axes) == collections.Counter(kernels.values())
  plain = jax.jit(build().apply)(variables, *inputs)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["clip_vit", "dinov2", "whisper"])
def test_patch_embedding_and_convs_are_dense_kernels(case):
  """The patch conv and Whisper's convs hold a 2-D `[window * C_in, C_out]` Dense kernel."""
  build, inputs = CASES[case]
  shapes = jax.eval_shape(build().init, jax.random.key(0), *inputs)["params"]
  flat = {"/".join(k): v.shape for k, v in
          traverse_util.flatten_dict(flax.core.meta.unbox(shapes)).items()}
  want = {"clip_vit": {"embeddings/patch_embedding/kernel": (8 * 8 * 3, 32)},
          "dinov2": {"embeddings/patch_embeddings/kernel": (7 * 7 * 3, 32)},
          "whisper": {"conv1/kernel": (3 * 16, 32), "conv2/kernel": (3 * 32, 32)}}[case]
  assert {k: flat[k] for k in want} == want
  assert all(len(s) == 2 for k, s in flat.items() if k.endswith("kernel"))


def test_quant_and_dot_general_cls_together_is_an_error():
  build, inputs = CASES["whisper"]
  module = build(quant=RecordingQuant(), dot_general_cls=lambda: jax.lax.dot_general)
  with pytest.raises(ValueError, match="either quant= or dot_general_cls="):
    module.init(jax.random.key(0), *inputs)


def test_conv_windows_equal_a_strided_convolution():
  """Whisper's im2col Dense equals `lax.conv_general_dilated` (PyTorch padding and stride)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 5)).astype(np.float32)
  w = rng.standard_normal((3, 5, 4)).astype(np.float32)  # [k, C_in, C_out]
  for stride in (1, 2):
    ref = jax.lax.conv_general_dilated(x, w, (stride,), [(1, 1)], dimension_numbers=(
        "NWC", "WIO", "NWC"), precision=jax.lax.Precision.HIGHEST)
    conv = whisper.Conv1D(4, stride=stride)
    y = conv.apply({"params": {"kernel": w.reshape(15, 4), "bias": np.zeros(4, np.float32)}},
                   jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
