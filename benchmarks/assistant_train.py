"""Train-step time of the full-size assistant with text padded to `max_len` vs to the batch.

The assistant's training batches hold `[soft tokens] BOS prompt SEP answer EOS PAD`; on the
synthetic set the text is ~21 tokens on average (52 at most) of `config.data.max_len=64`. With
`config.data.pad_to_multiple_of=8` (the default) each global batch is padded to its longest
sequence rounded up to 8, instead of to `max_len` (big_vision's fixed padding, the other
choice). Both tasks are built by `assistant.make_task` with the same seed, so their loaders give
the same items; the jitted loss and gradient of each (the optimizer update is the same in both
and small for LoRA) runs on the same `--batches` batches, every shape compiled before timing,
`--reps` interleaved passes. Prints each runner's median time per batch and the ratio.

  python benchmarks/assistant_train.py --features_dir=runs/cpu_qa_l1/features [--config qa]
      [--batches 6] [--reps 3] [--xla-flags "..."]

`--features_dir` is a finished full-size feature cache of the same encoders as `--config` (any
such `qa` run's `features/`; the 2026-12-05 entry of RESULTS.md ran `qa,v1,compact` on the
top-layer cache `runs/cpu_qa/features`, then called `qa,compact`).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile

import common  # noqa: E402  (benchmarks/common.py: no jax import)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--features_dir", required=True, help="finished full-size feature cache")
  p.add_argument("--config", default="qa", help="argument of configs/assistant.py")
  p.add_argument("--batches", type=int, default=6, help="training batches timed")
  p.add_argument("--reps", type=int, default=3, help="interleaved passes over the batches")
  p.add_argument("--xla-flags", default="", help="XLA_FLAGS for this run (replaces the env's)")
  args = p.parse_args(argv)
  if args.batches < 1 or args.reps < 1:
    p.error("--batches and --reps must be at least 1")
  return args


def main(argv=None):
  args = parse_args(argv)
  load_before = common.load()
  common.offline_cpu_env(args.xla_flags)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)

  import jax
  from flax import linen as nn

  from edgeglass_jax import configs
  from edgeglass_jax.tasks import assistant, loop

  def task_for(multiple: int):
    config = configs.load(os.path.join(root, "configs", "assistant.py") + ":" + args.config)
    config.features_dir = args.features_dir
    config.data.pad_to_multiple_of = multiple
    config.eval.spoken = 0
    with tempfile.TemporaryDirectory() as workdir:
      task = assistant.make_task(config, workdir, None)
    return config, task

  runners, lengths, losses = {}, {}, {}
  for name, multiple in (("pad to max_len", 0), ("pad to the batch (x8)", 8)):
    config, task = task_for(multiple)
    params = task.init_params(jax.random.key(0))
    params, frozen = (nn.meta.unbox(t) for t in (params, loop.load_frozen(task)))
    grad = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
    batches = [next(task.train_iter) for _ in range(args.batches)]
    rng = jax.random.key(1)
    # Compiles every shape, untimed; the losses are compared below.
    losses[name] = [float(grad(params, frozen, b, rng)[0][0]) for b in batches]
    lengths[name] = [b["text"].shape[1] for b in batches]

    def run(grad=grad, params=params, frozen=frozen, batches=batches, rng=rng):
      for batch in batches:
        jax.block_until_ready(grad(params, frozen, batch, rng))
    runners[name] = run

  times = common.time_alternating(runners, args.reps)
  names = list(runners)
  base = statistics.median(times[names[0]]) / args.batches
  print(f"## {datetime.date.today()} `benchmarks/assistant_train.py --config {args.config} "
        f"--batches {args.batches} --reps {args.reps}`\n")
  print(f"{common.cpu_model()} ({os.cpu_count()} cores), Python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}); {load_before} before, "
        f"{common.load()} after. batch {config.train.batch_size}, max_len "
        f"{config.data.max_len}.\n")
  print("| runner | text lengths | s per batch (median) | best | speed-up |\n|---|---|---|---|---|")
  for name in names:
    med = statistics.median(times[name]) / args.batches
    print(f"| {name} | {', '.join(map(str, lengths[name]))} | {med:.2f} | "
          f"{min(times[name]) / args.batches:.2f} | {base / med:.2f}x |")
  diff = max(abs(a - b) / abs(b) for a, b in zip(losses[names[1]], losses[names[0]]))
  print(f"\nLoss of the same batches, largest relative difference: {diff:.1e}")


if __name__ == "__main__":
  main()
