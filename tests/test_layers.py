"""layers.py against float64 numpy: attention (padding, [B, T, T] and per-head masks, grouped-query
heads, fully masked rows, the blocked CPU lowering), Dense with an injected dot_general, norms,
RoPE and the dtype / param_dtype split."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeglass_jax import layers
from tiny import RecordingQuant

RNG = np.random.default_rng(0)


def reference_attention(q, k, v, mask, scale):
  """q [B, Tq, H, hd], k/v [B, Tk, K, hd], mask broadcastable to [B, H, Tq, Tk]; float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  h, kv = q.shape[2], k.shape[2]
  k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if mask is not None:
    mask = np.broadcast_to(np.asarray(mask, bool), logits.shape)
    logits = np.where(mask, logits, -np.inf)
  m = logits.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(logits - m)
  w = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def qkv(b=2, tq=5, tk=7, h=4, kv=4, hd=8):
  return (RNG.standard_normal((b, tq, h, hd), np.float32),
          RNG.standard_normal((b, tk, kv, hd), np.float32),
          RNG.standard_normal((b, tk, kv, hd), np.float32))


def masks(b=2, tq=5, tk=7, h=4):
  padding = np.ones((b, tk), bool)
  padding[0, 4:] = False
  full = RNG.random((b, tq, tk)) > 0.3
  full[1, 2] = False  # a query that sees nothing: zeros, not NaN
  per_head = RNG.random((b, h, tq, tk)) > 0.3
  return {"none": None, "padding": padding[:, None, None, :], "[B,Tq,Tk]": full[:, None],
          "[B,H,Tq,Tk]": per_head}


@pytest.fixture(params=["dense", "blocked", "query-chunks"])
def path(request, monkeypatch):
  """Runs each attention test through every lowering: one piece, one block per (batch,
  kv-head), and blocks of a few queries (5 queries of one head -> 2, 2, 1 + a padded row)."""
  if request.param != "dense":
    monkeypatch.setattr(layers, "BLOCKED_CPU_ATTENTION_MIN_LOGITS", 1)
  if request.param == "query-chunks":
    monkeypatch.setattr(layers, "BLOCKED_CPU_ATTENTION_BLOCK_LOGITS", 2 * 7)
  return request.param


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("mask_name", ["none", "padding", "[B,Tq,Tk]", "[B,H,Tq,Tk]"])
def test_attention_matches_float64_reference(path, kv, mask_name):
  q, k, v = qkv(kv=kv)
  mask = masks()[mask_name]
  out = jax.jit(lambda *a: layers.dot_product_attention(*a, mask, 0.35))(q, k, v)
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask, 0.35), rtol=2e-5,
                             atol=2e-6)
  if mask_name == "[B,Tq,Tk]":
    assert np.all(np.asarray(out)[1, 2] == 0.0)


def test_blocked_lowering_has_the_dense_gradient(monkeypatch):
  q, k, v = qkv(kv=2)
  mask = masks()["[B,Tq,Tk]"]
  loss = lambda *a: jnp.sum(jnp.sin(layers.dot_product_attention(*a, mask, 0.35)))
  dense = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  monkeypatch.setattr(layers, "BLOCKED_CPU_ATTENTION_MIN_LOGITS", 1)
  monkeypatch.setattr(layers, "BLOCKED_CPU_ATTENTION_BLOCK_LOGITS", 2 * 2 * 7)
  blocked = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(dense, blocked):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv", [6, 2], ids=["mha", "gqa3"])
def test_unmasked_bf16_attention_matches_float64_on_every_backend(kv):
  """On a GPU this is cuDNN's fused kernel (and it must be taken there); elsewhere the XLA path."""
  q, k, v = (jnp.asarray(RNG.standard_normal((2, 40, n, 64)), jnp.bfloat16)
             for n in (6, kv, kv))
  on_gpu = jax.default_backend() == "gpu"
  assert (layers._attention_cudnn(q, k, v, 0.125) is not None) == on_gpu
  out = jax.jit(lambda *a: layers.dot_product_attention(*a, None, 0.125))(q, k, v)
  assert out.dtype == jnp.bfloat16
  ref = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                            v.astype(jnp.float32), None, 0.125)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2)


def test_attention_rejects_bad_head_counts():
  q, k, v = qkv(h=4, kv=3)
  with pytest.raises(ValueError, match="4 query heads are not a multiple of 3"):
    layers.dot_product_attention(q, k, v, None, 1.0)


def test_multi_head_attention_module_masks_and_cross_attention():
  """The module = projections + `dot_product_attention`; key padding and a causal mask combine."""
  x = RNG.standard_normal((2, 6, 16), np.float32)
  kv_mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
  causal = np.tril(np.ones((6, 6), bool))[None].repeat(2, 0)
  mha = layers.MultiHeadAttention(num_heads=4, num_kv_heads=2)
  params = mha.init(jax.random.key(0), x)
  p = jax.tree.map(np.asarray, nn_unbox(params))["params"]
  out = mha.apply(params, x, mask=causal, kv_mask=kv_mask)
  proj = lambda name, y: y @ p[name]["kernel"] + p[name]["bias"]
  q = proj("query", x).reshape(2, 6, 4, 4)
  k, v = (proj(n, x).reshape(2, 6, 2, 4) for n in ("key", "value"))
  mask = (causal & kv_mask[:, None, :])[:, None]
  ref = reference_attention(q, k, v, mask, 0.5).reshape(2, 6, 16) @ p["out"]["kernel"] + \
      p["out"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="attention mask must be"):
    mha.apply(params, x, mask=np.ones((2, 5, 6), bool))
  cross = mha.apply(params, x[:, :3], kv=x, kv_mask=kv_mask)
  assert cross.shape == (2, 3, 16)


def nn_unbox(tree):
  from flax import linen as nn
  return nn.meta.unbox(tree)


def test_dense_uses_an_injected_dot_general_and_keeps_param_dtype():
  calls = []

  def counting_dot_general(*args, **kwargs):
    calls.append(args[0].dtype)
    return jax.lax.dot_general(*args, **kwargs)

  x = RNG.standard_normal((3, 5), np.float32)
  dense = layers.Dense(4, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                       dot_general_cls=lambda: counting_dot_general)
  params = dense.init(jax.random.key(0), x)
  y = dense.apply(params, x)
  kernel = nn_unbox(params)["params"]["kernel"]
  assert kernel.dtype == jnp.float32 and y.dtype == jnp.bfloat16 and calls == [jnp.bfloat16] * 2
  np.testing.assert_allclose(np.asarray(y, np.float32), x @ np.asarray(kernel), rtol=2e-2,
                             atol=2e-2)


def test_norms_match_numpy_in_float32_whatever_the_compute_dtype():
  x = RNG.standard_normal((2, 3, 8)).astype(np.float32) * 3 + 1
  ln = layers.LayerNorm(dtype=jnp.bfloat16)
  p = ln.init(jax.random.key(0), x)
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  out = ln.apply(p, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)
  rms = layers.RMSNorm(scale_offset=1.0)
  p = rms.init(jax.random.key(0), x)
  ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)  # Gemma form, scale init 0
  np.testing.assert_allclose(rms.apply(p, x), ref, rtol=1e-5, atol=1e-6)


def test_rope_rotates_pairs_and_preserves_relative_positions():
  x = RNG.standard_normal((1, 4, 2, 8)).astype(np.float32)
  pos = np.arange(4)[None]
  y = np.asarray(layers.rotary_embedding(x, pos))
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  q, k = x[:, :1], x[:, 1:2]  # <R(m) q, R(n) k> depends on m - n only
  dots = [np.sum(np.asarray(layers.rotary_embedding(q, np.array([[m]]))) *
                 np.asarray(layers.rotary_embedding(k, np.array([[n]])))) for m, n in ((3, 1), (7, 5))]
  np.testing.assert_allclose(dots[0], dots[1], rtol=1e-4)


def test_dense_takes_a_quant_object_that_sees_the_kernel_axes():
  x = RNG.standard_normal((3, 5), np.float32)
  quant = RecordingQuant()
  dense = layers.Dense(4, kernel_axes=("embed", "mlp"), quant=quant)
  params = dense.init(jax.random.key(0), x)
  y = dense.apply(params, x)
  p = nn_unbox(params)["params"]
  np.testing.assert_allclose(y, x @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-6)
  assert quant.axes == [("embed", "mlp")] * 2 and quant.calls == 2
  mlp = layers.MLP(6, gated=True, quant=RecordingQuant())
  mlp.init(jax.random.key(0), x)
  assert mlp.quant.axes == [("embed", "mlp"), ("embed", "mlp"), ("mlp", "embed")]
  with pytest.raises(ValueError, match="either quant= or dot_general_cls="):
    layers.Dense(4, quant=quant, dot_general_cls=lambda: jax.lax.dot_general).init(
        jax.random.key(0), x)


def reference_rms(x, w, offset, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * (offset + w)


def reference_rope(x, pos, inv_freq):
  angles = pos[..., None].astype(np.float64) * inv_freq
  cos, sin = np.cos(np.concatenate([angles] * 2, -1))[:, :, None], \
      np.sin(np.concatenate([angles] * 2, -1))[:, :, None]
  half = x.shape[-1] // 2
  return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


ATTENTION_VARIANTS = {
    "llama_gqa": dict(num_heads=4, num_kv_heads=2, head_dim=8),
    "qwen_bias_mqa": dict(num_heads=3, num_kv_heads=1, head_dim=6, qkv_bias=True),
    "gemma_local": dict(num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True, qk_norm_offset=1.0,
                        query_pre_attn_scalar=24.0, sliding_window=3, attn_logit_softcap=5.0,
                        rope=layers.RoPE(theta=100.0)),
}


@pytest.mark.parametrize("variant", sorted(ATTENTION_VARIANTS))
def test_cached_attention_matches_float64_reference_and_prefill_plus_steps(variant):
  """Full-sequence attention equals a float64 numpy reference built from its params; prefill of
  a prefix into the cache followed by one token at a time gives the same outputs."""
  kw = ATTENTION_VARIANTS[variant]
  attn = layers.Attention(**kw)
  b, t, d = 2, 7, 12
  x = RNG.standard_normal((b, t, d), np.float32)
  pos = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
  causal = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
  params = attn.init(jax.random.key(1), x, pos, None, causal)
  params = jax.tree.map(lambda a: a + 0.3 * RNG.standard_normal(a.shape).astype(np.float32),
                        nn_unbox(params))
  _, full = attn.apply(params, x, pos, None, causal)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  h, kv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
  proj = lambda n, y: y @ p[n]["kernel"] + (p[n]["bias"] if "bias" in p[n] else 0.0)
  q = proj("query", x).reshape(b, t, h, hd)
  k = proj("key", x).reshape(b, t, kv, hd)
  v = proj("value", x).reshape(b, t, kv, hd)
  if attn.qk_norm:
    q = reference_rms(q, p["query_norm"]["scale"], 1.0, 1e-6)
    k = reference_rms(k, p["key_norm"]["scale"], 1.0, 1e-6)
  inv_freq = attn.rope.inv_freq(hd).astype(np.float64)
  q, k = reference_rope(q, pos, inv_freq), reference_rope(k, pos, inv_freq)
  kr, vr = np.repeat(k, h // kv, 2), np.repeat(v, h // kv, 2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, kr) * attn.scale
  if attn.attn_logit_softcap:
    logits = np.tanh(logits / attn.attn_logit_softcap) * attn.attn_logit_softcap
  mask = causal[:, None]
  if attn.sliding_window:
    mask = mask & (np.abs(pos[:, :, None] - pos[:, None, :]) < attn.sliding_window)[:, None]
  logits = np.where(mask, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ref = np.einsum("bhqk,bkhd->bqhd", w, vr).reshape(b, t, h * hd) @ p["out"]["kernel"]
  np.testing.assert_allclose(full, ref, rtol=1e-4, atol=1e-5)

  s = 9  # cache longer than the sequence: unused slots are masked out
  cache = attn.init_cache(b, s, jnp.float32)
  slots = np.arange(s)
  prefill = 4
  step_mask = lambda start, n: np.broadcast_to(
      slots[None, :] <= start + np.arange(n)[:, None], (b, n, s))
  cache, y = attn.apply(params, x[:, :prefill], pos[:, :prefill], cache, step_mask(0, prefill))
  outs = [y]
  for i in range(prefill, t):
    cache, y = attn.apply(params, x[:, i:i + 1], pos[:, i:i + 1], cache, step_mask(i, 1))
    outs.append(y)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(cache["end_index"]) == t)
  np.testing.assert_array_equal(np.asarray(cache["positions"])[:, :t], pos)
  # head-major [B, K, S, hd]: slot j of kv-head g holds token j's (rotated) key and its value
  assert cache["k"].shape == cache["v"].shape == (b, kv, s, hd)
  np.testing.assert_allclose(np.asarray(cache["k"])[:, :, :t], k.transpose(0, 2, 1, 3),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(cache["v"])[:, :, :t], v.transpose(0, 2, 1, 3),
                             rtol=1e-4, atol=1e-5)
  assert not np.asarray(cache["k"])[:, :, t:].any()


def test_cached_attention_rejects_a_mask_of_the_wrong_width():
  attn = layers.Attention(num_heads=2, num_kv_heads=2, head_dim=4)
  x = RNG.standard_normal((1, 3, 8), np.float32)
  pos = np.arange(3)[None]
  params = attn.init(jax.random.key(0), x, pos)
  with pytest.raises(ValueError, match=r"mask must be \[B, 3, 5\]"):
    attn.apply(params, x, pos, attn.init_cache(1, 5), np.ones((1, 3, 3), bool))


def test_embed_lookup_and_tied_attend():
  emb = layers.Embed(11, 6, quant=RecordingQuant())
  ids = np.array([[0, 3, 10]])
  params = emb.init(jax.random.key(0), ids)
  table = np.asarray(nn_unbox(params)["params"]["embedding"])
  np.testing.assert_array_equal(emb.apply(params, ids), table[ids])
  x = RNG.standard_normal((1, 3, 6), np.float32)
  np.testing.assert_allclose(emb.apply(params, x, method=emb.attend), x @ table.T, rtol=1e-5,
                             atol=1e-5)
  assert emb.quant.axes and set(emb.quant.axes) == {("vocab", "embed")}
