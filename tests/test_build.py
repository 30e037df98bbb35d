"""zoomin-build: engine layout, manifest contract, fp16, and clean failure on bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zoomin.build import engine as engine_mod
from zoomin.build.cli import main as build_cli
from zoomin.runtime import EngineError, Manifest, ModelConfig, ZoomIn
from zoomin.runtime.manifest import FORMAT_VERSION, sha256_file


def test_manifest_describes_every_file(tiny_engine, tiny_ckpt):
    m = Manifest.load(tiny_engine, verify="sha256")
    on_disk = {p.relative_to(tiny_engine).as_posix() for p in tiny_engine.rglob("*") if p.is_file()}
    assert set(m.files) == on_disk - {"manifest.json"}
    for name, meta in m.files.items():
        assert meta["sha256"] == sha256_file(tiny_engine / name)
    assert m.config == replace(ModelConfig.from_checkpoint(tiny_ckpt), decoder_graph="gqa")  # flavour: the build's
    assert m.precision == "fp32" and m.format_version == FORMAT_VERSION
    for key in ("source", "source_config_sha256", "torch", "transformers", "onnx", "built_at"):
        assert m.provenance[key]
    assert {"vision/stage0.onnx", "decoder.onnx", "embed_tokens.npy", "protocol.json", "tokenizer.json"} <= set(m.files)
    # parity measured at build time against transformers, fp32
    assert m.parity["vision_max_rel_err"] < 1e-4 and m.parity["prefill"] < 1e-4 and m.parity["decode"] < 1e-4


def test_tampered_engine_is_refused(tiny_engine, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    emb = np.load(copy / "embed_tokens.npy")
    emb[0, 0] += 1
    np.save(copy / "embed_tokens.npy", emb)  # same size, different bytes
    Manifest.load(copy, verify="size")
    with pytest.raises(EngineError, match="sha256"):
        Manifest.load(copy, verify="sha256")
    (copy / "decoder.onnx.data").write_bytes(b"truncated")
    with pytest.raises(EngineError, match="decoder.onnx.data has 9 bytes"):
        ZoomIn.load(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="format 99"):
        Manifest.load(copy)
    with pytest.raises(EngineError, match="not an engine directory"):
        Manifest.load(tmp_path)


def test_fp16_engine(tiny_ckpt, tmp_path, photos):
    out = tmp_path / "tiny-fp16"
    result = CliRunner().invoke(build_cli, ["--model", str(tiny_ckpt), "--precision", "fp16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    m = Manifest.load(out)
    assert m.precision == "fp16" and np.load(out / "embed_tokens.npy").dtype == np.float16
    # fp16 bound: measured ~1e-3 relative on logits (tiny and small), held to 1e-2
    assert m.parity["prefill"] < 1e-2 and m.parity["decode"] < 1e-2
    assert m.parity["vision_max_rel_err"] < 1e-2
    r = ZoomIn.load(out).detect(photos["coffee"], regions=[(20, 20, 200, 200)], max_new_tokens=4)
    assert r.tokens["crops"] == 1 and r.tokens["reused_prefix"] > 0


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def _fail(args, tmp_path) -> str:
    out_parent = tmp_path / "engines"
    out_parent.mkdir(exist_ok=True)
    before = _leftovers(out_parent)
    result = CliRunner().invoke(build_cli, [*args, "--out", str(out_parent / "e")])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert _leftovers(out_parent) == before, "a failed build left files behind"
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _ckpt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_checkpoint(tmp_path):
    assert "checkpoint directory not found" in _fail(["--model", str(tmp_path / "nope")], tmp_path)


def test_corrupt_config(tiny_ckpt, tmp_path):
    ck = _ckpt_copy(tiny_ckpt, tmp_path / "ck")
    (ck / "config.json").write_text("{ not json")
    assert "corrupt config.json" in _fail(["--model", str(ck)], tmp_path)


def test_other_architecture(tiny_ckpt, tmp_path):
    ck = _ckpt_copy(tiny_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (ck / "config.json").write_text(json.dumps(cfg))
    assert "architecture llama is not Qwen2.5-VL" in _fail(["--model", str(ck)], tmp_path)


def test_missing_tokenizer(tiny_ckpt, tmp_path):
    ck = _ckpt_copy(tiny_ckpt, tmp_path / "ck")
    (ck / "tokenizer.json").unlink()
    assert "missing tokenizer.json" in _fail(["--model", str(ck)], tmp_path)


def test_corrupt_weights(tiny_ckpt, tmp_path):
    ck = _ckpt_copy(tiny_ckpt, tmp_path / "ck")
    for f in ck.glob("*.safetensors"):
        f.write_bytes(b"\x00" * 64)
    assert "cannot load weights" in _fail(["--model", str(ck)], tmp_path)


def test_unknown_precision(tiny_ckpt, tmp_path):
    assert "unknown precision 'int3'" in _fail(["--model", str(tiny_ckpt), "--precision", "int3"], tmp_path)


def test_existing_output_needs_force(tiny_ckpt, tiny_engine, tmp_path):
    result = CliRunner().invoke(build_cli, ["--model", str(tiny_ckpt), "--out", str(tiny_engine)])
    assert result.exit_code != 0 and "already exists; pass --force" in result.output
    assert Manifest.load(tiny_engine, verify="sha256")  # untouched


def test_unwritable_output(tiny_ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(build_cli, ["--model", str(tiny_ckpt), "--out", str(blocker / "engine")])
    assert result.exit_code != 0 and "cannot write to" in result.output and "Traceback" not in result.output


def test_failure_mid_build_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    import zoomin.build.export_decoder as ed

    def boom(*a, **k):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(ed, "export_decoder", boom)
    out = tmp_path / "engines" / "e"
    with pytest.raises(RuntimeError, match="exporter crashed"):
        engine_mod.build_engine(engine_mod.BuildOptions(model=tiny_ckpt, out=out), log=lambda s: None)
    assert _leftovers(out.parent) == []


def test_force_replaces_atomically(tiny_ckpt, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "stale.txt").write_text("old engine")
    opts = engine_mod.BuildOptions(model=tiny_ckpt, out=out, force=True, check_parity=False)
    engine_mod.build_engine(opts, log=lambda s: None)
    assert not (out / "stale.txt").exists() and Manifest.load(out, verify="sha256")
    assert _leftovers(tmp_path) == ["e"]
