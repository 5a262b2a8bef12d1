"""The README's main job: extract features of the embedded synthetic tri-modal set with offline
encoders, train adapters into a shared Matryoshka space, print six-direction retrieval tables.

  python -m edgeglass_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
  (":tiny" trains for a few steps on a small set: the CI smoke run)
"""
from edgeglass_jax import configs


def get_config(arg: str = ""):
  tiny = arg == "tiny"
  config = configs.base("align")
  config.data = configs.synthetic_data(num_train=256 if tiny else 2000,
                                       num_val=64 if tiny else 250,
                                       num_test=64 if tiny else 250)
  config.encoders = configs.demo_encoders()
  config.extract = configs.extract()
  config.update(configs.align(steps=20 if tiny else 600, batch_size=64 if tiny else 256))
  config.loss.cycle_weight = 0.1
  return config
