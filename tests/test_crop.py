"""The crop/zoom kernel: box mapping, box repair, and crops processed exactly like full images."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from zoomin.runtime.crop import Crop, CropConfig, box_to_original, crop_box, crop_image, make_crop
from zoomin.runtime.preprocess import MAX_ASPECT_RATIO, preprocess_image, smart_resize

NO_MARGIN = CropConfig(margin=0.0)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return data.coffee()  # 400 x 600


def test_box_to_original_scales_each_axis():
    # smart_resize rounds the sides separately: 400 x 600 -> 392 x 588 (different scale per axis)
    assert box_to_original((0, 0, 588, 392), (392, 588), (400, 600)) == (0.0, 0.0, 600.0, 400.0)
    x1, y1, x2, y2 = box_to_original((294, 196, 294, 196), (392, 588), (400, 600))
    assert (x1, y1) == (300.0, 200.0)
    with pytest.raises(ValueError, match=r"\(x1, y1, x2, y2\)"):
        box_to_original((1, 2, 3), (392, 588), (400, 600))


coord = st.floats(-5000, 5000, allow_nan=False)
side = st.integers(14, 4000)


@settings(max_examples=200, deadline=None)
@given(st.tuples(coord, coord, coord, coord), side, side, side, side)
def test_box_mapping_round_trip(box, rh, rw, oh, ow):
    back = box_to_original(box_to_original(box, (rh, rw), (oh, ow)), (oh, ow), (rh, rw))
    assert np.allclose(back, box, rtol=1e-12, atol=1e-9)


def test_clamps_boxes_that_drift_outside(photo):
    h, w = photo.shape[:2]
    assert crop_box((-40, -10, 100, 120), (h, w), NO_MARGIN) == (0, 0, 100, 120)
    assert crop_box((500, 300, 650, 420), (h, w), NO_MARGIN) == (500, 300, 600, 400)
    assert crop_box((-1e9, -1e9, 1e9, 1e9), (h, w), NO_MARGIN) == (0, 0, 600, 400)


def test_reorders_swapped_corners_and_rounds_outwards(photo):
    h, w = photo.shape[:2]
    assert crop_box((200.4, 150.6, 100.5, 50.2), (h, w), NO_MARGIN) == (100, 50, 201, 151)
    assert crop_box((100.5, 150.6, 200.4, 50.2), (h, w), NO_MARGIN) == (100, 50, 201, 151)


def test_margin_is_a_fraction_of_each_side():
    assert crop_box((100, 100, 200, 150), (1000, 1000), CropConfig(margin=0.1)) == (90, 95, 210, 155)
    assert crop_box((0, 0, 100, 100), (1000, 1000), CropConfig(margin=0.5)) == (0, 0, 150, 150)


@pytest.mark.parametrize("corner", [(0, 0), (600, 0), (0, 400), (600, 400)])
def test_min_size_grows_inside_the_image_at_corners(corner):
    cx, cy = corner
    box = crop_box((cx - 2, cy - 2, cx + 2, cy + 2), (400, 600), CropConfig(min_size=56))
    x1, y1, x2, y2 = box
    assert (x2 - x1, y2 - y1) == (56, 56)
    assert 0 <= x1 and x2 <= 600 and 0 <= y1 and y2 <= 400
    assert x1 <= max(cx - 2, 0) and min(cx + 2, 600) <= x2  # still covers the (clamped) box


def test_min_size_grows_around_the_centre_and_caps_at_the_image():
    assert crop_box((100, 100, 110, 104), (1000, 1000), NO_MARGIN) == (91, 88, 119, 116)
    assert crop_box((5, 5, 10, 10), (20, 40), CropConfig(min_size=28)) == (0, 0, 28, 20)


@pytest.mark.parametrize("box", [(float("nan"), 0, 10, 10), (0, 0, float("inf"), 10), (10, 10, 10, 50),
                                 (10, 30, 50, 30), (700, 10, 800, 50), (-50, -50, -10, -10), (0, 500, 100, 600)])
def test_degenerate_boxes_are_rejected_with_none(photo, box):
    assert crop_box(box, photo.shape[:2]) is None
    assert make_crop(photo, box, (392, 588)) is None


def test_thin_boxes_are_widened_to_an_accepted_aspect_ratio(photo):
    box = crop_box((0, 10, 4000, 10.5), (400, 4000), NO_MARGIN)
    x1, y1, x2, y2 = box
    assert (x2 - x1) / (y2 - y1) <= MAX_ASPECT_RATIO
    assert crop_image(np.zeros((400, 4000, 3), np.uint8), box).shape[2] == 3


def test_invalid_config_and_box():
    with pytest.raises(ValueError):
        CropConfig(margin=-0.1)
    with pytest.raises(ValueError):
        CropConfig(min_pixels=500_000, max_pixels=200_000)
    with pytest.raises(ValueError, match=r"\(x1, y1, x2, y2\)"):
        crop_box((1, 2, 3, 4, 5), (100, 100))


maybe_wild = st.one_of(st.floats(-3000, 6000, allow_nan=False),
                       st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0]))


@settings(max_examples=400, deadline=None)
@given(st.tuples(maybe_wild, maybe_wild, maybe_wild, maybe_wild), st.integers(14, 3000), st.integers(14, 3000),
       st.floats(0, 1), st.integers(1, 300))
def test_returned_boxes_are_valid(box, h, w, margin, min_size):
    cfg = CropConfig(margin=margin, min_size=min_size)
    out = crop_box(box, (h, w), cfg)
    finite = all(math.isfinite(v) for v in box)
    clamped = [min(max(v, 0), lim) for v, lim in zip(box, (w, h, w, h))] if finite else None
    if not finite or min(clamped[0], clamped[2]) == max(clamped[0], clamped[2]) or \
            min(clamped[1], clamped[3]) == max(clamped[1], clamped[3]):
        assert out is None
        return
    assert out is not None and all(isinstance(v, int) for v in out)
    x1, y1, x2, y2 = out
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert x2 - x1 >= min(min_size, w) and y2 - y1 >= min(min_size, h)
    # the crop holds the whole (clamped) box the model pointed at
    assert x1 <= min(clamped[0], clamped[2]) and max(clamped[0], clamped[2]) <= x2
    assert y1 <= min(clamped[1], clamped[3]) and max(clamped[1], clamped[3]) <= y2
    if max(h, w) / min(h, w) <= MAX_ASPECT_RATIO:
        assert max(x2 - x1, y2 - y1) / min(x2 - x1, y2 - y1) <= MAX_ASPECT_RATIO


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000))
def test_crop_sizes_are_kept_by_the_processor(h, w):
    """preprocess_image with the crop limits leaves a crop's size alone, so a crop is resampled only once."""
    if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
        return
    cfg = CropConfig()
    size = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    assert smart_resize(*size, cfg.factor, cfg.min_pixels, cfg.max_pixels) == size
    assert size[0] % 28 == 0 and size[1] % 28 == 0


@pytest.mark.parametrize("box_px", [(250, 120, 330, 200), (0, 0, 28, 28), (10, 300, 600, 390), (0, 0, 600, 400)])
def test_crops_are_processed_exactly_like_full_images(photo, box_px):
    """crop_image + preprocess_image == transformers' processor on the PIL crop with the crop pixel limits."""
    cfg = CropConfig()
    crop = crop_image(photo, box_px, cfg)
    x1, y1, x2, y2 = box_px
    pil_crop = Image.fromarray(photo).crop(box_px)
    h, w = smart_resize(y2 - y1, x2 - x1, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    assert crop.shape == (h, w, 3) and cfg.min_pixels <= h * w <= cfg.max_pixels
    assert np.array_equal(crop, np.asarray(pil_crop.resize((w, h), Image.Resampling.BICUBIC)))

    ours = preprocess_image(crop, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    assert ours.resized_hw == (h, w)
    processor = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = processor(images=pil_crop, return_tensors="np")
    assert np.array_equal(ours.grid_thw, ref["image_grid_thw"][0])
    assert np.array_equal(ours.pixel_values, ref["pixel_values"])


def test_make_crop_from_a_model_box(photo):
    full = preprocess_image(photo)  # 400 x 600 -> 392 x 588
    assert full.resized_hw == (392, 588)
    box_model = (588.0, 98.0, 294.0, 196.0)  # swapped x corners, in resized pixels
    crop = make_crop(full.image, box_model, full.resized_hw, CropConfig(margin=0.0))
    assert isinstance(crop, Crop)
    assert crop.box_model == box_model
    assert crop.box_original == (300, 100, 600, 200)
    assert np.array_equal(crop.image, crop_image(photo, (300, 100, 600, 200)))
    assert crop.image.shape == (140, 392, 3)  # 100 x 300 grown to >= 224*224 pixels, sides multiples of 28
