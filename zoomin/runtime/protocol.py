"""The ZoomIn prompt/output protocol: what each query asks and in which shape the answers come back.

ZoomIn publishes no prompts, so everything a fine-tuned checkpoint was trained on lives in one JSON-serialisable
`Protocol` that travels inside the engine directory. Query 1 (global scan) sends the full image and
`scan_instruction`; the answer holds an explanation, boxes in `box_format` (absolute pixels of the
processor-resized image) and a preliminary `<verdict>`. Query 2 (local evidence check) continues the same
conversation with the original image (optional), one captioned zoomed crop per box and `check_instruction`.

The parser (`zoomin.runtime.parse`) reads every box format; `render_boxes` writes them, so teacher-forced answers
(`Protocol.format_answer`) parse back to exactly the boxes given.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import asdict, dataclass, fields, replace as dc_replace
from pathlib import Path
from typing import Any, Literal, Sequence

VerdictLabel = Literal["real", "generated"]
VERDICT_LABELS: tuple[VerdictLabel, ...] = ("real", "generated")

# Formats the model can be told to emit. "json" and "qwen" carry labels; "pairs" and "list" carry coordinates only.
BOX_FORMATS = ("json", "qwen", "pairs", "list")
LABELLED_FORMATS = ("json", "qwen")
# Integer fields that may also be None (JSON null).
OPTIONAL_INTS = frozenset({"max_image_tokens"})
# What happens to a full image over `max_image_tokens`.
OVERSIZE_POLICIES = ("downscale", "refuse")
# A Qwen `<|object_ref_start|>label<|object_ref_end|>` label longer than this is not read as a label.
MAX_QWEN_LABEL_CHARS = 256

# Ignored around a verdict word: "<verdict> **Generated.** </verdict>" still reads as generated.
VERDICT_TRIM = " \t\r\n.,;:!?\"'`*_()[]"

# How each format is described to the model inside `scan_instruction` ({box_spec}).
BOX_SPECS = {
    "json": 'a JSON list of objects like {"bbox_2d": [x1, y1, x2, y2], "label": "left hand"}',
    "qwen": "<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>, one per region",
    "pairs": "[[x1, y1], [x2, y2]], one per region",
    "list": "[x1, y1, x2, y2], one per region",
}


class ProtocolError(ValueError):
    """An invalid protocol setting or file; the message names the field (and file) at fault."""


@dataclass(frozen=True)
class Box:
    """A region in model coordinates: absolute pixels of the processor-resized image, x to the right, y down."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return self.width * self.height

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


def check_image_hw(hw: Sequence[Any]) -> tuple[int, int]:
    """Validate an (height, width) pair of positive integers (numpy integers welcome)."""
    try:
        h, w = hw
        if int(h) != h or int(w) != w:
            raise TypeError
        h, w = int(h), int(w)
    except (TypeError, ValueError):
        raise ValueError(f"image_hw must be a (height, width) pair of integers, got {hw!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image_hw must be positive, got {(h, w)}")
    return h, w


def _num(v: float) -> str:
    """Shortest text that reads back as the same float: integers without a decimal point, as Qwen writes them."""
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"box coordinate {v!r} is not finite")
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)


def _clean_label(label: str | None) -> str | None:
    if label is None:
        return None
    if not isinstance(label, str):
        raise ValueError(f"box label must be a string or None, got {type(label).__name__}")
    return label.strip() or None


def render_box(box: Box, box_format: str) -> str:
    """One box in `box_format`; labels are stripped (the parser strips them too)."""
    x1, y1, x2, y2 = (_num(v) for v in box.as_tuple())
    label = _clean_label(box.label)
    if label is not None and box_format not in LABELLED_FORMATS:
        raise ValueError(f"box format {box_format!r} cannot carry labels (box labelled {label!r}); "
                         f"use one of {LABELLED_FORMATS} or drop the labels")
    if box_format == "json":
        lab = "" if label is None else ', "label": ' + json.dumps(label, ensure_ascii=False)
        return f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]{lab}}}'
    if box_format == "qwen":
        if label is not None and ("<|" in label or len(label) > MAX_QWEN_LABEL_CHARS):
            raise ValueError(f"label {label!r} cannot be written in the qwen box format "
                             f"(contains '<|' or exceeds {MAX_QWEN_LABEL_CHARS} characters)")
        ref = "" if label is None else f"<|object_ref_start|>{label}<|object_ref_end|>"
        return f"{ref}<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    if box_format == "pairs":
        return f"[[{x1}, {y1}], [{x2}, {y2}]]"
    if box_format == "list":
        return f"[{x1}, {y1}, {x2}, {y2}]"
    raise ValueError(f"unknown box format {box_format!r}; expected one of {BOX_FORMATS}")


def render_boxes(boxes: Sequence[Box], box_format: str) -> str:
    """A block of boxes: a fenced JSON list (Qwen2.5-VL's grounding style) or one box per line."""
    lines = [render_box(b, box_format) for b in boxes]
    if box_format == "json":
        return "```json\n[\n" + ",\n".join("  " + s for s in lines) + ("\n" if lines else "") + "]\n```"
    return "\n".join(lines)


def as_box(obj: Box | Sequence[Any]) -> Box:
    """Accept a Box, (x1, y1, x2, y2) or (x1, y1, x2, y2, label)."""
    if isinstance(obj, Box):
        return obj
    try:
        if len(obj) not in (4, 5):
            raise TypeError
        label = obj[4] if len(obj) == 5 else None
        return Box(float(obj[0]), float(obj[1]), float(obj[2]), float(obj[3]), _clean_label(label))
    except (TypeError, ValueError):
        raise ValueError(f"expected a Box or (x1, y1, x2, y2[, label]), got {obj!r}") from None


# Fields each template may use; anything else is a ProtocolError at construction, not a KeyError mid-inference.
TEMPLATE_FIELDS: dict[str, dict[str, Any]] = {
    "scan_instruction": {"max_boxes": 4, "box_spec": "spec", "real": "real", "generated": "generated",
                         "tag": "verdict"},
    "check_instruction": {"num_crops": 2, "real": "real", "generated": "generated", "tag": "verdict"},
    "crop_caption": {"index": 1, "label": "face", "x1": 0, "y1": 0, "x2": 10, "y2": 10},
    "original_caption": {},
    "answer_template": {"explanation": "e", "boxes": "b", "verdict": "v"},
}
REQUIRED_FIELDS = {"answer_template": ("explanation", "boxes", "verdict")}


@dataclass(frozen=True)
class Protocol:
    """Prompts, answer layout and zoom settings of the two ZoomIn queries (defaults: our own ZoomIn-style texts).

    Coordinates in prompts and answers are model coordinates (pixels of the resized image the model saw).
    `max_image_tokens` caps the full image's vision tokens, and with them the memory one image takes: without it a
    big photo gets all of the preprocessor's max_pixels, which may be more than the device holds. `oversize` says
    whether a larger image is downscaled to fit (as a max_pixels of max_image_tokens * 28**2 would) or refused.
    """

    system_prompt: str = (
        "You are an image forensics expert. You decide whether an image is a real photograph or was generated "
        "by an AI model, and you support the decision with visual evidence."
    )
    # Query 1. Fields: {max_boxes} {box_spec} {real} {generated} {tag}.
    scan_instruction: str = (
        "Is this image a real photograph or generated by AI? Scan the whole image for traces of generation: "
        "faces, eyes and teeth, hands and fingers, text and logos, textures of skin, hair and fabric, lighting, "
        "shadows, reflections and perspective. First describe what you observe. Then mark at most {max_boxes} "
        "regions that deserve a closer look, most suspicious first, as {box_spec}, in pixel coordinates of this "
        "image; do not mark the whole image. Finally give a preliminary verdict: <{tag}>{real}</{tag}> or "
        "<{tag}>{generated}</{tag}>."
    )
    # Query 2, after the captioned images. Fields: {num_crops} {real} {generated} {tag}.
    check_instruction: str = (
        "The {num_crops} close-up view(s) above are the regions you marked, zoomed in. Examine each for "
        "fine-grained evidence: malformed anatomy, garbled text, repeated or overly smooth textures, or natural "
        "sensor noise and compression artifacts. Confirm or correct your preliminary explanation, then give your "
        "final verdict: <{tag}>{real}</{tag}> or <{tag}>{generated}</{tag}>."
    )
    # Text before the original image in query 2 (empty: none). A template without fields: write braces as {{ }}.
    original_caption: str = "Original image:"
    # Text before each crop in query 2. Fields: {index} (1-based) {label} {x1} {y1} {x2} {y2} (rounded model pixels).
    crop_caption: str = "Region {index} ({label}), box [{x1}, {y1}, {x2}, {y2}]:"
    default_label: str = "suspicious region"  # {label} of boxes the model left unlabelled
    whole_image_label: str = "whole image"  # {label} of the full-image view used when no box survives
    # Layout of a query-1 answer. Fields: {explanation} {boxes} (render_boxes) {verdict} (the full verdict tag).
    answer_template: str = "{explanation}\n{boxes}\n{verdict}"
    real_word: str = "real"
    generated_word: str = "generated"
    verdict_tag: str = "verdict"
    box_format: str = "json"
    # Crop settings, same meaning and defaults as crop.CropConfig (margin, min_size, max_pixels).
    crop_margin: float = 0.1  # context added on each side of a box, as a fraction of the box's width/height
    min_crop_size: int = 28  # smaller crops grow around their centre to this side (original-image pixels)
    crop_max_pixels: int = 448 * 448  # each crop is zoomed (resized) to at most this many pixels
    max_boxes: int = 4
    max_box_area_frac: float = 0.5  # boxes covering more of the image are dropped (ZoomIn's training data rule)
    stage2_without_boxes: bool = True  # no box survives -> query 2 still runs, on the full image
    show_original_in_check: bool = True  # ZoomIn v2 shows the original image again in query 2
    max_new_tokens_scan: int = 512
    max_new_tokens_check: int = 512
    # Full-image size limit (None: whatever the engine's preprocessor max_pixels gives, 16384 tokens for stock
    # Qwen2.5-VL). 4096 tokens = 3.2 megapixels: the global scan only has to locate suspicious regions, and query 2
    # zooms into them from the original's full-resolution pixels; it keeps a 4000x3000 photo's peak memory within
    # ~1.5 GiB of a 3B-width engine's size (perf/RESULTS.md), where all 16384 tokens would need ~6 GiB more.
    max_image_tokens: int | None = 4096  # most <|image_pad|> tokens (one per 28x28 pixels) of the full image
    oversize: str = "downscale"  # an image over max_image_tokens: "downscale" to fit, or "refuse" (its own error)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = type(f.default)
            if f.name in OPTIONAL_INTS:  # None means "not set"
                if value is None:
                    continue
                kind = int
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                value = float(value)
            if type(value) is not kind:
                raise ProtocolError(f"protocol field {f.name!r} must be {kind.__name__}"
                                    f"{' or null' if f.name in OPTIONAL_INTS else ''}, "
                                    f"got {type(value).__name__} {value!r}")
        self._check_ranges()
        self._check_words()
        for name, sample in TEMPLATE_FIELDS.items():
            _check_template(name, getattr(self, name), sample)

    def _check_ranges(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ProtocolError(f"protocol field {name!r} must be {rule}, got {getattr(self, name)!r}")

        need(self.box_format in BOX_FORMATS, "box_format", f"one of {BOX_FORMATS}")
        need(math.isfinite(self.crop_margin) and self.crop_margin >= 0, "crop_margin", ">= 0")
        need(self.min_crop_size >= 1, "min_crop_size", ">= 1")
        need(self.crop_max_pixels >= 1, "crop_max_pixels", ">= 1")
        need(self.max_boxes >= 0, "max_boxes", ">= 0")
        need(0 < self.max_box_area_frac <= 1, "max_box_area_frac", "in (0, 1]")
        need(self.max_new_tokens_scan >= 1, "max_new_tokens_scan", ">= 1")
        need(self.max_new_tokens_check >= 1, "max_new_tokens_check", ">= 1")
        need(self.max_image_tokens is None or self.max_image_tokens >= 1, "max_image_tokens", ">= 1 or null")
        need(self.oversize in OVERSIZE_POLICIES, "oversize", f"one of {OVERSIZE_POLICIES}")
        need(self.verdict_tag.isidentifier(), "verdict_tag", "an identifier (letters, digits, underscore)")

    def _check_words(self) -> None:
        for name in ("real_word", "generated_word"):
            word = getattr(self, name)
            if not word or word != word.strip(VERDICT_TRIM) or any(c in word for c in "<>"):
                raise ProtocolError(f"protocol field {name!r} must be non-empty, contain no '<' or '>' and not "
                                    f"start or end with spaces or any of {VERDICT_TRIM.strip()!r}; got {word!r}")
        if self.real_word.casefold() == self.generated_word.casefold():
            raise ProtocolError(f"real_word and generated_word must differ, both are {self.real_word!r}")

    # --- construction / files ---

    @classmethod
    def default(cls) -> "Protocol":
        return cls()

    def replace(self, **overrides: Any) -> "Protocol":
        """A validated copy with some fields changed (for caller overrides)."""
        _check_names(overrides, "override")
        return dc_replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "protocol") -> "Protocol":
        """Missing keys take defaults; unknown keys are an error (a typo would otherwise be silently ignored)."""
        if not isinstance(data, dict):
            raise ProtocolError(f"{source}: expected a JSON object, got {type(data).__name__}")
        _check_names(data, source)
        try:
            return cls(**data)
        except ProtocolError as e:
            raise ProtocolError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Protocol":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ProtocolError(f"{path}: protocol file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProtocolError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # --- prompts ---

    def verdict_word(self, label: VerdictLabel) -> str:
        if label not in VERDICT_LABELS:
            raise ValueError(f"verdict must be one of {VERDICT_LABELS}, got {label!r}")
        return self.real_word if label == "real" else self.generated_word

    def verdict_markup(self, label: VerdictLabel) -> str:
        return f"<{self.verdict_tag}>{self.verdict_word(label)}</{self.verdict_tag}>"

    def _verdict_fields(self) -> dict[str, str]:
        return {"real": self.real_word, "generated": self.generated_word, "tag": self.verdict_tag}

    def scan_prompt(self) -> str:
        return self.scan_instruction.format(max_boxes=self.max_boxes, box_spec=BOX_SPECS[self.box_format],
                                            **self._verdict_fields())

    def check_prompt(self, num_crops: int) -> str:
        return self.check_instruction.format(num_crops=num_crops, **self._verdict_fields())

    def crop_caption_text(self, index: int, box: Box) -> str:
        """Caption before crop `index` (0-based here, 1-based in the text)."""
        x1, y1, x2, y2 = (round(v) for v in box.as_tuple())
        return self.crop_caption.format(index=index + 1, label=box.label or self.default_label,
                                        x1=x1, y1=y1, x2=x2, y2=y2)

    def stage2_boxes(self, boxes: Sequence[Box], hw: Sequence[int]) -> list[Box] | None:
        """Regions query 2 examines: the parsed boxes, else the full image (or None: skip query 2)."""
        if boxes:
            return list(boxes)
        if not self.stage2_without_boxes:
            return None
        h, w = check_image_hw(hw)
        return [Box(0.0, 0.0, float(w), float(h), self.whole_image_label)]

    def scan_messages(self) -> list[dict[str, Any]]:
        """Query-1 conversation in chat-template form; its one image part is the full image."""
        msgs: list[dict[str, Any]] = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        msgs.append({"role": "user", "content": [{"type": "image", "source": "original"},
                                                 {"type": "text", "text": self.scan_prompt()}]})
        return msgs

    def check_messages(self, scan_answer: str, boxes: Sequence[Box]) -> list[dict[str, Any]]:
        """Query-2 conversation: query 1, its answer, then the captioned original image and crops.

        Image parts appear in order and say what they hold: {"source": "original"} or {"source": "crop",
        "index": i} (the crop of boxes[i]), so the caller knows which pixels go where.
        """
        parts: list[dict[str, Any]] = []
        if self.show_original_in_check:
            if self.original_caption:
                parts.append({"type": "text", "text": self.original_caption.format()})
            parts.append({"type": "image", "source": "original"})
        for i, box in enumerate(boxes):
            parts.append({"type": "text", "text": self.crop_caption_text(i, box)})
            parts.append({"type": "image", "source": "crop", "index": i})
        parts.append({"type": "text", "text": self.check_prompt(len(boxes))})
        return [*self.scan_messages(),
                {"role": "assistant", "content": [{"type": "text", "text": scan_answer}]},
                {"role": "user", "content": parts}]

    def format_answer(self, explanation: str, boxes: Sequence[Box | Sequence[Any]],
                      verdict: VerdictLabel | None) -> str:
        """A query-1 answer for teacher forcing, written the way the model is told to write it.

        verdict None leaves the verdict out (caller-supplied regions come without a preliminary verdict).
        `parse_boxes` reads back exactly these boxes (labels stripped) as long as they pass its filters
        (inside the image, at most `max_boxes`, ...) and `explanation` holds no box-like text or verdict tag.
        Pass integer coordinates to match what Qwen2.5-VL emits.
        """
        block = render_boxes([as_box(b) for b in boxes], self.box_format)
        text = self.answer_template.format(explanation=explanation.strip(), boxes=block,
                                           verdict="" if verdict is None else self.verdict_markup(verdict))
        return text.strip()


def _check_names(data: dict[str, Any], source: str) -> None:
    known = {f.name for f in fields(Protocol)}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise ProtocolError(f"{source}: unknown protocol key(s) {', '.join(map(repr, unknown))}; "
                            f"known keys: {', '.join(sorted(known))}")


def _check_template(name: str, template: str, sample: dict[str, Any]) -> None:
    try:
        used = {fname for _, fname, _, _ in string.Formatter().parse(template) if fname is not None}
    except ValueError as e:
        raise ProtocolError(f"protocol field {name!r}: malformed template ({e}); write literal braces as {{{{ }}}}")
    bad = sorted(used - set(sample))
    if bad:
        allowed = ", ".join("{" + k + "}" for k in sample) or "none"
        raise ProtocolError(f"protocol field {name!r} uses unknown field(s) {bad}; allowed: {allowed}")
    missing = [k for k in REQUIRED_FIELDS.get(name, ()) if k not in used]
    if missing:
        raise ProtocolError(f"protocol field {name!r} must contain {', '.join('{' + k + '}' for k in missing)}")
    try:
        template.format(**sample)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise ProtocolError(f"protocol field {name!r}: template does not format ({e})") from None
