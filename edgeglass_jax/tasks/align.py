"""Task `align`: adapters map cached frozen features of image, audio and text into one
Matryoshka-nested space, trained with pairwise contrastive losses (+ an optional tri-modal cycle
loss) and evaluated by retrieval in all six directions at every width.

If `config.features_dir` is empty the task first runs extraction into `{workdir}/features`
(resumable), so one command goes from raw data to a retrieval table.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from edgeglass_jax import adapters, evaluate, losses, quant, sharding
from edgeglass_jax.data import pipeline, sources
from edgeglass_jax.tasks import extract, loop


class Aligner(nn.Module):
  """One adapter + Matryoshka head per modality and a learnable temperature (bias) per pair.

  `__call__(batch)` maps `{"{m}/pooled" [B, D_m], "{m}/tokens" [B, N_m, D_m],
  "{m}/token_mask" [B, N_m]}` to `(z, pairs)`: `z = {m: {width: [B, width]}}` (each
  L2-normalised) and `pairs = {"a_b": {"t_prime": [], "b": []}}`, the model's own logit scale and
  bias per trained pair (big_vision two_towers), so a loss never reads parameter paths.
  `quant` (`quant.from_config(config.quant)`) makes every adapter matmul int8 (QAT).
  """
  adapter_configs: Tuple[Tuple[str, adapters.AdapterConfig], ...]
  widths: Tuple[int, ...]
  mrl_e: bool
  pairs: Tuple[Tuple[str, str], ...]
  loss_kind: str = "sigmoid"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  dot_general_cls: object = None
  quant: object = None

  def setup(self):
    self.towers = {m: adapters.ModalityAdapter(cfg, widths=self.widths, mrl_e=self.mrl_e,
                                               dtype=self.dtype, param_dtype=self.param_dtype,
                                               dot_general_cls=self.dot_general_cls,
                                               quant=self.quant, name=m)
                   for m, cfg in self.adapter_configs}
    self.pair_params = self.param(
        "pairs", lambda _: losses.init_pair_params([losses.pair_name(*p) for p in self.pairs],
                                                   self.loss_kind))

  def embed(self, batch, modality: str):
    return self.towers[modality](batch[f"{modality}/pooled"], batch.get(f"{modality}/tokens"),
                                 batch.get(f"{modality}/token_mask"))

  def __call__(self, batch):
    return {m: self.embed(batch, m) for m, _ in self.adapter_configs}, self.pair_params


def build_model(config, feature_dims=None) -> Aligner:
  mcfg, lcfg = config.model, config.loss
  mods = tuple(config.modalities)
  configs = tuple((m, adapters.AdapterConfig.from_dict(dict(mcfg.adapters[m]))) for m in mods)
  pairs = losses.resolve_pairs(lcfg.pairs if lcfg.pairs in ("all", "hub") else
                               tuple(lcfg.pairs), lcfg.hub, modalities=mods)
  return Aligner(configs, tuple(sorted(mcfg.widths, reverse=True)), mcfg.mrl_e, pairs,
                 lcfg.kind, dtype=jnp.dtype(mcfg.dtype),
                 quant=quant.from_config(config.get("quant"), "train"))


def make_loss_fn(model: Aligner, config, mesh=None):
  """params, batch, rng -> (loss, metrics): MRL sum over widths of pair losses (+ cycle).

  `rng` feeds the int8 gradients' stochastic rounding when `config.quant.backward` is set.

  With `config.loss.ring` (sigmoid only) each pair loss is the ring version under `shard_map`
  over the batch axes of `mesh`: no device materialises the global `[N, N]` logits.
  """
  lcfg = config.loss
  sigmoid_fn = None
  if lcfg.ring:
    if lcfg.kind != "sigmoid" or mesh is None:
      raise ValueError("config.loss.ring needs loss.kind='sigmoid' and a mesh")
    sigmoid_fn = lambda za, zb, t, b, mask: losses.sharded_sigmoid_loss(
        za, zb, t, b, mesh, axis=sharding.BATCH_AXES, mask=mask)
  mods = tuple(config.modalities)
  trained = {losses.pair_name(*p) for p in model.pairs}
  pair_weights = {k: float(v) for k, v in dict(lcfg.pair_weights).items() if k in trained}
  use_cycle = lcfg.cycle_weight > 0 and set(mods) >= {"image", "audio", "text"}

  def loss_fn(params, batch, rng):
    z, pair_params = model.apply(params, batch, rngs=quant.train_rngs(model, rng))
    present = {m: batch[f"{m}/valid"] for m in mods}

    def at_width(zw):
      total, metrics = losses.multimodal_contrastive_loss(
          zw, present, pair_params, kind=lcfg.kind, pairs=model.pairs,
          pair_weights=pair_weights or None, sigmoid_fn=sigmoid_fn)
      if use_cycle:
        both = present["image"] & present["audio"] & present["text"]
        cyc = losses.cycle_loss(zw["image"], zw["text"], zw["audio"], lcfg.cycle_temperature,
                                mask=both)
        metrics["cycle"] = cyc
        total = total + lcfg.cycle_weight * cyc
      return total, metrics

    by_width = {w: {m: z[m][w] for m in mods} for w in model.widths}
    weights = list(lcfg.mrl_weights) if lcfg.mrl_weights else None
    return losses.matryoshka_loss(at_width, by_width, model.widths, weights)

  return loss_fn


def _feature_dir(config, workdir):
  return config.get("features_dir") or extract.features_dir(config, workdir)


def ensure_features(config, workdir: str) -> str:
  """Extracts features unless `config.features_dir` names a finished cache; returns its dir."""
  out = _feature_dir(config, workdir)
  splits = [config.train.split] + list(config.eval.splits)
  if all(os.path.isfile(os.path.join(out, s, "index.json")) for s in splits):
    return out
  if config.get("features_dir"):
    raise FileNotFoundError(f"config.features_dir={out} lacks finished splits {splits}")
  logging.info("no feature cache in %s yet: extracting", out)
  extract.run(config, workdir)
  return out


def prompt_features(config, feature_dir: str, mesh, prompts: Dict[str, list]):
  """Frozen-text-encoder features of zero-shot class prompts, cached on disk.

  `prompts` is `{task: [C texts]}` (from the data source); returns `{task: pooled [C, D]}`, or
  None when there is no text modality. The cache `{feature_dir}/prompts.safetensors` is written
  once, on first use.
  """
  if "text" not in config.modalities:
    return None
  from safetensors.numpy import load_file, save_file
  from edgeglass_jax import features
  path = os.path.join(feature_dir, "prompts.safetensors")
  if not os.path.isfile(path):
    encoder = features.build_encoder("text", config.encoders.text)
    runner = features.Runner(encoder, mesh, 64, False, np.float32)
    save_file({task: runner(list(texts))["pooled"] for task, texts in prompts.items()},
              path + ".tmp")
    os.replace(path + ".tmp", path)
  cached = load_file(path)
  missing = sorted(set(prompts) - set(cached))
  if missing:
    raise KeyError(f"{path} has no prompt features for zero-shot tasks {missing}; delete it to "
                   "rebuild it")
  return {task: cached[task] for task in prompts}


class Evaluator:
  """Embeds whole eval splits with the current params and scores six-direction retrieval, and
  zero-shot classification when the data source defines class prompts (`sources.zero_shot`)."""

  def __init__(self, model: Aligner, config, feature_dir: str, mesh):
    self.model, self.config, self.mesh = model, config, mesh
    mods = tuple(config.modalities)
    self.sources = {s: pipeline.FeatureSource(os.path.join(feature_dir, s), mods,
                                              keys=feature_keys(config))
                    for s in config.eval.splits}
    self.batch_size = config.eval.batch_size
    self.apply = jax.jit(self._embed_batch, out_shardings=sharding.replicated(mesh))
    self.tasks = sources.zero_shot(config.data)
    self.prompts = None if self.tasks is None else prompt_features(config, feature_dir, mesh,
                                                                   self.tasks.prompts)
    rngs = quant.train_rngs(model, jax.random.key(0))  # int8 gradients' rounding: unused here
    self.embed_text = jax.jit(lambda p, pooled: model.apply(
        p, {"text/pooled": pooled}, "text", method=Aligner.embed, rngs=rngs))
    self.rngs = rngs

  def zero_shot(self, params, z, present, groups) -> Dict[str, float]:
    """Accuracy of classifying each task's classes from image/audio embeddings by text prompts."""
    labels = self.tasks.labels(groups)
    out = {}
    for task, pooled in self.prompts.items():
      prompts = self.embed_text(params, pooled)
      for m in z:
        if m == "text" or not present[m].any():
          continue
        for w in self.model.widths:
          out[f"zeroshot/{m}/{task}@d{w}"] = evaluate.zero_shot_classification(
              z[m][w], np.asarray(prompts[w]), labels[task], mask=present[m])
    return out

  def _embed_batch(self, params, batch):
    """Embeddings and row bookkeeping of one global batch, replicated to every process."""
    keys = ["mask", "group"] + [f"{m}/valid" for m in self.config.modalities]
    return self.model.apply(params, batch, rngs=self.rngs)[0], {k: batch[k] for k in keys}

  def embed(self, params, split: str):
    mods = tuple(self.config.modalities)
    z = {m: {w: [] for w in self.model.widths} for m in mods}
    present = {m: [] for m in mods}
    groups = []
    for batch in pipeline.make_eval_batches(self.sources[split], self.batch_size,
                                            jax.process_index(), jax.process_count()):
      out, rows = self.apply(params, sharding.shard_batch(batch, self.mesh))
      keep = np.asarray(rows["mask"])
      for m in mods:
        present[m].append(np.asarray(rows[f"{m}/valid"])[keep])
        for w in self.model.widths:
          z[m][w].append(np.asarray(out[m][w])[keep])
      groups.append(np.asarray(rows["group"])[keep])
    return ({m: {w: np.concatenate(v) for w, v in zw.items()} for m, zw in z.items()},
            {m: np.concatenate(v) for m, v in present.items()}, np.concatenate(groups))

  def __call__(self, params, step: int) -> Dict[str, float]:
    metrics = {}
    for split in self.config.eval.splits:
      z, present, groups = self.embed(params, split)
      scores = {}
      for w in self.model.widths:  # each width's own head output (prefixes only under MRL-E)
        scores.update(evaluate.six_direction_retrieval({m: z[m][w] for m in z}, groups,
                                                       widths=[w], present=present))
      if self.prompts is not None:
        scores.update(self.zero_shot(params, z, present, groups))
      prefix = "" if split == self.config.eval.splits[-1] else f"{split}/"
      metrics.update({prefix + k: v for k, v in scores.items()})
      if jax.process_index() == 0:
        curve = evaluate.matryoshka_curve(scores)
        logging.info("step %d, %s retrieval:\n%s\nMatryoshka curve (mean R@1 over directions): "
                     "%s", step, split, evaluate.format_table(scores),
                     ", ".join(f"d{w}: {100 * v:.1f}" for w, v in curve.items()))
    return metrics


def feature_keys(config) -> Dict[str, Tuple[str, ...]]:
  """Cached fields each modality's adapter reads: `pooled` alone for "mlp" adapters, so their
  `[B, N, D]` tokens never leave the cache; every cached field for the token adapters."""
  return {m: ("pooled",) for m in config.modalities
          if config.model.adapters[m].kind == "mlp"}


def restore_trained(config, workdir: str, feature_dir: str, mesh) -> Tuple[Aligner, dict, int]:
  """(model, numpy params, step) of the align run in `workdir`, trained with `config` on the
  features cached in `feature_dir`: what later tasks start from (a distilled student's teacher,
  an assistant's bridge). Another model's checkpoint raises `loop.CheckpointMismatchError`, none
  `FileNotFoundError`; nothing is written."""
  model = build_model(config)
  source = pipeline.FeatureSource(os.path.join(feature_dir, config.train.split),
                                  tuple(config.modalities), keys=feature_keys(config))
  example = source.get_batch(np.arange(2), 0)
  task = loop.Task(init_params=lambda r: model.init(r, example), loss_fn=None, train_iter=None)
  abstract, _ = loop.abstract_state(task, loop.make_optimizer(config.train), mesh,
                                    jax.random.key(0))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
  step, params = loop.restore_params(os.path.join(workdir, "checkpoints"), abstract)
  return model, jax.tree.map(np.asarray, params), step


def make_task(config, workdir: str, mesh) -> loop.Task:
  """The align task's model, loss, data and eval on the run's `mesh` for the shared loop
  (features extracted first)."""
  feature_dir = ensure_features(config, workdir)
  mods = tuple(config.modalities)
  train_src = pipeline.FeatureSource(os.path.join(feature_dir, config.train.split), mods,
                                     keys=feature_keys(config), seed=config.seed)
  model = build_model(config)
  example = train_src.get_batch(np.arange(2), 0)
  train_iter = pipeline.make_train_loader(train_src, config.train.batch_size, config.seed,
                                          jax.process_index(), jax.process_count())
  evaluator = Evaluator(model, config, feature_dir, mesh)
  return loop.Task(
      init_params=lambda rng: model.init(rng, example),
      loss_fn=make_loss_fn(model, config, mesh),
      train_iter=train_iter,
      evaluate=evaluator,
      batch_ids=train_src.batch_ids)


def run(config, workdir: str) -> dict:
  result = loop.run(config, workdir, make_task)
  result.pop("state", None)
  return result
