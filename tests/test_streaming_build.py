"""The streamed build: lazy weights, graphs exported piece by piece and stitched, streamed calibration, stage memory.

Reference for the stitched graphs is the whole-model export the build used before (one torch.onnx.export of the
whole TextDecoder, same settings): measured identical outputs, bit for bit, on tiny and small (fp32 and fp16,
prefill and decode with past), so the bound is exact equality. The vision stages exported from the checkpoint's
files are the in-memory model's, bit for bit.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from zoomin.build import engine as engine_mod
from zoomin.build.calibration import PlaceholderVision, ReplayVision, load_calibration_set, record, stand_in_engine
from zoomin.build.drift import replay_decoder
from zoomin.build.export_decoder import CUSTOM_OPS, TextDecoder, export_decoder, io_names, quiet_export
from zoomin.build.export_vision import export_vision, random_pixels
from zoomin.build.layer_parity import DecoderLayerParity
from zoomin.build.quantize import QuantConfig
from zoomin.build.streaming import quantize_decoder, quantize_vision
from zoomin.build.weights import CheckpointParts, CheckpointWeights
from zoomin.runtime.config import ModelConfig
from zoomin.runtime.decoder import Decoder, empty_cache_inputs
from zoomin.runtime.protocol import Protocol
from zoomin.runtime.vision import VisionEncoder, stage_files


def whole_decoder_export(model, path: Path, precision: str, graph: str) -> Path:
    """The pre-streaming export: the whole TextDecoder in one torch.onnx.export (opset 18, not downgraded)."""
    dec = TextDecoder(model, torch.float16 if precision == "fp16" else torch.float32, graph).eval()
    cfg = dec.cfg
    b, s, p = 2, 3, 4
    layers = cfg.num_hidden_layers
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    if graph == "gqa":
        kv = (b, cfg.num_key_value_heads, p + s + 1, cfg.head_dim)
        cache = (torch.full((b,), p + s - 1, dtype=torch.int32), torch.tensor(p + s, dtype=torch.int32))
        cache_dims, kv_dims = ({0: batch}, None), [{0: batch, 2: past}] * layers
    else:
        kv = (b, p, cfg.num_key_value_heads, cfg.head_dim)
        cache = (torch.ones(b, p + s, dtype=torch.int64),)
        cache_dims, kv_dims = ({0: batch, 1: torch.export.Dim.AUTO},), [{0: batch, 1: past}] * layers
    args = (torch.zeros(b, s, cfg.hidden_size), torch.arange(s).expand(3, b, s).contiguous(), cache,
            torch.tensor([2], dtype=torch.int64),
            [torch.zeros(kv, dtype=dec.dtype) for _ in range(layers)],
            [torch.zeros(kv, dtype=dec.dtype) for _ in range(layers)])
    dynamic = ({0: batch, 1: seq}, {1: batch, 2: seq}, cache_dims, None, kv_dims, kv_dims)
    names = io_names(layers, graph)
    with quiet_export():
        program = torch.onnx.export(dec, args, input_names=names[0], output_names=names[1], dynamic_shapes=dynamic,
                                    opset_version=18, dynamo=True, external_data=True,
                                    custom_translation_table=CUSTOM_OPS)
    program.save(str(path), external_data=True)
    return path


def decoder_feeds(cfg, rng, batch, new, past, keep, kv_dtype, graph="gqa"):
    t = cfg.text
    feeds = {"inputs_embeds": (rng.standard_normal((batch, new, t.hidden_size)) * 0.05).astype(np.float32),
             "position_ids": np.tile(np.arange(past, past + new), (3, batch, 1)).astype(np.int64),
             "logits_to_keep": np.array([keep], np.int64),
             **empty_cache_inputs(graph, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, batch, past + new)}
    kv = (batch, t.num_key_value_heads, past, t.head_dim) if graph == "gqa" else \
        (batch, past, t.num_key_value_heads, t.head_dim)
    for i in range(t.num_hidden_layers):
        for k in ("key", "value"):
            feeds[f"past_{k}.{i}"] = (rng.standard_normal(kv) * 0.5).astype(kv_dtype)
    return feeds


# (batch, new, past, keep) per flavour; GroupQueryAttention takes a multi-token chunk after a past for batch 1 only
DECODER_CASES = {"plain": ((1, 7, 0, 7), (2, 5, 3, 2), (1, 1, 9, 1)),
                 "gqa": ((1, 7, 0, 7), (2, 5, 0, 2), (1, 4, 6, 4), (2, 1, 9, 1))}


@pytest.mark.parametrize("shape,precision,graph", [("tiny", "fp32", "gqa"), ("small", "fp16", "gqa"),
                                                   ("tiny", "fp32", "plain")])
def test_stitched_decoder_equals_whole_model_export(request, hf_model_factory, tmp_path, shape, precision, graph):
    import onnxruntime as ort

    ckpt = request.getfixturevalue(f"{shape}_ckpt")
    model, cfg = hf_model_factory(ckpt), ModelConfig.from_checkpoint(ckpt)
    whole = ort.InferenceSession(str(whole_decoder_export(model, tmp_path / "whole.onnx", precision, graph)))
    # from the checkpoint's files, block by block (not the in-memory model): the build's own path
    stitched = ort.InferenceSession(str(export_decoder(CheckpointParts(ckpt), tmp_path / "stitched.onnx",
                                                       precision=precision, opset=18, graph=graph)))
    names = io_names(cfg.text.num_hidden_layers, graph)[1]
    rng = np.random.default_rng(0)
    for batch, new, past, keep in DECODER_CASES[graph]:
        feeds = decoder_feeds(cfg, rng, batch, new, past, keep, np.float16 if precision == "fp16" else np.float32,
                              graph)
        for name, a, b in zip(names, whole.run(names, feeds), stitched.run(names, feeds)):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} (batch {batch}, new {new}, past {past})")


@pytest.mark.parametrize("shape,precision", [("small", "fp16")])  # fp16: a block's dtype switch (fp32 down_proj)
def test_vision_from_checkpoint_files_equals_in_memory_export(request, hf_model_factory, tmp_path, shape, precision):
    """The stage graphs exported block by block from the safetensors equal those of the loaded transformers model
    (the vision tower has no whole-graph form any more: the runtime chains its stages, tests/test_vision_export)."""
    ckpt = request.getfixturevalue(f"{shape}_ckpt")
    model, cfg = hf_model_factory(ckpt), ModelConfig.from_checkpoint(ckpt).vision
    whole = VisionEncoder(export_vision(model, tmp_path / "model", precision=precision), cfg)
    path = export_vision(CheckpointParts(ckpt), tmp_path / "stitched", precision=precision)
    stitched = VisionEncoder(path, cfg)
    for grids in ([(1, 8, 10)], [(1, 12, 18), (1, 4, 4), (2, 8, 8)]):
        pixels = random_pixels(cfg, grids, seed=1)
        np.testing.assert_array_equal(whole.encode(pixels, np.array(grids)), stitched.encode(pixels, np.array(grids)))
    # one piece per block (two per full-attention block) in the stages, initializers named after the pieces
    names = {t.name for f in stage_files(path) for t in onnx.load(str(f), load_external_data=False).graph.initializer}
    full = set(cfg.fullatt_block_indexes)
    assert {f"blocks.{i}.{'q' if i in full else 'qkv'}.weight" for i in range(cfg.depth)} <= names
    assert {f"blocks.{i}.down_proj.weight" for i in range(cfg.depth)} | {f"blocks.{i}.kv.k.weight" for i in full} <= names


@pytest.fixture(scope="module")
def bf16_sharded(tiny_ckpt, tmp_path_factory, hf_model_factory):
    """The tiny checkpoint re-saved the way real ones are stored: bf16, sharded with an index, older key layout."""
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    out.mkdir()
    for f in tiny_ckpt.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    weights = CheckpointWeights(tiny_ckpt)
    # transformers 4.5x layout: model.language_model.* and model.visual.*
    renamed = {(n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else
                n.replace("visual.", "model.visual.", 1) if n.startswith("visual.") else n):
               weights.tensor(n).to(torch.bfloat16) for n in weights.names()}
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: renamed[k].contiguous() for k in keys}, str(out / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def test_lazy_reader_reads_sharded_bf16_as_stored(bf16_sharded, hf_model_factory):
    parts = CheckpointParts(bf16_sharded)
    assert parts.weights.tensor("model.language_model.layers.1.mlp.up_proj.weight").dtype == torch.bfloat16
    assert len(parts.weights.names("model.visual.blocks.3.")) == 12
    hf = hf_model_factory(bf16_sharded)  # transformers' own loader, float32
    layer, ref = parts.text_layer(1), hf.model.language_model.layers[1]
    assert layer.mlp.down_proj.weight.dtype == torch.bfloat16  # no conversion until the export casts
    for (name, p), (ref_name, q) in zip(layer.state_dict().items(), ref.state_dict().items(), strict=True):
        assert name == ref_name and torch.equal(p.float(), q), name  # bf16 -> fp32 is exact
    block = parts.vision_block(2).state_dict()
    assert all(torch.equal(block[k].float(), v) for k, v in hf.model.visual.blocks[2].state_dict().items())
    assert torch.equal(parts.lm_head().weight.float(), hf.lm_head.weight)


def test_bf16_checkpoint_builds_same_graphs_as_transformers_loaded_model(bf16_sharded, hf_model_factory, tmp_path):
    """Streaming the bf16 shards gives the graph transformers' float32 load of the same files exports."""
    import onnxruntime as ort

    model = hf_model_factory(bf16_sharded)
    cfg = ModelConfig.from_checkpoint(bf16_sharded)
    a = ort.InferenceSession(str(export_decoder(CheckpointParts(bf16_sharded), tmp_path / "a" / "d.onnx")))
    b = ort.InferenceSession(str(export_decoder(model, tmp_path / "b" / "d.onnx")))
    feeds = decoder_feeds(cfg, np.random.default_rng(1), 1, 6, 2, 3, np.float32)
    np.testing.assert_array_equal(a.run(["logits"], feeds)[0], b.run(["logits"], feeds)[0])


def test_corrupt_shard_is_a_clear_error(bf16_sharded, tmp_path):
    import shutil

    from zoomin.build.checkpoint import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(bf16_sharded, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.language_model.norm.weight"] = "missing.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing.safetensors: cannot load weights"):
        CheckpointParts(bad).text_norm()


@pytest.fixture(scope="module")
def streamed_int8(tiny_ckpt, tmp_path_factory):
    """The quantized build's streamed pass on tiny (int8), run step by step as build_engine runs it."""
    root = tmp_path_factory.mktemp("streamed")
    config, protocol = ModelConfig.from_checkpoint(tiny_ckpt), Protocol.default()
    parts = CheckpointParts(tiny_ckpt)
    engine_mod.write_embedding(parts, root, "fp32")
    calib = load_calibration_set(size=2)

    def stand_in(vision):
        return stand_in_engine(config, protocol, tiny_ckpt / "tokenizer.json", root / "embed_tokens.npy", vision)

    quant = QuantConfig("int8")
    layout = record(stand_in(PlaceholderVision(config.vision)), calib)
    vision = quantize_vision(parts, root / "vision", layout.vision, quant, root / "scratch")
    rec = record(stand_in(ReplayVision(vision.features)), calib)
    quantize_decoder(parts, root / "decoder.onnx", rec, quant, root / "scratch")
    return {"rec": rec, "features": vision.features, "config": config}


def test_streamed_calibration_runs_both_queries(streamed_int8):
    rec = streamed_int8["rec"]
    assert len(rec.conversations) == 2 and len(rec.vision) == 4  # per image: the full image, then its crops
    for start, end in rec.conversations:
        calls = rec.decoder[start:end]
        prefills = [c for c in calls if len(c.embeds) > 1]
        assert len(prefills) == 2 and len(prefills[1].embeds) > len(prefills[0].embeds)  # query 2 extends query 1
        steps = calls[2:]  # query 2's (scripted) answer, one token per step through the cache
        assert len(steps) >= 1 and [c.past for c in steps] == [len(prefills[1].embeds) + i for i in range(len(steps))]


@pytest.fixture(scope="module")
def large_rule_builds(tiny_ckpt, tmp_path_factory):
    """tiny built as if it were too large for transformers (per-layer parity), with transformers' loader refused,
    under umask 077: fp32 and int8."""
    import transformers

    root = tmp_path_factory.mktemp("large-rule")
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise AssertionError("the build loaded the whole model")

    mp.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained", refuse)
    mp.setattr(engine_mod, "PARITY_MAX_BYTES", 0)
    old = os.umask(0o077)
    try:
        out = {p: engine_mod.build_engine(engine_mod.BuildOptions(model=tiny_ckpt, out=root / p, precision=p,
                                                                  calib_size=1), log=lambda s: None)
               for p in ("fp32", "int8")}
    finally:
        os.umask(old)
        mp.undo()
    return out


def test_large_models_are_checked_layer_by_layer_without_loading_them(large_rule_builds):
    fp32 = large_rule_builds["fp32"].manifest.parity
    int8 = large_rule_builds["int8"].manifest.parity["reference"]
    for parity in (fp32, int8):  # the fp32 graphs (an int8 build's before quantization) against transformers
        assert set(parity["decoder_layer_errors"]) == {"layers.0", "layers.1", "epilogue"}
        # measured 2e-7 .. 5e-7 per layer and on the logits, 1e-6 on the vision tower
        assert parity["decoder_layer_max_rel_err"] < 1e-5 and parity["logits_max_rel_err"] < 1e-5
        assert parity["vision_max_rel_err"] < 1e-4
    assert "prefill" not in fp32  # no whole-model check ran


def test_layer_parity_catches_a_wrong_layer(tiny_ckpt, tmp_path):
    class Swapped(CheckpointParts):
        def text_layer(self, i):
            return super().text_layer(1 - i)

    check = DecoderLayerParity(CheckpointParts(tiny_ckpt))
    export_decoder(Swapped(tiny_ckpt), tmp_path / "d.onnx", on_piece=check)
    assert min(check.errors["layers.0"], check.errors["layers.1"]) > 1e-2, check.errors


def test_streamed_fp32_values_equal_the_fp32_graphs(streamed_int8, large_rule_builds):
    """The streamed pass's float32 image features and logits are the fp32 engine's own, call by call."""
    cfg, engine = streamed_int8["config"], large_rule_builds["fp32"].engine_dir
    encoder = VisionEncoder(engine / "vision", cfg.vision)
    for call in streamed_int8["features"]:
        want = encoder.encode(call.pixels, call.grid)
        np.testing.assert_allclose(call.embeds, want, rtol=0, atol=1e-5 * np.abs(want).max())
    rec = streamed_int8["rec"]
    got = replay_decoder(rec, Decoder.load(engine / "decoder.onnx", cfg.text))
    for call, logits in zip(rec.decoder, got, strict=True):
        np.testing.assert_allclose(call.logits, logits, rtol=0, atol=1e-5 * np.abs(logits).max())


def test_stage_lines_report_time_and_peak_rss_and_engine_is_world_readable(large_rule_builds):
    for result in large_rule_builds.values():
        root = result.engine_dir
        modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}
        dirs = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}  # the vision stages'
        assert stat.S_IMODE(root.stat().st_mode) == 0o755 and {modes.pop(d) for d in dirs} <= {0o755}, modes
        assert set(modes.values()) == {0o644}, modes
        lines = engine_mod.summary_lines(result)
        stage_lines = lines[lines.index("stages (time, peak RSS):") + 1:]
        assert len(stage_lines) == len(result.stage_seconds) == (7 if result.manifest.precision == "fp32" else 10)
        for line, (name, seconds) in zip(stage_lines, result.stage_seconds.items()):
            assert line.endswith(name) and " s " in line and "GiB" in line
            assert 0 < result.stage_peak_rss[name] < 4 * 2**30 and seconds >= 0


def test_peak_rss_resets_between_stages():
    assert engine_mod.reset_peak_rss(), "Linux lets a process reset its own VmHWM"
    base = engine_mod.peak_rss()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
    del block
    high = engine_mod.peak_rss()
    engine_mod.reset_peak_rss()
    assert high - base >= 60 * 2**20 and engine_mod.peak_rss() < high - 50 * 2**20
