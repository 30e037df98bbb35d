"""Vision encoder: the host plan vs transformers' own helpers, and the exported stage graphs vs `model.visual`."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from zoomin.build.export_vision import VisionGraph, export_vision, random_pixels, vision_parity
from zoomin.runtime.config import VisionConfig, vision_config
from zoomin.runtime.vision import STAGE_INPUTS, VisionEncoder, stage_files
from zoomin.runtime.vision_meta import (
    CHUNK_ROWS,
    VisionInputError,
    rotary_tables,
    vision_plan,
    window_index,
)

# (t, h, w) patch grids. Windows are 8x8 patches: 8x10 and 16x6 and 12x12 all end in partial windows (the last
# column and/or row of windows is cut off), 16x16 tiles exactly, 2x8x8 is a two-frame grid.
GRIDS = [[(1, 8, 10)], [(1, 16, 6)], [(1, 12, 12)], [(1, 16, 16)]]
MULTI = [[(1, 8, 10), (1, 16, 6)], [(1, 12, 18), (1, 4, 4), (2, 8, 8)]]
META_GRIDS = [g for grids in GRIDS + MULTI for g in grids] + [(1, 2, 2), (3, 18, 34), (1, 32, 2)]

FP32_MAX_REL = 1e-4
# fp16 weights/matmuls against the fp32 reference: measured 3.8e-4 .. 4.8e-4 (max and norm) on both checkpoints;
# ~4x headroom. (A random tower with the real 3B dimensions and 32 blocks measured 1.8e-3: depth adds error.)
FP16_MAX_REL = 2e-3


def cfg_of(model) -> VisionConfig:
    return vision_config(model.config.to_dict())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request, hf_model_factory):
    """(model, vision directory) per (checkpoint, precision), exported once for this module."""
    cache = {}

    def get(ckpt_name: str, precision: str):
        key = (ckpt_name, precision)
        if key not in cache:
            model = hf_model_factory(request.getfixturevalue(f"{ckpt_name}_ckpt"))
            path = tmp_path_factory.mktemp(f"vision_{ckpt_name}_{precision}") / "vision"
            t0 = time.perf_counter()
            export_vision(model, path, precision=precision)
            data = sum(p.stat().st_size for p in path.glob("*.data"))
            print(f"\nexport {ckpt_name} {precision}: {time.perf_counter() - t0:.1f} s, {len(stage_files(path))} "
                  f"stages, {data / 1e6:.2f} MB weights")
            cache[key] = model, path
        return cache[key]

    return get


# --- host plan against transformers' own helpers ----------------------------------------------------------------

@pytest.mark.parametrize("grid", META_GRIDS, ids=str)
def test_window_index_matches_transformers(grid, tiny_ckpt, hf_model_factory):
    cfg = cfg_of(hf_model_factory(tiny_ckpt))
    ours, cu = window_index(np.array([grid]), cfg)
    ref, ref_cu = get_vision_window_index(torch.tensor([grid]), cfg.spatial_merge_size, cfg.window_size,
                                          cfg.patch_size)
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())


def test_window_index_multi_image_matches_transformers(tiny_ckpt, hf_model_factory):
    cfg = cfg_of(hf_model_factory(tiny_ckpt))
    grid = np.array(META_GRIDS)
    ours, cu = window_index(grid, cfg)
    ref, ref_cu = get_vision_window_index(torch.from_numpy(grid), cfg.spatial_merge_size, cfg.window_size,
                                          cfg.patch_size)
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())


@pytest.mark.parametrize("ckpt_name", ["tiny", "small"])
def test_rotary_tables_match_transformers(ckpt_name, request, hf_model_factory):
    model = hf_model_factory(request.getfixturevalue(f"{ckpt_name}_ckpt"))
    visual, grid = model.model.visual, np.array(META_GRIDS)
    positions = get_vision_position_ids(torch.from_numpy(grid), visual.spatial_merge_size)
    ref_cos, ref_sin = visual.rotary_pos_emb(torch.zeros(1), positions)
    cos, sin = rotary_tables(grid, cfg_of(model))
    assert cos.dtype == sin.dtype == np.float32 and cos.shape == tuple(ref_cos.shape)
    np.testing.assert_allclose(cos, ref_cos.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, ref_sin.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 100, CHUNK_ROWS], ids=lambda c: f"chunk{c}")
def test_plan_chunks_are_transformers_windows_and_frames(chunk_rows, tiny_ckpt, hf_model_factory):
    """Every chunk is whole transformers windows of one length, rows in its window order; a frame's chunks cover
    exactly its cu_seqlens segment; chunks stay within chunk_rows unless one window is larger."""
    cfg = cfg_of(hf_model_factory(tiny_ckpt))
    grid = np.array(META_GRIDS)
    unit = cfg.spatial_merge_size**2
    ref_index, ref_cu = get_vision_window_index(torch.from_numpy(grid), cfg.spatial_merge_size, cfg.window_size,
                                                cfg.patch_size)
    patch_order = (ref_index.numpy()[:, None] * unit + np.arange(unit)).ravel()
    windows = {tuple(s) for s in np.split(patch_order, ref_cu.numpy()[1:-1])}
    frame_cu = get_vision_cu_seqlens(torch.from_numpy(grid)).numpy()
    frames = vision_plan(grid, cfg, chunk_rows)
    assert len(frames) == len(frame_cu) - 1
    seen = []
    for frame, start, end in zip(frames, frame_cu[:-1], frame_cu[1:]):
        assert frame.length == end - start
        rows = np.concatenate([c.patches for c in frame.chunks])
        np.testing.assert_array_equal(np.sort(rows), np.arange(start, end))  # each patch of the frame once
        offset = 0
        for chunk in frame.chunks:
            assert chunk.rows == slice(offset, offset + len(chunk.patches))
            offset += len(chunk.patches)
            assert chunk.windows * chunk.window_len == len(chunk.patches) and chunk.window_len % unit == 0
            assert len(chunk.patches) <= chunk_rows or chunk.windows == 1
            for w in chunk.window_rows():
                seen.append(tuple(w))
            np.testing.assert_array_equal(chunk.units, chunk.patches[::unit] // unit)
            assert (chunk.patches.reshape(-1, unit) == chunk.units[:, None] * unit + np.arange(unit)).all()
    assert len(seen) == len(windows) and set(seen) == windows


@pytest.mark.parametrize("bad", [np.zeros((0, 3), int), np.array([[1, 3, 4]]), np.array([[1, 4, 0]]),
                                 np.array([[0, 4, 4]]), np.array([1, 4, 4]), np.array([[1.0, 4, 4]])], ids=str)
def test_bad_grid_is_a_clear_error(bad, tiny_ckpt, hf_model_factory):
    with pytest.raises(VisionInputError, match="grid_thw"):
        vision_plan(bad, cfg_of(hf_model_factory(tiny_ckpt)))


# --- exported graphs against transformers -------------------------------------------------------------------------

@pytest.mark.parametrize("ckpt_name", ["tiny", "small"])
@pytest.mark.parametrize("grids", GRIDS + MULTI, ids=str)
def test_fp32_graph_matches_transformers(grids, ckpt_name, exported):
    model, path = exported(ckpt_name, "fp32")
    parity = vision_parity(model, path, grids)
    print(f"\n{ckpt_name} fp32 {grids}: max rel {parity.max_rel_err:.2e}, norm rel {parity.norm_rel_err:.2e}")
    assert parity.max_rel_err <= FP32_MAX_REL
    assert parity.norm_rel_err <= FP32_MAX_REL


@pytest.mark.parametrize("ckpt_name", ["tiny", "small"])
@pytest.mark.parametrize("grids", [GRIDS[0], GRIDS[2], MULTI[0]], ids=str)
def test_fp16_graph_matches_transformers(grids, ckpt_name, exported):
    model, path = exported(ckpt_name, "fp16")
    parity = vision_parity(model, path, grids)
    print(f"\n{ckpt_name} fp16 {grids}: max rel {parity.max_rel_err:.2e}, norm rel {parity.norm_rel_err:.2e}")
    assert parity.max_rel_err <= FP16_MAX_REL
    assert parity.norm_rel_err <= FP16_MAX_REL


@pytest.mark.parametrize("chunk_rows", [1, 40], ids=lambda c: f"chunk{c}")
def test_small_chunks_match_transformers(chunk_rows, exported):
    """Many chunks per frame (one window per call at chunk 1): full-attention blocks attend over K/V gathered from
    every chunk of the frame, and the merged rows come back in the processor's order."""
    model, path = exported("small", "fp32")
    cfg = cfg_of(model)
    grids = MULTI[1]
    encoder = VisionEncoder(path, cfg, chunk_rows=chunk_rows)
    assert max(len(f.chunks) for f in vision_plan(np.array(grids), cfg, chunk_rows)) >= 4
    parity = vision_parity(model, path, grids, encoder=encoder)
    assert parity.max_rel_err <= FP32_MAX_REL and parity.norm_rel_err <= FP32_MAX_REL


def test_multi_image_call_equals_separate_calls(exported):
    model, path = exported("tiny", "fp32")
    cfg, grids = cfg_of(model), MULTI[1]
    encoder = VisionEncoder(path, cfg)
    pixels = random_pixels(cfg, grids, seed=3)
    together = encoder.encode(pixels, np.array(grids))
    rows = np.cumsum([0] + [t * h * w for t, h, w in grids])
    apart = np.concatenate([encoder.encode(pixels[a:b], np.array([g])) for a, b, g in zip(rows[:-1], rows[1:], grids)])
    assert together.shape == (rows[-1] // 4, cfg.out_hidden_size)
    np.testing.assert_allclose(together, apart, rtol=0, atol=1e-5 * np.abs(apart).max())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graph_layout(precision, exported):
    """Stages: runs of blocks between full-attention blocks' keys/values, named I/O with explicit dtypes and
    dynamic rows; every attention is MultiHeadAttention without mask on 3-D keys (one head per node in the
    full-attention blocks); weights external; fp16 keeps the last down_proj in fp32."""
    model, path = exported("tiny", precision)
    cfg = cfg_of(model)
    T = onnx.TensorProto
    files = stage_files(path)
    assert len(files) == 2 * len(cfg.fullatt_block_indexes) + 1  # tiny: full attention in blocks 1 and 3
    weights, mha, kv_stages = {}, [], 0
    for k, f in enumerate(files):
        proto = onnx.load(str(f), load_external_data=False)
        inputs = {v.name: v.type.tensor_type for v in proto.graph.input}
        outputs = {v.name: v.type.tensor_type for v in proto.graph.output}
        heads = [n for n in inputs if n.startswith(("key.", "value."))]
        assert set(inputs) - set(heads) <= STAGE_INPUTS and len(heads) in (0, 2 * cfg.num_heads)
        assert all(inputs[n].elem_type == T.FLOAT and len(inputs[n].shape.dim) == 3 for n in heads)
        assert ("pixel_values" in inputs) == (k == 0) and ("image_embeds" in outputs) == (k == len(files) - 1)
        if "key_out" in outputs:
            kv_stages += 1
            assert set(outputs) == {"key_out", "value_out"} and set(inputs) == {"hidden", "rotary_cos", "rotary_sin"}
        rows = (inputs.get("pixel_values") or inputs["hidden"]).shape.dim[0]
        assert rows.dim_param and inputs.get("rotary_cos", inputs.get("hidden")).elem_type in (T.FLOAT, T.FLOAT16)
        if "image_embeds" in outputs:
            assert outputs["image_embeds"].elem_type == T.FLOAT
            assert outputs["image_embeds"].shape.dim[1].dim_value == cfg.out_hidden_size
        mha += [n for n in proto.graph.node if n.op_type == "MultiHeadAttention"]
        weights.update({t.name: t for t in proto.graph.initializer if t.data_location == T.EXTERNAL})
        assert f.with_name(f.name + ".data").stat().st_size > 0
    assert kv_stages == len(cfg.fullatt_block_indexes)
    windowed = cfg.depth - len(cfg.fullatt_block_indexes)
    assert len(mha) == windowed + cfg.num_heads * len(cfg.fullatt_block_indexes)
    assert all(n.domain == "com.microsoft" and len(n.input) == 3 for n in mha)
    dtypes = {n: t.data_type for n, t in weights.items() if n.endswith("weight") and "norm" not in n}
    last_down = f"blocks.{cfg.depth - 1}.down_proj.weight"
    if precision == "fp32":
        assert set(dtypes.values()) == {T.FLOAT}
    else:
        assert dtypes.pop(last_down) == T.FLOAT
        assert set(dtypes.values()) == {T.FLOAT16}


def test_fp32_down_proj_escape_hatch_mid_tower(small_ckpt, hf_model_factory):
    """An fp32 down_proj before the last block leaves an fp32 residual that later fp16 blocks must take (the
    torch pieces, run by the runtime's scheduler)."""
    model = hf_model_factory(small_ckpt)
    cfg = cfg_of(model)
    grids = np.array([(1, 8, 10), (1, 16, 6)])
    pixels = random_pixels(cfg, grids)
    with torch.no_grad():
        ref = model.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids)).pooler_output.numpy()
    fp32 = VisionGraph(model).encode(pixels, grids)
    mixed = VisionGraph(model, torch.float16, fp32_down_proj=(1,)).encode(pixels, grids)
    assert mixed.dtype == np.float32
    assert np.abs(fp32 - ref).max() <= FP32_MAX_REL * np.abs(ref).max()
    assert np.abs(mixed - ref).max() <= FP16_MAX_REL * np.abs(ref).max()


def test_encoder_rejects_bad_input(exported):
    model, path = exported("tiny", "fp32")
    cfg = cfg_of(model)
    encoder = VisionEncoder(path, cfg)
    pixels = random_pixels(cfg, [(1, 4, 4)])
    with pytest.raises(VisionInputError, match="pixel_values has shape"):
        encoder.encode(pixels[:-1], np.array([[1, 4, 4]]))
    with pytest.raises(VisionInputError, match="floating point"):
        encoder.encode(pixels.astype(np.int32), np.array([[1, 4, 4]]))
    with pytest.raises(VisionInputError, match="multiples"):
        encoder.encode(pixels, np.array([[1, 2, 8], [1, 1, 2]]))
    with pytest.raises(FileNotFoundError, match="vision graph directory not found"):
        VisionEncoder(path.with_name("missing"), cfg)
    with pytest.raises(FileNotFoundError, match="no vision stage graphs"):
        VisionEncoder(path.parent, cfg)
