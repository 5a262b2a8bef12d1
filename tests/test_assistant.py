"""The assistant's pieces by hand: sequence and masks, loss mask, DPO loss, minimal-edit pairs,
masked-out modalities, the bridge kinds."""
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeglass_jax import adapters, configs, decoder, generate, losses
from edgeglass_jax.data import pipeline, qa, sources, synthetic
from edgeglass_jax.tasks import assistant, lm_lora
from tiny import ROOT

BOS, EOS, PAD = 1, 2, 0


def test_prefix_lm_mask_of_an_assistant_sequence():
  """[2 image slots][1 audio slot, absent] BOS q SEP a EOS PAD: the prefix (valid slots, BOS,
  q, SEP) is bidirectional, the answer causal, the absent slot and PAD invisible."""
  soft_mask = np.array([[True, True, False]])
  ids, valid, ar, loss = assistant.text_sequence(BOS, [7], [9], [5], EOS, PAD, 6)
  np.testing.assert_array_equal(ids, [BOS, 7, 9, 5, EOS, PAD])
  input_mask, mask_ar, positions = assistant.full_masks(soft_mask, valid[None], ar[None])
  got = np.asarray(decoder.make_prefix_lm_mask(input_mask, mask_ar)).astype(int)[0]
  want = np.array([
      # i0 i1 a0 BOS q SEP ans EOS PAD
      [1, 1, 0, 1, 1, 1, 0, 0, 0],   # image 0
      [1, 1, 0, 1, 1, 1, 0, 0, 0],   # image 1
      [0, 0, 0, 0, 0, 0, 0, 0, 0],   # absent audio slot
      [1, 1, 0, 1, 1, 1, 0, 0, 0],   # BOS
      [1, 1, 0, 1, 1, 1, 0, 0, 0],   # q
      [1, 1, 0, 1, 1, 1, 0, 0, 0],   # SEP
      [1, 1, 0, 1, 1, 1, 1, 0, 0],   # answer
      [1, 1, 0, 1, 1, 1, 1, 1, 0],   # EOS
      [0, 0, 0, 0, 0, 0, 0, 0, 0]])  # PAD
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(positions)[0, :8], [0, 1, 1, 2, 3, 4, 5, 6])


def test_sink_token_sees_only_itself_and_the_prefix_sees_it():
  """sink [image 0, absent][image 1][audio, absent] BOS q SEP a EOS PAD: the sink attends to
  itself alone; mask_ar's step behind it falls on image 1, the first valid slot, so that
  dropping the absent slots (as decoding does) keeps it."""
  soft_mask = np.array([[False, True, False]])
  ids, valid, ar, _ = assistant.text_sequence(BOS, [7], [9], [5], EOS, PAD, 6)
  input_mask, mask_ar, positions = assistant.full_masks(soft_mask, valid[None], ar[None],
                                                        sink=True)
  np.testing.assert_array_equal(np.asarray(mask_ar)[0], [1, 0, 1, 0, 0, 0, 0, 1, 1, 1])
  got = np.asarray(decoder.make_prefix_lm_mask(input_mask, mask_ar)).astype(int)[0]
  prefix = [1, 0, 1, 0, 1, 1, 1, 0, 0, 0]
  want = np.array([
      [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],                # sink
      [0] * 10,                                      # absent image slot
      prefix, [0] * 10, prefix, prefix, prefix,      # image 1, absent audio, BOS, q, SEP
      [1, 0, 1, 0, 1, 1, 1, 1, 0, 0],                # answer
      [1, 0, 1, 0, 1, 1, 1, 1, 1, 0],                # EOS
      [0] * 10])                                     # PAD
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(positions)[0, [0, 2, 4, 5, 6, 7, 8]],
                                [0, 1, 2, 3, 4, 5, 6])


def test_loss_mask_covers_exactly_the_answer_and_eos():
  codec = lm_lora.TextCodec(lm_lora.word_tokenizer(qa.question_words()), name="words")
  question, answer = codec.encode("what color is the shape?"), codec.encode(" it is red")
  sep = codec.encode("\nanswer:")
  ids, valid, ar, loss = assistant.text_sequence(BOS, question, sep, answer, codec.eos_id,
                                                 codec.pad_id, 24)
  start = 1 + len(question) + len(sep)
  np.testing.assert_array_equal(ids[loss == 1], answer + [codec.eos_id])
  assert np.flatnonzero(loss).tolist() == list(range(start, start + len(answer) + 1))
  assert ar[:start].sum() == 0 and ar[start:].all()
  assert valid.sum() == start + len(answer) + 1
  prefix_only = assistant.text_sequence(BOS, question, sep, None, codec.eos_id, codec.pad_id, 24)
  assert prefix_only[3].sum() == 0 and prefix_only[1].sum() == start
  with pytest.raises(ValueError, match="more than max_len=8"):
    assistant.text_sequence(BOS, question, sep, answer, codec.eos_id, codec.pad_id, 8)


def _reference_dpo(pw, pl, rw, rl, beta):
  z = beta * ((pw - rw) - (pl - rl))
  return float(np.mean(np.log1p(np.exp(-z))))


def test_dpo_loss_equals_float64_reference_and_log2_at_the_reference():
  rng = np.random.default_rng(0)
  pw, pl, rw, rl = (rng.normal(size=7) * 5 - 20 for _ in range(4))
  with jax.enable_x64(True):
    loss, metrics = losses.dpo_loss(pw, pl, rw, rl, beta=0.3)
    assert loss.dtype == jnp.float64
    assert abs(float(loss) - _reference_dpo(pw, pl, rw, rl, 0.3)) < 1e-12
  z = 0.3 * ((pw - rw) - (pl - rl))
  assert abs(float(metrics["preference_accuracy"]) - np.mean(z > 0)) < 1e-6
  same, _ = losses.dpo_loss(pw, pl, pw, pl, beta=0.1)
  assert abs(float(same) - math.log(2.0)) < 1e-6
  mask = np.array([1, 1, 0, 0, 0, 0, 0], bool)
  masked, _ = losses.dpo_loss(pw, pl, rw, rl, beta=0.3, mask=mask)
  assert abs(float(masked) - _reference_dpo(pw[:2], pl[:2], rw[:2], rl[:2], 0.3)) < 1e-5


def test_minimal_edit_pairs_differ_in_exactly_one_attribute_word():
  dataset = synthetic.SyntheticTriModal(synthetic.SyntheticConfig(num_train=40, num_val=0,
                                                                  num_test=0))
  attrs = [synthetic.attributes_of(g) for g in dataset.groups("train")]
  items = qa.items_for(40, ("image", "audio", "text"), qa.KINDS, 0, 0)
  pairs = assistant.preference_pairs(items, attrs, seed=0, split_code=0)
  assert len(pairs) == len(items)
  for k, chosen, rejected in pairs:
    item = items[k]
    a, b = chosen.split(), rejected.split()
    assert len(a) == len(b)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    assert len(diff) == 1, (chosen, rejected)
    names = [n for n in synthetic.ATTRIBUTE_NAMES if a[diff[0]] in synthetic.VOCAB[n]]
    assert names and b[diff[0]] in synthetic.VOCAB[names[0]]
    assert a[diff[0]] == getattr(attrs[item.example], names[0])
    if item.kind != "describe":
      assert names[0] == item.kind and chosen == qa.answer_text(item.kind, attrs[item.example])


def test_self_correction_pairs_fix_one_word_of_a_wrong_answer():
  attrs = synthetic.Attributes("red", "star", "small", "left")
  item = qa.QAItem(0, "image", "color", 0)
  assert qa.correct_minimally("it is blue", item, attrs) == ("it is red", "it is blue")
  assert qa.correct_minimally("it is red", item, attrs) is None
  assert qa.correct_minimally("blue blue", item, attrs) is None
  assert qa.correct_minimally("it is blue or green", item, attrs) is None
  pos = qa.QAItem(0, "image", "position", 0)
  assert qa.correct_minimally("it is at the right", pos, attrs) == ("it is at the left",
                                                                   "it is at the right")
  with pytest.raises(ValueError, match="exactly once"):
    qa.minimal_edit("a red red star", "color", "red", "blue")


def _tiny_model(kind="perceiver"):
  codec = lm_lora.TextCodec(lm_lora.word_tokenizer(qa.question_words()), name="words")
  cfg = decoder.DecoderConfig(family="llama", vocab_size=codec.vocab_size, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, layer_types=(decoder.FULL,) * 2,
                              tie_word_embeddings=True, max_position_embeddings=64)
  lm = decoder.Decoder(cfg)
  lm_vars = lm.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  mods = (("image", adapters.AdapterConfig(kind=kind, hidden=16, depth=1, num_latents=3,
                                           num_heads=2, factor=2), True),
          ("audio", adapters.AdapterConfig(kind=kind, hidden=16, depth=1, num_latents=2,
                                           num_heads=2, factor=2), False))
  bridge = assistant.Bridge(mods, 32, 1.0)
  feats = {"image/tokens": jnp.ones((2, 17, 12)), "image/token_mask": jnp.ones((2, 17), bool),
           "image/valid": jnp.ones((2,), bool), "audio/tokens": jnp.ones((2, 5, 8)),
           "audio/token_mask": jnp.ones((2, 5), bool), "audio/valid": jnp.ones((2,), bool)}
  bparams = bridge.init(jax.random.key(1), feats)
  num_soft = bridge.apply(bparams, feats)[0].shape[1]
  model = assistant.Model(bridge, lm, None, codec, BOS, tuple(codec.encode("\nanswer:")),
                          num_soft)
  return model, lm_vars, {"bridge": bparams}, feats


@pytest.mark.parametrize("kind,num_soft", [("perceiver", 3 + 2), ("compress", 4 + 3),
                                           ("mlp", 17 + 5)])
def test_absent_modalities_drop_out_through_masks(kind, num_soft):
  """Whatever features a masked-out modality holds, the text logits are the same, and with no
  modality they equal the plain LM on the text alone (same shapes throughout)."""
  model, lm_vars, trainable, feats = _tiny_model(kind)
  assert model.num_soft == num_soft
  rng = np.random.default_rng(0)
  seq = [assistant.text_sequence(BOS, model.codec.encode(q), model.sep_ids,
                                 model.codec.encode(" " + a), model.codec.eos_id,
                                 model.codec.pad_id, 16)
         for q, a in (("what color is the shape?", "it is red"), ("describe the sound.", "a"))]
  batch = dict(feats)
  for j, key in enumerate(("text", "text/valid", "text/ar", "text/loss")):
    batch[key] = np.stack([s[j] for s in seq])
  batch["image/tokens"] = rng.normal(size=(2, 17, 12)).astype(np.float32)
  batch["audio/tokens"] = rng.normal(size=(2, 5, 8)).astype(np.float32)
  batch["audio/valid"] = np.array([False, True])
  batch["image/valid"] = np.array([True, False])
  first = np.asarray(model.text_logits(trainable, lm_vars, batch))
  other = dict(batch)
  other["audio/tokens"] = np.where(np.array([True, False])[:, None, None], 7.0,
                                   batch["audio/tokens"])
  other["image/tokens"] = np.where(np.array([False, True])[:, None, None], -3.0,
                                   batch["image/tokens"])
  second = np.asarray(model.text_logits(trainable, lm_vars, other))
  np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-5)
  moved = dict(batch, **{"image/tokens": batch["image/tokens"] + 1.0})
  assert np.abs(np.asarray(model.text_logits(trainable, lm_vars, moved))[0] - first[0]).max() \
      > 1e-4
  none = dict(batch, **{"image/valid": np.zeros(2, bool), "audio/valid": np.zeros(2, bool)})
  text_only = np.asarray(model.text_logits(trainable, lm_vars, none))
  plain = np.asarray(model.lm.apply(lm_vars, batch["text"], mask=decoder.make_prefix_lm_mask(
      batch["text/valid"], batch["text/ar"])))
  seen = batch["text/valid"][:, :-1]
  np.testing.assert_allclose(text_only[:, 1:][seen], plain[:, :-1][seen], rtol=1e-4, atol=1e-4)



class _ZeroFeatures:
  """Features of `_tiny_model`'s shapes for any examples."""

  def get_batch(self, examples, epoch):
    b = len(examples)
    return {"image/tokens": np.zeros((b, 17, 12), np.float32), "image/valid": np.ones(b, bool),
            "audio/tokens": np.zeros((b, 5, 8), np.float32), "audio/valid": np.ones(b, bool)}


def test_training_batches_pad_to_the_longest_of_the_global_batch():
  """Both processes' rows of a global batch get the same T, the batch's longest sequence rounded
  up to 8; the rows are the `max_len` rows cut there, and the answer loss is unchanged."""
  config = configs.load(os.path.join(ROOT, "configs", "assistant.py") + ":qa,tiny")
  assert config.data.pad_to_multiple_of == 8
  dataset = sources.synthetic_dataset(config.data)
  model, lm_vars, trainable, _ = _tiny_model("compress")
  items = assistant.train_items(config, dataset, "train")
  src = assistant.QASource(dataset, "train", _ZeroFeatures(), items, model, 56,
                           pad_to_multiple_of=8)
  full = assistant.QASource(dataset, "train", _ZeroFeatures(), items, model, 56)
  shards = [pipeline.make_train_loader(src, 8, seed=3, shard_index=p, shard_count=2, prefetch=0)
            for p in (0, 1)]
  lengths = []
  for _ in range(6):
    halves = [next(shard) for shard in shards]
    t = halves[0]["text"].shape[1]
    longest = max(int(h["text/valid"].sum(1).max()) for h in halves)
    assert [h["text"].shape[1] for h in halves] == [t, t] == [min(56, -(-longest // 8) * 8)] * 2
    for half in halves:
      whole = full.get_batch(half["index"], 0, seed=3)
      assert not whole["text/valid"][:, t:].any()
      for key in ("text", "text/valid", "text/ar", "text/loss"):
        np.testing.assert_array_equal(half[key], whole[key][:, :t])
      np.testing.assert_allclose(model.answer_nll(trainable, lm_vars, half)[0],
                                 model.answer_nll(trainable, lm_vars, whole)[0], rtol=1e-5)
    lengths.append(t)
  assert min(lengths) < 56
  pairs = assistant.preference_pairs(items, src.attributes, 0, 0, limit=16)
  paired = assistant.QASource(dataset, "train", _ZeroFeatures(), items, model, 56, pairs=pairs,
                              pad_to_multiple_of=8)
  batch = paired.get_batch([0, 1], 0, batch_indices=range(16))
  assert batch["text"].shape == batch["rejected/text"].shape
  assert batch["text"].shape[1] == paired.text_length(range(16)) < 56
  with pytest.raises(ValueError, match="batch_indices of train do not hold"):
    src.get_batch(list(range(16)), 0, batch_indices=[int(np.argmin(
        [src.sequences(i)[""][1].sum() for i in range(16)]))])

@pytest.mark.parametrize("sink", [False, True])
def test_greedy_decoding_agrees_with_the_teacher_forced_sequence(sink):
  """The compacted prefix `Decoding` feeds the LM (absent slots dropped) predicts the first
  answer token as the training-time sequence does, and what it generates is, token by token,
  the argmax of the training-time logits of the same sequence with that answer."""
  model, lm_vars, trainable, feats = _tiny_model("compress")
  model = dataclasses.replace(model, sink=sink)
  rng = np.random.default_rng(1)
  batch = dict(feats, **{"image/tokens": rng.normal(size=(2, 17, 12)).astype(np.float32),
                         "audio/tokens": rng.normal(size=(2, 5, 8)).astype(np.float32),
                         "image/valid": np.array([True, False]),
                         "audio/valid": np.array([False, True])})
  questions = ("what color is the shape?", "where is the sound?")
  prompts = [model.prompt(q, 16) for q in questions]
  prompt_batch = dict(batch, **{k: np.stack([p[k] for p in prompts]) for k in prompts[0]})
  embeds, mask, mask_ar = assistant.Decoding(model).prefix(trainable, lm_vars, prompt_batch)
  soft = (4, 3)  # 2x2 groups of the 4x4 patches; 5 frames in groups of 2
  assert mask.sum(1).tolist() == [int(sink) + k + 1 + len(model.codec.encode(q))
                                  + len(model.sep_ids) for k, q in zip(soft, questions)]
  tokens = np.asarray(generate.generate(model.lm, lm_vars, None, 4, attention_mask=mask,
                                        inputs_embeds=embeds, mask_ar=mask_ar))
  seqs = [assistant.text_sequence(BOS, model.codec.encode(q), model.sep_ids, list(t),
                                  model.codec.eos_id, model.codec.pad_id, 24)
          for q, t in zip(questions, tokens)]
  forced = dict(batch, **{k: np.stack([s[j] for s in seqs]) for j, k in
                          enumerate(("text", "text/valid", "text/ar", "text/loss"))})
  logits = np.asarray(model.text_logits(trainable, lm_vars, forced))
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  prefill = np.asarray(model.lm.apply(lm_vars, None, positions, decoder.make_prefix_lm_mask(
      mask, mask_ar), inputs_embeds=embeds))
  for row, seq in enumerate(seqs):
    start = int(np.argmax(seq[2]))
    np.testing.assert_allclose(logits[row, start], prefill[row, mask[row].sum() - 1],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(logits[row, start:start + 4].argmax(-1), tokens[row])


def test_hidden_norms_are_the_norms_after_each_block_with_masked_slots_zero():
  model, lm_vars, trainable, feats = _tiny_model("compress")
  model = dataclasses.replace(model, sink=True)
  prompt = model.prompt("what color is the shape?", 16)
  batch = dict(feats, **{k: np.stack([v, v]) for k, v in prompt.items()})
  batch["audio/valid"] = np.array([False, True])
  norms = np.asarray(model.hidden_norms(trainable, lm_vars, batch))
  x, input_mask, mask_ar, positions = model.inputs(trainable, lm_vars, batch)

  def by_hand(lm, x):
    out = []
    for block in lm.layers:
      _, x = block(x, positions, None, decoder.make_prefix_lm_mask(input_mask, mask_ar))
      out.append(jnp.linalg.norm(x, axis=-1))
    return jnp.stack(out)

  want = np.asarray(model.lm.apply(lm_vars, x, method=by_hand))
  valid = np.asarray(input_mask)
  assert norms.shape == (2, 2, 1 + model.num_soft + 16)
  np.testing.assert_allclose(norms[:, valid], want[:, valid], rtol=1e-5)
  assert not norms[:, ~valid].any() and (~valid[0]).sum() > (~valid[1]).sum()


def test_scratch_lm_starts_from_the_loaded_lm_and_learns_from_informative_tokens():
  """`lm.train_all` trains the loaded LM (its embedding scale is what the bridge's output scale
  was measured on), and the path soft tokens -> answer is learnable: with image tokens that
  encode the colour, 60 Adam steps make every teacher-forced colour answer exact."""
  import optax
  from flax import linen as nn
  config = configs.load(os.path.join(ROOT, "configs", "assistant.py") + ":qa,tiny,scratch")
  dims = {"image": (9, 12), "audio": (5, 8)}
  model, lm_vars, _ = assistant.build_model(config, dims)
  trainable = nn.meta.unbox(assistant.init_trainable(model, lm_vars, dims, config,
                                                     jax.random.key(0)))
  loaded = nn.meta.unbox(lm_vars)
  jax.tree.map(np.testing.assert_array_equal, trainable["lm"], loaded)
  emb = np.asarray(loaded["params"]["embedder"]["embedding"])
  assert model.bridge.out_scale == pytest.approx(float(np.sqrt(np.mean(emb ** 2))), rel=1e-5)

  colors = synthetic.COLORS
  seqs = [assistant.text_sequence(model.bos_id, model.codec.encode("what color is the shape?"),
                                  model.sep_ids, model.codec.encode(f" it is {c}"),
                                  model.codec.eos_id, model.codec.pad_id, 24) for c in colors]
  code = np.zeros((len(colors), 9, 12), np.float32)
  code[np.arange(len(colors)), :, np.arange(len(colors))] = 3.0
  batch = {"image/tokens": code, "image/token_mask": np.ones((len(colors), 9), bool),
           "image/valid": np.ones(len(colors), bool),
           "audio/tokens": np.zeros((len(colors), 5, 8), np.float32),
           "audio/token_mask": np.ones((len(colors), 5), bool),
           "audio/valid": np.zeros(len(colors), bool)}
  for j, key in enumerate(("text", "text/valid", "text/ar", "text/loss")):
    batch[key] = np.stack([s[j] for s in seqs])
  batch = jax.tree.map(jnp.asarray, batch)
  opt = optax.adam(3e-3)

  def loss(tr):
    nll, count = model.answer_nll(tr, None, batch)
    return jnp.mean(nll / count)

  @jax.jit
  def step(tr, state):
    grads = jax.grad(loss)(tr)
    updates, state = opt.update(grads, state, tr)
    return optax.apply_updates(tr, updates), state

  state = opt.init(trainable)
  for _ in range(60):
    trainable, state = step(trainable, state)
  pred = np.asarray(model.text_logits(trainable, None, batch)).argmax(-1)
  answer = np.asarray(batch["text/loss"]) > 0
  assert np.all((pred == np.asarray(batch["text"])) | ~answer)


@pytest.mark.parametrize("arg", ["caption", "qa,compress", "dpo,mlp", "qa,perceiver64",
                                 "qa,scratch", "caption,tiny", "qa,tiny,realenc",
                                 "qa,compact,sink", "qa,compact,nosink", "qa,tiny,nosink",
                                 "qa,scratch,sink", "qa,v1", "qa,v1,compact,whiten",
                                 "qa,nowhiten,audiolayer-1", "qa,tiny,whiten,audiolayer0"])
def test_stage_configs_load_with_their_options(arg):
  """Every option loads; the sink is on for the pretrained LM unless `nosink`, off for a scratch
  LM unless `sink`; at full size (not `v1`) whitened tokens, Whisper's block 1 and `compact`
  bridges unless an option says otherwise, elsewhere raw top-layer tokens and Perceivers."""
  config = configs.load(os.path.join(ROOT, "configs", "assistant.py") + ":" + arg)
  options = arg.split(",")[1:]
  recipe = not {"tiny", "v1"} & set(options)
  assert config.task == "assistant" and config.stage == arg.split(",")[0]
  assert config.data.sink == ("sink" in options or not {"scratch", "nosink"} & set(options))
  whiten = "whiten" in options or (recipe and "nowhiten" not in options)
  assert config.bridge.whiten == (0.1 if whiten else 0.0)
  layers = [int(o[len("audiolayer"):]) for o in options if o.startswith("audiolayer")]
  assert config.encoders.audio.feature_layer == (layers[0] if layers else 1 if recipe else -1)
  assert config.encoders.image.feature_layer == -1
  connector = [o for o in options if o.startswith(("perceiver", "compress", "mlp", "compact"))]
  if not connector:
    image, audio = config.bridge.image, config.bridge.audio
    kinds = (image.kind, image.factor, image.keep_cls, audio.kind, audio.factor)
    assert kinds == (("compress", 4, True, "compress", 5) if recipe else
                     ("perceiver", 3, False, "perceiver", 2))
  lora_scaled = recipe and config.stage == "qa" and "scratch" not in options
  assert config.train.lr_scale == ("^lora/:3" if lora_scaled else "")
  config.bridge.whiten = -1.0
  with pytest.raises(ValueError, match=r"config.bridge.whiten=-1.0"):
    assistant.whiten_shrinkage(config)
  config.bridge.update(whiten=0.1, init_from_align="runs/align")
  with pytest.raises(ValueError, match="trained on unwhitened tokens"):
    assistant.make_task(config, "/nonexistent", None)
  real = "tiny" not in arg or "realenc" in arg
  assert bool(config.encoders.image.package == "dinov2-small") == real
  assert config.encoders.audio.package == ("whisper-tiny.en" if real else "")
  if "realenc" in arg:
    assert config.encoders.image.image_size == 56 and config.lm.random  # the tiny LM stays
  with pytest.raises(ValueError, match="unknown option 'nope'"):
    configs.load(os.path.join(ROOT, "configs", "assistant.py") + ":" + arg + ",nope")
  for bad, message in (("qa,sink,nosink", "'sink' and 'nosink' contradict"),
                       ("qa,whiten,nowhiten", "'whiten' and 'nowhiten' contradict"),
                       ("qa,perceiverx", "'perceiverx' in 'qa,perceiverx' needs an integer"),
                       ("qa,audiolayer", "'audiolayer' in 'qa,audiolayer' needs an integer")):
    with pytest.raises(ValueError, match=message):
      configs.load(os.path.join(ROOT, "configs", "assistant.py") + ":" + bad)


def test_full_size_qa_defaults_are_the_measured_recipe():
  """Plain `qa` is the README's 1000-step run that met every target (`runs/kl`), and `qa,v1`
  the defaults every earlier row ran with."""
  config = configs.load(os.path.join(ROOT, "configs", "assistant.py") + ":qa")
  train = config.train
  assert (train.steps, train.learning_rate, train.lr_scale, train.warmup_steps) == (
      1000, 1e-3, "^lora/:3", 40)
  assert (config.bridge.whiten, config.encoders.audio.feature_layer, config.data.sink) == (
      0.1, 1, True)
  old = configs.load(os.path.join(ROOT, "configs", "assistant.py") + ":qa,v1")
  assert (old.train.steps, old.train.learning_rate, old.train.lr_scale) == (800, 5e-4, "")
  assert (old.bridge.image.num_latents, old.bridge.audio.num_latents) == (32, 16)


def _encoder_tokens(config):
  """`{m: (N, D)}` the configured encoders give: DINOv2-S/14 (patch 14, CLS, width 384) or the
  tiny CLIP ViT (its hf_config); Whisper: 50 frames a second (tiny.en width 384)."""
  image, audio = config.encoders.image, config.encoders.audio
  if image.package:
    n_img, d_img = (image.image_size // 14) ** 2 + 1, 384
  else:
    hf = image.hf_config
    n_img, d_img = (hf.image_size // hf.patch_size) ** 2 + 1, hf.hidden_size
  d_aud = audio.hf_config.d_model if not audio.package else 384
  return {"image": (n_img, d_img), "audio": (int(audio.max_seconds * 50), d_aud)}


@pytest.mark.parametrize("arg", ["qa", "qa,v1", "qa,perceiver64", "qa,perceiver128",
                                 "qa,compress", "qa,mlp", "qa,tiny,compress",
                                 "qa,tiny,realenc,compress", "qa,tiny,realenc,mlp", "qa,compact",
                                 "qa,tiny,realenc,compact"])
def test_every_bridge_option_fits_its_encoders_tokens(arg):
  """Each option's bridge builds on the token shapes of its encoders at that size (the full
  `compress` once asked 3x3 groups of DINOv2's 16x16 grid) with the soft-token count it names."""
  config = configs.load(os.path.join(ROOT, "configs", "assistant.py") + ":" + arg)
  dims = _encoder_tokens(config)
  mods = tuple((m, adapters.AdapterConfig.from_dict(dict(config.bridge[m])), m == "image")
               for m in ("image", "audio"))
  bridge = assistant.Bridge(mods, width=32)
  soft, _ = jax.eval_shape(lambda r: bridge.init_with_output(
      r, assistant.dummy_features(dims, ("image", "audio")))[0], jax.random.key(0))
  image, audio = config.bridge.image, config.bridge.audio
  expect = {"perceiver": image.num_latents, "mlp": dims["image"][0],
            "compress": (math.isqrt(dims["image"][0] - 1) // image.factor) ** 2
            + image.keep_cls}[image.kind]
  expect += {"perceiver": audio.num_latents,
             "compress": -(-dims["audio"][0] // audio.factor)}[audio.kind]
  assert soft.shape == (1, expect, 32)


def test_word_tokenizer_reads_a_transcript_like_the_typed_question():
  tok = lm_lora.word_tokenizer(["what", "?"])
  typed, heard = (tok(t, add_special_tokens=False)["input_ids"]
                  for t in ("what is the color of the shape?", "What is the Color of the shape?"))
  assert typed == heard and tok.unk_token_id not in typed


def test_whitened_bridge_keeps_the_training_splits_statistics_through_training(tmp_path):
  """`qa,tiny,whiten`: the exported bridge whitens with the training split's token statistics
  (float64 numpy over the cache, the CLS token on its own), untouched by 3 steps of training
  with weight decay; a continuation without whitening is refused by name, its parent unchanged
  and no file written."""
  from edgeglass_jax import features, whitening
  from edgeglass_jax.tasks import loop
  from tiny import run_main, snapshot
  workdir, other = str(tmp_path / "w"), str(tmp_path / "plain")
  common = ("--config.train.steps=3", "--config.eval.max_items=4", "--config.eval.spoken=0",
            "--config.data.synthetic.num_train=64", "--config.data.synthetic.num_test=8")
  proc = run_main("--config=configs/assistant.py:qa,tiny,whiten", f"--workdir={workdir}",
                  "--config.train.weight_decay=0.5", *common)
  assert proc.returncode == 0, proc.stderr[-4000:]
  record, params = assistant.read_export(workdir)
  assert record["config"]["bridge"]["whiten"] == pytest.approx(0.1)
  cache = features.load_split(os.path.join(record["features_dir"], "train"))
  for m, cls in (("image", True), ("audio", False)):
    mask = cache[f"{m}/token_mask"].astype(bool) & cache[f"{m}/valid"][:, None]
    expect = whitening.token_statistics([(cache[f"{m}/tokens"], mask)], cls, 0.1)
    got = params["bridge"]["params"][m]["whiten"]
    assert sorted(got) == sorted(expect)
    for key in expect:
      np.testing.assert_allclose(got[key], expect[key], rtol=1e-4, atol=1e-5)
    assert np.abs(got["matrix"] - np.eye(len(got["matrix"]))).max() > 0.1
  before = snapshot(workdir)
  proc = run_main("--config=configs/assistant.py:qa,tiny", f"--workdir={other}",
                  f"--config.init_from={workdir}", *common)
  errors = [l for l in proc.stderr.splitlines() if loop.CheckpointMismatchError.__name__ in l]
  assert proc.returncode != 0 and errors and "whiten" in errors[-1], proc.stderr[-2000:]
  assert snapshot(workdir) == before
  assert not [f for f in snapshot(other).values() if f is not None]
  layered = configs.load(os.path.join(ROOT, "configs", "assistant.py") + ":qa,tiny,whiten,"
                         "audiolayer1")
  layered.init_from = workdir
  with pytest.raises(ValueError, match=r"extracted with encoders\.audio\.feature_layer=-1 but "
                     "the config asks for 1"):
    assistant.ensure_features(layered, other)
  assert snapshot(workdir) == before
