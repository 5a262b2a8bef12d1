"""Linear probes of a feature cache (`edgeglass_jax.probe`): the ridge solution against its
primal formula in float64, and a hand-made cache whose CLS token alone holds the colour."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgeglass_jax import probe
from edgeglass_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dims", [3, 40])
def test_ridge_matches_the_primal_formula_in_either_form(dims):
  """`_fit` solves the dual when D > N: its weights equal (X'X + lam I)^-1 X'Y of the centred
  X and Y, its bias the targets' mean less the features' mean through them (so a shift of
  every feature moves the bias, not the predictions)."""
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((12, dims)) + 3.0, rng.integers(0, 3, 12)
  w, b = probe._fit(x, y, 3, 0.7)
  targets = np.eye(3)[y]
  xc, tc = x - x.mean(0), targets - targets.mean(0)
  ref = np.linalg.inv(xc.T @ xc + 0.7 * np.eye(dims)) @ xc.T @ tc
  np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(b, targets.mean(0) - x.mean(0) @ ref, rtol=1e-9, atol=1e-12)
  w2, b2 = probe._fit(x - 5.0, y, 3, 0.7)
  np.testing.assert_allclose((x - 5.0) @ w2 + b2, x @ w + b, rtol=1e-9, atol=1e-9)


def test_ridge_probe_reads_a_linear_label_and_not_noise():
  rng = np.random.default_rng(1)
  y_tr, y_te = rng.integers(0, 4, 200), rng.integers(0, 4, 100)
  centres = rng.standard_normal((4, 8)) * 3
  x_tr = centres[y_tr] + rng.standard_normal((200, 8))
  x_te = centres[y_te] + rng.standard_normal((100, 8))
  acc, lam = probe.ridge_probe(x_tr, y_tr, x_te, y_te)
  assert acc > 0.95 and lam in probe.LAMBDAS
  noise, _ = probe.ridge_probe(rng.standard_normal((200, 8)), y_tr, x_te, y_te)
  assert noise < 0.5
  with pytest.raises(ValueError, match="not all finite"):
    probe.ridge_probe(np.full((10, 2), np.nan), y_tr[:10], x_te[:, :2], y_te)
  with pytest.raises(ValueError, match="10 / 100 rows but 200 / 100 labels"):
    probe.ridge_probe(x_tr[:10], y_tr, x_te, y_te)


def _write_cache(root, split, n, seed):
  """A cache whose image token 0 is the one-hot colour (plus noise), the other tokens and the
  pooled vectors noise."""
  rng = np.random.default_rng(seed)
  groups = rng.integers(0, synthetic.NUM_GROUPS, n).astype(np.int32)
  colours = np.array([synthetic.VOCAB["color"].index(synthetic.attributes_of(int(g)).color)
                      for g in groups])
  tokens = rng.standard_normal((n, 5, 16)).astype(np.float32) * 0.1
  tokens[np.arange(n), 0, colours] += 1.0
  d = os.path.join(root, split)
  os.makedirs(d)
  save_file({"group": groups, "image/tokens": tokens,
             "image/pooled": rng.standard_normal((n, 16)).astype(np.float32),
             "image/token_mask": np.ones((n, 5), bool), "image/valid": np.ones(n, bool)},
            os.path.join(d, "shard-00000.safetensors"))
  with open(os.path.join(d, "shard-00000.json"), "w") as f:
    json.dump({"ids": [f"{split}-{i}" for i in range(n)], "count": n, "start": 0}, f)
  with open(os.path.join(d, "index.json"), "w") as f:
    json.dump({"num_examples": n, "num_shards": 1, "modalities": ["image"],
               "shards": [{"file": "shard-00000.safetensors", "start": 0, "count": n}]}, f)


def test_probe_cache_finds_the_colour_in_the_cls_token_only(tmp_path):
  _write_cache(tmp_path, "train", 300, 0)
  _write_cache(tmp_path, "test", 100, 1)
  m = probe.probe_cache(str(tmp_path))
  assert m["image/first/color"] > 0.95
  assert m["image/pooled/color"] < 0.4
  assert 0 < m["image/majority/color"] < 0.5
  assert set(m) == {f"image/{v}/{a}" for v in probe.VIEWS + ("majority",)
                    for a in synthetic.ATTRIBUTE_NAMES}
  assert "image/first" in probe.format_probes(m)
  with pytest.raises(ValueError, match=r"views \['cls'\] are not among"):
    probe.probe_cache(str(tmp_path), views=("cls",))


def test_cli_names_a_missing_cache(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "edgeglass_jax.probe",
                         f"--features={tmp_path}/nope"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and f"{tmp_path}/nope/train: no index.json" in proc.stderr


def test_adam_learns_a_low_variance_label_faster_once_whitened():
  """A label carried by one direction of tiny variance beside loud nuisance directions: a ridge
  probe reads it either way, Adam's first layer finds it within 50 steps only once whitened."""
  rng = np.random.default_rng(0)

  def draw(n):
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 8)) * 10.0
    x[:, 3] = (y * 2 - 1) * 0.05 + rng.normal(size=n) * 0.01
    return x, y

  (xa, ya), (xb, yb) = draw(600), draw(200)
  raw = probe.adam_curve(xa, ya, xb, yb, steps=(50,))
  white = probe.adam_curve(xa, ya, xb, yb, steps=(50,), shrinkage=0.0)
  assert white[50] >= 0.95 and raw[50] <= white[50] - 0.2, (raw, white)
  assert probe.ridge_probe(xa, ya, xb, yb)[0] >= 0.95
