"""Retrieval metrics, zero-shot classification and Matryoshka curves (numpy, host side).

Evaluation runs once per eval step on gathered embeddings, so it is plain vectorised numpy:
a 5000 x 5000 similarity matrix takes well under a second with one positive per query (the
paired default) and under two seconds with several.
"""
from __future__ import annotations

import itertools
import re
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from edgeglass_jax import MODALITIES
from edgeglass_jax.layers import l2_normalize

_KEY = re.compile(r"^([a-z]+)_to_([a-z]+)/(R@\d+|mAP)(?:@d(\d+))?$")
_ROW_BLOCK = 1 << 22  # sim entries sorted at once in the several-positives path


def retrieval_metrics(sim, positives=None, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
  """R@k and mAP of `sim [Nq, Nc]` (query i vs candidate j) given `positives [Nq, Nc]` bool.

  positives defaults to the diagonal (query i's match is candidate i; needs Nq == Nc).
  R@k: fraction of queries with at least one positive among the top k candidates (k larger than
  Nc counts as Nc). mAP: mean over queries of AP = mean over the query's positives of
  precision at the positive's rank. Queries without any positive are left out of every metric;
  if no query has one, ValueError.

  Ties are broken pessimistically: a candidate whose score equals a positive's ranks ahead of it
  when it is a negative (positives tied with each other keep their count). The result is
  deterministic and a collapsed model (constant scores) gets the worst score, not a lucky one.
  """
  sim = np.asarray(sim)
  if sim.ndim != 2:
    raise ValueError(f"retrieval_metrics: sim must be [Nq, Nc], got shape {sim.shape}")
  if np.isnan(sim).any():
    raise ValueError("retrieval_metrics: sim contains NaN")
  nq, nc = sim.shape
  if positives is None:
    if nq != nc:
      raise ValueError(f"retrieval_metrics: default diagonal positives need a square sim, got "
                       f"{sim.shape}; pass positives")
    positives = np.eye(nq, dtype=bool)
  positives = np.asarray(positives, bool)
  if positives.shape != sim.shape:
    raise ValueError(f"retrieval_metrics: positives {positives.shape} do not match sim "
                     f"{sim.shape}")
  ks = tuple(int(k) for k in ks)
  if any(k <= 0 for k in ks):
    raise ValueError(f"retrieval_metrics: ks must be positive, got {ks}")
  keep = positives.any(axis=1)
  if not keep.any():
    raise ValueError("retrieval_metrics: no query has a positive candidate")
  sim, positives = sim[keep], positives[keep]
  if positives.sum(axis=1).max() == 1:
    ranks = _single_positive_ranks(sim, positives)
    hits_at = {k: ranks <= k for k in ks}
    ap = 1.0 / ranks
  else:
    hits_at, ap = _multi_positive(sim, positives, ks)
  out = {f"R@{k}": float(np.mean(hits_at[k])) for k in ks}
  out["mAP"] = float(np.mean(ap))
  return out


def _single_positive_ranks(sim: np.ndarray, positives: np.ndarray) -> np.ndarray:
  """1-based pessimistic rank of each row's only positive: 1 + #negatives scoring >= it."""
  pos_score = sim[positives]
  ahead = (sim >= pos_score[:, None]) & ~positives
  return 1 + ahead.sum(axis=1)


def _multi_positive(sim: np.ndarray, positives: np.ndarray, ks):
  nq, nc = sim.shape
  rank = np.arange(1, nc + 1, dtype=np.float64)
  hits_at = {k: np.zeros(nq, bool) for k in ks}
  ap = np.zeros(nq, np.float64)
  step = max(1, _ROW_BLOCK // max(nc, 1))
  for start in range(0, nq, step):
    s, p = sim[start:start + step], positives[start:start + step]
    order = np.argsort(-s, axis=1)
    ordered = np.take_along_axis(s, order, axis=1)
    hits = np.take_along_axis(p, order, axis=1)
    # Rows where a positive ties with a negative: sort again, negatives first among equals.
    tied = np.any((ordered[:, 1:] == ordered[:, :-1]) & (hits[:, 1:] != hits[:, :-1]), axis=1)
    if tied.any():
      order = np.lexsort((p[tied], -s[tied]), axis=-1)
      hits[tied] = np.take_along_axis(p[tied], order, axis=1)
    cum = np.cumsum(hits, axis=1)
    for k in ks:
      hits_at[k][start:start + step] = cum[:, min(k, nc) - 1] > 0
    ap[start:start + step] = (hits * (cum / rank)).sum(axis=1) / cum[:, -1]
  return hits_at, ap


def six_direction_retrieval(z: Mapping[str, np.ndarray], groups=None,
                            widths: Optional[Sequence[int]] = None,
                            present: Optional[Mapping[str, np.ndarray]] = None,
                            ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
  """Retrieval between every ordered pair of the modalities in `z` (image, audio, text: 6).

  z: modality -> `[N, D]` embeddings, row i of each modality the same example. groups `[N]`
  int: examples with equal group (e.g. the same attribute tuple) are positives of each other;
  default: each example only matches itself. widths: Matryoshka widths; each is scored on the
  L2-renormalised prefix `z[:, :w]` and its names get `"@d{w}"`; default: full width, no suffix.
  present: modality -> `[N]` bool; an example lacking src is no query, lacking dst no candidate.
  Returns `{"{src}_to_{dst}/R@{k}[@d{w}]": .., "{src}_to_{dst}/mAP[@d{w}]": ..}`.
  """
  unknown = sorted(set(z) - set(MODALITIES))
  if unknown:
    raise ValueError(f"six_direction_retrieval: unknown modalities {unknown}; use {MODALITIES}")
  mods = [m for m in MODALITIES if m in z]
  if len(mods) < 2:
    raise ValueError(f"six_direction_retrieval: need at least two modalities, got {mods}")
  z = {m: np.asarray(z[m], np.float32) for m in mods}
  n = z[mods[0]].shape[0]
  dims = {}
  for m in mods:
    if z[m].ndim != 2 or z[m].shape[0] != n:
      raise ValueError(f"six_direction_retrieval: z[{m!r}] must be [N={n}, D], got "
                       f"{z[m].shape}")
    dims[m] = z[m].shape[1]
  if widths is None:
    if len(set(dims.values())) != 1:
      raise ValueError(f"six_direction_retrieval: embedding widths differ {dims}")
    plan = [(dims[mods[0]], "")]
  else:
    widths = sorted({int(w) for w in widths}, reverse=True)
    bad = [w for w in widths if w <= 0 or any(w > d for d in dims.values())]
    if bad:
      raise ValueError(f"six_direction_retrieval: widths {bad} are not in 1..min D {dims}")
    plan = [(w, f"@d{w}") for w in widths]
  if groups is None:
    same = np.eye(n, dtype=bool)
  else:
    groups = np.asarray(groups)
    if groups.shape != (n,):
      raise ValueError(f"six_direction_retrieval: groups must be [N={n}], got {groups.shape}")
    same = groups[:, None] == groups[None, :]
  present = dict(present or {})
  valid = {}
  for m in mods:
    v = np.ones(n, bool) if present.get(m) is None else np.asarray(present[m], bool)
    if v.shape != (n,):
      raise ValueError(f"six_direction_retrieval: present[{m!r}] must be [N={n}], got {v.shape}")
    valid[m] = v
  out = {}
  for width, suffix in plan:
    zw = {m: l2_normalize(np.asarray(z[m][:, :width], np.float32)) for m in mods}
    for src, dst in itertools.permutations(mods, 2):
      q, c = valid[src], valid[dst]
      sim = zw[src][q] @ zw[dst][c].T
      try:
        metrics = retrieval_metrics(sim, same[np.ix_(q, c)], ks)
      except ValueError as e:
        raise ValueError(f"six_direction_retrieval: {src}_to_{dst}{suffix}: {e}") from e
      for name, value in metrics.items():
        out[f"{src}_to_{dst}/{name}{suffix}"] = value
  return out


def zero_shot_classification(z_query, z_prompts, labels, mask=None) -> float:
  """Top-1 accuracy of `z_query [N, D]` against class prompts `z_prompts [C, D]`.

  Both are L2-normalised; the prediction is argmax_c cos(query, prompt_c) (first class on ties);
  `labels [N]` int in [0, C); `mask [N]` selects the scored queries.
  """
  q = l2_normalize(np.asarray(z_query, np.float32))
  p = l2_normalize(np.asarray(z_prompts, np.float32))
  labels = np.asarray(labels)
  if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
    raise ValueError(f"zero_shot_classification: z_query {q.shape} and z_prompts {p.shape} "
                     f"must be [N, D] and [C, D]")
  if labels.shape != (q.shape[0],):
    raise ValueError(f"zero_shot_classification: labels must be [N={q.shape[0]}], got "
                     f"{labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= p.shape[0]):
    raise ValueError(f"zero_shot_classification: labels must lie in [0, {p.shape[0]}), got "
                     f"range [{labels.min()}, {labels.max()}]")
  keep = np.ones(q.shape[0], bool) if mask is None else np.asarray(mask, bool)
  if not keep.any():
    raise ValueError("zero_shot_classification: no query to score")
  pred = np.argmax(q[keep] @ p.T, axis=1)
  return float(np.mean(pred == labels[keep]))


def _parse(metrics: Mapping[str, float]):
  for key, value in metrics.items():
    m = _KEY.match(key)
    if m and m.group(1) in MODALITIES and m.group(2) in MODALITIES:
      width = None if m.group(4) is None else int(m.group(4))
      yield f"{m.group(1)}_to_{m.group(2)}", m.group(3), width, float(value)


def matryoshka_curve(metrics: Mapping[str, float], metric: str = "R@1") -> Dict[int, float]:
  """`{width: mean of metric over directions}` from `six_direction_retrieval` names with
  `"@d{width}"`, largest width first."""
  acc: Dict[int, list] = {}
  for _, name, width, value in _parse(metrics):
    if name == metric and width is not None:
      acc.setdefault(width, []).append(value)
  if not acc:
    raise ValueError(f"matryoshka_curve: no '{{src}}_to_{{dst}}/{metric}@d{{width}}' metrics "
                     f"among {len(metrics)} keys")
  return {w: float(np.mean(acc[w])) for w in sorted(acc, reverse=True)}


def format_table(metrics: Mapping[str, float]) -> str:
  """Console table: one row per direction, columns width x (R@k..., mAP), values in percent."""
  rows: Dict[str, Dict] = {}
  names, widths = set(), set()
  for direction, name, width, value in _parse(metrics):
    rows.setdefault(direction, {})[(width, name)] = value
    names.add(name)
    widths.add(width)
  if not rows:
    return "(no retrieval metrics)"
  names = sorted((n for n in names if n != "mAP"), key=lambda n: int(n[2:])) + (
      ["mAP"] if "mAP" in names else [])
  widths = sorted(widths, key=lambda w: -1 if w is None else -w)
  order = [f"{a}_to_{b}" for a, b in itertools.permutations(MODALITIES, 2)]
  directions = [d for d in order if d in rows]
  cell = max(6, max(len(n) for n in names))
  first = max(len("direction"), max(len(d) for d in directions))
  group = len(names) * (cell + 1) - 1
  head1 = " " * first + "".join(
      " | " + ("full" if w is None else f"d{w}").center(group) for w in widths)
  head2 = "direction".ljust(first) + "".join(
      " | " + " ".join(n.rjust(cell) for n in names) for _ in widths)
  lines = [head1, head2, "-" * len(head2)]
  for d in directions:
    cells = []
    for w in widths:
      vals = [rows[d].get((w, n)) for n in names]
      cells.append(" ".join(("-" if v is None else f"{100 * v:.1f}").rjust(cell) for v in vals))
    lines.append(d.ljust(first) + "".join(" | " + c for c in cells))
  return "\n".join(lines)
