"""The two-query ZoomIn job on the ONNX engine against (a) itself without KV reuse and (b) transformers.

Greedy fp32 output must be token-identical for both queries; the counters must show that query 2 prefilled
only the new turn and that the system prompt was computed once per loaded engine.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from zoomin.runtime import ZoomIn

MAX_NEW = 24
REGIONS = {
    "none": None,  # the model's own boxes (random weights: usually none survive -> whole image)
    "zero": [],  # caller says: no boxes
    "one": [((40, 30, 200, 180), "face")],
    "three": [(10, 10, 120, 90), ((100, 60, 260, 250), "hand"), ((0, 0, 60, 400), "text")],
}


class Recorder:
    """Wraps a backend's `run` to keep each query's generated token ids and counters."""

    def __init__(self, zi: ZoomIn):
        self.calls = []
        inner = zi.lm.run

        def run(ids, images, **kw):
            g = inner(ids, images, **kw)
            self.calls.append((np.asarray(ids).copy(), list(g.tokens), g))
            return g

        zi.lm.run = run

    def take(self):
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture(scope="module", params=["tiny", "small"])
def trio(request):
    from zoomin.hf_backend import load_hf

    engine = request.getfixturevalue(f"{request.param}_engine")
    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    zis = {"reuse": ZoomIn.load(engine), "recompute": ZoomIn.load(engine, reuse=False), "hf": load_hf(ckpt)}
    return {name: (zi, Recorder(zi)) for name, zi in zis.items()}


# every region variant on the non-square photo; the square and the tall image with their own and one box
CASES = [("coffee", r) for r in REGIONS] + [(img, r) for img in ("astronaut", "tall") for r in ("none", "one")]


@pytest.mark.parametrize("image,regions", CASES)
def test_token_identical_across_backends(trio, photos, image, regions):
    outs = {}
    for name, (zi, rec) in trio.items():
        result = zi.detect(photos[image], regions=REGIONS[regions], max_new_tokens=MAX_NEW)
        outs[name] = (result, rec.take())
    ref_result, ref_calls = outs["hf"]
    for name in ("reuse", "recompute"):
        result, calls = outs[name]
        assert len(calls) == len(ref_calls) == 2
        for (ids, toks, _), (ref_ids, ref_toks, _) in zip(calls, ref_calls):
            np.testing.assert_array_equal(ids, ref_ids)  # same conversation, token for token
            assert toks == ref_toks, f"{name}: generated ids differ from transformers"
        assert result.final_text == ref_result.final_text
        assert result.verdict == ref_result.verdict
        assert [r.box for r in result.boxes] == [r.box for r in ref_result.boxes]
    # the stage-1 conversation (prompt + answer) is the prefix of the stage-2 conversation
    (ids1, toks1, _), (ids2, _, _) = outs["reuse"][1]
    np.testing.assert_array_equal(ids2[: len(ids1) + len(toks1)], np.concatenate([ids1, toks1]))
    if regions in ("one", "three"):
        assert len(outs["reuse"][0].boxes) == len(REGIONS[regions])
        assert outs["reuse"][0].tokens["crops"] == len(REGIONS[regions])


def test_stage2_prefills_only_the_new_turn(trio, photos):
    zi, rec = trio["reuse"]
    r = zi.detect(photos["coffee"], regions=REGIONS["one"], max_new_tokens=MAX_NEW)
    (ids1, forced, g1), (ids2, _, g2) = rec.take()
    t = r.tokens
    assert t["reused_prefix"] == len(ids1) + len(forced) == g2.reused_tokens  # stage 1 entirely reused
    assert t["stage2_prefill"] == len(ids2) - t["reused_prefix"] > 0
    zr, rec_r = trio["recompute"]
    r0 = zr.detect(photos["coffee"], regions=REGIONS["one"], max_new_tokens=MAX_NEW)
    rec_r.take()
    assert r0.tokens["reused_prefix"] == 0 and r0.tokens["stage2_prefill"] == t["stage2_prompt"]


def test_system_prefix_computed_once_per_engine(trio, photos):
    zi, rec = trio["reuse"]
    zi.detect(photos["astronaut"], max_new_tokens=4)
    r = zi.detect(photos["camera"], max_new_tokens=4)
    rec.take()
    ids = zi.scan_ids(zi.preprocess(photos["camera"]))
    first_image = int(np.flatnonzero(ids == zi.config.tokens.image_pad)[0])
    # everything before the image (system turn, user header, <|vision_start|>) came from the cache
    assert r.tokens["system_prefix_reused"] == first_image
    assert r.tokens["stage1_prefill"] == len(ids) - first_image


def test_kv_cache_is_preallocated(trio, photos):
    zi, rec = trio["reuse"]
    cache = zi.lm.cache
    buffers = [b.ctypes.data for b in cache.keys]
    zi.detect(photos["astronaut"], regions=REGIONS["three"], max_new_tokens=MAX_NEW)
    rec.take()
    assert zi.lm.cache is cache and [b.ctypes.data for b in cache.keys] == buffers


def test_result_fields(trio, photos):
    zi, rec = trio["reuse"]
    r = zi.detect(photos["coffee"], regions=REGIONS["three"], max_new_tokens=8)
    rec.take()
    d = r.to_dict()
    assert d["image_size"] == [600, 400] or d["image_size"] == (600, 400)
    for stage in ("decode", "preprocess", "vision_full", "stage1_prefill", "stage1_decode", "crop",
                  "vision_crops", "stage2_prefill", "stage2_decode", "total"):
        assert d["timings_ms"][stage] >= 0
    for region, given in zip(r.boxes, REGIONS["three"]):
        coords = given[0] if isinstance(given[1], str) else given
        # boxes come back in original pixels, within the rounding of the model grid (600x400 -> 644x420 max)
        assert np.allclose(region.box, np.clip(coords, 0, [600, 400, 600, 400]), atol=2.5)
        x1, y1, x2, y2 = region.crop
        assert 0 <= x1 < x2 <= 600 and 0 <= y1 < y2 <= 400
    assert r.boxes[1].label == "hand" and r.boxes[0].label is None
    assert r.verdict in (None, "real", "generated") and (r.score is None or 0 <= r.score <= 1)


def test_bad_image_in_a_batch(trio, photos, tmp_path):
    zi, rec = trio["reuse"]
    bad = tmp_path / "notes.jpg"
    bad.write_text("definitely not a JPEG")
    out = list(zi.detect_many([photos["astronaut"], str(bad), photos["tall"]], max_new_tokens=4))
    rec.take()
    assert [o[2] is None for o in out] == [True, False, True]
    assert "notes.jpg" in out[1][2] and "not an image" in out[1][2]


def test_runtime_import_is_lean(tiny_engine, photos, tmp_path):
    """Loading an engine and running detect pulls in neither torch nor transformers."""
    img = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(img), photos["astronaut"][:, :, ::-1])
    code = (
        "import sys\nfrom zoomin import ZoomIn\n"
        f"r = ZoomIn.load({str(tiny_engine)!r}).detect({str(img)!r}, max_new_tokens=4)\n"
        "heavy = [m for m in ('torch', 'transformers', 'PIL', 'jinja2') if m in sys.modules]\n"
        "assert not heavy, heavy\nprint('ok', r.tokens['stage1_prompt'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_zoom_regions_keep_the_generated_scan(trio, photos):
    """zoom_regions: query 1 generates as usual, query 2 zooms into the given regions; backends agree."""
    outs = {}
    for name, (zi, rec) in trio.items():
        r = zi.detect(photos["coffee"], zoom_regions=REGIONS["three"], max_new_tokens=MAX_NEW)
        outs[name] = (r, rec.take())
    for name in ("reuse", "recompute"):
        r, calls = outs[name]
        ref, ref_calls = outs["hf"]
        assert [c[1] for c in calls] == [c[1] for c in ref_calls]
        assert r.tokens["stage1_generated"] == len(calls[0][1]) > 0 and r.tokens["crops"] == 3
        if name == "reuse":  # query 1's generated answer is reused too (its last token, never run, is not)
            stopped = calls[0][2].stopped
            assert r.tokens["reused_prefix"] == len(calls[0][0]) + len(calls[0][1]) - (0 if stopped else 1)
        assert [b.label for b in r.boxes] == [None, "hand", "text"]


class _CountingDecoder:
    """The engine's decoder, recording how many positions each call ran."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward(self, embeds, positions, cache, logits_to_keep=1):
        self.sizes.append(len(embeds))
        return self.inner.forward(embeds, positions, cache, logits_to_keep)


def test_chunked_prefill_is_token_identical(trio, photos):
    """Prefill in chunks of 16 positions through the KV cache gives transformers' tokens, in many calls."""
    from dataclasses import replace

    from zoomin.runtime.lm import OnnxLM

    zi, rec = trio["reuse"]
    engine = replace(zi.lm.engine, decoder=_CountingDecoder(zi.lm.engine.decoder))
    chunked = ZoomIn(OnnxLM(engine, prefill_limit=16), zi.chat, zi.config, zi.protocol,
                     vocab_size=zi.config.text.vocab_size)
    hf, hf_rec = trio["hf"]
    for regions in ("one", "none"):
        got = chunked.detect(photos["coffee"], regions=REGIONS[regions], max_new_tokens=MAX_NEW)
        ref = hf.detect(photos["coffee"], regions=REGIONS[regions], max_new_tokens=MAX_NEW)
        hf_rec.take()
        assert (got.stage1_text, got.final_text) == (ref.stage1_text, ref.final_text)
    prefills = [s for s in engine.decoder.sizes if s > 1]
    assert max(prefills) == 16 and len(prefills) > 2 * got.tokens["stage1_prefill"] // 16
