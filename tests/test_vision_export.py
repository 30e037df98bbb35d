"""Vision encoder: host metadata vs transformers' own helpers, and the exported ONNX graph vs `model.visual`."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from zoomin.build.export_vision import VisionGraph, example_inputs, export_vision, random_pixels, vision_parity
from zoomin.runtime.config import VisionConfig, vision_config
from zoomin.runtime.vision import VisionEncoder
from zoomin.runtime.vision_meta import (
    META_NAMES,
    VisionInputError,
    frame_runs,
    rotary_tables,
    vision_inputs,
    window_groups,
    window_index,
)

# (t, h, w) patch grids. Windows are 8x8 patches: 8x10 and 16x6 and 12x12 all end in partial windows (the last
# column and/or row of windows is cut off), 16x16 tiles exactly, 2x8x8 is a two-frame grid.
GRIDS = [[(1, 8, 10)], [(1, 16, 6)], [(1, 12, 12)], [(1, 16, 16)]]
MULTI = [[(1, 8, 10), (1, 16, 6)], [(1, 12, 18), (1, 4, 4), (2, 8, 8)]]
META_GRIDS = [g for grids in GRIDS + MULTI for g in grids] + [(1, 2, 2), (3, 18, 34), (1, 32, 2)]

FP32_MAX_REL = 1e-4
# fp16 weights/matmuls against the fp32 reference: measured 3.5e-4 .. 4.2e-4 (max and norm) on both checkpoints;
# ~5x headroom. (A random tower with the real 3B dimensions and 32 blocks measured 1.8e-3: depth adds error.)
FP16_MAX_REL = 2e-3


def cfg_of(model) -> VisionConfig:
    return vision_config(model.config.to_dict())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request, hf_model_factory):
    """(model, onnx path) per (checkpoint, precision), exported once for this module."""
    cache = {}

    def get(ckpt_name: str, precision: str):
        key = (ckpt_name, precision)
        if key not in cache:
            model = hf_model_factory(request.getfixturevalue(f"{ckpt_name}_ckpt"))
            path = tmp_path_factory.mktemp(f"vision_{ckpt_name}_{precision}") / "vision.onnx"
            t0 = time.perf_counter()
            export_vision(model, path, precision=precision)
            data = path.with_name("vision.onnx.data").stat().st_size
            print(f"\nexport {ckpt_name} {precision}: {time.perf_counter() - t0:.1f} s, "
                  f"{path.stat().st_size / 1e3:.0f} kB graph + {data / 1e6:.2f} MB weights")
            cache[key] = model, path
        return cache[key]

    return get


# --- host metadata against transformers' own helpers ------------------------------------------------------------

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


def test_groups_are_transformers_windows_and_frames(tiny_ckpt, hf_model_factory):
    """Window groups hold exactly transformers' window segments, in its order; frame groups its cu_seqlens."""
    cfg = cfg_of(hf_model_factory(tiny_ckpt))
    grid = np.array(META_GRIDS)
    n = int(grid.prod(axis=1).sum())
    unit = cfg.spatial_merge_size**2
    ref_index, ref_cu = get_vision_window_index(torch.from_numpy(grid), cfg.spatial_merge_size, cfg.window_size,
                                                cfg.patch_size)
    # transformers' window-ordered patch sequence, cut into its cu_window_seqlens segments
    patch_order = (ref_index.numpy()[:, None] * unit + np.arange(unit)).ravel()
    segments = np.split(patch_order, ref_cu.numpy()[1:-1])
    frame_cu = get_vision_cu_seqlens(torch.from_numpy(grid)).numpy()
    frames = [np.arange(a, b) for a, b in zip(frame_cu[:-1], frame_cu[1:])]
    # windows may be padded: one call can hold images of any size
    gather, valid, scatter = window_groups(grid, cfg)
    assert gather.dtype == scatter.dtype == np.int64 and valid.dtype == np.bool_
    assert len(gather) == len(segments) and valid.any(axis=1).all()
    for row, ok, seg in zip(gather, valid, segments):
        np.testing.assert_array_equal(row[ok], seg)  # same rows in the same order; padding masked
    assert scatter.shape == (n,)
    np.testing.assert_array_equal(gather.ravel()[scatter], np.arange(n))  # scatter inverts gather
    assert gather.shape[1] == (cfg.window_size // cfg.patch_size) ** 2
    # frames are never padded: each call holds one run of equally sized images, whose frames are its rows
    rows = np.concatenate([[0], np.cumsum(grid.prod(axis=1))])
    got = []
    for a, b in frame_runs(grid):
        assert len({int(h * w) for _, h, w in grid[a:b]}) == 1
        got += list(vision_inputs(grid[a:b], cfg)["full_gather"] + rows[a])
    assert len(got) == len(frames)
    for row, frame in zip(got, frames):
        np.testing.assert_array_equal(row, frame)


def test_unequal_frames_in_one_call_are_refused(tiny_ckpt, hf_model_factory):
    cfg = cfg_of(hf_model_factory(tiny_ckpt))
    with pytest.raises(VisionInputError, match="equal h\\*w"):
        vision_inputs(np.array([(1, 8, 10), (1, 16, 6)]), cfg)
    assert frame_runs(np.array([(1, 8, 10), (1, 8, 10), (1, 16, 6), (1, 8, 10)])) == [(0, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("bad", [np.zeros((0, 3), int), np.array([[1, 3, 4]]), np.array([[1, 4, 0]]),
                                 np.array([[0, 4, 4]]), np.array([1, 4, 4]), np.array([[1.0, 4, 4]])], ids=str)
def test_bad_grid_is_a_clear_error(bad, tiny_ckpt, hf_model_factory):
    with pytest.raises(VisionInputError, match="grid_thw"):
        vision_inputs(bad, cfg_of(hf_model_factory(tiny_ckpt)))


# --- exported graph against transformers --------------------------------------------------------------------------

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
    """Named I/O with explicit dtypes and dynamic dims; weights external; fp16 keeps the last down_proj in fp32."""
    model, path = exported("tiny", precision)
    cfg = cfg_of(model)
    proto = onnx.load(str(path), load_external_data=False)
    types = {v.name: v.type.tensor_type for v in [*proto.graph.input, *proto.graph.output]}
    T = onnx.TensorProto
    expected = {"pixel_values": T.FLOAT, "rotary_cos": T.FLOAT, "rotary_sin": T.FLOAT, "window_valid": T.BOOL,
                "window_gather": T.INT64, "window_scatter": T.INT64, "full_gather": T.INT64,
                "image_embeds": T.FLOAT}
    assert [i.name for i in proto.graph.input] == ["pixel_values", *META_NAMES]
    assert {k: t.elem_type for k, t in types.items()} == expected
    assert types["pixel_values"].shape.dim[0].dim_param and types["image_embeds"].shape.dim[0].dim_param
    assert types["image_embeds"].shape.dim[1].dim_value == cfg.out_hidden_size
    weights = {t.name: t for t in proto.graph.initializer if t.data_location == T.EXTERNAL}
    assert path.with_name(path.name + ".data").stat().st_size > 0 and weights
    dtypes = {n: t.data_type for n, t in weights.items() if n.endswith("weight") and "norm" not in n}
    last_down = f"blocks.{cfg.depth - 1}.down_proj.weight"
    if precision == "fp32":
        assert set(dtypes.values()) == {T.FLOAT}
    else:
        assert dtypes.pop(last_down) == T.FLOAT
        assert set(dtypes.values()) == {T.FLOAT16}


def test_fp32_down_proj_escape_hatch_mid_tower(small_ckpt, hf_model_factory):
    """An fp32 down_proj before the last block leaves an fp32 residual that later fp16 blocks must take."""
    model = hf_model_factory(small_ckpt)
    cfg = cfg_of(model)
    grids = [(1, 8, 10), (1, 8, 10)]  # one graph call holds equally sized frames
    feeds = {k: torch.from_numpy(v) for k, v in example_inputs(cfg, grids).items()}
    with torch.no_grad():
        ref = model.model.visual(feeds["pixel_values"], grid_thw=torch.tensor(grids)).pooler_output
        fp32 = VisionGraph(model.model.visual, cfg)(**feeds)
        mixed = VisionGraph(model.model.visual, cfg, torch.float16, fp32_down_proj=(1,))(**feeds)
    assert mixed.dtype == torch.float32
    assert (fp32 - ref).abs().max() <= FP32_MAX_REL * ref.abs().max()
    assert (mixed - ref).abs().max() <= FP16_MAX_REL * ref.abs().max()


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
    with pytest.raises(FileNotFoundError, match="vision graph not found"):
        VisionEncoder(path.with_name("missing.onnx"), cfg)
