"""--target tensorrt and device="tensorrt-llm" on a machine without a GPU, TensorRT, TensorRT-LLM or ModelOpt.

What runs for real here: the shape profiles against the vision scheduler, the attention rewrite against ONNX
Runtime's MultiHeadAttention, the calibration conversations against zoomin.build.calibration's recording, the
manifest and the compatibility check, the one-line refusals. The TensorRT / ModelOpt / TensorRT-LLM calls are
checked against stand-in modules that record their arguments: they prove what zoomin asks of those libraries,
not that the libraries accept it (nothing here has run on a GPU).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zoomin.build.calibration import (PlaceholderVision, conversation_feed, load_calibration_set, record,
                                      scripted_answer, stand_in_engine)
from zoomin.build.checkpoint import BuildError
from zoomin.build.tensorrt import (GpuStack, Profile, TensorRTOptions, build_tensorrt, build_vision_plans,
                                   calibration_conversations, calibration_texts, decompose_attention, graph_inputs,
                                   max_frame_patches, plain_stage_graphs, quant_config, resolve_options,
                                   vision_profiles)
from zoomin.runtime import ModelConfig, Protocol, ZoomIn
from zoomin.runtime.chat import ChatFormat, ChatTokenizer
from zoomin.runtime.config import ImageConfig, VisionConfig
from zoomin.runtime.image_io import load_image
from zoomin.runtime.manifest import EngineError, Manifest, sha256_file
from zoomin.runtime.preprocess import smart_resize
from zoomin.runtime.vision import VisionEncoder, stage_files
from zoomin.runtime.vision_meta import CHUNK_ROWS, vision_plan

ROOT = Path(__file__).resolve().parents[1]
STACK = GpuStack({"tensorrt": "10.9.0.34", "tensorrt_llm": "1.2.0", "modelopt": "0.35.0", "torch": "2.9.0"},
                 "NVIDIA H100 80GB HBM3", (9, 0))
VISION_3B = VisionConfig(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048)


def chat_of(engine: Path, config: ModelConfig) -> ChatTokenizer:
    return ChatTokenizer.from_file(engine / "tokenizer.json", config, ChatFormat.load(engine / "chat.json"))


# -- optimization profiles ------------------------------------------------------------------------------------------


def within(shape, p: Profile) -> bool:
    return all(lo <= s <= hi for lo, s, hi in zip(p.min, shape, p.max)) and len(shape) == len(p.min)


def scheduled_shapes(grid, cfg: VisionConfig):
    """(rows, windows shape, frame length) of every call run_tower makes for one image."""
    for frame in vision_plan(np.array([grid]), cfg):
        for c in frame.chunks:
            yield len(c.patches), c.window_rows().shape, frame.length


@pytest.mark.parametrize("max_tokens", [4096, None])
def test_profiles_cover_every_call_the_scheduler_makes_at_3b(max_tokens):
    """For images of several aspect ratios at and under the limits (3B tower and preprocessor), each chunk's
    inputs fit the profile; the largest image reaches the profile's frame and row maxima exactly (no slack that
    would make TensorRT tune for shapes that never come)."""
    image = ImageConfig(max_pixels=12845056)  # Qwen2.5-VL-3B/7B's preprocessor_config.json
    names = ["pixel_values", "hidden", "rotary_cos", "rotary_sin", "windows", "key.0", "value.15"]
    prof = vision_profiles(names, VISION_3B, image, max_tokens)
    frame_max = max_frame_patches(image, max_tokens)
    assert frame_max == (16384 if max_tokens else image.max_pixels // 196)
    seen_frames, seen_rows = [], []
    for aspect in (1.0, 4 / 3, 16 / 9, 3.0, 0.25):
        for pixels in (56 * 56, 448 * 448, frame_max * 196):
            h = int(round((pixels / aspect) ** 0.5))
            w = int(round(h * aspect))
            rh, rw = smart_resize(h, w, image.factor, image.min_pixels, min(image.max_pixels, frame_max * 196))
            grid = (1, rh // 14, rw // 14)
            for rows, win, frame in scheduled_shapes(grid, VISION_3B):
                for n in ("pixel_values", "hidden", "rotary_cos", "rotary_sin"):
                    assert within((rows, prof[n].min[1]), prof[n]), (grid, n, rows)
                assert within(win, prof["windows"]), (grid, win)
                assert within((1, frame, VISION_3B.head_dim), prof["key.0"]), (grid, frame)
                seen_frames.append(frame)
                seen_rows.append(rows)
    for p in prof.values():
        assert all(lo <= o <= hi for lo, o, hi in zip(p.min, p.opt, p.max))
    assert prof["hidden"].max[0] == CHUNK_ROWS == max(seen_rows)
    assert prof["key.0"].max[1] == frame_max >= max(seen_frames) > frame_max * 0.95
    assert prof["hidden"].opt == (CHUNK_ROWS, 1280) and prof["windows"].opt == (CHUNK_ROWS // 64, 64)
    assert prof["pixel_values"].max[1] == VISION_3B.patch_dim and prof["value.15"].min == (1, 4, 80)


def test_profiles_name_every_input_of_the_engines_stage_graphs(tiny_engine):
    config = Manifest.load(tiny_engine).config
    for path in stage_files(tiny_engine / "vision"):
        names = graph_inputs(path)
        assert set(vision_profiles(names, config.vision, config.image, 64)) == set(names)
    with pytest.raises(BuildError, match="'mask'"):
        vision_profiles(["hidden", "mask"], config.vision, config.image, 64)


# -- the attention rewrite ------------------------------------------------------------------------------------------


def test_plain_attention_stages_compute_what_multi_head_attention_does(tiny_engine, tmp_path):
    """The rewritten graphs (what TensorRT parses) hold no com.microsoft op and give the same embeddings as the
    engine's graphs on ONNX Runtime: max relative error < 1e-5 over a two-image call with edge windows."""
    import onnx

    config = Manifest.load(tiny_engine).config
    plain = plain_stage_graphs(tiny_engine / "vision", tmp_path / "plain")
    mha = softmax = 0
    for src, p in zip(stage_files(tiny_engine / "vision"), plain):
        model = onnx.load(str(p), load_external_data=False)
        assert not [n for n in model.graph.node if n.domain == "com.microsoft"]
        mha += sum(n.op_type == "MultiHeadAttention" for n in onnx.load(str(src), load_external_data=False).graph.node)
        softmax += sum(n.op_type == "Softmax" for n in model.graph.node)
    assert softmax == mha > 0
    grid = np.array([[1, 12, 18], [1, 8, 6]])
    pixels = np.random.default_rng(0).standard_normal((int(grid.prod(1).sum()), config.vision.patch_dim))
    pixels = pixels.astype(np.float32)
    ref = VisionEncoder(tiny_engine / "vision", config.vision).encode(pixels, grid)
    got = VisionEncoder(plain[0].parent, config.vision).encode(pixels, grid)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def test_decompose_attention_refuses_masked_attention():
    from onnx import helper

    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "mask"], ["o"], domain="com.microsoft",
                            num_heads=2, scale=0.5)
    model = helper.make_model(helper.make_graph([node], "g", [], []))
    with pytest.raises(BuildError, match="mask"):
        decompose_attention(model)


# -- TensorRT builder calls (stand-in module) -----------------------------------------------------------------------


class FakeTrt(types.ModuleType):
    """The parts of the tensorrt module zoomin calls, recording every argument."""

    def __init__(self, version: str = STACK.versions["tensorrt"], parse_ok: bool = True, io_graphs: Path | None = None):
        super().__init__("tensorrt")
        self.__version__, self.parse_ok, self.io_graphs = version, parse_ok, io_graphs
        self.networks, self.configs, self.parsed, self.built, self.deserialized = [], [], [], [], []
        trt = self

        class Logger:
            WARNING = "warning"

            def __init__(self, level):
                self.level = level

        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 0

        class MemoryPoolType:
            WORKSPACE = "workspace"

        class TensorIOMode:
            INPUT, OUTPUT = "input", "output"

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, mn, opt, mx):
                self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

        class Config:
            def __init__(self):
                self.pools, self.profiles, self.flags = {}, [], []

            def set_memory_pool_limit(self, pool, size):
                self.pools[pool] = size

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def set_flag(self, flag):
                self.flags.append(flag)

        class Network:
            def __init__(self, flags):
                self.flags, self.path = flags, None

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                trt.networks.append(Network(flags))
                return trt.networks[-1]

            def create_builder_config(self):
                trt.configs.append(Config())
                return trt.configs[-1]

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                trt.built.append((network, config))
                return f"plan:{Path(network.path).name}".encode()

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0 if trt.parse_ok else 1

            def parse_from_file(self, path):
                self.network.path = path
                trt.parsed.append(path)
                return trt.parse_ok

            def get_error(self, i):
                return "In node 7 (MultiHeadAttention): No importer registered"

        class Engine:  # deserialized plan: the io of the ONNX stage graph it was built from
            def __init__(self, data):
                import onnx

                graph = onnx.load(str(trt.io_graphs / data.decode().removeprefix("plan:")),
                                  load_external_data=False).graph
                self.io = [(i.name, "input") for i in graph.input] + [(o.name, "output") for o in graph.output]
                self.num_io_tensors = len(self.io)

            def get_tensor_name(self, i):
                return self.io[i][0]

            def get_tensor_mode(self, name):
                return dict(self.io)[name]

            def get_tensor_dtype(self, name):
                return np.int64 if name == "windows" else np.float32

            def create_execution_context(self):
                return object()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                trt.deserialized.append(data)
                return Engine(data)

        for cls in (Logger, NetworkDefinitionCreationFlag, MemoryPoolType, TensorIOMode, Builder, OnnxParser, Runtime):
            setattr(self, cls.__name__, cls)
        self.nptype = lambda dt: dt


def test_vision_plans_call_the_builder_with_the_profiles(tiny_engine, tmp_path):
    """One strongly typed network per stage graph, parsed from the rewritten file, one profile whose set_shape
    calls are exactly vision_profiles' for that graph's inputs, the workspace limit; the plan bytes written."""
    config = Manifest.load(tiny_engine).config
    stages = plain_stage_graphs(tiny_engine / "vision", tmp_path / "plain")
    trt = FakeTrt()
    described = build_vision_plans(trt, stages, tmp_path / "plans", config, 64, 1 << 30, lambda s: None)
    assert trt.parsed == [str(p) for p in stages]
    assert [n.flags for n in trt.networks] == [1 << 0] * len(stages)  # 1 << STRONGLY_TYPED
    for path, (network, cfg) in zip(stages, trt.built):
        expected = vision_profiles(graph_inputs(path), config.vision, config.image, 64)
        assert len(cfg.profiles) == 1 and cfg.flags == []
        assert cfg.profiles[0].shapes == {n: (p.min, p.opt, p.max) for n, p in expected.items()}
        assert cfg.pools == {"workspace": 1 << 30}
        plan = tmp_path / "plans" / path.with_suffix(".plan").name
        assert plan.read_bytes() == f"plan:{path.name}".encode()
        assert described[plan.name] == {n: {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)}
                                        for n, p in expected.items()}
    with pytest.raises(BuildError, match=r"stage0.onnx: In node 7 \(MultiHeadAttention\)"):
        build_vision_plans(FakeTrt(parse_ok=False), stages, tmp_path / "bad", config, 64, 1 << 30, lambda s: None)


def test_options_refuse_fp8_where_it_cannot_run():
    orin = GpuStack(STACK.versions, "Orin", (8, 7))
    assert resolve_options(TensorRTOptions(), "fp32", STACK).llm_quant == "fp8"
    assert resolve_options(TensorRTOptions(), "fp32", orin).llm_quant == "int4_awq"
    with pytest.raises(BuildError, match="Orin .*compute capability 8.7.* has no FP8"):
        resolve_options(TensorRTOptions(kv_cache="fp8"), "fp32", orin)
    with pytest.raises(BuildError, match="needs --precision fp8"):
        resolve_options(TensorRTOptions(vision_precision="fp8"), "fp16", STACK)


# -- ModelOpt config (stand-in module) ------------------------------------------------------------------------------


def fake_mtq():
    mtq = types.SimpleNamespace(
        FP8_DEFAULT_CFG={"quant_cfg": {"*weight_quantizer": {"num_bits": (4, 3), "axis": None},
                                       "*input_quantizer": {"num_bits": (4, 3), "axis": None}}, "algorithm": "max"},
        INT4_AWQ_CFG={"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 64}}},
                      "algorithm": {"method": "awq_lite"}},
        FP8_KV_CFG={"quant_cfg": {"*[kv]_bmm_quantizer": {"num_bits": (4, 3), "axis": None}}})
    return mtq


def fake_mtq_lists():
    """The same configs in ModelOpt's newer ordered-list form."""
    return types.SimpleNamespace(
        FP8_DEFAULT_CFG={"quant_cfg": [{"quantizer_name": "*", "enable": False},
                                       {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": (4, 3)}}],
                         "algorithm": "max"},
        INT4_AWQ_CFG={"quant_cfg": [{"quantizer_name": "*", "enable": False},
                                    {"quantizer_name": "*weight_quantizer",
                                     "cfg": {"num_bits": 4, "block_sizes": {-1: 64}}}],
                      "algorithm": {"method": "awq_lite"}},
        FP8_KV_CFG={"quant_cfg": [{"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3)}}]})


def test_quant_config_list_form():
    mtq = fake_mtq_lists()
    awq = quant_config(mtq, "int4_awq", "fp8")["quant_cfg"]
    assert awq[1]["cfg"]["block_sizes"] == {-1: 128}
    assert awq[2:] == [{"quantizer_name": "*visual*", "enable": False},
                       {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3)}}]
    assert quant_config(mtq, "fp8", "bf16")["quant_cfg"][2:] == [{"quantizer_name": "*visual*", "enable": False}]
    assert mtq.INT4_AWQ_CFG["quant_cfg"][1]["cfg"]["block_sizes"] == {-1: 64}
    mtq.INT4_AWQ_CFG["quant_cfg"].pop()
    with pytest.raises(BuildError, match="no \\*weight_quantizer entry"):
        quant_config(mtq, "int4_awq", "auto")


def test_quant_config_is_modelopts_with_zoomins_changes_only():
    mtq = fake_mtq()
    fp8 = quant_config(mtq, "fp8", "auto")
    assert fp8["quant_cfg"]["*weight_quantizer"] == mtq.FP8_DEFAULT_CFG["quant_cfg"]["*weight_quantizer"]
    assert fp8["quant_cfg"]["*visual*"] == {"enable": False} and "*[kv]_bmm_quantizer" not in fp8["quant_cfg"]
    awq = quant_config(mtq, "int4_awq", "fp8")
    assert awq["quant_cfg"]["*weight_quantizer"]["block_sizes"] == {-1: 128}
    assert awq["quant_cfg"]["*[kv]_bmm_quantizer"] == {"num_bits": (4, 3), "axis": None}
    assert awq["algorithm"] == {"method": "awq_lite"}
    assert mtq.INT4_AWQ_CFG["quant_cfg"]["*weight_quantizer"]["block_sizes"] == {-1: 64}  # not modified in place


# -- calibration conversations --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib():
    return load_calibration_set(size=2)


def test_calibration_conversations_are_the_zoomin_conversations(tiny_engine, calib):
    """Each conversation is what zoomin.build.calibration records for that image (query 1 forced from its regions,
    query 2 with the crops), continued by the protocol's scripted answer; its images are the preprocessed full image
    and crops, one pixel block per image-pad run."""
    m = Manifest.load(tiny_engine)
    protocol, chat = Protocol.load(tiny_engine / "protocol.json"), chat_of(tiny_engine, m.config)
    convs = calibration_conversations(m.config, protocol, chat, calib)
    stand_in = stand_in_engine(m.config, protocol, tiny_engine / "tokenizer.json",
                               tiny_engine / m.graphs["embed_tokens"], PlaceholderVision(m.config.vision),
                               ChatFormat.load(tiny_engine / "chat.json"))
    rec = record(stand_in, calib)
    answer = [*scripted_answer(protocol, chat.tokenizer), m.config.tokens.im_end]
    assert len(convs) == len(calib.images) == 2
    for conv, (start, end), image in zip(convs, rec.conversations, calib.images):
        calls = rec.decoder[start:end]
        first = max(i for i, c in enumerate(calls) if c.past == 0)
        recorded = np.concatenate([c.ids for c in calls[first:]])
        assert np.array_equal(conv.ids[:len(recorded)], recorded)
        assert conv.ids[-len(answer):].tolist() == answer
        pad = m.config.tokens.image_pad
        assert (conv.ids == pad).sum() == (recorded == pad).sum() == int(conv.grid_thw.prod(1).sum()) // 4
        assert len(conversation_feed(calls)[0]) == len(recorded)
        assert len(conv.grid_thw) >= 2 and conv.pixel_values.shape == (conv.grid_thw.prod(1).sum(), 1176)
        pre = ZoomIn(None, chat, m.config, protocol, vocab_size=1).preprocess(load_image(image.path))
        assert np.array_equal(conv.pixel_values[:len(pre.pixel_values)], pre.pixel_values)
    texts = calibration_texts(convs, chat)
    for text in texts:
        assert text.count("<|im_start|>user") == 2 and text.count("<|im_start|>assistant") == 2
        assert text.endswith("<|im_end|>") and "<verdict>" in text


# -- the whole stage with stand-ins: manifest and compatibility ----------------------------------------------------


@pytest.fixture(scope="module")
def trt_engine(tiny_engine, tiny_ckpt, calib, tmp_path_factory):
    """A copy of the tiny engine with --target tensorrt's stage run on stand-ins: FakeTrt builds the plans, the
    fp16 re-export copies the engine's fp32 stage graphs, and ModelOpt's quantization is replaced by a function
    that records its conversations and writes two files."""
    engine = tmp_path_factory.mktemp("trt") / "tiny"
    shutil.copytree(tiny_engine, engine)
    seen = {}

    def fake_quantize(ckpt, out_dir, conversations, quant, kv_cache, log):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": quant.upper()}}))
        seen.update(ckpt=ckpt, conversations=conversations, quant=quant, kv_cache=kv_cache)
        return {"quant": quant, "awq_block_size": None, "kv_cache": kv_cache, "dtype": "float32",
                "calibration_conversations": len(conversations)}

    def fake_export(parts, out_dir, *, precision):  # the fp16 export is export_vision's own business (its tests)
        seen["export_precision"] = precision
        shutil.copytree(tiny_engine / "vision", out_dir)

    mp = pytest.MonkeyPatch()
    trt = FakeTrt()
    mp.setitem(sys.modules, "tensorrt", trt)
    mp.setattr("zoomin.build.tensorrt.quantize_language_model", fake_quantize)
    mp.setattr("zoomin.build.export_vision.export_vision", fake_export)
    try:
        record_ = build_tensorrt(engine, tiny_ckpt, TensorRTOptions(), STACK, calib, lambda s: None)
    finally:
        mp.undo()
    return engine, record_, seen, trt


def test_build_records_versions_gpu_settings_and_files(trt_engine, tiny_engine):
    engine, rec, seen, trt = trt_engine
    m = Manifest.load(engine, verify="sha256")  # every file, plans and LLM dir included, matches its sha256
    assert m.tensorrt == rec
    assert rec["versions"] == STACK.versions
    assert rec["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0]}
    assert rec["settings"]["vision_precision"] == "fp16" and rec["settings"]["quant"] == "fp8"
    assert rec["settings"]["kv_cache"] == "auto" and rec["settings"]["strongly_typed"] is True
    n_stages = len(stage_files(tiny_engine / "vision"))
    assert rec["vision"] == [f"tensorrt/vision/stage{k}.plan" for k in range(n_stages)]
    for f in rec["vision"] + ["tensorrt/llm/config.json", "tensorrt/llm/hf_quant_config.json"]:
        assert m.files[f]["sha256"] == sha256_file(engine / f)
    assert not [f for f in m.files if ".scratch" in f or ".building" in f]
    assert len(seen["conversations"]) == 2 and seen["quant"] == "fp8"
    assert seen["export_precision"] == "fp16"
    assert [Path(p).parent.name for p in trt.parsed] == ["plain"] * n_stages  # the fresh export, rewritten


def test_compat_check_refuses_other_gpus_and_versions(trt_engine):
    from zoomin.trtllm import check_tensorrt_compat

    engine, rec, _, _ = trt_engine
    m = Manifest.load(engine)
    here = {"name": "NVIDIA H100 PCIe", "capability": [9, 0]}
    check_tensorrt_compat(m, STACK.versions, here)
    check_tensorrt_compat(m, {**STACK.versions, "tensorrt_llm": "1.2.3"}, here)  # patch releases load it
    cases = [({"name": "Orin", "capability": [8, 7]}, STACK.versions, "compute capability 9.0.*Orin.*8.7"),
             (here, {**STACK.versions, "tensorrt": "10.11.0.33"}, "TensorRT 10.9.0.34, this is TensorRT 10.11"),
             (here, {**STACK.versions, "tensorrt_llm": "1.3.0"}, "TensorRT-LLM 1.2.0, this is TensorRT-LLM 1.3.0")]
    for gpu, versions, message in cases:
        with pytest.raises(EngineError, match=message) as e:
            check_tensorrt_compat(m, versions, gpu, engine)
        assert "\n" not in str(e.value) and str(engine) in str(e.value)
    with pytest.raises(EngineError, match="no TensorRT engines in it; build them with zoomin-build --target"):
        check_tensorrt_compat(replace(m, tensorrt=None), STACK.versions, here)


# -- the runtime backend (stand-in TensorRT-LLM) --------------------------------------------------------------------


class FakeCompletion:
    def __init__(self, token_ids, logits=None):
        self.token_ids, self.generation_logits = token_ids, logits


class FakeLLM:
    """tensorrt_llm.LLM: records its arguments and every generate call, answers from `replies`."""

    def __init__(self, model=None, kv_cache_config=None, replies=(), **kw):
        self.model, self.kv_cache_config, self.kw = model, kv_cache_config, kw
        self.replies, self.calls = list(replies), []

    def generate(self, prompt, sampling_params=None):
        self.calls.append((prompt, sampling_params))
        return types.SimpleNamespace(outputs=[self.replies.pop(0)])


class FakeParams:
    def __init__(self, **kw):
        self.kw = kw


def test_trtllm_backend_passes_embeddings_and_reuses_query_one(tiny_engine, photos):
    """Both queries through TrtLlmLM: each request carries the conversation with one placeholder per image and
    exactly the vision encoder's features for those images; query 2's prompt extends query 1's (prompt + forced
    answer), which is what block reuse keys on; the verdict and its score come from the returned tokens/logits."""
    import torch

    from zoomin.trtllm import TrtLlmLM

    m = Manifest.load(tiny_engine)
    protocol, chat, cfg = Protocol.load(tiny_engine / "protocol.json"), chat_of(tiny_engine, m.config), m.config
    answer = chat.tokenizer.encode(protocol.format_answer("Blurry seams.", [], "generated"),
                                   add_special_tokens=False).ids + [cfg.tokens.im_end]
    logits = torch.full((len(answer), cfg.text.vocab_size), -10.0)
    logits[torch.arange(len(answer)), torch.tensor(answer)] = 10.0
    llm = FakeLLM(replies=[FakeCompletion([17]), FakeCompletion(answer, logits)])
    vision = VisionEncoder(tiny_engine / "vision", cfg.vision)
    lm = TrtLlmLM(llm, FakeParams, vision, cfg, chat, torch, device="cpu", embed_dtype="float32", tokens_per_block=8)
    zoom = ZoomIn(lm, chat, cfg, protocol, vocab_size=cfg.text.vocab_size)
    result = zoom.detect(photos["astronaut"], regions=[((100, 60, 300, 260), "face")])

    (p1, s1), (p2, s2) = llm.calls
    pre = zoom.preprocess(photos["astronaut"])
    full = vision.encode(pre.pixel_values, [pre.grid_thw])
    assert p1["prompt"].count("<|image_pad|>") == 1 and len(p1["multi_modal_embeddings"]["image"]) == 1
    assert np.array_equal(p1["multi_modal_embeddings"]["image"][0].numpy(), full)
    images2 = p2["multi_modal_embeddings"]["image"]
    assert p2["prompt"].count("<|image_pad|>") == len(images2) == 1 + len(result.boxes) + 1  # full, original, crop
    assert np.array_equal(images2[0].numpy(), full) and np.array_equal(images2[1].numpy(), full)
    assert p2["prompt"].startswith(p1["prompt"]) and len(p2["prompt"]) > len(p1["prompt"])
    stops = sorted({cfg.tokens.im_end, cfg.tokens.endoftext})
    assert s1.kw == {"max_tokens": 1, "stop_token_ids": stops, "return_generation_logits": False, "top_k": 1}
    assert s2.kw == {"max_tokens": protocol.max_new_tokens_check, "stop_token_ids": stops,
                     "return_generation_logits": True, "top_k": 1}
    assert result.verdict == "generated" and result.score > 0.99 and result.stage1_verdict is None
    assert result.tokens["reused_prefix"] > 0 and result.tokens["reused_prefix"] % 8 == 0
    assert result.tokens["reused_prefix"] + result.tokens["stage2_prefill"] == result.tokens["stage2_prompt"]


def test_trtllm_load_builds_the_llm_with_block_reuse(trt_engine, tiny_engine, monkeypatch):
    """load() on stand-in tensorrt / tensorrt_llm with a GPU faked into torch: refuses another GPU capability in one
    line, else deserializes every plan in order and constructs LLM(model=<engine>/tensorrt/llm,
    kv_cache_config=KvCacheConfig(enable_block_reuse=True))."""
    import torch

    from zoomin import trtllm

    engine, rec, _, _ = trt_engine
    trt = FakeTrt(io_graphs=tiny_engine / "vision")
    llm_mod = types.ModuleType("tensorrt_llm")
    llm_mod.__version__, llm_mod.LLM, llm_mod.SamplingParams = "1.2.0", FakeLLM, FakeParams
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = lambda **kw: ("KvCacheConfig", kw)
    for name, mod in (("tensorrt", trt), ("tensorrt_llm", llm_mod), ("tensorrt_llm.llmapi", llmapi)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Jetson AGX Orin")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 7))
    with pytest.raises(EngineError, match=r"compute capability 9.0\) cannot run on Jetson AGX Orin"):
        ZoomIn.load(engine, device="tensorrt-llm")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    zoom = ZoomIn.load(engine, device="tensorrt-llm")
    assert isinstance(zoom.lm, trtllm.TrtLlmLM)
    assert zoom.lm.llm.model == str(engine / "tensorrt" / "llm")
    assert zoom.lm.llm.kv_cache_config == ("KvCacheConfig", {"enable_block_reuse": True})
    assert trt.deserialized == [(engine / p).read_bytes() for p in rec["vision"]]
    assert [s.inputs for s in zoom.lm.vision.stages] == [tuple(graph_inputs(p))
                                                        for p in stage_files(tiny_engine / "vision")]
    assert ZoomIn.load(engine, device="tensorrt-llm", reuse=False).lm.llm.kv_cache_config[1] == \
        {"enable_block_reuse": False}


# -- refusals without the packages ----------------------------------------------------------------------------------


def test_build_target_tensorrt_without_packages_is_one_line(tmp_path):
    from zoomin.build.cli import main

    out = tmp_path / "engine"
    res = CliRunner().invoke(main, ["--model", "tiny-random", "--target", "tensorrt", "--out", str(out)])
    assert res.exit_code != 0 and not out.exists()
    lines = res.output.strip().splitlines()
    assert lines == ["Error: --target tensorrt needs tensorrt>=10, tensorrt-llm, nvidia-modelopt and a CUDA GPU "
                     "(pip install 'zoomin[gpu]')"]
    res = CliRunner().invoke(main, ["--model", "tiny-random", "--kv-cache", "fp8", "--out", str(out)])
    assert res.exit_code == 2 and "apply to --target tensorrt" in res.output


def test_detect_device_tensorrt_llm_without_packages_is_one_line(tiny_engine, tmp_path, photos):
    import cv2

    from zoomin.cli import main

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), photos["coffee"][:, :, ::-1])
    res = CliRunner().invoke(main, ["detect", str(image), "--engine", str(tiny_engine), "--device", "tensorrt-llm",
                                    "--no-isolate"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: device tensorrt-llm needs tensorrt>=10, tensorrt-llm and a CUDA GPU (pip install 'zoomin[gpu]')"]


def test_runtime_imports_no_gpu_library():
    code = ("import sys, zoomin.runtime, zoomin.trtllm, zoomin.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_llm', 'modelopt', "
            "'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_trt_execution_provider_gets_the_cache_directory(monkeypatch, tmp_path):
    import onnxruntime as ort

    from zoomin.runtime.providers import DeviceError, providers_for

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    name, opts = providers_for("tensorrt", cache_dir=tmp_path / "cache")[0]
    assert name == "TensorrtExecutionProvider" and (tmp_path / "cache").is_dir()
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert opts["trt_timing_cache_path"] == str(tmp_path / "cache")
    (tmp_path / "ro").write_text("a file, not a directory")
    with pytest.raises(DeviceError, match="--trt-cache"):
        providers_for("tensorrt", cache_dir=tmp_path / "ro" / "cache")
