"""export.py: the StableHLO artifact equals the JAX int8 model bitwise and keeps its int8 dots;
the full-int8 TFLite model of a tiny QAT-trained classifier agrees with the JAX int8 model on the
predicted class for >= 98% of held-out inputs, embeddings within the README's tolerance; the CLI
exports and runs both artifacts."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from edgeglass_jax import adapters, export, quant
from tiny import ROOT, run_exported, user_env

pytest.importorskip("ai_edge_litert", reason="running .tflite files needs ai-edge-litert")

CLASSES, D, N_TEST = 8, 32, 200
# README: TFLite full-int8 embeddings (L2-normalised) within this relative L2 error of JAX int8.
TFLITE_MAX_REL, TFLITE_MEAN_REL = 0.08, 0.03


def data(n, seed):
  r = np.random.default_rng(seed)
  centers = np.random.default_rng(0).normal(size=(CLASSES, D)).astype(np.float32)
  y = r.integers(0, CLASSES, n)
  return (centers[y] + 0.6 * r.normal(size=(n, D))).astype(np.float32), y


@pytest.fixture(scope="module")
def classifier():
  """A QAT-trained int8 adapter whose first CLASSES outputs are class logits."""
  module = adapters.ModalityAdapter(adapters.AdapterConfig(kind="mlp", hidden=64, depth=1),
                                    widths=(16,), quant=quant.int8())
  x, y = data(512, 1)
  params = module.init(jax.random.key(0), x[:2])
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    def loss(p):
      logits = 10.0 * module.apply(p, x)[16][:, :CLASSES]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    value, g = jax.value_and_grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, value

  for _ in range(60):
    params, opt, _ = step(params, opt)
  cal = quant.calibrate(module, params, [(x[:N_TEST],)])
  served = quant.convert(module, params, cal)
  return quant.serving_module(module), served, x


def test_stablehlo_equals_jax_int8_bitwise(classifier, tmp_path):
  module, served, _ = classifier
  x_test, _ = data(N_TEST, 2)
  path = str(tmp_path / "m.stablehlo")
  exported = export.export_stablehlo(module, served, (x_test,), path)
  assert export.int8_dot_count(exported) == len(
      quant.BACKENDS["aqt"].converted_kernels(served["aqt"]))
  (out,) = export.StableHLORunner(path)(x_test)
  jax_int8 = jax.jit(lambda x: module.apply(served, x)[16])  # the function exported, compiled
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jax_int8(x_test)))
  eager = np.asarray(module.apply(served, x_test)[16])  # op by op: float rescales may round apart
  np.testing.assert_allclose(np.asarray(out), eager, rtol=0, atol=1e-6)


def test_tflite_int8_agrees_with_jax_int8(classifier, tmp_path):
  module, served, x_train = classifier
  x_test, y_test = data(N_TEST, 2)
  path = str(tmp_path / "m.tflite")
  size = export.export_tflite(module, served, (x_test,), path,
                              representative=[(x_train[i:i + N_TEST],) for i in (0, 200)])
  assert size == os.path.getsize(path)
  assert size < 0.5 * quant.tree_bytes(quant.dequantize(module, served)[1])  # int8, not float
  z_tfl = run_exported(path, x_test, tmp_path)
  z_jax = np.asarray(module.apply(served, x_test)[16])
  assert (z_jax[:, :CLASSES].argmax(1) == y_test).mean() > 0.9  # the classifier works
  agree = (z_tfl[:, :CLASSES].argmax(1) == z_jax[:, :CLASSES].argmax(1)).mean()
  assert agree >= 0.98, agree
  rel = np.linalg.norm(z_tfl - z_jax, axis=1) / np.linalg.norm(z_jax, axis=1)
  print(f"TFLite vs JAX int8: agree {agree:.3f}, rel L2 max {rel.max():.4f} mean {rel.mean():.4f}")
  assert rel.max() < TFLITE_MAX_REL and rel.mean() < TFLITE_MEAN_REL, (rel.max(), rel.mean())
  assert rel.mean() > 0  # TFLite re-quantized the activations: not the same numbers


def test_cli_exports_and_runs_both_artifacts(tmp_path):
  out = tmp_path / "export"
  cmd = [sys.executable, "-m", "edgeglass_jax.export", "export",
         "--factory=edgeglass_jax.export:demo_classifier", "--arg=qat", f"--out={out}"]
  res = subprocess.run(cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  report = json.loads((out / "export.json").read_text())
  assert report["stablehlo"]["int8_dots"] == 4  # in_proj, fc1, fc2 and the head's proj_16
  assert report["serving_tree"]["int8_bytes"] > 0.8 * report["serving_tree"]["bytes"]
  spec = export.demo_classifier("qat")
  want = np.asarray(jax.jit(lambda x: spec.module.apply(spec.variables, x)[16])(*spec.example))
  for name in ("model.stablehlo", "model.tflite"):
    res = subprocess.run([sys.executable, "-m", "edgeglass_jax.export", "run", str(out / name),
                          f"--input={out / 'example_0.npy'}", f"--output={out / name}.npz"],
                         cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = np.load(f"{out / name}.npz")["arr_0"]
    if name == "model.stablehlo":  # compiled by another process with other XLA flags
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    else:
      assert np.linalg.norm(got - want) / np.linalg.norm(want) < TFLITE_MAX_REL
  with pytest.raises(ValueError, match="no function 'nope'"):
    export.load_factory("edgeglass_jax.export:nope")
