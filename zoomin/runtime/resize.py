"""Bicubic resize that reproduces Pillow's `Image.resize(size, Image.BICUBIC)` on 8-bit images bit for bit.

The Qwen2-VL image processor resizes with Pillow, and a vision tower is sensitive to the exact resampler
(OpenCV's INTER_CUBIC uses a=-0.75, no antialiasing on downscale and misses by up to 7 gray levels), so the
runtime re-implements Pillow's 8-bit path:

- a separable convolution with the a=-0.5 cubic kernel; when downscaling, the kernel is stretched by the
  scale factor (antialiasing), sampled at pixel centres (`(i + 0.5) * scale`), cut at the image border and
  renormalised to sum 1;
- the float weights are quantised to 22-bit fixed point, each output is an int32-exact sum started at half a
  unit (rounding), shifted back and clipped to 0..255;
- the intermediate image between the two passes is stored as uint8. Pillow 13 runs the vertical pass first
  when it shrinks the rows by more than twice the number of columns the horizontal pass removes
  (`in_h - out_h > 2 * (in_w - out_w)` while shrinking vertically), otherwise horizontal first; the order
  changes the uint8 rounding, so it is reproduced (found by probing Pillow, pinned by tests/test_preprocess.py);
- an axis whose size does not change is not filtered at all.

Every product and sum is an integer below 2**31, so the numpy evaluation is exact whatever the summation order.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_PRECISION_BITS = 32 - 8 - 2  # Pillow's 8-bit fixed point: 22 fractional bits, room for sign and overshoot
_SUPPORT = 2.0  # the cubic kernel is non-zero on (-2, 2)
_A = -0.5


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic with a = -0.5, written term by term in the order Pillow evaluates it (same float rounding)."""
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (out_size, k) and fixed-point weights (out_size, k) for one axis.

    Rows shorter than k (cut by the border) are padded with weight 0 on a valid index, so that every row can be
    gathered the same way.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1

    centre = (np.arange(out_size) + 0.5) * scale
    lo = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)  # C's (int) cast truncates
    hi = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size)
    count = hi - lo

    k = np.arange(ksize)
    src = lo[:, None] + k[None, :]
    valid = k[None, :] < count[:, None]
    w = _cubic(((src - centre[:, None]) + 0.5) * (1.0 / filterscale))
    w = np.where(valid, w, 0.0)
    total = np.zeros((out_size, 1))
    for j in range(ksize):  # left to right like Pillow: numpy's pairwise sum could round the last bit differently
        total += w[:, j : j + 1]
    w = np.where(total != 0.0, w / np.where(total == 0.0, 1.0, total), w)

    fixed = w * (1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5)).astype(np.int32)
    src = np.where(valid, src, lo[:, None])
    src.flags.writeable = fixed.flags.writeable = False  # shared through the cache
    return src, fixed


def _resample_rows(image: np.ndarray, out_rows: int) -> np.ndarray:
    """Filter a uint8 image along axis 0 to `out_rows` rows (whole-row gathers: contiguous and fast)."""
    src, weights = _taps(image.shape[0], out_rows)
    shape = (out_rows, *image.shape[1:])
    bcast = (out_rows,) + (1,) * (image.ndim - 1)
    acc = np.full(shape, 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    term = np.empty(shape, dtype=np.int32)
    for j in range(src.shape[1]):
        w = weights[:, j]
        if w.any():
            np.multiply(image[src[:, j]], w.reshape(bcast), out=term)
            acc += term
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def _resample_cols(image: np.ndarray, out_cols: int) -> np.ndarray:
    """Filter along axis 1 by resampling the rows of the transposed image (cheaper than strided gathers)."""
    swapped = np.ascontiguousarray(np.swapaxes(image, 0, 1))
    return np.ascontiguousarray(np.swapaxes(_resample_rows(swapped, out_cols), 0, 1))


def resize_bicubic(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 image (H x W or H x W x C) to `size_hw` = (height, width) exactly as Pillow's BICUBIC does."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"resize_bicubic expects a uint8 H x W (x C) image, got {image.dtype} {image.shape}")
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize target must be at least 1x1, got {out_h}x{out_w}")
    in_h, in_w = image.shape[:2]
    if in_h < 1 or in_w < 1:
        raise ValueError(f"cannot resize an empty image {image.shape}")

    def rows(a: np.ndarray) -> np.ndarray:
        return _resample_rows(a, out_h) if out_h != in_h else a

    def cols(a: np.ndarray) -> np.ndarray:
        return _resample_cols(a, out_w) if out_w != in_w else a

    vertical_first = out_h < in_h and in_h - out_h > 2 * (in_w - out_w)
    out = cols(rows(image)) if vertical_first else rows(cols(image))
    return out.copy() if out is image else out
