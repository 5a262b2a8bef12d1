"""Image preprocessing against HF's CLIP/SigLIP image processors on real images, and tokenizers.

HF's processors resize through PIL on uint8 images and do the rest in numpy; preprocess.py takes
the same steps in the same order and dtypes, so outputs agree to the bit (max abs diff 0).
"""
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402

from edgeglass_jax.data import preprocess  # noqa: E402


@pytest.fixture(scope="module")
def images():
  """astronaut 512x512, coffee 400x600 and chelsea 300x451 (non-square), camera (grayscale 2-D),
  logo (RGBA)."""
  return {name: getattr(skdata, name)()
          for name in ("astronaut", "coffee", "chelsea", "camera", "logo")}


def _hf(processor, images):
  """HF pixels as NHWC. HF refuses 2-D arrays, so grayscale goes in as a PIL "L" image."""
  images = [Image.fromarray(im) if isinstance(im, np.ndarray) and im.ndim == 2 else im
            for im in images]
  return processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


PROCESSORS = {
    "clip_default": lambda: transformers.CLIPImageProcessor(),
    "clip_small": lambda: transformers.CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36}),
    "clip_crop_larger_than_image": lambda: transformers.CLIPImageProcessor(
        size={"shortest_edge": 24}, crop_size={"height": 33, "width": 35}),
    "siglip_default": lambda: transformers.SiglipImageProcessor(),
    "siglip_nonsquare": lambda: transformers.SiglipImageProcessor(size={"height": 40,
                                                                         "width": 56}),
    "siglip_bilinear": lambda: transformers.SiglipImageProcessor(size={"height": 32, "width": 32},
                                                                 resample=2),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_matches_hf_processor(images, name):
  processor = PROCESSORS[name]()
  batch = list(images.values())
  ref = _hf(processor, batch)
  ours = preprocess.preprocess_images(batch, processor.to_dict())
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_settings_from_saved_preprocessor_config(images, tmp_path):
  processor = PROCESSORS["clip_small"]()
  processor.save_pretrained(str(tmp_path))
  assert os.path.isfile(tmp_path / preprocess.PROCESSOR_FILE)
  settings = preprocess.image_processor_config("clip_vision_model", str(tmp_path), 224)
  assert settings["crop_size"] == {"height": 36, "width": 36}
  batch = [images["coffee"], images["chelsea"]]
  np.testing.assert_allclose(preprocess.preprocess_images(batch, settings), _hf(processor, batch),
                             rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,processor", [
    ("clip_vision_model", lambda: transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
    ("siglip_vision_model", lambda: transformers.SiglipImageProcessor(
        size={"height": 32, "width": 32})),
])
def test_family_defaults_sized_for_the_model(images, tmp_path, family, processor):
  """No preprocessor_config.json: the family's defaults at the model's image size."""
  settings = preprocess.image_processor_config(family, str(tmp_path), image_size=32)
  batch = [images["astronaut"], images["coffee"]]
  np.testing.assert_allclose(preprocess.preprocess_images(batch, settings),
                             _hf(processor(), batch), rtol=0, atol=1e-5)
  by_name = preprocess.preprocess_images(batch, family.split("_")[0],
                                         **{k: settings[k] for k in ("size", "crop_size")
                                            if k in settings})
  np.testing.assert_array_equal(by_name, preprocess.preprocess_images(batch, settings))


def test_input_forms_agree(images):
  """PIL images, float images in [0, 1], [H, W, 1] arrays and a [B, H, W, 3] batch give the same
  pixels as uint8 arrays; PIL RGBA is composited onto white like HF does."""
  processor = PROCESSORS["siglip_nonsquare"]()
  cfg = processor.to_dict()
  astro, camera = images["astronaut"], images["camera"]
  ref = preprocess.preprocess_images([astro, camera], cfg)
  np.testing.assert_array_equal(
      preprocess.preprocess_images([Image.fromarray(astro), Image.fromarray(camera)], cfg), ref)
  np.testing.assert_array_equal(
      preprocess.preprocess_images([astro / 255.0, camera[..., None]], cfg), ref)
  np.testing.assert_array_equal(preprocess.preprocess_images(np.stack([astro, astro]), cfg),
                                ref[[0, 0]])
  np.testing.assert_array_equal(preprocess.preprocess_images(astro, cfg), ref[:1])
  logo = Image.fromarray(images["logo"])
  np.testing.assert_allclose(preprocess.preprocess_images([logo], cfg), _hf(processor, [logo]),
                             rtol=0, atol=1e-5)


def test_bad_inputs_are_named(images):
  with pytest.raises(ValueError, match=r"image 1: shape \(3, 32, 32\)"):
    preprocess.preprocess_images([images["astronaut"], np.zeros((3, 32, 32), np.uint8)], "clip")
  with pytest.raises(ValueError, match="image 0: values"):
    preprocess.preprocess_images([np.full((8, 8, 3), 300.5)], "siglip")
  with pytest.raises(ValueError, match="differ in shape"):
    preprocess.preprocess_images([images["astronaut"], images["coffee"]], "clip",
                                 do_center_crop=False, size=32)
  with pytest.raises(ValueError, match="'vit'"):
    preprocess.preprocess_images([images["astronaut"]], "vit")
  with pytest.raises(ValueError, match="image_processor_type"):
    preprocess.preprocess_images([images["astronaut"]], {"size": 32})


# ----------------------------------------------------------------------------- tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "the",
         "##s"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(str(path))
  return str(path)


def test_tokenize_pads_and_truncates(tokenizer_dir):
  tok = preprocess.load_tokenizer(tokenizer_dir)
  ids, mask = preprocess.tokenize(tok, ["a photo of a cat", "dogs", "the cat of the dog of a cat"],
                                  max_len=8)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (3, 8)
  np.testing.assert_array_equal(ids[0], [2, 5, 6, 7, 5, 8, 3, 0])
  np.testing.assert_array_equal(ids[1], [2, 9, 11, 3, 0, 0, 0, 0])
  np.testing.assert_array_equal(mask.sum(1), [7, 4, 8])
  assert ids[2, -1] == 3  # truncated, still ends with [SEP]
  single, _ = preprocess.tokenize(tok, "dogs", max_len=8)
  np.testing.assert_array_equal(single, ids[1:2])


def test_tokenizer_errors_name_the_directory(tmp_path):
  empty = tmp_path / "no_tokenizer"
  empty.mkdir()
  (empty / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=str(empty)):
    preprocess.load_tokenizer(str(empty))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    preprocess.load_tokenizer(str(tmp_path / "missing"))
