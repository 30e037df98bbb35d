"""Image -> vision-tower input, reproducing transformers' Qwen2VLImageProcessorPil.

Stages (one function each): decode (image_io.load_image) -> `smart_resize` picks a size whose sides are
multiples of 28 within [min_pixels, max_pixels] -> Pillow-exact bicubic resize -> rescale and normalise ->
`patchify` into rows of 3*2*14*14 values in the order the vision tower's patch embedding expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import ImageConfig
from .image_io import ImageError, ImageSource, load_image, source_name
from .resize import resize_bicubic

MAX_ASPECT_RATIO = 200
"""transformers refuses images whose long side exceeds 200 times the short side; so does the runtime."""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as transformers' qwen2_vl `smart_resize` (Python's round-half-even first, then floor when
    too large / ceil when too small), since one pixel of difference changes the token count.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width)}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


@dataclass(frozen=True)
class PreprocessedImage:
    pixel_values: np.ndarray
    """float32 (grid_h * grid_w, 3 * temporal_patch * patch * patch): the vision tower's input rows."""
    grid_thw: np.ndarray
    """int64 (3,): temporal, height and width in 14-px patches."""
    resized_hw: tuple[int, int]
    """Size the model sees; its boxes are in these pixel coordinates."""
    original_hw: tuple[int, int]
    image: np.ndarray
    """The decoded, upright RGB uint8 original, kept so that crops come from the full-resolution pixels."""
    num_tokens: int
    """Number of <|image_pad|> tokens this image takes in the prompt (patches / merge**2)."""


def preprocess_image(image: ImageSource, *, min_pixels: int | None = None, max_pixels: int | None = None,
                     config: ImageConfig | None = None) -> PreprocessedImage:
    """Decode, resize, normalise and patchify one image; `min_pixels`/`max_pixels` override the config's."""
    cfg = config or ImageConfig()
    rgb = load_image(image)
    h, w = rgb.shape[:2]
    try:
        rh, rw = smart_resize(h, w, cfg.factor, min_pixels if min_pixels is not None else cfg.min_pixels,
                              max_pixels if max_pixels is not None else cfg.max_pixels)
    except ValueError as e:
        raise ImageError(source_name(image), str(e)) from e
    resized = resize_bicubic(rgb, (rh, rw)) if (rh, rw) != (h, w) else rgb
    pixels = patchify(normalize(resized, cfg), cfg)
    grid = np.array([1, rh // cfg.patch_size, rw // cfg.patch_size], dtype=np.int64)
    return PreprocessedImage(pixel_values=pixels, grid_thw=grid, resized_hw=(rh, rw), original_hw=(h, w),
                             image=rgb, num_tokens=int(grid.prod()) // cfg.merge_size**2)


def normalize(image: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """uint8 RGB -> float32 ((x * rescale) - mean) / std, bit-identical to the processor.

    The processor rescales in float64 then casts to float32, and normalises in float32; the value depends only
    on (channel, level), so it is evaluated once per level into a 3 x 256 table and looked up.
    """
    levels = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    table = (levels[None, :] - mean[:, None]) / std[:, None]  # (3, 256) float32
    return table[np.arange(3), image]


def patchify(image: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """(H, W, C) float32 -> (H/14 * W/14, C * T * 14 * 14) rows.

    Rows run over 2x2 merge groups in raster order and, inside a group, over its four patches in raster order,
    so that the patch merger can concatenate 4 consecutive rows. Each row holds C, then the T temporal copies
    (a still image is repeated T times), then the 14x14 pixels.
    """
    h, w, c = image.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    blocks = image.reshape(gh // m, m, p, gw // m, m, p, c)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, p, p)
    rows = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    return rows.reshape(gh * gw, c * t * p * p)
