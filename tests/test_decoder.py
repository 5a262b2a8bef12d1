"""Decoder LMs against tiny random HF PyTorch models (Llama, Qwen2, Gemma 3) saved with
save_pretrained: logits through `decoder.from_pretrained`, cached decoding against the full
sequence, the prefix-LM mask, RoPE scaling, logical axis names and named errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeglass_jax import decoder, layers  # noqa: E402
from edgeglass_jax.weights import WeightsError  # noqa: E402

BASE = dict(vocab_size=67, hidden_size=24, intermediate_size=44, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA = dict(BASE, num_attention_heads=4, head_dim=8, query_pre_attn_scalar=20,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             sliding_window=3)

VARIANTS = {
    # Llama-3 RoPE scaling (both scaled and smoothed bands), head_dim != width / heads, biases.
    "llama_llama3_untied": ("LlamaConfig", "LlamaForCausalLM", dict(
        BASE, head_dim=8, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_theta=500.0, rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0,
                                            original_max_position_embeddings=8))),
    # SmolLM2-like: MQA-ish 3/1 heads, tied embeddings, theta 1e5.
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        BASE, num_attention_heads=3, num_key_value_heads=1, rope_theta=1e5,
        tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(BASE, tie_word_embeddings=False)),
    "qwen2_sliding_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        BASE, tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
        max_window_layers=1)),
    # Window 3 < sequence, local RoPE base, final-logit soft-capping.
    "gemma3_tied": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        GEMMA, tie_word_embeddings=True, rope_theta=1000.0, rope_local_base_freq=100.0,
        attn_logit_softcapping=3.0, final_logit_softcapping=5.0)),
    "gemma3_untied_linear": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        GEMMA, tie_word_embeddings=False, rope_scaling=dict(rope_type="linear", factor=2.0))),
}
B, T = 2, 9


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """variant -> (directory, HF logits [B, T, V] on IDS)."""
  torch.manual_seed(0)
  ids = np.random.default_rng(0).integers(0, BASE["vocab_size"], (B, T))
  out = {}
  for name, (cfg_cls, model_cls, kw) in VARIANTS.items():
    config = getattr(transformers, cfg_cls)(**kw)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.2 * torch.randn_like(p))
      logits = model(torch.from_numpy(ids)).logits.numpy()
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = (path, logits)
  return ids, out


@pytest.fixture(scope="module")
def loaded(saved):
  _, models = saved
  return {name: decoder.from_pretrained(path) for name, (path, _) in models.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_hf(saved, loaded, variant):
  ids, models = saved
  module, params = loaded[variant]
  logits = jax.jit(module.apply)(params, ids)
  assert logits.dtype == jnp.float32 and logits.shape == (B, T, BASE["vocab_size"])
  assert rel_err(logits, models[variant][1]) < 1e-4


def test_family_options_are_read_from_the_configs(loaded):
  c = loaded["gemma3_tied"][0].config
  assert (c.family, c.norm_offset, c.embed_scale, c.qk_norm, c.post_norms) == \
      ("gemma3_text", 1.0, True, True, True)
  assert c.query_pre_attn_scalar == 20 and c.sliding_window == 3
  assert (c.rope.theta, c.rope_local.theta) == (1000.0, 100.0)
  # HF Gemma 3 keeps attn_logit_softcapping in its config but never applies it.
  assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (None, 5.0)
  assert c.tie_word_embeddings and "lm_head" not in loaded["gemma3_tied"][1]["params"]
  assert loaded["gemma3_untied_linear"][0].config.rope == layers.RoPE(1e6, "linear", factor=2.0)
  q = loaded["qwen2_sliding_tied"][0].config
  assert (q.qkv_bias, q.out_bias, q.layer_types[0], q.layer_types[1], q.sliding_window) == \
      (True, False, "full_attention", "sliding_attention", 4)
  assert loaded["llama_llama3_untied"][0].config.rope.kind == "llama3"


@pytest.mark.parametrize("variant", ["llama_llama3_untied", "qwen2_sliding_tied", "gemma3_tied"])
def test_prefill_then_cached_steps_equal_the_full_sequence(loaded, saved, variant):
  ids, _ = saved
  module, params = loaded[variant]
  full = module.apply(params, ids)
  cache = module.init_cache(B, 12)
  decode = jax.jit(lambda p, x, c: module.apply(p, x, c, method="decode"))
  logits, cache = decode(params, ids[:, :5], cache)
  steps = [logits]
  for i in range(5, T):
    logits, cache = decode(params, ids[:, i:i + 1], cache)
    steps.append(logits)
  assert rel_err(np.concatenate(steps, 1), full) < 1e-5
  assert np.all(np.asarray(cache["layers_0"]["end_index"]) == T)
  last, last_cache = module.apply(params, ids[:, :5], module.init_cache(B, 12), method="decode",
                                 last_only=True)
  assert last.shape == (B, 1, full.shape[-1]) and rel_err(last, steps[0][:, -1:]) < 1e-5
  _, prefill_cache = decode(params, ids[:, :5], module.init_cache(B, 12))
  assert rel_err(last_cache["layers_0"]["k"], prefill_cache["layers_0"]["k"]) < 1e-6


def test_left_padded_cached_prefill_matches_the_unpadded_row(loaded, saved):
  """Row 0 is left-padded by 3 slots that the mask hides; its positions start at 0 after the
  padding, so its logits equal the unpadded sequence's."""
  ids, _ = saved
  module, params = loaded["gemma3_tied"]
  full = module.apply(params, ids[:1, :6])
  padded = np.concatenate([np.zeros((1, 3), ids.dtype), ids[:1, :6]], 1)
  valid = np.arange(9)[None] >= 3
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
  slots = 10
  mask = (np.arange(slots)[None, None] <= np.arange(9)[None, :, None]) & \
      np.pad(valid, ((0, 0), (0, slots - 9)))[:, None, :]
  logits, _ = module.apply(params, padded, module.init_cache(1, slots), positions, mask,
                           method="decode")
  assert rel_err(np.asarray(logits)[:, 3:], full) < 1e-5


def test_make_prefix_lm_mask_by_hand():
  input_mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
  mask_ar = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  got = np.asarray(decoder.make_prefix_lm_mask(input_mask, mask_ar)).astype(int)
  want0 = np.array([[1, 1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 1, 0],
                    [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(got[0], want0)
  np.testing.assert_array_equal(got[1], np.tril(np.ones((6, 6), int)))
  assert got.dtype == int and decoder.make_prefix_lm_mask(input_mask, mask_ar).dtype == bool


def test_prefix_lm_mask_drives_the_decoder(loaded, saved):
  """An all-causal prefix-LM mask gives the default logits; with a 4-token bidirectional prefix
  the prefix equals a fully bidirectional run over those 4 tokens alone, token 0 sees past
  itself, and the suffix stays causal (truncating the sequence does not change it)."""
  ids, _ = saved
  module, params = loaded["llama_tied"]
  ones = np.ones((B, T), int)
  causal = np.asarray(module.apply(params, ids, mask=decoder.make_prefix_lm_mask(ones, ones)))
  np.testing.assert_array_equal(causal, module.apply(params, ids))
  mask_ar = ones.copy()
  mask_ar[:, :4] = 0
  prefix = np.asarray(module.apply(params, ids, mask=decoder.make_prefix_lm_mask(ones, mask_ar)))
  alone = module.apply(params, ids[:, :4], mask=np.ones((B, 4, 4), bool))
  assert rel_err(prefix[:, :4], alone) < 1e-5
  assert rel_err(prefix[:, 0], causal[:, 0]) > 1e-3
  cut = module.apply(params, ids[:, :7],
                     mask=decoder.make_prefix_lm_mask(ones[:, :7], mask_ar[:, :7]))
  assert rel_err(prefix[:, :7], cut) < 1e-5


def test_logits_slice_gives_those_positions_of_the_full_logits(loaded, saved):
  ids, models = saved
  module, params = loaded["llama_llama3_untied"]
  part = module.apply(params, ids, logits_slice=(2, 5))
  assert part.shape == (B, 3, BASE["vocab_size"])
  assert rel_err(part, models["llama_llama3_untied"][1][:, 2:5]) < 1e-4
  with pytest.raises(ValueError, match=r"logits_slice \(3, 99\) is not inside the 9 positions"):
    module.apply(params, ids, logits_slice=(3, 99))


def test_llama3_inverse_frequencies_equal_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0,
                                 rope_scaling=dict(rope_type="llama3", factor=8.0,
                                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=8192))
  ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
  ours = decoder.DecoderConfig.from_hf(
      dict(cfg.to_dict(), model_type="llama")).rope.inv_freq(128)
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
  assert np.any(ours != layers.RoPE(500000.0).inv_freq(128))


def test_every_param_has_logical_axis_names(loaded):
  module, _ = loaded["gemma3_untied_linear"]
  boxed = jax.eval_shape(module.init, jax.random.key(0), *decoder.dummy_inputs())["params"]
  names = set()
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned), leaf
    names.update(leaf.names)
  assert names == {"vocab", "embed", "heads", "kv_heads", "mlp", "head_dim"}


def test_unknown_model_type_is_a_named_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 8}))
  with pytest.raises(WeightsError, match=r"model_type='mamba'") as e:
    decoder.from_pretrained(str(tmp_path))
  assert str(tmp_path) in str(e.value)
