"""Header sizes agree with what OpenCV decodes, for every format the service reads before decoding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from zoomin.runtime.image_header import header_size
from zoomin.runtime.image_io import ImageTooLarge, load_image


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp"])
@pytest.mark.parametrize("size", [(37, 23), (640, 427), (3000, 60)])
def test_header_size_matches_the_decoded_image(ext, size):
    w, h = size
    rgb = (np.random.default_rng(w).random((h, w, 3)) * 255).astype(np.uint8)
    data = cv2.imencode(ext, rgb)[1].tobytes()
    assert header_size(data) == (w, h)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2] == (h, w)


def test_lossless_webp_and_progressive_jpeg():
    rgb = np.zeros((45, 71, 3), np.uint8)
    lossless = cv2.imencode(".webp", rgb, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    assert lossless[12:16] == b"VP8L" and header_size(lossless) == (71, 45)
    progressive = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert header_size(progressive) == (71, 45)


def test_gif_header():
    data = b"GIF89a" + (300).to_bytes(2, "little") + (200).to_bytes(2, "little") + b"\x00" * 8
    assert header_size(data) == (300, 200)


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP", b"II*\x00"])
def test_unknown_or_truncated_headers_give_none(data):
    assert header_size(data) is None


def test_load_image_refuses_too_many_pixels_by_header_and_after_decoding():
    rgb = np.zeros((50, 80, 3), np.uint8)
    with pytest.raises(ImageTooLarge, match="80x50 = 4000 pixels exceeds the limit of 3999 pixels"):
        load_image(cv2.imencode(".png", rgb)[1].tobytes(), max_pixels=3999)
    with pytest.raises(ImageTooLarge, match="exceeds the limit"):
        load_image(cv2.imencode(".tiff", rgb)[1].tobytes(), max_pixels=3999)  # header not read: checked after
    assert load_image(cv2.imencode(".png", rgb)[1].tobytes(), max_pixels=4000).shape == (50, 80, 3)
