"""Never die silently: image token limits, out-of-memory as a per-image error, and `zoomin detect`'s worker process.

The tiny engine's preprocessor allows 64 image tokens (max_pixels 64*28*28); limits below that are exercised on
real photos, and sizes are checked against transformers' smart_resize and image processor.
"""

from __future__ import annotations

import json
import warnings

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from zoomin.cli import main
from zoomin.runtime import ImageError, Protocol, ProtocolError, ZoomIn
from zoomin.runtime.manifest import EngineError
from zoomin.runtime.worker import KILL_ON_ENV, IsolatedZoomIn, WorkerError, describe_exit

MAX_NEW = 4
NAMES = ["astronaut.jpg", "broken.jpg", "camera.png", "coffee.png", "tall.png"]
FACTOR = 28


@pytest.fixture(scope="module")
def files(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("limits")
    cv2.imwrite(str(d / "astronaut.jpg"), photos["astronaut"][:, :, ::-1])  # 512x512
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    cv2.imwrite(str(d / "camera.png"), photos["camera"])  # 512x512 gray
    cv2.imwrite(str(d / "coffee.png"), photos["coffee"][:, :, ::-1])  # 600x400
    cv2.imwrite(str(d / "tall.png"), photos["tall"][:, :, ::-1])  # 90x300
    cv2.imwrite(str(d / "small.png"), photos["coffee"][100:200, 200:300, ::-1])  # 100x100
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def records(path):
    return {r["path"].rsplit("/", 1)[1]: r for r in map(json.loads, path.read_text().splitlines())}


def without(record, *keys):
    return {k: v for k, v in record.items() if k not in keys}


def natural_tokens(h, w, image_cfg):
    """What transformers' processor gives the image: (resized height, width) and its <|image_pad|> count."""
    rh, rw = hf_smart_resize(h, w, FACTOR, image_cfg.min_pixels, image_cfg.max_pixels)
    return (rh, rw), rh * rw // FACTOR**2


@pytest.fixture(scope="module")
def inprocess(tiny_engine, files, tmp_path_factory):
    """Reference records of an in-process (--no-isolate) run over all files."""
    out = tmp_path_factory.mktemp("ref") / "r.jsonl"
    res = run("detect", *(files / n for n in NAMES), "--engine", tiny_engine, "--json", out, "--max-new-tokens",
              MAX_NEW, "--no-isolate")
    assert res.exit_code == 1 and f"1 of {len(NAMES)} images failed" in res.output
    return records(out)


# --- protocol fields ---------------------------------------------------------------------------------------------


def test_protocol_fields_round_trip_and_validate(tmp_path, tiny_engine):
    p = Protocol.default()
    assert p.max_image_tokens == 4096 and p.oversize == "downscale"
    assert p.replace(max_image_tokens=None).max_image_tokens is None  # no limit beyond the preprocessor's
    path = tmp_path / "protocol.json"
    for q in (p, p.replace(max_image_tokens=256, oversize="refuse")):
        q.save(path)
        assert Protocol.load(path) == q
    assert json.loads(path.read_text())["max_image_tokens"] == 256
    old = {k: v for k, v in p.to_dict().items() if k not in ("max_image_tokens", "oversize")}
    path.write_text(json.dumps(old))  # a protocol.json written before the fields existed
    assert Protocol.load(path) == p
    for bad, needle in [({"max_image_tokens": 0}, "'max_image_tokens' must be >= 1 or null"),
                        ({"max_image_tokens": "256"}, "'max_image_tokens' must be int or null"),
                        ({"max_image_tokens": 256.0}, "'max_image_tokens' must be int or null"),
                        ({"max_image_tokens": True}, "'max_image_tokens' must be int or null"),
                        ({"oversize": "crop"}, "'oversize' must be one of ('downscale', 'refuse')"),
                        ({"oversize": None}, "'oversize' must be str")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ProtocolError, match="protocol.json") as e:
            Protocol.load(path)
        assert needle in str(e.value)
    zi = ZoomIn.load(tiny_engine, max_image_tokens=16, oversize="refuse")  # load's protocol overrides
    assert (zi.protocol.max_image_tokens, zi.protocol.oversize) == (16, "refuse")
    with pytest.raises(ProtocolError, match="'max_image_tokens'"):
        ZoomIn.load(tiny_engine, max_image_tokens=-1)


# --- downscale / refuse --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [20, 7])
def test_downscale_fits_the_limit_like_the_processor(tiny_engine, photos, limit):
    zi = ZoomIn.load(tiny_engine, max_image_tokens=limit)
    cfg = zi.config.image
    rgb = photos["coffee"]  # 600x400
    _, natural = natural_tokens(*rgb.shape[:2], cfg)
    assert natural > limit
    pre = zi.preprocess(rgb)
    assert pre.num_tokens <= limit
    max_pixels = limit * FACTOR**2  # the reference: the processor told to stay within the limit
    processor = Qwen2VLImageProcessorPil(min_pixels=min(cfg.min_pixels, max_pixels), max_pixels=max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = processor(images=Image.fromarray(rgb), return_tensors="np")
    np.testing.assert_array_equal(pre.grid_thw, ref["image_grid_thw"][0])
    np.testing.assert_array_equal(pre.pixel_values, ref["pixel_values"])
    # an image within the limit is left exactly as the unlimited engine sees it
    small = photos["coffee"][:60, :60]
    assert natural_tokens(60, 60, cfg)[1] <= limit
    assert np.array_equal(zi.preprocess(small).pixel_values, ZoomIn.load(tiny_engine).preprocess(small).pixel_values)


def test_downscaled_boxes_map_to_original_pixels(tiny_engine, photos):
    limit = 20
    given = [((100, 60, 260, 250), "hand"), (10, 10, 300, 200)]
    full = ZoomIn.load(tiny_engine).detect(photos["coffee"], regions=given, max_new_tokens=MAX_NEW)
    r = ZoomIn.load(tiny_engine, max_image_tokens=limit).detect(photos["coffee"], regions=given,
                                                                 max_new_tokens=MAX_NEW)
    rw, rh = r.model_size
    assert rw * rh // FACTOR**2 <= limit < full.model_size[0] * full.model_size[1] // FACTOR**2
    assert r.image_size == (600, 400)
    # the prompt holds exactly the fewer image tokens
    assert full.tokens["stage1_prompt"] - r.tokens["stage1_prompt"] == \
        (full.model_size[0] * full.model_size[1] - rw * rh) // FACTOR**2
    scale = max(600 / rw, 400 / rh)  # original pixels per model pixel: boxes are whole model pixels
    for region, g in zip(r.boxes, given):
        coords = g[0] if isinstance(g[1], str) else g
        assert np.allclose(region.box, coords, atol=0.5 * scale + 1e-6)
    assert [b.label for b in r.boxes] == ["hand", None]


def test_refuse_names_file_and_limit_and_the_batch_goes_on(tiny_engine, files, tmp_path):
    cfg = ZoomIn.load(tiny_engine).config.image
    names = ["astronaut.jpg", "small.png", "coffee.png"]
    out = tmp_path / "r.jsonl"
    res = run("detect", *(files / n for n in names), "--engine", tiny_engine, "--json", out, "--max-new-tokens",
              MAX_NEW, "--max-image-tokens", 16, "--oversize", "refuse")
    assert res.exit_code == 1 and "2 of 3 images failed" in res.output
    recs = records(out)
    assert list(recs) == names
    for name, (w, h) in [("astronaut.jpg", (512, 512)), ("coffee.png", (600, 400))]:
        (rh, rw), tokens = natural_tokens(h, w, cfg)
        msg = (f"{files / name}: {tokens} image tokens at {rw}x{rh} (resized from {w}x{h}) exceed the limit of 16 "
               f"(max_image_tokens; oversize=refuse)")
        assert recs[name] == {"path": str(files / name), "error": msg}
        assert f"error: {msg}\n" in res.output
    ok = recs["small.png"]
    assert ok["error"] is None and ok["model_size"] == [112, 112] and ok["tokens"]["stage2_prompt"] > 0
    # the same batch with the default policy: every image downscaled to fit, none fails
    res = run("detect", *(files / n for n in names), "--engine", tiny_engine, "--json", out, "--max-new-tokens",
              MAX_NEW, "--max-image-tokens", 16)
    assert res.exit_code == 0, res.output
    for r in records(out).values():
        w, h = r["model_size"]
        assert r["error"] is None and w * h // FACTOR**2 <= 16


def test_image_too_elongated_for_the_limit(tiny_engine):
    rgb = np.full((28, 28 * 100, 3), 128, np.uint8)  # even one 28-pixel row takes 100 tokens
    msg = (r"^thin\.png: cannot fit the limit of 4 image tokens \(max_image_tokens\): downscaled to 560x28 it still "
           r"takes 20$")  # 2800x28 shrinks to 560 wide, but stays one 28-pixel block high
    with pytest.raises(ImageError, match=msg):
        ZoomIn.load(tiny_engine, max_image_tokens=4).preprocess(rgb, "thin.png")


# --- out of memory inside one image --------------------------------------------------------------------------------


@pytest.mark.parametrize("error,detail", [
    (MemoryError("Unable to allocate 12.0 GiB for an array with shape (3, 65536, 16384)"),
     "MemoryError: Unable to allocate 12.0 GiB for an array with shape (3, 65536, 16384)"),
    (RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
                      "MatMul node. Status Message: bfc_arena.cc:376 Failed to allocate memory for requested buffer "
                      "of size 1073741824\nmore"),
     "onnxruntime.RuntimeException: Failed to allocate memory for requested buffer of size 1073741824"),
    (Fail("[ONNXRuntimeError] : 1 : FAIL : bad allocation"), "onnxruntime.Fail: bad allocation"),
    (cv2.error("OpenCV(5.1.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate 675000000 bytes in "
               "function 'OutOfMemoryError'"),
     "cv2.error: Insufficient memory) Failed to allocate 675000000 bytes in function 'OutOfMemoryError'"),
])
def test_out_of_memory_is_a_per_image_error(tiny_engine, files, monkeypatch, error, detail):
    """The error strikes in the middle of query 1's decoding; the images after it come out exactly as without it."""
    zi = ZoomIn.load(tiny_engine)
    batch = [str(files / n) for n in ("astronaut.jpg", "coffee.png", "tall.png")]
    zi.detect(batch[2], max_new_tokens=1)  # the system prompt's KV is cached from now on, in both runs below
    clean = {name: without(r.to_dict(), "timings_ms") for name, r, _ in
             zi.detect_many([batch[0], batch[2]], max_new_tokens=MAX_NEW)}
    current, calls = [], []
    decode, forward = zi.decode_image, zi.lm.engine.decoder.forward

    def decode_image(image):
        current.append(image)
        return decode(image)

    def failing_forward(*args, **kw):
        calls.append(current[-1])
        if current[-1] == batch[1] and calls.count(batch[1]) == 3:
            raise error
        return forward(*args, **kw)

    monkeypatch.setattr(zi, "decode_image", decode_image)
    monkeypatch.setattr(zi.lm.engine.decoder, "forward", failing_forward)
    out = list(zi.detect_many(batch, max_new_tokens=MAX_NEW))
    assert [(name, r is None, e) for name, r, e in out] == [
        (batch[0], False, None), (batch[1], True, f"{batch[1]}: out of memory ({detail})"), (batch[2], False, None)]
    for name, r, _ in (out[0], out[2]):
        assert without(r.to_dict(), "timings_ms") == clean[name]


def test_other_engine_failures_are_not_swallowed(tiny_engine, photos, monkeypatch):
    zi = ZoomIn.load(tiny_engine)

    def broken(*args, **kw):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Add node")

    monkeypatch.setattr(zi.lm.engine.decoder, "forward", broken)
    with pytest.raises(Fail, match="Add node"):
        list(zi.detect_many([photos["coffee"]], max_new_tokens=MAX_NEW))


# --- worker isolation ----------------------------------------------------------------------------------------------


def test_isolated_run_equals_in_process(tiny_engine, files, inprocess, tmp_path):
    out = tmp_path / "r.jsonl"
    res = run("detect", *(files / n for n in NAMES), "--engine", tiny_engine, "--json", out, "--max-new-tokens",
              MAX_NEW, "--annotate", tmp_path / "ann")
    assert res.exit_code == 1 and f"1 of {len(NAMES)} images failed" in res.output
    isolated = records(out)
    assert list(isolated) == NAMES
    assert "not an image" in isolated["broken.jpg"]["error"]
    for name in NAMES:
        assert without(isolated[name], "timings_ms") == without(inprocess[name], "timings_ms")
    assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == ["astronaut.png", "camera.png", "coffee.png",
                                                                   "tall.png"]


def test_worker_killed_mid_image(tiny_engine, files, inprocess, tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ON_ENV, "camera.png")
    names = ["astronaut.jpg", "camera.png", "coffee.png", "tall.png"]
    out = tmp_path / "r.jsonl"
    res = run("detect", *(files / n for n in names), "--engine", tiny_engine, "--json", out, "--max-new-tokens",
              MAX_NEW)
    assert res.exit_code == 1 and "1 of 4 images failed" in res.output
    recs = records(out)
    assert list(recs) == names
    msg = (f"{files / 'camera.png'}: the worker died while processing this image "
           f"(killed by signal 9 (SIGKILL), likely out of memory)")
    assert recs["camera.png"] == {"path": str(files / "camera.png"), "error": msg}
    assert f"error: {msg}\n" in res.output
    # a fresh worker took over: it computed the system prompt again for coffee.png, then reused it
    assert recs["coffee.png"]["tokens"]["system_prefix_reused"] == 0
    assert recs["tall.png"]["tokens"]["system_prefix_reused"] > 0
    prefix = ("system_prefix_reused", "stage1_prefill")  # what a fresh engine computes rather than reuses
    for name in ("astronaut.jpg", "coffee.png", "tall.png"):
        got, ref = recs[name], inprocess[name]
        assert without(got, "timings_ms", "tokens") == without(ref, "timings_ms", "tokens")
        assert without(got["tokens"], *prefix) == without(ref["tokens"], *prefix)
        assert sum(got["tokens"][k] for k in prefix) == sum(ref["tokens"][k] for k in prefix)


def test_worker_api_errors(tiny_engine, files, tmp_path):
    with pytest.raises(EngineError, match="engine directory not found"):
        IsolatedZoomIn(tmp_path / "none")
    with pytest.raises(ProtocolError, match="'oversize'"):
        IsolatedZoomIn(tiny_engine, oversize="shrink")
    with IsolatedZoomIn(tiny_engine) as zi:
        with pytest.raises(WorkerError, match="unexpected error(.|\n)*TypeError(.|\n)*bogus"):
            list(zi.detect_many([files / "tall.png"], bogus=1))  # a bug is not an image's error
        [(name, r, e)] = zi.detect_many([files / "tall.png"], max_new_tokens=MAX_NEW)  # the worker lives on
        assert name == str(files / "tall.png") and e is None and r.image_size == (90, 300)
        proc = zi._proc
    assert not proc.is_alive() and proc.exitcode == 0  # closing ends the worker cleanly
    assert describe_exit(-11) == "killed by signal 11 (SIGSEGV)" and describe_exit(3) == "exited with code 3"


def test_an_abandoned_batch_leaves_no_stale_answers(tiny_engine, files):
    """A detect_batch iterator dropped before its end (its worker's last messages unread): the next call gets its
    own answers, from a fresh worker, not the ones left in the pipe."""
    with IsolatedZoomIn(tiny_engine) as zi:
        batch = zi.detect_batch([files / "broken.jpg", files / "small.png"], max_batch=2, max_new_tokens=MAX_NEW)
        name, _, error = next(batch)
        assert name == str(files / "broken.jpg") and "not an image" in error
        first = zi._proc
        del batch
        [(name, r, e)] = zi.detect_batch([files / "tall.png"], max_batch=2, max_new_tokens=MAX_NEW)
        assert name == str(files / "tall.png") and e is None and r.image_size == (90, 300)
        assert zi._proc is not first
        assert zi.try_detect(files / "small.png", max_new_tokens=MAX_NEW)[0].image_size == (100, 100)


def test_decoder_out_of_memory_is_not_called_a_bad_image(tiny_engine, files, monkeypatch):
    """OpenCV's own allocation failure while decoding is an out-of-memory error, not 'not an image'."""
    from zoomin.runtime import image_io

    def no_memory(*args, **kw):
        e = cv2.error("OpenCV(5.1.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate 675000000 bytes")
        e.code, e.err = cv2.Error.StsNoMem, "Failed to allocate 675000000 bytes"
        raise e

    zi = ZoomIn.load(tiny_engine)
    monkeypatch.setattr(image_io.cv2, "imdecodeWithMetadata", no_memory)
    name = str(files / "coffee.png")
    [(got, result, error)] = list(zi.detect_many([name], max_new_tokens=MAX_NEW))
    assert result is None and error == f"{name}: out of memory (MemoryError: decoding {name}: Failed to allocate " \
                                       "675000000 bytes)"
