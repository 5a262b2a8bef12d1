"""Linear probes of a feature cache: how much of each synthetic attribute its features hold.

  python -m edgeglass_jax.probe --features=WORKDIR/features [--views=pooled,mean,first]
  python -m edgeglass_jax.probe --assistant=WORKDIR      # what its bridge passes on, its sinks
  python -m edgeglass_jax.probe --features=DIR --adam     # how fast Adam reads them, raw/whitened

A bridge or adapter can only read what the frozen encoders put in their features. This fits a
ridge classifier (float64 numpy, features standardised on the train split, one-hot targets) per
modality, view and attribute on the cached train split and reports its accuracy on the cached
test split, whose attribute combinations were never trained on, beside the majority-class
baseline. The ridge strength is chosen on a fifth of the train rows held out, then the probe is
refit on all of them, so the test split is never used to choose it.

Views of a modality's features: "pooled" (the cached pooled vector), "mean" (masked mean of the
tokens) and "first" (token 0: the CLS token of a ViT or DINOv2; a Whisper frame for sound).
Measured on the full-size assistant cache (DINOv2-S/14 at 224 px, Whisper tiny.en on 1 s), see
README: the image CLS token alone gives colour .95 and shape, size and position 1.0.

With `--assistant`, the same question two steps further. Does the trained bridge pass it on?
The same probes on its soft tokens (`assistant.soft_token_probes`: first soft token and their
mean) beside those on the encoder tokens and the assistant's answers. Does the LM keep what the
soft tokens carry? The residual-stream norms after each LM block (`assistant.sink_report`); a soft
token with a norm ~100x the median has become an attention sink and what it carried is drowned.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Sequence, Tuple

import numpy as np

VIEWS = ("pooled", "mean", "first")
LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the feature count


def _fit(x: np.ndarray, y: np.ndarray, num_classes: int, lam: float
         ) -> Tuple[np.ndarray, np.ndarray]:
  """Ridge weights `[D, C]` and unpenalised bias `[C]` of one-hot targets on `x [N, D]` (both
  centred for the solve), in the primal (D <= N) or the dual (D > N) form."""
  targets = np.eye(num_classes)[y]
  x_mean, t_mean = x.mean(0), targets.mean(0)
  x, targets = x - x_mean, targets - t_mean
  n, d = x.shape
  if d <= n:
    w = np.linalg.solve(x.T @ x + lam * np.eye(d), x.T @ targets)
  else:
    w = x.T @ np.linalg.solve(x @ x.T + lam * np.eye(n), targets)
  return w, t_mean - x_mean @ w


def ridge_probe(x_train, y_train, x_test, y_test, lambdas: Sequence[float] = LAMBDAS,
                seed: int = 0) -> Tuple[float, float]:
  """Test accuracy of a ridge classifier and the lambda chosen (relative to the feature count).

  `x_* [N, D]` features, `y_* [N]` integer labels. Features are standardised with the train
  statistics; lambda * D is the ridge strength, picked by accuracy on a random fifth of the
  train rows (fit on the rest), then refit on every train row.
  """
  x_train, x_test = (np.asarray(a, np.float64) for a in (x_train, x_test))
  y_train, y_test = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
  if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
    raise ValueError(f"ridge_probe: features must be [N, D] with one D, got {x_train.shape} "
                     f"and {x_test.shape}")
  if len(x_train) != len(y_train) or len(x_test) != len(y_test):
    raise ValueError(f"ridge_probe: {len(x_train)} / {len(x_test)} rows but {len(y_train)} / "
                     f"{len(y_test)} labels")
  if len(x_train) < 5:
    raise ValueError(f"ridge_probe: {len(x_train)} train rows; it needs at least 5")
  for name, a in (("train", x_train), ("test", x_test)):
    if not np.isfinite(a).all():
      raise ValueError(f"ridge_probe: the {name} features are not all finite")
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
  classes = int(max(y_train.max(), y_test.max())) + 1
  d = x_train.shape[1]
  held = np.random.default_rng(seed).permutation(len(x_train)) < len(x_train) // 5
  scores = []
  for lam in lambdas:
    w, b = _fit(x_train[~held], y_train[~held], classes, lam * d)
    scores.append(np.mean((x_train[held] @ w + b).argmax(1) == y_train[held]))
  lam = lambdas[int(np.argmax(scores))]
  w, b = _fit(x_train, y_train, classes, lam * d)
  return float(np.mean((x_test @ w + b).argmax(1) == y_test)), float(lam)


def view(batch: Dict[str, np.ndarray], modality: str, name: str) -> np.ndarray:
  """One view `[N, D]` of a modality's cached features (see the module docstring)."""
  if name == "pooled":
    return batch[f"{modality}/pooled"]
  tokens = batch[f"{modality}/tokens"].astype(np.float64)
  if name == "first":
    return tokens[:, 0]
  if name == "mean":
    mask = batch.get(f"{modality}/token_mask", np.ones(tokens.shape[:2], bool))
    w = mask.astype(np.float64)[..., None]
    return (tokens * w).sum(1) / np.maximum(w.sum(1), 1.0)
  raise ValueError(f"view {name!r} is not one of {VIEWS}")


def probe_cache(feature_dir: str, views: Sequence[str] = VIEWS, train: str = "train",
                test: str = "test") -> Dict[str, float]:
  """`{"{modality}/{view}/{attribute}": test accuracy, "{modality}/majority/{attribute}": ...}`
  for every image/audio modality of a synthetic feature cache (labels from its `group`)."""
  from edgeglass_jax import features
  from edgeglass_jax.data import synthetic
  bad = [v for v in views if v not in VIEWS]
  if bad:
    raise ValueError(f"views {bad} are not among {VIEWS}")
  splits = {s: features.load_split(os.path.join(feature_dir, s)) for s in (train, test)}
  modalities = sorted({k.split("/")[0] for k in splits[train] if k.endswith("/valid")}
                      & {"image", "audio"})
  if not modalities:
    raise ValueError(f"{feature_dir}: the cache has no image or audio features")
  out = {}
  for m in modalities:
    names = [v for v in views if v == "pooled" or f"{m}/tokens" in splits[train]]
    x, y = labelled_views(splits, m, names)
    out.update({f"{m}/{k}": v for k, v in probe_views(x[train], y[train], x[test],
                                                      y[test]).items()})
  return out


def labelled_views(splits: Dict[str, Dict[str, np.ndarray]], modality: str,
                   views: Sequence[str]):
  """`(x, y)`: `x[split][view] [N, D]` and `y[split][attribute] [N]` of the rows of each loaded
  synthetic split (`features.load_split`) that hold `modality`."""
  from edgeglass_jax.data import synthetic
  x, y = {}, {}
  for s, d in splits.items():
    rows = np.asarray(d[f"{modality}/valid"], bool)
    labels = synthetic.zero_shot_labels(d["group"])
    x[s] = {v: view(d, modality, v)[rows] for v in views}
    y[s] = {a: labels[a][rows] for a in labels}
  return x, y


def probe_views(x_train: Dict[str, np.ndarray], y_train: Dict[str, np.ndarray],
                x_test: Dict[str, np.ndarray], y_test: Dict[str, np.ndarray]
                ) -> Dict[str, float]:
  """`{"{view}/{attribute}": test accuracy, "majority/{attribute}": ...}`: a `ridge_probe` of
  every view `[N, D]` of `x_*` for every attribute's labels `[N]` of `y_*`, and the accuracy of
  always answering the train split's most frequent class."""
  out = {}
  for a in y_train:
    out[f"majority/{a}"] = float(np.mean(y_test[a] == np.bincount(y_train[a]).argmax()))
    for v in x_train:
      out[f"{v}/{a}"] = ridge_probe(x_train[v], y_train[a], x_test[v], y_test[a])[0]
  return out


ADAM_STEPS = (25, 50, 100, 200, 1000)


def adam_curve(x_train, y_train, x_test, y_test, steps: Sequence[int] = ADAM_STEPS,
               shrinkage=None, lr: float = 1e-3, batch: int = 16, width: int = 256,
               seed: int = 0) -> Dict[int, float]:
  """`{step: held-out accuracy}` of a stand-in for a bridge's first layer trained with Adam:
  Dense D -> `width`, LayerNorm, Dense to the classes, softmax cross-entropy on batches of
  `batch` train rows drawn with replacement, at `lr`. On the raw features, or with `shrinkage`
  on ZCA-whitened ones (`whitening`, train statistics). `ridge_probe` says whether a linear map
  reads a label; this says how fast gradient steps find it (the colours of the synthetic set:
  fast once whitened, slow on raw DINOv2 tokens)."""
  import jax
  import jax.numpy as jnp
  import optax
  from edgeglass_jax import whitening
  x_train, x_test = (np.asarray(a, np.float64) for a in (x_train, x_test))
  if shrinkage is not None:
    mean, matrix = whitening.fit_zca(x_train, shrinkage)
    x_train, x_test = (x_train - mean) @ matrix, (x_test - mean) @ matrix
  classes = int(max(np.max(y_train), np.max(y_test))) + 1
  k1, k2 = jax.random.split(jax.random.key(seed))
  d = x_train.shape[1]
  params = {"w1": jax.random.normal(k1, (d, width)) / np.sqrt(d), "b1": jnp.zeros(width),
            "w2": jax.random.normal(k2, (width, classes)) / np.sqrt(width),
            "b2": jnp.zeros(classes)}

  def logits(p, x):
    h = x @ p["w1"] + p["b1"]
    h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
    return h @ p["w2"] + p["b2"]

  opt = optax.adam(lr)

  @jax.jit
  def step(p, state, x, y):
    grads = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
        logits(q, x), y).mean())(p)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(p, updates), state

  rng = np.random.default_rng(seed)
  xs, ys = jnp.asarray(x_train, jnp.float32), jnp.asarray(y_train, jnp.int32)
  xt, yt = jnp.asarray(x_test, jnp.float32), np.asarray(y_test)
  state, out = opt.init(params), {}
  for t in range(1, max(steps) + 1):
    rows = rng.integers(0, len(x_train), batch)
    params, state = step(params, state, xs[rows], ys[rows])
    if t in steps:
      out[t] = float(np.mean(np.asarray(logits(params, xt)).argmax(-1) == yt))
  return out


def adam_curves(feature_dir: str, shrinkage: float = 0.1, steps: Sequence[int] = ADAM_STEPS,
                views=(("image", "first"), ("audio", "mean")),
                attributes=("color", "shape")) -> Dict[str, Dict[int, float]]:
  """`{"{modality}/{view}/{raw|whitened}/{attribute}": adam_curve}` on a synthetic cache."""
  from edgeglass_jax import features
  splits = {s: features.load_split(os.path.join(feature_dir, s)) for s in ("train", "test")}
  out = {}
  for m, v in views:
    if f"{m}/valid" not in splits["train"]:
      continue
    x, y = labelled_views(splits, m, [v])
    for a in attributes:
      for name, shrink in (("raw", None), ("whitened", shrinkage)):
        out[f"{m}/{v}/{name}/{a}"] = adam_curve(x["train"][v], y["train"][a], x["test"][v],
                                                y["test"][a], steps, shrink)
  return out


def format_curves(curves: Dict[str, Dict[int, float]]) -> str:
  steps = sorted(next(iter(curves.values()))) if curves else []
  lines = [f"{'modality/view/features/attribute':<34}" + "".join(f"{s:>7}" for s in steps)]
  for key, curve in curves.items():
    lines.append(f"{key:<34}" + "".join(f"{curve[s]:>7.2f}" for s in steps))
  return "\n".join(lines)


def format_probes(metrics: Dict[str, float]) -> str:
  from edgeglass_jax.data import synthetic
  names = synthetic.ATTRIBUTE_NAMES
  lines = [f"{'modality/view':<18}" + "".join(f"{a:>10}" for a in names)]
  for key in sorted({k.rsplit("/", 1)[0] for k in metrics}):
    lines.append(f"{key:<18}" + "".join(f"{metrics[f'{key}/{a}']:>10.3f}" for a in names))
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  if bool(f.features) == bool(f.assistant):
    print("error: pass exactly one of --features and --assistant", file=sys.stderr)
    sys.exit(2)
  try:
    if f.assistant:
      from edgeglass_jax.tasks import assistant
      print("What the encoders' tokens, the bridge's soft tokens and the answers hold (ridge "
            "probes fit on train, accuracy on the held-out split; answers: results.json):")
      print(format_probes(assistant.soft_token_probes(f.assistant)))
      print("\nResidual norms after each LM block (an attention sink is ~100x the median):")
      print(assistant.format_sink_report(assistant.sink_report(f.assistant, f.count)))
      return
    if f.adam:
      print("Held-out accuracy after N Adam steps of a stand-in first layer, raw vs ZCA-whitened "
            f"features (shrinkage {f.shrinkage}):")
      print(format_curves(adam_curves(f.features, f.shrinkage)))
      return
    metrics = probe_cache(f.features, [v for v in f.views.split(",") if v])
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_probes(metrics))


if __name__ == "__main__":
  from absl import app, flags as _flags
  _flags.DEFINE_string("features", None, "A feature cache directory (with train/ and test/).")
  _flags.DEFINE_string("views", ",".join(VIEWS), f"Comma-separated views among {VIEWS}.")
  _flags.DEFINE_string("assistant", None, "A trained assistant's workdir: print the residual "
                       "norms of its sink, soft and text slots after each LM block instead.")
  _flags.DEFINE_integer("count", 16, "With --assistant: questions per modality.")
  _flags.DEFINE_bool("adam", False, "With --features: how fast Adam learns colour and shape from "
                     "raw vs whitened features (`adam_curves`) instead of the ridge probes.")
  _flags.DEFINE_float("shrinkage", 0.1, "With --adam: the whitening shrinkage.")
  app.run(main)
