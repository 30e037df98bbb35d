"""The bandwidth floor of a decode step: every decoder weight (lm_head included) and the KV cache read once.

One decode step multiplies a single token through every layer, so it is bound by how fast the weights stream
from memory, not by arithmetic: floor ms/token = bytes touched per token / measured bandwidth. The fraction of
the floor achieved says how much of the step is overhead rather than unavoidable data movement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def initializer_bytes(model_path: str | Path) -> int:
    """Bytes of all initializers of an ONNX graph (external data included) without loading the weights."""
    import onnx
    from onnx import TensorProto, helper

    four_bit = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}
    model = onnx.load(str(model_path), load_external_data=False)
    total = 0
    for graph in _graphs(model.graph):
        for t in graph.initializer:
            external = {e.key: e.value for e in t.external_data}
            if "length" in external:
                total += int(external["length"])
            elif t.raw_data:
                total += len(t.raw_data)
            else:
                dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
                item = 0.5 if t.data_type in four_bit else np.dtype(dtype).itemsize
                total += int(np.ceil(int(np.prod(t.dims, dtype=np.int64)) * item))
    return total


def _graphs(graph):
    """A graph and every subgraph (If/Loop bodies) under it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def engine_decode_weight_bytes(engine_dir: str | Path) -> int:
    """Decoder graph weights plus one embedding row (the token's own, gathered from the memory-mapped table, dense
    or block-quantized)."""
    from ..runtime.embedding import DenseTable, block_row_bytes
    from ..runtime.manifest import Manifest

    root = Path(engine_dir)
    manifest = Manifest.load(root, verify="none")
    if manifest.embedding.format == "dense":
        row = DenseTable.load(root / manifest.graphs["embed_tokens"]).row_bytes
    else:
        row = block_row_bytes(manifest.embedding, manifest.config.text.hidden_size)
    return initializer_bytes(root / manifest.graphs["decoder"]) + row


def mean_decode_context(tokens: dict[str, int]) -> float:
    """Average number of cached positions a decode step attends to over both queries' decode steps."""
    contexts = []
    for prompt, generated in ((tokens["stage1_prompt"], tokens["stage1_generated"]),
                              (tokens["stage2_prompt"], tokens["stage2_generated"])):
        contexts.extend(range(prompt + 1, prompt + generated))  # step k attends to the prompt and k answer tokens
    return float(np.mean(contexts)) if contexts else 0.0


def decode_floor(weight_bytes: int, kv_bytes_per_position: int, context: float, bandwidth: float,
                 achieved_ms: float) -> dict:
    """Floor ms/token from bytes touched per token and the machine's bandwidth; fraction = floor / achieved."""
    touched = weight_bytes + kv_bytes_per_position * context
    floor_ms = 1e3 * touched / bandwidth
    return {"weight_bytes": int(weight_bytes), "kv_bytes": float(kv_bytes_per_position * context),
            "bytes_per_token": float(touched), "bandwidth_bytes_per_s": float(bandwidth),
            "floor_ms_per_token": floor_ms, "achieved_ms_per_token": achieved_ms,
            "fraction_of_floor": floor_ms / achieved_ms if achieved_ms > 0 else float("nan")}
