"""Graph passes of the exporter on small inline graphs: results through ONNX Runtime must not change."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_steer_export.export.graph_passes import copy_dims_in_reshapes, merge_sibling_matmuls


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


def traced_reshape(order: tuple[int, int]) -> onnx.ModelProto:
    """x [batch, seq, 6] reshaped to [dim order[0], dim order[1], -1, 2] of x's shape, built the way
    the tracer builds `x.view(...)`: Shape → Gather → Unsqueeze → Concat."""
    consts = [numpy_helper.from_array(np.array(i, dtype=np.int64), f"i{i}") for i in (0, 1)]
    consts += [numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
               numpy_helper.from_array(np.array([-1, 2], dtype=np.int64), "tail")]
    nodes = [helper.make_node("Shape", ["x"], ["shape"])]
    for slot, index in enumerate(order):
        nodes.append(helper.make_node("Gather", ["shape", f"i{index}"], [f"g{slot}"], axis=0))
        nodes.append(helper.make_node("Unsqueeze", [f"g{slot}", "axis0"], [f"u{slot}"]))
    nodes.append(helper.make_node("Concat", ["u0", "u1", "tail"], ["target"], axis=0))
    nodes.append(helper.make_node("Reshape", ["x", "target"], ["y"], name="view"))
    graph = helper.make_graph(nodes, "view", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_traced_reshape_targets_become_constant_copies() -> None:
    model = traced_reshape((0, 1))
    assert copy_dims_in_reshapes(model) == 1
    assert [node.op_type for node in model.graph.node] == ["Reshape"]
    target = next(init for init in model.graph.initializer if init.name == model.graph.node[0].input[1])
    assert numpy_helper.to_array(target).tolist() == [0, 0, -1, 2]
    for shape in ((1, 1, 6), (3, 5, 6)):
        x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        np.testing.assert_array_equal(run(model, {"x": x})[0], x.reshape(shape[0], shape[1], 3, 2))


def test_reshape_that_moves_dims_is_left_alone() -> None:
    model = traced_reshape((1, 0))  # [seq, batch, ...]: a copy of dim 0 would be wrong
    assert copy_dims_in_reshapes(model) == 0
    x = np.arange(2 * 3 * 6, dtype=np.float32).reshape(2, 3, 6)
    np.testing.assert_array_equal(run(model, {"x": x})[0], x.reshape(3, 2, 3, 2))
