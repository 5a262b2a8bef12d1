"""Adapters and the Matryoshka head: shapes, unit norms, weight sharing, masks, space-to-depth
against a numpy loop, errors, bf16, gradients, logical axes and dot_general injection."""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from edgeglass_jax import adapters as A
from edgeglass_jax import configs, sharding

B, D, G = 3, 24, 9
N = G * G + 1  # a CLS token and a 9x9 grid
WIDTHS = (16, 48, 32)  # unsorted on purpose
SORTED = (48, 32, 16)
KEYS = [(kind, False) for kind in A.KINDS] + [("mlp", True)]
# Cheap XLA:CPU compiles: these graphs are tiny, optimising them costs more than running them.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_fast(f, *args):
  """jit(f) compiled for `args`' shapes (FAST options on CPU); call it with same-shaped args."""
  lowered = jax.jit(f).lower(*args)
  return lowered.compile(compiler_options=FAST if jax.default_backend() == "cpu" else None)


def run_fast(f, *args):
  return compile_fast(f, *args)(*args)


def tiny_config(kind, **kw):
  return A.AdapterConfig(**{**dict(kind=kind, hidden=32, depth=1, num_latents=4, num_heads=4,
                                   mlp_ratio=2), **kw})


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  pooled = rng.standard_normal((B, D)).astype(np.float32)
  tokens = rng.standard_normal((B, N, D)).astype(np.float32)
  mask = np.ones((B, N), bool)
  mask[1, 60:] = False
  return jnp.asarray(pooled), jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(scope="module")
def built(inputs):
  """Every (kind, mrl_e) of KEYS: module, boxed variables, outputs z and the gradients of a
  random projection of all widths' z, computed in one compiled program."""
  models = {k: A.ModalityAdapter(tiny_config(k[0]), widths=WIDTHS, mrl_e=k[1]) for k in KEYS}
  variables = run_fast(lambda rng: {k: m.init(rng, *inputs) for k, m in models.items()},
                       jax.random.PRNGKey(0))
  r = {m: jax.random.normal(jax.random.PRNGKey(m), (B, m)) for m in SORTED}

  def loss(params):
    z = {k: models[k].apply(params[k], *inputs) for k in KEYS}
    return sum(jnp.sum(z[k][m] * r[m]) for k in KEYS for m in SORTED), z

  params = nn.meta.unbox(variables)
  (_, z), grads = run_fast(jax.value_and_grad(loss, has_aux=True), params)
  return {k: dict(model=models[k], variables=variables[k], z=z[k], grads=grads[k]) for k in KEYS}


@pytest.mark.parametrize("key", KEYS, ids=str)
def test_shapes_and_unit_norm(built, key):
  z = built[key]["z"]
  assert sorted(z) == sorted(SORTED)
  for w, zw in z.items():
    assert zw.shape == (B, w) and zw.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zw), axis=1), 1.0, atol=1e-5)
    assert np.abs(np.asarray(zw[0] - zw[2])).max() > 1e-3, "rows should depend on the input"


def test_head_param_layout_follows_sorted_widths(built):
  head_e = built["mlp", True]["variables"]["params"]["head"]
  assert set(head_e) == {"proj"}
  assert nn.meta.unbox(head_e["proj"]["kernel"]).shape == (32, 48)
  head = built["mlp", False]["variables"]["params"]["head"]
  assert {k: nn.meta.unbox(v["kernel"]).shape for k, v in head.items()} == {
      "proj_48": (32, 48), "proj_32": (32, 32), "proj_16": (32, 16)}


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("mrl_e", [False, True])
def test_matryoshka_head_weight_sharing_and_order(mrl_e):
  x = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)
  head = A.MatryoshkaHead(widths=(8, 32, 4), mrl_e=mrl_e)
  assert head.sorted_widths == (32, 8, 4)
  assert A.MatryoshkaHead(widths=[np.int64(4), 8]).sorted_widths == (8, 4)
  params = nn.meta.unbox(run_fast(head.init, jax.random.PRNGKey(2), x))["params"]
  z = head.apply({"params": params}, x)
  assert list(z) == [32, 8, 4]
  if mrl_e:
    full = x @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])
    for m in (32, 8, 4):
      np.testing.assert_allclose(z[m], _unit(full[:, :m]), atol=1e-5)
      np.testing.assert_allclose(z[m], _unit(np.asarray(z[32])[:, :m]), atol=1e-5)
  else:
    for m in (32, 8, 4):
      p = params[f"proj_{m}"]
      np.testing.assert_allclose(z[m], _unit(x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])),
                                 atol=1e-5)
    assert np.abs(np.asarray(z[8]) - _unit(np.asarray(z[32])[:, :8])).max() > 1e-2


@pytest.mark.parametrize("widths, match", [
    ((), "empty"), ((64, 0), "positive"), ((64, -8), "positive"), ((64, 32, 64), "duplicate"),
    ((64, 2.5), "positive"), ((64, "32"), "positive"), ((64, True), "positive"),
    (64, "sequence")])
def test_matryoshka_width_validation(widths, match):
  with pytest.raises(ValueError, match=match):
    A.MatryoshkaHead(widths=widths)


def test_perceiver_respects_padding_mask(built, inputs):
  _, tokens, _ = (np.asarray(a) for a in inputs)
  mask = np.ones((B, N), bool)
  mask[0, 50:] = False
  model = A.PerceiverResampler(num_latents=4, width=32, depth=1, num_heads=4, mlp_ratio=2)
  variables = {"params": built["perceiver", False]["variables"]["params"]["resampler"]}
  apply = compile_fast(model.apply, variables, tokens, mask)
  base = np.asarray(apply(variables, tokens, mask))
  assert base.shape == (B, 4, 32)
  padded = tokens.copy()
  padded[0, 50:] = 100.0 * np.random.default_rng(3).standard_normal((N - 50, D))
  np.testing.assert_allclose(apply(variables, padded, mask), base, atol=1e-6)
  changed = tokens.copy()
  changed[0, 2] += 1.0
  out = np.asarray(apply(variables, changed, mask))
  assert np.abs(out[0] - base[0]).max() > 1e-3
  np.testing.assert_allclose(out[1:], base[1:], atol=1e-6)
  nothing = np.asarray(apply(variables, tokens, np.zeros((B, N), bool)))
  assert np.isfinite(nothing).all()
  pooled = run_fast(lambda v, t, m: model.apply(v, t, m, method=A.PerceiverResampler.pooled),
                    variables, tokens, mask)
  np.testing.assert_allclose(pooled, base.mean(axis=1), atol=1e-6)


def ref_space_to_depth(tokens, f, has_cls=False):
  """Loop over output cells and neighbourhood offsets of the row-major grid."""
  if has_cls:
    tokens = tokens[:, 1:]
  b, n, d = tokens.shape
  g = int(round(n ** 0.5))
  s = g // f
  out = np.zeros((b, s * s, f * f * d), tokens.dtype)
  for i in range(s):
    for j in range(s):
      for di in range(f):
        for dj in range(f):
          src = (f * i + di) * g + (f * j + dj)
          out[:, i * s + j, (di * f + dj) * d:(di * f + dj + 1) * d] = tokens[:, src]
  return out


@pytest.mark.parametrize("has_cls", [False, True, None])
def test_token_compressor_matches_numpy_space_to_depth(has_cls):
  rng = np.random.default_rng(4)
  n = 729 + int(has_cls is not False)
  tokens = rng.standard_normal((2, n, 4)).astype(np.float32)
  ref = ref_space_to_depth(tokens, 3, has_cls=n == 730)
  assert ref.shape == (2, 81, 36)
  np.testing.assert_array_equal(A.space_to_depth(jnp.asarray(tokens), 3, has_cls), ref)
  model = A.TokenCompressor(factor=3, out=8, has_cls=has_cls)
  params = nn.meta.unbox(run_fast(model.init, jax.random.PRNGKey(0), tokens))["params"]
  out = run_fast(model.apply, {"params": params}, tokens)
  assert out.shape == (2, 81, 8)
  np.testing.assert_allclose(out, ref @ np.asarray(params["proj"]["kernel"])
                             + np.asarray(params["proj"]["bias"]), atol=1e-5)


def test_token_compressor_keeps_the_cls_token_as_its_own_first_token():
  rng = np.random.default_rng(5)
  tokens = rng.standard_normal((2, 37, 4)).astype(np.float32)
  model = A.TokenCompressor(factor=3, out=8, keep_cls=True, has_cls=None)
  params = nn.meta.unbox(run_fast(model.init, jax.random.PRNGKey(0), tokens))["params"]
  out = np.asarray(run_fast(model.apply, {"params": params}, tokens))
  assert out.shape == (2, 5, 8)
  dense = lambda x, p: x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  np.testing.assert_allclose(out[:, 0], dense(tokens[:, 0], params["cls_proj"]), atol=1e-5)
  np.testing.assert_allclose(out[:, 1:], dense(ref_space_to_depth(tokens, 3, True),
                                               params["proj"]), atol=1e-5)
  mask = np.ones((2, 37), bool)
  mask[0, 0] = False
  mask[1, 1:] = False
  np.testing.assert_array_equal(model.compress_mask(jnp.asarray(mask)),
                                [[False] + [True] * 4, [True] + [False] * 4])
  with pytest.raises(ValueError, match=r"keep_cls=True.*\(2, 36, 4\) have no leading CLS"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 36, 4)))


def test_compressed_mask_is_any_of_its_neighbourhood():
  mask = np.ones((1, 36), bool).reshape(1, 6, 6)
  mask[0, :3, :3] = False
  mask[0, 3, 3] = False
  model = A.TokenCompressor(factor=3, out=4)
  got = np.asarray(model.compress_mask(jnp.asarray(mask.reshape(1, 36))))
  np.testing.assert_array_equal(got, [[False, True, True, True]])


def test_bad_shapes_raise_naming_them(inputs):
  with pytest.raises(ValueError, match=r"\(2, 50, 4\).*square"):
    A.space_to_depth(jnp.zeros((2, 50, 4)), 3, has_cls=False)
  with pytest.raises(ValueError, match=r"\(2, 28, 4\): 28 tokens \(nor 27 after a leading CLS"):
    A.space_to_depth(jnp.zeros((2, 28, 4)), 3)
  with pytest.raises(ValueError, match=r"\(2, 64, 4\).*8x8.*factor 3"):
    A.space_to_depth(jnp.zeros((2, 64, 4)), 3)
  with pytest.raises(ValueError, match=r"\(2, 65, 4\).*8x8 grid after the CLS.*factor 3"):
    jax.eval_shape(A.TokenCompressor(factor=3, out=4, has_cls=True).init, jax.random.PRNGKey(0),
                   jnp.zeros((2, 65, 4)))
  pooled, tokens, mask = inputs
  init = lambda model, *args: jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
  for kind in ("perceiver", "compress"):
    with pytest.raises(ValueError, match=f"kind='{kind}'.*needs tokens"):
      init(A.ModalityAdapter(tiny_config(kind), widths=WIDTHS), pooled)
  with pytest.raises(ValueError, match=r"token_mask shape \(3, 5\)"):
    init(A.ModalityAdapter(tiny_config("mean"), widths=WIDTHS), pooled, tokens, mask[:, :5])
  with pytest.raises(ValueError, match=r"pooled must be \[B, D\].*\(3, 1, 24\)"):
    init(A.ModalityAdapter(tiny_config("mlp"), widths=WIDTHS), pooled[:, None])
  with pytest.raises(ValueError, match="width 30 is not a multiple of num_heads 4"):
    init(A.PerceiverResampler(4, 30, num_heads=4), tokens)


def test_mean_kind_is_masked_mean_then_projector(built, inputs):
  entry = built["mean", False]
  pooled, tokens, mask = (np.asarray(a) for a in inputs)
  w = mask[..., None].astype(np.float64)
  ref_mean = ((tokens * w).sum(1) / w.sum(1)).astype(np.float32)
  apply = entry["model"].apply
  z_ref, z_pooled = run_fast(lambda v, a, b: (apply(v, a), apply(v, b)), entry["variables"],
                             ref_mean, pooled)
  for m in SORTED:
    np.testing.assert_allclose(entry["z"][m], z_ref[m], atol=1e-5)
  assert np.abs(np.asarray(z_pooled[48] - entry["z"][48])).max() > 1e-3
  empty = A.masked_mean(jnp.asarray(tokens), jnp.zeros(mask.shape, bool))
  np.testing.assert_array_equal(empty, np.zeros((B, D)))


def _layer_norm(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _gelu(x):
  return np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=False), np.float64)


def test_residual_projector_formula():
  x = np.random.default_rng(6).standard_normal((4, 10))
  model = A.MLPProjector(hidden=16, out=8, depth=2, mlp_ratio=2)
  params = nn.meta.unbox(run_fast(model.init, jax.random.PRNGKey(0), x.astype(np.float32)))
  params = params["params"]
  h = _dense(params["in_proj"], x)
  for i in range(2):
    blk = params[f"block{i}"]
    h = h + _dense(blk["mlp"]["fc2"], _gelu(_dense(blk["mlp"]["fc1"], _layer_norm(h, blk["norm"]))))
  ref = _dense(params["out_proj"], _layer_norm(h, params["norm"]))
  got = run_fast(model.apply, {"params": params}, x.astype(np.float32))
  np.testing.assert_allclose(got, ref, atol=1e-4)
  assert "out_proj" not in nn.meta.unbox(jax.eval_shape(
      A.MLPProjector(hidden=16).init, jax.random.PRNGKey(0), x))["params"]


def test_freeze_align_projector_formula():
  x = np.random.default_rng(5).standard_normal((4, 10)).astype(np.float32)
  model = A.MLPProjector(hidden=16, out=8, style="freeze_align")
  params = nn.meta.unbox(run_fast(model.init, jax.random.PRNGKey(0), x))["params"]
  dense = lambda p, v: v @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  h = np.asarray(jax.nn.gelu(dense(params["mlp"]["fc1"], x), approximate=False))
  ref = dense(params["skip"], x) + dense(params["mlp"]["fc2"], h)
  np.testing.assert_allclose(run_fast(model.apply, {"params": params}, x), ref, atol=1e-5)
  with pytest.raises(ValueError, match="unknown style"):
    jax.eval_shape(A.MLPProjector(hidden=16, style="deep").init, jax.random.PRNGKey(0), x)


def test_dropout_only_when_not_deterministic(built, inputs):
  pooled = inputs[0]
  model = A.ModalityAdapter(tiny_config("mlp", dropout=0.5), widths=WIDTHS)
  variables = built["mlp", False]["variables"]

  def run(v, x):
    noisy = lambda seed: model.apply(v, x, deterministic=False,
                                     rngs={"dropout": jax.random.PRNGKey(seed)})[48]
    return model.apply(v, x)[48], noisy(1), noisy(2)

  det, a, b = (np.asarray(o) for o in run_fast(run, variables, pooled))
  np.testing.assert_allclose(det, built["mlp", False]["z"][48], atol=1e-6)
  assert np.abs(a - b).max() > 1e-3 and np.abs(a - det).max() > 1e-3


def _cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_bf16_compute_and_params(built, inputs):
  kinds = ("perceiver", "compress")
  bf16 = {k: A.ModalityAdapter(tiny_config(k), widths=WIDTHS, dtype=jnp.bfloat16,
                               param_dtype=jnp.bfloat16) for k in kinds}
  for k in kinds:
    shapes = jax.eval_shape(bf16[k].init, jax.random.PRNGKey(0), *inputs)
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(shapes))} == {jnp.dtype(jnp.bfloat16)}
  params = {k: nn.meta.unbox(built[k, False]["variables"]) for k in kinds}

  def run(params):
    compute = {k: bf16[k].clone(param_dtype=jnp.float32).apply(params[k], *inputs) for k in kinds}
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    stored = {k: bf16[k].apply(cast[k], *inputs) for k in kinds}
    return compute, stored

  for z16 in run_fast(run, params):
    for k in kinds:
      for m in SORTED:
        assert z16[k][m].dtype == jnp.float32 and np.isfinite(np.asarray(z16[k][m])).all()
        np.testing.assert_allclose(np.linalg.norm(np.asarray(z16[k][m]), axis=1), 1.0, atol=1e-3)
        assert _cos(z16[k][m], built[k, False]["z"][m]).min() > 0.98, (k, m)


@pytest.mark.parametrize("key", KEYS, ids=str)
def test_gradients_reach_every_param(built, key):
  flat = jax.tree_util.tree_leaves_with_path(built[key]["grads"])
  assert len(flat) == len(jax.tree.leaves(built[key]["variables"]))
  dead = [jax.tree_util.keystr(k) for k, g in flat if not np.abs(np.asarray(g)).max() > 0]
  assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("kind", A.KINDS)
def test_params_carry_logical_axes_and_shard(built, kind):
  variables = built[kind, False]["variables"]
  specs = jax.tree_util.tree_leaves_with_path(
      nn.get_partition_spec(variables), is_leaf=lambda x: isinstance(x, P))
  shapes = jax.tree_util.tree_leaves(nn.meta.unbox(variables))
  assert len(specs) == len(shapes)
  for (path, spec), x in zip(specs, shapes):
    assert len(spec) == x.ndim and all(isinstance(a, str) for a in spec), (
        f"{jax.tree_util.keystr(path)} has spec {spec}")
  if kind == "perceiver":
    assert variables["params"]["resampler"]["latents"].names == ("latents", "embed")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = sharding.tree_shardings(jax.eval_shape(lambda: variables), mesh)
  placed = jax.device_put(nn.meta.unbox(variables), nn.meta.unbox(shardings))
  assert len(jax.tree.leaves(placed)) == len(shapes)


@pytest.mark.parametrize("kind", A.KINDS)
def test_dot_general_reaches_every_dense(built, inputs, kind):
  calls = []

  def factory():
    def dot_general(lhs, rhs, dims, *args, **kw):
      calls.append(rhs.shape)
      return jax.lax.dot_general(lhs, rhs, dims, *args, **kw)
    return dot_general

  variables = built[kind, False]["variables"]
  model = A.ModalityAdapter(tiny_config(kind), widths=WIDTHS, dot_general_cls=factory)
  jax.eval_shape(model.apply, variables, *inputs)
  kernels = sorted(x.shape for p, x in jax.tree_util.tree_leaves_with_path(
      nn.meta.unbox(variables)) if jax.tree_util.keystr(p).endswith("['kernel']"))
  assert calls and sorted(calls) == kernels


def test_adapter_config_from_dict():
  cfg = A.AdapterConfig.from_dict(configs.adapter(kind="perceiver", hidden=64, num_heads=8))
  assert cfg == A.AdapterConfig(kind="perceiver", hidden=64, depth=2, num_latents=32,
                                num_heads=8, factor=3)
  assert A.AdapterConfig.from_dict(mlc.ConfigDict(dict(kind="compress", has_cls=True))).has_cls
  assert A.AdapterConfig.from_dict(dict(kind="compress", keep_cls=1)).keep_cls is True
  with pytest.raises(ValueError, match="keep_cls is for kind 'compress', not 'perceiver'"):
    A.AdapterConfig.from_dict(dict(kind="perceiver", keep_cls=True))
  assert hash(cfg) == hash(A.AdapterConfig.from_dict(dict(cfg.__dict__)))
  with pytest.raises(ValueError, match=r"unknown keys \['hiden'\]"):
    A.AdapterConfig.from_dict(dict(kind="mlp", hiden=3))
  with pytest.raises(ValueError, match="kind must be one of"):
    A.AdapterConfig.from_dict(dict(kind="transformer"))
  with pytest.raises(ValueError, match="hidden 30 is not a multiple of num_heads 4"):
    A.AdapterConfig(kind="perceiver", hidden=30)
  with pytest.raises(ValueError, match="depth must be >= 0"):
    A.AdapterConfig(depth=-1)
