"""The token embedding table of quantized engines: block codes shared with the lm_head or of its own, gathered by
ONNX Runtime's GatherBlockQuantized, and the manifest entry that tells the runtime which table it has.

The contract under test: an embedding row is the lm_head's MatMulNBits row dequantized, bit for bit — checked
against ONNX Runtime's own MatMulNBits on an identity input (accuracy_level 0: exact float32 products), not only
against our formula.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from zoomin.build.embedding_table import GATHER_FILE, quantize_table, share_lm_head
from zoomin.build.quantize import (
    BlockCodes,
    _save,
    gptq_codes,
    hessian_factor,
    matmulnbits_node,
    replace_with_matmulnbits,
    rtn_codes,
)
from zoomin.runtime.embedding import BlockQuantizedTable, DenseTable, load_table
from zoomin.runtime.manifest import FORMAT_VERSION, EngineError, Manifest, TableSpec

VOCAB = 640  # the random checkpoints' vocabulary: every lm_head initializer goes to external data


def _model(nodes, inits, k: int, n: int):
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                   [None, k])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, n])],
                                   initializer=inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                        onnx.helper.make_opsetid("com.microsoft", 1)])


def ort_dequantized(q: BlockCodes) -> np.ndarray:
    """W (K, N) as ONNX Runtime's MatMulNBits computes it: the product with the identity, float32 path."""
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="head")
    new, inits = matmulnbits_node(node, q)
    new.attribute.append(onnx.helper.make_attribute("accuracy_level", 0))
    session = ort.InferenceSession(_model([new], inits, q.k, len(q.codes)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(q.k, dtype=np.float32)})[0]


@pytest.mark.parametrize("k,block", [(96, 32), (80, 32), (128, 64)])
def test_rtn_codes_are_gptq_without_feedback(k, block):
    """One round-to-nearest for the lm_head / table and GPTQ's identity-Hessian case (same scales, zeros, codes)."""
    w = np.random.default_rng(k).standard_normal((k, 24)).astype(np.float32)
    ref = BlockCodes.from_columns(*gptq_codes(w, hessian_factor(np.eye(k)), block), block)
    got = rtn_codes(w.T, block, 4, chunk=7)  # several chunks, the last one short
    np.testing.assert_array_equal(got.scales, ref.scales)
    np.testing.assert_array_equal(got.zeros, ref.zeros)
    np.testing.assert_array_equal(got.codes.reshape(24, -1)[:, :k], ref.codes.reshape(24, -1)[:, :k])
    assert np.abs(got.dequantize() - w).max() <= got.scales.max() / 2 * (1 + 1e-6)


# (hidden, block, bits): full blocks, an odd number of blocks (zero-point nibble padding), a padded last block
# (the gather graph's Slice), 8-bit codes.
SHAPES = [(128, 32, 4), (96, 32, 4), (80, 32, 4), (128, 64, 8)]


@pytest.mark.parametrize("hidden,block,bits", SHAPES)
def test_shared_table_rows_are_the_lm_head_rows_bit_exactly(tmp_path, hidden, block, bits):
    rng = np.random.default_rng(hidden + bits)
    weight = (rng.standard_normal((hidden, VOCAB)) * 0.05).astype(np.float32)  # lm_head MatMul weight (K, N)
    head = onnx.helper.make_node("MatMul", ["x", "lm_head.weight"], ["y"], name="lm_head")
    model = _model([head], [onnx.numpy_helper.from_array(weight, "lm_head.weight")], hidden, VOCAB)
    q = rtn_codes(weight.T, block, bits)
    replace_with_matmulnbits(model, "lm_head", q)
    assert [t.name for t in model.graph.initializer] == [f"lm_head.weight_Q{bits}", f"lm_head.weight_Q{bits}_scales",
                                                         f"lm_head.weight_Q{bits}_zero_points"]
    _save(model, tmp_path / "decoder.onnx")

    spec = share_lm_head(tmp_path, "decoder.onnx", VOCAB, hidden)
    assert (spec.format, spec.bits, spec.block_size, spec.data, spec.shared_with) == \
        ("block_quantized", bits, block, "decoder.onnx.data", "lm_head")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data", GATHER_FILE]
    assert (tmp_path / GATHER_FILE).stat().st_size < 2048  # references the decoder's bytes, holds none

    table = load_table(tmp_path, GATHER_FILE, spec, (VOCAB, hidden))
    rows = table.lookup(np.arange(VOCAB))
    np.testing.assert_array_equal(rows, ort_dequantized(q).T)  # == ONNX Runtime's MatMulNBits, bit for bit
    np.testing.assert_array_equal(rows, q.dequantize().T)
    ids = np.array([7, 0, VOCAB - 1, 7])
    np.testing.assert_array_equal(table.lookup(ids), rows[ids])
    assert table.lookup(ids[:1]).shape == (1, hidden)
    # the decoder still runs on the shared bytes (ONNX Runtime maps the data file for both sessions)
    x = rng.standard_normal((3, hidden)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ q.dequantize(), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_parts(tiny_ckpt):
    from zoomin.build.weights import CheckpointParts

    parts = CheckpointParts(tiny_ckpt)
    table = np.concatenate([c.float().numpy() for c in parts.embedding_rows(8192)])
    return parts, table


# Relative row error ||e_q - e|| / ||e|| of the tiny checkpoint's (random normal) table; measured mean/max:
# 4-bit block 32: 0.081 / 0.099; 8-bit block 128: 0.0059 / 0.0081. Bounds ~1.25x.
TABLE_BOUNDS = {(4, 32): (0.1, 0.125), (8, 128): (0.0075, 0.0105)}


@pytest.mark.parametrize("bits,block", list(TABLE_BOUNDS))
def test_untied_table_has_its_own_codes(tiny_parts, tmp_path, bits, block):
    parts, table = tiny_parts
    assert not parts.text.tie_word_embeddings
    spec = quantize_table(parts, tmp_path, bits, block)
    assert (spec.data, spec.shared_with) == (GATHER_FILE + ".data", None)
    got = load_table(tmp_path, GATHER_FILE, spec, table.shape).lookup(np.arange(len(table)))
    np.testing.assert_array_equal(got, rtn_codes(table, block, bits).dequantize().T)
    norm = np.linalg.norm(table, axis=1)
    np.testing.assert_array_equal(got[norm == 0], 0.0)  # all-zero rows (unused ids) stay exactly zero
    err = np.linalg.norm(got - table, axis=1)[norm > 0] / norm[norm > 0]
    mean_bound, max_bound = TABLE_BOUNDS[(bits, block)]
    assert err.mean() < mean_bound and err.max() < max_bound, (err.mean(), err.max())
    size = (tmp_path / spec.data).stat().st_size
    assert size == len(table) * (table.shape[1] * bits // 8 + (table.shape[1] // block) * (4 + bits / 8))


def test_lookup_refuses_out_of_range_ids(tiny_parts, tmp_path):
    parts, table = tiny_parts
    spec = quantize_table(parts, tmp_path, 4, 32)
    quantized = load_table(tmp_path, GATHER_FILE, spec, table.shape)
    assert isinstance(quantized, BlockQuantizedTable) and quantized.row_bytes == 64 + 4 * 4 + 2
    with pytest.raises(IndexError, match=r"\[0, 640\)"):
        quantized.lookup(np.array([3, len(table)]))
    dense = DenseTable(table)
    assert dense.row_bytes == 4 * table.shape[1]
    np.testing.assert_array_equal(dense.lookup(np.array([5, 2])), table[[5, 2]])


def test_table_shape_must_match_the_config(tiny_parts, tmp_path):
    _, table = tiny_parts
    np.save(tmp_path / "embed_tokens.npy", table)
    with pytest.raises(EngineError, match="embed_tokens.npy: table is"):
        load_table(tmp_path, "embed_tokens.npy", TableSpec("dense"), (table.shape[0], table.shape[1] + 1))
    (tmp_path / GATHER_FILE).write_bytes(b"not a graph")
    with pytest.raises(EngineError, match="cannot load the embedding table"):
        load_table(tmp_path, GATHER_FILE, TableSpec("block_quantized", bits=4, block_size=32), table.shape)


def test_manifest_refuses_an_unknown_table_format_in_one_line(tiny_engine, tmp_path):
    import shutil

    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    m = Manifest.load(copy)
    assert m.format_version == FORMAT_VERSION >= 3  # 3: the manifest describes the table
    assert m.embedding == TableSpec("dense", dtype="float32") and m.graphs["embed_tokens"] == "embed_tokens.npy"
    stored = json.loads((copy / "manifest.json").read_text())
    for entry, shown in (({**stored["embedding"], "format": "sparse-int3"}, "'sparse-int3'"), (None, "None")):
        (copy / "manifest.json").write_text(json.dumps({**stored, "embedding": entry}))
        with pytest.raises(EngineError) as info:
            Manifest.load(copy)
        message = str(info.value)
        assert f"embedding table format {shown} is not one this runtime reads" in message and "\n" not in message
