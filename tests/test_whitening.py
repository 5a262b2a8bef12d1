"""ZCA whitening of encoder tokens against float64 numpy: streaming moments, the whitening
matrix, the CLS token's own statistics, the fixed (untrainable) module."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeglass_jax import whitening


def _correlated(n, d, seed=0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) * np.logspace(0, -3, d)[:, None]  # variances over 6 decades
  return rng.normal(size=(n, d)) @ mix + rng.normal(size=d) * 5.0


def test_streaming_moments_equal_numpy_mean_and_covariance():
  x = _correlated(301, 7)
  moments = whitening.Moments(7)
  for chunk in np.array_split(x, [5, 6, 150]):  # uneven chunks, one of a single row
    moments.add(chunk)
  mean, cov = moments.mean_cov()
  np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, np.cov(x.T, bias=True), rtol=1e-9, atol=1e-14)
  with pytest.raises(ValueError, match=r"rows must be \[N, 7\]"):
    moments.add(x[:, :6])
  with pytest.raises(ValueError, match="at least 2 rows"):
    whitening.Moments(3).mean_cov()


def test_zca_whitens_exactly_without_shrinkage_and_shrinks_each_direction_with_it():
  x = _correlated(2000, 6)
  cov = np.cov(x.T, bias=True)
  w = whitening.zca_matrix(cov, 0.0)
  np.testing.assert_allclose(w, w.T, atol=1e-9)
  np.testing.assert_allclose(w @ cov @ w, np.eye(6), atol=1e-8)
  lam, vec = np.linalg.eigh(cov)
  eps = 0.1 * lam.mean()
  shrunk = whitening.zca_matrix(cov, 0.1)
  # Direction v_i keeps the variance lam_i / (lam_i + eps): ~1 for strong ones, ~0 for noise.
  np.testing.assert_allclose(vec.T @ shrunk @ cov @ shrunk @ vec, np.diag(lam / (lam + eps)),
                             atol=1e-9)
  with pytest.raises(ValueError, match="singular"):
    whitening.zca_matrix(np.diag([1.0, 0.0]), 0.0)
  with pytest.raises(ValueError, match=">= 0"):
    whitening.zca_matrix(cov, -1.0)


def test_token_statistics_skip_masked_tokens_and_give_the_cls_token_its_own():
  rng = np.random.default_rng(1)
  tokens = rng.normal(size=(40, 5, 3)) * [1.0, 2.0, 3.0]
  tokens[:, 0] = tokens[:, 0] * 10.0 + 4.0  # the CLS token is distributed unlike the rest
  mask = rng.random((40, 5)) > 0.3
  garbage = np.where(mask[..., None], tokens, 1e6)  # masked slots must not count
  stats = whitening.token_statistics(((garbage[i:i + 16], mask[i:i + 16])
                                      for i in range(0, 40, 16)), True, 0.0)
  cls, rest = tokens[:, 0][mask[:, 0]], tokens[:, 1:][mask[:, 1:]]
  np.testing.assert_allclose(stats["first_mean"], cls.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats["mean"], rest.mean(0), rtol=1e-5)
  for key, x in (("first_", cls), ("", rest)):
    w = stats[key + "matrix"].astype(np.float64)
    np.testing.assert_allclose(w @ np.cov(x.T, bias=True) @ w, np.eye(3), atol=1e-5)
  together = whitening.token_statistics([(garbage, mask)], False, 0.0)
  np.testing.assert_allclose(together["mean"], tokens[mask].mean(0), rtol=1e-5)
  assert set(together) == {"mean", "matrix"}


def test_whiten_module_applies_the_statistics_and_passes_no_gradient_to_them():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4, 3)).astype(np.float32)
  module = whitening.Whiten(separate_first=True)
  params = module.init(jax.random.key(0), x)
  np.testing.assert_allclose(module.apply(params, x), x, atol=1e-6)  # identity until filled
  stats = {k: rng.normal(size=v.value.shape).astype(np.float32)
           for k, v in params["params"].items()}
  filled = {"params": {k: jnp.asarray(v) for k, v in stats.items()}}
  out = np.asarray(module.apply(filled, x), np.float64)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(out[:, :1], (x64[:, :1] - stats["first_mean"]) @
                             stats["first_matrix"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:, 1:], (x64[:, 1:] - stats["mean"]) @ stats["matrix"],
                             rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))(filled)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
