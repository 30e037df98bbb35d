"""load_image against the reference decode: Pillow + ImageOps.exif_transpose + transformers' convert_to_rgb.

Tolerances (measured with OpenCV 5.0 / libjpeg-turbo 3.1 and Pillow 13 here): every PNG, WebP, GIF, TIFF and
RGB/gray JPEG decode is bit-identical (0 levels); JPEG gets JPEG_TOL = 2 anyway because two libjpeg builds may
round the IDCT/upsampling differently. CMYK JPEG: 1 level (OpenCV's and Pillow's CMYK->RGB formulas differ).
16-bit: we scale round(v / 257) exactly; Pillow truncates (v >> 8, 1 level away) for RGB and clips gray.
"""

from __future__ import annotations

import io
import pickle
import struct

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data
from transformers.image_transforms import convert_to_rgb

from zoomin.runtime.image_io import MIN_SIDE, ImageError, composite_on_white, load_image

JPEG_TOL = 2
CMYK_TOL = 1


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A non-symmetric natural RGB photo (any wrong flip or rotation changes most pixels)."""
    return data.astronaut()[40:160, 100:260].copy()


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def reference(blob: bytes) -> np.ndarray:
    """What the Hugging Face pipeline feeds the processor: upright, RGB, transparency on white."""
    return convert_to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(blob))), return_numpy=True)


def exif(orientation: int, little_endian: bool = False) -> bytes:
    """A minimal EXIF block (APP1 header + TIFF structure) holding only the Orientation tag."""
    order = "<" if little_endian else ">"
    head = (b"II" if little_endian else b"MM") + struct.pack(order + "HI", 42, 8)
    entry = struct.pack(order + "HHIH2x", 0x0112, 3, 1, orientation)
    return b"Exif\x00\x00" + head + struct.pack(order + "H", 1) + entry + struct.pack(order + "I", 0)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt,kw,tol", [("JPEG", {"quality": 92}, JPEG_TOL), ("PNG", {}, 0),
                                        ("WEBP", {"lossless": True}, 0)])
def test_exif_orientation_matches_exif_transpose(photo, orientation, fmt, kw, tol):
    blob = encode(Image.fromarray(photo), fmt, exif=exif(orientation), **kw)
    ours, ref = load_image(blob), reference(blob)
    assert ours.shape == ref.shape == ((160, 120, 3) if orientation >= 5 else (120, 160, 3))
    assert max_diff(ours, ref) <= tol


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_little_endian_exif_and_tiff_orientation(photo, orientation):
    jpeg = encode(Image.fromarray(photo), "JPEG", exif=exif(orientation, little_endian=True))
    assert max_diff(load_image(jpeg), reference(jpeg)) <= JPEG_TOL
    # TIFF keeps the tag in its own IFD; OpenCV applies it itself and must not be rotated twice.
    tiff = encode(Image.fromarray(photo), "TIFF", exif=exif(orientation))
    assert max_diff(load_image(tiff), reference(tiff)) == 0


def test_malformed_exif_is_ignored(photo):
    for bad in (b"Exif\x00\x00MM\x00*\x00\x00\xff\xff", exif(9), exif(0)):
        blob = encode(Image.fromarray(photo), "PNG", exif=bad)
        assert np.array_equal(load_image(blob), photo)


@pytest.mark.parametrize("fmt,tol", [("PNG", 0), ("JPEG", JPEG_TOL)])
def test_grayscale_becomes_three_equal_channels(photo, fmt, tol):
    blob = encode(Image.fromarray(photo[:, :, 1]), fmt)
    ours = load_image(blob)
    assert max_diff(ours, reference(blob)) <= tol
    assert np.array_equal(ours[:, :, 0], ours[:, :, 2])


def test_cmyk_jpeg(photo):
    blob = encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95, exif=exif(6))
    assert Image.open(io.BytesIO(blob)).mode == "CMYK"
    assert max_diff(load_image(blob), reference(blob)) <= CMYK_TOL


def alpha_plane(rng, shape) -> np.ndarray:
    alpha = rng.integers(0, 256, shape, dtype=np.uint8)
    alpha[:10], alpha[-10:] = 0, 255  # fully transparent and fully opaque rows
    return alpha


def test_rgba_and_la_composite_on_white_like_transformers(photo, rng):
    alpha = alpha_plane(rng, photo.shape[:2])
    for image in (Image.fromarray(np.dstack([photo, alpha]), "RGBA"),
                  Image.fromarray(np.dstack([photo[:, :, 0], alpha]), "LA")):
        for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True})):
            blob = encode(image, fmt, **kw)
            ours = load_image(blob)
            assert max_diff(ours, reference(blob)) == 0
            assert (ours[:10] == 255).all()


def test_composite_rounding_exhaustive():
    """Every (colour, alpha) pair against Pillow's alpha_composite, which the processor uses."""
    level, alpha = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    rgba = Image.fromarray(np.dstack([level, level, level, alpha]), "RGBA")
    expected = convert_to_rgb(rgba, return_numpy=True)
    assert np.array_equal(composite_on_white(np.dstack([level] * 3), alpha), expected)


def test_palette_gif_and_transparency_chunks(photo, rng):
    pal = Image.fromarray(photo).quantize(64)
    blobs = [
        encode(pal, "PNG"),
        encode(pal, "PNG", transparency=bytes(rng.integers(0, 256, 64, dtype=np.uint8))),  # per-entry alpha
        encode(pal, "GIF"),
        encode(pal, "GIF", transparency=5),
        encode(Image.fromarray(photo), "PNG", transparency=tuple(int(v) for v in photo[3, 3])),  # RGB tRNS
    ]
    for blob in blobs:
        assert max_diff(load_image(blob), reference(blob)) == 0
    assert (load_image(blobs[4])[3, 3] == 255).all()


def test_16bit_scaled_by_257(rng):
    # Every 16-bit value once: 256 x 256 gray image. Pillow decodes the raw samples (mode I;16) correctly
    # but its RGB conversion clips at 255, so the reference is round(sample / 257) computed from those samples.
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    blob = encode(Image.fromarray(values), "PNG")
    decoded = np.asarray(Image.open(io.BytesIO(blob)))
    assert np.array_equal(decoded, values)
    ours = load_image(blob)
    assert np.array_equal(ours[:, :, 0], np.round(values / 257).astype(np.uint8))
    assert np.array_equal(ours[:, :, 0], ours[:, :, 1])

    rgb16 = rng.integers(0, 65536, (40, 50, 3)).astype(np.uint16)
    ok, png = cv2.imencode(".png", rgb16[:, :, ::-1])
    ours = load_image(png.tobytes())
    assert np.array_equal(ours, np.round(rgb16 / 257).astype(np.uint8))
    assert Image.open(io.BytesIO(png.tobytes())).mode == "RGB"
    assert max_diff(ours, reference(png.tobytes())) <= 1  # Pillow truncates (v >> 8)

    rgba16 = np.dstack([rgb16, rng.integers(0, 65536, (40, 50)).astype(np.uint16)])
    ok, png = cv2.imencode(".png", rgba16[:, :, [2, 1, 0, 3]])
    scaled = np.round(rgba16 / 257).astype(np.uint8)
    assert np.array_equal(load_image(png.tobytes()), composite_on_white(scaled[:, :, :3], scaled[:, :, 3]))


def test_paths_bytes_and_arrays(photo, rng, tmp_path):
    blob = encode(Image.fromarray(photo), "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(blob)
    for src in (path, str(path), blob, bytearray(blob), memoryview(blob)):
        assert np.array_equal(load_image(src), photo)

    assert load_image(photo) is photo  # contiguous RGB arrays are taken as they are
    assert np.array_equal(load_image(photo[:, ::-1]), photo[:, ::-1])
    gray = photo[:, :, 0]
    assert np.array_equal(load_image(gray), np.dstack([gray] * 3))
    assert np.array_equal(load_image(gray[:, :, None]), np.dstack([gray] * 3))
    alpha = alpha_plane(rng, photo.shape[:2])
    expected = convert_to_rgb(Image.fromarray(np.dstack([photo, alpha]), "RGBA"), return_numpy=True)
    assert np.array_equal(load_image(np.dstack([photo, alpha])), expected)


def expect_error(src, *fragments: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(src)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)
    return info.value


def test_errors_name_the_source_and_the_problem(photo, tmp_path):
    missing = expect_error(tmp_path / "photo.jpg", "photo.jpg: missing file")
    assert missing.source.endswith("photo.jpg") and missing.problem == "missing file"
    assert str(pickle.loads(pickle.dumps(missing))) == str(missing)
    expect_error(tmp_path, "not a file")

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    expect_error(empty, "empty.jpg: empty file")
    expect_error(b"", "<bytes>: empty file")

    text = tmp_path / "notes.jpg"
    text.write_text("not a picture at all")
    expect_error(text, "notes.jpg: not an image (cannot decode)")
    jpeg = encode(Image.fromarray(photo), "JPEG")
    expect_error(jpeg[: len(jpeg) // 2], "<bytes>: not an image (cannot decode)")

    expect_error(encode(Image.new("RGB", (1, 1)), "PNG"), "image too small: 1x1")
    expect_error(np.zeros((MIN_SIDE - 1, 500, 3), np.uint8), "<array>: image too small: 500x13")
    assert load_image(np.zeros((MIN_SIDE, MIN_SIDE, 3), np.uint8)).shape == (MIN_SIDE, MIN_SIDE, 3)
    assert load_image(np.zeros((1, 1, 3), np.uint8), min_side=1).shape == (1, 1, 3)

    expect_error(photo.astype(np.float32), "<array>: expected a uint8 array", "float32")
    expect_error(np.zeros((20, 20, 2), np.uint8), "(20, 20, 2)")
    expect_error(np.zeros((2, 20, 20, 3), np.uint8), "(2, 20, 20, 3)")
    ok, tiff = cv2.imencode(".tiff", np.ones((30, 30, 3), np.float32))
    expect_error(tiff.tobytes(), "unsupported sample type float32")
    with pytest.raises(TypeError, match="path, bytes or a numpy array"):
        load_image(42)
