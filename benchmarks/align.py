"""Train-step throughput of the `align` task on cached features: edgeglass_jax vs plain PyTorch.

Both sides train the same thing on random arrays of the cached shapes (pooled image 768, audio
384, text 384): per modality an `mlp` adapter (in_proj -> 2 pre-norm residual GELU blocks of
hidden 512 x4 -> LayerNorm) and an MRL-E Matryoshka head (512 -> widths 512/256/128/64, each
L2-normalised); SigLIP loss with learnable t'/b on image-text, audio-text, image-audio at every
width, + 0.1 x the tri-modal cycle loss (tau 0.1) at every width; AdamW (warmup-cosine, weight
decay on matrices only) after global-norm clipping at 1.0.

- jax: the real `tasks.align.Aligner` + `make_loss_fn` + `loop.make_train_step` +
  `loop.make_optimizer`, jitted with the state donated, on one CPU device;
- torch: the same model and losses in plain PyTorch (nn.Linear / LayerNorm / GELU,
  `torch.optim.AdamW`, `clip_grad_norm_`), `torch.set_num_threads(os.cpu_count())`; and, with
  `--torch-compile`, the loss module under `torch.compile` (its failure is reported, not fatal).

Before timing, the torch model is loaded with the jax initial weights and both losses and
gradient norms are compared on one batch, so the two sides provably compute the same function.
Steps are timed one by one (blocking on the loss), frameworks interleaved in chunks of 5 steps so
that load from other processes hits both alike; examples/s come from the median step time.

The JAX step's FLOPs are counted by XLA (`compiled.cost_analysis()["flops"]`) and analytically
(matmuls of the forward pass x 3 for forward + backward) and set against the float32 matmul
rate measured in the same run (jitted 2048x2048 `jnp.dot`).

`--variants` also times patched JAX loss functions (no library code changes) that locate the
time: the step without the cycle loss, with the cycle loss at the largest width only, with the
MRL-E pair logits of all widths from one blocked matmul (`mrl_e_sigmoid_losses`), and the
jitted pieces (embeddings forward, loss forward, value_and_grad, optimizer update).

  python benchmarks/align.py [--batch 256,1024] [--steps 20] [--variants] [--torch-compile]
      [--xla-flags "--xla_cpu_multi_thread_eigen=false"]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", default="256,1024", help="comma-separated batch sizes")
  p.add_argument("--steps", type=int, default=20, help="timed steps per framework and batch")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--variants", action="store_true", help="also time patched JAX variants")
  p.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
  p.add_argument("--no-torch", action="store_true", help="time JAX only")
  p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax starts")
  p.add_argument("--cycle-weight", type=float, default=0.1)
  return p.parse_args(argv)


ARGS = parse_args()
if ARGS.xla_flags:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from edgeglass_jax import MODALITIES, configs, losses  # noqa: E402
from edgeglass_jax.tasks import align, loop  # noqa: E402

FEATURE_DIMS = {"image": 768, "audio": 384, "text": 384}
WIDTHS = (512, 256, 128, 64)
HIDDEN, DEPTH, MLP_RATIO = 512, 2, 4
CHUNK = 5


# --------------------------------------------------------------------------------------------
# Shared setup.


def make_config(batch: int, steps: int, cycle_weight: float):
  """The align config of this benchmark: mlp adapters on pooled features, all pairs + cycle."""
  config = configs.base("align")
  config.update(configs.align(widths=WIDTHS, steps=max(steps, 100), batch_size=batch))
  for m in MODALITIES:
    config.model.adapters[m] = configs.adapter(kind="mlp", hidden=HIDDEN, depth=DEPTH)
  config.loss.cycle_weight = cycle_weight
  return config


def make_batches(batch: int, count: int = 2, seed: int = 0):
  """`count` host batches `{m/pooled [B, D_m], m/valid [B]}` of random cached features."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    b = {f"{m}/pooled": rng.standard_normal((batch, d), np.float32)
         for m, d in FEATURE_DIMS.items()}
    b.update({f"{m}/valid": np.ones((batch,), bool) for m in MODALITIES})
    out.append(b)
  return out


def analytic_flops(batch: int, cycle: bool, cycle_widths=WIDTHS) -> dict:
  """Matmul FLOPs (2 per multiply-add) of one forward pass, by part."""
  n = batch
  adapters = sum(2 * n * (d * HIDDEN + DEPTH * 2 * HIDDEN * MLP_RATIO * HIDDEN + HIDDEN * WIDTHS[0])
                 for d in FEATURE_DIMS.values())
  pairs = sum(3 * 2 * n * n * w for w in WIDTHS)
  cyc = sum(6 * 2 * n * n * w + 2 * 2 * n ** 3 for w in cycle_widths) if cycle else 0
  return {"adapters": adapters, "pair_logits": pairs, "cycle": cyc}


def median(xs):
  return statistics.median(xs)


# --------------------------------------------------------------------------------------------
# JAX side.


def cost_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float(ca.get("flops", float("nan"))) if ca else float("nan")


class JaxRunner:
  """The library's train step, jitted with donated state; `step()` runs one and blocks."""

  def __init__(self, config, host_batches, loss_fn=None, tx=None):
    self.model = align.build_model(config)
    self.loss_fn = loss_fn or align.make_loss_fn(self.model, config)
    self.tx = tx or loop.make_optimizer(config.train)
    self.batches = [jax.device_put(b) for b in host_batches]
    params = nn.meta.unbox(self.model.init(jax.random.key(0), self.batches[0]))
    self.init_params = jax.tree.map(np.asarray, params)
    self.state = loop.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=self.tx.init(params),
                                 nonfinite_streak=jnp.zeros((), jnp.int32),
                                 nonfinite_total=jnp.zeros((), jnp.int32))
    self.rng = jax.random.key(1)
    t0 = time.perf_counter()
    lowered = jax.jit(loop.make_train_step(self.loss_fn, self.tx), donate_argnums=(0,)).lower(
        self.state, self.batches[0], self.rng)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = cost_flops(self.compiled)
    self.i = 0

  def step(self):
    self.state, metrics = self.compiled(self.state, self.batches[self.i % len(self.batches)],
                                        self.rng)
    self.i += 1
    jax.block_until_ready(metrics["loss"])
    return metrics

  def loss_and_grad_norm(self, host_batch):
    p = jax.tree.map(jnp.asarray, self.init_params)
    (loss, _), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
        p, jax.device_put(host_batch), self.rng)
    return float(loss), float(optax.global_norm(grads))


def jax_matmul_rate(n: int = 2048, reps: int = 7) -> dict:
  """float32 [n, n] @ [n, n] FLOP/s of a jitted jnp.dot: median and best of `reps`."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n), np.float32))
  b = jnp.asarray(rng.standard_normal((n, n), np.float32))
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  flop = 2 * n ** 3
  return {"median": flop / median(times), "best": flop / min(times)}


# --------------------------------------------------------------------------------------------
# PyTorch side.


def build_torch(config):
  """The same model, loss and optimizer in plain PyTorch; returns (module, make_opt, loss_fn)."""
  import torch
  import torch.nn.functional as F
  from torch import nn as tnn

  tau = float(config.loss.cycle_temperature)
  cycle_weight = float(config.loss.cycle_weight)
  pair_names = [losses.pair_name(a, b) for a, b in losses.ALL_PAIRS]

  class Block(tnn.Module):
    def __init__(self):
      super().__init__()
      self.norm = tnn.LayerNorm(HIDDEN, eps=1e-5)
      self.fc1 = tnn.Linear(HIDDEN, MLP_RATIO * HIDDEN)
      self.fc2 = tnn.Linear(MLP_RATIO * HIDDEN, HIDDEN)

    def forward(self, x):
      return x + self.fc2(F.gelu(self.fc1(self.norm(x))))

  class Adapter(tnn.Module):
    def __init__(self, d_in):
      super().__init__()
      self.in_proj = tnn.Linear(d_in, HIDDEN)
      self.blocks = tnn.ModuleList([Block() for _ in range(DEPTH)])
      self.norm = tnn.LayerNorm(HIDDEN, eps=1e-5)
      self.head = tnn.Linear(HIDDEN, WIDTHS[0])

    def forward(self, x):
      x = self.in_proj(x)
      for blk in self.blocks:
        x = blk(x)
      z = self.head(self.norm(x))
      return {w: F.normalize(z[:, :w], dim=-1) for w in WIDTHS}

  def sigmoid_loss(za, zb, t, b):
    logits = t.exp() * (za @ zb.T) + b
    labels = 2.0 * torch.eye(za.shape[0], dtype=za.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum() / za.shape[0]

  def log_matmul(la, lb):
    ra = la.amax(1, keepdim=True).detach()
    cb = lb.amax(0, keepdim=True).detach()
    inner = (la - ra).exp() @ (lb - cb).exp()
    return ra + cb + inner.clamp_min(torch.finfo(inner.dtype).tiny).log()

  def cycle_loss(zi, zt, za):
    log_assign = lambda x, y: torch.log_softmax((x @ y.T) / tau, dim=1)

    def cycle(x, y, w):
      lxy, lyw, lwx = log_assign(x, y), log_assign(y, w), log_assign(w, x)
      return -torch.logsumexp(log_matmul(lxy, lyw) + lwx.T, dim=1)

    return (0.5 * (cycle(zi, zt, za) + cycle(zi, za, zt))).mean()

  class AlignLoss(tnn.Module):
    def __init__(self):
      super().__init__()
      self.towers = tnn.ModuleDict({m: Adapter(d) for m, d in FEATURE_DIMS.items()})
      self.t_prime = tnn.ParameterDict({k: tnn.Parameter(torch.tensor(losses.SIGMOID_INIT[0]))
                                        for k in pair_names})
      self.bias = tnn.ParameterDict({k: tnn.Parameter(torch.tensor(losses.SIGMOID_INIT[1]))
                                     for k in pair_names})

    def forward(self, image, audio, text):
      feats = {"image": image, "audio": audio, "text": text}
      z = {m: self.towers[m](feats[m]) for m in MODALITIES}
      total = 0.0
      for w in WIDTHS:
        for a, c in losses.ALL_PAIRS:
          k = losses.pair_name(a, c)
          total = total + sigmoid_loss(z[a][w], z[c][w], self.t_prime[k], self.bias[k])
        if cycle_weight > 0:
          total = total + cycle_weight * cycle_loss(z["image"][w], z["text"][w], z["audio"][w])
      return total

  tcfg = config.train

  def make_opt(module):
    decay = [p for p in module.parameters() if p.ndim > 1]
    rest = [p for p in module.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    kw = dict(lr=tcfg.learning_rate, betas=(tcfg.b1, tcfg.b2), eps=1e-8)
    try:
      opt = torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):
      opt = torch.optim.AdamW(groups, **kw)
    warm, total = max(tcfg.warmup_steps, 1), max(tcfg.steps, tcfg.warmup_steps + 1)
    end = tcfg.end_lr_fraction

    def lr_lambda(s):
      if s < warm:
        return s / warm
      frac = min((s - warm) / (total - warm), 1.0)
      return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

  return AlignLoss(), make_opt


def load_jax_params(module, params):
  """Copies the jax initial params (kernels transposed) into the torch module."""
  import torch
  p = params["params"]
  sd = {}
  for m in MODALITIES:
    proj = p[m]["projector"]
    dense = {"in_proj": proj["in_proj"], "head": p[m]["head"]["proj"]}
    for i in range(DEPTH):
      blk = proj[f"block{i}"]
      dense[f"blocks.{i}.fc1"] = blk["mlp"]["fc1"]
      dense[f"blocks.{i}.fc2"] = blk["mlp"]["fc2"]
      sd[f"towers.{m}.blocks.{i}.norm.weight"] = blk["norm"]["scale"]
      sd[f"towers.{m}.blocks.{i}.norm.bias"] = blk["norm"]["bias"]
    sd[f"towers.{m}.norm.weight"] = proj["norm"]["scale"]
    sd[f"towers.{m}.norm.bias"] = proj["norm"]["bias"]
    for name, d in dense.items():
      sd[f"towers.{m}.{name}.weight"] = np.asarray(d["kernel"]).T
      sd[f"towers.{m}.{name}.bias"] = d["bias"]
  for k, v in p["pairs"].items():
    sd[f"t_prime.{k}"] = v["t_prime"]
    sd[f"bias.{k}"] = v["b"]
  module.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()},
                         strict=True)


class TorchRunner:
  """One eager (or `torch.compile`d loss) train step: forward, backward, clip, AdamW."""

  def __init__(self, config, host_batches, init_params, compile_loss=False):
    import torch
    self.torch = torch
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    self.module, make_opt = build_torch(config)
    load_jax_params(self.module, init_params)
    self.opt, self.sched = make_opt(self.module)
    self.params = list(self.module.parameters())
    self.clip = float(config.train.clip_norm)
    self.batches = [tuple(torch.from_numpy(b[f"{m}/pooled"]) for m in MODALITIES)
                    for b in host_batches]
    self.forward = torch.compile(self.module) if compile_loss else self.module
    self.i = 0

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    loss = self.forward(*self.batches[self.i % len(self.batches)])
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    self.sched.step()
    self.i += 1
    return float(loss)

  def loss_and_grad_norm(self, host_batch):
    self.module.zero_grad(set_to_none=True)
    loss = self.module(*(self.torch.from_numpy(host_batch[f"{m}/pooled"]) for m in MODALITIES))
    loss.backward()
    norm = self.torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.params))
    self.module.zero_grad(set_to_none=True)
    return float(loss), float(norm)


def torch_matmul_rate(n: int = 2048, reps: int = 7) -> dict:
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t)
  flop = 2 * n ** 3
  return {"median": flop / median(times), "best": flop / min(times)}


# --------------------------------------------------------------------------------------------
# Patched JAX variants (profiling; the library is untouched).


def mrl_e_sigmoid_losses(z, pair_params, widths):
  """SigLIP losses of all pairs at all MRL-E widths from one blocked matmul per pair.

  z: modality -> full head output `[N, W]` (unnormalised). With prefixes z[:, :w], the Gram
  matrix of width w is the running sum of the per-block Grams, so one `[N, N]` product per
  block of columns serves every width: N^2 * W multiply-adds instead of N^2 * sum(widths).
  Returns `{w: {pair: loss}}`, equal to `losses.sigmoid_loss` on the renormalised prefixes.
  """
  ws = sorted(widths)
  out = {w: {} for w in ws}
  for a, c in losses.ALL_PAIRS:
    za, zc = z[a].astype(jnp.float32), z[c].astype(jnp.float32)
    p = pair_params[losses.pair_name(a, c)]
    gram, lo = 0.0, 0
    n = za.shape[0]
    labels = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
    for w in ws:
      gram = gram + za[:, lo:w] @ zc[:, lo:w].T
      lo = w
      ia = jax.lax.rsqrt(jnp.maximum(jnp.sum(za[:, :w] ** 2, -1), 1e-12))
      ic = jax.lax.rsqrt(jnp.maximum(jnp.sum(zc[:, :w] ** 2, -1), 1e-12))
      logits = jnp.exp(p["t_prime"]) * (gram * ia[:, None] * ic[None, :]) + p["b"]
      out[w][losses.pair_name(a, c)] = jnp.sum(-jax.nn.log_sigmoid(labels * logits)) / n
  return out


def variant_loss_fns(model, config):
  """name -> loss_fn(params, batch, rng) for the patched variants (all masks assumed full)."""
  tau, cw = float(config.loss.cycle_temperature), float(config.loss.cycle_weight)

  def head_outputs(params, batch):
    """Full-width head outputs `[N, 512]` per modality (the MRL-E `proj` before slicing) and
    the model's pair temperatures and biases."""
    captured = {}

    def grab(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and context.module.name == "proj":
        captured[context.module.scope.path[0]] = y
      return y

    with nn.intercept_methods(grab):
      _, pairs = model.apply(params, batch)
    return captured, pairs

  def fused(params, batch, rng, cycle_widths=WIDTHS):
    del rng
    z, pairs = head_outputs(params, batch)
    per_w = mrl_e_sigmoid_losses(z, pairs, WIDTHS)
    total = 0.0
    for w in WIDTHS:
      total = total + sum(per_w[w].values())
      if cw > 0 and w in cycle_widths:
        zn = {m: losses.l2_normalize(z[m][:, :w]) for m in MODALITIES}
        total = total + cw * losses.cycle_loss(zn["image"], zn["text"], zn["audio"], tau)
    return total, {}

  def reference(params, batch, rng, cycle_widths=WIDTHS, cycle=True):
    del rng
    z, pp = model.apply(params, batch)
    total = 0.0
    for w in WIDTHS:
      for a, c in losses.ALL_PAIRS:
        p = pp[losses.pair_name(a, c)]
        total = total + losses.sigmoid_loss(z[a][w], z[c][w], p["t_prime"], p["b"])
      if cycle and cw > 0 and w in cycle_widths:
        total = total + cw * losses.cycle_loss(z["image"][w], z["text"][w], z["audio"][w], tau)
    return total, {}

  return {
      "no cycle loss": lambda p, b, r: reference(p, b, r, cycle=False),
      "cycle at d512 only": lambda p, b, r: reference(p, b, r, cycle_widths=WIDTHS[:1]),
      "fused MRL-E pair logits": fused,
      "fused logits + cycle at d512": lambda p, b, r: fused(p, b, r, cycle_widths=WIDTHS[:1]),
  }


def time_fn(fn, reps):
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return median(times)


def jax_pieces(runner: JaxRunner, reps: int) -> dict:
  """Median seconds of the jitted parts of the step: what each stage adds."""
  params = jax.tree.map(jnp.asarray, runner.init_params)
  batch, rng = runner.batches[0], runner.rng
  embed = jax.jit(runner.model.apply)
  loss = jax.jit(lambda p, b: runner.loss_fn(p, b, rng)[0])
  grad = jax.jit(jax.value_and_grad(lambda p, b: runner.loss_fn(p, b, rng)[0]))
  opt_state = runner.tx.init(params)
  grads = grad(params, batch)[1]
  update = jax.jit(lambda g, s, p: optax.apply_updates(p, runner.tx.update(g, s, p)[0]))
  out = {}
  for name, fn in [("embeddings fwd", lambda: embed(params, batch)),
                   ("loss fwd", lambda: loss(params, batch)),
                   ("value_and_grad", lambda: grad(params, batch)),
                   ("clip + AdamW update", lambda: update(grads, opt_state, params))]:
    fn()
    out[name] = time_fn(fn, reps)
  return out


# --------------------------------------------------------------------------------------------


def timed_interleaved(runners: dict, steps: int, warmup: int) -> dict:
  """Per-step seconds of each runner, run alternately in chunks of CHUNK steps."""
  for r in runners.values():
    for _ in range(warmup):
      r.step()
  times = {k: [] for k in runners}
  done = 0
  while done < steps:
    n = min(CHUNK, steps - done)
    for k, r in runners.items():
      for _ in range(n):
        t = time.perf_counter()
        r.step()
        times[k].append(time.perf_counter() - t)
    done += n
  return times


def machine_line() -> str:
  model = platform.processor() or "?"
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
  return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB"


def load_line() -> str:
  return "load average %.2f %.2f %.2f" % os.getloadavg()


def main():
  args = ARGS
  batches = [int(b) for b in args.batch.split(",")]
  import torch
  print(f"machine: {machine_line()}; jax {jax.__version__} ({jax.devices()[0].platform}, "
        f"{jax.device_count()} device), torch {torch.__version__}; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}")
  print(f"start: {load_line()}")
  mm = jax_matmul_rate()
  tmm = torch_matmul_rate()
  print(f"f32 2048^2 matmul: jnp.dot {mm['median'] / 1e9:.1f} GFLOP/s median "
        f"({mm['best'] / 1e9:.1f} best); torch {tmm['median'] / 1e9:.1f} "
        f"({tmm['best'] / 1e9:.1f} best)")
  rows = []
  for bs in batches:
    config = make_config(bs, args.steps, args.cycle_weight)
    host = make_batches(bs)
    jr = JaxRunner(config, host)
    runners = {"jax": jr}
    if not args.no_torch:
      tr = TorchRunner(config, host, jr.init_params)
      check = make_batches(min(bs, 128), 1, seed=7)[0]
      jl, jg = jr.loss_and_grad_norm(check)
      tl, tg = tr.loss_and_grad_norm(check)
      print(f"[B={bs}] parity on one batch of {min(bs, 128)}: loss jax {jl:.6f} torch {tl:.6f}, "
            f"grad norm jax {jg:.6f} torch {tg:.6f}")
      if not (math.isclose(jl, tl, rel_tol=1e-4) and math.isclose(jg, tg, rel_tol=1e-3)):
        raise SystemExit("the torch model does not compute the jax loss; fix it before timing")
      runners["torch"] = tr
      if args.torch_compile:
        try:
          t0 = time.perf_counter()
          tc = TorchRunner(config, host, jr.init_params, compile_loss=True)
          tc.step()
          print(f"[B={bs}] torch.compile: first step (compile) {time.perf_counter() - t0:.1f} s")
          runners["torch.compile"] = tc
        except Exception as e:  # report and go on: inductor needs a working C++ toolchain
          print(f"[B={bs}] torch.compile FAILED: {type(e).__name__}: {str(e)[:300]}")
    print(f"[B={bs}] jax compile {jr.compile_s:.1f} s; {load_line()}")
    times = timed_interleaved(runners, args.steps, args.warmup)
    flop = analytic_flops(bs, args.cycle_weight > 0)
    fwd = sum(flop.values())
    med = {k: median(v) for k, v in times.items()}
    rate = {k: bs / v for k, v in med.items()}
    jax_flops_s = jr.flops / med["jax"]
    rows.append((bs, rate, med, jr.flops, 3 * fwd, jax_flops_s, mm["median"]))
    print(f"[B={bs}] {load_line()}")
    for k in times:
      print(f"  {k:14s} {rate[k]:8.0f} ex/s  median step {1e3 * med[k]:7.1f} ms  "
            f"(min {1e3 * min(times[k]):.1f}, max {1e3 * max(times[k]):.1f})")
    for k in times:
      if k != "jax":
        print(f"  jax / {k}: {rate['jax'] / rate[k]:.2f}x")
    print(f"  jax step FLOPs: XLA cost_analysis {jr.flops / 1e9:.2f} G; analytic 3 x fwd matmuls "
          f"{3 * fwd / 1e9:.2f} G (fwd: adapters {flop['adapters'] / 1e9:.2f}, pair logits "
          f"{flop['pair_logits'] / 1e9:.2f}, cycle {flop['cycle'] / 1e9:.2f})")
    print(f"  jax achieved {jax_flops_s / 1e9:.1f} GFLOP/s (XLA count) = "
          f"{100 * jax_flops_s / mm['median']:.0f}% of the measured matmul rate; analytic "
          f"{3 * fwd / med['jax'] / 1e9:.1f} GFLOP/s = {100 * 3 * fwd / med['jax'] / mm['median']:.0f}%")
    if args.variants:
      reps = max(3, args.steps // 4)
      pieces = jax_pieces(jr, reps)
      print(f"  jax pieces (median of {reps}): " + ", ".join(
          f"{k} {1e3 * v:.1f} ms" for k, v in pieces.items()))
      model = jr.model
      for name, fn in variant_loss_fns(model, config).items():
        vr = JaxRunner(config, host, loss_fn=fn)
        vt = timed_interleaved({"v": vr}, max(CHUNK, args.steps // 2), 1)["v"]
        print(f"  variant {name:30s} {bs / median(vt):8.0f} ex/s  median step "
              f"{1e3 * median(vt):7.1f} ms  XLA FLOPs {vr.flops / 1e9:.2f} G  {load_line()}")
    del runners, jr
  print(f"end: {load_line()}")
  print("\n| batch | " + " | ".join(f"{k} ex/s" for k in rows[0][1]) +
        " | jax/torch | jax GFLOP/s (XLA) | % of matmul |")
  print("|---" * (len(rows[0][1]) + 4) + "|")
  for bs, rate, med, xf, af, fs, mmr in rows:
    ratio = f"{rate['jax'] / rate['torch']:.2f}x" if "torch" in rate else "-"
    print(f"| {bs} | " + " | ".join(f"{v:.0f}" for v in rate.values()) +
          f" | {ratio} | {fs / 1e9:.1f} | {100 * fs / mmr:.0f}% |")


if __name__ == "__main__":
  main()
