"""LoRA by interception: exact at zero init, trains only the adapters, folds into the kernels."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import linen as nn

from edgeglass_jax import layers, peft, sharding
from edgeglass_jax.encoders import text, vit


class Block(nn.Module):
  """Attention-shaped projections plus an MLP, all `layers.Dense`."""
  width: int = 16

  @nn.compact
  def __call__(self, x):
    dense = lambda f, axes, name: layers.Dense(f, kernel_axes=axes, name=name)
    q = dense(self.width, ("embed", "heads"), "query")(x)
    k = dense(self.width, ("embed", "kv_heads"), "key")(x)
    v = dense(self.width, ("embed", "kv_heads"), "value")(x)
    extra = dense(self.width, ("embed", "heads"), "query2")(x)
    h = jnp.tanh(q) * jax.nn.sigmoid(k) + v + 0.1 * extra
    x = x + h
    h = nn.gelu(dense(2 * self.width, ("embed", "mlp"), "fc1")(x))
    return x + dense(self.width, ("mlp", "embed"), "fc2")(h)


class Net(nn.Module):
  """Three `Block`s (`layers_0/attn/...`, `layers_i/mlp/...`) and a scalar head."""
  width: int = 16
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = Block(self.width, name=f"layers_{i}")(x)
    return layers.Dense(1, kernel_axes=("embed", None), name="head")(x)[..., 0]


CFG = peft.LoRAConfig(rank=4, alpha=8.0, targets=("query", "value", "fc1"))


def _net(seed=0, width=16, depth=3):
  model = Net(width, depth)
  x = jax.random.normal(jax.random.key(seed + 100), (4, 5, width))
  params = nn.meta.unbox(model.init(jax.random.key(seed), x))
  return model, params, x


def _assert_close(actual, desired, rtol=1e-5):
  """rtol on each array, with an absolute floor of rtol times the array's largest magnitude
  (sums of float32 terms of size ~|y| carry rounding of that size wherever they cancel)."""
  def check(u, w):
    w = np.asarray(w)
    np.testing.assert_allclose(u, w, rtol=rtol, atol=rtol * float(np.abs(w).max()))
  jax.tree.map(check, actual, desired)


def _tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(np.asarray(u), np.asarray(w)) for u, w in zip(la, lb)))


def _randomize_b(lora, seed=7, scale=0.3):
  """A LoRA tree whose `b` are random (a trained adapter), so the update is not zero."""
  lora = nn.meta.unbox(lora)
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  def f(path, x):
    name = getattr(path[-1], "key", None)
    return scale * jax.random.normal(next(keys), x.shape, x.dtype) if name == "b" else x
  return jax.tree_util.tree_map_with_path(f, lora)


def test_config_from_configdict_and_dict():
  cfg = peft.LoRAConfig.from_config(mlc.ConfigDict(dict(rank=2, alpha=4, dropout=0.1,
                                                        targets=["query"])))
  assert cfg == peft.LoRAConfig(rank=2, alpha=4, dropout=0.1, targets=("query",))
  assert cfg.scale == 2.0
  assert peft.LoRAConfig.from_config({"targets": "value"}).targets == ("value",)
  assert peft.LoRAConfig.from_config(cfg) is cfg


@pytest.mark.parametrize("kw, match", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=1.5), "rank must be an integer >= 1"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(targets=()), "targets must be non-empty"),
    (dict(targets=("layers_[0",)), "'layers_\\[0' is not a regular expression"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    peft.LoRAConfig(**kw)


def test_config_unknown_keys_are_named():
  with pytest.raises(ValueError, match=r"unknown LoRA config keys \['r', 'target'\]"):
    peft.LoRAConfig.from_config(dict(r=4, target="query", alpha=1.0))


def test_target_matching_rules():
  cfg = peft.LoRAConfig(targets=("query", "layers_[01]/mlp/.*", "attn/v.*"))
  assert cfg.matches("layers_3/attn/query") and cfg.matches("query")
  assert not cfg.matches("layers_3/attn/query_norm") and not cfg.matches("layers_3/attn/query2")
  assert cfg.matches("layers_1/mlp/fc2") and not cfg.matches("layers_2/mlp/fc2")
  assert cfg.matches("enc/layers_0/mlp/fc1")
  assert cfg.matches("layers_9/attn/value") and not cfg.matches("layers_9/xattn/value")
  assert cfg.matching("layers_0/attn/query") == ["query"]


@pytest.mark.parametrize("targets, expected", [
    (("query",), ["layers_0/query", "layers_1/query", "layers_2/query"]),
    (("layers_[01]/query", "layers_2/fc.*"),
     ["layers_0/query", "layers_1/query", "layers_2/fc1", "layers_2/fc2"]),
    ((".*",), sorted(f"layers_{i}/{n}" for i in range(3)
                     for n in ("query", "key", "value", "query2", "fc1", "fc2")) + ["head"]),
])
def test_init_picks_exactly_the_targets(targets, expected):
  model, params, x = _net()
  cfg = peft.LoRAConfig(rank=2, targets=targets)
  lora = peft.init_lora(model, params, x, rng=jax.random.key(1), config=cfg)
  shapes = peft.lora_shapes(lora)
  assert sorted(shapes) == sorted(expected)
  for path, (a, b) in shapes.items():
    kernel = params["params"]
    for k in path.split("/"):
      kernel = kernel[k]
    d_in, f = kernel["kernel"].shape
    assert (a, b) == ((d_in, 2), (2, f))


def test_lora_params_are_boxed_with_the_kernel_axes_and_init_like_peft():
  model, params, x = _net()
  lora = peft.init_lora(model, params, x, rng=jax.random.key(1), config=CFG)
  branch = lora["params"]["layers_0"]["fc1"]["lora"]
  assert branch["a"].names == ("embed", None) and branch["b"].names == (None, "mlp")
  q = lora["params"]["layers_1"]["query"]["lora"]
  assert q["a"].names == ("embed", None) and q["b"].names == (None, "heads")
  a, b = nn.meta.unbox(branch["a"]), nn.meta.unbox(branch["b"])
  assert not np.any(np.asarray(b))
  bound = np.sqrt(6.0 / a.shape[0])
  assert 0 < np.abs(np.asarray(a)).max() <= bound and np.std(np.asarray(a)) > bound / 4
  again = peft.init_lora(model, params, x, rng=jax.random.key(1), config=CFG)
  assert _tree_equal(nn.meta.unbox(lora), nn.meta.unbox(again))
  inner = peft.init_lora(model, params["params"], x, rng=jax.random.key(1), config=CFG)
  assert _tree_equal(nn.meta.unbox(inner), nn.meta.unbox(lora)["params"])


def _assert_zero_init_is_exact(model, params, args, cfg, eager=False):
  lora = peft.init_lora(model, params, *args, rng=jax.random.key(3), config=cfg)
  assert peft.lora_shapes(lora)
  base = jax.jit(lambda p, *a: model.apply(p, *a))(params, *args)
  with_lora = jax.jit(lambda p, l, *a: peft.apply_with_lora(model, p, l, *a, config=cfg))(
      params, lora, *args)
  jax.tree.map(np.testing.assert_array_equal, base, with_lora)
  if eager:
    jax.tree.map(np.testing.assert_array_equal, model.apply(params, *args),
                 peft.apply_with_lora(model, params, lora, *args, config=cfg))


def test_zero_init_equals_base_bitwise_mlp():
  model, params, x = _net()
  _assert_zero_init_is_exact(model, params, (x,), CFG, eager=True)


def test_zero_init_equals_base_bitwise_vit_and_bert():
  cfg = peft.LoRAConfig(rank=2, targets=("query", "value", "fc1", "fc2"))
  tower = vit.ViT(vit.ViTConfig(image_size=16, patch_size=8, hidden_size=16,
                                intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
  pixels = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = nn.meta.unbox(tower.init(jax.random.key(1), pixels))
  _assert_zero_init_is_exact(tower, params, (pixels,), cfg)

  bert = text.BertEncoder(text.BertConfig(vocab_size=30, hidden_size=16, num_layers=2,
                                          num_heads=2, intermediate_size=32, max_positions=8))
  ids = jax.random.randint(jax.random.key(2), (2, 6), 0, 30)
  mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
  params = nn.meta.unbox(bert.init(jax.random.key(3), ids, mask))
  lora = peft.init_lora(bert, params, ids, mask, rng=jax.random.key(4), config=cfg)
  assert sorted(peft.lora_shapes(lora)) == sorted(
      f"layers_{i}/{m}" for i in range(2)
      for m in ("attention/query", "attention/value", "mlp/fc1", "mlp/fc2"))
  _assert_zero_init_is_exact(bert, params, (ids, mask), cfg)


def _loss(model, cfg):
  def loss(lora, params, x):
    y = peft.apply_with_lora(model, params, lora, x, config=cfg)
    return jnp.mean(jnp.square(y - jnp.sin(3.0 * x[..., 0])))
  return loss


def _train(model, params, lora, x, cfg, steps=8, lr=1e-3):
  loss = _loss(model, cfg)
  step = jax.jit(lambda l, p, x: jax.value_and_grad(loss)(l, p, x))
  losses = []
  for _ in range(steps):
    value, grads = step(lora, params, x)
    losses.append(float(value))
    lora = jax.tree.map(lambda w, g: w - lr * g, lora, grads)
  losses.append(float(loss(lora, params, x)))
  return lora, losses


def test_training_only_lora_changes_and_the_loss_decreases():
  model, params, x = _net()
  frozen = jax.tree.map(np.array, params)
  lora0 = nn.meta.unbox(peft.init_lora(model, params, x, rng=jax.random.key(1), config=CFG))
  lora, losses = _train(model, params, lora0, x, CFG)
  assert losses[-1] < 0.9 * losses[0], losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert _tree_equal(params, frozen)
  for path, (w0, w1) in _pairs(lora0, lora).items():
    assert not np.array_equal(w0, w1), path
  trained = peft.apply_with_lora(model, params, lora, x, config=CFG)
  assert not np.allclose(trained, model.apply(params, x))


def _pairs(t0, t1):
  flat0 = jax.tree_util.tree_leaves_with_path(t0)
  flat1 = jax.tree.leaves(t1)
  return {jax.tree_util.keystr(p): (np.asarray(u), np.asarray(w))
          for (p, u), w in zip(flat0, flat1)}


def test_gradient_reaches_only_the_lora_tree():
  model, params, x = _net(depth=2)
  lora = nn.meta.unbox(peft.init_lora(model, params, x, rng=jax.random.key(1), config=CFG))
  loss = _loss(model, CFG)
  grad_fn = jax.grad(loss)
  jaxpr = jax.make_jaxpr(grad_fn)(lora, params, x)
  assert len(jaxpr.jaxpr.outvars) == len(jax.tree.leaves(lora))
  assert [v.aval.shape for v in jaxpr.jaxpr.outvars] == [w.shape for w in jax.tree.leaves(lora)]
  grads = grad_fn(lora, params, x)
  assert jax.tree.structure(grads) == jax.tree.structure(lora)
  # With b = 0, dL/da = x^T (dL/dy b^T) vanishes while dL/db does not.
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.any(np.asarray(g)) == (path[-1].key == "b"), jax.tree_util.keystr(path)
  both = jax.grad(loss, argnums=(0, 1))(lora, params, x)
  assert jax.tree.structure(both[1]) == jax.tree.structure(params)


def test_merged_equals_unmerged():
  model, params, x = _net()
  lora = _randomize_b(peft.init_lora(model, params, x, rng=jax.random.key(1), config=CFG))
  unmerged = peft.apply_with_lora(model, params, lora, x, config=CFG)
  merged_params = peft.merge_params(params, lora, CFG)
  assert jax.tree.structure(merged_params) == jax.tree.structure(params)
  _assert_close(model.apply(merged_params, x), unmerged)
  assert not np.allclose(unmerged, model.apply(params, x))
  adapted = set(peft.lora_shapes(lora))
  for path, (w0, w1) in _pairs(params, merged_params).items():
    module = "/".join(k.strip("[']") for k in path.split("][")[1:-1])
    assert np.array_equal(w0, w1) == (module not in adapted or not path.endswith("['kernel']")), \
        path
  jitted = jax.jit(lambda p, l: peft.merge_params(p, l, CFG))(params, lora)
  _assert_close(jitted, merged_params, rtol=1e-6)


def test_merge_keeps_boxes_of_a_boxed_base_tree():
  model, _, x = _net()
  boxed = model.init(jax.random.key(0), x)
  lora = _randomize_b(peft.init_lora(model, boxed, x, rng=jax.random.key(1), config=CFG))
  merged = peft.merge_params(boxed, lora, CFG)
  kernel = merged["params"]["layers_0"]["query"]["kernel"]
  assert isinstance(kernel, nn.LogicallyPartitioned) and kernel.names == ("embed", "heads")
  _assert_close(model.apply(merged, x), peft.apply_with_lora(model, boxed, lora, x, config=CFG))


def test_split_and_combine_round_trip():
  model, params, x = _net(depth=1)
  lora = peft.init_lora(model, params, x, rng=jax.random.key(1), config=CFG)
  joined = peft.combine_params(params["params"], nn.meta.unbox(lora)["params"])
  assert "lora" in joined["layers_0"]["query"] and "kernel" in joined["layers_0"]["query"]
  base, again = peft.split_params(joined)
  assert _tree_equal(base, params["params"])
  assert _tree_equal(again, nn.meta.unbox(lora)["params"])
  with pytest.raises(peft.LoRAParamsError, match="base_params hold 'lora' branches"):
    peft.apply_with_lora(model, joined, lora, x, config=CFG)


def test_dropout_only_when_not_deterministic_and_with_an_rng():
  model, params, x = _net(depth=1)
  cfg = peft.LoRAConfig(rank=4, alpha=8.0, dropout=0.5, targets=("query", "value", "fc1"))
  lora = _randomize_b(peft.init_lora(model, params, x, rng=jax.random.key(1), config=cfg))
  run = lambda **kw: np.asarray(peft.apply_with_lora(model, params, lora, x, config=cfg, **kw))
  plain = run()
  np.testing.assert_array_equal(run(rng=jax.random.key(5)), plain)
  np.testing.assert_array_equal(run(rng=jax.random.key(5), deterministic=True), plain)
  d5 = run(rng=jax.random.key(5), deterministic=False)
  assert not np.allclose(d5, plain)
  np.testing.assert_array_equal(run(rng=jax.random.key(5), deterministic=False), d5)
  assert not np.allclose(run(rng=jax.random.key(6), deterministic=False), d5)
  np.testing.assert_array_equal(run(rngs={"dropout": jax.random.key(5)}, deterministic=False),
                                d5)
  with pytest.raises(ValueError, match="needs rng="):
    run(deterministic=False)
  # The base path is not dropped: with b = 0 dropout changes nothing.
  zero = peft.init_lora(model, params, x, rng=jax.random.key(1), config=cfg)
  np.testing.assert_array_equal(
      peft.apply_with_lora(model, params, zero, x, config=cfg, rng=jax.random.key(5),
                           deterministic=False), model.apply(params, x))
  no_dropout = dataclasses.replace(cfg, dropout=0.0)
  np.testing.assert_array_equal(
      peft.apply_with_lora(model, params, lora, x, config=no_dropout, deterministic=False),
      plain)


def test_target_matching_no_dense_names_the_pattern_and_lists_modules():
  model, params, x = _net(depth=1)
  cfg = peft.LoRAConfig(targets=("query", "q_proj", "layers_7/.*"))
  with pytest.raises(ValueError, match=r"\['q_proj', 'layers_7/\.\*'\] match no layers.Dense "
                                       r"of Net.*layers_0/query, layers_0/key"):
    peft.init_lora(model, params, x, rng=jax.random.key(1), config=cfg)


def test_base_params_of_another_model_are_refused():
  model, params, x = _net(depth=2)
  _, other, _ = _net(depth=3)
  with pytest.raises(peft.LoRAParamsError, match="not in the model: layers_2/"):
    peft.init_lora(model, other, x, rng=jax.random.key(1), config=CFG)
  _, wider, _ = _net(width=8, depth=2)
  with pytest.raises(peft.LoRAParamsError, match=r"other shapes: .*layers_0/fc1/bias \(16,\) "
                                                 r"\(model \(32,\)\)"):
    peft.init_lora(model, wider, x, rng=jax.random.key(1), config=CFG)
  with pytest.raises(peft.LoRAParamsError, match="missing layers_1/"):
    peft.init_lora(model, _net(depth=1)[1], x, rng=jax.random.key(1), config=CFG)


def test_lora_params_of_another_model_or_config_are_refused():
  model, params, x = _net(depth=2)
  lora = peft.init_lora(model, params, x, rng=jax.random.key(1), config=CFG)
  narrow, narrow_params, xn = _net(width=8, depth=2)
  with pytest.raises(peft.LoRAParamsError, match=r"'layers_0/query' have shapes a \(16, 4\)"):
    peft.apply_with_lora(narrow, narrow_params, lora, xn, config=CFG)
  rank2 = dataclasses.replace(CFG, rank=2)
  with pytest.raises(peft.LoRAParamsError, match=r"with rank 2 needs a \(16, 2\)"):
    peft.apply_with_lora(model, params, lora, x, config=rank2)
  with pytest.raises(peft.LoRAParamsError, match="rank 4, the config 2"):
    peft.merge_params(params, lora, rank2)
  more = dataclasses.replace(CFG, targets=CFG.targets + ("fc2",))
  with pytest.raises(peft.LoRAParamsError, match="no LoRA params for the targeted Dense "
                                                 "'layers_0/fc2'"):
    peft.apply_with_lora(model, params, lora, x, config=more)
  fewer = dataclasses.replace(CFG, targets=("query",))
  with pytest.raises(peft.LoRAParamsError, match="not selected by targets"):
    peft.apply_with_lora(model, params, lora, x, config=fewer)
  deeper, deeper_params, _ = _net(depth=3)
  deep_lora = peft.init_lora(deeper, deeper_params, x, rng=jax.random.key(1), config=CFG)
  with pytest.raises(peft.LoRAParamsError, match="'layers_2' has no module of that name"):
    peft.apply_with_lora(model, params, deep_lora, x, config=CFG)
  with pytest.raises(peft.LoRAParamsError, match="no module there in the base tree"):
    peft.merge_params(params, deep_lora, CFG)


class Shared(nn.Module):
  """One Dense called twice (tied weights): one adapter, used by both calls."""

  @nn.compact
  def __call__(self, x):
    dense = layers.Dense(x.shape[-1], name="query")
    return dense(jnp.tanh(dense(x)))


class Scanned(nn.Module):
  """`nn.scan` over layers: kernels stacked `[L, D_in, F]`, adapters stacked alike."""

  @nn.compact
  def __call__(self, x):
    def body(block, carry, _):
      return carry + jnp.tanh(block(carry)), None
    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=3,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scan(layers.Dense(x.shape[-1], name="query"), x, None)
    return x


@pytest.mark.parametrize("module", [Shared(), Scanned()])
def test_shared_and_scanned_dense(module):
  x = jax.random.normal(jax.random.key(0), (2, 8))
  params = nn.meta.unbox(module.init(jax.random.key(1), x))
  cfg = peft.LoRAConfig(rank=2, targets=("query",))
  lora = peft.init_lora(module, params, x, rng=jax.random.key(2), config=cfg)
  kernel = params["params"]["query"]["kernel"]
  (path, (a, b)), = peft.lora_shapes(lora).items()
  assert a == kernel.shape[:-1] + (2,) and b == kernel.shape[:-2] + (2, 8)
  np.testing.assert_array_equal(peft.apply_with_lora(module, params, lora, x, config=cfg),
                                module.apply(params, x))
  lora = _randomize_b(lora)
  _assert_close(module.apply(peft.merge_params(params, lora, cfg), x),
                peft.apply_with_lora(module, params, lora, x, config=cfg))


def test_intercept_inside_a_larger_model_adapts_only_its_part():
  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = layers.Dense(16, name="bridge")(x)
      with peft.intercept(dict(rank=2, targets=("lm/.*query",))) as seen:
        y = Net(16, 2, name="lm")(h)
      self.sow("intermediates", "adapted", tuple(seen.adapted))
      return y

  x = jnp.ones((2, 3, 16))
  variables = Outer().init(jax.random.key(0), x)
  base, lora = peft.split_params(nn.meta.unbox(variables["params"]))
  assert sorted(peft.lora_shapes(lora)) == ["lm/layers_0/query", "lm/layers_1/query"]
  assert "lora" not in base["bridge"]


def test_sharded_params_over_the_mesh():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  model, _, x = _net(depth=2)
  boxed = model.init(jax.random.key(0), x)
  lora_boxed = peft.init_lora(model, boxed, x, rng=jax.random.key(1), config=CFG)
  base_sh = sharding.tree_shardings(boxed, mesh)
  lora_sh = sharding.tree_shardings(lora_boxed, mesh)
  a_sh = lora_sh["params"]["layers_0"]["fc1"]["lora"]["a"]
  b_sh = lora_sh["params"]["layers_0"]["fc1"]["lora"]["b"]
  assert a_sh.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert b_sh.spec == jax.sharding.PartitionSpec(None, "tensor")
  params = jax.device_put(nn.meta.unbox(boxed), base_sh)
  lora = jax.device_put(_randomize_b(lora_boxed), lora_sh)
  loss = _loss(model, CFG)
  with mesh:
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(lora_sh, base_sh, None),
                   out_shardings=(None, lora_sh))
    value, grads = step(lora, params, x)
  assert grads["params"]["layers_0"]["fc1"]["lora"]["a"].sharding.spec == a_sh.spec
  local_lora, local_params = jax.device_get(lora), jax.device_get(params)
  value1, grads1 = jax.value_and_grad(loss)(local_lora, local_params, x)
  np.testing.assert_allclose(value, value1, rtol=1e-5)
  _assert_close(grads, grads1, rtol=1e-4)


def test_decoder_lm_full_and_cached_paths():
  from edgeglass_jax import decoder
  cfg = decoder.DecoderConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=4, layer_types=("full_attention",) * 2)
  lm = decoder.Decoder(cfg)
  ids = jax.random.randint(jax.random.key(0), (2, 5), 0, 32)
  params = nn.meta.unbox(jax.jit(lm.init)(jax.random.key(1), ids))
  lcfg = peft.LoRAConfig(rank=2, targets=("attn/(query|key|value|out)", "mlp/.*"))
  lora = peft.init_lora(lm, params, ids, rng=jax.random.key(2), config=lcfg)
  assert len(peft.lora_shapes(lora)) == 2 * 7

  @jax.jit
  def paths(params, lora):
    full = peft.apply_with_lora(lm, params, lora, ids, config=lcfg)
    cache = lm.init_cache(2, 8)
    prefix, cache = peft.apply_with_lora(lm, params, lora, ids[:, :3], cache, method="decode",
                                         config=lcfg)
    rest, _ = peft.apply_with_lora(lm, params, lora, ids[:, 3:], cache, method="decode",
                                   config=lcfg)
    merged = lm.apply(peft.merge_params(params, lora, lcfg), ids)
    return lm.apply(params, ids), full, jnp.concatenate([prefix, rest], 1), merged

  base, full, cached, merged = paths(params, lora)
  np.testing.assert_array_equal(full, base)
  base, full, cached, merged = paths(params, _randomize_b(lora, scale=0.1))
  assert not np.allclose(full, base)
  _assert_close(cached, full)
  _assert_close(merged, full)
