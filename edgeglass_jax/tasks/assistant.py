"""Task `assistant`: a bridge from frozen image/audio encoders into a frozen LM (+ LoRA) that
captions, describes sounds and answers questions; three stages, each its own resumable run.

Sequence (PaliGemma, big_vision `paligemma.py`): `[image tokens][audio tokens] BOS prompt SEP
answer EOS PAD`. The soft tokens are the bridge's output for the frozen encoders' cached token
features; an example without an image (or a sound) keeps its slots, masked out of
`input_mask`, so shapes never change. `mask_ar` is 0 over the prefix (soft tokens, BOS,
prompt, SEP: bidirectional) and 1 over answer, EOS and padding (causal); `mask_loss` is 1 on
the answer and EOS. The loss is the cross-entropy of those tokens, averaged per example, then
over the batch. Positions count valid tokens only, so masked slots change nothing.

Stages (`config.stage`, one workdir each; `config.init_from` names the previous stage's):
- "caption": the bridge alone learns to caption images and describe sounds; LM frozen.
- "qa": bridge + LoRA on attribute questions, descriptions and text-only instructions; starts
  from the caption stage's bridge.
- "dpo": DPO (`losses.dpo_loss`) on minimal-edit preference pairs against a frozen reference
  copy of the qa model (the policy starts equal to it); pairs are the canonical answer vs the
  same sentence with one attribute word changed, plus the qa model's own wrong answers on
  training questions, corrected by one word.

Data: `data/qa.py` over the synthetic set; features come from the feature cache
(`config.features_dir`, else the `init_from` run's, else extracted into `{workdir}/features`).
Evaluation on the held-out split (attribute combinations never seen in training):
`qa/{image|audio|text}/{attribute}` exact-match accuracy with `.../majority` (the accuracy of
always answering the training split's most frequent value) beside it, `caption/{m}/attributes`
(share of the 4 attribute values a generated description names), `ppl` (answer tokens),
`spoken/accuracy` vs `typed/accuracy` on the same questions (spoken by espeak-ng, transcribed by
`asr.transcribe`), and for DPO `dpo/preference_accuracy` (implicit reward of chosen > rejected),
`dpo/logp_accuracy` (policy log-prob of chosen > rejected; `_before`: the reference) and every
answer metric before DPO (`before/...`).

Each finished run writes `{workdir}/assistant/{config.json, params.msgpack}`;
`load_assistant(workdir)` turns that into an `Assistant` that runs the frozen encoders on raw
inputs, the bridge and the LoRA-merged LM through `generate.generate` (prefix-LM prefill).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import linen as nn

from edgeglass_jax import adapters, decoder, features, generate, layers, losses, peft, whitening
from edgeglass_jax import configs as config_lib
from edgeglass_jax.data import pipeline, qa, sources, synthetic
from edgeglass_jax.tasks import align, extract, lm_lora, loop

STAGES = ("caption", "qa", "dpo")
BRIDGE_MODALITIES = ("image", "audio")
BRIDGE_KINDS = ("perceiver", "compress", "mlp")
EXPORT_DIR = "assistant"


class NoAssistantError(FileNotFoundError):
  """The workdir holds no trained assistant (no finished stage exported into it)."""


class QuestionTooLongError(ValueError):
  """Soft tokens + question + answer budget exceed the LM's context."""


class InputError(ValueError):
  """An input given to `Assistant.answer` has the wrong shape, type or values."""


# ------------------------------------------------------------------------------------- bridge


def group_frames(tokens: jax.Array, mask: jax.Array, factor: int
                 ) -> Tuple[jax.Array, jax.Array]:
  """1-D space-to-depth: `[B, N, D]`, `[B, N]` -> `[B, ceil(N/f), f*D]`, `[B, ceil(N/f)]`;
  a group is valid when any of its frames is (the tail is zero-padded)."""
  b, n, d = tokens.shape
  pad = -n % factor
  tokens = jnp.pad(tokens, ((0, 0), (0, pad), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, pad)))
  return (tokens.reshape(b, -1, factor * d), mask.reshape(b, -1, factor).any(-1))


def leading_cls(cfg: adapters.AdapterConfig, grid: bool, num_tokens: int) -> bool:
  """Whether a modality's `num_tokens` tokens start with a CLS token: grid (image) modalities
  whose count is a square + 1, or as `cfg.has_cls` says (see `adapters.grid_side`)."""
  return grid and adapters.grid_side(num_tokens, 1, cfg.has_cls)[1]


class ModalityBridge(nn.Module):
  """One modality's token features -> LM-width soft tokens.

  `(tokens [B, N, D], token_mask [B, N], valid [B])` -> `(soft [B, K, width], mask [B, K])`.
  kind "perceiver": K = `num_latents` latents of a `PerceiverResampler`; "compress":
  `TokenCompressor` (space-to-depth by `factor` x `factor` of the square patch grid, and with
  `keep_cls` the CLS token as one more; 1-D groups of `factor` frames for audio), then residual
  MLP blocks, K = N / factor^2 (+ 1) (or N / factor);
  "mlp": a per-token `MLPProjector`, K = N. Then LayerNorm, Dense to `width`, times
  `out_scale` (the LM's embedding RMS). Rows with `valid` False give zeros and an all-False mask.
  With `whiten`, the tokens are ZCA-whitened first (`whitening.Whiten`; a grid's CLS token with
  its own statistics), with fixed statistics of the training split.
  """
  config: adapters.AdapterConfig
  width: int
  grid: bool
  out_scale: float = 1.0
  whiten: bool = False

  @nn.compact
  def __call__(self, tokens, token_mask, valid):
    cfg = self.config
    tokens = tokens.astype(jnp.float32)
    if self.whiten:
      tokens = whitening.Whiten(leading_cls(cfg, self.grid, tokens.shape[1]),
                                name="whiten")(tokens)
    token_mask = token_mask.astype(bool) & valid[:, None]
    # A row without valid tokens attends to its (zero) tokens instead of to nothing.
    kv_mask = token_mask | ~token_mask.any(-1, keepdims=True)
    if cfg.kind == "perceiver":
      h = adapters.PerceiverResampler(cfg.num_latents, cfg.hidden, cfg.depth, cfg.num_heads,
                                      cfg.mlp_ratio, name="resampler")(tokens, kv_mask)
      mask = jnp.broadcast_to(valid[:, None], h.shape[:2])
    elif cfg.kind == "compress":
      if self.grid:
        compressor = adapters.TokenCompressor(cfg.factor, cfg.hidden, cfg.has_cls,
                                              cfg.keep_cls, name="compressor")
        h, mask = compressor(tokens), compressor.compress_mask(token_mask)
      else:
        if cfg.keep_cls:
          raise ValueError("bridge kind 'compress' with keep_cls=True needs image tokens with a "
                           "CLS token; frames of sound have none")
        grouped, mask = group_frames(tokens, token_mask, cfg.factor)
        h = layers.Dense(cfg.hidden, kernel_axes=("mlp", "embed"), name="compressor")(grouped)
      h = adapters.MLPProjector(cfg.hidden, depth=cfg.depth, mlp_ratio=cfg.mlp_ratio,
                                in_proj=False, name="projector")(h)
    elif cfg.kind == "mlp":
      h = adapters.MLPProjector(cfg.hidden, depth=cfg.depth, mlp_ratio=cfg.mlp_ratio,
                                name="projector")(tokens)
      mask = token_mask
    else:
      raise ValueError(f"bridge kind {cfg.kind!r} is not one of {BRIDGE_KINDS}")
    h = layers.LayerNorm(name="out_norm")(h)
    soft = layers.Dense(self.width, kernel_axes=("mlp", "embed"), name="to_lm")(h)
    soft = soft * jnp.float32(self.out_scale)
    return jnp.where(mask[..., None], soft, 0.0), mask


class Bridge(nn.Module):
  """Every bridged modality, in `BRIDGE_MODALITIES` order.

  `batch` holds `"{m}/tokens" [B, N_m, D_m]`, `"{m}/token_mask" [B, N_m]`, `"{m}/valid" [B]`;
  returns `(soft [B, K, width], mask [B, K])` with `K = sum_m K_m`.
  """
  modalities: Tuple[Tuple[str, adapters.AdapterConfig, bool], ...]
  width: int
  out_scale: float = 1.0
  whiten: bool = False

  @nn.compact
  def __call__(self, batch):
    softs, masks = [], []
    for m, cfg, grid in self.modalities:
      s, k = ModalityBridge(cfg, self.width, grid, self.out_scale, self.whiten, name=m)(
          batch[f"{m}/tokens"], batch[f"{m}/token_mask"], batch[f"{m}/valid"])
      softs.append(s)
      masks.append(k)
    return jnp.concatenate(softs, 1), jnp.concatenate(masks, 1)


# ----------------------------------------------------------------------------------- sequence


def text_sequence(bos: int, prompt: Sequence[int], sep: Sequence[int],
                  answer: Optional[Sequence[int]], eos: int, pad: int, max_len: int
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """`BOS prompt SEP answer EOS PAD` of `max_len` -> (ids int32, valid bool, mask_ar int32,
  mask_loss float32), each `[max_len]`. `answer=None` gives the prefix alone (for decoding).
  Raises ValueError when it does not fit."""
  prefix = [bos, *prompt, *sep]
  suffix = [] if answer is None else [*answer, eos]
  n = len(prefix) + len(suffix)
  if n > max_len:
    raise ValueError(f"BOS + prompt + SEP + answer + EOS is {n} tokens, more than max_len="
                     f"{max_len}")
  ids = np.full(max_len, pad, np.int32)
  ids[:n] = prefix + suffix
  valid = np.arange(max_len) < n
  mask_ar = (np.arange(max_len) >= len(prefix)).astype(np.int32)
  mask_loss = (valid & (mask_ar == 1)).astype(np.float32)
  return ids, valid, mask_ar, mask_loss


def full_masks(soft_mask: jax.Array, text_valid: jax.Array, text_ar: jax.Array,
               sink: bool = False) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Soft-token + text masks -> (input_mask [B, L], mask_ar [B, L], positions [B, L]).

  With `sink`, L has one more slot in front: a sink token (see `Model.sink`) with `mask_ar` 1,
  and the first valid slot behind it gets `mask_ar` 1 too (a valid one, so that dropping the
  masked slots keeps it), so the sink sees only itself while the prefix behind it sees the
  sink and itself bidirectionally."""
  b = soft_mask.shape[0]
  lead_mask, lead_ar = ([jnp.ones((b, 1), bool)], [jnp.ones((b, 1), jnp.int32)]) if sink else \
      ([], [])
  input_mask = jnp.concatenate(lead_mask + [soft_mask.astype(bool), text_valid.astype(bool)], 1)
  mask_ar = jnp.concatenate(lead_ar + [jnp.zeros(soft_mask.shape, jnp.int32),
                                       text_ar.astype(jnp.int32)], 1)
  if sink:
    first = jnp.argmax(input_mask[:, 1:], axis=1) + 1
    mask_ar = jnp.where(jnp.arange(mask_ar.shape[1]) == first[:, None], 1, mask_ar)
  positions = jnp.maximum(jnp.cumsum(input_mask, 1) - 1, 0).astype(jnp.int32)
  return input_mask, mask_ar, positions


# -------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class Model:
  """The bridge, the LM and how they are joined; params are passed in, never held.

  `trainable = {"bridge": ..., "lora": ... (stages qa, dpo), "lm": ... (LM trained from
  scratch)}`; `lm_vars` are the frozen LM variables (or None when the LM is trainable).

  `sink`: the sequence starts with one more BOS, which only attends to itself, before the soft
  tokens. A causal LM makes its first token an attention sink (hidden norms ~100x the others
  from its early layers on); in a bidirectional prefix no token sees only itself, and frozen
  SmolLM2 made the soft tokens that hold the object sinks instead, which drowns what they carry.
  """
  bridge: Bridge
  lm: decoder.Decoder
  lora: Optional[peft.LoRAConfig]
  codec: Any
  bos_id: int
  sep_ids: Tuple[int, ...]
  num_soft: int
  sink: bool = False

  @property
  def num_lead(self) -> int:
    """Positions before the text: the sink (if any) and the soft tokens."""
    return self.num_soft + int(self.sink)

  def lm_variables(self, trainable, lm_vars):
    return trainable["lm"] if "lm" in trainable else lm_vars

  def _lm_apply(self, trainable, lm_vars, *args, rng=None, deterministic=True, **kwargs):
    variables = self.lm_variables(trainable, lm_vars)
    if self.lora is not None and "lora" in trainable:
      return peft.apply_with_lora(self.lm, variables, trainable["lora"], *args, config=self.lora,
                                  rng=rng, deterministic=deterministic, **kwargs)
    return self.lm.apply(variables, *args, **kwargs)

  def inputs(self, trainable, lm_vars, batch, prefix: str = ""):
    """(embeds [B, L, W], input_mask [B, L], mask_ar [B, L], positions [B, L])."""
    soft, soft_mask = self.bridge.apply(trainable["bridge"], batch)
    text = self.lm.apply(self.lm_variables(trainable, lm_vars), batch[prefix + "text"],
                         method="embed")
    parts = [soft.astype(text.dtype), text]
    if self.sink:
      bos = jnp.full((text.shape[0], 1), self.bos_id, jnp.int32)
      parts.insert(0, self.lm.apply(self.lm_variables(trainable, lm_vars), bos, method="embed"))
    x = jnp.concatenate(parts, 1)
    return (x,) + full_masks(soft_mask, batch[prefix + "text/valid"], batch[prefix + "text/ar"],
                             self.sink)

  def text_logits(self, trainable, lm_vars, batch, prefix: str = "", rng=None,
                  deterministic=True):
    """Logits predicting each text token `[B, T, V]` (row j predicts `text[:, j]`)."""
    x, input_mask, mask_ar, positions = self.inputs(trainable, lm_vars, batch, prefix)
    attn = decoder.make_prefix_lm_mask(input_mask, mask_ar)
    t = batch[prefix + "text"].shape[1]
    return self._lm_apply(trainable, lm_vars, None, positions, attn, inputs_embeds=x, rng=rng,
                          deterministic=deterministic,
                          logits_slice=(self.num_lead - 1, self.num_lead - 1 + t))

  def answer_nll(self, trainable, lm_vars, batch, prefix: str = "", rng=None,
                 deterministic=True):
    """Per-example summed answer-token NLL and answer-token count, both `[B]`."""
    logits = self.text_logits(trainable, lm_vars, batch, prefix, rng, deterministic)
    return lm_lora.answer_nll(logits, batch[prefix + "text"], batch[prefix + "text/loss"])

  def hidden_norms(self, trainable, lm_vars, batch) -> jax.Array:
    """`[layers, B, L]`: the L2 norm of each position's residual stream after each LM block
    (LoRA merged), 0 at masked slots. An attention sink shows as a norm ~100x the median."""
    x, input_mask, mask_ar, positions = self.inputs(trainable, lm_vars, batch)
    attn = decoder.make_prefix_lm_mask(input_mask, mask_ar)
    _, state = self.lm.apply(self.serving_lm(trainable, lm_vars), None, positions, attn,
                             inputs_embeds=x, mutable=["intermediates"],
                             capture_intermediates=lambda m, _: isinstance(m, decoder.DecoderBlock))
    blocks = state["intermediates"]
    out = [blocks[f"layers_{i}"]["__call__"][0][1] for i in range(len(blocks))]
    return jnp.where(input_mask, jnp.linalg.norm(jnp.stack(out).astype(jnp.float32), axis=-1),
                     0.0)

  def serving_lm(self, trainable, lm_vars):
    variables = self.lm_variables(trainable, lm_vars)
    if self.lora is not None and "lora" in trainable:
      return peft.merge_params(variables, trainable["lora"], self.lora)
    return variables

  def prompt(self, question: str, max_len: int) -> Dict[str, np.ndarray]:
    ids, valid, ar, _ = text_sequence(self.bos_id, self.codec.encode(question), self.sep_ids,
                                      None, self.codec.eos_id, self.codec.pad_id, max_len)
    return {"text": ids, "text/valid": valid, "text/ar": ar}


class Decoding:
  """Greedy answers of a batch of prompts: jitted prefix embeddings, host-side compaction of
  the valid tokens (masked soft slots drop out), then `generate.generate` with `mask_ar`."""

  def __init__(self, model: Model):
    self.model = model
    self._inputs = jax.jit(lambda tr, lm_vars, batch: model.inputs(tr, lm_vars, batch)[:3])
    self._merge = jax.jit(model.serving_lm)

  def prefix(self, trainable, lm_vars, batch):
    x, valid, ar = (np.asarray(a) for a in self._inputs(trainable, lm_vars, batch))
    n = valid.sum(1)
    width = int(n.max())
    embeds = np.zeros((len(n), width, x.shape[-1]), x.dtype)
    mask = np.zeros((len(n), width), bool)
    mask_ar = np.ones((len(n), width), np.int32)
    for r in range(len(n)):
      embeds[r, :n[r]] = x[r][valid[r]]
      mask[r, :n[r]] = True
      mask_ar[r, :n[r]] = ar[r][valid[r]]
    return embeds, mask, mask_ar

  def __call__(self, trainable, lm_vars, batch, max_new_tokens: int, served=None,
               timings: Optional[dict] = None, token_counts: Optional[list] = None
               ) -> List[str]:
    """`timings` (a dict) receives `generate`'s `prefill` and `decoding` seconds (the prefix
    embedding counts into `prefill`); `token_counts` (a list) each row's generated tokens
    before EOS."""
    t0 = time.perf_counter()
    embeds, mask, mask_ar = self.prefix(trainable, lm_vars, batch)
    served = self._merge(trainable, lm_vars) if served is None else served
    prefix_seconds = time.perf_counter() - t0
    tokens = np.asarray(generate.generate(
        self.model.lm, served, None, max_new_tokens, attention_mask=mask, inputs_embeds=embeds,
        mask_ar=mask_ar, eos_id=self.model.codec.eos_id, timings=timings))
    if timings is not None:
      timings["prefill"] += prefix_seconds
    if token_counts is not None:
      eos = self.model.codec.eos_id
      token_counts.extend(list(row).index(eos) if eos in row else len(row) for row in tokens)
    return [decode_answer(self.model.codec, row) for row in tokens]


def decode_answer(codec, row) -> str:
  out = [int(t) for t in row]
  if codec.eos_id in out:
    out = out[:out.index(codec.eos_id)]
  return codec.decode(out).strip()


# --------------------------------------------------------------------------------------- data


def feature_dims(feature_dir: str, split: str) -> Dict[str, Tuple[int, int]]:
  """`{modality: (N tokens, D)}` of the cached token features of `split`."""
  from edgeglass_jax.weights import hf
  with open(os.path.join(feature_dir, split, "index.json")) as f:
    index = json.load(f)
  header, _ = hf.safetensors_header(os.path.join(feature_dir, split, index["shards"][0]["file"]))
  out = {}
  for m in BRIDGE_MODALITIES:
    key = f"{m}/tokens"
    if key not in header:
      raise KeyError(f"{feature_dir}/{split}: no cached {key} (keep {m} tokens at extraction: "
                     "config.extract.keep_tokens)")
    out[m] = tuple(header[key]["shape"][1:])
  return out


class QASource:
  """QA items of one split with their cached features, as batches for the loop.

  `get_batch(indices, epoch=0, seed=0)` -> `{"{m}/tokens" [b, N_m, D_m], "{m}/token_mask",
  "{m}/valid" [b] (True only for the item's own modality), "text" int32 [b, T], "text/valid"
  bool, "text/ar" int32, "text/loss" float32 (the answer + EOS), "index" int32 [b]}`. With
  `pairs` (a list of `(item index, chosen, rejected)`), item k of the source is pair k:
  "text..." hold the chosen answer and "rejected/text..." the rejected one. Description
  answers (and captions quoted by text-only prompts) are drawn from `(seed, epoch, index)`.

  Text is `max_len` long, except in training batches with `pad_to_multiple_of` > 0: the
  loader passes the whole global batch (`batch_indices`), and T is its longest sequence rounded
  up to that multiple (at most `max_len`), so every process pads alike and padding, about half
  of `max_len` on the synthetic set, costs no compute (a few shapes compile, one per length).
  """

  def __init__(self, dataset, split: str, features: pipeline.FeatureSource,
               items: List[qa.QAItem], model_text: Model, max_len: int,
               pairs: Optional[List[Tuple[int, str, str]]] = None, pad_to_multiple_of: int = 0):
    self.dataset, self.split, self.features = dataset, split, features
    self.items, self.pairs, self.max_len = items, pairs, int(max_len)
    self.pad_to_multiple_of = int(pad_to_multiple_of)
    self.codec, self.bos, self.sep = model_text.codec, model_text.bos_id, model_text.sep_ids
    self.attributes = [synthetic.attributes_of(g) for g in dataset.groups(split)]
    self._captions: Dict[int, List[str]] = {}
    if not len(self):
      raise ValueError(f"split {split!r} gives no QA items")

  def __len__(self) -> int:
    return len(self.pairs) if self.pairs is not None else len(self.items)

  def captions(self, example: int) -> List[str]:
    if example not in self._captions:
      self._captions[example] = self.dataset.captions(self.split, example)
    return self._captions[example]

  def texts(self, k: int, epoch: int = 0, seed: int = 0) -> Tuple[str, str]:
    """(question, answer) of item `k` (not pair) for an epoch."""
    item = self.items[k]
    attrs = self.attributes[item.example]
    caps = self.captions(item.example)
    pick = int(pipeline.caption_choice(np.ones((1, len(caps)), bool), seed, epoch,
                                       np.array([k]))[0])
    question = qa.question_text(item, attrs, caps[pick] if item.modality == "text" else "")
    if item.kind != "describe":
      return question, qa.answer_text(item.kind, attrs)
    if item.modality == "text":
      return question, caps[pick]
    return question, caps[(pick + 1) % len(caps)] if len(caps) > 1 else caps[0]

  def encode(self, question: str, answer: Optional[str]):
    ids = self.codec.encode_many([question] + ([] if answer is None else [" " + answer]))
    return text_sequence(self.bos, ids[0], self.sep, None if answer is None else ids[1],
                         self.codec.eos_id, self.codec.pad_id, self.max_len)

  @property
  def pads_to_global_batch(self) -> bool:
    """Whether the train loader should pass `batch_indices` (see the class docstring)."""
    return self.pad_to_multiple_of > 0

  def sequences(self, i: int, epoch: int = 0, seed: int = 0, with_answer: bool = True
                ) -> Dict[str, Tuple[np.ndarray, ...]]:
    """Source item `i`'s `text_sequence` of `max_len`, by key prefix ("" and, for pairs,
    "rejected/"); a ValueError names the item when it does not fit."""
    k = self.pairs[i][0] if self.pairs is not None else i
    item = self.items[k]
    question, answer = self.texts(k, epoch, seed)
    try:
      if self.pairs is None:
        return {"": self.encode(question, answer if with_answer else None)}
      self.encode(question, answer if with_answer else None)
      _, chosen, rejected = self.pairs[i]
      return {"": self.encode(question, chosen), "rejected/": self.encode(question, rejected)}
    except ValueError as e:
      raise ValueError(f"{self.split} QA item {k} ({item.modality}, {item.kind}): {e}; raise "
                       "config.data.max_len") from e

  def text_length(self, indices: Sequence[int], epoch: int = 0, seed: int = 0) -> int:
    """T of a training batch whose global batch is `indices`: the longest sequence rounded up
    to `pad_to_multiple_of`, at most `max_len` (`max_len` without the multiple)."""
    if not self.pad_to_multiple_of:
      return self.max_len
    longest = max(int(seq[1].sum()) for i in np.asarray(indices, np.int64) % len(self)
                  for seq in self.sequences(int(i), epoch, seed).values())
    multiple = self.pad_to_multiple_of
    return min(self.max_len, -(-longest // multiple) * multiple)

  def get_batch(self, indices: Sequence[int], epoch: int = 0, seed: int = 0,
                with_answer: bool = True, batch_indices: Optional[Sequence[int]] = None
                ) -> Dict[str, np.ndarray]:
    index = np.asarray(indices, np.int64) % len(self)
    item_ids = [self.pairs[i][0] for i in index] if self.pairs is not None else list(index)
    items = [self.items[k] for k in item_ids]
    examples = np.array([it.example for it in items], np.int64)
    feats = self.features.get_batch(examples, 0)
    out = {}
    for m in BRIDGE_MODALITIES:
      if f"{m}/tokens" not in feats:
        continue
      own = np.array([it.modality == m for it in items])
      out[f"{m}/tokens"] = feats[f"{m}/tokens"].astype(np.float32)
      out[f"{m}/token_mask"] = feats.get(f"{m}/token_mask",
                                         np.ones(feats[f"{m}/tokens"].shape[:2], bool))
      out[f"{m}/valid"] = own & feats[f"{m}/valid"].astype(bool)
    rows = [self.sequences(int(i), epoch, seed, with_answer) for i in index]
    length = self.max_len if batch_indices is None else \
        self.text_length(batch_indices, epoch, seed)
    if any(seq[1][length:].any() for row in rows for seq in row.values()):
      raise ValueError(f"batch_indices of {self.split} do not hold all of indices {index}")
    for prefix in rows[0]:
      for j, name in enumerate(("text", "text/valid", "text/ar", "text/loss")):
        out[prefix + name] = np.stack([row[prefix][j][:length] for row in rows])
    out["index"] = index.astype(np.int32)
    return out

  def batch_ids(self, batch) -> List[str]:
    return [f"{self.split}-qa-{int(i)}" for i in np.asarray(batch["index"])]


def ensure_features(config, workdir: str) -> str:
  """The feature cache this run reads: `config.features_dir`, else the `init_from` run's,
  else `{workdir}/features` (extracted there now, resumable)."""
  splits = [config.train.split, config.eval.split]
  done = lambda d: all(os.path.isfile(os.path.join(d, s, "index.json")) for s in splits)

  def checked(d):
    for split in splits:
      features.check_cache_encoders(os.path.join(d, split), config.encoders,
                                    config.bridge.modalities)
    return d

  if config.features_dir:
    if not done(config.features_dir):
      raise FileNotFoundError(f"config.features_dir={config.features_dir} lacks finished splits "
                              f"{splits}")
    return checked(config.features_dir)
  if config.init_from:
    previous = read_export(config.init_from)[0].get("features_dir", "")
    if previous and done(previous):
      return checked(previous)
  out = extract.features_dir(config, workdir)
  if not done(out):
    logging.info("no feature cache in %s yet: extracting", out)
    extract.run(config, workdir)
  return out


# ------------------------------------------------------------------------------------- export


def read_export(workdir: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(record, trainable params as numpy) of the assistant exported into `workdir`."""
  d = os.path.join(workdir, EXPORT_DIR)
  record_path, params_path = os.path.join(d, "config.json"), os.path.join(d, "params.msgpack")
  if not (os.path.isfile(record_path) and os.path.isfile(params_path)):
    raise NoAssistantError(f"{workdir} holds no trained assistant ({record_path} and "
                           f"{params_path} are written when a stage of task 'assistant' "
                           "finishes)")
  with open(record_path) as f:
    record = json.load(f)
  with open(params_path, "rb") as f:
    params = flax.serialization.msgpack_restore(f.read())
  return record, params


def write_export(workdir: str, config, trainable, features_dir: str):
  """Writes the finished run's trainable params and config once (atomically)."""
  d = os.path.join(workdir, EXPORT_DIR)
  if os.path.isfile(os.path.join(d, "params.msgpack")) or jax.process_index() != 0:
    return
  os.makedirs(d, exist_ok=True)
  host = jax.tree.map(np.asarray, nn.meta.unbox(trainable))
  with open(os.path.join(d, "params.msgpack.tmp"), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(host)))
  record = {"stage": config.stage, "features_dir": os.path.abspath(features_dir),
            "config": json.loads(config.to_json_best_effort())}
  with open(os.path.join(d, "config.json.tmp"), "w") as f:
    json.dump(record, f, indent=1)
  os.replace(os.path.join(d, "config.json.tmp"), os.path.join(d, "config.json"))
  os.replace(os.path.join(d, "params.msgpack.tmp"), os.path.join(d, "params.msgpack"))


def _dict(tree):
  return {k: _dict(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def load_into(template, values, source: str, keys: Sequence[str]):
  """`template` (boxed init tree) with the subtrees `keys` replaced by `values`' (numpy);
  shapes must agree, else `loop.CheckpointMismatchError` naming the first differing path."""
  out = dict(template)
  for key in keys:
    if key not in values:
      continue
    expected = loop.flat_shapes(nn.meta.unbox({key: template[key]}))
    stored = loop.flat_shapes({key: jax.tree.map(np.asarray, _dict(values[key]))})
    diff = loop.first_difference(expected, stored)
    if diff is not None:
      raise loop.CheckpointMismatchError(f"{source} holds another model than this run: {diff}")
    flat_t, treedef = jax.tree_util.tree_flatten(
        template[key], is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    flat_v = jax.tree_util.tree_leaves(_dict(values[key]))
    out[key] = jax.tree_util.tree_unflatten(treedef, [
        t.replace_boxed(jnp.asarray(v)) if isinstance(t, nn.meta.AxisMetadata) else
        jnp.asarray(v) for t, v in zip(flat_t, flat_v)])
  return out


# -------------------------------------------------------------------------------------- build


def build_model(config, dims: Dict[str, Tuple[int, int]]):
  """(Model, frozen LM variables boxed (None when the LM is trained), LM source)."""
  module, lm_vars, source, codec = lm_lora.load_lm(config.lm, qa.question_words())
  emb = np.asarray(nn.meta.unbox(lm_vars)["params"]["embedder"]["embedding"])
  scale = float(np.sqrt(np.mean(np.square(emb[:min(len(emb), 4096)], dtype=np.float64))))
  if module.config.embed_scale:
    scale *= math.sqrt(module.config.hidden_size)
  mods = []
  for m in BRIDGE_MODALITIES:
    if m not in config.bridge.modalities:
      continue
    cfg = adapters.AdapterConfig.from_dict(dict(config.bridge[m]))
    if cfg.kind not in BRIDGE_KINDS:
      raise ValueError(f"config.bridge.{m}.kind={cfg.kind!r} is not one of {BRIDGE_KINDS}")
    mods.append((m, cfg, m == "image"))
  bridge = Bridge(tuple(mods), module.config.hidden_size, scale, whiten_shrinkage(config) > 0)
  example = dummy_features(dims, config.bridge.modalities)
  num_soft = jax.eval_shape(lambda r: bridge.init_with_output(r, example)[0][0],
                            jax.random.key(0)).shape[1]
  bos = module.config.bos_token_id
  bos = codec.eos_id if bos is None else int(bos)
  sep = tuple(codec.encode(config.data.sep))
  if not sep:
    raise ValueError(f"config.data.sep={config.data.sep!r} encodes to no tokens")
  lora = peft.LoRAConfig.from_config(config.lora) if config.stage != "caption" else None
  if config.lm.train_all:
    lora = None
  sink = bool(config.data.get("sink", False))
  return Model(bridge, module, lora, codec, bos, sep, int(num_soft), sink), lm_vars, source


def whiten_shrinkage(config) -> float:
  """`config.bridge.whiten`: the ZCA shrinkage of the bridge's input whitening, 0 = none."""
  value = float(config.bridge.get("whiten", 0.0))
  if value < 0:
    raise ValueError(f"config.bridge.whiten={value}: the whitening shrinkage must be >= 0 "
                     "(0 turns whitening off)")
  return value


def whitening_statistics(bridge: Bridge, source: pipeline.FeatureSource, shrinkage: float,
                         chunk: int = 64) -> Dict[str, Dict[str, np.ndarray]]:
  """`{modality: Whiten params}` of every bridged modality's valid tokens in `source` (the
  training split's cache), float64 sums over chunks of `chunk` examples."""
  out = {}
  for m, cfg, grid in bridge.modalities:
    def batches():
      for rows in _batches(len(source), chunk):
        b = source.get_batch(rows)
        yield b[f"{m}/tokens"], b[f"{m}/token_mask"].astype(bool) & b[f"{m}/valid"][:, None]
    first = leading_cls(cfg, grid, source.get_batch([0])[f"{m}/tokens"].shape[1])
    try:
      out[m] = whitening.token_statistics(batches(), first, shrinkage)
    except ValueError as e:
      raise ValueError(f"{source.split_dir}: whitening the {m} tokens: {e}") from e
  return out


def fill_whitening(bridge_tree, stats: Dict[str, Dict[str, np.ndarray]]):
  """The boxed bridge init with each modality's `whiten` params set to `stats`."""
  params = dict(bridge_tree["params"])
  for m, values in stats.items():
    params[m] = load_into(dict(params[m]), {"whiten": values}, "whitening statistics",
                          ["whiten"])
  return dict(bridge_tree, params=params)


def frozen_whitening(config):
  """`config` whose `train.frozen` regex also covers the whitening statistics (when on), so
  that no optimizer update (weight decay included) ever touches them."""
  if whiten_shrinkage(config) <= 0:
    return config
  pattern = "(^|/)whiten/"
  out = config.copy_and_resolve_references()
  out.train.frozen = f"{config.train.frozen}|{pattern}" if config.train.frozen else pattern
  return out


def dummy_features(dims, modalities, batch: int = 1):
  out = {}
  for m in BRIDGE_MODALITIES:
    if m in modalities:
      n, d = dims[m]
      out[f"{m}/tokens"] = jnp.zeros((batch, n, d), jnp.float32)
      out[f"{m}/token_mask"] = jnp.ones((batch, n), bool)
      out[f"{m}/valid"] = jnp.ones((batch,), bool)
  return out


def bridge_from_aligned(bridge, aligned: Dict[str, Any], source: str):
  """The boxed bridge init `{"params": {m: ...}}` with, for each modality of `aligned` (`{m: a
  trained align.ModalityAdapter's params}`), every layer but the Matryoshka head taken from it,
  so the bridge starts from the aligned adapter (same kind and sizes: the layer names of
  `ModalityBridge` and `ModalityAdapter` agree); `out_norm` and `to_lm` stay fresh. A layer the
  bridge lacks, or one of another shape, raises `loop.CheckpointMismatchError` naming it."""
  params = dict(bridge["params"])
  for m, values in aligned.items():
    if m not in params:
      raise ValueError(f"{source}: modality {m!r} is not bridged (config.bridge.modalities)")
    names = [k for k in values if k != "head"]
    missing = [k for k in names if k not in params[m]]
    if missing:
      raise loop.CheckpointMismatchError(
          f"{source}: the {m} adapter's layer {missing[0]!r} has no counterpart among the "
          f"bridge's {sorted(params[m])}; give config.bridge.{m} the adapter's kind and sizes")
    params[m] = load_into(dict(params[m]), values, f"{source} ({m} adapter)", names)
  return dict(bridge, params=params)


def aligned_adapters(config, mesh) -> Dict[str, Any]:
  """`{m: adapter params}` of the align run `config.bridge.init_from_align` (trained with
  `config.bridge.align_config`) for the bridged modalities whose adapter kind is the bridge's."""
  workdir = os.path.abspath(config.bridge.init_from_align)
  acfg = config_lib.load(config.bridge.align_config)
  feature_dir = acfg.get("features_dir") or os.path.join(workdir, "features")
  _, params, step = align.restore_trained(acfg, workdir, feature_dir, mesh)
  out = {}
  for m in config.bridge.modalities:
    if m in acfg.modalities and acfg.model.adapters[m].kind == config.bridge[m].kind:
      out[m] = params["params"][m]
    else:
      logging.info("bridge %s: the align run's adapter is not a %r one; it starts fresh", m,
                   config.bridge[m].kind)
  if not out:
    theirs = {m: acfg.model.adapters[m].kind for m in acfg.modalities}
    ours = {m: config.bridge[m].kind for m in config.bridge.modalities}
    raise ValueError(f"config.bridge.init_from_align={workdir}: none of its adapters {theirs} "
                     f"has the bridge's kind {ours}")
  logging.info("bridge starts from %s at step %d (%s)", workdir, step, sorted(out))
  return out


def init_trainable(model: Model, lm_vars, dims, config, rng, init_values=None, aligned=None,
                   whiten=None):
  """Boxed trainable tree: the bridge (from the `aligned` adapters, when given; its whitening
  statistics `whiten`, when given), LoRA (qa, dpo) or the whole LM (`lm.train_all`), with the
  subtrees of `init_values` (a previous stage's export) loaded over it."""
  r1, r2 = jax.random.split(rng)
  tree = {"bridge": model.bridge.init(r1, dummy_features(dims, config.bridge.modalities))}
  if whiten:
    tree["bridge"] = fill_whitening(tree["bridge"], whiten)
  if aligned:
    tree["bridge"] = bridge_from_aligned(tree["bridge"], aligned,
                                         config.bridge.get("init_from_align") or "aligned")
  dummy = decoder.dummy_inputs()
  if config.lm.train_all:
    # The loaded LM (random: embeddings of std 1/sqrt(width)), whose embedding RMS the bridge's
    # out_scale was measured on; a fresh `init` would give std-1 embeddings and logits of std
    # ~sqrt(width), and soft tokens sqrt(width) times smaller than the text's.
    tree["lm"] = lm_vars
  elif model.lora is not None:
    abstract = jax.eval_shape(model.lm.init, jax.random.key(0), *dummy)
    tree["lora"] = peft.init_lora(model.lm, abstract, *dummy, rng=r2, config=model.lora)
  if init_values is not None:
    tree = load_into(tree, init_values, config.init_from, list(tree))
  return tree


def train_items(config, dataset, split: str) -> List[qa.QAItem]:
  return qa.items_for(dataset.num_examples(split), tuple(config.data.qa_modalities),
                      tuple(config.data.kinds), config.data.synthetic.seed,
                      synthetic.SPLITS.index(split))


def eval_items(config, dataset) -> List[qa.QAItem]:
  split = config.eval.split
  mods = tuple(m for m in config.data.qa_modalities if m in config.eval.modalities)
  items = qa.items_for(dataset.num_examples(split), mods, qa.KINDS, config.data.synthetic.seed,
                       synthetic.SPLITS.index(split))
  return items[:config.eval.max_items] if config.eval.max_items else items


# --------------------------------------------------------------------------------- evaluators


def _lm(frozen):
  """The frozen LM variables of a task's frozen tree (None when the LM is trained)."""
  return None if frozen is None else frozen.get("lm")


def _batches(n: int, size: int):
  for start in range(0, n, size):
    yield np.arange(start, min(n, start + size))


def _pad_batch(batch, size: int):
  n = len(batch["index"])
  if n == size:
    return batch
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, 0)]) for k, v in batch.items()}


def majority_answers(train: QASource) -> Dict[str, str]:
  """The answer of each attribute's most frequent value among the training split's examples
  (whatever questions the stage trains on): the majority-class baseline."""
  out = {}
  for attribute in synthetic.ATTRIBUTE_NAMES:
    values = [getattr(a, attribute) for a in train.attributes]
    top = max(sorted(set(values)), key=values.count)
    out[attribute] = qa.ANSWERS[attribute].format(top)
  return out


class Answers:
  """Greedy answers to every held-out item: exact-match accuracy per modality and attribute
  (with the majority baseline), caption attribute share, and answer-token perplexity. With
  `reference` (DPO) the same metrics of the frozen reference are computed once, as `before/`."""

  def __init__(self, model: Model, source: QASource, majority, config, reference: bool = False):
    self.model, self.source, self.majority = model, source, majority
    self.batch_size, self.max_new = int(config.eval.batch_size), int(config.eval.max_new_tokens)
    self.decoding = Decoding(model)
    self.reference, self.before = reference, None
    self.log_examples = int(config.eval.log_examples)
    self._nll = jax.jit(lambda tr, lm_vars, batch: model.answer_nll(tr, lm_vars, batch))

  def answers(self, trainable, lm_vars) -> List[str]:
    served = self.decoding._merge(trainable, lm_vars)
    out = []
    for rows in _batches(len(self.source), self.batch_size):
      batch = _pad_batch(self.source.get_batch(rows, with_answer=False), self.batch_size)
      out += self.decoding(trainable, lm_vars, batch, self.max_new, served)[:len(rows)]
    return out

  def perplexity(self, trainable, lm_vars) -> float:
    nll = count = 0.0
    for rows in _batches(len(self.source), self.batch_size):
      batch = self.source.get_batch(rows)
      n = len(rows)
      s, c = self._nll(trainable, lm_vars, _pad_batch(batch, self.batch_size))
      nll += float(np.sum(np.asarray(s)[:n]))
      count += float(np.sum(np.asarray(c)[:n]))
    return math.exp(min(nll / max(count, 1.0), 80.0))

  def score(self, trainable, lm_vars, step: int) -> Dict[str, float]:
    said = self.answers(trainable, lm_vars)
    hits: Dict[str, List[float]] = {}
    lines = []
    for k, (item, text) in enumerate(zip(self.source.items, said)):
      attrs = self.source.attributes[item.example]
      if item.kind == "describe":
        hits.setdefault(f"caption/{item.modality}/attributes", []).append(
            lm_lora.mentioned(text, attrs))
        continue
      truth = qa.answer_text(item.kind, attrs)
      key = f"qa/{item.modality}/{item.kind}"
      hits.setdefault(key, []).append(float(qa.normalize(text) == qa.normalize(truth)))
      hits.setdefault(key + "/majority", []).append(
          float(self.majority[item.kind] == truth))
      if len(lines) < self.log_examples:
        lines.append(f"  [{item.modality}] {self.source.texts(k)[0]!r} -> {text!r} "
                     f"(truth {truth!r})")
    metrics = {k: float(np.mean(v)) for k, v in hits.items()}
    for m in qa.QA_MODALITIES:
      accs = [metrics[f"qa/{m}/{a}"] for a in synthetic.ATTRIBUTE_NAMES if f"qa/{m}/{a}" in metrics]
      if accs:
        metrics[f"qa/{m}/accuracy"] = float(np.mean(accs))
    metrics["ppl"] = self.perplexity(trainable, lm_vars)
    logging.info("step %d, held-out answers:\n%s", step, "\n".join(lines))
    return metrics

  def __call__(self, trainable, frozen, step: int) -> Dict[str, float]:
    lm_vars = _lm(frozen)
    metrics = self.score(trainable, lm_vars, step)
    if self.reference:
      if self.before is None:
        self.before = {f"before/{k}": v for k, v in
                       self.score(frozen["ref"], lm_vars, step).items()}
      metrics.update(self.before)
    return metrics


class Spoken:
  """Typed vs spoken questions on the first `num` held-out attribute items: the question is
  spoken by espeak-ng, transcribed by `asr.transcribe` and answered; reports `spoken/accuracy`,
  `typed/accuracy` (same items) and `spoken/transcript_exact` (share of transcripts equal to the
  typed question, normalised)."""

  def __init__(self, model: Model, source: QASource, config):
    self.model, self.source = model, source
    self.rows = [k for k, it in enumerate(source.items) if it.kind != "describe"
                 ][:config.eval.spoken]
    self.decoding = Decoding(model)
    self.max_new, self.batch_size = int(config.eval.max_new_tokens), int(config.eval.batch_size)
    self.asr_model = config.eval.asr_model
    self.seed = int(config.data.synthetic.seed)
    self.transcripts = None

  def _transcribe(self) -> List[str]:
    from edgeglass_jax import asr
    if self.transcripts is None:
      waves = [qa.spoken_question(self.source.texts(k)[0], self.seed, k) for k in self.rows]
      self.transcripts = asr.transcribe(waves, model=self.asr_model)
    return self.transcripts

  def _accuracy(self, trainable, lm_vars, questions: List[str]) -> float:
    served = self.decoding._merge(trainable, lm_vars)
    right = []
    for chunk in _batches(len(self.rows), self.batch_size):
      batch = self.source.get_batch([self.rows[i] for i in chunk], with_answer=False)
      texts = [self.model.prompt(questions[i], self.source.max_len) for i in chunk]
      for key in ("text", "text/valid", "text/ar"):
        batch[key] = np.stack([t[key] for t in texts])
      batch.pop("text/loss", None)
      said = self.decoding(trainable, lm_vars, _pad_batch(batch, self.batch_size), self.max_new,
                           served)
      for i, text in zip(chunk, said):
        item = self.source.items[self.rows[i]]
        truth = qa.answer_text(item.kind, self.source.attributes[item.example])
        right.append(float(qa.normalize(text) == qa.normalize(truth)))
    return float(np.mean(right))

  def __call__(self, trainable, frozen, step: int) -> Dict[str, float]:
    if not self.rows:
      return {}
    lm_vars = _lm(frozen)
    typed = [self.source.texts(k)[0] for k in self.rows]
    heard = self._transcribe()
    return {"spoken/accuracy": self._accuracy(trainable, lm_vars, heard),
            "typed/accuracy": self._accuracy(trainable, lm_vars, typed),
            "spoken/transcript_exact": float(np.mean(
                [qa.normalize(a) == qa.normalize(b) for a, b in zip(heard, typed)]))}


def sequence_logp(model: Model, trainable, lm_vars, batch, prefix: str):
  """`[B]` log-probability of each row's answer + EOS, summed over its tokens."""
  nll, _ = model.answer_nll(trainable, lm_vars, batch, prefix)
  return -nll


class Preferences:
  """Held-out minimal-edit pairs: `preference_accuracy` (DPO's implicit reward of chosen above
  rejected), `logp_accuracy` (the policy gives chosen the higher log-probability) and
  `logp_accuracy_before` (the same for the frozen reference)."""

  def __init__(self, model: Model, source: QASource, batch_size: int, beta: float):
    self.source, self.batch_size, self.beta = source, batch_size, beta
    self._logps = jax.jit(lambda tr, lm_vars, batch: (
        sequence_logp(model, tr, lm_vars, batch, ""),
        sequence_logp(model, tr, lm_vars, batch, "rejected/")))

  def __call__(self, trainable, frozen, step: int) -> Dict[str, float]:
    pc, pr, rc, rr = [], [], [], []
    for rows in _batches(len(self.source), self.batch_size):
      batch = _pad_batch(self.source.get_batch(rows), self.batch_size)
      n = len(rows)
      a, b = self._logps(trainable, _lm(frozen), batch)
      c, d = self._logps(frozen["ref"], _lm(frozen), batch)
      for acc, v in zip((pc, pr, rc, rr), (a, b, c, d)):
        acc.append(np.asarray(v)[:n])
    pc, pr, rc, rr = (np.concatenate(v).astype(np.float64) for v in (pc, pr, rc, rr))
    margin = (pc - rc) - (pr - rr)
    return {"preference_accuracy": float(np.mean(margin > 0)),
            "logp_accuracy": float(np.mean(pc > pr)),
            "logp_accuracy_before": float(np.mean(rc > rr)),
            "reward_margin": float(self.beta * np.mean(margin))}


# ---------------------------------------------------------------------------------------- task


def preference_pairs(source_items: List[qa.QAItem], attributes, seed: int, split_code: int,
                     limit: int = 0) -> List[Tuple[int, str, str]]:
  """Minimal-edit pairs `(item index, chosen, rejected)` of every item (or the first `limit`)."""
  out = []
  for k, item in enumerate(source_items[:limit or None]):
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 79, split_code, k])
    chosen, rejected, _ = qa.preference_pair(item, attributes[item.example], rng)
    out.append((k, chosen, rejected))
  return out


def self_correction_pairs(model: Model, source: QASource, trainable, lm_vars, config
                          ) -> List[Tuple[int, str, str]]:
  """Pairs from the model's own wrong answers on the first `config.dpo.self_pairs` attribute
  items of the training split, each corrected by one word (`qa.correct_minimally`)."""
  rows = [k for k, it in enumerate(source.items) if it.kind != "describe"][:config.dpo.self_pairs]
  if not rows:
    return []
  decoding = Decoding(model)
  served = decoding._merge(trainable, lm_vars)
  size = int(config.eval.batch_size)
  out = []
  for chunk in _batches(len(rows), size):
    batch = _pad_batch(source.get_batch([rows[i] for i in chunk], with_answer=False), size)
    said = decoding(trainable, lm_vars, batch, int(config.eval.max_new_tokens), served)
    for i, text in zip(chunk, said):
      item = source.items[rows[i]]
      pair = qa.correct_minimally(text, item, source.attributes[item.example])
      if pair is not None:
        out.append((rows[i],) + pair)
  logging.info("DPO: %d of %d answers of the qa model on training questions were wrong and "
               "correctable by one word; they join the pairs", len(out), len(rows))
  return out


def make_task(config, workdir: str, mesh) -> loop.Task:
  """Model, data, loss and evaluators of one stage on `mesh`."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} is not one of {STAGES}")
  if whiten_shrinkage(config) > 0 and config.bridge.get("init_from_align"):
    raise ValueError(f"config.bridge.whiten={config.bridge.whiten} with config.bridge."
                     f"init_from_align={config.bridge.init_from_align}: the aligned adapters "
                     "were trained on unwhitened tokens; set one of them off")
  if config.stage != "caption" and not config.init_from and not config.lm.train_all:
    logging.warning("stage %s starts without init_from: its bridge is fresh", config.stage)
  if config.stage == "dpo" and not config.init_from:
    raise ValueError("stage 'dpo' needs config.init_from (the qa stage's workdir): its model "
                     "is the policy's start and the frozen reference")
  init_values = read_export(config.init_from)[1] if config.init_from else None
  aligned = (aligned_adapters(config, mesh) if config.bridge.get("init_from_align") and
             init_values is None else None)
  feature_dir = ensure_features(config, workdir)
  dims = feature_dims(feature_dir, config.train.split)
  model, lm_vars, source = build_model(config, dims)
  dataset = sources.synthetic_dataset(config.data)
  mods = tuple(m for m in BRIDGE_MODALITIES if m in config.bridge.modalities)
  feats = {s: pipeline.FeatureSource(os.path.join(feature_dir, s), mods,
                                     keys=("tokens", "token_mask"))
           for s in {config.train.split, config.eval.split}}
  # A continuation takes its parent's statistics with its params (init_values).
  whiten = (whitening_statistics(model.bridge, feats[config.train.split], whiten_shrinkage(config))
            if model.bridge.whiten and init_values is None else None)
  max_len, multiple = int(config.data.max_len), int(config.data.get("pad_to_multiple_of", 0))
  train_src = QASource(dataset, config.train.split, feats[config.train.split],
                       train_items(config, dataset, config.train.split), model, max_len,
                       pad_to_multiple_of=multiple)
  eval_src = QASource(dataset, config.eval.split, feats[config.eval.split],
                      eval_items(config, dataset), model, max_len)
  frozen = None if config.lm.train_all else {"lm": lm_vars}
  evaluators = {"": Answers(model, eval_src, majority_answers(train_src), config,
                            reference=config.stage == "dpo")}
  if config.eval.spoken:
    evaluators["speech"] = Spoken(model, eval_src, config)
  loss_fn = make_loss_fn(model, config)
  if config.stage == "dpo":
    ref = jax.tree.map(jnp.asarray, _dict(init_values))
    ref = {k: ref[k] for k in ("bridge", "lora", "lm") if k in ref}
    frozen = dict(frozen or {}, ref=ref)
    pairs = preference_pairs(train_src.items, train_src.attributes, config.seed,
                             synthetic.SPLITS.index(config.train.split))
    pairs += self_correction_pairs(model, train_src, ref, _lm(frozen), config)
    train_src = QASource(dataset, config.train.split, feats[config.train.split],
                         train_src.items, model, max_len, pairs=pairs,
                         pad_to_multiple_of=multiple)
    held = preference_pairs(eval_src.items, eval_src.attributes, config.seed + 1,
                            synthetic.SPLITS.index(config.eval.split), config.dpo.eval_pairs)
    pair_src = QASource(dataset, config.eval.split, feats[config.eval.split], eval_src.items,
                        model, max_len, pairs=held)
    evaluators["dpo"] = Preferences(model, pair_src, int(config.eval.batch_size),
                                    float(config.dpo.beta))
  train_iter = pipeline.make_train_loader(train_src, config.train.batch_size, config.seed,
                                          jax.process_index(), jax.process_count())
  merged = _prefixless(evaluators)
  return loop.Task(
      init_params=lambda rng: init_trainable(model, lm_vars, dims, config, rng, init_values,
                                             aligned, whiten),
      loss_fn=loss_fn if frozen is not None else (lambda p, b, r: loss_fn(p, None, b, r)),
      train_iter=train_iter,
      evaluate=merged if frozen is not None else (lambda p, step: merged(p, None, step)),
      batch_ids=train_src.batch_ids,
      frozen=frozen,
      frozen_source=source + ("" if config.stage != "dpo" else
                              f" + reference {os.path.abspath(config.init_from)}"))


def _prefixless(evaluators):
  """One evaluator: the "" entry's metrics unprefixed, the others' as "{key}/name"."""
  def run(trainable, frozen, step):
    out = {}
    for key, fn in evaluators.items():
      for k, v in fn(trainable, frozen, step).items():
        out[f"{key}/{k}" if key else k] = v
    return out
  return run


def make_loss_fn(model: Model, config):
  """trainable, frozen, batch, rng -> (loss, metrics). Stages caption/qa: the per-example mean
  answer-token cross-entropy, averaged over the batch. Stage dpo: `losses.dpo_loss` on the
  summed answer log-probs of chosen and rejected under the policy and the frozen reference."""
  beta = float(config.dpo.beta)

  def sft(trainable, frozen, batch, rng):
    lm_vars = _lm(frozen)
    nll, count = model.answer_nll(trainable, lm_vars, batch, "", rng, deterministic=False)
    return jnp.mean(nll / jnp.maximum(count, 1.0)), {"answer_tokens": jnp.mean(count)}

  def dpo(trainable, frozen, batch, rng):
    lm_vars = _lm(frozen)
    pc, pr = (sequence_logp(model, trainable, lm_vars, batch, p) for p in ("", "rejected/"))
    ref = jax.lax.stop_gradient(frozen["ref"])
    rc, rr = (sequence_logp(model, ref, lm_vars, batch, p) for p in ("", "rejected/"))
    loss, metrics = losses.dpo_loss(pc, pr, rc, rr, beta)
    return loss, metrics

  return dpo if config.stage == "dpo" else sft


def run(config, workdir: str) -> dict:
  config = frozen_whitening(config)
  captured = {}

  def make(cfg, wd, mesh):
    task = make_task(cfg, wd, mesh)
    captured["features_dir"] = ensure_features(cfg, wd)
    return task

  result = loop.run(config, workdir, make)
  write_export(workdir, config, result.pop("state").params, captured["features_dir"])
  result.pop("frozen", None)
  return result


# ---------------------------------------------------------------------------------- inference


@dataclasses.dataclass
class Answer:
  """An answer's text, the seconds each step took (`image_encoding`, `audio_encoding`,
  `prefill`, `decoding`; 0 for a step that did not run) and the tokens generated before EOS
  (what `decoding` paid for)."""
  text: str
  timings: Dict[str, float]
  num_tokens: int = 0


class Assistant:
  """A trained assistant: frozen encoders on raw inputs, the bridge, the LoRA-merged LM.

  `answer(image=None, audio=None, prompt=..., max_new_tokens=32) -> Answer`: `image` RGB uint8
  `[H, W, 3]` of any size (preprocessed as in training), `audio` mono float32 `[S]` at 16 kHz
  (a sound to describe). `context_length` is the LM's; a question that does not fit with the
  soft tokens and `max_new_tokens` raises `QuestionTooLongError`.
  """

  def __init__(self, workdir: str):
    record, params = read_export(workdir)
    self.workdir, self.stage = workdir, record["stage"]
    config = mlc.ConfigDict(record["config"])
    self.config = config
    dtype = jnp.dtype(config.extract.get("compute_dtype", "float32"))
    self.encoders = {m: features.build_encoder(m, config.encoders[m], dtype=dtype)
                     for m in BRIDGE_MODALITIES if m in config.bridge.modalities}
    self._encode = {m: jax.jit(lambda p, *x, _m=m: self.encoders[_m].module.apply(p, *x))
                    for m in self.encoders}
    dims = {m: self._run_encoder(m, features._PLACEHOLDER[m])[0].shape[1:]
            for m in self.encoders}
    self.model, lm_vars, _ = build_model(config, dims)
    self.dims = dims
    self.lm_vars = None if lm_vars is None else nn.meta.unbox(lm_vars)
    self.trainable = jax.tree.map(jnp.asarray, _dict(params))
    self.decoding = Decoding(self.model)
    self.served = self.decoding._merge(self.trainable, self.lm_vars)
    self.context_length = int(self.model.lm.config.max_position_embeddings)

  def _run_encoder(self, modality: str, value) -> Tuple[np.ndarray, np.ndarray]:
    """One raw input -> (tokens float32 [1, N, D], token_mask bool [1, N])."""
    enc = self.encoders[modality]
    inputs = enc.prepare([value])
    out = self._encode[modality](enc.params, *inputs)
    tokens = np.asarray(jax.block_until_ready(out.tokens), np.float32)
    mask = enc.token_mask(inputs)
    return tokens, (np.ones(tokens.shape[:2], bool) if mask is None else np.asarray(mask, bool))

  def _features(self, modality: str, value) -> Tuple[Dict[str, np.ndarray], float]:
    n, d = self.dims[modality]
    if value is None:
      return {f"{modality}/tokens": np.zeros((1, n, d), np.float32),
              f"{modality}/token_mask": np.zeros((1, n), bool),
              f"{modality}/valid": np.zeros((1,), bool)}, 0.0
    t0 = time.perf_counter()
    tokens, mask = self._run_encoder(modality, value)
    seconds = time.perf_counter() - t0
    if tokens.shape[1:] != (n, d):
      raise InputError(f"the {modality} encoder gives tokens {tokens.shape[1:]}, the bridge was "
                       f"trained on {(n, d)}")
    return {f"{modality}/tokens": tokens, f"{modality}/token_mask": mask,
            f"{modality}/valid": np.ones((1,), bool)}, seconds

  def answer(self, image=None, audio=None, prompt: str = "", max_new_tokens: int = 32
             ) -> Answer:
    if image is not None:
      image = np.asarray(image)
      if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"image must be RGB uint8 [H, W, 3], got {image.dtype} {image.shape}")
      if "image" not in self.encoders:
        raise InputError(f"the assistant in {self.workdir} was trained without images")
    if audio is not None:
      audio = np.asarray(audio, np.float32)
      if audio.ndim != 1 or audio.size == 0 or not np.all(np.isfinite(audio)):
        raise InputError(f"audio must be a non-empty finite mono wave [S], got shape "
                         f"{audio.shape}")
      if "audio" not in self.encoders:
        raise InputError(f"the assistant in {self.workdir} was trained without audio")
    if not isinstance(prompt, str) or not prompt.strip():
      raise InputError("prompt must be a non-empty question")
    batch, timings = {}, {"image_encoding": 0.0, "audio_encoding": 0.0}
    for m, value in (("image", image), ("audio", audio)):
      if m in self.encoders:
        feats, seconds = self._features(m, value)
        batch.update(feats)
        timings[f"{m}_encoding"] = seconds
    ids = self.model.codec.encode(prompt)
    soft = int(sum(batch[f"{m}/token_mask"].sum() * batch[f"{m}/valid"][0]
                   for m in self.encoders)) if image is not None or audio is not None else 0
    soft += int(self.model.sink)
    text_len = 1 + len(ids) + len(self.model.sep_ids)
    if soft + text_len + max_new_tokens > self.context_length:
      raise QuestionTooLongError(
          f"{soft} soft tokens + {text_len} question tokens + max_new_tokens={max_new_tokens} "
          f"exceed the context of {self.context_length} positions")
    text = self.model.prompt(prompt, generate.prompt_bucket(text_len))
    batch.update({k: v[None] for k, v in text.items()})
    counts = []
    text_out = self.decoding(self.trainable, self.lm_vars, batch, max_new_tokens, self.served,
                             timings, counts)[0]
    return Answer(text_out, timings, counts[0])


def _exported_model(workdir: str):
  """(config, feature_dir, model, lm_vars, trainable) of the assistant exported in `workdir`,
  built on the token shapes of the feature cache it was trained on."""
  record, params = read_export(workdir)
  config = mlc.ConfigDict(record["config"])
  feature_dir = record["features_dir"]
  model, lm_vars, _ = build_model(config, feature_dims(feature_dir, "train"))
  lm_vars = None if lm_vars is None else nn.meta.unbox(lm_vars)
  return config, feature_dir, model, lm_vars, jax.tree.map(jnp.asarray, _dict(params))


def soft_token_views(model: Model, bridge_params, split: Dict[str, Any], modality: str,
                     batch_size: int = 250, apply=None) -> Dict[str, np.ndarray]:
  """The bridge's output for one modality of a loaded feature split (`features.load_split`):
  `{"soft_first": [N, W], "soft_mean": [N, W]}`, its first soft token (the CLS of `compact`, a
  Perceiver's first latent) and the masked mean of its soft tokens, for every example N (the
  other modalities' rows are marked invalid, so only `modality`'s slots are non-zero). Batches
  are padded to `batch_size`, so `apply` (a jitted `model.bridge.apply`, shared across calls by
  the caller) compiles once."""
  apply = apply or jax.jit(model.bridge.apply)
  n = len(split["ids"])
  mods = [m for m in BRIDGE_MODALITIES if f"{m}/tokens" in split]
  masks = {m: split.get(f"{m}/token_mask", np.ones(split[f"{m}/tokens"].shape[:2], bool))
           for m in mods}
  first, mean = [], []
  for start in range(0, n, batch_size):
    rows = np.minimum(np.arange(start, start + batch_size), n - 1)
    keep = min(batch_size, n - start)
    batch = {}
    for m in mods:
      batch[f"{m}/tokens"] = np.asarray(split[f"{m}/tokens"][rows], np.float32)
      batch[f"{m}/token_mask"] = np.asarray(masks[m][rows], bool)
      batch[f"{m}/valid"] = np.full(batch_size, m == modality)
    soft, mask = (np.asarray(a)[:keep] for a in apply(bridge_params, batch))
    lead = mask.argmax(1)
    first.append(soft[np.arange(len(soft)), lead])
    w = mask[..., None].astype(np.float64)
    mean.append((soft * w).sum(1) / np.maximum(w.sum(1), 1.0))
  return {"soft_first": np.concatenate(first), "soft_mean": np.concatenate(mean)}


def soft_token_probes(workdir: str) -> Dict[str, float]:
  """Where what the encoders hold gets lost on its way to the answer, per modality and attribute:
  `{"{m}/{view}/{attribute}": accuracy}` for views `first` and `mean` of the cached encoder
  tokens and `soft_first` and `soft_mean` of the trained bridge's soft tokens (ridge probes fit
  on the train split, scored on the held-out one, `probe.probe_views`), `majority`, and
  `answers`: the assistant's own exact-match accuracy from `results.json` when it has one."""
  from edgeglass_jax import probe
  config, feature_dir, model, _, trainable = _exported_model(workdir)
  apply = jax.jit(model.bridge.apply)
  names = ("train", config.eval.split)
  splits = {s: features.load_split(os.path.join(feature_dir, s)) for s in names}
  labels = {s: synthetic.zero_shot_labels(d["group"]) for s, d in splits.items()}
  metrics = {}
  results = os.path.join(workdir, "results.json")
  if os.path.isfile(results):
    with open(results) as f:
      metrics = json.load(f).get("metrics", {})
  out = {}
  for m in (m for m in BRIDGE_MODALITIES if m in config.bridge.modalities):
    x, y = {}, {}
    for s, d in splits.items():
      rows = np.asarray(d[f"{m}/valid"], bool)
      x[s] = {v: probe.view(d, m, v)[rows] for v in ("first", "mean")}
      x[s].update({v: a[rows] for v, a in
                   soft_token_views(model, trainable["bridge"], d, m, apply=apply).items()})
      y[s] = {a: labels[s][a][rows] for a in synthetic.ATTRIBUTE_NAMES}
    out.update({f"{m}/{k}": v for k, v in probe.probe_views(x[names[0]], y[names[0]],
                                                            x[names[1]], y[names[1]]).items()})
    if all(f"qa/{m}/{a}" in metrics for a in synthetic.ATTRIBUTE_NAMES):
      out.update({f"{m}/answers/{a}": float(metrics[f"qa/{m}/{a}"])
                  for a in synthetic.ATTRIBUTE_NAMES})
  return out


def sink_report(workdir: str, count: int = 16) -> Dict[str, np.ndarray]:
  """Where the trained assistant of `workdir` puts its attention sinks.

  Runs the first `count` image and `count` audio questions of the cached train split and
  returns `{"{m}/{slots}/{median|max}": [layers]}` for `slots` in sink (the sink token, when
  the model has one), soft (the item's soft tokens) and text: the residual-stream norm after
  each LM block over those slots (`Model.hidden_norms`)."""
  config, feature_dir, model, lm_vars, trainable = _exported_model(workdir)
  dataset = sources.synthetic_dataset(config.data)
  mods = tuple(m for m in BRIDGE_MODALITIES if m in config.bridge.modalities)
  feats = pipeline.FeatureSource(os.path.join(feature_dir, "train"), mods,
                                 keys=("tokens", "token_mask"))
  src = QASource(dataset, "train", feats, train_items(config, dataset, "train"), model,
                 int(config.data.max_len))
  norms_fn = jax.jit(model.hidden_norms)
  out = {}
  for m in mods:
    rows = [k for k, it in enumerate(src.items) if it.modality == m][:count]
    if not rows:
      continue
    batch = src.get_batch(rows)
    norms = np.asarray(norms_fn(trainable, lm_vars, batch))
    lead = int(model.sink)
    soft_mask = np.asarray(model.bridge.apply(trainable["bridge"], batch)[1])
    slots = {"soft": np.zeros(norms.shape[1:], bool), "text": np.zeros(norms.shape[1:], bool)}
    slots["soft"][:, lead:lead + model.num_soft] = soft_mask
    slots["text"][:, model.num_lead:] = batch["text/valid"]
    if model.sink:
      slots["sink"] = np.zeros(norms.shape[1:], bool)
      slots["sink"][:, 0] = True
    for name, where in slots.items():
      values = norms[:, where]
      out[f"{m}/{name}/median"] = np.median(values, axis=1)
      out[f"{m}/{name}/max"] = values.max(axis=1)
  return out


def format_sink_report(report: Dict[str, np.ndarray]) -> str:
  """`sink_report` as a table: a row per LM block, a column per modality/slots/statistic."""
  columns = sorted(report, key=lambda k: (k.split("/")[0], ("sink", "soft", "text").index(
      k.split("/")[1]), k.split("/")[2]))
  layers_n = len(report[columns[0]])
  lines = ["layer" + "".join(f"{c:>20}" for c in columns)]
  for i in range(layers_n):
    lines.append(f"{i:>5}" + "".join(f"{report[c][i]:>20.0f}" for c in columns))
  return "\n".join(lines)


def load_assistant(workdir: str) -> Assistant:
  """The assistant a finished stage of task 'assistant' exported into `workdir`; raises
  `NoAssistantError` naming the workdir when there is none."""
  return Assistant(workdir)
