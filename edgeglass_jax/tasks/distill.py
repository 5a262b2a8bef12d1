"""Task `distill`: EdgeVL (Cai et al., ECCV 2024) on the synthetic set, a compact two-view
student distilled from the frozen teacher of an `align` run.

Teacher: the frozen image encoder's cached features (the align run's feature cache, e.g. real
DINOv2) through that run's trained image adapter (restored from its orbax checkpoint), at one
width `distill.width` of the shared space; its text adapter over the cached prompt features
gives the zero-shot classes (`sources.zero_shot`: colour, shape, size, position).

- Stage 0, curation (`curate`): the teacher's zero-shot confidence of every training image,
  `c_i = prod_t max_k softmax_k(scale * cos(f_img(x_i), f_txt(prompt_t,k)))` over the label tasks
  `distill.label_tasks` (one task: EdgeVL's confidence), keeps the top `tau` fraction,
  pseudo-labelled by the argmax (the tasks' argmaxes combined into one id).
- Stage 1 (`distill.stage=1`): one weight-shared student (a ViT from `encoders/vit.py` trained
  from scratch on raw pixels, plus a projection to the shared width) sees the RGB and the depth
  view (`data/depth.py`); both outputs are matched to the teacher's RGB embedding by L1 on
  normalised embeddings (`losses.distillation_loss`).
- Stage 2 (`distill.stage=2`): starts from stage 1's workdir (`distill.init_workdir`), int8
  QAT on when `quant.mode` says so (`quant.py`), semi-hard triplets on the pseudo-labels
  (`losses.semi_hard_triplet_loss`, both views summed) plus `distill.stage2_distill_weight`
  times the stage-1 loss, which keeps the student in the teacher's space (the zero-shot
  classifier is the teacher's text side).

Each stage is its own run of the shared loop in its own workdir (resumable). Eval on the
held-out split (`eval.split`): `zeroshot/{rgb|depth}/{attribute}` (and `/mean`),
`{rgb|depth}_to_text/R@k` and `/mAP` of student embeddings against the teacher's text
embeddings of the split's captions, the same for the teacher (`teacher/...`), and at the end
the served students (`edge_report`): float32 and int8 size on disk (`size/{float32|int8}_MB`),
latency at batch 1 and 32 (`latency/{float32|int8}/b{B}_ms`) and the int8 model's accuracies
(`int8/zeroshot/...`: the QAT model converted, or post-training int8 of a float student).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import linen as nn

from edgeglass_jax import configs, evaluate, layers, losses, quant
from edgeglass_jax.data import depth as depth_view
from edgeglass_jax.data import pipeline, sources
from edgeglass_jax.encoders import vit
from edgeglass_jax.tasks import align, loop

VIEWS = ("rgb", "depth")
STUDENT_SPEC = "student.json"
CALIBRATION_FILE = "calibration.npz"  # student inputs of both views: export's representative set
CALIBRATION_IMAGES = 64
# ViT-Ti/S (DeiT): width, MLP width, layers, heads.
STUDENTS = {"ti": (192, 768, 12, 3), "s": (384, 1536, 12, 6)}


class TeacherError(ValueError):
  """The teacher run cannot serve as a teacher: no checkpoint, no feature cache, no text
  modality or a width its heads do not have. The message names the workdir and what is
  missing."""


# --------------------------------------------------------------------------------------------
# Stage 0: curation.


def zero_shot_confidence(z_image: np.ndarray, z_prompts: Sequence[np.ndarray],
                         scale: float = 100.0) -> Tuple[np.ndarray, np.ndarray]:
  """EdgeVL's teacher confidence and pseudo-label of every image.

  `z_image [N, D]` and each task's `z_prompts[t] [C_t, D]` (L2-normalised here). For one task
  `c_i = max_k softmax_k(scale * cos(z_i, p_k))`, label `argmax_k`; for several the product of
  the tasks' confidences and the mixed-radix id of their argmaxes (task 0 most significant).
  Returns `(confidence float64 [N], label int64 [N])`.
  """
  z = layers.l2_normalize(np.asarray(z_image, np.float64))
  if z.ndim != 2 or not len(z_prompts):
    raise ValueError(f"zero_shot_confidence: z_image must be [N, D] and at least one task's "
                     f"prompts given, got {z.shape} and {len(z_prompts)} tasks")
  confidence = np.ones(z.shape[0])
  label = np.zeros(z.shape[0], np.int64)
  for p in z_prompts:
    p = layers.l2_normalize(np.asarray(p, np.float64))
    if p.ndim != 2 or p.shape[1] != z.shape[1]:
      raise ValueError(f"zero_shot_confidence: prompts {p.shape} do not match images {z.shape}")
    logits = scale * z @ p.T
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    confidence *= prob.max(1)
    label = label * p.shape[0] + prob.argmax(1)
  return confidence, label


def curate(confidence: np.ndarray, tau: float) -> np.ndarray:
  """Indices (ascending) of the `max(1, round(tau * N))` most confident of `confidence [N]`;
  ties go to the lower index."""
  confidence = np.asarray(confidence)
  if not 0.0 < tau <= 1.0:
    raise ValueError(f"curation fraction tau must be in (0, 1], got {tau}")
  if confidence.ndim != 1 or not confidence.size:
    raise ValueError(f"curate: confidence must be a non-empty [N], got {confidence.shape}")
  keep = max(1, int(round(tau * confidence.size)))
  order = np.argsort(-confidence, kind="stable")
  return np.sort(order[:keep])


# --------------------------------------------------------------------------------------------
# The student.


def student_vit_config(scfg) -> vit.ViTConfig:
  """The student's ViT (`config.student`): preset `size` ("ti" | "s"), `layers` > 0 overrides
  the preset's depth; CLIP layout (class token, pre-norm), GELU, `patch_size` on
  `image_size` pixels."""
  if scfg.size not in STUDENTS:
    raise ValueError(f"config.student.size must be one of {sorted(STUDENTS)}, got "
                     f"{scfg.size!r}")
  width, mlp, depth, heads = STUDENTS[scfg.size]
  return vit.ViTConfig(family="clip_vision_model", image_size=int(scfg.image_size),
                       patch_size=int(scfg.patch_size), hidden_size=width,
                       intermediate_size=mlp,
                       num_hidden_layers=int(scfg.layers) if scfg.layers > 0 else depth,
                       num_attention_heads=heads, hidden_act="gelu", layer_norm_eps=1e-6)


class Student(nn.Module):
  """Weight-shared two-view student: `pixels [B, H, W, 3]` (RGB or depth, in [-1, 1]) ->
  L2-normalised `[B, width]` in the teacher's space: ViT pooled class token -> Dense."""
  vit_config: vit.ViTConfig
  width: int
  quant: Any = None

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    pooled = vit.ViT(self.vit_config, quant=self.quant, name="vit")(pixels).pooled
    z = layers.Dense(self.width, kernel_axes=("embed", "mlp"), quant=self.quant,
                     name="proj")(pooled)
    return layers.l2_normalize(z)


def rgb_pixels(rgb) -> jax.Array:
  """uint8 `[..., H, W, 3]` -> float32 in [-1, 1]."""
  return jnp.asarray(rgb, jnp.float32) * (2.0 / 255.0) - 1.0


def view_pixels(batch, view: str) -> jax.Array:
  """The student input of one view of a batch (`"rgb"` uint8, `"depth"` metres)."""
  if view == "rgb":
    return rgb_pixels(batch["rgb"])
  if view == "depth":
    d = jnp.asarray(batch["depth"], jnp.float32) * (2.0 / depth_view.MAX_RANGE_M) - 1.0
    return jnp.repeat(d[..., None], 3, axis=-1)
  raise ValueError(f"unknown view {view!r}; known: {VIEWS}")


# --------------------------------------------------------------------------------------------
# The teacher.


def load_config(spec: str) -> mlc.ConfigDict:
  """An experiment config from `path.py[:arg]` (its `get_config(arg)`) or a `.json` dump."""
  try:
    return configs.load(spec)
  except FileNotFoundError as e:
    raise TeacherError(f"distill.teacher_config={spec!r}: {e}") from e


@dataclasses.dataclass
class Teacher:
  """The frozen teacher: the align model, its params, its feature cache and the prompts'
  embeddings `{task: [C, width]}` at `width`."""
  config: Any
  workdir: str
  model: align.Aligner
  params: Any
  step: int
  feature_dir: str
  width: int
  prompts: Dict[str, np.ndarray]

  def __post_init__(self):
    self._embed = jax.jit(lambda p, x, m: self.model.apply(p, {f"{m}/pooled": x}, m,
                                                           method=align.Aligner.embed)[self.width],
                          static_argnums=2)

  def embed(self, params, pooled: np.ndarray, modality: str, batch: int = 512) -> np.ndarray:
    """Teacher embeddings `[N, width]` of cached `pooled [N, D]` features."""
    out = [np.asarray(self._embed(params, jnp.asarray(pooled[i:i + batch], jnp.float32),
                                  modality)) for i in range(0, len(pooled), batch)]
    return np.concatenate(out) if out else np.zeros((0, self.width), np.float32)


def load_teacher(dcfg, mesh) -> Teacher:
  """The align run of `distill.teacher_workdir` (config `distill.teacher_config`) as a frozen
  teacher at width `distill.width`."""
  workdir = os.path.abspath(dcfg.teacher_workdir)
  tcfg = load_config(dcfg.teacher_config)
  if "text" not in tcfg.modalities or "image" not in tcfg.modalities:
    raise TeacherError(f"the teacher config {dcfg.teacher_config} trains {tcfg.modalities}; "
                       "distillation needs its image and text adapters")
  for m in ("image", "text"):
    if tcfg.model.adapters[m].kind != "mlp":
      raise TeacherError(f"the teacher's {m} adapter is {tcfg.model.adapters[m].kind!r}; the "
                         "student distils from pooled-feature ('mlp') adapters only")
  widths = tuple(tcfg.model.widths)
  if dcfg.width not in widths:
    raise TeacherError(f"distill.width={dcfg.width} is not a width of the teacher's heads "
                       f"{widths}")
  feature_dir = dcfg.teacher_features or tcfg.get("features_dir") or os.path.join(workdir,
                                                                                 "features")
  splits = [tcfg.train.split] + list(tcfg.eval.splits)
  for split in splits:
    if not os.path.isfile(os.path.join(feature_dir, split, "index.json")):
      raise TeacherError(f"the teacher's feature cache {feature_dir} lacks split {split!r} "
                         "(has the align run finished its extraction?)")
  try:
    model, params, step = align.restore_trained(tcfg, workdir, feature_dir, mesh)
  except FileNotFoundError as e:
    raise TeacherError(f"distill.teacher_workdir={workdir}: {e}") from e
  tasks = sources.zero_shot(tcfg.data)
  if tasks is None:
    raise TeacherError(f"the teacher's data source {tcfg.data.source!r} defines no zero-shot "
                       "classes")
  pooled = align.prompt_features(tcfg, feature_dir, mesh, tasks.prompts)
  teacher = Teacher(tcfg, workdir, model, params, step, feature_dir, int(dcfg.width), {})
  teacher.prompts = {t: layers.l2_normalize(teacher.embed(params, p, "text"))
                     for t, p in pooled.items()}
  logging.info("teacher: %s at step %d, width %d, features %s", workdir, step, dcfg.width,
               feature_dir)
  return teacher


# --------------------------------------------------------------------------------------------
# Data: raw views of the cached examples.


class ViewSource:
  """Rows of one split held in memory for the student: `rgb` uint8 `[N, H, W, 3]`, `depth`
  float32 `[N, H, W]`, the teacher's cached image features `teacher` `[N, D]`, `label` (the
  pseudo-label, or -1), `group`, `index` (row in this source); `get_batch` as grain wants."""

  def __init__(self, arrays: Dict[str, np.ndarray], ids: Sequence[str]):
    self.arrays, self.ids = arrays, list(ids)
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or len(self.ids) != len(arrays["rgb"]):
      raise ValueError(f"ViewSource: arrays of different lengths {sizes}, {len(self.ids)} ids")

  def __len__(self) -> int:
    return len(self.ids)

  def get_batch(self, indices, epoch: int = 0, seed: int = 0) -> Dict[str, np.ndarray]:
    del epoch, seed
    indices = np.asarray(indices, np.int64)
    out = {k: v[indices] for k, v in self.arrays.items()}
    out["index"] = indices
    return out

  def batch_ids(self, batch) -> list:
    return [self.ids[i] if i >= 0 else "<pad>" for i in np.asarray(batch["index"]).tolist()]

  def subset(self, rows: np.ndarray, **extra: np.ndarray) -> "ViewSource":
    arrays = {k: v[rows] for k, v in self.arrays.items()}
    arrays.update(extra)
    return ViewSource(arrays, [self.ids[i] for i in rows])


def load_views(teacher: Teacher, split: str) -> ViewSource:
  """The cached rows of `split` with both raw views rendered from the synthetic set that the
  teacher's features were extracted from (rows matched by example id)."""
  tcfg = teacher.config
  if tcfg.data.source != "synthetic":
    raise TeacherError(f"the depth view exists for the synthetic set only; the teacher's data "
                       f"source is {tcfg.data.source!r}")
  cache = pipeline.FeatureSource(os.path.join(teacher.feature_dir, split), ("image",),
                                 keys=("pooled",))
  data = cache.get_batch(np.arange(len(cache)), 0)
  dataset = sources.synthetic_dataset(tcfg.data)
  n = dataset.num_examples(split)
  by_id = {dataset.example_id(split, i): i for i in range(n)}
  missing = [i for i in cache.ids if i not in by_id]
  if missing:
    raise TeacherError(f"{teacher.feature_dir}/{split}: cached ids {missing[:3]} are not in the "
                       f"synthetic set of the teacher's config (another seed or size?)")
  rows = [by_id[i] for i in cache.ids]
  rgb = np.stack([dataset.render_rgb(split, i) for i in rows])
  dep = np.stack([dataset.render_depth(split, i) for i in rows])
  groups = dataset.groups(split)[rows]
  if not np.array_equal(groups, data["group"]):
    raise TeacherError(f"{teacher.feature_dir}/{split}: cached groups differ from the synthetic "
                       "set's; the cache was extracted from other data")
  return ViewSource({"rgb": rgb, "depth": dep, "teacher": data["image/pooled"].astype(np.float32),
                     "group": groups.astype(np.int32),
                     "label": np.full(len(rows), -1, np.int32)}, cache.ids)


# --------------------------------------------------------------------------------------------
# Loss.


def make_loss_fn(student: Student, teacher: Teacher, dcfg, stage: int):
  """student_params, frozen {"teacher": params}, batch, rng -> (loss, metrics).

  Stage 1: sum over views of L1(student(view), teacher(rgb)). Stage 2:
  `stage2_triplet_weight` x the sum over views of the semi-hard triplet loss on the
  pseudo-labels plus `stage2_distill_weight` x the stage-1 loss (triplet weight 0: plain QAT).
  """
  views = tuple(dcfg.views)

  def loss_fn(params, frozen, batch, rng):
    target = teacher.model.apply(frozen["teacher"], {"image/pooled": batch["teacher"]}, "image",
                                 method=align.Aligner.embed)[teacher.width]
    rngs = quant.train_rngs(student, rng)
    metrics, distill, triplet = {}, 0.0, 0.0
    for view in views:
      z = student.apply(params, view_pixels(batch, view), rngs=rngs)
      d = losses.distillation_loss(z, target, "l1")
      metrics[f"l1/{view}"] = d
      distill = distill + d
      if stage == 2 and dcfg.stage2_triplet_weight:
        t = losses.semi_hard_triplet_loss(z, batch["label"], dcfg.margin, dcfg.num_negatives)
        metrics[f"triplet/{view}"] = t
        triplet = triplet + t
    if stage == 1:
      return distill, metrics
    return (dcfg.stage2_triplet_weight * triplet + dcfg.stage2_distill_weight * distill,
            metrics)

  return loss_fn


# --------------------------------------------------------------------------------------------
# Evaluation.


def _retrieval(z: np.ndarray, z_text: np.ndarray, groups: np.ndarray, prefix: str):
  positives = groups[:, None] == groups[None, :]
  scores = evaluate.retrieval_metrics(z @ z_text.T, positives)
  return {f"{prefix}/{k}": v for k, v in scores.items()}


def student_fn(module: Student) -> Any:
  """`(variables, pixels) -> [B, width]` jitted for `module` in its quant mode (float, QAT
  fake-quant or SERVE)."""
  rngs = quant.train_rngs(module, jax.random.key(0))
  return jax.jit(lambda v, px: module.apply(v, px, rngs=rngs))


class Evaluator:
  """Zero-shot accuracy per view and attribute and view-to-text retrieval on `eval.split`,
  for the student (every eval, or `scores_of` any serving form) and the teacher (once)."""

  def __init__(self, student: Student, teacher: Teacher, config, mesh):
    self.student, self.teacher, self.config, self.mesh = student, teacher, config, mesh
    split = config.eval.split
    self.views = load_views(teacher, split)
    text = pipeline.FeatureSource(os.path.join(teacher.feature_dir, split), ("text",),
                                  keys=("pooled",))
    self.text_pooled = text.get_batch(np.arange(len(text)), 0)["text/pooled"]
    self.labels = sources.zero_shot(teacher.config.data).labels(self.views.arrays["group"])
    self.batch_size = config.eval.batch_size
    self.apply = student_fn(student)
    self.z_text = layers.l2_normalize(teacher.embed(teacher.params, self.text_pooled, "text"))
    self._teacher_metrics = None

  def embed(self, variables, view: str, apply=None) -> np.ndarray:
    """Student embeddings `[N, width]` of one view of the eval split (`apply` defaults to the
    training-mode student)."""
    apply = apply or self.apply
    out = []
    n = len(self.views)
    for start in range(0, n, self.batch_size):
      rows = np.arange(start, min(n, start + self.batch_size))
      pad = np.full(self.batch_size - len(rows), rows[-1])
      batch = self.views.get_batch(np.concatenate([rows, pad]))
      out.append(np.asarray(apply(variables, view_pixels(batch, view)))[:len(rows)])
    return np.concatenate(out)

  def scores(self, z_views: Dict[str, np.ndarray]) -> Dict[str, float]:
    out = {}
    groups = self.views.arrays["group"]
    for view, z in z_views.items():
      accs = []
      for task, prompts in self.teacher.prompts.items():
        acc = evaluate.zero_shot_classification(z, prompts, self.labels[task])
        out[f"zeroshot/{view}/{task}"] = acc
        accs.append(acc)
      out[f"zeroshot/{view}/mean"] = float(np.mean(accs))
      out.update(_retrieval(z, self.z_text, groups, f"{view}_to_text"))
    return out

  def predictions(self, z: np.ndarray) -> Dict[str, np.ndarray]:
    """Zero-shot class index per task `{task: int [N]}` of embeddings `z [N, width]`."""
    return {task: np.argmax(layers.l2_normalize(z) @ p.T, axis=1)
            for task, p in self.teacher.prompts.items()}

  def scores_of(self, variables, apply=None) -> Dict[str, float]:
    return self.scores({v: self.embed(variables, v, apply) for v in self.config.distill.views})

  def teacher_metrics(self) -> Dict[str, float]:
    if self._teacher_metrics is None:
      z_rgb = self.teacher.embed(self.teacher.params, self.views.arrays["teacher"], "image")
      self._teacher_metrics = {f"teacher/{k}": v for k, v in self.scores({"rgb": z_rgb}).items()}
    return self._teacher_metrics

  def __call__(self, params, frozen, step: int) -> Dict[str, float]:
    del frozen
    metrics = dict(self.teacher_metrics())
    metrics.update(self.scores_of(params))
    logging.info("step %d: zero-shot mean %s", step, ", ".join(
        f"{v}: {100 * metrics[f'zeroshot/{v}/mean']:.1f}" for v in self.config.distill.views))
    return metrics


def save_float(path: str, params) -> int:
  """Writes a float param tree to one safetensors file (keys `a/b/leaf`); returns its bytes."""
  from safetensors.numpy import save_file
  from flax import traverse_util
  flat = {"/".join(k): np.ascontiguousarray(np.asarray(v))
          for k, v in traverse_util.flatten_dict(nn.meta.unbox(dict(params))).items()}
  save_file(flat, path + ".tmp")
  os.replace(path + ".tmp", path)
  return os.path.getsize(path)


def latency_ms(fn, variables, pixels: np.ndarray, repeats: int) -> float:
  """Median wall time in ms of `fn(variables, pixels)` (compiled and warmed up first)."""
  x = jnp.asarray(pixels)
  jax.block_until_ready(fn(variables, x))
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, x))
    times.append(time.perf_counter() - t0)
  return 1000.0 * float(np.median(times))


def latencies(fn, variables, config) -> Dict[str, float]:
  """`{"b{B}_ms": ...}` of `fn` at each batch of `eval.latency_batches`, on one device."""
  size = int(config.student.image_size)
  variables = jax.device_put(jax.tree.map(np.asarray, variables), jax.local_devices()[0])
  return {f"b{b}_ms": latency_ms(fn, variables, np.zeros((int(b), size, size, 3), np.float32),
                                 config.eval.latency_repeats)
          for b in config.eval.latency_batches}


def int8_serving(student: Student, variables, train_views: "ViewSource", config):
  """(serving module, serving tree) of the student: CONVERT of its QAT params when it was
  built with a `Quant`, post-training quantization (calibrate + CONVERT) of its float params
  otherwise; calibrated on `quant.calibration_batches` training batches of both views."""
  n = min(len(train_views), config.quant_eval.calibration_batches * config.eval.batch_size)
  batches = []
  for start in range(0, n, config.eval.batch_size):
    batch = train_views.get_batch(np.arange(start, min(n, start + config.eval.batch_size)))
    batches += [(view_pixels(batch, v),) for v in config.distill.views]
  variables = {"params": variables["params"]}
  if student.quant is None:
    qconfig = quant.QuantConfig.from_dict(dict(config.quant, kind="int8"))
    module, served, _ = quant.ptq(student, variables, batches, qconfig)
    return module, served
  cal = quant.calibrate(student, variables, batches)
  return quant.serving_module(student), quant.convert(student, variables, cal)


def edge_report(student: Student, params, evaluator: Evaluator, train_views: "ViewSource",
                config, workdir: str) -> Dict[str, float]:
  """The served forms of the trained student, written to the workdir and measured:
  `student_float32.safetensors` (the float params; for a QAT student the float shadow weights)
  and `student_int8.safetensors` (int8 serving tree: CONVERT after QAT, PTQ after float
  training), plus `calibration.npz` (`pixels [64, H, W, 3]`, training inputs of both views,
  the representative set of a TFLite export). Metrics: `size/{float32|int8}_MB` on disk, `latency/{float32|int8}/b{B}_ms`, and
  the int8 model's accuracies under `int8/` (the trained model's own are unprefixed)."""
  float_student = student.clone(quant=None)
  spec = {"vit": dataclasses.asdict(student.vit_config), "width": student.width,
          "quant": dict(config.quant, kind="int8")}
  with open(os.path.join(workdir, STUDENT_SPEC + ".tmp"), "w") as f:
    json.dump(spec, f, indent=1, sort_keys=True)
  os.replace(os.path.join(workdir, STUDENT_SPEC + ".tmp"), os.path.join(workdir, STUDENT_SPEC))
  out = {"size/float32_MB": save_float(os.path.join(workdir, "student_float32.safetensors"),
                                       params) / 2**20}
  for k, v in latencies(student_fn(float_student), params, config).items():
    out[f"latency/float32/{k}"] = v
  module, served = int8_serving(student, params, train_views, config)
  sample = train_views.get_batch(np.arange(min(len(train_views), CALIBRATION_IMAGES // 2)))
  pixels = np.concatenate([np.asarray(view_pixels(sample, v)) for v in config.distill.views])
  np.savez(os.path.join(workdir, CALIBRATION_FILE + ".tmp.npz"), pixels=pixels)
  os.replace(os.path.join(workdir, CALIBRATION_FILE + ".tmp.npz"),
             os.path.join(workdir, CALIBRATION_FILE))
  out["size/int8_MB"] = quant.save_serving(os.path.join(workdir, "student_int8.safetensors"),
                                           served) / 2**20
  serve = student_fn(module)
  for k, v in latencies(serve, served, config).items():
    out[f"latency/int8/{k}"] = v
  for k, v in evaluator.scores_of(served, serve).items():
    out[f"int8/{k}"] = v
  return out


# --------------------------------------------------------------------------------------------
# The task.


def load_student(workdir: str):
  """The served students a distill run wrote: `(float module, float variables, int8 serving
  module, int8 serving tree)`; the trees checked against the modules (a named error when they
  belong to another architecture)."""
  path = os.path.join(workdir, STUDENT_SPEC)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: the distill run in {workdir} has not "
                            "finished")
  with open(path) as f:
    spec = json.load(f)
  float_student = Student(vit.ViTConfig(**spec["vit"]), int(spec["width"]))
  size = float_student.vit_config.image_size
  example = (jnp.zeros((1, size, size, 3), jnp.float32),)
  from safetensors.numpy import load_file
  from flax import traverse_util
  flat = load_file(os.path.join(workdir, "student_float32.safetensors"))
  variables = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                            for k, v in flat.items()})
  want = quant.expected_trees(float_student.clone(quant=quant.int8()), example)
  quant.check_tree({"params": variables["params"]}, {"params": want["params"]},
                   "student_float32.safetensors")
  int8_student = quant.serving_module(
      float_student.clone(quant=quant.from_config(spec["quant"], "train")))
  served = quant.load_serving(os.path.join(workdir, "student_int8.safetensors"), int8_student,
                              example)
  return float_student, variables, int8_student, served


def export_spec(arg: str):
  """`export.py`'s factory for a distill run's int8 student: `arg` is `WORKDIR[,BATCH]`
  (default batch 1); the representative set is the run's `calibration.npz`.

    python -m edgeglass_jax.export export --factory=edgeglass_jax.tasks.distill:export_spec \
        --arg=runs/distill/s2,1 --out=runs/distill/s2/export
  """
  from edgeglass_jax import export
  workdir, _, batch = arg.partition(",")
  batch = int(batch or 1)
  _, _, module, served = load_student(workdir)
  pixels = np.load(os.path.join(workdir, CALIBRATION_FILE))["pixels"]
  if len(pixels) < batch:
    raise ValueError(f"{workdir}/{CALIBRATION_FILE} holds {len(pixels)} images, fewer than "
                     f"the export batch {batch}")
  representative = [(pixels[i:i + batch],) for i in range(0, len(pixels) - batch + 1, batch)]
  return export.ExportSpec(module, served, representative[0], representative)


def build_student(config, quant=None) -> Student:
  return Student(student_vit_config(config.student), int(config.distill.width), quant=quant)


def curated_train(teacher: Teacher, dcfg) -> Tuple[ViewSource, Dict[str, float]]:
  """Stage 0: the training rows the teacher is most sure of, with their pseudo-labels."""
  views = load_views(teacher, teacher.config.train.split)
  z = teacher.embed(teacher.params, views.arrays["teacher"], "image")
  tasks = tuple(dcfg.label_tasks)
  unknown = sorted(set(tasks) - set(teacher.prompts))
  if unknown:
    raise ValueError(f"distill.label_tasks {unknown} are not zero-shot tasks of the teacher's "
                     f"data; known: {sorted(teacher.prompts)}")
  confidence, label = zero_shot_confidence(z, [teacher.prompts[t] for t in tasks],
                                           dcfg.confidence_scale)
  keep = curate(confidence, dcfg.tau)
  truth = sources.zero_shot(teacher.config.data).labels(views.arrays["group"])
  radix = np.zeros(len(views), np.int64)
  for t in tasks:
    radix = radix * len(teacher.prompts[t]) + truth[t]
  stats = {"curation/kept": float(len(keep)), "curation/of": float(len(views)),
           "curation/pseudo_label_acc_kept": float(np.mean(label[keep] == radix[keep])),
           "curation/pseudo_label_acc_all": float(np.mean(label == radix)),
           "curation/min_confidence_kept": float(confidence[keep].min())}
  logging.info("curation: kept %d of %d (tau %.2f), pseudo-labels right on %.1f%% of the kept, "
               "%.1f%% of all", len(keep), len(views), dcfg.tau,
               100 * stats["curation/pseudo_label_acc_kept"],
               100 * stats["curation/pseudo_label_acc_all"])
  return views.subset(keep, label=label[keep].astype(np.int32)), stats


def init_from(config, student: Student, example: jax.Array, mesh):
  """Stage 2's initial params: the final student params of stage 1's workdir, boxed like
  `student`'s init."""
  float_student = build_student(config)
  boxed = jax.eval_shape(lambda r: float_student.init(r, example), jax.random.key(0))
  task = loop.Task(init_params=lambda r: float_student.init(r, example), loss_fn=None,
                   train_iter=None)
  abstract, _ = loop.abstract_state(task, loop.make_optimizer(config.train), mesh,
                                    jax.random.key(0))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
  directory = os.path.join(config.distill.init_workdir, "checkpoints")
  step, params = loop.restore_params(directory, abstract)
  logging.info("stage 2 starts from %s at step %d", directory, step)
  params = jax.tree.map(np.asarray, params)
  return loop.with_logical_axes(boxed, params)


@dataclasses.dataclass
class Parts:
  """What a distill run is made of: the loop's task and the pieces the end-of-run report
  needs."""
  task: loop.Task
  student: Student
  evaluator: Evaluator
  train_views: ViewSource
  curation: Dict[str, float]


def build(config, workdir: str, mesh) -> Parts:
  """The stage's teacher, curated data, student (int8 QAT when `config.quant.kind` is "int8"),
  loss and evaluator on the run's `mesh`."""
  del workdir
  dcfg = config.distill
  stage = int(dcfg.stage)
  if stage not in (1, 2):
    raise ValueError(f"config.distill.stage must be 1 or 2, got {stage}")
  unknown = sorted(set(dcfg.views) - set(VIEWS))
  if unknown or not dcfg.views:
    raise ValueError(f"config.distill.views {list(dcfg.views)}: use some of {VIEWS}")
  if stage == 2 and not dcfg.init_workdir:
    raise ValueError("config.distill.stage=2 needs distill.init_workdir (stage 1's workdir)")
  teacher = load_teacher(dcfg, mesh)
  if int(config.student.image_size) != int(teacher.config.data.synthetic.image_size):
    raise ValueError(f"config.student.image_size={config.student.image_size} differs from the "
                     f"teacher's images ({teacher.config.data.synthetic.image_size} px)")
  train_views, curation = curated_train(teacher, dcfg)
  student = build_student(config, quant.from_config(config.quant, "train"))
  example = view_pixels(train_views.get_batch(np.arange(2)), "rgb")
  train_iter = pipeline.make_train_loader(train_views, config.train.batch_size, config.seed,
                                          jax.process_index(), jax.process_count())
  if stage == 1:
    init = lambda rng: student.init(rng, example)
  else:
    start = init_from(config, student, example, mesh)
    init = lambda rng: start
  evaluator = Evaluator(student, teacher, config, mesh)
  task = loop.Task(
      init_params=init,
      loss_fn=make_loss_fn(student, teacher, dcfg, stage),
      train_iter=train_iter,
      evaluate=evaluator,
      batch_ids=train_views.batch_ids,
      frozen={"teacher": teacher.params},
      frozen_source=f"{teacher.workdir} step {teacher.step}")
  return Parts(task, student, evaluator, train_views, curation)


def make_task(config, workdir: str, mesh) -> loop.Task:
  return build(config, workdir, mesh).task


def run(config, workdir: str) -> dict:
  """Trains (or resumes) the stage, then measures the served float32 and int8 students."""
  parts = {}

  def make(config, workdir, mesh):
    parts["run"] = build(config, workdir, mesh)
    return parts["run"].task

  result = loop.run(config, workdir, make)
  state = result.pop("state")
  result.pop("frozen", None)
  p = parts["run"]
  result["metrics"].update(p.curation)
  if jax.process_index() == 0:
    result["metrics"].update(edge_report(p.student, state.params, p.evaluator, p.train_views,
                                         config, workdir))
  return result
