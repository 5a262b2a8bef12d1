"""The library on one GPU: edgeglass_jax vs HF transformers PyTorch on the same accelerator.

Side by side in one run, on the same random weights (an HF model built from a config, saved with
`save_pretrained`, loaded by edgeglass_jax's `from_pretrained`), in bf16 and float32:
- `dinov2`: DINOv2-S/14 at 224 (facebook/dinov2-small shapes): images/s of `jax.jit(module.apply)`
  against `Dinov2Model` (sdpa attention);
- `lm`: a decoder of SmolLM2-135M's shapes (Llama, 30 layers, width 576, 9/3 heads, tied
  embeddings): greedy `generate.generate` (prompt 64, 128 new tokens, batch 1 and 32) against HF
  `generate` with its KV cache, tokens/s (and JAX's prefill time).
A sanity line per model gives `max|jax - torch| / max|torch|` in float32 (JAX at `highest`
matmul precision, torch with TF32 matmuls off; its convolution, the patch embedding, still runs
TF32) and, for the LM, the share of greedy tokens equal to HF's in float32; bf16 DINOv2 tokens
are compared with the float32 torch ones. The timed float32 calls are not like for like: JAX at
its default precision runs float32 dots as TF32 on recent GPUs, torch (TF32 off) does not.

Each framework gets one untimed warm-up call, then they alternate call by call (order flipped
every repetition); rates come from the median call. The script runs anywhere (`--tiny` shrinks
every shape so that a CPU run checks it in a minute), and says which device it timed.

  python benchmarks/gpu.py [--reps 5] [--only dinov2,lm] [--tiny]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODELS = ("dinov2", "lm")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--only", default=",".join(MODELS))
  p.add_argument("--image-batch", type=int, default=128)
  p.add_argument("--lm-batches", default="1,32")
  p.add_argument("--tiny", action="store_true", help="tiny shapes: a quick check on any device")
  args = p.parse_args(argv)
  args.only = [m for m in args.only.split(",") if m]
  if set(args.only) - set(MODELS):
    p.error(f"--only: choose from {MODELS}")
  args.lm_batches = [int(b) for b in args.lm_batches.split(",")]
  return args


ARGS = parse_args()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from edgeglass_jax import decoder, encoders, generate  # noqa: E402

TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}


def sync():
  if TORCH_DEVICE == "cuda":
    torch.cuda.synchronize()


def timed(runners: dict, reps: int) -> dict:
  """name -> median seconds of one call (each runner blocks until its result is ready)."""
  for run in runners.values():
    run()
  return {k: statistics.median(v) for k, v in common.time_alternating(runners, reps).items()}


def report(name: str, unit: str, per_call: float, times: dict, rows: list, extra: str = ""):
  ref = times.get("torch")
  for k, t in times.items():
    ratio = ref / t if ref and k != "torch" else None
    note = extra if k != "torch" else ""
    rows.append((name, k, per_call / t, unit, ratio, note))
    print(f"  {name} {k:8s} {per_call / t:10.1f} {unit}/s"
          + (f"  {ratio:.2f}x torch" if ratio else "") + (f"  {note}" if note else ""),
          flush=True)


def bench_dinov2(tmp: str, rows: list):
  size = 56 if ARGS.tiny else 224
  batch = 4 if ARGS.tiny else ARGS.image_batch
  cfg = transformers.Dinov2Config(
      hidden_size=384, num_hidden_layers=2 if ARGS.tiny else 12, num_attention_heads=6,
      intermediate_size=1536, patch_size=14, image_size=518, layerscale_value=1.0)
  torch.manual_seed(0)
  path = os.path.join(tmp, "dinov2")
  transformers.Dinov2Model(cfg).eval().save_pretrained(path)
  pixels = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
  print(f"\n== dinov2: DINOv2-S/14 shapes, {cfg.num_hidden_layers} layers, batch {batch} at "
        f"{size} px ==", flush=True)
  for dname, (jdt, tdt) in DTYPES.items():
    module, params = encoders.from_pretrained(path, dtype=jdt)
    model = transformers.Dinov2Model.from_pretrained(path, torch_dtype=tdt).to(TORCH_DEVICE).eval()
    x_jax = jnp.asarray(pixels, jdt)
    x_torch = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(TORCH_DEVICE, tdt)
    apply = jax.jit(module.apply)

    def jax_run():
      return jax.block_until_ready(apply(params, x_jax))

    def torch_run():
      with torch.inference_mode():
        out = model(pixel_values=x_torch)
      sync()
      return out

    if dname == "float32":  # first in DTYPES: `ref` serves the bf16 comparison too
      with jax.default_matmul_precision("highest"):
        exact = jax.jit(module.apply)(params, x_jax)
      torch.backends.cuda.matmul.allow_tf32 = False
      ref = torch_run().last_hidden_state.float().cpu().numpy()
      extra = f"(max rel err of tokens vs torch, both at full precision: " \
              f"{common.max_rel_err(exact.tokens, ref):.1e})"
    else:
      err_jax = common.max_rel_err(jax_run().tokens, ref)
      err_torch = common.max_rel_err(torch_run().last_hidden_state.float().cpu().numpy(), ref)
      extra = f"(max rel err of tokens vs float32 torch: jax {err_jax:.1e}, torch {err_torch:.1e})"
    report(f"dinov2[{dname}]", "images", batch, timed({"jax": jax_run, "torch": torch_run},
                                                       ARGS.reps), rows, extra)


def bench_lm(tmp: str, rows: list):
  tiny = ARGS.tiny
  cfg = transformers.LlamaConfig(
      vocab_size=512 if tiny else 49152, hidden_size=576, intermediate_size=1536,
      num_hidden_layers=2 if tiny else 30, num_attention_heads=9, num_key_value_heads=3,
      rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True,
      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
  torch.manual_seed(0)
  path = os.path.join(tmp, "llama")
  transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
  prompt, new = (16, 16) if tiny else (64, 128)
  print(f"\n== lm: SmolLM2-135M shapes, {cfg.num_hidden_layers} layers, prompt {prompt}, "
        f"{new} new tokens ==", flush=True)
  for dname, (jdt, tdt) in DTYPES.items():
    module, params = decoder.from_pretrained(path, dtype=jdt, param_dtype=jdt)
    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=tdt)
    model = model.to(TORCH_DEVICE).eval()
    for batch in ARGS.lm_batches:
      ids = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, prompt))
      ids = ids.astype(np.int32)
      ids_torch = torch.from_numpy(ids.astype(np.int64)).to(TORCH_DEVICE)
      stamps = {}

      def jax_run():
        return np.asarray(generate.generate(module, params, ids, new, cache_dtype=jdt,
                                            timings=stamps))

      def torch_run():
        with torch.inference_mode():
          out = model.generate(ids_torch, attention_mask=torch.ones_like(ids_torch),
                               max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0)
        sync()
        return out[:, prompt:].cpu().numpy()

      extra = ""
      if dname == "float32":
        torch.backends.cuda.matmul.allow_tf32 = False
        with jax.default_matmul_precision("highest"):
          same = float(np.mean(jax_run() == torch_run()))
        extra = f"(greedy tokens equal to HF's at full precision: {100 * same:.0f}%)"
      times = timed({"jax": jax_run, "torch": torch_run}, ARGS.reps)
      jax_run()
      report(f"lm[{dname}] b{batch}", "tokens", batch * new, times, rows,
             f"jax prefill {1e3 * stamps['prefill']:.1f} ms {extra}")


def main():
  dev = jax.devices()[0]
  print(f"edgeglass_jax GPU benchmark  {time.strftime('%Y-%m-%d %H:%M')}")
  print(f"  jax {jax.__version__} on {dev.platform}: {getattr(dev, 'device_kind', dev)}; torch "
        f"{torch.__version__} on {TORCH_DEVICE}"
        + (f": {torch.cuda.get_device_name()}" if TORCH_DEVICE == "cuda" else "")
        + f"; transformers {transformers.__version__}")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in ARGS.only:
      {"dinov2": bench_dinov2, "lm": bench_lm}[name](tmp, rows)
  print("\n| model | framework | throughput | vs torch | note |\n|---|---|---|---|---|")
  for name, k, rate, unit, ratio, extra in rows:
    print(f"| {name} | {k} | {rate:.1f} {unit}/s | {f'{ratio:.2f}x' if ratio else ''} | "
          f"{extra} |")


if __name__ == "__main__":
  main()
