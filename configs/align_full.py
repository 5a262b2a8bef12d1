"""Tri-modal alignment at scale: real frozen encoders from local HF checkpoints, a manifest (or
TFDS) dataset, a (data, fsdp, tensor) mesh and bf16 compute. Works on one CPU or a pod slice;
only the paths and the mesh change.

  python -m edgeglass_jax.main --config=configs/align_full.py --workdir=gs://bucket/run \
      --config.encoders.image.path=/models/siglip-base-patch16-224 \
      --config.data.manifest.train=/data/train.jsonl --config.data.manifest.val=/data/val.jsonl \
      --config.data.manifest.test=/data/test.jsonl --config.mesh.fsdp=4
  (on a multi-host TPU slice add --config.distributed=True and run on every host)
"""
import ml_collections as mlc

from edgeglass_jax import configs


def get_config():
  config = configs.base("align")
  config.data = configs.synthetic_data()
  config.data.source = "manifest"
  config.data.captions_per_item = 5
  config.data.tfds = mlc.ConfigDict(dict(name="coco_captions", data_dir="", image_key="image",
                                         caption_key="captions/text", audio_key="",
                                         splits=dict(train="train", val="val", test="test")))
  config.encoders = mlc.ConfigDict(dict(
      image=configs.encoder_spec(path="/models/siglip-base-patch16-224"),
      audio=configs.encoder_spec(package="whisper-tiny.en", max_seconds=30.0),
      text=configs.encoder_spec(package="all-MiniLM-L6-v2", max_len=64)))
  config.extract = configs.extract(batch_size=256, shard_size=4096, dtype="float16")
  config.extract.compute_dtype = "bfloat16"
  config.update(configs.align(widths=(512, 256, 128, 64), steps=20000, batch_size=4096,
                              learning_rate=5e-4))
  config.model.dtype = "bfloat16"
  for m in ("image", "audio"):
    config.model.adapters[m] = configs.adapter(kind="perceiver", hidden=768, depth=2,
                                               num_latents=64, num_heads=12)
  config.model.adapters.text = configs.adapter(kind="mlp", hidden=768, depth=2)
  config.loss.cycle_weight = 0.1
  config.train.eval_every = 2000
  config.train.checkpoint_every = 1000
  config.train.keep_best_metric = "image_to_text/R@1@d512"
  config.eval.batch_size = 1024
  config.mesh = configs.mesh(data=-1, fsdp=1, tensor=1)
  return config
