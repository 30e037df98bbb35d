"""zoomin-perf --peers: option parsing, skipped and failing peers as one line, and the side-by-side numbers.

The comparison runs real workers: zoomin's tiny engine, and as the stand-in peer the same engine copied by a
"converter" and run through the very interface a peer implements (`ZoomInPeer`), so every number in the table is
measured. Where a real peer (ORT GenAI, llama.cpp) is installed it also runs on the tiny checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import click
import pytest

from zoomin.perf import peers as P
from zoomin.perf.cli import main as perf_main
from zoomin.perf.report import peers_markdown
from zoomin.perf.workload import Workload
from zoomin.runtime.protocol import Protocol

WORKLOAD = Workload(96, 32, 2)  # the tiny tokenizer spells the scripted boxes in ~75 tokens


class AbsentPeer(P.Peer):
    name = "absent"
    runtime = "Absent"
    requires = ("zoomin_test_no_such_module",)


class FailingPeer(P.Peer):
    """Its converter is a real subprocess that prints noise and dies with a traceback."""

    name = "failing"
    runtime = "Failing"

    def convert(self, ckpt, precision, out, log, options):
        code = ("import sys, warnings; print('loading weights 100%'); warnings.warn('a deprecation'); "
                "raise ValueError('the checkpoint is not supported by this converter\\nsecond line')")
        P.run_converter([sys.executable, "-c", code], log, what="fail-convert")
        return []


class StandInPeer(P.ZoomInPeer):
    """zoomin's engine as a peer: 'converts' by copying the engine the test points it at."""

    name = "stand-in"
    runtime = "stand-in (zoomin engine)"
    source: Path | None = None

    def convert(self, ckpt, precision, out, log, options):
        shutil.copytree(self.source, out, dirs_exist_ok=True)
        return ["a copy of zoomin's own engine"]


def _photo(folder: Path) -> str:
    from zoomin.perf.suite import write_photos

    return str(write_photos(("chelsea",), folder)[0])


def _config(ckpt, engine, tmp, peers, **kw) -> P.PeersConfig:
    return P.PeersConfig(checkpoint=Path(ckpt), engines={"fp32": Path(engine)}, peers=peers,
                         image=_photo(tmp / "images"), protocol=Protocol.default().to_dict(), workload=WORKLOAD,
                         threads=1, cache=tmp, **kw)


@pytest.fixture(scope="module")
def side_by_side(tiny_ckpt, tiny_engine, tmp_path_factory):
    """One comparison: zoomin, the stand-in, a peer whose conversion fails and one that is not installed."""
    tmp = tmp_path_factory.mktemp("peers")
    StandInPeer.source = Path(tiny_engine)
    mod = __name__
    lines: list[str] = []
    cfg = _config(tiny_ckpt, tiny_engine, tmp, {"absent": f"{mod}:AbsentPeer", "failing": f"{mod}:FailingPeer",
                                                "stand-in": f"{mod}:StandInPeer"}, repeats=2, warmup=1)
    results = P.run_peers(cfg, log=lines.append)
    return results, lines


def test_peer_option_parsing():
    assert P.parse_peers("openvino, llama.cpp,openvino") == ["openvino", "llama.cpp"]
    assert P.parse_peers("all") == list(P.PEER_NAMES)
    ctx = perf_main.make_context("zoomin-perf", ["--peers", "OpenVINO", "--peers", "ort-genai,llama.cpp,openvino",
                                                 "--peers-only"])
    assert ctx.params["peers"] == ["openvino", "ort-genai", "llama.cpp"] and ctx.params["peers_only"]
    assert perf_main.make_context("zoomin-perf", []).params["peers"] == []
    with pytest.raises(click.BadParameter, match="unknown peer.*tensorrt.*choose from openvino, ort-genai, llama.cpp"):
        perf_main.make_context("zoomin-perf", ["--peers", "openvino,tensorrt"])


def test_peers_only_needs_peers(tmp_path):
    from click.testing import CliRunner

    r = CliRunner().invoke(perf_main, ["--peers-only", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--peers-only needs --peers" in r.output


def test_missing_peer_is_skipped_with_one_line(side_by_side):
    results, lines = side_by_side
    why = results["skipped"]["absent"]
    assert why.startswith("not installed") and "zoomin_test_no_such_module" in why and P.INSTALL_HINT in why
    assert "\n" not in why
    assert f"peer absent: skipped, {why}" in lines
    assert f"- absent: {why}" in peers_markdown(results)
    assert not any(label.startswith("absent") for label in results["configs"])


def test_failing_conversion_is_one_line_and_the_run_goes_on(side_by_side):
    results, lines = side_by_side
    why = results["failed"]["failing-fp32"]
    assert "\n" not in why
    assert why.startswith("conversion failed: fail-convert exited with 1: ValueError: the checkpoint is not "
                          "supported by this converter (log: ")
    assert any(ln.startswith("  failing fp32: conversion failed:") for ln in lines)
    assert f"- failing-fp32: {why}" in peers_markdown(results)
    assert {"zoomin-fp32", "stand-in-fp32"} <= set(results["configs"])


def test_failure_line_names_the_exception(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("INFO: loading\nTraceback (most recent call last):\n  File \"x.py\", line 3\n"
                   "optimum.exporters.error.ExportError: Maximum required is 5.0, got: 5.24.0\n"
                   "/usr/lib/python3/weakref.py:1: UserWarning: leaked\n  warnings.warn(\n")
    assert P.failure_line(log) == "optimum.exporters.error.ExportError: Maximum required is 5.0, got: 5.24.0"
    log.write_text("just the last words\n\n")
    assert P.failure_line(log) == "just the last words"


def test_side_by_side_numbers_are_measured_and_ratios_follow(side_by_side):
    results, _ = side_by_side
    z, s = results["configs"]["zoomin-fp32"], results["configs"]["stand-in-fp32"]
    for c in (z, s):
        assert len(c["runs"]) == 2
        for run in c["runs"]:
            assert run["prefill_tokens"] == 512 and run["decode_steps"] == 127
            assert math.isclose(run["prefill_tok_s"], 1e3 * 512 / run["prefill_ms"])
            assert math.isclose(run["decode_tok_s"], 1e3 * 127 / run["decode_ms"])
            assert 0 < run["image_encode_ms"] < 1e3 * run["job_s"]
        assert c["peak_rss_bytes"] > 50 * 2**20 and c["size_bytes"] > 0
    assert z["job_tokens"] == s["job_tokens"] and z["job_tokens"]["crops"] == 2  # same engine: same work
    assert s["size_bytes"] == z["size_bytes"] and s["notes"] == ["a copy of zoomin's own engine"]
    row = results["ratios"]["fp32"]["stand-in-fp32"]
    for k in P.METRICS:
        assert row[k] == pytest.approx(z["metrics"][k]["median"] / s["metrics"][k]["median"])
    assert row["size_bytes"] == 1.0 and row["peak_rss_bytes"] == pytest.approx(z["peak_rss_bytes"] / s["peak_rss_bytes"])

    md = peers_markdown(results)
    table = md[md.index("| precision | runtime | image encode ms | text prefill tok/s | decode tok/s | ZoomIn job s "
                        "| peak RSS GiB | on disk MiB |") + 2:]
    assert table[0].startswith("| fp32 | stand-in (zoomin engine) | ")  # peers first, zoomin last
    assert table[1] == ("| fp32 | zoomin | " + " | ".join(
        [f"{z['metrics']['image_encode_ms']['median']:.1f}" if z['metrics']['image_encode_ms']['median'] < 100
         else f"{z['metrics']['image_encode_ms']['median']:,.0f}",
         f"{z['metrics']['prefill_tok_s']['median']:,.1f}", f"{z['metrics']['decode_tok_s']['median']:,.1f}",
         f"{z['metrics']['job_s']['median']:,.2f}", f"{z['peak_rss_bytes'] / 2**30:.2f}",
         f"{z['size_bytes'] / 2**20:,.0f}"]) + " |")
    ratios = md[md.index("| precision | peer | image encode | text prefill | decode | ZoomIn job | peak RSS | on disk |") + 2:]
    ratio_line = ratios[0]
    assert ratio_line.startswith("| fp32 | stand-in (zoomin engine) | " + " | ".join(
        f"{row[k]:.2f}" for k in P.METRICS))
    assert ratio_line.endswith(f"| {row['peak_rss_bytes']:.2f} | 1.00 |")
    json.dumps(results)  # the suite writes it as JSON


def test_text_only_peer_reports_dashes():
    cfg = {"peer": "x", "runtime": "X", "precision": "int4", "peak_rss_bytes": 2**30, "size_bytes": 2**20,
           "metrics": {k: {"median": v} for k, v in (("image_encode_ms", float("nan")), ("prefill_tok_s", 100.0),
                                                      ("decode_tok_s", 20.0), ("job_s", float("nan")))}}
    z = {**cfg, "peer": "zoomin", "runtime": "zoomin",
         "metrics": {k: {"median": v} for k, v in (("image_encode_ms", 400.0), ("prefill_tok_s", 50.0),
                                                    ("decode_tok_s", 30.0), ("job_s", 2.0))}}
    row = P.peer_ratios({"x-int4": cfg, "zoomin-int4": z})["int4"]["x-int4"]
    assert row == {"image_encode_ms": None, "prefill_tok_s": 0.5, "decode_tok_s": 1.5, "job_s": None,
                   "peak_rss_bytes": 1.0, "size_bytes": 1.0}


def test_cli_runs_the_comparison_and_notes_an_unavailable_peer(tiny_ckpt, tiny_engine, tmp_path, monkeypatch):
    """End to end through zoomin-perf: llama.cpp is either not installed (CI) or has no converter source."""
    from click.testing import CliRunner

    monkeypatch.delenv("ZOOMIN_LLAMA_CPP_SRC", raising=False)
    photo = _photo(tmp_path / "images")
    r = CliRunner().invoke(perf_main, ["--model", str(tiny_ckpt), "--engine", str(tiny_engine), "--peers", "llama.cpp",
                                       "--peers-only", "--image", photo, "--repeats", "1", "--warmup", "0",
                                       "--threads", "1", "--quiet-wait-s", "0", "--stage1-tokens", "96",
                                       "--out", str(tmp_path), "--report", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "report" / "perf.json").read_text())
    peers = results["peers"]
    note = peers["skipped"].get("llama.cpp") or peers["failed"].get("llama.cpp-fp32")
    assert note and "\n" not in note
    assert ("not installed" in note) if "llama.cpp" in peers["skipped"] else ("--llama-cpp-src" in note)
    assert list(peers["configs"]) == ["zoomin-fp32"] and results["configs"] == {}
    md = (tmp_path / "report" / "perf.md").read_text()
    assert "## Side by side with other runtimes" in md and "| fp32 | zoomin | " in md and note in md
    assert "llama.cpp" in r.output


needs_ort = pytest.mark.skipif(not P._module_exists("onnxruntime_genai"),
                               reason="onnxruntime-genai (the peers extra) is not installed")
needs_llama = pytest.mark.skipif(not (P._module_exists("llama_cpp") and os.environ.get("ZOOMIN_LLAMA_CPP_SRC")),
                                 reason="llama-cpp-python (the peers extra) and ZOOMIN_LLAMA_CPP_SRC (a llama.cpp "
                                        "source tree) are needed")


@pytest.mark.parametrize("peer", [pytest.param("ort-genai", marks=needs_ort), pytest.param("llama.cpp", marks=needs_llama)])
def test_installed_peer_runs_on_the_tiny_checkpoint(peer, tiny_ckpt, tiny_engine, tmp_path):
    cfg = _config(tiny_ckpt, tiny_engine, tmp_path, {peer: P.PEER_CLASSES[peer]}, repeats=1, warmup=0)
    results = P.run_peers(cfg, log=lambda s: None)
    assert not results["failed"], results["failed"]
    c, z = results["configs"][f"{peer}-fp32"], results["configs"]["zoomin-fp32"]
    run = c["runs"][0]
    assert run["prefill_tokens"] == 512 and run["prefill_tok_s"] > 0
    assert run["decode_steps"] == 127 and run["decode_tok_s"] > 0
    if peer == "ort-genai":  # text decoder only
        assert math.isnan(run["job_s"]) and math.isnan(run["image_encode_ms"]) and c["job_tokens"] is None
    else:  # libmtmd runs the whole job on zoomin's prompt: query 1 is the same number of tokens
        assert run["job_s"] > 0 and run["image_encode_ms"] > 0
        assert c["job_tokens"]["stage1_prompt"] == z["job_tokens"]["stage1_prompt"]
