"""generate.generate on a tiny random decoder: cached greedy decoding equals argmax over the
uncached full sequence, ragged batches equal one-by-one, EOS padding, sampling settings, one
compilation per bucket, and the over-long prompt error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeglass_jax import decoder, generate

CONFIG = decoder.DecoderConfig.from_hf(dict(
    model_type="gemma3_text", vocab_size=37, hidden_size=16, intermediate_size=24,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    layer_types=["sliding_attention", "full_attention"], sliding_window=4,
    max_position_embeddings=40, final_logit_softcapping=30.0))


@pytest.fixture(scope="module")
def model():
  module = decoder.Decoder(CONFIG)
  params = module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  params = jax.tree.map(lambda a: a * 3.0, params)  # peaky logits: no argmax near-ties
  return module, params


def uncached_greedy(module, params, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(module.apply(params, np.asarray([seq]))[0, -1])))
  return seq[len(prompt):]


PROMPTS = [[3, 8, 1, 30, 5, 9, 2], [7], [11, 4, 20]]


def test_cached_greedy_equals_argmax_of_uncached_logits(model):
  module, params = model
  out = generate.generate(module, params, np.asarray([PROMPTS[0]]), 8)
  assert out.dtype == jnp.int32 and out.shape == (1, 8)
  assert np.asarray(out)[0].tolist() == uncached_greedy(module, params, PROMPTS[0], 8)


def test_one_and_two_new_tokens_and_none(model):
  """The prefill samples the first token and the loop the rest: the short ends still match."""
  module, params = model
  for n in (1, 2):
    out = np.asarray(generate.generate(module, params, np.asarray([PROMPTS[2]]), n))
    assert out[0].tolist() == uncached_greedy(module, params, PROMPTS[2], n)
  assert generate.generate(module, params, np.asarray([PROMPTS[2]]), 0).shape == (1, 0)


def test_ragged_batch_equals_one_by_one(model):
  module, params = model
  t = max(map(len, PROMPTS))
  ids = np.zeros((3, t), np.int32)
  mask = np.zeros((3, t), int)
  for i, p in enumerate(PROMPTS):  # right-padded here; generate left-aligns them
    ids[i, :len(p)], mask[i, :len(p)] = p, 1
  batch = np.asarray(generate.generate(module, params, ids, 6, attention_mask=mask))
  for i, p in enumerate(PROMPTS):
    alone = np.asarray(generate.generate(module, params, np.asarray([p]), 6))[0]
    assert batch[i].tolist() == alone.tolist() == uncached_greedy(module, params, p, 6)


def test_rows_stop_at_eos_and_are_padded_with_it(model):
  module, params = model
  free = np.asarray(generate.generate(module, params, np.asarray([PROMPTS[0]]), 8))[0]
  eos = int(free[2])
  first = int(np.flatnonzero(free == eos)[0])
  out = np.asarray(generate.generate(module, params, np.asarray([PROMPTS[0]]), 8,
                                     eos_id=eos))[0]
  assert out[:first + 1].tolist() == free[:first + 1].tolist()
  assert np.all(out[first:] == eos)


def test_sampling_settings(model):
  module, params = model
  ids = np.asarray([PROMPTS[0], PROMPTS[0]])
  greedy = np.asarray(generate.generate(module, params, ids, 6))
  key = jax.random.key(3)
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    out = generate.generate(module, params, ids, 6, temperature=1.0, rng=key, **kw)
    np.testing.assert_array_equal(out, greedy)
  a = generate.generate(module, params, ids, 6, temperature=5.0, rng=key)
  b = generate.generate(module, params, ids, 6, temperature=5.0, rng=key)
  c = generate.generate(module, params, ids, 6, temperature=5.0, rng=jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and not np.array_equal(a, greedy)
  with pytest.raises(ValueError, match="needs rng"):
    generate.generate(module, params, ids, 6, temperature=1.0)


def test_one_compilation_per_prompt_bucket(model):
  module, params = model
  jitted = (generate._prefill, generate._decode_loop)
  before = [f._cache_size() for f in jitted]
  for p in ([1, 2, 3], [4, 5, 6, 7, 8], [9] * 11):  # all in the 16-token bucket
    generate.generate(module, params, np.asarray([p]), 5)
  assert all(f._cache_size() - n <= 1 for f, n in zip(jitted, before))


def test_timings_split_prefill_from_decoding(model):
  module, params = model
  timings = {}
  tokens = generate.generate(module, params, np.asarray([PROMPTS[0]]), 6, timings=timings)
  np.testing.assert_array_equal(tokens, generate.generate(module, params,
                                                          np.asarray([PROMPTS[0]]), 6))
  assert set(timings) == {"prefill", "decoding"} and all(v > 0 for v in timings.values())


def test_prompt_plus_new_tokens_beyond_the_context_names_both(model):
  module, params = model
  with pytest.raises(ValueError, match=r"prompt of 7 tokens plus max_new_tokens=34 exceeds the "
                                       r"model's context of 40"):
    generate.generate(module, params, np.asarray([PROMPTS[0]]), 34)


def uncached_prefix_greedy(module, params, embeds, prefix_len, n):
  """Greedy continuation under the prefix-LM mask, recomputed from scratch every token."""
  x = np.asarray(embeds)
  out = []
  for _ in range(n):
    t = x.shape[1]
    mask_ar = (np.arange(t) >= prefix_len).astype(int)[None]
    mask = decoder.make_prefix_lm_mask(np.ones((1, t), bool), mask_ar)
    logits = module.apply(params, None, None, mask, inputs_embeds=x)
    out.append(int(np.argmax(logits[0, -1])))
    nxt = np.asarray(module.apply(params, np.asarray([[out[-1]]]), method="embed"))
    x = np.concatenate([x, nxt], 1)
  return out


def test_prefix_lm_prompt_from_embeddings(model):
  """A soft-token prompt (embeddings, bidirectional prefix via mask_ar) decodes like the
  uncached prefix-LM forward pass, row by row in a ragged batch; the prefix mask matters."""
  module, params = model
  rng = np.random.default_rng(0)
  lengths = [6, 4]
  rows = [np.asarray(rng.normal(size=(1, n, CONFIG.hidden_size)), np.float32) for n in lengths]
  embeds = np.zeros((2, 6, CONFIG.hidden_size), np.float32)
  valid = np.zeros((2, 6), bool)
  for r, x in enumerate(rows):
    embeds[r, :lengths[r]] = x[0]
    valid[r, :lengths[r]] = True
  zeros = np.zeros((2, 6), int)
  got = np.asarray(generate.generate(module, params, None, 4, attention_mask=valid,
                                     inputs_embeds=embeds, mask_ar=zeros))
  for r, x in enumerate(rows):
    assert got[r].tolist() == uncached_prefix_greedy(module, params, x, lengths[r], 4)
  causal = np.asarray(generate.generate(module, params, None, 4, attention_mask=valid,
                                        inputs_embeds=embeds))
  assert causal[0].tolist() != got[0].tolist()
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    generate.generate(module, params, np.zeros((2, 5), int), 2, inputs_embeds=embeds)
