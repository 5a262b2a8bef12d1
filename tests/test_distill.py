"""EdgeVL distillation: curation, the two-view student end to end on a tiny align teacher
(stage 1, resume, stage 2 with int8 QAT from stage 1's workdir) and the named errors."""
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from edgeglass_jax import configs
from edgeglass_jax import main as entry
from edgeglass_jax.tasks import distill, loop
from tiny import ROOT, run_exported, snapshot, tiny_align_config


def _distill_config(arg):
  return configs.load(os.path.join(ROOT, "configs", "distill.py") + ":" + arg)


def test_curate_keeps_exactly_the_top_fraction():
  rng = np.random.default_rng(0)
  conf = rng.random(203)
  for tau in (0.25, 0.5, 0.1, 1.0):
    keep = distill.curate(conf, tau)
    k = int(round(tau * 203))
    assert len(keep) == k and np.all(np.diff(keep) > 0)
    assert conf[keep].min() >= np.sort(conf)[::-1][k - 1]
    rest = np.setdiff1d(np.arange(203), keep)
    assert rest.size == 0 or conf[rest].max() <= conf[keep].min()
  ties = np.array([0.5, 0.9, 0.5, 0.5, 0.1])
  np.testing.assert_array_equal(distill.curate(ties, 0.4), [0, 1])  # ties: lower index first
  assert distill.curate(ties, 0.01).tolist() == [1]
  with pytest.raises(ValueError, match="tau must be in"):
    distill.curate(conf, 0.0)


def test_zero_shot_confidence():
  """Softmax of 100 x cosine, max over classes; several tasks multiply and combine labels."""
  z = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
  p = np.array([[1.0, 0.0], [0.0, 1.0]])
  conf, label = distill.zero_shot_confidence(z, [p])
  np.testing.assert_array_equal(label, [0, 1, 1])
  logits = 100 * z @ p.T
  want = np.exp(logits).max(1) / np.exp(logits).sum(1)
  np.testing.assert_allclose(conf, want, rtol=1e-12)
  q = np.array([[0.0, 1.0], [1.0, 0.0], [0.7, 0.7]])
  conf2, label2 = distill.zero_shot_confidence(z, [p, q])
  _, lq = distill.zero_shot_confidence(z, [q])
  np.testing.assert_array_equal(label2, label * 3 + lq)
  np.testing.assert_allclose(conf2, conf * distill.zero_shot_confidence(z, [q])[0])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A tiny align run (random encoders, pooled MLP adapters) and its config as JSON."""
  tmp = str(tmp_path_factory.mktemp("teacher"))
  config = tiny_align_config(tmp, n=48, steps=4)
  for m in ("image", "audio", "text"):
    config.model.adapters[m].kind = "mlp"
  workdir = os.path.join(tmp, "align")
  entry.run(config, workdir)
  path = os.path.join(tmp, "teacher.json")
  with open(path, "w") as f:
    f.write(config.to_json())
  return workdir, path


def make_config(teacher, arg="tiny", **distill_overrides):
  config = _distill_config(arg)
  config.distill.teacher_workdir, config.distill.teacher_config = teacher
  config.distill.width = 32
  config.distill.tau = 0.5
  config.student.image_size = 32
  for k, v in distill_overrides.items():
    config.distill[k] = v
  return config


@pytest.fixture(scope="module")
def stage1(teacher, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage1"))
  return entry.run(make_config(teacher), workdir), workdir


def test_stage1_results(stage1):
  result, workdir = stage1
  m = result["metrics"]
  assert result["step"] == 8
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["task"] == "distill"
  for view in ("rgb", "depth"):
    for attr in ("color", "shape", "size", "position", "mean"):
      assert 0.0 <= m[f"zeroshot/{view}/{attr}"] <= 1.0
      assert 0.0 <= m[f"int8/zeroshot/{view}/{attr}"] <= 1.0
    for k in ("R@1", "R@5", "R@10", "mAP"):
      assert 0.0 <= m[f"{view}_to_text/{k}"] <= 1.0
  assert "teacher/zeroshot/rgb/mean" in m and "teacher/zeroshot/depth/mean" not in m
  assert m["curation/kept"] == 24 and m["curation/of"] == 48
  for b in (1, 32):
    assert m[f"latency/float32/b{b}_ms"] > 0 and m[f"latency/int8/b{b}_ms"] > 0
  # Stage 1 is float: its int8 row is post-training quantization, int8 kernels ~4x smaller.
  served = load_file(os.path.join(workdir, "student_int8.safetensors"))
  assert any(v.dtype == np.int8 for v in served.values())
  assert not any(k.endswith("/kernel") and v.dtype != np.int8 for k, v in served.items())
  assert m["size/float32_MB"] / m["size/int8_MB"] > 3.0
  assert os.path.getsize(os.path.join(workdir, "student_float32.safetensors")) == pytest.approx(
      m["size/float32_MB"] * 2**20)
  # Both views train: the L1 of each went down from the random student's.
  assert m["train/l1/rgb"] < 0.2 and m["train/l1/depth"] < 0.2


def test_stage1_resume_is_a_no_op(stage1, teacher):
  _, workdir = stage1
  before = {k: v for k, v in snapshot(workdir).items() if "checkpoints" in k}
  again = entry.run(make_config(teacher), workdir)
  assert again["step"] == 8
  after = {k: v for k, v in snapshot(workdir).items() if "checkpoints" in k}
  assert before == after
  np.testing.assert_allclose(again["metrics"]["zeroshot/rgb/mean"],
                             stage1[0]["metrics"]["zeroshot/rgb/mean"])


@pytest.fixture(scope="module")
def stage2(stage1, teacher, tmp_path_factory):
  config = make_config(teacher, "tiny,stage2", init_workdir=stage1[1])
  workdir = str(tmp_path_factory.mktemp("stage2"))
  return config, entry.run(config, workdir), workdir


def test_stage2_int8_qat_from_stage1(stage1, stage2, tmp_path):
  config, result, _ = stage2
  assert config.quant.kind == "int8"
  from edgeglass_jax import sharding
  parts = distill.build(config, str(tmp_path), sharding.make_mesh(config.mesh))
  start = parts.task.init_params(jax.random.key(0))
  stage1_params = load_file(os.path.join(stage1[1], "student_float32.safetensors"))
  from flax import linen as nn, traverse_util
  flat = traverse_util.flatten_dict(nn.meta.unbox(start))
  assert {"/".join(k) for k in flat} == set(stage1_params)
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(v), stage1_params["/".join(k)])
  m = result["metrics"]
  assert result["step"] == 8 and "train/triplet/rgb" in m
  # The QAT model converted to int8 serves what it was evaluated as in training (SERVE == TRAIN).
  for view in ("rgb", "depth"):
    assert m[f"int8/zeroshot/{view}/mean"] == m[f"zeroshot/{view}/mean"]
    assert m[f"int8/{view}_to_text/mAP"] == pytest.approx(m[f"{view}_to_text/mAP"], abs=1e-6)


def test_export_int8_student(stage2, tmp_path):
  """StableHLO equals the JAX int8 student bitwise; the full-int8 TFLite model predicts the
  same zero-shot class (4 attributes) for >= 98% of the images of both views."""
  pytest.importorskip("ai_edge_litert", reason="running .tflite files needs ai-edge-litert")
  from edgeglass_jax import export, sharding
  config, _, workdir = stage2
  assert distill.export_spec(f"{workdir},1").example[0].shape == (1, 32, 32, 3)
  spec = distill.export_spec(workdir)
  t = distill.load_teacher(config.distill, sharding.make_mesh(config.mesh))
  batches = [distill.load_views(t, s).get_batch(np.arange(n)) for s, n in (("train", 48),
                                                                             ("test", 16))]
  x = np.concatenate([np.asarray(distill.view_pixels(b, v)) for b in batches
                      for v in ("rgb", "depth")])
  assert x.shape == (128, 32, 32, 3)
  module, served = spec.module, spec.variables
  jax_int8 = np.asarray(jax.jit(lambda x: module.apply(served, x))(x))
  path = str(tmp_path / "student.stablehlo")
  exported = export.export_stablehlo(module, served, (x,), path)
  assert export.int8_dot_count(exported) > 0
  np.testing.assert_array_equal(np.asarray(export.StableHLORunner(path)(x)[0]), jax_int8)
  calib = np.load(os.path.join(workdir, "calibration.npz"))["pixels"]
  representative = [(np.resize(calib, x.shape),)]  # the run's calibration images, tiled
  tfl = str(tmp_path / "student.tflite")
  export.export_tflite(module, served, (x,), tfl, representative=representative)
  z_tfl = run_exported(tfl, x, tmp_path)
  agree = [np.argmax(z_tfl @ p.T, 1) == np.argmax(jax_int8 @ p.T, 1) for p in t.prompts.values()]
  rate = float(np.mean(agree))
  rel = np.linalg.norm(z_tfl - jax_int8, axis=1) / np.linalg.norm(jax_int8, axis=1)
  print(f"TFLite vs JAX int8 student: same class {rate:.3f}, rel L2 mean {rel.mean():.4f} "
        f"max {rel.max():.4f}")
  assert rate >= 0.98, rate


def test_named_errors(teacher, stage1, tmp_path):
  with pytest.raises(ValueError, match="needs distill.init_workdir"):
    entry.run(make_config(teacher, "tiny,stage2"), str(tmp_path / "a"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(distill.TeacherError, match="lacks split"):
    entry.run(make_config((str(empty), teacher[1])), str(tmp_path / "b"))
  with pytest.raises(distill.TeacherError, match="is not a width"):
    entry.run(make_config(teacher, width=48), str(tmp_path / "c"))
  with pytest.raises(ValueError, match="unknown ARG words"):
    _distill_config("stage3")
  # Stage 1's workdir resumed with another student is refused before anything is written.
  before = snapshot(stage1[1])
  config = make_config(teacher)
  config.student.layers = 3
  with pytest.raises(loop.CheckpointMismatchError):
    entry.run(config, stage1[1])
  assert snapshot(stage1[1]) == before


def test_assistant_bridge_starts_from_the_align_run(teacher):
  """`config.bridge.init_from_align`: the bridge's per-token MLP projectors start as the align
  run's trained adapter projectors (the head is left out); a bridge of other sizes is a named
  mismatch; a kind the align run did not train starts fresh."""
  from flax import linen as nn
  from edgeglass_jax import sharding
  from edgeglass_jax.tasks import assistant
  workdir, path = teacher
  config = configs.load(os.path.join(ROOT, "configs", "assistant.py") + ":caption,tiny")
  config.bridge.init_from_align, config.bridge.align_config = workdir, path
  for m in ("image", "audio"):
    config.bridge[m].update(kind="mlp", hidden=32, depth=1)
  aligned = assistant.aligned_adapters(config, sharding.make_mesh(config.mesh))
  assert sorted(aligned) == ["audio", "image"]
  assert all("head" in aligned[m] for m in aligned)
  dims = {m: (5, aligned[m]["projector"]["in_proj"]["kernel"].shape[0]) for m in aligned}
  model, lm_vars, _ = assistant.build_model(config, dims)
  tree = nn.meta.unbox(assistant.init_trainable(model, lm_vars, dims, config, jax.random.key(0),
                                                aligned=aligned))
  for m in aligned:
    jax.tree.map(np.testing.assert_array_equal, tree["bridge"]["params"][m]["projector"],
                 aligned[m]["projector"])
  fresh = nn.meta.unbox(assistant.init_trainable(model, lm_vars, dims, config, jax.random.key(0)))
  np.testing.assert_array_equal(tree["bridge"]["params"]["image"]["to_lm"]["kernel"],
                                fresh["bridge"]["params"]["image"]["to_lm"]["kernel"])
  config.bridge.image.hidden = 48
  model, lm_vars, _ = assistant.build_model(config, dims)
  with pytest.raises(loop.CheckpointMismatchError, match=r"image adapter.*projector"):
    assistant.init_trainable(model, lm_vars, dims, config, jax.random.key(0), aligned=aligned)
  config.bridge.image.update(kind="perceiver", hidden=32)
  assert sorted(assistant.aligned_adapters(config, sharding.make_mesh(config.mesh))) == ["audio"]
