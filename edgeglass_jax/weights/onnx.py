"""Reader for ONNX model files: the weights (initializers) and the graph facts that name them.

Knows the format, not architectures. An exporter (torch.onnx) keeps a module's name on most
initializers but leaves others anonymous (`onnx::MatMul_1966`: a transposed copy of a linear
weight) and folds constant subgraphs into new ones; only the graph says what such a tensor is.
So `read_onnx` returns, besides `{initializer name: np.ndarray}`, the nodes (name, op type,
inputs, outputs) and the values of `Constant` nodes, and `initializer_inputs(node)` lists the
initializers a node consumes. Turning that into HF names is the architecture's job (e.g.
`encoders.dinov2.dinov2_onnx_to_hf`).

Uses the `onnx` package only (protobuf parsing); onnxruntime is never needed to read weights.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Tuple

import numpy as np

from edgeglass_jax.weights.hf import WeightsError


@dataclasses.dataclass(frozen=True)
class Node:
  name: str
  op_type: str
  inputs: Tuple[str, ...]
  outputs: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OnnxWeights:
  """The weights and graph structure of one ONNX file.

  `tensors`: every initializer by its graph name; `nodes`: the graph's nodes in file order;
  `constants`: output name -> value of each `Constant` node that holds a tensor; `opset`: the
  default-domain opset; `producer`: e.g. "pytorch 2.7.0".
  """
  path: str
  tensors: Dict[str, np.ndarray]
  nodes: Tuple[Node, ...]
  constants: Dict[str, np.ndarray]
  opset: int
  producer: str

  def node(self, name: str) -> Node:
    for n in self.nodes:
      if n.name == name:
        return n
    raise WeightsError(f"{self.path}: no node named {name!r}")

  def initializer_inputs(self, node: Node) -> List[str]:
    """Names of the initializers that `node` reads, in input order."""
    return [i for i in node.inputs if i in self.tensors]


def _check_complete(model, path: str):
  """A protobuf that parses may still be an empty or cut-off file: every node input must exist."""
  graph = model.graph
  if model.ir_version <= 0 or not graph.node:
    raise WeightsError(f"{path}: not an ONNX model (no IR version or no graph nodes)")
  known = {""} | {t.name for t in graph.initializer} | {i.name for i in graph.input}
  for node in graph.node:
    known.update(node.output)
  for node in graph.node:
    for name in node.input:
      if name not in known:
        raise WeightsError(f"{path}: node {node.name!r} reads {name!r}, which nothing defines "
                           "(truncated or damaged file?)")


def read_onnx(path: str) -> OnnxWeights:
  """Reads an ONNX file's initializers and graph; external data files are read from its folder.

  Raises `WeightsError` naming the file when it is missing, not ONNX, truncated, or holds a
  tensor that cannot be decoded.
  """
  import onnx
  from onnx import numpy_helper
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such ONNX file")
  try:
    model = onnx.load(path, load_external_data=True)
  except Exception as e:  # protobuf DecodeError, missing external data, ...
    raise WeightsError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from e
  _check_complete(model, path)
  tensors: Dict[str, np.ndarray] = {}
  for init in model.graph.initializer:
    try:
      tensors[init.name] = numpy_helper.to_array(init, base_dir=os.path.dirname(path))
    except Exception as e:
      raise WeightsError(f"{path}: initializer {init.name!r} cannot be decoded "
                         f"({type(e).__name__}: {e})") from e
  constants: Dict[str, np.ndarray] = {}
  nodes = []
  for n in model.graph.node:
    nodes.append(Node(n.name, n.op_type, tuple(n.input), tuple(n.output)))
    if n.op_type == "Constant":
      for attr in n.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
          constants[n.output[0]] = numpy_helper.to_array(attr.t)
  opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
  producer = f"{model.producer_name} {model.producer_version}".strip()
  return OnnxWeights(path=path, tensors=tensors, nodes=tuple(nodes), constants=constants,
                     opset=int(opset), producer=producer)
