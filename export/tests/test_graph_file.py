"""Segment graphs on disk: large initializers in a page-aligned weights file beside the graph, which
ONNX Runtime reads (and maps) by path with the same results as the graph held in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from onnx_steer_export.export.graph_file import EXTERNAL_BYTES, PAGE_BYTES, save_graph, weights_file


def two_matmuls(rng: np.random.Generator) -> onnx.ModelProto:
    big_a = rng.standard_normal((64, 64)).astype(np.float32)  # 16 KiB: external
    big_b = rng.standard_normal((64, 48)).astype(np.float32)  # 12 KiB: external, after a gap
    bias = rng.standard_normal(48).astype(np.float32)  # 192 bytes: stays in the graph
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["hb"]),
         helper.make_node("Add", ["hb", "bias"], ["y"])],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])],
        [numpy_helper.from_array(big_a, "a"), numpy_helper.from_array(big_b, "b"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_large_weights_go_page_aligned_to_the_weights_file_and_run_alike(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = two_matmuls(rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    path = tmp_path / "layer_00.onnx"
    assert save_graph(model, path) == weights_file(path.name) == "layer_00.onnx.data"
    graph = onnx.load(str(path), load_external_data=False).graph
    external = {t.name: ExternalDataInfo(t) for t in graph.initializer if uses_external_data(t)}
    assert sorted(external) == ["a", "b"], "the 192-byte bias stays in the graph"
    assert all((info.offset or 0) % PAGE_BYTES == 0 for info in external.values())
    assert all((info.length or 0) >= EXTERNAL_BYTES for info in external.values())
    assert path.with_name("layer_00.onnx.data").stat().st_mode & 0o777 == path.stat().st_mode & 0o777

    actual = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(actual[0], expected[0])

    # Written again (an export over an old bundle), the weights file is rewritten, not appended to.
    size = path.with_name("layer_00.onnx.data").stat().st_size
    assert save_graph(two_matmuls(np.random.default_rng(0)), path) == "layer_00.onnx.data"
    assert path.with_name("layer_00.onnx.data").stat().st_size == size


def test_a_graph_of_small_tensors_has_no_weights_file(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.ones(4, np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "norm.onnx"
    assert save_graph(model, path) is None
    assert not path.with_name("norm.onnx.data").exists()
