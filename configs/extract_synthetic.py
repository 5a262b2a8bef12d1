"""Feature extraction over the embedded synthetic tri-modal set with offline encoders.

  python -m edgeglass_jax.main --config=configs/extract_synthetic.py --workdir=/tmp/eg_extract
  (":small" for a 256-example smoke run)
"""
from edgeglass_jax import configs


def get_config(arg: str = ""):
  small = arg == "small"
  config = configs.base("extract")
  config.data = configs.synthetic_data(num_train=128 if small else 1024,
                                       num_val=64 if small else 256,
                                       num_test=64 if small else 256)
  config.encoders = configs.demo_encoders()
  config.extract = configs.extract()
  return config
