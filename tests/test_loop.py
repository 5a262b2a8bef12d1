"""The loop's train step by hand: a non-finite loss or gradient leaves the state as it was."""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from edgeglass_jax.tasks import loop

CFG = mlc.ConfigDict(dict(learning_rate=0.1, warmup_steps=1, steps=10, end_lr_fraction=0.1,
                          weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=1.0, frozen=""))


def _state(params, tx):
  return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                         nonfinite_streak=jnp.zeros((), jnp.int32),
                         nonfinite_total=jnp.zeros((), jnp.int32))


@pytest.mark.parametrize("case", ["finite", "nan_loss", "inf_grad_finite_loss", "nan_grad"])
def test_train_step_skips_a_nonfinite_loss_or_gradient(case):
  def loss_fn(params, frozen, batch, rng):
    x = params["x"]
    if case == "inf_grad_finite_loss":  # d/dx sqrt(x) at 0 is inf, the loss is 0
      return jnp.sum(jnp.sqrt(x * batch)), {}
    if case == "nan_grad":  # where's masked branch gives 0 * inf backwards, the loss is 0
      return jnp.sum(jnp.where(x > 0, jnp.sqrt(x), 0.0)), {}
    loss = jnp.sum((x - frozen) ** 2)
    return (loss * jnp.nan if case == "nan_loss" else loss), {}

  tx = loop.make_optimizer(CFG)
  params = {"x": jnp.zeros((3,)), "y": {"z": jnp.ones((2, 2))}}
  state = _state(params, tx)
  step = jax.jit(loop.make_train_step(loss_fn, tx, with_frozen=True))
  batch = jnp.zeros((3,)) if case == "inf_grad_finite_loss" else jnp.ones((3,))
  new, metrics = step(state, jnp.ones((3,)), batch, jax.random.key(0))
  assert int(new.step) == 1
  if case == "finite":
    assert float(metrics["skipped"]) == 0 and int(new.nonfinite_total) == 0
    again, _ = step(new, jnp.ones((3,)), batch, jax.random.key(1))  # warmup: lr 0 at step 0
    assert not np.allclose(again.params["x"], 0.0)
    np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(3 * 4.0), rtol=1e-6)
  else:
    assert np.isfinite(float(metrics["loss"])) == (case != "nan_loss")
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["skipped"]) == 1 and int(new.nonfinite_total) == 1
    assert int(new.nonfinite_streak) == 1
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                    jax.tree.leaves((state.params, state.opt_state))):
      np.testing.assert_array_equal(a, b)


def test_lr_scale_multiplies_the_update_of_the_params_its_regex_matches():
  """AdamW with constant gradients moves every param by lr * sign(grad); `lr_scale` multiplies
  that move for the matching paths only, and the first matching rule wins."""
  cfg = mlc.ConfigDict(dict(CFG.to_dict(), warmup_steps=0, steps=100,
                            lr_scale=r"^bridge/:5, lora/a:0, lora:2"))
  tx = loop.make_optimizer(cfg)
  params = {"bridge": {"w": jnp.ones((2, 2))}, "lora": {"a": jnp.ones((2,)), "b": jnp.ones((2,))},
            "other": {"bridge": jnp.ones((2,))}}
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, tx.init(params), params)  # warmup: lr 0 at step 0
  updates, _ = tx.update(grads, opt_state, params)
  base = -float(CFG.learning_rate)
  np.testing.assert_allclose(updates["bridge"]["w"], 5 * base, rtol=1e-4)
  np.testing.assert_allclose(updates["lora"]["a"], 0.0)
  np.testing.assert_allclose(updates["lora"]["b"], 2 * base, rtol=1e-4)
  np.testing.assert_allclose(updates["other"]["bridge"], base, rtol=1e-4)


@pytest.mark.parametrize("spec", ["bridge", "bridge:x", ":2", "bridge:-1", "bridge:nan",
                                  "lora:1,[bad:2"])
def test_lr_scale_names_a_malformed_rule(spec):
  with pytest.raises(ValueError, match="train.lr_scale"):
    loop.parse_lr_scale(spec)


def test_frozen_boxed_params_get_no_update_and_shard_like_the_optimizer_state():
  """A `frozen` regex over a partitioned (boxed) param: optax masks it inside its box, which the
  state's shardings must mirror (it once raised on the MaskedNode), and it never moves, weight
  decay included."""
  import flax.linen as nn
  from edgeglass_jax import sharding
  cfg = mlc.ConfigDict(dict(CFG.to_dict(), frozen="(^|/)fixed/", weight_decay=0.5))
  params = {"w": nn.Partitioned(jnp.ones((8, 4)), ("embed", None)),
            "fixed": {"m": nn.LogicallyPartitioned(jnp.ones((4, 4)), (None, None))}}
  tx = loop.make_optimizer(cfg)
  abstract = jax.eval_shape(tx.init, params)
  shardings = sharding.tree_shardings(abstract, sharding.make_mesh({"data": -1}))
  assert jax.tree.structure(shardings) == jax.tree.structure(nn.meta.unbox(abstract))
  unboxed = nn.meta.unbox(params)
  state = tx.init(unboxed)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, unboxed), state, unboxed)
    unboxed = jax.tree.map(lambda p, u: p + u, unboxed, updates)
  np.testing.assert_array_equal(unboxed["fixed"]["m"], np.ones((4, 4)))
  assert float(jnp.abs(unboxed["w"] - 1.0).max()) > 0
