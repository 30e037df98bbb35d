"""`zoomin serve` over real HTTP on loopback: answers equal the direct API, limits answer clear JSON errors, the queue
refuses with 429 when full, /metrics counters move, and a graceful shutdown finishes what it admitted."""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest
import uvicorn

from zoomin.runtime import ZoomIn
from zoomin.serve import ServeConfig, create_app
from zoomin.serve.app import load_engine_detectors

MAX_NEW = 16


class Server:
    """uvicorn on an ephemeral loopback port, in a thread; `stop()` is uvicorn's graceful shutdown (as SIGTERM)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=60))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "engine did not load"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


class Gate:
    """A real ZoomIn whose jobs wait for `release` before running: makes queueing deterministic."""

    def __init__(self, zi: ZoomIn):
        self.zi, self.release, self.started = zi, threading.Event(), threading.Semaphore(0)

    def detect(self, image, **kw):
        self.started.release()
        assert self.release.wait(60)
        return self.zi.detect(image, **kw)


def gated(gates: list[Gate]):
    """load_detectors for create_app: the engine's ZoomIn behind a Gate, which is appended to `gates`."""
    def load(cfg):
        zis, info = load_engine_detectors(cfg)
        gates.append(Gate(zis[0]))
        return gates, info

    return load


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def expected(zi: ZoomIn, data: bytes, **kw) -> dict:
    d = zi.detect(data, max_new_tokens=MAX_NEW, **kw).to_dict()
    d.pop("timings_ms")
    return d


def strip(record: dict) -> dict:
    record = dict(record)
    record.pop("timings_ms")
    record.pop("path")
    assert record.pop("error") is None
    return canon(record)


def canon(d: dict) -> dict:
    """JSON form (tuples -> lists), without the counters that depend on what the engine computed before (whether
    the system-prompt prefix was already cached)."""
    d = json.loads(json.dumps(d))
    for key in ("system_prefix_reused", "stage1_prefill"):
        d["tokens"].pop(key)
    return d


@pytest.fixture(scope="module")
def direct(tiny_engine):
    return ZoomIn.load(tiny_engine)


@pytest.fixture(scope="module")
def server(tiny_engine):
    s = Server(create_app(ServeConfig(engine=tiny_engine, max_body_bytes=2 << 20, max_image_pixels=2_000_000)))
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def images(photos):
    rng = np.random.default_rng(3)
    noise = (rng.random((97, 151, 3)) * 255).astype(np.uint8)
    return {"coffee.png": png(photos["coffee"]), "camera.png": png(photos["camera"][..., None].repeat(3, 2)),
            "tall.png": png(photos["tall"]), "noise.jpg": cv2.imencode(".jpg", noise)[1].tobytes()}


def test_concurrent_answers_equal_the_direct_api(server, direct, images):
    """Mixed sizes, both upload forms, one with caller regions, sent concurrently."""
    cases = [(name, data, None) for name, data in images.items()]
    cases.append(("coffee.png", images["coffee.png"], [[[40, 30, 200, 180], "face"]]))

    def send(i, case):
        name, data, regions = case
        params = {"max_new_tokens": str(MAX_NEW)}
        if regions is not None:
            params["regions"] = json.dumps(regions)
        if i % 2:
            return httpx.post(server.url + "/v1/detect", params=params, content=data,
                              headers={"content-type": "image/png"}, timeout=120)
        return httpx.post(server.url + "/v1/detect", data=params, files={"image": (name, data)}, timeout=120)

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(send, range(len(cases)), cases))
    for i, ((name, data, regions), r) in enumerate(zip(cases, answers)):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["path"] == (name if i % 2 == 0 else "<body>")
        assert set(body["timings_ms"]) >= {"decode", "preprocess", "total"}
        want = expected(direct, data, regions=[((40, 30, 200, 180), "face")] if regions else None)
        assert strip(body) == canon(want), name


def test_batch_form_keeps_order_and_per_image_errors(server, direct, images):
    files = [("images", ("coffee.png", images["coffee.png"])), ("images", ("broken.jpg", b"\xff\xd8 not a jpeg")),
             ("images", ("tall.png", images["tall.png"]))]
    r = httpx.post(server.url + "/v1/detect", data={"max_new_tokens": str(MAX_NEW)}, files=files, timeout=120)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["path"] for x in results] == ["coffee.png", "broken.jpg", "tall.png"]
    assert results[1]["status"] == 422 and "broken.jpg" in results[1]["error"] and "decode" in results[1]["error"]
    assert strip(results[0]) == canon(expected(direct, images["coffee.png"]))
    assert strip(results[2]) == canon(expected(direct, images["tall.png"]))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, with a few bytes of (truncated) data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + b"\x00" * 64)


@pytest.mark.parametrize("kwargs,status,field,words", [
    ({"params": {"max_new_tokens": "many"}}, 400, "max_new_tokens", "not an integer"),
    ({"params": {"max_new_tokens": "0"}}, 400, "max_new_tokens", "outside"),
    ({"params": {"regions": "[[1, 2, 3]"}}, 400, "regions", "not JSON"),
    ({"params": {"zoom_regions": "[[10, 10, 5, 20]]"}}, 400, "zoom_regions", "empty"),
    ({"params": {"regions": '[["a", 1, 2, 3]]'}}, 400, "regions", "four finite numbers"),
    ({"params": {"colour": "red"}}, 400, "colour", "unknown parameter"),
    ({"content": b"", "headers": {"content-type": "image/png"}}, 415, None, "no image"),
    ({"content": b"not an image at all", "headers": {"content-type": "image/jpeg"}}, 422, None, "cannot decode"),
    ({"content": bomb_png(100_000, 100_000), "headers": {"content-type": "image/png"}}, 413, None,
     "100000x100000 = 10000000000 pixels exceeds the limit of 2000000"),
    ({"content": b"\x00" * (3 << 20), "headers": {"content-type": "image/png"}}, 413, None, "exceeds the limit"),
    ({"files": {"picture": ("a.png", b"x")}}, 400, "picture", "unexpected file field"),
    ({"json": {"image": "base64?"}}, 415, None, "not an image"),
])
def test_bad_requests_get_clear_json_errors(server, images, kwargs, status, field, words):
    kwargs = dict(kwargs)
    if "params" in kwargs and "content" not in kwargs:
        kwargs.update(content=images["noise.jpg"], headers={"content-type": "image/jpeg"})
    r = httpx.post(server.url + "/v1/detect", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert words in body["error"]
    assert "Traceback" not in body["error"] and "\n" not in body["error"]
    if field is not None:
        assert body["field"] == field


def test_image_over_the_pixel_limit_is_refused_after_decoding_too(tiny_engine, photos):
    """A format whose header is not read (TIFF) is still held to the limit, right after decoding."""
    s = Server(create_app(ServeConfig(engine=tiny_engine, max_image_pixels=100 * 100)))
    try:
        s.wait_ready()
        tiff = cv2.imencode(".tiff", photos["coffee"])[1].tobytes()
        r = httpx.post(s.url + "/v1/detect", files={"image": ("c.tiff", tiff)}, timeout=60)
        assert r.status_code == 413 and "exceeds the limit of 10000 pixels" in r.json()["error"]
        assert r.json()["path"] == "c.tiff"
    finally:
        s.stop()


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)"
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def test_queue_full_answers_429_then_everything_admitted_is_answered(tiny_engine, images):
    gates: list[Gate] = []
    load = gated(gates)
    s = Server(create_app(ServeConfig(engine=tiny_engine, max_queue=1), load_detectors=load))
    try:
        s.wait_ready()
        post = lambda: httpx.post(s.url + "/v1/detect", params={"max_new_tokens": str(MAX_NEW)},
                                  content=images["noise.jpg"], headers={"content-type": "image/jpeg"}, timeout=120)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post)
            assert gates[0].started.acquire(timeout=30)  # the lane holds job 1
            second = pool.submit(post)  # queued
            deadline = time.monotonic() + 30
            while metric(httpx.get(s.url + "/metrics").text, "zoomin_queue_depth") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            third = post()
            assert third.status_code == 429
            assert int(third.headers["retry-after"]) >= 1 and "queue is full" in third.json()["error"]
            gates[0].release.set()
            a, b = first.result(timeout=120), second.result(timeout=120)
        assert a.status_code == b.status_code == 200 and a.json()["final_text"] == b.json()["final_text"]
        text = httpx.get(s.url + "/metrics").text
        assert metric(text, "zoomin_requests_total", outcome="ok") == 2
        assert metric(text, "zoomin_requests_total", outcome="queue_full") == 1
        assert metric(text, "zoomin_images_total", outcome="ok") == 2
        assert metric(text, "zoomin_stage_seconds_count", stage="total") == 2
        assert metric(text, "zoomin_generated_tokens_total") == sum(
            x.json()["tokens"]["stage1_generated"] + x.json()["tokens"].get("stage2_generated", 0) for x in (a, b))
        assert metric(text, "zoomin_queue_depth") == 0
    finally:
        gates[0].release.set()
        s.stop()


def test_graceful_shutdown_finishes_in_flight_requests(tiny_engine, images):
    gates: list[Gate] = []
    load = gated(gates)
    s = Server(create_app(ServeConfig(engine=tiny_engine), load_detectors=load))
    s.wait_ready()
    with ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(httpx.post, s.url + "/v1/detect", content=images["noise.jpg"],
                               params={"max_new_tokens": str(MAX_NEW)}, headers={"content-type": "image/jpeg"},
                               timeout=120)
        assert gates[0].started.acquire(timeout=30)
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        time.sleep(0.3)  # uvicorn now refuses new connections and waits for the in-flight one
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=2)
        gates[0].release.set()
        r = inflight.result(timeout=120)
        stopper.join(60)
    assert r.status_code == 200 and r.json()["error"] is None


def test_timeout_stops_the_job_and_answers_504(tiny_engine, images):
    class Late:
        def __init__(self, zi):
            self.zi = zi

        def detect(self, image, **kw):
            time.sleep(0.6)  # the deadline passes before the first decode step
            return self.zi.detect(image, **kw)

    def load(cfg):
        zis, info = load_engine_detectors(cfg)
        return [Late(zis[0])], info

    s = Server(create_app(ServeConfig(engine=tiny_engine, request_timeout_s=0.3), load_detectors=load))
    try:
        s.wait_ready()
        r = httpx.post(s.url + "/v1/detect", content=images["noise.jpg"], headers={"content-type": "image/jpeg"},
                       timeout=60)
        assert r.status_code == 504 and "timed out after 0.3 s" in r.json()["error"]
        text = httpx.get(s.url + "/metrics").text
        assert metric(text, "zoomin_requests_total", outcome="timeout") == 1
        assert metric(text, "zoomin_images_total", outcome="timeout") == 1
    finally:
        s.stop()


def test_health_ready_and_engine_summary(tiny_engine):
    loaded = threading.Event()

    def load(cfg):
        assert loaded.wait(60)
        return load_engine_detectors(cfg)

    s = Server(create_app(ServeConfig(engine=tiny_engine), load_detectors=load))
    try:
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}
        r = httpx.get(s.url + "/ready")
        assert r.status_code == 503 and "loading" in r.json()["reason"]
        assert httpx.post(s.url + "/v1/detect", content=b"x", headers={"content-type": "image/png"}).status_code == 503
        loaded.set()
        s.wait_ready()
        info = httpx.get(s.url + "/v1/engine").json()
        assert info["precision"] == "fp32" and info["model"]["text_layers"] >= 1
        assert info["protocol"]["verdict_tag"] == "verdict"
    finally:
        loaded.set()
        s.stop()


def test_an_engine_that_does_not_load_is_reported_not_ready(tmp_path):
    s = Server(create_app(ServeConfig(engine=tmp_path / "missing")))
    try:
        deadline = time.monotonic() + 30
        while "cannot load" not in (r := httpx.get(s.url + "/ready")).json().get("reason", ""):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert r.status_code == 503 and "engine directory not found" in r.json()["reason"]
    finally:
        s.stop()


def test_serve_cli_names_a_missing_engine(tmp_path):
    from click.testing import CliRunner

    from zoomin.cli import main

    result = CliRunner().invoke(main, ["serve", "--engine", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "engine directory not found" in result.output
    assert "Traceback" not in result.output


def test_batched_lanes_answer_as_the_direct_api_and_report_batch_sizes(tiny_engine, direct, images):
    """--max-batch 3: five concurrent requests of mixed sizes run three at a time, their decode steps merged;
    every answer is still the direct API's, and /metrics shows steps of more than one sequence."""
    s = Server(create_app(ServeConfig(engine=tiny_engine, max_batch=3)))
    s.wait_ready()
    try:
        cases = [*images.items(), ("coffee.png", images["coffee.png"])]
        want = {name: canon(expected(direct, data)) for name, data in images.items()}

        def send(case):
            return httpx.post(s.url + "/v1/detect", data={"max_new_tokens": str(MAX_NEW)}, files={"image": case},
                              timeout=120)

        with ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(send, cases))
        for (name, data), r in zip(cases, answers):
            assert r.status_code == 200, r.text
            assert strip(r.json()) == want[name], name
        text = httpx.get(s.url + "/metrics").text
        steps, sequences = metric(text, "zoomin_decode_batch_size_count"), metric(text, "zoomin_decode_batch_size_sum")
        assert steps > 0 and sequences > steps  # some steps carried more than one sequence
        assert metric(text, "zoomin_decode_batch_size_bucket", le="1.0") < steps
        assert metric(text, "zoomin_images_total", outcome="ok") == len(cases)
    finally:
        s.stop()
