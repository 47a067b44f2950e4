"""Graph passes of the exporter on small inline graphs: results through ONNX Runtime must not change."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_steer_export.bundle import merge_sibling_matmuls


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_sibling_matmuls_merge_into_one_without_changing_results() -> None:
    rng = np.random.default_rng(0)
    widths = {"q": 6, "k": 2, "v": 2}
    weights = {name: rng.standard_normal((4, width)).astype(np.float32) for name, width in widths.items()}
    other = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", f"w_{name}"], [name], name=f"proj_{name}") for name in widths]
    nodes.append(helper.make_node("Relu", ["x"], ["x_relu"]))
    nodes.append(helper.make_node("MatMul", ["x_relu", "w_other"], ["o"], name="proj_other"))
    graph = helper.make_graph(
        nodes, "siblings", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, None]) for name in (*widths, "o")],
        [numpy_helper.from_array(w, f"w_{name}") for name, w in weights.items()]
        + [numpy_helper.from_array(other, "w_other")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    x = rng.standard_normal((2, 4)).astype(np.float32)
    before = run(model, {"x": x})

    assert merge_sibling_matmuls(model) == 3
    onnx.checker.check_model(model)
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    assert len(matmuls) == 2, "q, k and v share one MatMul; the lone MatMul stays"
    assert {init.name for init in model.graph.initializer}.isdisjoint({"w_q", "w_k", "w_v"})
    for got, want in zip(run(model, {"x": x}), before):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
