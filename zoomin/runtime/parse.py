"""Read boxes, the verdict and the explanation out of a generated ZoomIn answer; never raise on model text.

A fine-tuned (or base) Qwen2.5-VL writes boxes in whichever form its data used, so every common one is accepted:
JSON `{"bbox_2d": [...], "label": ...}` (alone, in lists, in ```json fences, with trailing commas or single
quotes), `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`,
`[[x1, y1], [x2, y2]]` and `[x1, y1, x2, y2]`. Coordinates are pixels of the processor-resized image and may drift
outside it, so boxes are cleaned (corners ordered, clamped, degenerate/oversized/duplicate ones dropped).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from .protocol import MAX_QWEN_LABEL_CHARS, VERDICT_TRIM, Box, Protocol, VerdictLabel, check_image_hw

__all__ = ["Box", "Verdict", "parse_boxes", "parse_verdict", "explanation_text", "find_box_spans"]

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_N = rf"\s*({_NUM})\s*"
_LIST = re.compile(rf"\[{_N},{_N},{_N},{_N}\]")
_PAIRS = re.compile(rf"\[\s*\[{_N},{_N}\]\s*,\s*\[{_N},{_N}\]\s*\]")
# Qwen special-token boxes; the body also tolerates [x1,y1,x2,y2] and [[..],[..]] between the tokens.
_QWEN = re.compile(
    r"(?:<\|object_ref_start\|>((?:(?!<\|object_ref_(?:start|end)\|>).)"
    rf"{{0,{MAX_QWEN_LABEL_CHARS}}}?)<\|object_ref_end\|>\s*)?"
    rf"<\|box_start\|>\s*[(\[]{{0,2}}{_N}[)\]]?\s*,\s*[(\[]?{_N}[)\]]{{0,2}}\s*,"
    rf"\s*[(\[]{{0,2}}{_N}[)\]]?\s*,\s*[(\[]?{_N}[)\]]{{0,2}}\s*<\|box_end\|>",
    re.S,
)
# A box object is short; looking no further keeps adversarial text (thousands of unclosed '{') linear.
_MAX_OBJECT_CHARS = 4096
_FLAT_OBJECT = re.compile(rf"\{{[^{{}}]{{0,{_MAX_OBJECT_CHARS}}}\}}")
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_BOX_KEYS = ("bbox_2d", "bbox")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class _Match:
    start: int
    end: int
    coords: tuple[float, float, float, float]
    label: str | None


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(v)
    try:
        return float(v)
    except OverflowError:  # an int too large for a float
        return math.inf


def _label(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        v = str(v)
    if not isinstance(v, str):
        return None
    return v.strip() or None


def _box_from_object(obj: Any) -> tuple[tuple[float, float, float, float], str | None] | None:
    """A dict with a bbox_2d (or bbox) of 4 numbers or 2 points -> (coords, label)."""
    if not isinstance(obj, dict):
        return None
    value = next((obj[k] for k in _BOX_KEYS if k in obj), None)
    if not isinstance(value, (list, tuple)):  # tuples come from Python-style literals
        return None
    if len(value) == 2 and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        value = [*value[0], *value[1]]
    if len(value) != 4:
        return None
    try:
        coords = tuple(_float(v) for v in value)
    except ValueError:
        return None
    return coords, _label(obj.get("label"))  # type: ignore[return-value]


def _lenient_object(text: str, start: int) -> tuple[Any, int] | None:
    """A flat object at `start` that strict JSON rejects: trailing commas, or Python-style single quotes."""
    m = _FLAT_OBJECT.match(text, start)
    if m is None:
        return None
    src = m.group()
    for attempt in (lambda: json.loads(_TRAILING_COMMA.sub(r"\1", src)), lambda: ast.literal_eval(src)):
        try:
            return attempt(), m.end()
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return None


def _json_matches(text: str) -> list[_Match]:
    """Every '{' that opens an object with a box; objects without one are looked into (a box may be nested)."""
    out: list[_Match] = []
    for m in re.finditer(r"\{", text):
        start = m.start()
        try:
            obj, size = _DECODER.raw_decode(text[start:start + _MAX_OBJECT_CHARS])
            end = start + size
        except (ValueError, RecursionError):
            decoded = _lenient_object(text, start)
            if decoded is None:
                continue
            obj, end = decoded
        box = _box_from_object(obj)
        if box is not None:
            out.append(_Match(start, end, *box))
    return out


def _regex_matches(pattern: re.Pattern[str], text: str, labelled: bool) -> list[_Match]:
    out = []
    for m in pattern.finditer(text):
        groups = m.groups()
        label = _label(groups[0]) if labelled else None
        nums = groups[1:] if labelled else groups
        out.append(_Match(m.start(), m.end(), tuple(_float(v) for v in nums), label))  # type: ignore[arg-type]
    return out


def _all_matches(text: str) -> list[_Match]:
    """Every box-shaped span, first come first served: an enclosing form (JSON, Qwen tokens) starts before the
    list inside it and so wins; whatever overlaps a chosen span is dropped."""
    found = (_json_matches(text) + _regex_matches(_QWEN, text, True) + _regex_matches(_PAIRS, text, False)
             + _regex_matches(_LIST, text, False))
    found.sort(key=lambda m: m.start)
    kept, end = [], 0
    for m in found:
        if m.start >= end:
            kept.append(m)
            end = m.end
    return kept


def find_box_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of every box-shaped text, valid or not, in order."""
    return [(m.start, m.end) for m in _all_matches(text)]


def _clean(coords: Sequence[float], h: float, w: float, max_area_frac: float) -> tuple[float, ...] | None:
    if not all(math.isfinite(v) for v in coords):
        return None
    x1, x2 = sorted(coords[0::2])
    y1, y2 = sorted(coords[1::2])
    x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
    y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    if (x2 - x1) * (y2 - y1) / (w * h) > max_area_frac:
        return None
    return (x1, y1, x2, y2)


def parse_boxes(text: str, *, image_hw: Sequence[int], max_boxes: int | None,
                max_area_frac: float) -> list[Box]:
    """Boxes in order of appearance, cleaned and clamped to the (h, w) model-resized image.

    Reversed corners are swapped; boxes thinner than 1 px after clamping, non-finite ones, ones covering more than
    `max_area_frac` of the image and exact (coordinate) duplicates are dropped; then at most `max_boxes` are kept
    (None: no cap).
    """
    h, w = (float(v) for v in check_image_hw(image_hw))
    if not 0 < max_area_frac <= 1:
        raise ValueError(f"max_area_frac must be in (0, 1], got {max_area_frac!r}")
    if max_boxes is not None and max_boxes < 0:
        raise ValueError(f"max_boxes must be >= 0 or None, got {max_boxes!r}")
    boxes: list[Box] = []
    seen: set[tuple[float, ...]] = set()
    for m in _all_matches(text):
        if max_boxes is not None and len(boxes) >= max_boxes:
            break
        coords = _clean(m.coords, h, w, max_area_frac)
        if coords is None or coords in seen:
            continue
        seen.add(coords)
        boxes.append(Box(*coords, label=m.label))
    return boxes


@dataclass(frozen=True)
class Verdict:
    """The verdict of one answer. `span` is where the verdict word sits in `raw` (to find its token)."""

    label: VerdictLabel | None
    span: tuple[int, int] | None
    raw: str

    @property
    def word(self) -> str | None:
        return None if self.span is None else self.raw[self.span[0]:self.span[1]]


def _open_tag(tag: str) -> re.Pattern[str]:
    return re.compile(rf"<\s*{re.escape(tag)}\s*>", re.I)


def parse_verdict(text: str, protocol: Protocol) -> Verdict:
    """The last `<verdict>` tag's word (case, spaces and surrounding punctuation ignored), else label None.

    A truncated answer whose last tag was never closed still counts: the word runs to the next '<' or the end.
    """
    opens = list(_open_tag(protocol.verdict_tag).finditer(text))
    if not opens:
        return Verdict(None, None, text)
    start = opens[-1].end()
    stop = text.find("<", start)
    content = text[start:stop if stop >= 0 else len(text)]
    core = content.strip(VERDICT_TRIM)
    words = {protocol.real_word.casefold(): "real", protocol.generated_word.casefold(): "generated"}
    label = words.get(core.casefold())
    if label is None:
        return Verdict(None, None, text)
    begin = start + len(content) - len(content.lstrip(VERDICT_TRIM))
    return Verdict(label, (begin, begin + len(core)), text)  # type: ignore[arg-type]


_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_EMPTY_FENCE = re.compile(r"```[a-zA-Z]*\s*(?:\[[\s,]*\])?\s*```")
_EMPTY_LIST = re.compile(r"\[[\s,]*\]")


def explanation_text(text: str, protocol: Protocol | None = None) -> str:
    """The answer without boxes, verdict/think tags, special tokens and the empty JSON scaffolding they leave.

    Spaces are collapsed, lines trimmed and runs of blank lines reduced to one.
    """
    tag = re.escape((protocol or Protocol.default()).verdict_tag)
    pieces, last = [], 0
    for s, e in find_box_spans(text):
        pieces.append(text[last:s])
        last = e
    out = "".join(pieces) + text[last:]
    out = re.sub(rf"<\s*{tag}\s*>[^<]*(?:<\s*/\s*{tag}\s*>)?", " ", out, flags=re.I)
    out = re.sub(rf"<\s*/?\s*(?:{tag}|think)\s*>", " ", out, flags=re.I)
    out = _SPECIAL.sub(" ", out)
    out = _EMPTY_FENCE.sub(" ", out)
    out = _EMPTY_LIST.sub(" ", out)
    lines = [re.sub(r"[ \t\f\v]+", " ", line).strip() for line in out.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
