"""Box, verdict and explanation parsing: every accepted format, the cleaning rules, and fuzzing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoomin.runtime.parse import Box, Verdict, explanation_text, find_box_spans, parse_boxes, parse_verdict
from zoomin.runtime.protocol import BOX_FORMATS, LABELLED_FORMATS, Protocol, render_box

P = Protocol.default()
HW = (480, 640)  # model-resized image: height, width


def boxes(text, hw=HW, max_boxes=None, max_area_frac=1.0):
    return parse_boxes(text, image_hw=hw, max_boxes=max_boxes, max_area_frac=max_area_frac)


def coords(text, **kw):
    return [(b.x1, b.y1, b.x2, b.y2, b.label) for b in boxes(text, **kw)]


# --- every accepted format ---

@pytest.mark.parametrize("text, expected", [
    ('{"bbox_2d": [10, 20, 110, 220], "label": "left hand"}', [(10, 20, 110, 220, "left hand")]),
    ('{"label": "face", "bbox_2d": [1.5,2.25, 30 ,40.0]}', [(1.5, 2.25, 30, 40, "face")]),
    ('{"bbox_2d": [10, 20, 110, 220]}', [(10, 20, 110, 220, None)]),
    ('{"bbox_2d": [10, 20, 110, 220], "label": null}', [(10, 20, 110, 220, None)]),
    ('{"bbox_2d": [10, 20, 110, 220], "label": "  "}', [(10, 20, 110, 220, None)]),
    ('{"bbox_2d": [10, 20, 110, 220], "label": 7}', [(10, 20, 110, 220, "7")]),
    ('{"bbox": [[10, 20], [110, 220]], "label": "logo"}', [(10, 20, 110, 220, "logo")]),
    ('Regions:\n```json\n[\n\t{"bbox_2d": [1, 2, 30, 40], "label": "eye"},\n\t{"bbox_2d": [50, 60, 70, 80], '
     '"label": "text {garbled}"}\n]\n```', [(1, 2, 30, 40, "eye"), (50, 60, 70, 80, "text {garbled}")]),
    ('[{"bbox_2d": [1, 2, 30, 40], "label": "a",}, {"bbox_2d": [5, 6, 70, 80,], "label": "b"},]',
     [(1, 2, 30, 40, "a"), (5, 6, 70, 80, "b")]),
    ('{"bbox_2d": [1, 2, 30, 40], "label": "a", "occluded": false, "note": null,}', [(1, 2, 30, 40, "a")]),
    ("{'bbox_2d': [1, 2, 30, 40], 'label': 'hand'}", [(1, 2, 30, 40, "hand")]),
    ("{'bbox_2d': (1, 2, 30, 40), 'label': \"it's a hand\",}", [(1, 2, 30, 40, "it's a hand")]),
    ('{"bbox_2d": [1, 2, 30, 40], "label": {"bbox_2d": [5, 6, 70, 80]}}', [(1, 2, 30, 40, None)]),
    ('{"regions": [{"bbox_2d": [1, 2, 30, 40], "label": "nested"}], "n": 1}', [(1, 2, 30, 40, "nested")]),
    ('<|object_ref_start|>left eye<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>',
     [(10, 20, 30, 40, "left eye")]),
    ('<|object_ref_start|> sign text <|object_ref_end|> <|box_start|>( 10 , 20 ) , ( 30 , 40 )<|box_end|>',
     [(10, 20, 30, 40, "sign text")]),
    ('<|box_start|>(10,20),(30,40)<|box_end|>', [(10, 20, 30, 40, None)]),
    ('<|object_ref_start|>ear<|object_ref_end|><|box_start|>[10, 20, 30, 40]<|box_end|>',
     [(10, 20, 30, 40, "ear")]),
    ('the hand [[10, 20], [30.5, 40]] looks odd', [(10, 20, 30.5, 40, None)]),
    ('[[10,20],[30,40]]', [(10, 20, 30, 40, None)]),
    ('box [10, 20, 30, 40] here', [(10, 20, 30, 40, None)]),
    ('[ 10.5 ,20,  30 , 4e1 ]', [(10.5, 20, 30, 40, None)]),
    ('[+1, 2, 3, 4] [.5, 2., 30, 40]', [(1, 2, 3, 4, None), (0.5, 2, 30, 40, None)]),
])
def test_formats(text, expected):
    assert coords(text) == expected


def test_mixed_formats_keep_order_of_appearance():
    text = ('First [100, 100, 150, 150]; then <|object_ref_start|>eye<|object_ref_end|><|box_start|>(1,1),(20,20)'
            '<|box_end|>, then {"bbox_2d": [5, 5, 60, 60], "label": "hand"} and [[7, 7], [70, 70]].')
    assert coords(text) == [(100, 100, 150, 150, None), (1, 1, 20, 20, "eye"), (5, 5, 60, 60, "hand"),
                            (7, 7, 70, 70, None)]
    assert [text[s:e] for s, e in find_box_spans(text)] == [
        "[100, 100, 150, 150]", "<|object_ref_start|>eye<|object_ref_end|><|box_start|>(1,1),(20,20)<|box_end|>",
        '{"bbox_2d": [5, 5, 60, 60], "label": "hand"}', "[[7, 7], [70, 70]]"]


@pytest.mark.parametrize("text", [
    "[1, 2, 3]", "[1, 2, 3, 4, 5]", "[a, b, c, d]", "(10,20),(30,40)", '{"bbox_2d": [1, 2, 3]}',
    '{"bbox_2d": "1, 2, 30, 40"}', '{"bbox_2d": [true, 2, 30, 40]}', '{"bbox_2d": ["a", 2, 30, 40]}',
    "<|box_start|>(10,20)<|box_end|>", "", "no boxes here, only 1, 2, 30 and 40",
])
def test_not_boxes(text):
    assert boxes(text) == []


def test_truncated_json_still_yields_the_coordinates():
    assert coords('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "fa') == [(10, 20, 30, 40, None)]


# --- cleaning ---

def test_reversed_corners_are_swapped_and_boxes_clamped():
    assert coords("[110, 220, 10, 20] [30, 10, 5, 40]") == [(10, 20, 110, 220, None), (5, 10, 30, 40, None)]
    assert coords("[-15, -3.5, 700, 100] [600, 400, 900, 999]") == [(0, 0, 640, 100, None),
                                                                    (600, 400, 640, 480, None)]
    got = boxes("[-15, -3.5, 700, 100]")[0]
    assert all(type(v) is float for v in (got.x1, got.y1, got.x2, got.y2))


@pytest.mark.parametrize("text", [
    "[10, 20, 10, 40]",  # zero width
    "[10, 20, 10.9, 40]",  # under 1 px wide
    "[10, 20, 30, 20.5]",  # under 1 px high
    "[700, 10, 800, 40]",  # entirely right of the image: zero width after clamping
    "[-50, -50, -10, -10]",  # entirely above-left
    "[639.5, 10, 700, 40]",  # half a pixel left after clamping
    '{"bbox_2d": [NaN, 1, 30, 40]}',  # JSON allows NaN and Infinity
    '{"bbox_2d": [1, 1, Infinity, 40]}',
    "[1, 1, 1e999, 40]",  # overflows to inf
    '{"bbox_2d": [1, 1, 1' + "0" * 400 + ', 40]}',  # an integer too large for a float
])
def test_degenerate_boxes_are_dropped(text):
    assert boxes(text) == []


def test_oversized_boxes_are_dropped():
    h, w = HW
    whole = f"[0, 0, {w}, {h}]"
    assert boxes(whole, max_area_frac=0.5) == []
    assert coords(whole, max_area_frac=1.0) == [(0, 0, w, h, None)]
    assert boxes("[-100, -100, 900, 900]", max_area_frac=0.99) == []  # whole image after clamping
    half = f"[0, 0, {w // 2}, {h}]"  # exactly half is kept, anything more is not
    assert len(boxes(half, max_area_frac=0.5)) == 1
    assert boxes(f"[0, 0, {w // 2 + 1}, {h}]", max_area_frac=0.5) == []


def test_duplicates_are_dropped_keeping_the_first():
    text = ('{"bbox_2d": [1, 2, 30, 40], "label": "a"} [1, 2, 30, 40] [30, 40, 1, 2] '
            '<|object_ref_start|>b<|object_ref_end|><|box_start|>(1,2),(30,40)<|box_end|> [-5, 2, 30, 40] '
            '[0, 2, 30, 40]')
    assert coords(text) == [(1, 2, 30, 40, "a"), (0, 2, 30, 40, None)]


def test_count_is_capped_after_filtering():
    text = "[0, 0, 0, 9] " + " ".join(f"[{i}, {i}, {i + 10}, {i + 10}]" for i in range(6))
    assert [b.x1 for b in boxes(text, max_boxes=4)] == [0, 1, 2, 3]
    assert boxes(text, max_boxes=0) == []
    assert len(boxes(text, max_boxes=None)) == 6


@pytest.mark.parametrize("kw, needle", [
    ({"image_hw": (0, 10)}, "image_hw must be positive"),
    ({"image_hw": (10,)}, "image_hw must be"),
    ({"image_hw": (10.5, 10)}, "image_hw must be"),
    ({"max_area_frac": 0}, "max_area_frac"),
    ({"max_area_frac": 1.01}, "max_area_frac"),
    ({"max_boxes": -1}, "max_boxes"),
])
def test_bad_arguments(kw, needle):
    args = {"image_hw": HW, "max_boxes": 4, "max_area_frac": 0.5, **kw}
    with pytest.raises(ValueError, match=needle):
        parse_boxes("[1, 2, 3, 4]", **args)


def test_numpy_image_size():
    assert coords("[1, 2, 3, 4]", hw=np.array([480, 640])) == [(1, 2, 3, 4, None)]


# --- verdict ---

@pytest.mark.parametrize("text, label, word", [
    ("It is fake. <verdict>generated</verdict>", "generated", "generated"),
    ("<verdict>real</verdict>", "real", "real"),
    ("<verdict> REAL </verdict>", "real", "REAL"),
    ("< Verdict >\n  Generated.\n</ VERDICT >", "generated", "Generated"),
    ("<verdict>**generated**</verdict>", "generated", "generated"),
    ('<verdict>"real"</verdict>', "real", "real"),
    ("<verdict>real</verdict> on second look <verdict>generated</verdict>", "generated", "generated"),
    ("<verdict>generated</verdict> ... <verdict>real</verdict><|im_end|>", "real", "real"),
    ("first <verdict>real</verdict> then truncated <verdict>generated", "generated", "generated"),
    ("<verdict>generated<|im_end|>", "generated", "generated"),
    ("no tag at all: generated", None, None),
    ("<verdict>real or generated</verdict>", None, None),
    ("<verdict>generated</verdict> then <verdict>unsure</verdict>", None, None),
    ("<verdict></verdict>", None, None),
    ("<verdict>realistic</verdict>", None, None),
    ("<verdict>fake</verdict>", None, None),
    ("</verdict>real", None, None),
    ("", None, None),
])
def test_verdict(text, label, word):
    v = parse_verdict(text, P)
    assert isinstance(v, Verdict) and v.raw == text
    assert v.label == label and v.word == word
    if label is not None:
        s, e = v.span
        assert text[s:e] == word and text[s:e].casefold() == label
    else:
        assert v.span is None


def test_verdict_custom_protocol():
    p = P.replace(real_word="Authentic", generated_word="AI-made", verdict_tag="answer")
    assert parse_verdict("<answer>ai-made</answer>", p).label == "generated"
    assert parse_verdict("<answer> authentic </answer>", p).label == "real"
    assert parse_verdict("<verdict>generated</verdict>", p).label is None
    assert parse_verdict("<answer>generated</answer>", p).label is None


# --- explanation ---

def test_explanation_text():
    text = ("<think>The  left hand has six fingers.\n\n\n\n"
            '```json\n[\n  {"bbox_2d": [1, 2, 30, 40], "label": "hand"},\n  {"bbox_2d": [5, 6, 7, 8]}\n]\n```\n'
            "The sign <|object_ref_start|>sign<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|> is garbled"
            " [1, 2, 3, 4] .</think>\n<verdict>generated</verdict><|im_end|>")
    assert explanation_text(text) == "The left hand has six fingers.\n\nThe sign is garbled ."
    assert explanation_text("  Plain   text.\t \n") == "Plain text."
    assert explanation_text("ok <answer>real</answer>", P.replace(verdict_tag="answer")) == "ok"
    assert explanation_text("ok <verdict>real") == "ok"
    assert explanation_text("") == ""


# --- fuzzing ---

FRAGMENTS = st.sampled_from([
    "[", "]", "{", "}", "(", ")", ",", " ", "\n", ":", "'", '"', "-", ".", "e", "0", "7", "12.5", "-3", "1e999",
    "NaN", "Infinity", "640", "480", '"bbox_2d"', '"label"', "'bbox_2d'", "bbox_2d", "```json", "<|box_start|>",
    "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<verdict>", "</verdict>", "< verdict >",
    "real", "generated", "REAL", "<think>", "</think>", "<|im_end|>", "[[", "]]", "true", "null",
])
SOUP = st.lists(FRAGMENTS | st.text(max_size=8), max_size=80).map("".join)


def check_invariants(found, hw, max_boxes, frac):
    h, w = hw
    assert max_boxes is None or len(found) <= max_boxes
    assert len({b.as_tuple() for b in found}) == len(found)
    for b in found:
        assert isinstance(b, Box) and all(isinstance(v, float) and math.isfinite(v) for v in b.as_tuple())
        assert 0 <= b.x1 and b.x1 + 1 <= b.x2 <= w and 0 <= b.y1 and b.y1 + 1 <= b.y2 <= h
        assert b.area / (w * h) <= frac
        assert b.label is None or (isinstance(b.label, str) and b.label == b.label.strip() and b.label)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text() | SOUP, h=st.integers(1, 2000), w=st.integers(1, 2000),
       max_boxes=st.none() | st.integers(0, 6), frac=st.floats(0.01, 1.0))
def test_fuzz_never_raises_and_boxes_are_valid(text, h, w, max_boxes, frac):
    found = parse_boxes(text, image_hw=(h, w), max_boxes=max_boxes, max_area_frac=frac)
    check_invariants(found, (h, w), max_boxes, frac)
    v = parse_verdict(text, P)
    assert v.raw == text and v.label in (None, "real", "generated")
    if v.label is not None:
        assert text[v.span[0]:v.span[1]].casefold() == v.label
    assert isinstance(explanation_text(text), str)


def test_fuzz_pathological_inputs_are_fast():
    import time

    texts = ["{" * 5000, "[" * 5000 + "1", '{"a":' * 3000, "<|object_ref_start|>" * 2000 + "<|box_start|>",
             "[1, 2, 3, " * 3000, "{'bbox_2d': [" + "1" * 5000 + ", 2, 3, 4]}", "<verdict>" * 5000,
             '{"bbox_2d": [1, 2, 3, 4], "label":' * 3000, '[{"bbox_2d": [1, 2, 3, 4]},' * 3000]
    t0 = time.perf_counter()
    for text in texts:
        check_invariants(boxes(text, max_boxes=4), HW, 4, 1.0)
        parse_verdict(text, P)
        explanation_text(text)
    assert time.perf_counter() - t0 < 5.0


COORD = st.integers(-200, 1200) | st.floats(-200, 1200, allow_nan=False, allow_infinity=False)
FILLER = st.text(st.characters(exclude_characters="[]{}<>|`", exclude_categories=("Cs",)), max_size=40)


def reference_clean(raw, hw, max_boxes, frac):
    """The cleaning rules written out independently with numpy: order corners, clamp, drop thin, big, repeated."""
    h, w = hw
    out, seen = [], set()
    for x1, y1, x2, y2, label in raw:
        xs = np.clip(np.sort([x1, x2]).astype(np.float64), 0, w)
        ys = np.clip(np.sort([y1, y2]).astype(np.float64), 0, h)
        bw, bh = xs[1] - xs[0], ys[1] - ys[0]
        key = (float(xs[0]), float(ys[0]), float(xs[1]), float(ys[1]))
        if bw < 1 or bh < 1 or bw * bh / (w * h) > frac or key in seen:
            continue
        seen.add(key)
        out.append(Box(*key, label=label))
    return out[:max_boxes]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), h=st.integers(1, 1000), w=st.integers(1, 1000), max_boxes=st.integers(0, 6),
       frac=st.sampled_from([0.5, 1.0, 0.05]))
def test_rendered_boxes_parse_back(data, h, w, max_boxes, frac):
    raw, text = [], data.draw(FILLER)
    for _ in range(data.draw(st.integers(0, 7))):
        fmt = data.draw(st.sampled_from(BOX_FORMATS))
        x1, y1, x2, y2 = (data.draw(COORD) for _ in range(4))
        label = None
        if fmt in LABELLED_FORMATS:
            alphabet = st.characters(exclude_characters="<") if fmt == "qwen" else st.characters()
            label = data.draw(st.none() | st.text(alphabet, max_size=20))
        text += render_box(Box(x1, y1, x2, y2, label), fmt) + data.draw(FILLER)
        raw.append((x1, y1, x2, y2, (label or "").strip() or None))
    found = parse_boxes(text, image_hw=(h, w), max_boxes=max_boxes, max_area_frac=frac)
    assert found == reference_clean(raw, (h, w), max_boxes, frac)
    check_invariants(found, (h, w), max_boxes, frac)
