"""Batched sampling from a cached decoder: a jitted prefill of the prompt into the KV cache, then
a jitted `lax.while_loop` over the sampling state it returns (gemma `gm/text/_sampler_loop.py`;
two jits, so a caller can time the prefill and the decoding apart). The prefill samples
the first token and each loop step one more, so `n` new tokens cost the prefill and `n - 1`
single-token forward passes (none is run for logits nobody samples from, and the prefill
projects only its last position onto the vocabulary). The module's `decode(ids, cache,
positions, mask, last_only=...)` is `decoder.Decoder.decode`'s (Whisper's decoder has it too).

Prompts of different lengths are left-aligned to the right end of a padded block (left padding)
and masked out; positions count real tokens only, so a padded row gives the same tokens as the
row alone. The prompt block is padded to a bucket (a power of two, at least 16), so one
compilation serves every (batch, prompt bucket, max_new_tokens, sampling settings).

Prefix-LM prompts (PaliGemma): `inputs_embeds` replaces the prompt's token ids (soft tokens of
an image or a sound, then embedded text), and `mask_ar` makes the prefill attend by
`decoder.make_prefix_lm_mask` (prompt tokens with `mask_ar = 0` see each other both ways); the
new tokens are causal and see the whole prompt.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from edgeglass_jax.decoder import make_prefix_lm_mask

MIN_BUCKET = 16


def prompt_bucket(length: int) -> int:
  """The padded prompt length used for `length` real tokens."""
  return max(MIN_BUCKET, 1 << int(np.ceil(np.log2(max(length, 1)))))


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """`[B, V]` float logits -> `[B]` int32 tokens: argmax when `temperature == 0`, else a draw
  from softmax(logits / temperature) restricted to the `top_k` best tokens (0: all) and to the
  smallest set whose probability reaches `top_p` (the best token is always kept)."""
  if temperature == 0.0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    before = jnp.cumsum(probs, -1) - probs
    sorted_logits = jnp.where(before < top_p, sorted_logits, neg)
    logits = jnp.full_like(logits, neg).at[jnp.arange(logits.shape[0])[:, None], order].set(
        sorted_logits)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


_STATIC = ("module", "max_new_tokens", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=_STATIC + ("cache_dtype",))
def _prefill(params, ids, valid, rng, embeds, mask_ar, *, module, max_new_tokens: int,
             temperature: float, top_k: int, top_p: float, cache_dtype: Any):
  """The prompt `[B, T]` into a fresh cache of `T + max_new_tokens` slots, and the first token:
  the sampling state that `_decode_loop` continues."""
  b, t = valid.shape
  slots = t + max_new_tokens
  positions = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0).astype(jnp.int32)
  key_valid = jnp.concatenate([valid, jnp.ones((b, max_new_tokens), bool)], 1)
  slot = jnp.arange(slots)
  if mask_ar is None:
    prefill_mask = (slot[None, None, :] <= jnp.arange(t)[None, :, None]) & key_valid[:, None, :]
  else:
    prefix = make_prefix_lm_mask(valid, mask_ar)
    prefill_mask = jnp.concatenate([prefix, jnp.zeros((b, t, max_new_tokens), bool)], 2)
  cache = module.init_cache(b, slots, cache_dtype)
  soft = {} if embeds is None else {"inputs_embeds": embeds}
  logits, cache = module.apply(params, ids, cache, positions, prefill_mask, method="decode",
                               last_only=True, **soft)
  rng, first_rng = jax.random.split(rng)
  return dict(step=jnp.int32(0), done=jnp.zeros((b,), bool),
              next_token=sample_logits(logits[:, -1], first_rng, temperature, top_k, top_p),
              position=positions[:, -1] + 1, key_valid=key_valid, cache=cache, rng=rng)


@functools.partial(jax.jit, static_argnames=_STATIC + ("eos_id",))
def _decode_loop(params, state, *, module, max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, eos_id: Optional[int]):
  """`max_new_tokens - 1` single-token steps of a `lax.while_loop` (stopping early when every
  row has produced `eos_id`) -> int32 `[B, max_new_tokens]`."""
  fill = 0 if eos_id is None else eos_id
  key_valid = state["key_valid"]
  t = key_valid.shape[1] - max_new_tokens
  slot = jnp.arange(key_valid.shape[1])

  def record(s):
    token = jnp.where(s["done"], fill, s["next_token"])
    done = s["done"] if eos_id is None else (s["done"] | (token == eos_id))
    return token, s["tokens"].at[:, s["step"]].set(token), done

  def cond(s):
    return (s["step"] < max_new_tokens - 1) & ~jnp.all(s["done"])

  def body(s):
    token, tokens, done = record(s)
    mask = (key_valid & (slot[None, :] <= t + s["step"]))[:, None, :]
    logits, cache = module.apply(params, token[:, None], s["cache"], s["position"][:, None],
                                 mask, method="decode")
    rng, step_rng = jax.random.split(s["rng"])
    return dict(s, step=s["step"] + 1, done=done,
                next_token=sample_logits(logits[:, -1], step_rng, temperature, top_k, top_p),
                position=s["position"] + 1, tokens=tokens, cache=cache, rng=rng)

  state = dict(state, tokens=jnp.full((key_valid.shape[0], max_new_tokens), fill, jnp.int32))
  if max_new_tokens == 0:
    return state["tokens"]
  return record(jax.lax.while_loop(cond, body, state))[1]


def generate(module, params, input_ids, max_new_tokens: int, *, attention_mask=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: Optional[int] = None, rng: Optional[jax.Array] = None,
             cache_dtype=jnp.float32, inputs_embeds=None, mask_ar=None,
             timings: Optional[dict] = None) -> jax.Array:
  """Continues each prompt row of `input_ids [B, T]` by `max_new_tokens` tokens.

  `attention_mask [B, T]` marks the real tokens of ragged prompts (left- or right-padded; real
  tokens must be contiguous). Greedy when `temperature == 0`, else sampled with `rng` (top-k,
  top-p). Rows that produce `eos_id` are padded with it afterwards; the loop stops when every
  row is done. Returns int32 `[B, max_new_tokens]`. The longest prompt plus `max_new_tokens`
  must fit the model's `max_position_embeddings`.

  Prefix-LM prompts: `inputs_embeds [B, T, D]` (already scaled, as `Decoder.embed` gives them)
  stand for the prompt in place of `input_ids` (pass None), and `mask_ar [B, T]` (0 = prefix,
  bidirectional; 1 = causal) shapes the prefill's attention as `decoder.make_prefix_lm_mask`.

  `timings`, a dict, receives the wall-clock seconds of `prefill` (the prompt and the first
  token) and `decoding` (the other tokens), each waited for.
  """
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("pass exactly one of input_ids and inputs_embeds")
  embeds = None if inputs_embeds is None else np.asarray(inputs_embeds)
  if embeds is not None and embeds.ndim != 3:
    raise ValueError(f"inputs_embeds must be [B, T, D], got shape {embeds.shape}")
  ids = (np.zeros(embeds.shape[:2], np.int32) if embeds is not None else np.asarray(input_ids))
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
  valid = (np.ones(ids.shape, bool) if attention_mask is None
           else np.asarray(attention_mask).astype(bool))
  if valid.shape != ids.shape:
    raise ValueError(f"attention_mask has shape {valid.shape}, the prompt {ids.shape}")
  ar = None if mask_ar is None else np.asarray(mask_ar).astype(np.int32)
  if ar is not None and ar.shape != ids.shape:
    raise ValueError(f"mask_ar has shape {ar.shape}, the prompt {ids.shape}")
  lengths = valid.sum(1)
  if np.any(lengths == 0):
    raise ValueError(f"prompt rows {np.flatnonzero(lengths == 0).tolist()} have no tokens")
  longest = int(lengths.max())
  context = module.config.max_position_embeddings
  if longest + max_new_tokens > context:
    raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                     f"exceeds the model's context of {context} positions")
  if temperature != 0.0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
  bucket = prompt_bucket(longest)
  packed = np.zeros((ids.shape[0], bucket), np.int32)
  packed_valid = np.zeros((ids.shape[0], bucket), bool)
  packed_embeds = (None if embeds is None else
                   np.zeros((ids.shape[0], bucket, embeds.shape[2]), embeds.dtype))
  packed_ar = None if ar is None else np.ones((ids.shape[0], bucket), np.int32)
  for row, (tokens, keep) in enumerate(zip(ids, valid)):
    real = tokens[keep]
    if keep.any() and not keep[np.argmax(keep):len(keep) - np.argmax(keep[::-1])].all():
      raise ValueError(f"attention_mask row {row} has holes; real tokens must be contiguous")
    packed[row, bucket - len(real):] = real
    packed_valid[row, bucket - len(real):] = True
    if embeds is not None:
      packed_embeds[row, bucket - len(real):] = embeds[row][keep]
    if ar is not None:
      packed_ar[row, bucket - len(real):] = ar[row][keep]
  static = dict(module=module, max_new_tokens=int(max_new_tokens),
                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  t0 = time.perf_counter()
  state = _prefill(params, None if embeds is not None else jnp.asarray(packed),
                   jnp.asarray(packed_valid), jax.random.key(0) if rng is None else rng,
                   None if embeds is None else jnp.asarray(packed_embeds),
                   None if ar is None else jnp.asarray(packed_ar), cache_dtype=cache_dtype,
                   **static)
  if timings is not None:
    jax.block_until_ready(state)
    timings["prefill"] = time.perf_counter() - t0
    t0 = time.perf_counter()
  tokens = _decode_loop(params, state, eos_id=None if eos_id is None else int(eos_id), **static)
  if timings is not None:
    jax.block_until_ready(tokens)
    timings["decoding"] = time.perf_counter() - t0
  return tokens
