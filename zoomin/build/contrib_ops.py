"""onnxscript ops for ONNX Runtime's com.microsoft contrib operators, for torch.onnx custom translation tables.

onnx ships no schema for the contrib ops, and the exporter's graph builder needs one to know an op's inputs,
outputs and attributes; each export that emits a contrib op (the vision tower's MultiHeadAttention, the decoder's
GroupQueryAttention) declares a minimal schema here instead of hand-writing nodes after the export.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import onnx
import onnxscript

AttrType = onnx.defs.OpSchema.AttrType
FLOAT_TYPES = ["tensor(float)", "tensor(float16)"]


def contrib_op(name: str, inputs: Sequence[str], attributes: Mapping[str, AttrType], *,
               outputs: Sequence[str] = ("output",), int32_inputs: Collection[str] = ()) -> onnxscript.values.Op:
    """An onnxscript op for ONNX Runtime's com.microsoft `name`: float inputs and outputs (type T), except
    `int32_inputs` (lengths, type M); every listed attribute is required (the caller always sets it)."""
    schema = onnx.defs.OpSchema(
        name, "com.microsoft", 1,
        inputs=[onnx.defs.OpSchema.FormalParameter(i, "M" if i in int32_inputs else "T") for i in inputs],
        outputs=[onnx.defs.OpSchema.FormalParameter(o, "T") for o in outputs],
        type_constraints=[("T", FLOAT_TYPES, ""), *([("M", ["tensor(int32)"], "")] if int32_inputs else [])],
        attributes=[onnx.defs.OpSchema.Attribute(a, t, "", required=True) for a, t in attributes.items()])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), name, schema)
