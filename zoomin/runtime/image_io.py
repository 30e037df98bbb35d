"""Decode any input image into the one form the runtime works on: RGB uint8, H x W x 3, upright.

The reference pipeline is Pillow's: `ImageOps.exif_transpose(Image.open(f))` followed by the Qwen2-VL
processor's RGB conversion, which composites transparency onto white. The runtime decodes with OpenCV
instead (no Pillow at run time) and reproduces that result:

- EXIF orientation: OpenCV ignores it when asked for the raw pixels (IMREAD_UNCHANGED, needed to keep alpha
  and 16-bit samples), so the Orientation tag is read from the EXIF block OpenCV returns and applied here.
  TIFF is the exception: its decoder already applies the tag and returns no EXIF block.
- grayscale is replicated to three channels; palette images arrive expanded from OpenCV.
- alpha (RGBA, LA, palette or RGB with a tRNS chunk) is composited onto white with Pillow's integer rounding,
  because white is what the Hugging Face processor produces and a model was trained on.
- 16-bit samples are scaled to 8 bits as round(v / 257), the exact inverse of 8->16 bit expansion (Pillow
  truncates 16-bit RGB, v >> 8, and clips 16-bit grayscale to 255, which whitens the image).
- CMYK JPEGs are converted by OpenCV's decoder (within 1 level of Pillow's conversion).

Known differences: a grayscale PNG whose tRNS chunk marks one gray level transparent keeps that level (OpenCV
drops the chunk; Pillow paints those pixels white), and AVIF rotation/mirror boxes (irot/imir) are not applied.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

from .image_header import header_size

MIN_SIDE = 14
"""Smallest accepted side in pixels: one vision patch. Below that the model would only see interpolation."""

_ORIENTATION_TAG = 0x0112


# Suffixes taken when a folder of images is given (a file named explicitly is tried whatever its suffix).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jp2", ".pgm",
                            ".ppm"})


class ImageError(ValueError):
    """An input that cannot be used as an image; the message names the source and the problem."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem

    def __reduce__(self):  # keep it picklable (worker processes) despite the two-argument constructor
        return type(self), (self.source, self.problem)


class ImageTooLarge(ImageError):
    """More pixels than the caller allows (`load_image(max_pixels=...)`): refused before decoding when the
    header declares the size, so a decompression bomb never allocates."""


ImageSource = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray


def source_name(src: ImageSource) -> str:
    """How errors refer to an input: the path as given, or `<bytes>` / `<array>`."""
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return "<array>" if isinstance(src, np.ndarray) else "<bytes>"


def load_image(src: ImageSource, *, min_side: int = MIN_SIDE, max_pixels: int | None = None) -> np.ndarray:
    """Return `src` as an upright RGB uint8 array (H, W, 3).

    `src` is a file path, the encoded file bytes, or an already decoded uint8 array: (H, W, 3) RGB is taken
    as is, (H, W) gray and (H, W, 4) RGBA are converted like decoded files. Raises ImageError (a ValueError);
    ImageTooLarge when the image has more than `max_pixels` pixels.
    """
    name = source_name(src)
    if isinstance(src, np.ndarray):
        image = _from_array(src, name)
    elif isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview)):
        data = _read_file(Path(src), name) if isinstance(src, (str, os.PathLike)) else bytes(src)
        if max_pixels is not None:
            _check_pixels(header_size(data), max_pixels, name)
        image = _decode(data, name)
    else:
        raise TypeError(f"load_image takes a path, bytes or a numpy array, not {type(src).__name__}")
    h, w = image.shape[:2]
    if max_pixels is not None:
        _check_pixels((w, h), max_pixels, name)
    if min(h, w) < min_side:
        raise ImageError(name, f"image too small: {w}x{h} (width x height); each side must be >= {min_side}")
    return image


def _check_pixels(size: tuple[int, int] | None, max_pixels: int, name: str) -> None:
    if size is not None and size[0] * size[1] > max_pixels:
        w, h = size
        raise ImageTooLarge(name, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels")


def _read_file(path: Path, name: str) -> bytes:
    if not path.exists():
        raise ImageError(name, "missing file")
    if not path.is_file():
        raise ImageError(name, "not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(name, f"cannot read ({e.strerror or e})") from e
    return data


def _decode(data: bytes, name: str) -> np.ndarray:
    if not data:
        raise ImageError(name, "empty file")
    try:
        raw, kinds, blocks = cv2.imdecodeWithMetadata(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        if getattr(e, "code", None) == cv2.Error.StsNoMem:  # a real image too big for memory: say so
            raise MemoryError(f"decoding {name}: {getattr(e, 'err', e)}") from None
        raise ImageError(name, "not an image (cannot decode)") from e
    if raw is None or raw.size == 0:
        raise ImageError(name, "not an image (cannot decode)")
    image = _to_rgb8(raw, name, bgr=True)
    exif = [bytes(np.asarray(b).ravel()) for k, b in zip(kinds, blocks) if k == cv2.IMAGE_METADATA_EXIF]
    return _apply_orientation(image, _exif_orientation(exif[0]) if exif else 1)


def _from_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise ImageError(
            name, f"expected a uint8 array shaped (H, W, 3) RGB, (H, W) gray or (H, W, 4) RGBA; "
                  f"got {array.dtype} {array.shape}")
    if array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(array)
    return _to_rgb8(array, name, bgr=False)


def _to_rgb8(raw: np.ndarray, name: str, *, bgr: bool) -> np.ndarray:
    """Any OpenCV decode result (gray / BGR / BGRA, 8 or 16 bit) or RGB(A) array -> RGB uint8."""
    if raw.dtype == np.uint16:
        raw = ((raw.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif raw.dtype != np.uint8:
        raise ImageError(name, f"unsupported sample type {raw.dtype} (only 8- and 16-bit images)")
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[:, :, 0]
    if raw.ndim == 2:
        return np.repeat(raw[:, :, None], 3, axis=2)
    channels = raw.shape[2]
    if channels not in (3, 4):
        raise ImageError(name, f"unsupported channel count {channels}")
    color = raw[:, :, 2::-1] if bgr else raw[:, :, :3]
    if channels == 4:
        return composite_on_white(color, raw[:, :, 3])
    return np.ascontiguousarray(color)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend onto an opaque white background: round((c * a + 255 * (255 - a)) / 255), as Pillow rounds it."""
    a = alpha.astype(np.uint32)[:, :, None]
    blended = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return blended.astype(np.uint8)


def _exif_orientation(exif: bytes) -> int:
    """The Orientation tag (1..8) of a TIFF-structured EXIF block; 1 (upright) when absent or malformed."""
    if exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    if len(exif) < 8 or exif[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if exif[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", exif, 4)
    if ifd + 2 > len(exif):
        return 1
    (count,) = struct.unpack_from(order + "H", exif, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(exif):
            break
        tag, kind, n = struct.unpack_from(order + "HHI", exif, entry)
        if tag == _ORIENTATION_TAG and kind == 3 and n >= 1:  # SHORT, stored in the entry itself
            (value,) = struct.unpack_from(order + "H", exif, entry + 8)
            return value if 1 <= value <= 8 else 1
    return 1


def _apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an image stored with EXIF `orientation` upright (the transforms of ImageOps.exif_transpose)."""
    if orientation == 1:
        return image
    flipped = {
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # mirrored top-bottom
        5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
        6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # needs 90 degrees clockwise
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # mirrored along the anti-diagonal
        8: lambda a: a.transpose(1, 0, 2)[::-1],  # needs 90 degrees counter-clockwise
    }[orientation](image)
    return np.ascontiguousarray(flipped)
