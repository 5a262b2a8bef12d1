"""Tiny random encoders and configs shared by the tests (compiles in seconds on a CPU)."""
import os
import subprocess
import sys

from edgeglass_jax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_env(xla_flags: str = ""):
  """The environment of a user's command: without the tests' 8 simulated devices and
  unoptimised XLA backend (which make a real job several times slower), plus `xla_flags`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return env


def run_main(*args, timeout=900, xla_flags="", module="edgeglass_jax.main", env=None):
  """`python -m MODULE ARGS` (default `edgeglass_jax.main`) from the repository root, as a user
  would run it; `env` entries are added to (or, when None, removed from) the user's environment."""
  run_env = user_env(xla_flags)
  for key, value in (env or {}).items():
    if value is None:
      run_env.pop(key, None)
    else:
      run_env[key] = value
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=run_env,
                        capture_output=True, text=True, timeout=timeout)


def snapshot(root):
  """`{relative path: bytes}` of every file under `root` (`None` for directories): a workdir
  before and after a refused run must compare equal."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root)] = None
    for f in filenames:
      with open(os.path.join(dirpath, f), "rb") as fh:
        out[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
  return out

WORDS = ("a the small large tiny big red green blue yellow purple orange black white circle "
         "square triangle star cross ring on at left right center middle of shape there is "
         "side in").split()


def tiny_tokenizer_dir(path):
  from transformers import BertTokenizerFast
  os.makedirs(path, exist_ok=True)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  BertTokenizerFast(os.path.join(path, "vocab.txt")).save_pretrained(path)
  return path, len(vocab)


def tiny_config(tmp_dir, n=24):
  """Extraction config with tiny random encoders for all three modalities."""
  tok_dir, vocab = tiny_tokenizer_dir(os.path.join(tmp_dir, "tok"))
  config = configs.base("extract")
  config.data = configs.synthetic_data(num_train=n, num_val=8, num_test=8, image_size=32,
                                       audio_seconds=0.5)
  config.data.splits = ("train",)
  config.encoders = configs.tiny_random_encoders(tokenizer=tok_dir, vocab_size=vocab)
  config.extract = configs.extract(batch_size=8, shard_size=8, dtype="float32")
  config.extract.progress = False
  return config


def tiny_align_config(tmp_dir, n=48, steps=6, batch_size=16):
  """`align` config over tiny random encoders: 2 checkpoints, small adapters, widths 32/16."""
  config = tiny_config(tmp_dir, n=n)
  config.task = "align"
  config.data.splits = ("train", "test")
  config.data.synthetic.num_test = 16
  config.update(configs.align(widths=(32, 16), steps=steps, batch_size=batch_size,
                              learning_rate=3e-3))
  config.eval.splits = ("test",)
  config.eval.batch_size = 16
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.train.async_checkpoint = False
  for m in ("image", "audio", "text"):
    config.model.adapters[m].hidden = 32
    config.model.adapters[m].depth = 1
  config.model.adapters.image.kind = "perceiver"
  config.model.adapters.image.num_latents = 4
  config.model.adapters.audio.kind = "mean"
  config.loss.cycle_weight = 0.1
  return config


class RecordingQuant:
  """A quantization object (`layers.Quant`): records each kernel's logical axes it is asked for
  and counts the matmuls its dot_generals run (plain `lax.dot_general`)."""

  def __init__(self):
    self.axes, self.calls = [], 0

  def dot_general_cls(self, kernel_axes):
    self.axes.append(tuple(kernel_axes))

    def factory():
      def dot_general(*args, **kwargs):
        import jax
        self.calls += 1
        return jax.lax.dot_general(*args, **kwargs)
      return dot_general
    return factory


def run_exported(artifact, x, tmp_path):
  """Runs `python -m edgeglass_jax.export run ARTIFACT` on `x` in its own process (the TFLite
  runtime aborts in a process that imported TensorFlow) and returns its first output."""
  import numpy as np
  np.save(tmp_path / "x.npy", x)
  run = subprocess.run([sys.executable, "-m", "edgeglass_jax.export", "run", str(artifact),
                        f"--input={tmp_path / 'x.npy'}", f"--output={tmp_path / 'y.npz'}"],
                       cwd=ROOT,
                       env=user_env(), capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  return np.load(tmp_path / "y.npz")["arr_0"]
