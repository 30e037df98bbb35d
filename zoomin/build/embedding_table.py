"""The engine's token embedding table (zoomin.runtime.embedding reads it; the manifest's TableSpec describes it).

  fp32 / fp16 / fp8 engines: a dense .npy (`write_embedding`), fp16 in fp16 and fp8 engines.
  int4, tied embeddings (3B): no table of its own (`share_lm_head`). The lm_head is MatMulNBits, whose B is laid
        out one row per vocabulary entry, blocks along hidden: exactly the table, quantized. A small
        GatherBlockQuantized graph reads those codes, scales and zero points from the decoder's external data
        file at their offsets, so the table is stored once and an embedding row is the dequantized lm_head row
        bit for bit.
  int4, untied (7B), and int8: the table's own 8-bit RTN codes in blocks of 128 (`quantize_table`), in
        embed_tokens.onnx.data, read by the same graph. 8 bits, not 4: an untied table is read a row per token,
        so its size costs disk, not decode bandwidth (+4.6% of a 7B int4 engine), and 4-bit rows move the logits
        measurably (tiny, GPTQ int4: KL 2.6e-4 with fp32 rows, 2.6e-4 with 8-bit rows, 4.1e-4 with 4-bit ones).
        The int8 lm_head is MatMulInteger, whose int8 weights are laid out per hidden channel, not per token, so
        there is no row to share either.

Block codes are `quantize.rtn_codes`: asymmetric, a float32 scale and a zero point per block, so the table and
the lm_head use one quantizer and one dequantization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.embedding import BlockQuantizedTable
from ..runtime.manifest import TableSpec
from .checkpoint import BuildError
from .quantize import rtn_codes

DENSE_FILE = "embed_tokens.npy"
GATHER_FILE = "embed_tokens.onnx"
EMBED_CHUNK_ROWS = 8192
OWN_TABLE_BITS = 8
OWN_TABLE_BLOCK = 128  # 8-bit codes need few scales: a float32 per 128 codes is 3% on top


def write_embedding(model, engine: Path, precision: str) -> str:
    """The token embedding as a .npy the runtime memory-maps and gathers rows from (fp16 for fp16, else fp32).

    A gather needs no graph: numpy indexes a memory-mapped table in microseconds, only the touched rows are paged in
    (a 152k x 3584 table is 2 GB in fp32), and the decoder can take `inputs_embeds` that already hold the image
    features merged in. Written in chunks of rows through a plain file (not a memory map, whose dirty pages would
    count as the build's memory). model: a transformers model or a checkpoint's parts.
    """
    from .weights import as_parts

    parts = as_parts(model)
    t = parts.text
    dtype = np.dtype(np.float16 if precision == "fp16" else np.float32)
    rows = 0
    with open(engine / DENSE_FILE, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                 "shape": (t.vocab_size, t.hidden_size)})
        for chunk in parts.embedding_rows(EMBED_CHUNK_ROWS):
            if chunk.shape[1] != t.hidden_size:
                raise BuildError(f"token embedding is {tuple(chunk.shape)} wide, config says hidden {t.hidden_size}")
            f.write(np.ascontiguousarray(chunk.float().numpy(), dtype).tobytes())
            rows += len(chunk)
    if rows != t.vocab_size:
        raise BuildError(f"token embedding has {rows} rows, config says vocab_size {t.vocab_size}")
    return DENSE_FILE


def quantize_table(model, engine: Path, bits: int, block_size: int) -> TableSpec:
    """The checkpoint's own table as `bits`-bit RTN blocks in embed_tokens.onnx.data (codes, then scales, then zero
    points), quantized and written a chunk of rows at a time, and the gather graph over it."""
    from .weights import as_parts

    parts = as_parts(model)
    t = parts.text
    data = GATHER_FILE + ".data"
    scales, zeros, rows = [], [], 0
    with open(engine / data, "wb") as f:
        for chunk in parts.embedding_rows(EMBED_CHUNK_ROWS):
            if chunk.shape[1] != t.hidden_size:
                raise BuildError(f"token embedding is {tuple(chunk.shape)} wide, config says hidden {t.hidden_size}")
            q = rtn_codes(chunk.float().numpy(), block_size, bits)
            f.write(q.packed().tobytes())
            scales.append(q.scales)
            zeros.append(q.packed_zeros())
            rows += len(chunk)
        if rows != t.vocab_size:
            raise BuildError(f"token embedding has {rows} rows, config says vocab_size {t.vocab_size}")
        codes_end = f.tell()
        f.write(np.concatenate(scales).tobytes())
        scales_end = f.tell()
        f.write(np.concatenate(zeros).tobytes())
        end = f.tell()
    spans = {"codes": (0, codes_end), "scales": (codes_end, scales_end - codes_end),
             "zero_points": (scales_end, end - scales_end)}
    write_gather_graph(engine / GATHER_FILE, data, spans, t.vocab_size, t.hidden_size, bits, block_size)
    return TableSpec("block_quantized", bits=bits, block_size=block_size, data=data)


def share_lm_head(engine: Path, decoder: str, vocab: int, hidden: int) -> TableSpec:
    """The gather graph over the lm_head MatMulNBits initializers of `decoder` (tied embeddings: no own table)."""
    import onnx

    path = engine / decoder
    model = onnx.load(str(path), load_external_data=False)
    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits"
             and {a.name: a.i for a in n.attribute}.get("N") == vocab]
    if len(heads) != 1:
        raise BuildError(f"{path}: expected one MatMulNBits lm_head with N = {vocab}, found {len(heads)}")
    head = heads[0]
    attrs = {a.name: a.i for a in head.attribute}
    if attrs["K"] != hidden or len(head.input) < 4 or not head.input[3]:
        raise BuildError(f"{path}: lm_head {head.name} is not a K = {hidden} MatMulNBits with zero points")
    inits = {t.name: t for t in model.graph.initializer}
    spans, files = {}, set()
    for role, name in zip(("codes", "scales", "zero_points"), head.input[1:4]):
        tensor = inits.get(name)
        if tensor is None or tensor.data_location != onnx.TensorProto.EXTERNAL:
            raise BuildError(f"{path}: lm_head initializer {name} is not in an external data file")
        info = {e.key: e.value for e in tensor.external_data}
        files.add(info["location"])
        length = int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        spans[role] = (int(info.get("offset", 0)), length)
    if len(files) != 1:
        raise BuildError(f"{path}: lm_head initializers are spread over {sorted(files)}")
    data = files.pop()
    write_gather_graph(engine / GATHER_FILE, data, spans, vocab, hidden, attrs["bits"], attrs["block_size"])
    return TableSpec("block_quantized", bits=attrs["bits"], block_size=attrs["block_size"], data=data,
                     shared_with="lm_head")


def write_gather_graph(path: Path, data: str, spans: dict[str, tuple[int, int]], vocab: int, hidden: int, bits: int,
                       block_size: int) -> None:
    """input_ids (n,) int64 -> embeds (n, hidden) float32: GatherBlockQuantized over codes (vocab, padded hidden
    * bits / 8) uint8, scales (vocab, blocks) float32 and packed zero points in `data` at `spans` (offset, bytes);
    a Slice drops the padding of a last partial block."""
    import onnx
    from onnx import TensorProto, helper

    blocks = -(-hidden // block_size)
    padded = blocks * block_size
    shapes = {"codes": ([vocab, padded * bits // 8], TensorProto.UINT8),
              "scales": ([vocab, blocks], TensorProto.FLOAT),
              "zero_points": ([vocab, -(-blocks * bits // 8)], TensorProto.UINT8)}
    inits = []
    for role, (dims, dtype) in shapes.items():
        offset, length = spans[role]
        expected = int(np.prod(dims)) * (4 if dtype == TensorProto.FLOAT else 1)
        if length != expected:
            raise BuildError(f"{path}: {role} of the embedding table are {length} bytes, expected {expected}")
        tensor = TensorProto(name=role, data_type=dtype, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", data), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        inits.append(tensor)
    ids, out = BlockQuantizedTable.INPUT, BlockQuantizedTable.OUTPUT
    gathered = out if padded == hidden else "padded"
    nodes = [helper.make_node("GatherBlockQuantized", ["codes", ids, "scales", "zero_points"], [gathered],
                              domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block_size,
                              bits=bits)]
    if padded != hidden:
        inits += [onnx.numpy_helper.from_array(np.array(v, np.int64), n)
                  for n, v in (("start", [0]), ("stop", [hidden]), ("axis", [1]))]
        nodes.append(helper.make_node("Slice", [gathered, "start", "stop", "axis"], [out]))
    graph = helper.make_graph(nodes, "embed_tokens", [helper.make_tensor_value_info(ids, TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", hidden])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save_model(model, str(path))


def engine_table(precision: str, model, engine: Path, decoder: str) -> tuple[str, TableSpec]:
    """Write the table of a `precision` engine (after its decoder, which a tied int4 table reads); returns the
    graphs["embed_tokens"] file and its spec."""
    from .weights import as_parts

    t = as_parts(model).text
    if precision == "int4" and t.tie_word_embeddings:
        return GATHER_FILE, share_lm_head(engine, decoder, t.vocab_size, t.hidden_size)
    if precision in ("int4", "int8"):
        return GATHER_FILE, quantize_table(model, engine, OWN_TABLE_BITS, OWN_TABLE_BLOCK)
    dtype = "float16" if precision in ("fp16", "fp8") else "float32"
    return write_embedding(model, engine, "fp16" if dtype == "float16" else "fp32"), TableSpec("dense", dtype)
