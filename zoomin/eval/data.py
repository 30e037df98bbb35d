"""Labelled evaluation sets: a folder with `real/` and `generated/` subfolders, or a CSV / JSON Lines manifest.

A manifest row has `path`, `label` ("real" | "generated") and optionally `boxes`, the ground-truth regions as a
JSON list of [x1, y1, x2, y2] in original-image pixels (in JSONL the list itself or that JSON text). Relative
paths are resolved against the manifest's folder. Every sample gets a `key` (the path as written, or relative to
the folder) that stays the same when the set moves, so a resumed run finds its earlier predictions.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.image_io import IMAGE_SUFFIXES

LABELS = ("real", "generated")
POSITIVE = "generated"

BoxTuple = tuple[float, float, float, float]


class DatasetError(ValueError):
    """An evaluation set that cannot be read; the message names the file (and row) and the problem."""


@dataclass(frozen=True)
class Sample:
    key: str  # stable identity across runs: the path as the manifest wrote it, or relative to the folder
    path: Path  # where the image is read from
    label: str  # "real" | "generated"
    boxes: tuple[BoxTuple, ...] | None = None  # ground truth, original pixels; None: not annotated


def load_samples(data: str | Path) -> list[Sample]:
    """The samples of a folder (real/ + generated/), a .csv or a .jsonl manifest."""
    data = Path(data)
    if data.is_dir():
        return load_folder(data)
    if not data.is_file():
        raise DatasetError(f"{data}: no such file or folder")
    suffix = data.suffix.lower()
    if suffix == ".csv":
        return load_csv(data)
    if suffix in (".jsonl", ".ndjson"):
        return load_jsonl(data)
    raise DatasetError(f"{data}: not a folder, .csv or .jsonl manifest")


def load_folder(root: Path) -> list[Sample]:
    """Images (by suffix, recursively) under root/real and root/generated, sorted by path within each."""
    folders = {label: root / label for label in LABELS}
    if not any(f.is_dir() for f in folders.values()):
        raise DatasetError(f"{root}: expected a real/ and a generated/ subfolder")
    samples = []
    for label, folder in folders.items():
        if folder.is_dir():
            files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            samples += [Sample(f.relative_to(root).as_posix(), f, label) for f in files]
    if not samples:
        raise DatasetError(f"{root}: no images in real/ or generated/")
    return samples


def load_csv(path: Path) -> list[Sample]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise DatasetError(f"{path}: needs a header row with the columns path,label[,boxes]; "
                                   f"got {reader.fieldnames}")
            # line 1 is the header; a quoted field spanning lines makes reader.line_num the row's last line
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    return _samples(path, rows)


def load_jsonl(path: Path) -> list[Sample]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return _samples(path, rows)


def _samples(manifest: Path, rows: Sequence[tuple[int, dict[str, Any]]]) -> list[Sample]:
    samples, seen = [], {}
    for n, row in rows:
        where = f"{manifest}, line {n}"
        key = row.get("path")
        if not isinstance(key, str) or not key.strip():
            raise DatasetError(f"{where}: missing path")
        label = row.get("label")
        if label not in LABELS:
            raise DatasetError(f"{where}: label {label!r} is not one of {', '.join(LABELS)}")
        if key in seen:
            raise DatasetError(f"{where}: {key} is listed twice (first on line {seen[key]})")
        seen[key] = n
        p = Path(key)
        samples.append(Sample(key, p if p.is_absolute() else manifest.parent / p, label,
                              parse_boxes(row.get("boxes"), where)))
    if not samples:
        raise DatasetError(f"{manifest}: no samples")
    return samples


def parse_boxes(value: Any, where: str) -> tuple[BoxTuple, ...] | None:
    """None / "" -> None (not annotated); a JSON list (or its text) of [x1, y1, x2, y2] with x1 < x2, y1 < y2."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: boxes are not JSON ({e.msg})") from None
    if not isinstance(value, list):
        raise DatasetError(f"{where}: boxes must be a list of [x1, y1, x2, y2], got {value!r}")
    boxes = []
    for b in value:
        ok = (isinstance(b, list) and len(b) == 4
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b))
        if not ok or not (b[0] < b[2] and b[1] < b[3]):
            raise DatasetError(f"{where}: box {b!r} is not [x1, y1, x2, y2] with x1 < x2 and y1 < y2")
        boxes.append(tuple(float(v) for v in b))
    return tuple(boxes)


def take(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """The first `limit` samples, alternating between the labels (each label in its own order), so that a
    quick run of a folder (all generated/ before real/) still has both classes."""
    if limit is None or limit >= len(samples):
        return list(samples)
    by_label = [[s for s in samples if s.label == label] for label in LABELS]
    out: list[Sample] = []
    i = 0
    while len(out) < limit:
        out += [group[i] for group in by_label if i < len(group)][: limit - len(out)]
        i += 1
    return out
