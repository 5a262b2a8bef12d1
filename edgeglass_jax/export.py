"""Export an int8 serving model and run it outside the training code.

Two artifacts, for any linen module with its serving tree (`quant.convert` / `quant.ptq`) and
example inputs, so no model is special:

- StableHLO (`jax.export`): `export_stablehlo` serializes `module.apply(served, *inputs)` with
  the weights baked in; the int8 graph is kept as it is (`s8 x s8 -> s32` dot_generals), so the
  artifact computes the JAX int8 model bitwise. `StableHLORunner(path)(*inputs)` deserializes and
  calls it.
- TFLite: an AQT int8 graph does not convert (`tfl.fully_connected` rejects its i8 operands and
  TFLite's StableHLO op set lacks `round_nearest_even`), so `export_tflite` dequantizes the
  serving tree into a float graph (`quant.dequantize`: kernels = int8 value * scale, the same
  numbers), converts it with jax2tf (native serialization) and lets `TFLiteConverter` quantize it
  to full int8 (weights and activations, float input/output) from a representative dataset.
  TFLite's runtime aborts on the int8-quantized polynomial that StableHLO expands `erf`/`erfc`
  into (exact GELU), so the exported function computes them with the tanh form of GELU
  (`|delta GELU| < 5e-4`). `TFLiteRunner(path)(*inputs)` runs it with `ai-edge-litert`'s
  interpreter. Both artifacts return flat outputs: a pytree output (e.g. `{width: z}`) comes back
as the tuple of its leaves, in `jax.tree.leaves` order.

CLI (the model comes from a factory `package.module:function` returning an `ExportSpec`):

  python -m edgeglass_jax.export export --factory=edgeglass_jax.export:demo_classifier \\
      --out=runs/export [--format=stablehlo,tflite] [--arg=...]
  python -m edgeglass_jax.export run runs/export/model.tflite --input=x.npy [--output=y.npz]
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from edgeglass_jax import quant

# (1 + erf z) / 2 ~ (1 + tanh(c (z + a z^3))) / 2: the tanh form of GELU, c = 2 / sqrt(pi).
_TANH_C, _TANH_A = 1.1283791670955126, 2 * 0.044715


@dataclasses.dataclass
class ExportSpec:
  """What an export needs: a module in SERVE mode (or any float module), its variables, example
  positional inputs (their shapes and dtypes are the artifact's signature), representative
  batches (TFLite calibration; default: the example) and the method to call."""
  module: nn.Module
  variables: Mapping[str, Any]
  example: tuple
  representative: Optional[List[tuple]] = None
  method: Optional[str] = None


def _fn(module: nn.Module, variables, method: Optional[str]) -> Callable:
  return lambda *args: module.apply(variables, *args, method=method)


def _leaves(fn: Callable) -> Callable:
  return lambda *args: tuple(jax.tree.leaves(fn(*args)))


def export_stablehlo(module: nn.Module, variables: Mapping[str, Any], example: Sequence[Any],
                     path: str, method: Optional[str] = None) -> jax.export.Exported:
  """Serializes `module.apply(variables, *inputs)` for inputs shaped like `example` to `path`
  (weights baked in) and returns the `jax.export.Exported`."""
  exported = jax.export.export(jax.jit(_leaves(_fn(module, variables, method))))(
      *[jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype) for a in example])
  _write(path, exported.serialize())
  return exported


def int8_dot_count(exported: jax.export.Exported) -> int:
  """Number of `stablehlo.dot_general` ops of the artifact with int8 operands."""
  text = exported.mlir_module()
  return sum(1 for line in text.splitlines()
             if "stablehlo.dot_general" in line and "xi8>" in line.split("->")[0])


class StableHLORunner:
  """`runner(*inputs)` -> tuple of output arrays (the leaves, in order), from an
  `export_stablehlo` file."""

  def __init__(self, path: str):
    with open(path, "rb") as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))

  def __call__(self, *inputs):
    return self.exported.call(*inputs)


def _tflite_friendly(fn: Callable) -> Callable:
  """`fn` with `erf`/`erfc` computed by their tanh approximation (see the module docstring),
  every other primitive as it is: a jaxpr interpreter that inlines nested jaxprs."""
  from jax.extend import core as jcore

  def approx_erf(x):
    return jnp.tanh(_TANH_C * (x + _TANH_A * x * x * x))

  def run(jaxpr, consts, *args):
    env = {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      name = eqn.primitive.name
      sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
      if name == "erf":
        outs = [approx_erf(ins[0])]
      elif name == "erfc":
        outs = [1.0 - approx_erf(ins[0])]
      elif name in ("pjit", "jit", "closed_call", "custom_jvp_call", "custom_vjp_call",
                    "remat", "checkpoint") and sub is not None:
        closed = sub if hasattr(sub, "consts") else jcore.ClosedJaxpr(sub, ())
        outs = run(closed.jaxpr, closed.consts, *ins)
      else:
        outs = eqn.primitive.bind(*ins, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def wrapped(*args):
    closed = jax.make_jaxpr(fn)(*args)
    return run(closed.jaxpr, closed.consts, *args)

  return wrapped


def export_tflite(module: nn.Module, variables: Mapping[str, Any], example: Sequence[Any],
                  path: str, representative: Optional[Sequence[Sequence[Any]]] = None,
                  method: Optional[str] = None, int8: bool = True) -> int:
  """Writes a `.tflite` of `module.apply(variables, *inputs)`; returns its size in bytes.

  A SERVE-mode module is dequantized first (`quant.dequantize`); `int8=True` then quantizes
  the float graph to full int8 with `representative` batches (tuples of inputs shaped like
  `example`; default `[example]`), keeping float32 inputs and outputs.
  """
  import tensorflow as tf
  from jax.experimental import jax2tf
  q = getattr(module, "quant", None)
  if isinstance(q, quant.Quant) and q.serving:
    module, variables = quant.dequantize(module, variables)
  flat = _leaves(_tflite_friendly(_fn(module, variables, method)))
  signature = [tf.TensorSpec(np.shape(a), tf.as_dtype(np.asarray(a).dtype)) for a in example]
  tf_fn = tf.function(jax2tf.convert(flat, with_gradient=False), autograph=False,
                      input_signature=signature)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [tf_fn.get_concrete_function()], tf_fn)
  if int8:
    batches = [tuple(b) for b in (representative or [tuple(example)])]
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([np.asarray(a) for a in b] for b in batches)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  blob = converter.convert()
  _write(path, blob)
  return len(blob)


class TFLiteRunner:
  """`runner(*inputs)` -> list of output arrays (the leaves of the model's output, in order),
  through `ai_edge_litert.interpreter.Interpreter`. Run it in a process that has not imported
  TensorFlow (TF's own bundled TFLite runtime clashes with ai-edge-litert's)."""

  def __init__(self, path: str, num_threads: Optional[int] = None):
    from ai_edge_litert.interpreter import Interpreter
    self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
    self.interpreter.allocate_tensors()
    self.inputs = self.interpreter.get_input_details()
    outputs = self.interpreter.get_output_details()
    self.outputs = sorted(outputs, key=lambda d: _output_order(d["name"]))

  def __call__(self, *inputs) -> List[np.ndarray]:
    if len(inputs) != len(self.inputs):
      raise ValueError(f"the model takes {len(self.inputs)} inputs, got {len(inputs)}")
    for detail, x in zip(self.inputs, inputs):
      x = np.asarray(x, detail["dtype"])
      if tuple(x.shape) != tuple(detail["shape"]):
        raise ValueError(f"input {detail['name']} must be {list(detail['shape'])}, got "
                         f"{list(x.shape)} (the export fixed the shape; export again for "
                         "another batch size)")
      self.interpreter.set_tensor(detail["index"], x)
    self.interpreter.invoke()
    return [self.interpreter.get_tensor(d["index"]) for d in self.outputs]


def _output_order(name: str):
  digits = "".join(c for c in name.rsplit("_", 1)[-1] if c.isdigit())
  return (int(digits) if digits else 0, name)


def _write(path: str, blob: bytes) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(blob)
  os.replace(path + ".tmp", path)


def demo_classifier(arg: str = "") -> ExportSpec:
  """A tiny classifier-like int8 model (a seeded random MLP adapter + Matryoshka head, PTQ on
  24 seeded inputs of width 32) for the CLI and the tests; `arg` "qat" uses the QAT module
  (same weights) instead of PTQ's float one before converting."""
  from edgeglass_jax import adapters
  module = adapters.ModalityAdapter(adapters.AdapterConfig(kind="mlp", hidden=64, depth=1),
                                    widths=(16,), quant=quant.int8() if arg == "qat" else None)
  r = np.random.default_rng(0)
  batches = [(r.normal(size=(1, 32)).astype(np.float32),) for _ in range(24)]
  variables = module.init(jax.random.key(0), *batches[0])
  if arg == "qat":
    cal = quant.calibrate(module, variables, batches)
    return ExportSpec(quant.serving_module(module), quant.convert(module, variables, cal),
                      batches[0], batches)
  served_module, served, _ = quant.ptq(module, variables, batches)
  return ExportSpec(served_module, served, batches[0], batches)


def load_factory(spec: str) -> Callable[[str], ExportSpec]:
  """`package.module:function` -> the function (a named error when it is not there)."""
  if ":" not in spec:
    raise ValueError(f"--factory must be package.module:function, got {spec!r}")
  mod, name = spec.split(":", 1)
  fn = getattr(importlib.import_module(mod), name, None)
  if fn is None:
    raise ValueError(f"--factory {spec!r}: module {mod} has no function {name!r}")
  return fn


def main(argv: Optional[Sequence[str]] = None) -> int:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m edgeglass_jax.export",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="write model.stablehlo and/or model.tflite")
  ex.add_argument("--factory", required=True, help="package.module:function -> ExportSpec")
  ex.add_argument("--arg", default="", help="string passed to the factory")
  ex.add_argument("--out", required=True, help="output directory")
  ex.add_argument("--format", default="stablehlo,tflite")
  rn = sub.add_parser("run", help="run an artifact on .npy inputs")
  rn.add_argument("artifact")
  rn.add_argument("--input", action="append", required=True, help=".npy file, once per input")
  rn.add_argument("--output", default="", help=".npz file for the outputs")
  args = parser.parse_args(argv)

  if args.command == "export":
    spec = load_factory(args.factory)(args.arg)
    formats = [f for f in args.format.split(",") if f]
    unknown = sorted(set(formats) - {"stablehlo", "tflite"})
    if unknown:
      raise SystemExit(f"--format: unknown {unknown}; use stablehlo, tflite")
    report = {}
    os.makedirs(args.out, exist_ok=True)
    for i, x in enumerate(spec.example):
      np.save(os.path.join(args.out, f"example_{i}.npy"), np.asarray(x))
    if "stablehlo" in formats:
      path = os.path.join(args.out, "model.stablehlo")
      exp = export_stablehlo(spec.module, spec.variables, spec.example, path, spec.method)
      report["stablehlo"] = dict(path=path, bytes=os.path.getsize(path),
                                 int8_dots=int8_dot_count(exp))
    if "tflite" in formats:
      path = os.path.join(args.out, "model.tflite")
      size = export_tflite(spec.module, spec.variables, spec.example, path,
                           spec.representative, spec.method)
      report["tflite"] = dict(path=path, bytes=size)
    if isinstance(getattr(spec.module, "quant", None), quant.Quant):
      report["serving_tree"] = quant.serving_size(spec.variables)
    with open(os.path.join(args.out, "export.json"), "w") as f:
      json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0

  inputs = [np.load(p) for p in args.input]
  if args.artifact.endswith(".tflite"):
    outs = TFLiteRunner(args.artifact)(*inputs)
  else:
    outs = [np.asarray(o) for o in StableHLORunner(args.artifact)(*inputs)]
  if args.output:
    np.savez(args.output, *outs)
  for i, o in enumerate(outs):
    print(f"output {i}: {o.dtype}{list(o.shape)} {np.array2string(o.ravel()[:8], precision=4)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
