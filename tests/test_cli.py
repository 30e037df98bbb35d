"""`zoomin detect` and `zoomin checkpoint random` as a user runs them."""

from __future__ import annotations

import json

import cv2
import pytest
from click.testing import CliRunner

from zoomin.cli import main


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("imgs")
    cv2.imwrite(str(d / "astronaut.jpg"), photos["astronaut"][:, :, ::-1])
    cv2.imwrite(str(d / "camera.png"), photos["camera"])  # grayscale
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (d / "notes.txt").write_text("ignored: not an image suffix inside a folder")
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_detect_folder_with_a_bad_file(tiny_engine, image_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    res = run("detect", image_dir, "--engine", tiny_engine, "--json", out, "--annotate", tmp_path / "ann",
              "--max-new-tokens", "6")
    assert res.exit_code == 1 and "1 of 3 images failed" in res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"].rsplit("/", 1)[1] for r in records] == ["astronaut.jpg", "broken.jpg", "camera.png"]
    bad = records[1]
    assert "broken.jpg" in bad["error"] and "verdict" not in bad
    for r in (records[0], records[2]):
        assert r["error"] is None and r["tokens"]["stage2_prompt"] > r["tokens"]["stage1_prompt"]
        assert {"verdict", "score", "boxes", "explanation", "stage1_explanation", "timings_ms"} <= set(r)
    pngs = sorted(p.name for p in (tmp_path / "ann").iterdir())
    assert pngs == ["astronaut.png", "camera.png"]
    assert cv2.imread(str(tmp_path / "ann" / "astronaut.png")).shape == (512, 512, 3)


def test_detect_regions_and_no_reuse_agree(tiny_engine, image_dir, tmp_path):
    outs = []
    for extra in ([], ["--no-reuse"]):
        out = tmp_path / f"r{len(extra)}.jsonl"
        res = run("detect", image_dir / "astronaut.jpg", "--engine", tiny_engine, "--json", out, "--max-new-tokens",
                  "8", "--region", "150,60,330,260:face", "--region", "20,300,200,500", *extra)
        assert res.exit_code == 0, res.output
        outs.append(json.loads(out.read_text()))
    reuse, full = outs
    assert [b["label"] for b in reuse["boxes"]] == ["face", None]
    assert reuse["final_text"] == full["final_text"]
    assert reuse["tokens"]["reused_prefix"] > 0 and full["tokens"]["reused_prefix"] == 0


def test_detect_hf_backend_matches(tiny_engine, tiny_ckpt, image_dir, tmp_path):
    texts = []
    for args in (["--engine", tiny_engine], ["--backend", "hf", "--model", tiny_ckpt]):
        out = tmp_path / "r.jsonl"
        res = run("detect", image_dir / "camera.png", *args, "--json", out, "--max-new-tokens", "10")
        assert res.exit_code == 0, res.output
        texts.append(json.loads(out.read_text())["final_text"])
    assert texts[0] == texts[1]


@pytest.mark.parametrize("args,message", [
    (["--region", "1,2,3"], "is not x1,y1,x2,y2"),
    (["--device", "cuda"], "onnxruntime-gpu"),
    (["--backend", "hf"], "--backend hf needs --model"),
])
def test_detect_usage_errors(tiny_engine, image_dir, args, message):
    res = CliRunner().invoke(main, ["detect", str(image_dir), "--engine", str(tiny_engine), *args])
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output


def test_detect_missing_engine(image_dir, tmp_path):
    res = CliRunner().invoke(main, ["detect", str(image_dir), "--engine", str(tmp_path / "none")])
    assert res.exit_code != 0 and "engine directory not found" in res.output


def test_checkpoint_random_cli(tmp_path):
    res = run("checkpoint", "random", tmp_path / "ck", "--shape", "tiny", "--text-layers", "1", "--vision-depth", "2",
              "--seed", "3")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 1 and cfg["vision_config"]["depth"] == 2


@pytest.mark.parametrize("cmd", [["--help"], ["detect", "--help"], ["checkpoint", "random", "--help"]])
def test_help(cmd):
    assert CliRunner().invoke(main, cmd).exit_code == 0
