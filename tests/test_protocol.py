"""The ZoomIn protocol: JSON round trip, validation errors, prompts, conversations and teacher-forced answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoomin.runtime.parse import explanation_text, parse_boxes, parse_verdict
from zoomin.runtime.protocol import BOX_SPECS, Box, Protocol, ProtocolError, render_box

CUSTOM = Protocol.default().replace(
    real_word="Authentic", generated_word="AI-made", verdict_tag="answer", box_format="qwen", max_boxes=3,
    max_box_area_frac=0.4, answer_template="<think>{explanation}\n{boxes}</think>\n{verdict}",
    crop_caption="Crop #{index}: {label} @ ({x1},{y1})-({x2},{y2})", original_caption="",
    show_original_in_check=False, stage2_without_boxes=False,
)


def test_default_prompts_name_the_verdict_words_and_box_format():
    p = Protocol.default()
    scan = p.scan_prompt()
    assert "<verdict>real</verdict>" in scan and "<verdict>generated</verdict>" in scan
    assert BOX_SPECS["json"] in scan and "at most 4 regions" in scan
    assert "The 3 close-up" in p.check_prompt(3) and "<verdict>generated</verdict>" in p.check_prompt(3)
    assert p.crop_caption_text(0, Box(1.4, 2.6, 30.5, 40.49, "left hand")) == \
        "Region 1 (left hand), box [1, 3, 30, 40]:"
    assert p.crop_caption_text(2, Box(0, 0, 5, 5)) == "Region 3 (suspicious region), box [0, 0, 5, 5]:"
    custom = CUSTOM.scan_prompt()
    assert "<answer>Authentic</answer>" in custom and "<answer>AI-made</answer>" in custom
    assert BOX_SPECS["qwen"] in custom and "at most 3 regions" in custom
    assert CUSTOM.crop_caption_text(0, Box(1, 2, 3, 4, "eye")) == "Crop #1: eye @ (1,2)-(3,4)"


def test_json_round_trip_and_partial_files(tmp_path):
    path = tmp_path / "protocol.json"
    CUSTOM.save(path)
    assert Protocol.load(path) == CUSTOM
    assert json.loads(path.read_text())["verdict_tag"] == "answer"
    Protocol.default().save(path)
    assert Protocol.load(path) == Protocol.default()
    path.write_text(json.dumps({"max_boxes": 2, "max_box_area_frac": 1}))
    loaded = Protocol.load(path)
    assert loaded == Protocol.default().replace(max_boxes=2, max_box_area_frac=1.0)
    assert isinstance(loaded.max_box_area_frac, float)
    path.write_text("{}")
    assert Protocol.load(path) == Protocol.default()


@pytest.mark.parametrize("content, needle", [
    ({"max_boxes": 2, "max_boxs": 3}, "'max_boxs'"),
    ({"max_boxes": "4"}, "'max_boxes' must be int"),
    ({"stage2_without_boxes": "true"}, "'stage2_without_boxes' must be bool"),
    ({"max_boxes": True}, "'max_boxes' must be int"),
    ({"box_format": "xml"}, "'box_format'"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_files_name_the_file_and_key(tmp_path, content, needle):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ProtocolError) as e:
        Protocol.load(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ProtocolError, match="not found"):
        Protocol.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{max_boxes: 3")
    with pytest.raises(ProtocolError, match="bad.json: not valid JSON"):
        Protocol.load(tmp_path / "bad.json")


@pytest.mark.parametrize("overrides, needle", [
    ({"max_boxes": -1}, "'max_boxes' must be >= 0"),
    ({"crop_margin": -0.1}, "'crop_margin'"),
    ({"crop_margin": float("nan")}, "'crop_margin'"),
    ({"min_crop_size": 0}, "'min_crop_size'"),
    ({"crop_max_pixels": 0}, "'crop_max_pixels'"),
    ({"max_box_area_frac": 0.0}, "'max_box_area_frac'"),
    ({"max_box_area_frac": 1.5}, "'max_box_area_frac'"),
    ({"max_new_tokens_scan": 0}, "'max_new_tokens_scan'"),
    ({"max_new_tokens_check": 0}, "'max_new_tokens_check'"),
    ({"verdict_tag": "ver dict"}, "'verdict_tag'"),
    ({"real_word": "Generated"}, "must differ"),
    ({"real_word": " real"}, "'real_word'"),
    ({"generated_word": "fake."}, "'generated_word'"),
    ({"generated_word": ""}, "'generated_word'"),
    ({"scan_instruction": "Mark {max_regions} regions"}, "'scan_instruction' uses unknown field(s) ['max_regions']"),
    ({"crop_caption": "Region {}"}, "'crop_caption' uses unknown field"),
    ({"check_instruction": "Check {num_crops"}, "'check_instruction': malformed template"),
    ({"crop_caption": "Region {label:d}"}, "'crop_caption': template does not format"),
    ({"original_caption": "{index}"}, "'original_caption' uses unknown field"),
    ({"answer_template": "{explanation} {boxes}"}, "must contain {verdict}"),
    ({"max_boxs": 3}, "unknown protocol key(s) 'max_boxs'"),
    ({"system_prompt": None}, "'system_prompt' must be str"),
])
def test_replace_validates(overrides, needle):
    with pytest.raises(ProtocolError) as e:
        Protocol.default().replace(**overrides)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


def test_replace_keeps_other_fields():
    p = Protocol.default().replace(max_boxes=0, crop_margin=0)
    assert p.max_boxes == 0 and p.crop_margin == 0.0 and isinstance(p.crop_margin, float)
    assert p.replace() == p and p.system_prompt == Protocol.default().system_prompt


def test_stage2_boxes():
    p = Protocol.default()
    boxes = [Box(1, 2, 3, 4, "eye")]
    assert p.stage2_boxes(boxes, (100, 200)) == boxes
    assert p.stage2_boxes([], (100, 200)) == [Box(0, 0, 200, 100, "whole image")]
    assert p.replace(stage2_without_boxes=False).stage2_boxes([], (100, 200)) is None
    with pytest.raises(ValueError, match="image_hw"):
        p.stage2_boxes([], (0, 5))


def _images(messages):
    return [part for m in messages for part in m["content"] if part["type"] == "image"]


def test_conversations_render_with_the_checkpoint_chat_template(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    p = Protocol.default()
    boxes = [Box(10, 20, 30, 40, "left hand"), Box(5, 6, 50, 60)]
    answer = p.format_answer("Fingers are fused.", boxes, "generated")
    q1 = tok.apply_chat_template(p.scan_messages(), tokenize=False, add_generation_prompt=True)
    q2 = tok.apply_chat_template(p.check_messages(answer, boxes), tokenize=False, add_generation_prompt=True)
    # Query 2 extends query 1 (the KV cache of query 1 is reused) with its answer and the check turn.
    assert q2.startswith(q1)
    assert q1.count("<|vision_start|>") == 1 and q1.startswith("<|im_start|>system\n" + p.system_prompt)
    tail = q2[len(q1):]
    vis = "<|vision_start|><|image_pad|><|vision_end|>"
    assert tail == (answer + "<|im_end|>\n<|im_start|>user\nOriginal image:" + vis
                    + "Region 1 (left hand), box [10, 20, 30, 40]:" + vis
                    + "Region 2 (suspicious region), box [5, 6, 50, 60]:" + vis
                    + p.check_prompt(2) + "<|im_end|>\n<|im_start|>assistant\n")
    assert [i.get("index") for i in _images(p.check_messages(answer, boxes))] == [None, None, 0, 1]
    assert [i["source"] for i in _images(p.check_messages(answer, boxes))] == ["original"] * 2 + ["crop"] * 2
    # Without the original image and without a system prompt (the template then adds its own default).
    braces = p.replace(original_caption="Original {{full}} image:").check_messages(answer, boxes)
    assert braces[-1]["content"][0] == {"type": "text", "text": "Original {full} image:"}
    bare = p.replace(show_original_in_check=False, system_prompt="")
    msgs = bare.check_messages(answer, boxes[:1])
    assert [i["source"] for i in _images(msgs)] == ["original", "crop"]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert text.count("<|vision_start|>") == 2


def test_format_answer_layouts():
    p = Protocol.default()
    boxes = [(10, 20, 100, 200, " left hand "), Box(5.5, 6, 50, 60)]
    assert p.format_answer("  Odd hands. ", boxes, "generated") == (
        'Odd hands.\n```json\n[\n  {"bbox_2d": [10, 20, 100, 200], "label": "left hand"},\n'
        '  {"bbox_2d": [5.5, 6, 50, 60]}\n]\n```\n<verdict>generated</verdict>')
    assert p.format_answer("Fine.", [], "real") == "Fine.\n```json\n[\n]\n```\n<verdict>real</verdict>"
    assert CUSTOM.format_answer("Odd.", boxes, "real") == (
        "<think>Odd.\n<|object_ref_start|>left hand<|object_ref_end|><|box_start|>(10,20),(100,200)<|box_end|>\n"
        "<|box_start|>(5.5,6),(50,60)<|box_end|></think>\n<answer>Authentic</answer>")
    lst = p.replace(box_format="list")
    assert lst.format_answer("x", [(1, 2, 3, 4)], "real") == "x\n[1, 2, 3, 4]\n<verdict>real</verdict>"
    with pytest.raises(ValueError, match="cannot carry labels"):
        lst.format_answer("x", [(1, 2, 3, 4, "eye")], "real")
    with pytest.raises(ValueError, match="verdict must be one of"):
        p.format_answer("x", [], "fake")
    with pytest.raises(ValueError, match="not finite"):
        p.format_answer("x", [(1, 2, float("nan"), 4)], "real")
    with pytest.raises(ValueError, match="expected a Box"):
        p.format_answer("x", [(1, 2, 3)], "real")
    assert render_box(Box(1, 2, 3, 4, " eye\n"), "json") == '{"bbox_2d": [1, 2, 3, 4], "label": "eye"}'
    assert render_box(Box(1, 2, 3, 4, "  "), "qwen") == "<|box_start|>(1,2),(3,4)<|box_end|>"
    assert render_box(Box(1.25, -0.0, 1e20, 4), "pairs") == "[[1.25, 0], [1e+20, 4]]"
    with pytest.raises(ValueError, match="qwen box format"):
        render_box(Box(1, 2, 3, 4, "a<|box_end|>"), "qwen")


# Filler that cannot itself look like a box, a tag or a fence.
FILLER = st.text(st.characters(exclude_characters="[]{}<>|`", exclude_categories=("Cs",)), max_size=60)
LABEL = st.none() | st.text(st.characters(exclude_characters="<", exclude_categories=("Cs",)), max_size=30)


@st.composite
def valid_boxes(draw, h, w, max_boxes, max_frac):
    """Distinct integer boxes inside the image that pass every filter, as teacher forcing would supply them."""
    out, seen = [], set()
    for _ in range(draw(st.integers(0, max_boxes))):
        x1 = draw(st.integers(0, w - 1))
        y1 = draw(st.integers(0, h - 1))
        x2 = draw(st.integers(x1 + 1, w))
        y2 = draw(st.integers(y1 + 1, h))
        if (x2 - x1) * (y2 - y1) / (w * h) > max_frac or (x1, y1, x2, y2) in seen:
            continue
        seen.add((x1, y1, x2, y2))
        out.append(Box(x1, y1, x2, y2, draw(LABEL)))
    return out


@pytest.mark.parametrize("protocol", [Protocol.default(), CUSTOM], ids=["default", "custom"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_format_answer_parses_back(protocol, data):
    h, w = data.draw(st.integers(28, 1000)), data.draw(st.integers(28, 1000))
    boxes = data.draw(valid_boxes(h, w, protocol.max_boxes, protocol.max_box_area_frac))
    explanation = data.draw(FILLER)
    verdict = data.draw(st.sampled_from(["real", "generated"]))
    answer = protocol.format_answer(explanation, boxes, verdict)
    got = parse_boxes(answer, image_hw=(h, w), max_boxes=protocol.max_boxes,
                      max_area_frac=protocol.max_box_area_frac)
    assert got == [Box(b.x1, b.y1, b.x2, b.y2, (b.label or "").strip() or None) for b in boxes]
    v = parse_verdict(answer, protocol)
    assert v.label == verdict and v.word == protocol.verdict_word(verdict)
    assert explanation_text(answer, protocol) == explanation_text(explanation, protocol)


def test_runtime_modules_import_no_heavy_dependencies():
    code = ("import sys, zoomin.runtime.protocol, zoomin.runtime.parse; "
            "bad = [m for m in ('torch', 'transformers', 'PIL') if m in sys.modules]; print(bad); assert not bad")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
