"""The synthetic set's depth view: deterministic, the same scene as the RGB view, not RGB."""
import numpy as np
import pytest

from edgeglass_jax.data import depth as D
from edgeglass_jax.data import synthetic as S


@pytest.fixture(scope="module")
def ds():
  return S.SyntheticTriModal(S.SyntheticConfig(num_train=40, num_val=4, num_test=8, depth=True))


def _rgb_mask(attrs, seed, size=64):
  """Shape pixels of the RGB view: two colours on one stream differ only on the shape."""
  a = S.render_image(attrs._replace(color="red"), np.random.default_rng(seed), size)
  b = S.render_image(attrs._replace(color="blue"), np.random.default_rng(seed), size)
  return np.any(a != b, axis=-1)


def test_layout_and_determinism(ds):
  ex = ds.example("train", 3)
  d = ex["depth"]
  assert d.dtype == np.float32 and d.shape == (64, 64)
  assert 0.0 <= d.min() and d.max() <= D.MAX_RANGE_M
  again = S.SyntheticTriModal(S.SyntheticConfig(num_train=40, num_val=4, num_test=8, depth=True))
  np.testing.assert_array_equal(again.example("train", 3)["depth"], d)
  np.testing.assert_array_equal(ds.render_depth("train", 3), d)
  assert not np.array_equal(ds.render_depth("train", 4), d)
  other_seed = S.SyntheticTriModal(S.SyntheticConfig(seed=1, num_train=40, depth=True))
  assert not np.array_equal(other_seed.render_depth("train", 3), d)
  # The depth switch leaves the other views as they were.
  plain = S.SyntheticTriModal(S.SyntheticConfig(num_train=40, num_val=4, num_test=8))
  base = plain.example("train", 3)
  assert "depth" not in base
  np.testing.assert_array_equal(base["image"], ex["image"])
  np.testing.assert_array_equal(base["audio"], ex["audio"])
  np.testing.assert_array_equal(ds.render_rgb("train", 3), ex["image"])


def test_same_geometry_as_rgb():
  """The near pixels of depth are the shape's pixels of RGB (agreement on >= 99% of the pixels
  off the silhouette's anti-aliased border), the shape stands in front of the background, and
  positions move the object in both views."""
  from scipy import ndimage
  for g in range(0, S.NUM_GROUPS, 17):
    attrs = S.attributes_of(g)
    seed = 100 + g
    rgb = _rgb_mask(attrs, seed)
    d = D.render_depth(attrs, np.random.default_rng(seed), np.random.default_rng(7), 64)
    valid = d > 0
    row_background = np.array([np.median(r[v & ~m]) for r, v, m in zip(d, valid, rgb)])
    near = valid & (d < row_background[:, None] - 0.15)
    border = ndimage.binary_dilation(rgb) & ~ndimage.binary_erosion(rgb)
    judged = valid & ~border
    agreement = np.mean(near[judged] == rgb[judged])
    assert agreement >= 0.99, (attrs, agreement)
    assert np.median(d[valid & rgb]) < np.median(d[valid & ~rgb]) - 0.3
  rows = {}
  for pos in S.POSITIONS:
    attrs = S.Attributes("red", "square", "large", pos)
    d = D.render_depth(attrs, np.random.default_rng(0), np.random.default_rng(0), 64)
    rows[pos] = np.mean(np.nonzero((d > 0) & (d < 2.6))[1])
  assert rows["left"] < rows["center"] < rows["right"]


def test_differs_from_rgb_and_ignores_colour(ds):
  """Depth is not a recoloured RGB image: colour does not reach it, size does."""
  attrs = S.Attributes("red", "star", "large", "center")
  views = [D.render_depth(attrs._replace(color=c), np.random.default_rng(5),
                          np.random.default_rng(6), 64) for c in ("red", "blue")]
  np.testing.assert_array_equal(views[0], views[1])
  small = D.render_depth(attrs._replace(size="small"), np.random.default_rng(5),
                         np.random.default_rng(6), 64)
  assert ((small > 0) & (small < 2.6)).sum() < ((views[0] > 0) & (views[0] < 2.6)).sum()
  ex = ds.example("train", 0)
  gray = ex["image"].astype(np.float32).mean(-1)
  corr = np.corrcoef(gray.ravel(), ex["depth"].ravel())[0, 1]
  assert abs(corr) < 0.95
  px = D.depth_to_pixels(ex["depth"])
  assert px.shape == (64, 64, 3) and px.dtype == np.float32
  assert -1.0 <= px.min() and px.max() <= 1.0
  show = D.depth_to_uint8(ex["depth"])
  assert show.dtype == np.uint8 and show.shape == (64, 64)
