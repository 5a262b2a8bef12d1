"""A depth-like view of the synthetic scenes: the non-RGB modality of the edge student.

The scene of an example is its shape standing on a far background plane, seen by a range
sensor. `render_depth` reuses the geometry draws of the RGB view (`synthetic.shape_alpha` on a
fresh copy of the image stream), so both views show the same silhouette at the same place:

- background: a far plane tilted like a floor (farther towards the top), at 3.0-3.4 m;
- shape: a height field raised towards the camera, flat-topped with bevelled edges (the height
  grows with the distance to the silhouette's border, up to `bevel` of the radius), standing
  0.6-1.0 m in front of the plane; large shapes are taller;
- sensor: Gaussian range noise growing with distance and a few dropout pixels that read 0
  (no return), as structured-light sensors give.

Colour is invisible in depth by construction: a student reading this view can learn shape, size
and position, not colour. Everything is a pure function of the image and depth streams.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from edgeglass_jax.data import synthetic

FAR_RANGE_M = (3.0, 3.4)
HEIGHT_M = {"small": (0.6, 0.75), "large": (0.8, 1.0)}
MAX_RANGE_M = 4.0
BEVEL = 0.5  # fraction of the shape's radius over which its height rises
NOISE_M = 0.01  # range noise std at 1 m, growing linearly with range
DROPOUT = 0.01  # fraction of pixels with no return


def render_depth(attrs: synthetic.Attributes, image_rng: np.random.Generator,
                 depth_rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
  """Range image of `attrs`' scene, float32 `[H, W]` in metres (0 = no return).

  `image_rng` must be a fresh generator of the example's image stream (the one `render_image`
  gets), so the silhouette matches the RGB view; `depth_rng` draws the plane, the height and
  the sensor noise.
  """
  side = int(image_size)
  alpha = synthetic.shape_alpha(attrs, image_rng, side)[..., 0]
  inside = alpha >= 0.5
  radius = max(float(np.sqrt(inside.sum() / np.pi)), 1.0)
  rise = np.clip(ndimage.distance_transform_edt(inside) / (BEVEL * radius), 0.0, 1.0)
  far_top, far_bottom = np.sort(depth_rng.uniform(*FAR_RANGE_M, size=2))[::-1]
  plane = np.linspace(far_top, far_bottom, side, dtype=np.float32)[:, None]
  plane = np.broadcast_to(plane, (side, side))
  height = depth_rng.uniform(*HEIGHT_M[attrs.size])
  profile = np.where(inside, 0.3 + 0.7 * np.sqrt(rise), 0.0)
  edge = (alpha > 0.0) & ~inside
  profile = np.where(edge, 0.3 * alpha, profile)
  depth = plane - height * profile
  depth = depth * (1.0 + NOISE_M * depth_rng.standard_normal((side, side)))
  depth = np.where(depth_rng.random((side, side)) < DROPOUT, 0.0, depth)
  return np.clip(depth, 0.0, MAX_RANGE_M).astype(np.float32)


def depth_to_pixels(depth: np.ndarray) -> np.ndarray:
  """`[..., H, W]` metres -> float32 `[..., H, W, 3]` student input: range mapped to about
  [-1, 1] (0 m -> -1, `MAX_RANGE_M` -> 1) and repeated over three channels, so one ViT reads
  both views."""
  x = np.asarray(depth, np.float32) * (2.0 / MAX_RANGE_M) - 1.0
  return np.repeat(x[..., None], 3, axis=-1)


def depth_to_uint8(depth: np.ndarray) -> np.ndarray:
  """`[H, W]` metres -> uint8 `[H, W]` for display: near is bright, no return is black."""
  d = np.asarray(depth, np.float32)
  near = np.where(d > 0, 1.0 - d / MAX_RANGE_M, 0.0)
  lo = near[d > 0].min() if np.any(d > 0) else 0.0
  scaled = np.where(d > 0, (near - lo) / max(near.max() - lo, 1e-6), 0.0)
  return np.clip(np.rint(255 * (0.15 + 0.85 * scaled) * (d > 0)), 0, 255).astype(np.uint8)
