"""`zoomin-build --target tensorrt`: TensorRT plans for the vision tower and a TensorRT-LLM language model.

NOT RUN ON A GPU. Everything here is written against the documented TensorRT 10 Python API, the NVIDIA ModelOpt
quantization/export API and the TensorRT-LLM LLM API, and is tested on CPU up to the library calls (with stand-in
modules that record what they are called with); no plan or quantized checkpoint has been built or run yet.

After the normal ONNX build, two artefacts go into the engine directory:
- tensorrt/vision/stage{k}.plan: one serialized TensorRT engine per vision stage graph (zoomin.runtime.vision runs
  them exactly like the ONNX stages: per frame and chunk, rows <= CHUNK_ROWS). Their optimization profiles come
  from `vision_profiles` (the protocol's max_image_tokens, the image config and CHUNK_ROWS bound every shape).
  The networks are strongly typed: precision comes from the graph, not from builder flags (TensorRT 11 has no
  other mode). fp16 plans are built from a fresh fp16 export (fp16 weights and activations, the last block's
  MLP down_proj kept in fp32 against overflow); fp8 plans from the engine's own calibrated Q/DQ float8 stage
  graphs (`--precision fp8`), since TensorRT's FP8 is explicit quantization only. ONNX Runtime's
  com.microsoft.MultiHeadAttention, which TensorRT's ONNX parser does not read, is rewritten into standard ops
  first (`decompose_attention`).
- tensorrt/llm/: the language model as a ModelOpt-quantized Hugging Face checkpoint (FP8 weights and activations,
  or INT4-AWQ in blocks of 128; KV cache fp16/bf16 unless --kv-cache fp8), calibrated on the calibration set's
  ZoomIn conversations (`calibration_conversations`: both queries, crops included, as zoomin.build.calibration
  lays them out). The LLM API loads that directory directly: `tensorrt_llm.LLM(model=<dir>)` on the PyTorch
  backend reads the `hf_quant_config.json` ModelOpt's `export_hf_checkpoint` writes next to the weights
  (the "unified Hugging Face checkpoint" of https://nvidia.github.io/TensorRT-Model-Optimizer/deployment/
  3_unified_hf.html; "load the exported Hugging Face checkpoint with TensorRT-LLM's PyTorch backend", no engine
  build: https://nvidia.github.io/Model-Optimizer/deployment/1_tensorrt_llm.html).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..runtime.config import ImageConfig, ModelConfig, VisionConfig
from ..runtime.vision import HEAD_INPUT
from ..runtime.vision_meta import CHUNK_ROWS
from .checkpoint import BuildError

GPU_EXTRA = "pip install 'zoomin[gpu]'"
TRT_DIR = "tensorrt"
VISION_PLANS = f"{TRT_DIR}/vision"
LLM_DIR = f"{TRT_DIR}/llm"
VISION_PRECISIONS = ("fp16", "fp8")
LLM_QUANTS = ("fp8", "int4_awq")
KV_CACHE_DTYPES = ("auto", "fp16", "bf16", "fp8")  # auto: the checkpoint's dtype (bf16 for Qwen2.5-VL)
AWQ_BLOCK = 128
FP8_CAPABILITY = (8, 9)  # Ada and newer; Ampere and Jetson Orin (8.7) have no FP8 tensor cores
LLM_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json")

Log = Callable[[str], None]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorRTOptions:
    vision_precision: str = "fp16"
    llm_quant: str = "auto"  # auto: fp8 on FP8 GPUs (compute capability >= 8.9), else int4_awq
    kv_cache: str = "auto"
    workspace_gib: float = 4.0


@dataclass(frozen=True)
class GpuStack:
    """What `--target tensorrt` found: package versions and the GPU it builds for (plans are tied to both)."""

    versions: dict[str, str]
    gpu: str
    capability: tuple[int, int]


# -- refusing cleanly -----------------------------------------------------------------------------------------------

# (module, pip name, minimum major version or None)
BUILD_REQUIRED = (("tensorrt", "tensorrt>=10", 10), ("tensorrt_llm", "tensorrt-llm", None),
                  ("modelopt", "nvidia-modelopt", None), ("torch", "torch", None))


def require_gpu_stack(what: str = "--target tensorrt") -> GpuStack:
    """The installed GPU stack, or a BuildError of one line naming everything that is missing."""
    from ..runtime.providers import DeviceError
    from ..trtllm import find_gpu_stack

    try:
        versions, gpu = find_gpu_stack(BUILD_REQUIRED, what)
    except DeviceError as e:
        raise BuildError(str(e)) from None
    return GpuStack(versions, gpu["name"], tuple(gpu["capability"]))


def resolve_options(opts: TensorRTOptions, precision: str, stack: GpuStack) -> TensorRTOptions:
    """Fill in `auto` and refuse combinations the GPU or the ONNX build cannot give, with one line."""
    fp8_gpu = stack.capability >= FP8_CAPABILITY
    if opts.vision_precision not in VISION_PRECISIONS:
        raise BuildError(f"--vision-precision must be one of {', '.join(VISION_PRECISIONS)}")
    if opts.vision_precision == "fp8" and precision != "fp8":
        raise BuildError("--vision-precision fp8 needs --precision fp8 (TensorRT's FP8 runs only the calibrated "
                         "Q/DQ graphs that build writes)")
    quant = opts.llm_quant if opts.llm_quant != "auto" else ("fp8" if fp8_gpu else "int4_awq")
    if quant not in LLM_QUANTS:
        raise BuildError(f"--llm-quant must be one of auto, {', '.join(LLM_QUANTS)}")
    if opts.kv_cache not in KV_CACHE_DTYPES:
        raise BuildError(f"--kv-cache must be one of {', '.join(KV_CACHE_DTYPES)}")
    if not fp8_gpu and "fp8" in (opts.vision_precision, quant, opts.kv_cache):
        cc = ".".join(map(str, stack.capability))
        raise BuildError(f"{stack.gpu} (compute capability {cc}) has no FP8; use --vision-precision fp16, "
                         f"--llm-quant int4_awq and a fp16/bf16 KV cache")
    return TensorRTOptions(opts.vision_precision, quant, opts.kv_cache, opts.workspace_gib)


# -- vision: optimization profiles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    min: Shape
    opt: Shape
    max: Shape


def max_frame_patches(image: ImageConfig, max_image_tokens: int | None) -> int:
    """Most patches one frame can have: the preprocessor's max_pixels, and the protocol's token limit (a full image
    over it is downscaled or refused before the tower). Crops are resized to at most crop_max_pixels <= max_pixels."""
    patches = image.max_pixels // image.patch_size**2
    if max_image_tokens is not None:
        patches = min(patches, max_image_tokens * image.merge_size**2)
    return patches


def vision_profiles(stage_inputs: Sequence[str], cfg: VisionConfig, image: ImageConfig,
                    max_image_tokens: int | None, chunk_rows: int = CHUNK_ROWS) -> dict[str, Profile]:
    """min/opt/max shape of every input of one stage graph, from the scheduler's bounds (zoomin.runtime.vision_meta).

    A call holds whole windows of one shape: window_len L is 4 (a 1x1-unit corner window) up to 64 (4x4 units),
    rows = windows x L is at most chunk_rows (or one window) and at most the frame; the frame's keys/values span
    every patch of it. opt is the call a large image makes most: full windows filling a chunk, the largest frame.
    """
    unit = cfg.spatial_merge_size**2
    side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    full_window = side * side * unit
    frame = max_frame_patches(image, max_image_tokens)
    rows_max = min(frame, max(chunk_rows, full_window))
    windows_opt = max(1, min(chunk_rows, frame) // full_window)
    rows_opt = min(windows_opt * full_window, rows_max)
    per_row = {"pixel_values": cfg.patch_dim, "hidden": cfg.hidden_size, "rotary_cos": cfg.head_dim,
               "rotary_sin": cfg.head_dim}
    out = {}
    for name in stage_inputs:
        if name in per_row:
            d = per_row[name]
            out[name] = Profile((unit, d), (rows_opt, d), (rows_max, d))
        elif name == "windows":
            out[name] = Profile((1, unit), (windows_opt, min(full_window, rows_opt)),
                                (rows_max // unit, min(full_window, rows_max)))
        elif HEAD_INPUT.fullmatch(name):
            out[name] = Profile((1, unit, cfg.head_dim), (1, frame, cfg.head_dim), (1, frame, cfg.head_dim))
        else:
            raise BuildError(f"vision stage input {name!r} is not one zoomin.runtime.vision feeds")
    return out


# -- vision: TensorRT-readable stage graphs -------------------------------------------------------------------------


def decompose_attention(model) -> int:
    """Rewrite every com.microsoft.MultiHeadAttention (3-D query/key/value, no mask/bias/past: what
    zoomin.build.export_vision emits) into Reshape/Transpose/MatMul/Softmax, in place; returns how many.

    softmax(scale * q k^T) v per head, q (B, S, H*hd), k and v (B, L, H*hd) -> (B, S, H*hd).
    """
    from onnx import TensorProto, helper

    graph, count, nodes = model.graph, 0, []
    for node in graph.node:
        if node.domain != "com.microsoft" or node.op_type != "MultiHeadAttention":
            nodes.append(node)
            continue
        if len([i for i in node.input if i]) != 3:
            raise BuildError(f"MultiHeadAttention {node.name!r} has a mask, bias or past; cannot rewrite it")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        heads, scale = int(attrs["num_heads"]), float(attrs["scale"])
        q, k, v = node.input[:3]
        p = f"{node.name or node.output[0]}/plain"
        split = helper.make_tensor(f"{p}/split_shape", TensorProto.INT64, [4], [0, 0, heads, -1])
        merge = helper.make_tensor(f"{p}/merge_shape", TensorProto.INT64, [3], [0, 0, -1])
        graph.initializer.extend([split, merge])
        nodes += [
            helper.make_node("Constant", [], [f"{p}/scale_f32"], value=helper.make_tensor(
                f"{p}/scale_value", TensorProto.FLOAT, [], [scale])),
            helper.make_node("CastLike", [f"{p}/scale_f32", q], [f"{p}/scale"]),
            helper.make_node("Reshape", [q, split.name], [f"{p}/q4"]),
            helper.make_node("Transpose", [f"{p}/q4"], [f"{p}/qh"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [k, split.name], [f"{p}/k4"]),
            helper.make_node("Transpose", [f"{p}/k4"], [f"{p}/kt"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [v, split.name], [f"{p}/v4"]),
            helper.make_node("Transpose", [f"{p}/v4"], [f"{p}/vh"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [f"{p}/qh", f"{p}/kt"], [f"{p}/scores"]),
            helper.make_node("Mul", [f"{p}/scores", f"{p}/scale"], [f"{p}/scaled"]),
            helper.make_node("Softmax", [f"{p}/scaled"], [f"{p}/probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}/probs", f"{p}/vh"], [f"{p}/oh"]),
            helper.make_node("Transpose", [f"{p}/oh"], [f"{p}/o4"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{p}/o4", merge.name], [node.output[0]]),
        ]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if count and not any(n.domain == "com.microsoft" for n in graph.node):
        kept = [o for o in model.opset_import if o.domain != "com.microsoft"]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return count


def plain_stage_graphs(src: Path, dst: Path) -> list[Path]:
    """Copies of the stage graphs of `src` (a vision directory) with attention in standard ops, in `dst`, next to
    their external data files (hard links where the file system allows: parsers refuse data outside the model's
    directory, symlinks included)."""
    import os

    import onnx

    from ..runtime.vision import stage_files

    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for path in stage_files(src):
        model = onnx.load(str(path), load_external_data=False)
        decompose_attention(model)
        for data in src.glob(f"{path.name}.data*"):
            link = dst / data.name
            if not link.exists():
                try:
                    os.link(data, link)
                except OSError:
                    shutil.copy2(data, link)
        onnx.save(model, str(dst / path.name))
        out.append(dst / path.name)
    return out


def graph_inputs(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


# -- vision: TensorRT -----------------------------------------------------------------------------------------------


def build_plan(trt, onnx_path: Path, profiles: Mapping[str, Profile], workspace_bytes: int) -> bytes:
    """One serialized engine for one stage graph: parse the ONNX file, a strongly typed network (types from the
    graph), one optimization profile, build_serialized_network (TensorRT 10 Python API)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, p in profiles.items():
        profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT could not build an engine for {onnx_path.name} (see its log above)")
    return bytes(plan)


def build_vision_plans(trt, stage_graphs: Sequence[Path], out_dir: Path, config: ModelConfig,
                       max_image_tokens: int | None, workspace_bytes: int, log: Log) -> dict[str, dict]:
    """stage{k}.plan for every stage graph; returns each plan's profiles (by file name) for the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    described = {}
    for path in stage_graphs:
        profiles = vision_profiles(graph_inputs(path), config.vision, config.image, max_image_tokens)
        name = path.with_suffix(".plan").name
        log(f"  {name}: {len(profiles)} inputs")
        (out_dir / name).write_bytes(build_plan(trt, path, profiles, workspace_bytes))
        described[name] = {n: {k: list(v) for k, v in asdict(p).items()} for n, p in profiles.items()}
    return described


# -- language model: calibration conversations ----------------------------------------------------------------------


@dataclass
class CalibConversation:
    """One calibration image's whole ZoomIn conversation, as the Hugging Face model takes it."""

    ids: np.ndarray  # (S,) int64: system prompt, query 1 (full image, teacher-forced answer), query 2 (crops) + answer
    pixel_values: np.ndarray  # (patches, patch_dim) float32, every image of the conversation in order
    grid_thw: np.ndarray  # (images, 3) int64


class _ConversationRecorder:
    """A LanguageModel (zoomin.runtime.pipeline) without weights: remembers what ZoomIn asks of it. Query 1 is
    teacher-forced; query 2 answers with the protocol's scripted answer (zoomin.build.calibration)."""

    def __init__(self, answer: Sequence[int]):
        self.answer, self.calls = list(answer), []

    def begin(self) -> None:
        pass

    def run(self, ids, images, *, forced=None, max_new_tokens, sampler, observer=None):
        from ..runtime.lm import Generation

        tokens = list(forced) if forced is not None else self.answer[:max_new_tokens]
        self.calls.append((np.asarray(ids, np.int64), list(images), tokens))
        return Generation(tokens=tokens, stopped=True, prefill_tokens=len(ids), reused_tokens=0)


def calibration_conversations(config: ModelConfig, protocol, chat, calib) -> list[CalibConversation]:
    """The ZoomIn conversation of every calibration image (zoomin.build.calibration's layout: query 1 forced from the
    image's regions so query 2 and its crops exist, query 2 answered in the protocol's answer format), laid out by
    the runtime's own pipeline. chat: the engine's ChatTokenizer; calib: a CalibrationSet."""
    from ..runtime.pipeline import ZoomIn
    from .calibration import scripted_answer

    answer = [*scripted_answer(protocol, chat.tokenizer), config.tokens.im_end]
    out = []
    for image in calib.images:
        recorder = _ConversationRecorder(answer)
        zoom = ZoomIn(recorder, chat, config, protocol, vocab_size=config.text.vocab_size)
        zoom.detect(image.path, regions=list(image.regions), max_new_tokens=len(answer))
        ids, images, tokens = recorder.calls[-1]
        out.append(CalibConversation(np.concatenate([ids, np.asarray(tokens, np.int64)]),
                                     np.concatenate([im.pixel_values for im in images]).astype(np.float32),
                                     np.stack([im.grid_thw for im in images]).astype(np.int64)))
    return out


def calibration_texts(conversations: Sequence[CalibConversation], chat) -> list[str]:
    """The conversations as text, special tokens kept (what the quantizer reads, for people and tests)."""
    return [chat.decode(c.ids, skip_special_tokens=False) for c in conversations]


# -- language model: ModelOpt -----------------------------------------------------------------------------------------


def quant_config(mtq, quant: str, kv_cache: str) -> dict:
    """ModelOpt's documented config for `quant` (FP8_DEFAULT_CFG, or INT4_AWQ_CFG with blocks of AWQ_BLOCK), the
    vision tower left unquantized (its TensorRT plans replace it), FP8_KV_CFG's entries added only for kv_cache fp8.

    Both documented forms of "quant_cfg" are read: a mapping from quantizer-name wildcards to attributes (ModelOpt
    up to 0.3x), and the ordered list of QuantizerCfgEntry dicts ({"quantizer_name", "cfg", "enable"}, later
    entries override earlier ones) of https://nvidia.github.io/Model-Optimizer/guides/_quant_cfg.html.
    """
    base = {"fp8": mtq.FP8_DEFAULT_CFG, "int4_awq": mtq.INT4_AWQ_CFG}[quant]
    cfg = copy.deepcopy(base)
    kv = copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]) if kv_cache == "fp8" else None
    entries = cfg["quant_cfg"]
    if isinstance(entries, dict):
        if quant == "int4_awq":
            entries["*weight_quantizer"]["block_sizes"] = {-1: AWQ_BLOCK}
        entries["*visual*"] = {"enable": False}
        entries.update(kv or {})
        return cfg
    if quant == "int4_awq":
        weights = [e for e in entries if e.get("quantizer_name") == "*weight_quantizer"
                   and isinstance(e.get("cfg"), dict) and "block_sizes" in e["cfg"]]
        if not weights:
            raise BuildError("ModelOpt's INT4_AWQ_CFG has no *weight_quantizer entry with block_sizes; "
                             "this ModelOpt version is not one zoomin knows")
        for e in weights:
            e["cfg"]["block_sizes"] = {-1: AWQ_BLOCK}
    entries.append({"quantizer_name": "*visual*", "enable": False})
    entries.extend(kv or [])
    return cfg


def quantize_language_model(ckpt: Path, out_dir: Path, conversations: Sequence[CalibConversation], quant: str,
                            kv_cache: str, log: Log) -> dict:
    """Calibrate and quantize the checkpoint with ModelOpt on the ZoomIn conversations (the whole VLM runs, so the
    language model sees the real image features), then export_hf_checkpoint into `out_dir`."""
    import modelopt.torch.quantization as mtq
    import torch
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    dtype = torch.float16 if kv_cache == "fp16" else torch.bfloat16
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=dtype).cuda().eval()

    def forward_loop(m) -> None:
        for i, c in enumerate(conversations):
            m(input_ids=torch.from_numpy(c.ids)[None].cuda(),
              pixel_values=torch.from_numpy(c.pixel_values).to("cuda", dtype),
              image_grid_thw=torch.from_numpy(c.grid_thw).cuda())
            log(f"  calibration conversation {i + 1}/{len(conversations)} ({len(c.ids)} tokens, "
                f"{len(c.grid_thw)} images)")

    with torch.inference_mode():
        model = mtq.quantize(model, quant_config(mtq, quant, kv_cache), forward_loop)
        export_hf_checkpoint(model, export_dir=str(out_dir))
    for name in LLM_FILES:
        if (ckpt / name).exists():
            shutil.copy2(ckpt / name, out_dir / name)
    return {"quant": quant, "awq_block_size": AWQ_BLOCK if quant == "int4_awq" else None, "kv_cache": kv_cache,
            "dtype": str(dtype).removeprefix("torch."), "calibration_conversations": len(conversations),
            "calibration_tokens": int(sum(len(c.ids) for c in conversations))}


# -- the stage ------------------------------------------------------------------------------------------------------


def build_tensorrt(engine_dir: Path, ckpt: Path, opts: TensorRTOptions, stack: GpuStack, calib, log: Log) -> dict:
    """Add tensorrt/vision/*.plan and tensorrt/llm/ to a finished ONNX engine and record them in its manifest
    (files with sha256, and a "tensorrt" block). Built into a temporary folder first: a failure leaves the ONNX
    engine as it was."""
    import tensorrt as trt

    from ..runtime.chat import ChatFormat, ChatTokenizer
    from ..runtime.manifest import Manifest
    from ..runtime.protocol import Protocol
    from .weights import open_parts

    manifest = Manifest.load(engine_dir, verify="size")
    opts = resolve_options(opts, manifest.precision, stack)
    protocol = Protocol.load(engine_dir / manifest.graphs["protocol"])
    graphs = manifest.graphs
    chat_format = ChatFormat.load(engine_dir / graphs["chat"]) if "chat" in graphs else ChatFormat()
    chat = ChatTokenizer.from_file(engine_dir / graphs["tokenizer"], manifest.config, chat_format)
    tmp = engine_dir / f".{TRT_DIR}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        scratch = tmp / ".scratch"
        log(f"[tensorrt 1/3] vision plans ({opts.vision_precision}, strongly typed) for {stack.gpu}")
        if opts.vision_precision == "fp16":
            from .export_vision import export_vision

            export_vision(open_parts(ckpt), scratch / "fp16", precision="fp16")
            source = scratch / "fp16"
        else:
            source = engine_dir / graphs["vision"]
        stages = plain_stage_graphs(source, scratch / "plain")
        profiles = build_vision_plans(trt, stages, tmp / "vision", manifest.config, protocol.max_image_tokens,
                                      int(opts.workspace_gib * 2**30), log)
        log(f"[tensorrt 2/3] ZoomIn calibration conversations of {len(calib.images)} images")
        conversations = calibration_conversations(manifest.config, protocol, chat, calib)
        log(f"[tensorrt 3/3] language model: ModelOpt {opts.llm_quant}, KV cache {opts.kv_cache}")
        llm = quantize_language_model(ckpt, tmp / "llm", conversations, opts.llm_quant, opts.kv_cache, log)
        shutil.rmtree(scratch)
        shutil.rmtree(engine_dir / TRT_DIR, ignore_errors=True)
        tmp.rename(engine_dir / TRT_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from .engine import make_world_readable

    make_world_readable(engine_dir / TRT_DIR)
    record = tensorrt_record(stack, opts, list(profiles), profiles, llm, calib.describe())  # stage order
    manifest.tensorrt = record
    manifest.write(engine_dir)
    return record


def tensorrt_record(stack: GpuStack, opts: TensorRTOptions, plans: Sequence[str], profiles: Mapping[str, dict],
                    llm: Mapping, calibration: Mapping) -> dict:
    """The manifest's "tensorrt" block: what the runtime checks before it loads the plans (check_tensorrt_compat)."""
    return {
        "versions": dict(stack.versions),
        "gpu": {"name": stack.gpu, "capability": list(stack.capability)},
        "settings": {"vision_precision": opts.vision_precision, "strongly_typed": True,
                     "workspace_gib": opts.workspace_gib, "chunk_rows": CHUNK_ROWS, **llm},
        "vision": [f"{VISION_PLANS}/{p}" for p in plans],
        "vision_profiles": dict(profiles),
        "llm": LLM_DIR,
        "calibration": dict(calibration),
    }
