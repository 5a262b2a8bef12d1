"""Model inputs from raw examples: images -> normalised NHWC pixels, texts -> token ids.

Images follow HF's image processors step for step (PIL backend), so pixels match what the
PyTorch reference models were fed:
- CLIP (`CLIPImageProcessor`): resize the shortest edge (bicubic), center-crop, rescale 1/255,
  normalise with the OpenAI mean/std.
- SigLIP (`SiglipImageProcessor`): resize straight to (height, width) (bicubic: HF's default and
  the released checkpoints' `resample: 3`), rescale, normalise with mean = std = 0.5.
- DINOv2 (`BitImageProcessor`, what DINOv2 checkpoints name): the CLIP steps; the `dinov2`
  family's defaults are facebook/dinov2-*'s settings (shortest edge 256, center crop 224,
  ImageNet mean/std), while a processor config naming `BitImageProcessor` starts from that
  class's own defaults (shortest edge 224, OpenAI mean/std), as HF does.
Settings come from a `preprocessor_config.json` when there is one, else the family's defaults.
Resizing happens on uint8 images through PIL, as in HF's PIL backend (`*ImageProcessorPil`, what
transformers 5 uses without torchvision); the rest is numpy.

`sized_settings` moves a processor to another input size keeping its resize-to-crop ratio: for
DINOv2 a configured size s means shortest edge round(s * 256 / 224), then a center crop s.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESCALE = 1 / 255
_BICUBIC = 3

_DEFAULTS = {
    "clip": dict(image_processor_type="CLIPImageProcessor", do_resize=True,
                 size={"shortest_edge": 224}, resample=_BICUBIC, do_center_crop=True,
                 crop_size={"height": 224, "width": 224}, do_rescale=True,
                 rescale_factor=_RESCALE, do_normalize=True, image_mean=CLIP_MEAN,
                 image_std=CLIP_STD),
    "siglip": dict(image_processor_type="SiglipImageProcessor", do_resize=True,
                   size={"height": 224, "width": 224}, resample=_BICUBIC, do_center_crop=False,
                   do_rescale=True, rescale_factor=_RESCALE, do_normalize=True,
                   image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
    "bit": dict(image_processor_type="BitImageProcessor", do_resize=True,
                size={"shortest_edge": 224}, resample=_BICUBIC, do_center_crop=True,
                crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=_RESCALE,
                do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD),
}
# facebook/dinov2-small's preprocessor_config.json (the same for every DINOv2 size).
DINOV2_PROCESSOR = dict(image_processor_type="BitImageProcessor", do_resize=True,
                        size={"shortest_edge": 256}, resample=_BICUBIC, do_center_crop=True,
                        crop_size={"height": 224, "width": 224}, do_rescale=True,
                        rescale_factor=_RESCALE, do_normalize=True,
                        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                        do_convert_rgb=True)
_DEFAULTS["dinov2"] = {k: v for k, v in DINOV2_PROCESSOR.items() if k != "do_convert_rgb"}
_ALIASES = {"clip": "clip", "clip_vision_model": "clip", "clipimageprocessor": "clip",
            "clipimageprocessorfast": "clip", "clipimageprocessorpil": "clip",
            "clipfeatureextractor": "clip", "siglip": "siglip", "siglip_vision_model": "siglip",
            "siglipimageprocessor": "siglip", "siglipimageprocessorfast": "siglip",
            "siglipimageprocessorpil": "siglip", "bit": "bit", "bitimageprocessor": "bit",
            "bitimageprocessorfast": "bit", "bitimageprocessorpil": "bit", "dinov2": "dinov2"}
PROCESSOR_FILE = "preprocessor_config.json"


def _kind(name: str) -> str:
  kind = _ALIASES.get(str(name).lower())
  if kind is None:
    raise ValueError(f"no image preprocessing known for {name!r}; use a family "
                     f"({sorted(set(_ALIASES))[:4]}...) or a preprocessor_config.json dict")
  return kind


def _size_dict(value, square: bool, key: str) -> Dict[str, int]:
  """HF's `get_size_dict`: an int means the shortest edge (`square=False`) or a square."""
  if isinstance(value, dict):
    return {k: int(v) for k, v in value.items() if v is not None}
  if isinstance(value, (int, np.integer)):
    return {"height": int(value), "width": int(value)} if square else {"shortest_edge": int(value)}
  if isinstance(value, (list, tuple)) and len(value) == 2:
    return {"height": int(value[0]), "width": int(value[1])}
  raise ValueError(f"preprocessor setting {key}={value!r} is not an int, [h, w] or a dict")


def image_processor_settings(family_or_config: Union[str, Dict[str, Any]],
                             **overrides) -> Dict[str, Any]:
  """Complete image settings: family defaults, then a processor config dict, then `overrides`.

  `family_or_config`: "clip" / "siglip" / a vision `model_type`, or a `preprocessor_config.json`
  dict (its `image_processor_type` picks the defaults; a `family` key may do so instead).
  """
  config = {}
  if isinstance(family_or_config, dict):
    config = dict(family_or_config)
    candidates = [config.get(k) for k in ("image_processor_type", "feature_extractor_type",
                                          "family") if config.get(k)]
    known = [c for c in candidates if str(c).lower() in _ALIASES]
    name = known[0] if known else (candidates[0] if candidates else None)
    if name is None:
      raise ValueError("preprocessor config has no image_processor_type (nor family); cannot "
                       "tell CLIP, SigLIP and BiT/DINOv2 preprocessing apart")
  else:
    name = family_or_config
  settings = dict(_DEFAULTS[_kind(name)])
  settings.update({k: v for k, v in config.items() if v is not None})
  settings.update(overrides)
  settings["size"] = _size_dict(settings["size"], square=False, key="size")
  if settings.get("do_center_crop"):
    settings["crop_size"] = _size_dict(settings.get("crop_size", settings["size"]), square=True,
                                       key="crop_size")
  return settings


def sized_settings(settings: Dict[str, Any], image_size: int) -> Dict[str, Any]:
  """`settings` (resolved) for a model input of `image_size` x `image_size` pixels.

  With a center crop, the crop becomes `image_size` and a shortest-edge resize keeps its ratio
  to the crop (DINOv2's 256/224: 112 -> resize 128, crop 112; CLIP's 1: both `image_size`);
  without one, a (height, width) resize becomes `image_size` square. A size that is not a
  multiple of the model's patch still works: the patch conv drops the bottom/right remainder.
  """
  n = int(image_size)
  if n <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  out = dict(settings)
  size = dict(out["size"])
  if out.get("do_center_crop"):
    crop = out["crop_size"]
    if "shortest_edge" in size:
      ratio = size["shortest_edge"] / min(crop["height"], crop["width"])
      size["shortest_edge"] = int(round(n * ratio))
      size.pop("longest_edge", None)
    else:
      size = {"height": n, "width": n}
    out["crop_size"] = {"height": n, "width": n}
  else:
    size = {"height": n, "width": n}
  out["size"] = size
  return out


def image_processor_config(family: str, path: Optional[str] = None,
                           image_size: Optional[int] = None) -> Dict[str, Any]:
  """Settings for a model: `path/preprocessor_config.json` when present, else the family's
  defaults sized for `image_size` (`sized_settings`: CLIP shortest edge and crop; SigLIP height
  and width; DINOv2 shortest edge round(size * 256 / 224) and crop)."""
  if path is not None:
    file = path if path.endswith(".json") else os.path.join(path, PROCESSOR_FILE)
    if os.path.isfile(file):
      try:
        with open(file) as f:
          config = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
      config.setdefault("family", family)
      return image_processor_settings(config)
  settings = image_processor_settings(family)
  return settings if image_size is None else sized_settings(settings, image_size)


def _as_rgb_uint8(image: Any, index: int) -> np.ndarray:
  """One image -> uint8 `[H, W, 3]`, as HF's `convert_to_rgb` (alpha composited onto white).

  Accepts PIL images and `[H, W]`, `[H, W, 1|3|4]` arrays: uint8, integer-valued in [0, 255], or
  floats in [0, 1] (scaled by 255 and rounded).
  """
  from PIL import Image
  if isinstance(image, Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      rgba = image.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image {index}: shape {arr.shape} is not [H, W], [H, W, 1], [H, W, 3] or "
                     "[H, W, 4] (channels last)")
  if arr.size == 0:
    raise ValueError(f"image {index}: empty image of shape {arr.shape}")
  if arr.dtype != np.uint8:
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
      raise ValueError(f"image {index}: unsupported dtype {arr.dtype}")
    if np.all(arr == np.round(arr)) and arr.min() >= 0 and arr.max() <= 255:
      arr = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating) and arr.min() >= 0 and arr.max() <= 1:
      arr = np.round(arr.astype(np.float64) * 255).astype(np.uint8)
    else:
      raise ValueError(f"image {index}: values in [{arr.min()}, {arr.max()}] are neither uint8 "
                       "range [0, 255] nor floats in [0, 1]")
  if arr.shape[-1] == 1:
    return np.repeat(arr, 3, axis=-1)
  if arr.shape[-1] == 4:
    alpha = arr[..., 3:4] / 255
    return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return arr


def _resize_shape(h: int, w: int, size: Dict[str, int]) -> Tuple[int, int]:
  """Output (height, width) of HF's PIL-backend resize for a size dict."""
  if "shortest_edge" in size and "longest_edge" in size:
    short, longest = size["shortest_edge"], size["longest_edge"]
    lo, hi = float(min(h, w)), float(max(h, w))
    raw = None
    if hi / lo * short > longest:
      raw = longest * lo / hi
      short = int(round(raw))
    if (h <= w and h == short) or (w <= h and w == short):
      return h, w
    if w < h:
      return (int(raw * h / w) if raw is not None else int(short * h / w)), short
    return short, (int(raw * w / h) if raw is not None else int(short * w / h))
  if "shortest_edge" in size:
    s = size["shortest_edge"]
    short, long_ = (w, h) if w <= h else (h, w)
    new_long = int(s * long_ / short)
    return (new_long, s) if w <= h else (s, new_long)
  if "height" in size and "width" in size:
    return size["height"], size["width"]
  raise ValueError(f"preprocessor size {size} has neither shortest_edge nor height and width")


def _center_crop(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """HF's `center_crop` on `[H, W, C]`: zero-pads first when the image is smaller."""
  h, w = img.shape[:2]
  top, left = (h - height) // 2, (w - width) // 2
  if top >= 0 and left >= 0:
    return img[top:top + height, left:left + width]
  nh, nw = max(height, h), max(width, w)
  canvas = np.zeros((nh, nw) + img.shape[2:], img.dtype)
  pad_top, pad_left = int(np.ceil((nh - h) / 2)), int(np.ceil((nw - w) / 2))
  canvas[pad_top:pad_top + h, pad_left:pad_left + w] = img
  top, left = top + pad_top, left + pad_left
  return canvas[max(0, top):min(nh, top + height), max(0, left):min(nw, left + width)]


def preprocess_image(image: Any, settings: Dict[str, Any], index: int = 0) -> np.ndarray:
  """One image -> float32 `[H', W', 3]` with fully resolved `settings`."""
  from PIL import Image
  img = _as_rgb_uint8(image, index)
  if settings.get("do_resize", True):
    h, w = _resize_shape(img.shape[0], img.shape[1], settings["size"])
    resample = Image.Resampling(int(settings.get("resample", _BICUBIC)))
    img = np.array(Image.fromarray(img).resize((w, h), resample=resample))
  if settings.get("do_center_crop"):
    img = _center_crop(img, settings["crop_size"]["height"], settings["crop_size"]["width"])
  if settings.get("do_rescale", True):
    img = (img.astype(np.float64) * float(settings["rescale_factor"])).astype(np.float32)
  img = img.astype(np.float32)
  if settings.get("do_normalize", True):
    mean = np.broadcast_to(np.asarray(settings["image_mean"], np.float32), (3,))
    std = np.broadcast_to(np.asarray(settings["image_std"], np.float32), (3,))
    img = (img - mean) / std
  return img


def preprocess_images(images: Union[Any, Sequence[Any]],
                      family_or_processor_config: Union[str, Dict[str, Any]],
                      **overrides) -> np.ndarray:
  """Images -> float32 `[B, H, W, 3]` (NHWC) ready for `ViT`.

  `images`: a list of PIL images / arrays (see `_as_rgb_uint8`), one image, or a `[B, H, W, C]`
  array. `family_or_processor_config`: a family name or a processor config dict (e.g. from
  `image_processor_config`); `overrides` replace single settings (`size=`, `resample=`, ...).
  """
  from PIL import Image
  settings = image_processor_settings(family_or_processor_config, **overrides)
  if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
    images = [images]
  if len(images) == 0:
    raise ValueError("preprocess_images got no images")
  out = [preprocess_image(img, settings, i) for i, img in enumerate(images)]
  shapes = sorted({o.shape for o in out})
  if len(shapes) > 1:
    raise ValueError(f"preprocessed images differ in shape {shapes}: set a fixed size (height and "
                     "width, or a center crop)")
  return np.stack(out)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


_WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def wordpiece_tokenizer(vocab_file: str):
  """A BERT-style fast tokenizer (lowercase, WordPiece, `[CLS] ... [SEP]`, `[PAD]`/`[UNK]`) built
  from a bare `vocab.txt` (one token per line, id = line number), as `save_pretrained` of
  `BertTokenizerFast` on the same file would give.

  The path is passed positionally: transformers 4 names that argument `vocab_file`, 5 names it
  `vocab`, and 5 silently ignores a `vocab_file=` keyword (every token becomes `[UNK]`).
  """
  with open(vocab_file, encoding="utf-8") as f:
    tokens = [line.rstrip("\n") for line in f]
  missing = [t for t in _WORDPIECE_SPECIALS if t not in tokens]
  if missing:
    raise ValueError(f"{vocab_file}: a WordPiece vocabulary needs the special tokens "
                     f"{list(_WORDPIECE_SPECIALS)}; missing {missing}")
  from transformers import BertTokenizerFast
  tokenizer = BertTokenizerFast(vocab_file, do_lower_case=True)
  first, last = tokens.index("[UNK]"), len(tokens) - 1
  if (tokenizer.convert_tokens_to_ids("[UNK]") != first
      or tokenizer.convert_tokens_to_ids(tokens[last]) != last):
    raise ValueError(f"{vocab_file}: the installed transformers did not read this vocabulary "
                     f"(token {tokens[last]!r} should have id {last})")
  return tokenizer


def load_tokenizer(path: str):
  """A tokenizer from a local directory only; never downloads.

  `transformers.AutoTokenizer` reads a saved tokenizer (`tokenizer.json` or
  `tokenizer_config.json` with its files); a directory holding only a BERT `vocab.txt` gets
  `wordpiece_tokenizer` (transformers 5's AutoTokenizer refuses such a directory).
  """
  if not path:
    raise FileNotFoundError("no tokenizer directory given (set the encoder's `tokenizer` path)")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: tokenizer directory does not exist")
  if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    raise FileNotFoundError(f"{path}: no tokenizer files (looked for "
                            f"{', '.join(_TOKENIZER_FILES)})")
  saved = ("tokenizer.json", "tokenizer_config.json")
  vocab = os.path.join(path, "vocab.txt")
  if os.path.isfile(vocab) and not any(os.path.isfile(os.path.join(path, f)) for f in saved):
    return wordpiece_tokenizer(vocab)
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    raise FileNotFoundError(f"{path}: cannot load a tokenizer from this directory ({e})") from e


def tokenize(tokenizer, texts: Union[str, Sequence[str]],
             max_len: int) -> Tuple[np.ndarray, np.ndarray]:
  """Texts -> `(input_ids [B, max_len], attention_mask [B, max_len])` int32, padded to `max_len`
  (fixed shapes compile once; SigLIP was trained on max-length padding) and truncated."""
  if isinstance(texts, str):
    texts = [texts]
  enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=int(max_len),
                  return_tensors="np")
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
