"""Draw a DetectResult on its image (OpenCV): the examined boxes with labels and a verdict banner."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .pipeline import DetectResult

COLORS = {"generated": (220, 40, 40), "real": (40, 170, 60), None: (200, 160, 0)}  # RGB


def annotate(image: np.ndarray, result: DetectResult) -> np.ndarray:
    """A copy of the RGB image with boxes (original pixels) and the final verdict drawn on it."""
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 300))
    scale = max(0.4, min(h, w) / 900)
    color = COLORS.get(result.verdict, COLORS[None])
    for i, region in enumerate(result.boxes, 1):
        x1, y1, x2, y2 = (int(round(v)) for v in region.box)
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), color, thick)
        _label(out, f"{i} {region.label or ''}".strip(), (x1, y1), color, scale, thick)
    score = "" if result.score is None else f" p(generated)={result.score:.2f}"
    _label(out, f"{result.verdict or 'no verdict'}{score}", (0, 0), color, scale * 1.2, thick, inside=True)
    return out


def _label(img: np.ndarray, text: str, xy: tuple[int, int], color, scale: float, thick: int,
           inside: bool = False) -> None:
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x, y = xy
    top = y if inside or y - th - base - 4 < 0 else y - th - base - 4
    cv2.rectangle(img, (x, top), (x + tw + 4, top + th + base + 4), color, -1)
    cv2.putText(img, text, (x + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                cv2.LINE_AA)


def save_annotated(image: np.ndarray, result: DetectResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(annotate(image, result), cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")
    return path
