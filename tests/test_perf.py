"""zoomin-perf end to end on the tiny checkpoint and engine, plus the pieces its numbers rest on.

No timing thresholds: the smoke run checks that every stage is measured for both backends, that the ratios are the
numbers they claim to be, that both backends did the same work, and that the report files are written. The
scripted workload is checked against the parser, and the floor's byte count against the transformers model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from zoomin.perf.bench import STAGES, TIME_METRICS, Job, Worker, WorkerError, run_metrics, summarize
from zoomin.perf.cli import main
from zoomin.perf.floor import decode_floor, mean_decode_context
from zoomin.perf.suite import BASELINE, ensure_engine
from zoomin.perf.workload import Workload, WorkloadError, scripted_answer, scripts_for
from zoomin.runtime import ZoomIn

WORKLOAD = Workload(stage1_tokens=80, stage2_tokens=6, boxes=2)


@pytest.fixture(scope="module")
def photo_files(photos, tmp_path_factory):
    import cv2

    folder = tmp_path_factory.mktemp("perf-photos")
    out = []
    for name in ("coffee", "astronaut"):
        path = folder / f"{name}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(photos[name], cv2.COLOR_RGB2BGR))
        out.append(path)
    return out


@pytest.fixture(scope="module")
def perf_run(tiny_ckpt, tiny_engine, photo_files, tmp_path_factory):
    """One CLI run: transformers baseline + the prebuilt fp32 engine, 1 warm-up and 1 repeat per image."""
    report = tmp_path_factory.mktemp("perf-report")
    args = ["--model", str(tiny_ckpt), "--engine", str(tiny_engine), "--repeats", "1", "--warmup", "1",
            "--stage1-tokens", str(WORKLOAD.stage1_tokens), "--stage2-tokens", str(WORKLOAD.stage2_tokens),
            "--boxes", str(WORKLOAD.boxes), "--threads", "2", "--out", str(report / "cache"), "--report",
            str(report), "--quiet-wait-s", "0"]  # behaviour, not timings: never wait for a quiet machine
    for p in photo_files:
        args += ["--image", str(p)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return report, json.loads((report / "perf.json").read_text())


def test_every_stage_measured_for_both_backends(perf_run, photo_files):
    _, r = perf_run
    assert set(r["configs"]) == {BASELINE, "zoomin-fp32"}, r["failed"]
    assert r["failed"] == {}
    for label, c in r["configs"].items():
        assert set(c["images"]) == {str(p) for p in photo_files}
        for img in c["images"].values():
            for key in TIME_METRICS:
                st = img["metrics"][key]
                assert st["n"] == 1 and math.isfinite(st["median"]), (label, key)
            for key in STAGES:  # every stage actually ran (crop is host work, > 0 too)
                assert img["metrics"][key]["median"] > 0, (label, key)
            assert img["tokens"]["crops"] == WORKLOAD.boxes
            assert img["tokens"]["stage1_generated"] == WORKLOAD.stage1_tokens
            assert img["tokens"]["stage2_generated"] == WORKLOAD.stage2_tokens
        assert c["peak_rss_bytes"] > 50 * 2**20
    assert r["configs"]["zoomin-fp32"]["info"]["engine_bytes"] > 0


def test_ratios_are_zoomin_over_baseline(perf_run):
    _, r = perf_run
    base, eng = r["configs"][BASELINE], r["configs"]["zoomin-fp32"]
    for path, per_metric in r["ratios"]["zoomin-fp32"].items():
        assert set(per_metric) == set(TIME_METRICS)
        for key, ratio in per_metric.items():
            want = eng["images"][path]["metrics"][key]["median"] / base["images"][path]["metrics"][key]["median"]
            assert ratio == pytest.approx(want, rel=1e-12), key


def test_same_work_on_both_backends(perf_run):
    _, r = perf_run
    assert r["token_check"]["equal"], r["token_check"]["mismatches"]
    base, eng = r["configs"][BASELINE], r["configs"]["zoomin-fp32"]
    for path in base["images"]:
        for key in r["token_check"]["keys"]:
            assert eng["images"][path]["tokens"][key] == base["images"][path]["tokens"][key]
        # the baseline recomputes query 1 in query 2; the engine prefills only the new turn
        assert base["images"][path]["tokens"]["stage2_prefill"] == base["images"][path]["tokens"]["stage2_prompt"]
        assert eng["images"][path]["tokens"]["stage2_prefill"] < base["images"][path]["tokens"]["stage2_prefill"]


def test_ablation_recomputes_without_reuse(perf_run):
    _, r = perf_run
    a = r["ablation"]["zoomin-fp32"]
    ref = r["settings"]["reference_image"]
    eng = r["configs"]["zoomin-fp32"]
    assert a["stage2_prefill_tokens"]["no_reuse"] == eng["images"][ref]["tokens"]["stage2_prompt"]
    assert a["stage2_prefill_tokens"]["reuse"] == eng["images"][ref]["tokens"]["stage2_prefill"]
    assert a["stage2"]["ratio"] == pytest.approx(a["stage2"]["reuse"] / a["stage2"]["no_reuse"])


def test_floor_counts_the_model_weights(perf_run):
    """The engine's decoder initializers and the transformers parameters are the same weights (fp32)."""
    _, r = perf_run
    onnx_bytes = r["floor"]["zoomin-fp32"]["weight_bytes"]
    torch_bytes = r["floor"][BASELINE]["weight_bytes"]
    # the exporter de-duplicates identical initializers (the zero-initialised q/k/v biases): < 0.1% here
    assert onnx_bytes == pytest.approx(torch_bytes, rel=1e-3)
    for f in r["floor"].values():
        assert f["floor_ms_per_token"] == pytest.approx(1e3 * f["bytes_per_token"] / r["bandwidth"]["bytes_per_s"])
        assert f["fraction_of_floor"] == pytest.approx(f["floor_ms_per_token"] / f["achieved_ms_per_token"])


def test_report_files(perf_run):
    report, r = perf_run
    md = (report / "perf.md").read_text()
    for needle in ("image decode", "stage-2 prefill", "time to first token", "end to end", "KV reuse ablation",
                   "bandwidth floor", "Targets", r["machine"]["cpu"], "![stage breakdown](stages.png)"):
        assert needle in md
    for name in ("stages.png", "latency.png"):
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert r["machine"]["cores_usable"] >= 1 and r["machine"]["versions"]["onnxruntime"]
    assert r["bandwidth"]["bytes_per_s"] > 1e8


def test_scripts_have_exact_lengths_and_parse_to_the_boxes(tiny_engine, photos):
    zi = ZoomIn.load(tiny_engine)
    pre = zi.preprocess(photos["coffee"])
    for boxes in (1, 2, 4):
        a1, a2 = scripts_for(zi, pre, Workload(stage1_tokens=150, stage2_tokens=30, boxes=boxes))
        assert len(a1) == 150 and len(a2) == 30
        text = zi.chat.decode(a1, skip_special_tokens=False)
        parsed = zi.find_boxes(text, pre)
        assert len(parsed) == boxes
        for b in parsed:  # each kept by the protocol's rules: inside the image, <= 50% of it
            assert (b.x2 - b.x1) * (b.y2 - b.y1) <= 0.25 * pre.resized_hw[0] * pre.resized_hw[1] + 1
    with pytest.raises(WorkloadError, match="at least"):
        scripted_answer(zi, zi.protocol.format_answer("", [(1, 1, 20, 20)], "real"), 3, "query 1")


def test_worker_reports_failures_instead_of_hanging(tiny_engine, photo_files, tmp_path):
    image = str(photo_files[0])
    with pytest.raises(WorkerError, match="EngineError: .*not an engine directory"):
        Worker(Job("bad", "zoomin", str(tmp_path), WORKLOAD, threads=1), [image])
    w = Worker(Job("slow", "zoomin", str(tiny_engine), WORKLOAD, threads=1), [image])
    with pytest.raises(WorkerError, match="too slow"):
        w.run(image, timeout=0.001)
    w.close()
    assert not w.process.is_alive()


def test_a_precision_that_does_not_build_is_reported(tmp_path):
    ckpt = tmp_path / "not-qwen"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    engine, error = ensure_engine(ckpt, "fp32", tmp_path / "engines", log=lambda s: None)
    assert engine is None and "not Qwen2.5-VL" in error


def test_run_metrics_and_summary():
    timings = {s: float(i + 1) for i, s in enumerate(STAGES)} | {"total": 50.0}
    m = run_metrics(timings, {"stage1_generated": 5, "stage2_generated": 3})
    assert m["other"] == pytest.approx(50 - sum(range(1, 10)))
    assert m["ttft"] == 1 + 2 + 3 + 4
    assert m["decode_ms_per_token"] == pytest.approx((5 + 9) / (4 + 2))
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1 and s["max"] == 10 and s["iqr"] == pytest.approx(4.75 - 1.75)
    tokens = {"stage1_prompt": 10, "stage1_generated": 3, "stage2_prompt": 20, "stage2_generated": 2}
    assert mean_decode_context(tokens) == np.mean([11, 12, 21])
    f = decode_floor(1000, 10, 5.0, 1e6, 2.0)
    assert f["floor_ms_per_token"] == pytest.approx(1.05) and f["fraction_of_floor"] == pytest.approx(0.525)


def test_a_spawned_worker_reports_its_own_peak_not_its_parents():
    """Workers are spawned from a parent that may hold a lot (the peers harness holds a checkpoint's tokenizer and
    photos; a test process holds models): a worker's peak RSS must be its own. getrusage's ru_maxrss inherits the
    parent's RSS at fork; every small worker reported the parent's 1.12 GiB."""
    import multiprocessing

    from zoomin.runtime.rss import peak_rss

    ballast = np.ones(400 * 2**20 // 8)  # 400 MB resident in this process
    parent = peak_rss()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child = pool.apply(peak_rss)
    assert parent > 400 * 2**20 and child < parent - 300 * 2**20, (parent, child)
    del ballast
