"""The ONNX weight reader on a small hand-built graph: initializers, nodes, constants, errors."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeglass_jax.weights import WeightsError  # noqa: E402
from edgeglass_jax.weights import onnx as onnx_reader  # noqa: E402

W = np.arange(12, dtype=np.float32).reshape(3, 4)
B = np.array([0.5, -1.0, 2.0, 0.25], np.float32)


def _model_bytes() -> bytes:
  """y = x @ W + b under exporter-style names: W unnamed, b named, a Constant shape node."""
  nodes = [
      helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["/lin/MatMul_output_0"],
                       name="/lin/MatMul"),
      helper.make_node("Add", ["lin.bias", "/lin/MatMul_output_0"], ["/lin/Add_output_0"],
                       name="/lin/Add"),
      helper.make_node("Constant", [], ["/Constant_output_0"], name="/Constant",
                       value=numpy_helper.from_array(np.array([-1, 2, 2], np.int64))),
      helper.make_node("Reshape", ["/lin/Add_output_0", "/Constant_output_0"], ["y"],
                       name="/Reshape"),
  ]
  graph = helper.make_graph(
      nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
      initializer=[numpy_helper.from_array(W, "onnx::MatMul_7"),
                   numpy_helper.from_array(B, "lin.bias")])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)],
                            producer_name="pytorch", producer_version="2.7.0")
  return model.SerializeToString()


@pytest.fixture
def model_file(tmp_path):
  path = tmp_path / "tiny.onnx"
  path.write_bytes(_model_bytes())
  return str(path)


def test_reads_initializers_nodes_and_constants(model_file):
  w = onnx_reader.read_onnx(model_file)
  assert set(w.tensors) == {"onnx::MatMul_7", "lin.bias"}
  np.testing.assert_array_equal(w.tensors["onnx::MatMul_7"], W)
  np.testing.assert_array_equal(w.tensors["lin.bias"], B)
  assert [n.name for n in w.nodes] == ["/lin/MatMul", "/lin/Add", "/Constant", "/Reshape"]
  assert w.initializer_inputs(w.node("/lin/MatMul")) == ["onnx::MatMul_7"]
  assert w.initializer_inputs(w.node("/Reshape")) == []
  np.testing.assert_array_equal(w.constants["/Constant_output_0"], [-1, 2, 2])
  assert (w.opset, w.producer) == (14, "pytorch 2.7.0")
  with pytest.raises(WeightsError, match="no node named '/nothing'"):
    w.node("/nothing")


def test_missing_file_is_named(tmp_path):
  path = str(tmp_path / "absent.onnx")
  with pytest.raises(WeightsError, match=f"{path}: no such ONNX file"):
    onnx_reader.read_onnx(path)


@pytest.mark.parametrize("content", [b"", b"{\"model_type\": \"dinov2\"}\n",
                                     bytes(range(256)) * 4])
def test_non_onnx_file_is_named(tmp_path, content):
  path = tmp_path / "fake.onnx"
  path.write_bytes(content)
  with pytest.raises(WeightsError, match=str(path)):
    onnx_reader.read_onnx(str(path))


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_file_is_named(tmp_path, fraction):
  data = _model_bytes()
  path = tmp_path / "cut.onnx"
  path.write_bytes(data[:int(len(data) * fraction)])
  with pytest.raises(WeightsError, match=str(path)):
    onnx_reader.read_onnx(str(path))
