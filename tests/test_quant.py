"""int8 quantization (quant.py): SERVE equals TRAIN bitwise, the serving tree holds int8 kernels
with per-channel scales and no float kernel, the serving graph runs int8 x int8 dots (Dense and
attention einsums), QAT trains under jit(value_and_grad) on 8 devices, PTQ, every named error,
the config switch, and int8 generation on a tiny random Llama."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edgeglass_jax import adapters, configs, decoder, generate, quant
from edgeglass_jax.tasks import align

B, N, D = 8, 9, 12
CFG = adapters.AdapterConfig(kind="perceiver", hidden=16, depth=1, num_latents=4, num_heads=2)


def adapter(q):
  return adapters.ModalityAdapter(CFG, widths=(16, 8), quant=q)


def inputs(seed=0, b=B):
  r = np.random.default_rng(seed)
  pooled = r.normal(size=(b, D)).astype(np.float32)
  tokens = r.normal(size=(b, N, D)).astype(np.float32)
  return pooled, tokens, np.ones((b, N), bool)


@pytest.fixture(scope="module")
def converted():
  module = adapter(quant.int8())
  args = inputs()
  variables = module.init(jax.random.key(0), *args)
  cal = quant.calibrate(module, variables, [args, inputs(1)])
  return module, variables, cal, quant.convert(module, variables, cal), args


def test_serve_equals_train_bitwise(converted):
  module, variables, _, served, args = converted
  train = module.apply(variables, *args)
  serve = quant.serving_module(module).apply(served, *args)
  for w in (16, 8):
    np.testing.assert_array_equal(np.asarray(serve[w]), np.asarray(train[w]))
  other = inputs(5)  # an input CONVERT never saw
  train, serve = module.apply(variables, *other), quant.serving_module(module).apply(served, *other)
  np.testing.assert_array_equal(np.asarray(serve[16]), np.asarray(train[16]))


def test_serving_tree_is_int8_per_channel_without_float_kernels(converted):
  module, variables, cal, served, _ = converted
  flat_params = traverse_util.flatten_dict(nn.meta.unbox(variables["params"]))
  kernels = {p[:-1]: v for p, v in flat_params.items() if p[-1] == "kernel"}
  served_params = traverse_util.flatten_dict(served["params"])
  assert not [p for p in served_params if p[-1] == "kernel"]
  entries = quant.BACKENDS["aqt"].converted_kernels(served["aqt"])
  assert set(entries) == set(kernels)
  for owner, (value, scale) in entries.items():
    kernel = np.asarray(kernels[owner])
    assert value.dtype == jnp.int8 and value.shape == kernel.shape
    assert scale.dtype == jnp.float32 and scale.shape[-1] == kernel.shape[-1]
    assert int(np.prod(scale.shape)) == kernel.shape[-1]  # one scale per output channel
    assert np.abs(np.asarray(value)).max() == 127  # absmax per channel maps to 127
    np.testing.assert_allclose(np.asarray(value) * np.asarray(scale).reshape(-1), kernel,
                               atol=float(np.abs(kernel).max()) / 127)
  size = quant.serving_size(served)
  assert size["int8_bytes"] == sum(k.size for k in kernels.values())
  n_weights = sum(k.size for k in kernels.values())
  n_scales = sum(k.shape[-1] for k in kernels.values())
  assert size["bytes"] == quant.tree_bytes(variables) - 3 * n_weights + 4 * n_scales
  assert set(cal.summary()) == {"/".join(o) for o in kernels}


def test_serving_graph_has_int8_dot_generals(converted):
  module, _, _, served, args = converted
  jaxpr = jax.make_jaxpr(quant.serving_module(module).apply)(served, *args)

  def dots(jpr):
    for eqn in jpr.eqns:
      if eqn.primitive.name == "dot_general":
        yield tuple(str(v.aval.dtype) for v in eqn.invars)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        yield from dots(sub)

  kinds = list(dots(jaxpr.jaxpr))
  n_kernels = len(quant.BACKENDS["aqt"].converted_kernels(served["aqt"]))
  n_attention = 2 * (1 + CFG.depth)  # q.k and p.v of the cross- and self-attention layers
  assert kinds.count(("int8", "int8")) == n_kernels + n_attention
  assert ("float32", "float32") not in kinds
  hlo = jax.jit(quant.serving_module(module).apply).lower(served, *args).as_text()
  assert "xi8>" in hlo and "-> tensor<" in hlo


@pytest.mark.parametrize("backward", [False, True])
def test_qat_trains_under_jit_value_and_grad_on_8_devices(backward):
  assert jax.device_count() == 8
  module = adapters.ModalityAdapter(adapters.AdapterConfig(kind="mlp", hidden=16, depth=1),
                                    widths=(8,), quant=quant.int8(backward=backward))
  r = np.random.default_rng(0)
  x = r.normal(size=(32, D)).astype(np.float32)
  target = np.asarray(jax.nn.one_hot(np.arange(32) % 8, 8))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x, target = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, target))
  params = module.init(jax.random.key(0), x)
  tx = optax.adam(3e-2)
  opt = tx.init(params)

  def loss_fn(p, rng):
    z = module.apply(p, x, rngs=quant.train_rngs(module, rng))[8]
    return jnp.mean(jnp.sum((z - target) ** 2, -1))

  @jax.jit
  def step(p, o, rng):
    loss, g = jax.value_and_grad(loss_fn)(p, rng)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  losses = []
  for i in range(30):
    params, opt, loss = step(params, opt, jax.random.key(i))
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
  if backward:
    with pytest.raises(Exception, match="quant"):
      module.apply(params, x)  # 8-bit gradients' stochastic rounding needs its rng stream


def test_ptq_of_a_float_model_is_close_and_int8():
  module = adapter(None)
  args = inputs()
  variables = module.init(jax.random.key(0), *args)
  served_module, served, _ = quant.ptq(module, variables, [args])
  assert served_module.quant.serving
  z_float = module.apply(variables, *inputs(3))[16]
  z_int8 = served_module.apply(served, *inputs(3))[16]
  cos = np.sum(np.asarray(z_float) * np.asarray(z_int8), -1)  # both L2-normalised
  assert cos.min() > 0.98 and not np.array_equal(np.asarray(z_float), np.asarray(z_int8))
  fmodule, fparams = quant.dequantize(served_module, served)
  z_deq = fmodule.apply(fparams, *inputs(3))[16]
  assert np.sum(np.asarray(z_deq) * np.asarray(z_int8), -1).min() > 0.99


def test_named_errors(converted, tmp_path):
  module, variables, cal, served, args = converted
  serve = quant.serving_module(module)
  with pytest.raises(quant.NotConvertedError, match="aqt"):
    serve.apply({"params": served["params"]}, *args)
  with pytest.raises(quant.NotConvertedError):
    quant.check_serving(serve, {"params": served["params"]}, args)
  with pytest.raises(quant.CalibrationError, match="calibrate"):
    quant.convert(module, variables, None)
  with pytest.raises(quant.QuantError, match="quant=quant.int8"):
    quant.convert(adapter(None), variables, cal)

  class TwoHeads(nn.Module):
    quant: object = None

    @nn.compact
    def __call__(self, x, both=True):
      y = adapters.layers.Dense(4, quant=self.quant, name="left")(x)
      return y + adapters.layers.Dense(4, quant=self.quant, name="right")(x) if both else y

    def left_only(self, x):
      return self(x, both=False)

  two = TwoHeads(quant.int8())
  x = np.ones((2, 3), np.float32)
  v = two.init(jax.random.key(0), x)
  with pytest.raises(quant.CalibrationError, match="right"):
    quant.convert(two, v, quant.calibrate(two, v, [x], method="left_only"))

  wider = adapters.ModalityAdapter(adapters.AdapterConfig(kind="perceiver", hidden=24, depth=1,
                                                          num_latents=4, num_heads=2),
                                   widths=(16, 8), quant=quant.int8())
  other = wider.init(jax.random.key(0), *args)
  with pytest.raises(quant.ArchitectureMismatchError,
                     match=r"kernel is float32\[24, 16\], the model expects float32\[16, 16\]"):
    quant.convert(module, other, cal)
  path = str(tmp_path / "served.safetensors")
  assert quant.save_serving(path, served) == os.path.getsize(path)
  loaded = quant.load_serving(path, serve, args)
  np.testing.assert_array_equal(np.asarray(serve.apply(loaded, *args)[8]),
                                np.asarray(serve.apply(served, *args)[8]))
  with pytest.raises(quant.ArchitectureMismatchError, match="served.safetensors"):
    quant.load_serving(path, quant.serving_module(wider), args)
  with pytest.raises(ValueError, match="unknown keys \\['bits'\\]"):
    quant.from_config(dict(kind="int8", bits=4))
  with pytest.raises(ValueError, match="kind"):
    quant.from_config(dict(kind="int4"))


def test_config_switch():
  assert quant.from_config(configs.quant()) is None
  q = quant.from_config(configs.quant(kind="int8", backward=True), "serve")
  assert q.serving and q.config.backward and q.rng_names() == ()
  assert quant.int8(backward=True).rng_names() == (quant.RNG_NAME,)
  config = configs.align()
  config.modalities = ("image", "text")
  assert config.quant.kind == "none"
  config.quant.kind = "int8"
  model = align.build_model(config)
  assert isinstance(model.quant, quant.Quant) and model.quant.mode == "train"
  config.quant.kind = "none"
  assert align.build_model(config).quant is None


LLAMA = decoder.DecoderConfig.from_hf(dict(
    model_type="llama", vocab_size=41, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    max_position_embeddings=48, tie_word_embeddings=True))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_int8_generate_on_a_tiny_llama(tied):
  lm = decoder.Decoder(dataclasses.replace(LLAMA, tie_word_embeddings=tied))
  ids = np.asarray([[3, 8, 1, 30, 5, 9, 2]], np.int32)
  params = nn.meta.unbox(lm.init(jax.random.key(0), ids))
  params = jax.tree.map(lambda a: a * 3.0, params)  # peaky logits: no argmax near-ties
  int8_lm, served, _ = quant.ptq(lm, params, [ids, np.asarray([[7, 1, 2, 3]])],
                                 quant.QuantConfig("int8", attention=False))
  # no float kernel and no float embedding table: the lookup reads the int8 table
  assert not [p for p in traverse_util.flatten_dict(served["params"])
              if p[-1] in ("kernel", "embedding")]
  table = quant.dequantize(int8_lm, served)[1]["params"]["embedder"]["embedding"]
  float_table = params["params"]["embedder"]["embedding"]
  step = np.abs(float_table).max(1, keepdims=True) / 127
  assert np.all(np.abs(np.asarray(table) - float_table) <= 0.51 * step)
  rows = int8_lm.apply(served, ids, method=lambda m, i: m.embed(i))
  np.testing.assert_allclose(rows, np.asarray(table)[ids], rtol=1e-6)
  floats = [v for v in jax.tree.leaves(served) if v.dtype != jnp.int8]
  assert all(sum(d > 1 for d in np.shape(v)) <= 1 for v in floats)  # norms and scales only
  assert quant.serving_size(served)["bytes"] < 0.3 * quant.tree_bytes(params)
  float_logits = np.asarray(lm.apply(params, ids))
  int8_logits = np.asarray(int8_lm.apply(served, ids))
  rel = np.abs(int8_logits - float_logits).max() / np.abs(float_logits).max()
  assert 0 < rel < 0.05
  if not tied:
    return  # decoding does not depend on how the head is stored
  out = np.asarray(generate.generate(int8_lm, served, ids, 8))[0].tolist()
  seq = ids[0].tolist()
  for _ in range(8):
    seq.append(int(np.argmax(int8_lm.apply(served, np.asarray([seq]))[0, -1])))
  assert out == seq[ids.shape[1]:]
  hlo = jax.jit(lambda p, i: int8_lm.apply(p, i)).lower(served, ids).as_text()
  assert hlo.count("xi8>") >= 2 * LLAMA.num_hidden_layers * 7


def test_int8_dinov2_serves_what_it_trains():
  """An encoder of the library (patch embedding, attention, MLP: all Dense) through the same
  TRAIN -> CONVERT -> SERVE path."""
  from edgeglass_jax.encoders import dinov2
  module = dinov2.Dinov2(dinov2.Dinov2Config(image_size=28, patch_size=7, hidden_size=32,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             mlp_ratio=2), quant=quant.int8())
  pixels = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
  variables = module.init(jax.random.key(0), pixels)
  served = quant.convert(module, variables, quant.calibrate(module, variables, [pixels]))
  assert not [p for p in traverse_util.flatten_dict(served["params"]) if p[-1] == "kernel"]
  train = module.apply(variables, pixels)
  serve = quant.serving_module(module).apply(served, pixels)
  np.testing.assert_array_equal(np.asarray(serve.tokens), np.asarray(train.tokens))
  np.testing.assert_array_equal(np.asarray(serve.pooled), np.asarray(train.pooled))
