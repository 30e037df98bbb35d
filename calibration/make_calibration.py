"""Regenerate zoomin's default calibration set: this folder's images and manifest.json.

    python calibration/make_calibration.py

Real photos: six of scikit-image's bundled sample photos (each CC0 or public domain, see LICENCES below), saved as
JPEG at their native size (the Hubble field downscaled), the way camera photos usually arrive.

Synthetic stand-ins: no AI-generated images can be downloaded on the machines this project is built on, so the
"generated" half of the set is drawn here, deterministically, with numpy and OpenCV. Each image imitates one
well-known tell of generated images (upsampling checkerboards, over-smooth shading, cloned texture, mismatched
catch-lights, garbled pseudo-text, impossible reflections) and is saved as PNG, the format generators emit. They
are NOT outputs of a generative model: they only give the calibration the kind of pixel statistics (flat regions,
periodic high-frequency residue, saturated colours) that real photos lack, so activation ranges cover both.

Every image lists `regions` (original-image pixels): the boxes teacher-forced as query 1's answer during
calibration, so query 2's crops exist even for models that do not ground yet (random test weights).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
JPEG_QUALITY = 88

# name -> (skimage.data function, licence note from scikit-image's data docstrings, regions)
REAL = {
    "astronaut": ("astronaut", "public domain (NASA), shipped with scikit-image (BSD-3-Clause)",
                  [((165, 60, 295, 190), "face"), ((130, 345, 215, 425), "mission patch")]),
    "coffee": ("coffee", "CC0 (Rachel Michetti), shipped with scikit-image (BSD-3-Clause)",
               [((200, 90, 370, 195), "coffee surface"), ((320, 70, 425, 325), "spoon")]),
    "chelsea": ("chelsea", "CC0 (Stefan van der Walt), shipped with scikit-image (BSD-3-Clause)",
                [((130, 80, 360, 170), "eyes"), ((225, 215, 300, 270), "nose")]),
    "rocket": ("rocket", "public domain (SpaceX), shipped with scikit-image (BSD-3-Clause)",
               [((300, 120, 345, 200), "fairing"), ((90, 355, 215, 427), "lights")]),
    "camera": ("camera", "CC0 (Lav Varshney), shipped with scikit-image (BSD-3-Clause)",
               [((180, 80, 260, 200), "face"), ((250, 135, 335, 200), "camera")]),
    "hubble": ("hubble_deep_field", "public domain (NASA), shipped with scikit-image (BSD-3-Clause)",
               [((200, 180, 320, 300), "galaxy"), ((400, 330, 520, 450), "galaxy cluster")]),
}
HUBBLE_WIDTH = 600


def smooth_field(rng: np.random.Generator, h: int, w: int, waves: int = 6) -> np.ndarray:
    """A low-frequency colour field in [0, 1] (h, w, 3): a sum of random plane waves per channel."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(waves):
            fx, fy = rng.uniform(-4, 4, 2)
            out[..., c] += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    out -= out.min(axis=(0, 1))
    return out / out.max(axis=(0, 1))


def to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def upsample_checkerboard(rng):
    """Smooth content whose centre patch was upsampled by zero insertion (a transposed-conv checkerboard)."""
    h, w = 384, 512
    img = smooth_field(rng, h, w)
    y0, x0, s = 120, 180, 128
    small = img[y0:y0 + s:2, x0:x0 + s:2]
    up = np.zeros((s, s, 3))
    up[::2, ::2] = small * 4
    img[y0:y0 + s, x0:x0 + s] = cv2.GaussianBlur(up, (3, 3), 0.6)
    return to_u8(img), [((x0, y0, x0 + s, y0 + s), "checkerboard")]


def smooth_portrait(rng):
    """An over-smooth face-like oval with catch-lights that disagree between the eyes."""
    h, w = 448, 384
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.ones((h, w, 3)) * np.array([0.25, 0.3, 0.45]) + 0.1 * smooth_field(rng, h, w, 3)
    face = ((x - 192) / 120) ** 2 + ((y - 230) / 160) ** 2
    shade = np.clip(1.1 - 0.6 * face - 0.002 * (x - 150), 0, 1)[..., None]
    img = np.where(face[..., None] < 1, shade * np.array([0.95, 0.75, 0.62]), img)
    regions = []
    for cx, hl in ((140, (-8, -8)), (244, (9, 6))):  # highlights point different ways: inconsistent light
        cv2.ellipse(img, (cx, 200), (26, 14), 0, 0, 360, (0.95, 0.95, 0.95), -1, cv2.LINE_AA)
        cv2.circle(img, (cx, 200), 11, (0.35, 0.22, 0.1), -1, cv2.LINE_AA)
        cv2.circle(img, (cx + hl[0], 200 + hl[1]), 4, (1, 1, 1), -1, cv2.LINE_AA)
        regions.append(((cx - 34, 180, cx + 34, 220), "eye"))
    cv2.ellipse(img, (192, 320), (50, 14), 0, 0, 180, (0.6, 0.25, 0.25), -1, cv2.LINE_AA)
    return to_u8(cv2.GaussianBlur(img, (0, 0), 1.5)), regions


def cloned_texture(rng):
    """Gravel-like noise with one patch copied elsewhere (a repeated, tiled texture)."""
    h, w = 400, 560
    noise = rng.random((h // 4, w // 4, 3))
    img = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC) * 0.6 + 0.2 * smooth_field(rng, h, w)
    img += 0.08 * rng.standard_normal((h, w, 1))
    src, dst, s = (60, 40), (330, 230), 110
    img[dst[1]:dst[1] + s, dst[0]:dst[0] + s] = img[src[1]:src[1] + s, src[0]:src[0] + s]
    return to_u8(img), [((dst[0], dst[1], dst[0] + s, dst[1] + s), "cloned patch"),
                        ((src[0], src[1], src[0] + s, src[1] + s), "source patch")]


def bokeh_scene(rng):
    """Soft bokeh discs behind a razor-sharp object with a halo: depth of field that no lens produces."""
    h, w = 384, 512
    img = np.zeros((h, w, 3)) + np.array([0.08, 0.05, 0.12])
    for _ in range(40):
        c = tuple(float(v) for v in rng.uniform(0.3, 1.0, 3))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(10, 40)), c, -1)
    img = cv2.GaussianBlur(img, (0, 0), 9)
    cv2.circle(img, (256, 200), 84, (1, 1, 1), 6, cv2.LINE_AA)  # halo
    cv2.rectangle(img, (200, 140), (312, 260), (0.85, 0.2, 0.15), -1)
    cv2.rectangle(img, (220, 160), (292, 240), (0.95, 0.85, 0.3), -1)
    return to_u8(img), [((168, 112, 344, 288), "sharp object")]


def garbled_sign(rng):
    """A street-sign-like panel covered in pseudo-glyphs: text that looks like writing but is not."""
    h, w = 360, 540
    img = smooth_field(rng, h, w) * 0.4 + 0.3
    cv2.rectangle(img, (90, 100), (450, 230), (0.1, 0.35, 0.15), -1, cv2.LINE_AA)
    cv2.rectangle(img, (96, 106), (444, 224), (0.95, 0.95, 0.95), 3, cv2.LINE_AA)
    x = 110
    while x < 420:
        pts = np.stack([x + rng.integers(0, 22, 4), 130 + rng.integers(0, 70, 4)], axis=1).astype(np.int32)
        cv2.polylines(img, [pts], False, (0.95, 0.95, 0.95), 3, cv2.LINE_AA)
        x += int(rng.integers(22, 34))
    cv2.rectangle(img, (262, 230), (278, 360), (0.4, 0.4, 0.42), -1)
    return to_u8(img), [((100, 110, 440, 220), "text")]


def impossible_reflection(rng):
    """A landscape whose lake reflects a different sky and an unmirrored ridge."""
    h, w = 400, 600
    y = np.mgrid[0:h, 0:w][0].astype(np.float64)
    sky = np.stack([0.3 + 0.5 * y / h, 0.5 + 0.3 * y / h, 0.9 - 0.1 * y / h], axis=-1)
    img = sky.copy()
    ridge = 170 + np.cumsum(rng.standard_normal(w)) * 3
    ridge = cv2.GaussianBlur(ridge[None], (0, 0), 4)[0]
    cols = np.arange(h)[:, None]
    img[cols > ridge[None, :]] = (0.25, 0.3, 0.2)
    horizon = 260
    reflect = img[horizon - (h - horizon):horizon].copy()  # copied, not mirrored: wrong reflection
    img[horizon:] = reflect * np.array([0.6, 0.7, 0.9])
    cv2.circle(img, (470, 70), 28, (1.0, 0.95, 0.7), -1, cv2.LINE_AA)
    cv2.circle(img, (130, 330), 20, (1.0, 0.95, 0.7), -1, cv2.LINE_AA)  # the sun's "reflection", misplaced
    return to_u8(img), [((80, horizon, 380, 400), "reflection"), ((430, 30, 510, 110), "sun")]


SYNTHETIC = {
    "upsample_checkerboard": upsample_checkerboard,
    "smooth_portrait": smooth_portrait,
    "cloned_texture": cloned_texture,
    "bokeh_scene": bokeh_scene,
    "garbled_sign": garbled_sign,
    "impossible_reflection": impossible_reflection,
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry(path: Path, kind: str, source: str, licence: str, regions) -> dict:
    return {
        "file": path.relative_to(HERE).as_posix(),
        "sha256": sha256(path),
        "kind": kind,
        "source": source,
        "licence": licence,
        "regions": [{"box": list(box), "label": label} for box, label in regions],
    }


def main() -> None:
    import skimage.data

    images = []
    (HERE / "real").mkdir(exist_ok=True)
    (HERE / "synthetic").mkdir(exist_ok=True)
    for name, (func, licence, regions) in REAL.items():
        rgb = getattr(skimage.data, func)()
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=-1)
        if name == "hubble":
            h, w = rgb.shape[:2]
            rgb = cv2.resize(rgb, (HUBBLE_WIDTH, round(h * HUBBLE_WIDTH / w)), interpolation=cv2.INTER_AREA)
        path = HERE / "real" / f"{name}.jpg"
        cv2.imwrite(str(path), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        images.append(entry(path, "real", f"scikit-image skimage.data.{func}()", licence, regions))
    for i, (name, draw) in enumerate(SYNTHETIC.items()):
        rgb, regions = draw(np.random.default_rng(1000 + i))
        path = HERE / "synthetic" / f"{name}.png"
        cv2.imwrite(str(path), rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])
        images.append(entry(path, "synthetic", f"calibration/make_calibration.py:{draw.__name__}",
                            "generated by this project (Apache-2.0)", regions))
    # Real and synthetic alternate so that any --calib-size prefix holds both kinds.
    real = [e for e in images if e["kind"] == "real"]
    synth = [e for e in images if e["kind"] == "synthetic"]
    ordered = [e for pair in zip(real, synth) for e in pair]
    manifest = {
        "description": "zoomin default calibration set: real photos and synthetic stand-ins for generated images "
                       "(drawn by make_calibration.py, not produced by a generative model). Regions are "
                       "original-image pixels, teacher-forced as query 1's boxes during calibration.",
        "images": ordered,
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum((HERE / e["file"]).stat().st_size for e in ordered)
    print(f"{len(ordered)} images, {total / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
