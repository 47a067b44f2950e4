"""Graph passes run on every exported graph after onnxslim: sibling MatMuls merge into one, and
run-time Reshape targets become constants where they copy dims. In a decode step every tiny node
costs about as much as a small matrix product."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def symbolic_dims(model: onnx.ModelProto) -> dict[str, list[str | int | None]]:
    """Every tensor's shape as symbols (batch, seq, ...) or sizes, from ONNX Runtime's symbolic inference."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    dims: dict[str, list[str | int | None]] = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shape = info.type.tensor_type.shape
        dims[info.name] = [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value")
                           else None for d in shape.dim]
    return dims


def copy_dims_in_reshapes(model: onnx.ModelProto) -> int:
    """Give Reshapes a constant target shape where the tracer built it at run time.

    `x.view(batch, tokens, -1, d)` traces to Shape → Gather → Unsqueeze → Concat → Reshape, a chain
    of tiny nodes run at every step. Where a traced size is the same symbolic dim as the Reshape
    input's dim at that position, ONNX's 0 ("copy that dim") says the same; when every entry of the
    target is a constant or such a copy, the target becomes an initializer and the chain dies.
    Returns how many Reshapes were rewritten."""
    graph = model.graph
    dims = symbolic_dims(model)
    producer = {output: node for node in graph.node for output in node.output}
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    constants.update({node.output[0]: numpy_helper.to_array(node.attribute[0].t)
                      for node in graph.node if node.op_type == "Constant" and node.attribute[0].name == "value"})

    def traced_dim(name: str) -> str | None:
        """The symbol of `Unsqueeze(Gather(Shape(x), i))`, if `name` is that."""
        unsqueeze = producer.get(name)
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
            return None
        gather = producer.get(unsqueeze.input[0])
        if gather is None or gather.op_type != "Gather":
            return None
        shape = producer.get(gather.input[0])
        if shape is None or shape.op_type != "Shape":
            return None
        index = constants.get(gather.input[1])
        if index is None or index.ndim != 0 or shape.attribute:
            return None
        source = dims.get(shape.input[0], [])
        symbol = source[int(index)] if -len(source) <= int(index) < len(source) else None
        return symbol if isinstance(symbol, str) else None

    rewritten = 0
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        concat = producer.get(node.input[1])
        if concat is None or concat.op_type != "Concat":
            continue
        data = dims.get(node.input[0])
        if data is None or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        target: list[int] = []
        for part in concat.input:
            if part in constants:
                target += [int(v) for v in np.atleast_1d(constants[part])]
            elif len(target) < len(data) and traced_dim(part) is not None and traced_dim(part) == data[len(target)]:
                target.append(0)
            else:
                break
        else:
            if target.count(-1) <= 1:
                name = f"{node.name or node.output[0]}/target"
                graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
                node.input[1] = name
                rewritten += 1
    drop_dead_nodes(graph)
    return rewritten


def drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers no graph output depends on."""
    needed = {output.name for output in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(output in needed for output in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    for init in [init for init in graph.initializer if init.name not in needed]:
        graph.initializer.remove(init)


def merge_sibling_matmuls(model: onnx.ModelProto) -> int:
    """Fuse MatMuls that read the same activation with constant weights (q/k/v, gate/up) into one
    MatMul over the concatenated weights and a Split: at decode one wide matrix-vector product
    streams the weights faster than three narrow ones. Returns how many MatMuls were merged."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    siblings: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2:
            siblings[node.input[0]].append(node)
    merged = 0
    for source, nodes in siblings.items():
        weights = [numpy_helper.to_array(initializers[node.input[1]]) for node in nodes]
        if len(nodes) < 2 or len({(w.shape[0], w.dtype) for w in weights}) != 1:
            continue
        name = f"{nodes[0].name or nodes[0].output[0]}/merged"
        stacked = numpy_helper.from_array(np.concatenate(weights, axis=1), f"{name}/weight")
        widths = numpy_helper.from_array(np.array([w.shape[1] for w in weights], dtype=np.int64), f"{name}/widths")
        graph.initializer.extend([stacked, widths])
        # The first sibling's slot keeps the order topological: its input exists there, and every
        # consumer of a sibling's output comes after that sibling.
        slot = list(graph.node).index(nodes[0])
        for node in nodes:
            graph.node.remove(node)
        graph.node.insert(slot, onnx.helper.make_node("Split", [f"{name}/out", widths.name],
                                                      [node.output[0] for node in nodes], name=f"{name}/split", axis=-1))
        graph.node.insert(slot, onnx.helper.make_node("MatMul", [source, stacked.name], [f"{name}/out"], name=name))
        merged += len(nodes)
    drop_dead_nodes(graph)
    return merged


def emit_group_query_attention(path: Path) -> int:
    """Turn the tracer's stand-in nodes (`segments.GroupQueryAttentionOp`) into ONNX Runtime's
    com.microsoft GroupQueryAttention, whose empty cos_cache, sin_cache and position_ids inputs sit
    before attention_bias. Rewrites the file in place; returns how many nodes it rewrote."""
    from .segments import STAND_IN_DOMAIN

    model = onnx.load(str(path))
    rewritten = 0
    for node in model.graph.node:
        if node.domain == STAND_IN_DOMAIN and node.op_type == "GroupQueryAttention":
            inputs = list(node.input)
            del node.input[:]
            node.input.extend([*inputs[:7], "", "", "", inputs[7]])
            node.domain = "com.microsoft"
            rewritten += 1
    drop_untyped_value_info(model)
    imports = [op for op in model.opset_import if op.domain != STAND_IN_DOMAIN]
    if rewritten:
        imports.append(onnx.helper.make_opsetid("com.microsoft", 1))
    del model.opset_import[:]
    model.opset_import.extend(imports)
    onnx.save_model(model, str(path))
    return rewritten


def drop_untyped_value_info(model: onnx.ModelProto) -> None:
    """Forget inferred types left unknown (element type 0), which ONNX Runtime refuses: the tracer and
    onnx's shape inference cannot type a contrib op's outputs."""
    for info in [info for info in model.graph.value_info if not info.type.tensor_type.elem_type]:
        model.graph.value_info.remove(info)
