"""Turn a box the model emitted in query 1 into the zoomed crop it examines in query 2.

Qwen2.5-VL states boxes in absolute pixels of the processor-resized image, and they are unreliable: corners
swapped, a little outside the image, occasionally empty or NaN after parsing. The crop is cut from the
original full-resolution pixels (that is the point of zooming: the full image was downscaled to fit
`max_pixels`), widened by a margin for context, and resized with the same Pillow-exact bicubic filter the
processor uses, straight to a size `preprocess_image` keeps as is, so the crop is resampled once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .preprocess import MAX_ASPECT_RATIO, smart_resize
from .resize import resize_bicubic

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class CropConfig:
    """How boxes become crops.

    margin: context added on each side, as a fraction of the box's width (left/right) and height (top/bottom);
      10% keeps the surroundings a forensic judgement compares against without diluting the region.
    min_size: shortest crop side in original pixels (28 = one merged 2x2 patch group); smaller boxes grow
      around their centre, since the model cannot say much about a few pixels.
    min_pixels / max_pixels: the crop is resized (aspect kept, sides multiples of `factor`) into this area.
      224*224 (64 image tokens) makes small regions genuinely larger than in the full view; 448*448
      (256 tokens) bounds query 2, which carries ~2-4 crops on top of the conversation so far.
    factor: patch_size * merge_size of the model (ImageConfig.factor).
    """

    margin: float = 0.1
    min_size: int = 28
    min_pixels: int = 224 * 224
    max_pixels: int = 448 * 448
    factor: int = 28

    def __post_init__(self):
        if not (self.margin >= 0 and self.min_size >= 1 and 0 < self.min_pixels <= self.max_pixels
                and self.factor >= 1):
            raise ValueError(f"invalid CropConfig {self}")


@dataclass(frozen=True)
class Crop:
    image: np.ndarray
    """RGB uint8, already at its model size (sides multiples of `factor`)."""
    box_original: tuple[int, int, int, int]
    """(x1, y1, x2, y2) pixel box cut from the original image, x2/y2 exclusive."""
    box_model: Box
    """The box as the model gave it, in resized-image pixels."""


def box_to_original(box: Box, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> Box:
    """Map (x1, y1, x2, y2) from processor-resized pixels to original pixels (each axis scaled on its own,
    since smart_resize rounds the two sides independently). Swapping the size arguments maps back."""
    sx = original_hw[1] / resized_hw[1]
    sy = original_hw[0] / resized_hw[0]
    x1, y1, x2, y2 = _coords(box)
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def crop_box(box: Box, image_hw: tuple[int, int],
             cfg: CropConfig = CropConfig()) -> tuple[int, int, int, int] | None:
    """Integer pixel box (x1, y1, x2, y2), x2/y2 exclusive, for a box in original-image pixels.

    Corners are reordered, the box is clamped to the image, widened by the margin, rounded outwards, grown to
    `min_size` (or the whole side if the image is smaller) and, for very thin boxes, widened until the aspect
    ratio is within what the processor accepts. Returns None for a box that has no area inside the image
    (NaN/inf coordinates, zero width or height, or entirely outside): such boxes are a normal model output, not
    a caller error, so they are skipped rather than raised. Anything but four numbers raises ValueError.
    """
    bx1, by1, bx2, by2 = _coords(box)
    if not all(math.isfinite(v) for v in (bx1, by1, bx2, by2)):
        return None
    h, w = image_hw
    x1, x2 = sorted((min(max(bx1, 0.0), w), min(max(bx2, 0.0), w)))
    y1, y2 = sorted((min(max(by1, 0.0), h), min(max(by2, 0.0), h)))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    mx, my = cfg.margin * (x2 - x1), cfg.margin * (y2 - y1)
    left, right = _span(x1 - mx, x2 + mx, cfg.min_size, w)
    top, bottom = _span(y1 - my, y2 + my, cfg.min_size, h)
    # A box 1 px high and 250 px wide is not an error, but smart_resize would refuse its crop.
    if right - left > MAX_ASPECT_RATIO * (bottom - top):
        top, bottom = _span(top, bottom, math.ceil((right - left) / MAX_ASPECT_RATIO), h)
    elif bottom - top > MAX_ASPECT_RATIO * (right - left):
        left, right = _span(left, right, math.ceil((bottom - top) / MAX_ASPECT_RATIO), w)
    return left, top, right, bottom


def _coords(box: Box) -> Box:
    if len(box) != 4:
        raise ValueError(f"a box is (x1, y1, x2, y2), got {box!r}")
    return tuple(float(v) for v in box)


def _span(lo: float, hi: float, min_len: int, limit: int) -> tuple[int, int]:
    """Integer [start, end) covering [lo, hi] within [0, limit], at least min(min_len, limit) long; a span that
    must grow grows around its centre and slides back inside the image if it would cross an edge."""
    start, end = max(0, math.floor(lo)), min(limit, math.ceil(hi))
    need = min(min_len, limit)
    if end - start < need:
        start = math.floor((lo + hi) / 2 - need / 2 + 0.5)
        start = min(max(start, 0), limit - need)
        end = start + need
    return start, end


def crop_image(image: np.ndarray, box_px: tuple[int, int, int, int],
               cfg: CropConfig = CropConfig()) -> np.ndarray:
    """Cut `box_px` out of the RGB uint8 image and resize it to its model size (see CropConfig)."""
    x1, y1, x2, y2 = box_px
    region = image[y1:y2, x1:x2]
    if region.shape[0] < 1 or region.shape[1] < 1:
        raise ValueError(f"crop box {box_px} is empty for an image of {image.shape[1]}x{image.shape[0]}")
    size = smart_resize(region.shape[0], region.shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return resize_bicubic(region, size) if size != region.shape[:2] else region.copy()


def make_crop(image: np.ndarray, box_model: Box, resized_hw: tuple[int, int],
              cfg: CropConfig = CropConfig()) -> Crop | None:
    """The zoomed crop for one model box (resized-image pixels) of `image` (the original); None if degenerate."""
    box_px = crop_box(box_to_original(box_model, resized_hw, image.shape[:2]), image.shape[:2], cfg)
    if box_px is None:
        return None
    return Crop(image=crop_image(image, box_px, cfg), box_original=box_px, box_model=_coords(box_model))
