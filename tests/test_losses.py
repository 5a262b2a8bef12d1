"""Losses against float64 numpy loops written here; gradients against finite differences."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeglass_jax import losses as L

N, D = 16, 8

# Jitted once per shape: cheaper than op-by-op dispatch for these many small calls.
sigmoid_loss = jax.jit(L.sigmoid_loss)
softmax_loss = jax.jit(L.softmax_contrastive_loss)
cycle_loss = jax.jit(L.cycle_loss)
cyclip_loss = jax.jit(L.cyclip_loss, static_argnames=("batch_scaled",))
triplet_loss = jax.jit(L.semi_hard_triplet_loss, static_argnames=("num_negatives",))
distillation_loss = jax.jit(L.distillation_loss, static_argnames=("kind",))


def unit(rng, n=N, d=D):
  x = rng.standard_normal((n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def ref_sigmoid(za, zb, t, b, mask=None):
  n = len(za)
  mask = np.ones(n, bool) if mask is None else mask
  total = 0.0
  for i in range(n):
    for j in range(n):
      if mask[i] and mask[j]:
        logit = math.exp(t) * float(np.dot(za[i], zb[j])) + b
        total -= log_sigmoid((1.0 if i == j else -1.0) * logit)
  return total / max(mask.sum(), 1)


def ref_softmax(za, zb, t, mask=None):
  n = len(za)
  mask = np.ones(n, bool) if mask is None else mask
  scale = min(math.exp(t), 100.0)
  idx = [i for i in range(n) if mask[i]]
  total = 0.0
  for i in idx:
    row = [scale * float(np.dot(za[i], zb[j])) for j in idx]
    col = [scale * float(np.dot(za[j], zb[i])) for j in idx]
    diag = scale * float(np.dot(za[i], zb[i]))
    total += (math.log(sum(math.exp(v) for v in row)) - diag
              + math.log(sum(math.exp(v) for v in col)) - diag) / 2
  return total / max(len(idx), 1)


def ref_cycle(zi, zt, za, tau, mask=None):
  n = len(zi)
  idx = [i for i in range(n) if mask is None or mask[i]]

  def assign(x, y):
    p = np.zeros((len(idx), len(idx)))
    for r, i in enumerate(idx):
      e = [math.exp(float(np.dot(x[i], y[j])) / tau) for j in idx]
      p[r] = np.array(e) / sum(e)
    return p

  fwd = assign(zi, zt) @ assign(zt, za) @ assign(za, zi)
  bwd = assign(zi, za) @ assign(za, zt) @ assign(zt, zi)
  return float(np.mean([-(math.log(fwd[r, r]) + math.log(bwd[r, r])) / 2
                        for r in range(len(idx))]))


def ref_cyclip(za, zb, w_in=0.25, w_cross=0.25):
  n = len(za)
  l_in = l_cross = 0.0
  for i in range(n):
    for j in range(n):
      l_in += (np.dot(za[i], za[j]) - np.dot(zb[i], zb[j]))**2
      l_cross += (np.dot(za[i], zb[j]) - np.dot(za[j], zb[i]))**2
  return (w_in * l_in + w_cross * l_cross) / n**2


def ref_triplet(z, labels, margin, k=3):
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z)
  terms = []
  for i in range(n):
    d = [float(np.linalg.norm(z[i] - z[j])) for j in range(n)]
    same = [j for j in range(n) if j != i and labels[j] == labels[i]]
    if not same:
      continue
    d_p = min(d[j] for j in same)
    negs = [j for j in range(n) if labels[j] != labels[i] and d_p < d[j] < d_p + margin][:k]
    terms += [max(d_p - d[j] + margin, 0.0) for j in negs]
  return (sum(terms) / len(terms) if terms else 0.0), len(terms)


def directional_fd_check(f_jax, f_ref, args, argnums, rng, eps=1e-6, rtol=1e-5, ndir=2):
  """<grad f_jax, v> vs central differences of the float64 reference, random directions."""
  with jax.enable_x64(True):
    jargs = [jnp.asarray(a, jnp.float64) for a in args]
    grads = jax.jit(jax.grad(f_jax, argnums=argnums))(*jargs)
  for g, k in zip(grads, argnums):
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    for _ in range(ndir):
      v = rng.standard_normal(np.shape(args[k]))
      plus, minus = list(args), list(args)
      plus[k] = np.asarray(args[k]) + eps * v
      minus[k] = np.asarray(args[k]) - eps * v
      fd = (f_ref(*plus) - f_ref(*minus)) / (2 * eps)
      np.testing.assert_allclose(np.sum(g * v), fd, rtol=rtol, atol=1e-7)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return unit(rng), unit(rng), unit(rng)


# ---------------------------------------------------------------------------------------------


def test_sigmoid_loss_matches_reference_and_mask(batch):
  za, zb, _ = batch
  got = sigmoid_loss(jnp.asarray(za, jnp.float32), jnp.asarray(zb, jnp.float32), 1.3, -2.0)
  np.testing.assert_allclose(got, ref_sigmoid(za, zb, 1.3, -2.0), rtol=1e-5)
  # The SigLIP init values.
  got = sigmoid_loss(za, zb, math.log(10), -10.0)
  np.testing.assert_allclose(got, ref_sigmoid(za, zb, math.log(10), -10.0), rtol=1e-5)
  mask = np.arange(N) % 3 != 0
  got = sigmoid_loss(za, zb, 1.3, -2.0, mask=mask)
  np.testing.assert_allclose(got, ref_sigmoid(za, zb, 1.3, -2.0, mask), rtol=1e-5)
  np.testing.assert_allclose(got, sigmoid_loss(za[mask], zb[mask], 1.3, -2.0), rtol=1e-5)
  assert float(sigmoid_loss(za, zb, 1.3, -2.0, mask=np.zeros(N, bool))) == 0.0


def test_sigmoid_loss_gradients(batch):
  za, zb, _ = batch
  rng = np.random.default_rng(1)
  directional_fd_check(
      lambda a, c, t, b: sigmoid_loss(a, c, t, b),
      lambda a, c, t, b: ref_sigmoid(a, c, float(t), float(b)),
      [za[:6], zb[:6], np.float64(1.1), np.float64(-1.5)], (0, 1, 2, 3), rng)


def test_softmax_loss_matches_reference_mask_and_clamp(batch):
  za, zb, _ = batch
  got = softmax_loss(za, zb, 2.0)
  np.testing.assert_allclose(got, ref_softmax(za, zb, 2.0), rtol=1e-5)
  mask = np.arange(N) % 4 != 1
  got = softmax_loss(za, zb, 2.0, mask=mask)
  np.testing.assert_allclose(got, ref_softmax(za, zb, 2.0, mask), rtol=1e-5)
  np.testing.assert_allclose(got, softmax_loss(za[mask], zb[mask], 2.0), rtol=1e-5)
  # exp(t') clamps at 100: same value as t' = log 100 and no gradient to t'.
  big = math.log(300.0)
  np.testing.assert_allclose(softmax_loss(za, zb, big),
                             ref_softmax(za, zb, math.log(100.0)), rtol=1e-5)
  assert float(jax.grad(L.softmax_contrastive_loss, argnums=2)(za, zb, big)) == 0.0
  # Not symmetric in the rows only: swapping za and zb keeps the value (mean of both CEs).
  np.testing.assert_allclose(softmax_loss(zb, za, 2.0),
                             softmax_loss(za, zb, 2.0), rtol=1e-6)


def test_softmax_loss_gradients(batch):
  za, zb, _ = batch
  rng = np.random.default_rng(2)
  mask = np.array([True, True, False, True, True, True])
  directional_fd_check(
      lambda a, c, t: softmax_loss(a, c, t, mask=mask),
      lambda a, c, t: ref_softmax(a, c, float(t), mask),
      [za[:6], zb[:6], np.float64(1.7)], (0, 1, 2), rng)


# ---------------------------------------------------------------------------------------------
# Ring (shard_map) sigmoid loss on 8 simulated devices.


@pytest.fixture(scope="module")
def mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices; conftest sets XLA_FLAGS")
  return jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))


@pytest.fixture(scope="module")
def ring_grad(mesh):
  return jax.jit(jax.value_and_grad(
      lambda a, c, t, b, m: L.sharded_sigmoid_loss(a, c, t, b, mesh, mask=m),
      argnums=(0, 1, 2, 3)))


def test_ring_loss_equals_global_loss_value_and_gradient(batch, mesh, ring_grad):
  za, zb, _ = (jnp.asarray(x, jnp.float32) for x in batch)
  t, b = jnp.float32(1.2), jnp.float32(-3.0)
  for mask in (np.ones(N, bool), np.arange(N) % 5 != 2):
    val, grads = ring_grad(za, zb, t, b, mask)
    ref_val, ref_grads = jax.value_and_grad(
        lambda a, c, tt, bb: sigmoid_loss(a, c, tt, bb, mask), argnums=(0, 1, 2, 3))(
            za, zb, t, b)
    np.testing.assert_allclose(val, ref_sigmoid(batch[0], batch[1], 1.2, -3.0, mask), rtol=1e-5)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  # Without a mask, under plain jit.
  val = jax.jit(lambda a, c: L.sharded_sigmoid_loss(a, c, t, b, mesh))(za, zb)
  np.testing.assert_allclose(val, sigmoid_loss(za, zb, t, b), rtol=1e-6)


def test_ring_loss_communicates_by_ppermute_only(batch, mesh):
  za, zb, _ = (jnp.asarray(x, jnp.float32) for x in batch)
  text = str(jax.make_jaxpr(lambda a, c: L.sharded_sigmoid_loss(a, c, 1.0, -1.0, mesh))(za, zb))
  assert "ppermute" in text
  assert "all_gather" not in text


def test_ring_loss_over_two_mesh_axes(batch):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh2 = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  za, zb, _ = batch
  want = ref_sigmoid(za, zb, 0.5, -1.0)
  got = L.sharded_sigmoid_loss(jnp.asarray(za, jnp.float32), jnp.asarray(zb, jnp.float32),
                               0.5, -1.0, mesh2, axis=("data", "fsdp"))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="not a multiple"):
    L.sharded_sigmoid_loss(za[:6], zb[:6], 0.5, -1.0, mesh2, axis=("data", "fsdp"))


# ---------------------------------------------------------------------------------------------
# Several modalities.


def test_init_pair_params():
  p = L.init_pair_params("all", "sigmoid")
  assert sorted(p) == ["audio_text", "image_audio", "image_text"]
  np.testing.assert_allclose(p["image_text"]["t_prime"], math.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(p["image_text"]["b"], -10.0)
  p = L.init_pair_params("hub", "softmax", hub="text")
  assert sorted(p) == ["audio_text", "image_text"]
  assert set(p["audio_text"]) == {"t_prime"}
  np.testing.assert_allclose(p["audio_text"]["t_prime"], math.log(1 / 0.07), rtol=1e-6)
  assert sorted(L.init_pair_params([("image", "audio")])) == ["image_audio"]
  with pytest.raises(ValueError, match="kind"):
    L.init_pair_params("all", "hinge")
  with pytest.raises(ValueError, match="bad modality pair"):
    L.init_pair_params(["image_video"])


def test_multimodal_loss_pairs_masks_weights_hub(batch):
  zi, zt, za = batch
  z = {"image": zi, "text": zt, "audio": za}
  present = {"audio": np.arange(N) % 2 == 0, "text": np.arange(N) % 3 != 0}
  params = {"image_text": {"t_prime": 1.0, "b": -2.0}, "audio_text": {"t_prime": 1.5, "b": -1.0},
            "image_audio": {"t_prime": 0.5, "b": -3.0}}
  masks = {"image_text": present["text"], "audio_text": present["audio"] & present["text"],
           "image_audio": present["audio"]}
  refs = {name: ref_sigmoid(z[name.split("_")[0]], z[name.split("_")[1]], p["t_prime"], p["b"],
                            masks[name]) for name, p in params.items()}
  weights = {"audio_text": 0.5}
  total, metrics = L.multimodal_contrastive_loss(z, present, params, pair_weights=weights)
  np.testing.assert_allclose(
      total, refs["image_text"] + 0.5 * refs["audio_text"] + refs["image_audio"], rtol=1e-5)
  for name in params:
    np.testing.assert_allclose(metrics[f"{name}/loss"], refs[name], rtol=1e-5)
    np.testing.assert_allclose(metrics[f"{name}/scale"], math.exp(params[name]["t_prime"]),
                               rtol=1e-6)
  total, metrics = L.multimodal_contrastive_loss(z, present, params, pairs="hub", hub="image")
  np.testing.assert_allclose(total, refs["image_text"] + refs["image_audio"], rtol=1e-5)
  assert not any(k.startswith("audio_text") for k in metrics)
  # A preset skips pairs whose modality is absent; gradients reach only the trained pairs.
  grads = jax.grad(lambda p: L.multimodal_contrastive_loss(
      {"image": zi, "text": zt}, None, p)[0])(params)
  assert float(grads["audio_text"]["t_prime"]) == 0.0
  assert float(grads["image_text"]["t_prime"]) != 0.0
  with pytest.raises(ValueError, match="pair_params has no entry"):
    L.multimodal_contrastive_loss(z, None, {"image_text": params["image_text"]})
  with pytest.raises(ValueError, match="not trained"):
    L.multimodal_contrastive_loss(z, None, params, pairs="hub", pair_weights={"audio_text": 1.})


def test_multimodal_softmax_kind(batch):
  zi, zt, za = batch
  params = L.init_pair_params("all", "softmax")
  total, metrics = L.multimodal_contrastive_loss(
      {"image": zi, "text": zt, "audio": za}, None, params, kind="softmax")
  t0 = math.log(1 / 0.07)
  want = ref_softmax(zi, zt, t0) + ref_softmax(za, zt, t0) + ref_softmax(zi, za, t0)
  np.testing.assert_allclose(total, want, rtol=1e-5)
  assert "image_text/bias" not in metrics


# ---------------------------------------------------------------------------------------------
# Cycle consistency.


def test_cycle_loss_matches_reference_and_mask(batch):
  zi, zt, za = batch
  np.testing.assert_allclose(cycle_loss(zi, zt, za, 0.3), ref_cycle(zi, zt, za, 0.3),
                             rtol=1e-5)
  mask = np.arange(N) % 4 != 3
  got = cycle_loss(zi, zt, za, 0.3, mask=mask)
  np.testing.assert_allclose(got, ref_cycle(zi, zt, za, 0.3, mask), rtol=1e-5)
  np.testing.assert_allclose(got, cycle_loss(zi[mask], zt[mask], za[mask], 0.3), rtol=1e-5)


def test_cycle_loss_properties(batch):
  zi, zt, za = (jnp.asarray(x, jnp.float32) for x in batch)
  aligned = float(cycle_loss(zi, zi, zi, 0.02))
  assert 0.0 <= aligned < 1e-3
  # Slightly noisy copies are still nearly aligned; independent embeddings are not.
  rng = np.random.default_rng(3)
  noisy = [zi + 0.05 * rng.standard_normal(zi.shape) for _ in range(2)]
  noisy = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in noisy]
  assert float(cycle_loss(zi, noisy[0], noisy[1], 0.02)) < 0.05
  assert float(cycle_loss(zi, zt, za, 0.02)) > 1.0
  assert float(cycle_loss(zi, zt, za, 0.1)) > float(cycle_loss(zi, zi, zi, 0.1))
  grads = jax.grad(L.cycle_loss, argnums=(0, 1, 2))(zi, zt, za, 0.1)
  for g in grads:
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 1e-3
  # A badly broken cycle at a tiny temperature stays finite (log-space composition).
  val, grads = jax.value_and_grad(L.cycle_loss, argnums=(0, 1, 2))(zi, zt, za, 1e-3)
  assert np.isfinite(val) and val > 10
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_cycle_loss_gradients(batch):
  zi, zt, za = (x[:5] for x in batch)
  rng = np.random.default_rng(4)
  directional_fd_check(lambda a, b, c: cycle_loss(a, b, c, 0.4),
                       lambda a, b, c: ref_cycle(a, b, c, 0.4), [zi, zt, za], (0, 1, 2), rng)


def test_cyclip_loss(batch):
  za, zb, _ = batch
  np.testing.assert_allclose(cyclip_loss(za, zb), ref_cyclip(za, zb), rtol=1e-5)
  np.testing.assert_allclose(cyclip_loss(za, zb, batch_scaled=True), N * ref_cyclip(za, zb),
                             rtol=1e-5)
  np.testing.assert_allclose(cyclip_loss(za, zb, 1.0, 0.0), ref_cyclip(za, zb, 1.0, 0.0),
                             rtol=1e-5)
  assert float(cyclip_loss(za, za)) < 1e-10
  mask = np.arange(N) < 10
  np.testing.assert_allclose(cyclip_loss(za, zb, mask=mask), ref_cyclip(za[:10], zb[:10]),
                             rtol=1e-5)
  rng = np.random.default_rng(5)
  directional_fd_check(lambda a, b: cyclip_loss(a, b), ref_cyclip, [za[:5], zb[:5]], (0, 1),
                       rng)


# ---------------------------------------------------------------------------------------------
# Matryoshka, distillation, triplet.


def _renorm(x, m):
  x = x[:, :m]
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_matryoshka_sum_sorting_and_aux():
  rng = np.random.default_rng(6)
  za, zb = rng.standard_normal((8, 16)), rng.standard_normal((8, 16))
  fn = lambda z: sigmoid_loss(z[0], z[1], 1.0, -2.0)
  total, metrics = L.matryoshka_loss(fn, (za, zb), widths=[4, 16, 8], weights=[3.0, 1.0, 2.0])
  parts = {m: ref_sigmoid(_renorm(za, m), _renorm(zb, m), 1.0, -2.0) for m in (16, 8, 4)}
  np.testing.assert_allclose(total, parts[16] + 2 * parts[8] + 3 * parts[4], rtol=1e-5)
  assert list(metrics) == ["loss@d16", "loss@d8", "loss@d4"]
  for m in (16, 8, 4):
    np.testing.assert_allclose(metrics[f"loss@d{m}"], parts[m], rtol=1e-5)
  # A dict of modalities and a loss that returns metrics.
  params = {"image_text": {"t_prime": 1.0, "b": -2.0}}
  total, metrics = L.matryoshka_loss(
      lambda z: L.multimodal_contrastive_loss(z, None, params, pairs=["image_text"]),
      {"image": za, "text": zb}, widths=(8, 4))
  np.testing.assert_allclose(total, parts[8] + parts[4], rtol=1e-5)
  np.testing.assert_allclose(metrics["image_text/loss@d4"], parts[4], rtol=1e-5)
  # Precomputed per-width embeddings are renormalised and weighted the same way.
  by_width = {4: (za[:, :4], zb[:, :4]), 16: (za, zb)}
  total, _ = L.matryoshka_loss(fn, by_width, weights=[1.0, 0.5])
  np.testing.assert_allclose(total, parts[4] + 0.5 * parts[16], rtol=1e-5)


def test_matryoshka_gradient_is_sum_of_width_gradients():
  rng = np.random.default_rng(7)
  za, zb = rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
  directional_fd_check(
      lambda a, b: L.matryoshka_loss(lambda z: sigmoid_loss(z[0], z[1], 0.7, -1.0), (a, b),
                                     (8, 2), (1.0, 0.5))[0],
      lambda a, b: (ref_sigmoid(_renorm(a, 8), _renorm(b, 8), 0.7, -1.0)
                    + 0.5 * ref_sigmoid(_renorm(a, 2), _renorm(b, 2), 0.7, -1.0)),
      [za, zb], (0, 1), rng)


def test_matryoshka_validation():
  z = (np.ones((4, 8)), np.ones((4, 8)))
  fn = lambda z: jnp.sum(z[0])
  with pytest.raises(ValueError, match=r"exceed the embedding width 8"):
    L.matryoshka_loss(fn, z, widths=(16, 4))
  with pytest.raises(ValueError, match="positive"):
    L.matryoshka_loss(fn, z, widths=(8, 0))
  with pytest.raises(ValueError, match="duplicate"):
    L.matryoshka_loss(fn, z, widths=(4, 4))
  with pytest.raises(ValueError, match="2 weights for 3 widths"):
    L.matryoshka_loss(fn, z, widths=(8, 4, 2), weights=(1, 1))
  with pytest.raises(ValueError, match="widths are required"):
    L.matryoshka_loss(fn, z)
  with pytest.raises(ValueError, match=r"z\[4\] has widths \[8\]"):
    L.matryoshka_loss(fn, {4: z})


def test_distillation_loss(batch):
  rng = np.random.default_rng(8)
  s, t = rng.standard_normal((N, D)) * 3, rng.standard_normal((N, D))
  sn, tn = _renorm(s, D), _renorm(t, D)
  np.testing.assert_allclose(distillation_loss(s, t, "l1"), np.abs(sn - tn).mean(), rtol=1e-5)
  np.testing.assert_allclose(distillation_loss(s, t, "cosine"),
                             np.mean(1 - np.sum(sn * tn, axis=1)), rtol=1e-5)
  mask = np.arange(N) < 5
  np.testing.assert_allclose(distillation_loss(s, t, "l1", mask=mask),
                             np.abs(sn[:5] - tn[:5]).mean(), rtol=1e-5)
  gs, gt = jax.grad(lambda a, b: distillation_loss(a, b, "cosine"), argnums=(0, 1))(s, t)
  assert float(jnp.abs(gs).max()) > 0 and float(jnp.abs(gt).max()) == 0.0
  with pytest.raises(ValueError, match="kind"):
    distillation_loss(s, t, "l2")


def test_triplet_loss_mining_and_gradient():
  rng = np.random.default_rng(9)
  z = rng.standard_normal((12, 3))
  labels = np.arange(12) % 3
  want, count = ref_triplet(z, labels, 0.3)
  assert count > 3  # the case exercises the mining
  np.testing.assert_allclose(triplet_loss(z, labels, 0.3), want, rtol=1e-5)
  want1, count1 = ref_triplet(z, labels, 0.3, k=1)
  assert count1 < count
  np.testing.assert_allclose(triplet_loss(z, labels, 0.3, num_negatives=1), want1, rtol=1e-5)
  # An anchor with no same-label sample drops out; no triplet at all gives 0.
  lone = labels.copy()
  lone[0] = 7
  np.testing.assert_allclose(triplet_loss(z, lone, 0.3), ref_triplet(z, lone, 0.3)[0],
                             rtol=1e-5)
  assert float(triplet_loss(z, np.arange(12), 0.3)) == 0.0
  directional_fd_check(lambda x: triplet_loss(x, labels, 0.3),
                       lambda x: ref_triplet(x, labels, 0.3)[0], [z], (0,), rng)


def test_semi_hard_mining_on_hand_built_distances():
  """Anchor 0 (label 0): positive 1 (d_p = 0.2, nearer than same-label 2 at 0.5); other-label
  samples at 0.1 (too hard), 0.2 (= d_p, not >), 0.25, 0.3, 0.45, 0.49 (semi-hard, 4 of them),
  0.5 (= d_p + margin, not <) and 0.7 (too easy): the first 3 semi-hard ones are kept."""
  d0 = [0.0, 0.2, 0.5, 0.1, 0.2, 0.25, 0.3, 0.45, 0.49, 0.5, 0.7]
  n = len(d0)
  labels = np.array([0, 0, 0] + [1] * (n - 3))
  dist = np.full((n, n), 2.0)
  np.fill_diagonal(dist, 0.0)
  dist[0], dist[:, 0] = d0, d0
  positive, neg = jax.jit(L.semi_hard_triplets, static_argnums=(3,))(dist, labels, 0.3, 3)
  positive, neg = np.asarray(positive), np.asarray(neg)
  assert positive[0] == 1
  assert np.flatnonzero(neg[0]).tolist() == [5, 6, 7]
  # The inequality for every chosen triplet of every anchor.
  for i, j in zip(*np.nonzero(neg)):
    d_p = dist[i, positive[i]]
    assert labels[j] != labels[i] and d_p < dist[i, j] < d_p + 0.3
  # Label-1 anchors: positives at 2.0 from each other, anchor 0 at <= 0.7 is never semi-hard
  # (it is nearer than the positive), so they drop out.
  assert not neg[3:].any()
  # A masked-out sample is neither positive nor negative: with 1 masked, 2 (d_p = 0.5) is the
  # positive and only 0.7 lies in (0.5, 0.8).
  mask = np.ones(n, bool)
  mask[1] = False
  positive, neg = L.semi_hard_triplets(jnp.asarray(dist), labels, 0.3, 3, mask)
  assert int(positive[0]) == 2
  assert np.flatnonzero(np.asarray(neg[0])).tolist() == [10] and not np.asarray(neg[1]).any()
  with pytest.raises(ValueError, match=r"dist must be \[N, N\]"):
    L.semi_hard_triplets(jnp.zeros((3, 4)), labels[:3])


def test_losses_jit_and_bad_shapes(batch):
  za, zb, zc = batch
  f = jax.jit(lambda a, b, c: (sigmoid_loss(a, b, 1.0, -1.0), cycle_loss(a, b, c, 0.1),
                               softmax_loss(a, b, 1.0)))
  out = f(za, zb, zc)
  assert all(np.isfinite(o) for o in out)
  with pytest.raises(ValueError, match=r"za \(16, 8\) and zb \(15, 8\)"):
    sigmoid_loss(za, zb[:15], 1.0, -1.0)
  with pytest.raises(ValueError, match=r"mask must be \[N\]"):
    softmax_loss(za, zb, 1.0, mask=np.ones(3, bool))
