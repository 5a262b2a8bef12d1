"""Losses of the shared embedding space: contrastive, cycle, Matryoshka, distillation, triplet;
and DPO for the assistant's preference stage.

All functions are pure `jnp` and jit-friendly. Embeddings are `[N, D]`, one row per example of a
batch, row i of every modality describing the same example. A boolean `mask [N]` marks examples
that are present: a masked example drops out as a query (row) and as a candidate (column), and
means are taken over the valid rows. Computation runs in float32 (float64 when given float64).

The contrastive losses take L2-normalised embeddings (the adapters' heads normalise); only
`matryoshka_loss`, `distillation_loss` and `triplet_loss` normalise by themselves, because they
truncate or compare raw outputs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from edgeglass_jax import MODALITIES
from edgeglass_jax.layers import l2_normalize

Array = jax.Array
ALL_PAIRS = (("image", "text"), ("audio", "text"), ("image", "audio"))
# SigLIP (Zhai et al. 2023) and CLIP (Radford et al. 2021) initial temperature / bias.
SIGMOID_INIT = (math.log(10.0), -10.0)
SOFTMAX_INIT = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0


def _float(x) -> Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.finfo(x.dtype).bits < 32:
    x = x.astype(jnp.float32)
  return x


def _pair_float(za, zb) -> Tuple[Array, Array]:
  za, zb = _float(za), _float(zb)
  dtype = jnp.promote_types(za.dtype, zb.dtype)
  if za.ndim != 2 or zb.ndim != 2 or za.shape != zb.shape:
    raise ValueError(f"embeddings must both be [N, D] with the same shape, got za {za.shape} "
                     f"and zb {zb.shape}")
  return za.astype(dtype), zb.astype(dtype)


def _mask_or_ones(mask, n: int, name: str = "mask") -> Array:
  if mask is None:
    return jnp.ones((n,), bool)
  mask = jnp.asarray(mask)
  if mask.shape != (n,):
    raise ValueError(f"{name} must be [N] = [{n}], got shape {mask.shape}")
  return mask.astype(bool)


# --------------------------------------------------------------------------------------------
# Pairwise contrastive losses.


def sigmoid_loss(za: Array, zb: Array, t_prime: Array, b: Array,
                 mask: Optional[Array] = None) -> Array:
  """SigLIP loss (Zhai et al. 2023) of normalised `za, zb [N, D]`.

  logits_ij = exp(t') * <za_i, zb_j> + b, label_ij = +1 if i == j else -1,
  loss = mean_i( -sum_j log_sigmoid(label_ij * logits_ij) ),
  with i and j running over the valid examples of `mask [N]` (default: all) and the mean taken
  over the valid rows (0 when there is none). Same number as big_vision and open_clip.
  """
  za, zb = _pair_float(za, zb)
  n = za.shape[0]
  valid = _mask_or_ones(mask, n)
  logits = jnp.exp(t_prime).astype(za.dtype) * (za @ zb.T) + jnp.asarray(b, za.dtype)
  labels = 2.0 * jnp.eye(n, dtype=za.dtype) - 1.0
  pair = valid[:, None] & valid[None, :]
  per_pair = jnp.where(pair, -jax.nn.log_sigmoid(labels * logits), 0.0)
  return jnp.sum(per_pair) / jnp.maximum(jnp.sum(valid), 1).astype(za.dtype)


def softmax_contrastive_loss(za: Array, zb: Array, t_prime: Array,
                             mask: Optional[Array] = None) -> Array:
  """Symmetric InfoNCE (CLIP) of normalised `za, zb [N, D]`.

  logits = min(exp(t'), 100) * za @ zb.T (CLIP's clamp; no gradient to t' past the clamp);
  loss = (CE_rows + CE_cols) / 2 with CE_rows = mean_i( logsumexp_j logits_ij - logits_ii ) and
  CE_cols the same on logits.T. Masked examples of `mask [N]` leave both the softmax support
  and the mean.
  """
  za, zb = _pair_float(za, zb)
  n = za.shape[0]
  valid = _mask_or_ones(mask, n)
  scale = jnp.minimum(jnp.exp(t_prime), MAX_LOGIT_SCALE).astype(za.dtype)
  logits = scale * (za @ zb.T)
  # The diagonal stays in the support so that every row has a finite entry.
  support = (valid[:, None] & valid[None, :]) | jnp.eye(n, dtype=bool)
  logits = jnp.where(support, logits, -jnp.inf)
  diag = jnp.diagonal(logits)
  ce_rows = jax.nn.logsumexp(logits, axis=1) - diag
  ce_cols = jax.nn.logsumexp(logits, axis=0) - diag
  count = jnp.maximum(jnp.sum(valid), 1).astype(za.dtype)
  per_example = jnp.where(valid, ce_rows + ce_cols, 0.0)
  return 0.5 * jnp.sum(per_example) / count


def ring_sigmoid_loss(za: Array, zb: Array, t_prime: Array, b: Array,
                      axis_name: Union[str, Tuple[str, ...]],
                      mask: Optional[Array] = None) -> Array:
  """Distributed SigLIP loss; call inside `jax.shard_map` with the batch split over `axis_name`.

  Each device holds its shard `za, zb [n, D]` (and `mask [n]`). It scores its local block
  (positives on the diagonal, local negatives), then passes its `zb` chunk to the next device
  with `lax.ppermute` P - 1 times; every foreign block adds negatives only,
  `-sum log_sigmoid(-logits)`. No device ever holds the full `[N, D]` batch or `[N, N]` logits.
  Returns the global loss, replicated: the sum over all devices divided by the number of valid
  rows in the global batch, i.e. exactly `sigmoid_loss` of the full batch.
  """
  za, zb = _pair_float(za, zb)
  n = za.shape[0]
  n_dev = jax.lax.axis_size(axis_name)
  scale = jnp.exp(t_prime).astype(za.dtype)
  bias = jnp.asarray(b, za.dtype)
  valid_a = None if mask is None else _mask_or_ones(mask, n).astype(za.dtype)

  def block(zb_blk, valid_b, labels):
    per_pair = -jax.nn.log_sigmoid(labels * (scale * (za @ zb_blk.T) + bias))
    if valid_a is not None:
      per_pair = per_pair * (valid_a[:, None] * valid_b[None, :])
    return jnp.sum(per_pair)

  perm = [(i, (i + 1) % n_dev) for i in range(n_dev)]
  rotate = lambda x: jax.lax.ppermute(x, axis_name, perm)

  def step(_, carry):
    zb_c, valid_c, acc = carry
    zb_c = rotate(zb_c)
    valid_c = None if valid_c is None else rotate(valid_c)
    return zb_c, valid_c, acc + block(zb_c, valid_c, -1.0)

  local = block(zb, valid_a, 2.0 * jnp.eye(n, dtype=za.dtype) - 1.0)
  _, _, total = jax.lax.fori_loop(0, n_dev - 1, step, (zb, valid_a, local))
  if valid_a is None:
    count = jnp.asarray(n * n_dev, za.dtype)
  else:
    count = jnp.maximum(jax.lax.psum(jnp.sum(valid_a), axis_name), 1.0)
  return jax.lax.psum(total, axis_name) / count


def sharded_sigmoid_loss(za: Array, zb: Array, t_prime: Array, b: Array, mesh: Mesh,
                         axis: Union[str, Tuple[str, ...]] = "data",
                         mask: Optional[Array] = None) -> Array:
  """`ring_sigmoid_loss` under `jax.shard_map` on `mesh`, batch `[N, D]` split over `axis`.

  N must be a multiple of the size of `axis`; `t_prime`, `b` are replicated scalars.
  """
  axes = (axis,) if isinstance(axis, str) else tuple(axis)
  size = int(np.prod([mesh.shape[a] for a in axes]))
  if za.shape[0] % size:
    raise ValueError(f"sharded_sigmoid_loss: batch {za.shape[0]} is not a multiple of the "
                     f"{size} devices of mesh axis {axis!r}")
  spec = P(axis)
  name = axis if isinstance(axis, str) else axes
  t_prime, b = jnp.asarray(t_prime), jnp.asarray(b)
  if mask is None:
    fn = lambda a, c, t, bb: ring_sigmoid_loss(a, c, t, bb, name)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(), P()),
                         out_specs=P())(za, zb, t_prime, b)
  fn = lambda a, c, t, bb, m: ring_sigmoid_loss(a, c, t, bb, name, mask=m)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(), P(), spec),
                       out_specs=P())(za, zb, t_prime, b, jnp.asarray(mask, bool))


# --------------------------------------------------------------------------------------------
# Several modalities.

PairSpec = Union[str, Sequence[Union[str, Tuple[str, str]]]]


def pair_name(a: str, b: str) -> str:
  return f"{a}_{b}"


def resolve_pairs(pairs: PairSpec = "all", hub: str = "image",
                  modalities: Optional[Sequence[str]] = None) -> Tuple[Tuple[str, str], ...]:
  """Turns `"all"`, `"hub"` or an explicit list (`"image_text"` or `("image", "text")`) into
  modality pairs. `"all"` = image-text, audio-text, image-audio; `"hub"` = those that go through
  `hub` (ImageBind: image). Presets keep only pairs whose modalities are in `modalities`."""
  if isinstance(pairs, str) and pairs in ("all", "hub"):
    if hub not in MODALITIES:
      raise ValueError(f"hub {hub!r} is not one of {MODALITIES}")
    chosen = [p for p in ALL_PAIRS if pairs == "all" or hub in p]
    if modalities is not None:
      chosen = [p for p in chosen if p[0] in modalities and p[1] in modalities]
    return tuple(chosen)
  if isinstance(pairs, str):
    raise ValueError(f"pairs must be 'all', 'hub' or a list of pairs, got {pairs!r}")
  out = []
  for p in pairs:
    a, b = p.split("_") if isinstance(p, str) else p
    if a not in MODALITIES or b not in MODALITIES or a == b:
      raise ValueError(f"bad modality pair {p!r}; modalities are {MODALITIES}")
    if modalities is not None and (a not in modalities or b not in modalities):
      raise ValueError(f"pair {p!r} needs embeddings for {a!r} and {b!r}, "
                       f"have {sorted(modalities)}")
    out.append((a, b))
  return tuple(out)


def init_pair_params(pairs: PairSpec = "all", kind: str = "sigmoid", hub: str = "image",
                     t_prime: Optional[float] = None,
                     b: Optional[float] = None) -> Dict[str, Dict[str, Array]]:
  """Learnable temperature (and bias) per modality pair: `{"image_text": {"t_prime", "b"}}`.

  sigmoid: t' = log 10, b = -10 (SigLIP); softmax: t' = log(1 / 0.07), no bias (CLIP).
  Scalars in float32, to be trained with the adapters.
  """
  if kind not in ("sigmoid", "softmax"):
    raise ValueError(f"kind must be 'sigmoid' or 'softmax', got {kind!r}")
  out = {}
  for a, c in resolve_pairs(pairs, hub):
    if kind == "sigmoid":
      entry = {"t_prime": jnp.asarray(SIGMOID_INIT[0] if t_prime is None else t_prime,
                                      jnp.float32),
               "b": jnp.asarray(SIGMOID_INIT[1] if b is None else b, jnp.float32)}
    else:
      entry = {"t_prime": jnp.asarray(SOFTMAX_INIT if t_prime is None else t_prime,
                                      jnp.float32)}
    out[pair_name(a, c)] = entry
  return out


def multimodal_contrastive_loss(
    z: Mapping[str, Array], present: Optional[Mapping[str, Array]],
    pair_params: Mapping[str, Mapping[str, Array]], kind: str = "sigmoid",
    pairs: PairSpec = "all", hub: str = "image",
    pair_weights: Optional[Mapping[str, float]] = None,
    sigmoid_fn: Optional[Callable[..., Array]] = None) -> Tuple[Array, Dict[str, Array]]:
  """Sum over modality pairs of `weight * pair loss`, and per-pair metrics.

  `sigmoid_fn(za, zb, t_prime, b, mask)` computes each sigmoid pair loss (default
  `sigmoid_loss`; pass a `sharded_sigmoid_loss` partial for the ring version).

  z: modality -> normalised `[N, D]`; present: modality -> `[N]` bool (a missing key or None:
  all present); a pair's loss uses the examples that have both modalities. Pairs as
  `resolve_pairs` (preset pairs whose modality is absent from `z` are skipped). Metrics:
  `"{a}_{b}/loss"`, `"{a}_{b}/scale"` (exp t', clamped for softmax) and, for sigmoid,
  `"{a}_{b}/bias"`.
  """
  if kind not in ("sigmoid", "softmax"):
    raise ValueError(f"kind must be 'sigmoid' or 'softmax', got {kind!r}")
  present = dict(present or {})
  chosen = resolve_pairs(pairs, hub, modalities=tuple(z))
  if not chosen:
    raise ValueError(f"no modality pair to train among {sorted(z)} (pairs={pairs!r}, hub={hub!r})")
  weights = dict(pair_weights or {})
  unknown = set(weights) - {pair_name(a, c) for a, c in chosen}
  if unknown:
    raise ValueError(f"pair_weights has pairs {sorted(unknown)} that are not trained; "
                     f"trained: {[pair_name(a, c) for a, c in chosen]}")
  total = 0.0
  metrics = {}
  for a, c in chosen:
    name = pair_name(a, c)
    if name not in pair_params:
      raise ValueError(f"pair_params has no entry {name!r}; has {sorted(pair_params)}")
    p = pair_params[name]
    n = z[a].shape[0]
    mask = _mask_or_ones(present.get(a), n, f"present[{a!r}]") & _mask_or_ones(
        present.get(c), n, f"present[{c!r}]")
    if kind == "sigmoid":
      loss = (sigmoid_fn or sigmoid_loss)(z[a], z[c], p["t_prime"], p["b"], mask)
      metrics[f"{name}/scale"] = jnp.exp(p["t_prime"])
      metrics[f"{name}/bias"] = jnp.asarray(p["b"])
    else:
      loss = softmax_contrastive_loss(z[a], z[c], p["t_prime"], mask)
      metrics[f"{name}/scale"] = jnp.minimum(jnp.exp(p["t_prime"]), MAX_LOGIT_SCALE)
    metrics[f"{name}/loss"] = loss
    total = total + weights.get(name, 1.0) * loss
  return total, metrics


# --------------------------------------------------------------------------------------------
# Consistency regularisers.


def _log_matmul(log_a: Array, log_b: Array) -> Array:
  """log(exp(log_a) @ exp(log_b)) for `[N, K] x [K, M]`, shifted by row/column maxima."""
  ra = jax.lax.stop_gradient(jnp.max(log_a, axis=1, keepdims=True))
  cb = jax.lax.stop_gradient(jnp.max(log_b, axis=0, keepdims=True))
  inner = jnp.exp(log_a - ra) @ jnp.exp(log_b - cb)
  return ra + cb + jnp.log(jnp.maximum(inner, jnp.finfo(inner.dtype).tiny))


def cycle_loss(z_image: Array, z_text: Array, z_audio: Array, temperature: float,
               mask: Optional[Array] = None) -> Array:
  """Tri-modal cycle consistency of normalised `[N, D]` embeddings.

  With S_xy = z_x @ z_y.T and P_xy = softmax_rows(S_xy / tau) (a soft assignment of each x to
  the y's of the batch), the walk image -> text -> audio -> image has transition matrix
  C = P_it @ P_ta @ P_ai; C_ii is the probability that example i's walk comes home. The loss is

    0.5 * mean_i [ -log (P_it P_ta P_ai)_ii  -  log (P_ia P_at P_ti)_ii ],

  i.e. the cross-entropy of each cycle against the identity, both directions around the
  triangle. Why this form: it is the round-trip ("association") loss of Haeusser et al. 2017 and
  temporal cycle-consistency (Dwibedi et al. 2019) extended to three hops; -log keeps a useful
  gradient where a Frobenius distance between stochastic matrices saturates, and it is >= 0 with
  equality only for a perfect cycle. It is ~0 when the three modalities agree and the assignments
  are sharp (identical embeddings, small tau), positive otherwise, and it reaches all three
  inputs. Computed in log space so a badly broken cycle does not underflow. Examples off in
  `mask [N]` (missing any of the three modalities) leave every softmax and the mean.
  """
  zi, zt = _pair_float(z_image, z_text)
  zi, za = _pair_float(zi, z_audio)
  zt = zt.astype(zi.dtype)
  n = zi.shape[0]
  valid = _mask_or_ones(mask, n)
  support = (valid[:, None] & valid[None, :]) | jnp.eye(n, dtype=bool)
  neg = jnp.asarray(-1e30 if zi.dtype == jnp.float32 else -1e300, zi.dtype)

  def log_assign(x, y):
    return jax.nn.log_softmax(jnp.where(support, (x @ y.T) / temperature, neg), axis=1)

  def cycle(x, y, w):
    log_xy, log_yw, log_wx = log_assign(x, y), log_assign(y, w), log_assign(w, x)
    return -jax.nn.logsumexp(_log_matmul(log_xy, log_yw) + log_wx.T, axis=1)

  per_example = 0.5 * (cycle(zi, zt, za) + cycle(zi, za, zt))
  count = jnp.maximum(jnp.sum(valid), 1).astype(zi.dtype)
  return jnp.sum(jnp.where(valid, per_example, 0.0)) / count


def cyclip_loss(za: Array, zb: Array, in_weight: float = 0.25, cross_weight: float = 0.25,
                mask: Optional[Array] = None, batch_scaled: bool = False) -> Array:
  """CyCLIP consistency (Goel et al. 2022) of normalised `za, zb [N, D]`.

  in_weight * mean_ij (S_aa - S_bb)^2 + cross_weight * mean_ij (S_ab - S_ba)^2 with
  S_xy = z_x @ z_y.T, means over valid pairs of `mask [N]`. `batch_scaled=True` multiplies both
  terms by N (the valid count) as the released CyCLIP train.py does.
  """
  za, zb = _pair_float(za, zb)
  n = za.shape[0]
  valid = _mask_or_ones(mask, n)
  pair = valid[:, None] & valid[None, :]
  count = jnp.maximum(jnp.sum(valid), 1).astype(za.dtype)
  s_ab = za @ zb.T
  l_in = jnp.sum(jnp.where(pair, jnp.square(za @ za.T - zb @ zb.T), 0.0)) / count**2
  l_cross = jnp.sum(jnp.where(pair, jnp.square(s_ab - s_ab.T), 0.0)) / count**2
  loss = in_weight * l_in + cross_weight * l_cross
  return loss * count if batch_scaled else loss


# --------------------------------------------------------------------------------------------
# Matryoshka, distillation, triplet.


def _check_widths(widths, weights, dim: Optional[int]):
  widths = [int(w) for w in widths]
  if not widths:
    raise ValueError("matryoshka_loss: widths is empty")
  bad = [w for w in widths if w <= 0]
  if bad:
    raise ValueError(f"matryoshka_loss: widths must be positive, got {bad}")
  if dim is not None:
    too_wide = [w for w in widths if w > dim]
    if too_wide:
      raise ValueError(f"matryoshka_loss: widths {too_wide} exceed the embedding width {dim}")
  if len(set(widths)) != len(widths):
    raise ValueError(f"matryoshka_loss: duplicate widths in {widths}")
  weights = [1.0] * len(widths) if weights is None else [float(c) for c in weights]
  if len(weights) != len(widths):
    raise ValueError(f"matryoshka_loss: {len(weights)} weights for {len(widths)} widths")
  return sorted(zip(widths, weights), key=lambda wc: -wc[0])


def matryoshka_loss(loss_fn: Callable[[Any], Any], z: Any,
                    widths: Optional[Sequence[int]] = None,
                    weights: Optional[Sequence[float]] = None) -> Tuple[Array, Dict[str, Array]]:
  """MRL (Kusupati et al. 2022): `sum_m c_m * loss_fn(z[..., :m] renormalised)`.

  z: a pytree of `[N, D]` embeddings (an array, a tuple, or a modality dict), truncated to each
  width m and L2-renormalised; or `{width: pytree}` already computed per width (e.g. by a
  Matryoshka head; then widths default to its keys), renormalised. Widths are sorted largest
  first (weights follow their widths); non-positive, duplicate or wider-than-D widths raise.
  `loss_fn(z_m)` returns a scalar or `(scalar, metrics dict)`. Returns the total and
  `{"loss@d{m}": L_m}` plus each metric of `loss_fn` with `"@d{m}"` appended.
  """
  by_width = isinstance(z, Mapping) and bool(z) and all(
      isinstance(k, (int, np.integer)) for k in z)
  if by_width:
    widths = list(z) if widths is None else widths
    missing = [w for w in widths if w not in z]
    if missing:
      raise ValueError(f"matryoshka_loss: no embeddings for widths {missing}; have {sorted(z)}")
    pairs = _check_widths(widths, weights, None)
    for w, _ in pairs:
      dims = {x.shape[-1] for x in jax.tree_util.tree_leaves(z[w])}
      if dims != {w}:
        raise ValueError(f"matryoshka_loss: z[{w}] has widths {sorted(dims)}, expected {w}")
    get = lambda w: jax.tree_util.tree_map(l2_normalize, z[w])
  else:
    if widths is None:
      raise ValueError("matryoshka_loss: widths are required for full-width embeddings")
    dims = {x.shape[-1] for x in jax.tree_util.tree_leaves(z)}
    if len(dims) != 1:
      raise ValueError(f"matryoshka_loss: embeddings have different widths {sorted(dims)}")
    pairs = _check_widths(widths, weights, dims.pop())
    get = lambda w: jax.tree_util.tree_map(lambda x: l2_normalize(x[..., :w]), z)
  total = 0.0
  metrics = {}
  for w, c in pairs:
    out = loss_fn(get(w))
    loss, aux = out if isinstance(out, tuple) else (out, {})
    metrics[f"loss@d{w}"] = loss
    for k, v in aux.items():
      metrics[f"{k}@d{w}"] = v
    total = total + c * loss
  return total, metrics


def distillation_loss(student: Array, teacher: Array, kind: str = "l1",
                      mask: Optional[Array] = None) -> Array:
  """Feature distillation between `student, teacher [N, D]`, both L2-normalised here.

  "l1" (EdgeVL stage 1): mean over valid rows and all D of |s - t| (torch's L1Loss mean);
  "cosine": mean over valid rows of 1 - <s, t>. The teacher gets no gradient.
  """
  s = l2_normalize(student)
  t = jax.lax.stop_gradient(l2_normalize(teacher)).astype(s.dtype)
  if s.shape != t.shape or s.ndim != 2:
    raise ValueError(f"distillation_loss: student {s.shape} and teacher {t.shape} must be the "
                     f"same [N, D]")
  valid = _mask_or_ones(mask, s.shape[0])
  if kind == "l1":
    per_row = jnp.mean(jnp.abs(s - t), axis=-1)
  elif kind == "cosine":
    per_row = 1.0 - jnp.sum(s * t, axis=-1)
  else:
    raise ValueError(f"distillation_loss: kind must be 'l1' or 'cosine', got {kind!r}")
  count = jnp.maximum(jnp.sum(valid), 1).astype(s.dtype)
  return jnp.sum(jnp.where(valid, per_row, 0.0)) / count


def triplet_loss(z: Array, labels: Array, margin: float = 0.3, num_negatives: int = 3,
                 mask: Optional[Array] = None) -> Array:
  """EdgeVL stage-2 triplet loss on `z [N, D]` (L2-normalised here), `labels [N]` int.

  d = Euclidean distance. For anchor i: positive = nearest other sample with the same label
  (distance d_p); negatives = samples of another label with d_p < d_n < d_p + margin
  (semi-hard), the first `num_negatives` in batch order. Each triplet costs
  max(d_p - d_n + margin, 0); the loss is the mean over all chosen triplets. Anchors without
  a positive or without a semi-hard negative drop out; 0 when no triplet exists. Mining sees
  the values only; gradients flow through the chosen distances.
  """
  z = l2_normalize(z)
  n = z.shape[0]
  labels = jnp.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"triplet_loss: labels must be [N] = [{n}], got {labels.shape}")
  valid = _mask_or_ones(mask, n)
  sq = jnp.sum(jnp.square(z), -1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
  dist = jnp.sqrt(jnp.maximum(d2, 1e-12))
  pair = valid[:, None] & valid[None, :]
  same = (labels[:, None] == labels[None, :]) & pair & ~jnp.eye(n, dtype=bool)
  diff = (labels[:, None] != labels[None, :]) & pair
  d_sel = jax.lax.stop_gradient(dist)
  pos_idx = jnp.argmin(jnp.where(same, d_sel, jnp.inf), axis=1)
  has_pos = jnp.any(same, axis=1)
  d_p = jnp.take_along_axis(dist, pos_idx[:, None], axis=1)
  d_p_sel = jax.lax.stop_gradient(d_p)
  semi_hard = diff & (d_sel > d_p_sel) & (d_sel < d_p_sel + margin) & has_pos[:, None]
  chosen = semi_hard & (jnp.cumsum(semi_hard, axis=1) <= num_negatives)
  per_triplet = jnp.where(chosen, jax.nn.relu(d_p - dist + margin), 0.0)
  return jnp.sum(per_triplet) / jnp.maximum(jnp.sum(chosen), 1).astype(z.dtype)


def dpo_loss(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array,
             ref_rejected: Array, beta: float = 0.1,
             mask: Optional[Array] = None) -> Tuple[Array, Dict[str, Array]]:
  """DPO (Rafailov et al. 2023) on `[B]` sequence log-probabilities (summed over answer tokens).

  `loss = mean_i -log_sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))` over the rows where
  `mask [B]` is True. Returns `(loss, {"reward_margin", "preference_accuracy"})`: the mean of
  `beta * ((pi_w - ref_w) - (pi_l - ref_l))` and the share of rows where it is > 0.
  """
  pw, pl, rw, rl = (_float(x) for x in (policy_chosen, policy_rejected, ref_chosen,
                                          ref_rejected))
  margin = beta * ((pw - rw) - (pl - rl))
  w = _mask_or_ones(mask, margin.shape[0]).astype(margin.dtype)
  n = jnp.maximum(jnp.sum(w), 1.0)
  loss = jnp.sum(-jax.nn.log_sigmoid(margin) * w) / n
  return loss, {"reward_margin": jnp.sum(margin * w) / n,
                "preference_accuracy": jnp.sum((margin > 0) * w) / n}
