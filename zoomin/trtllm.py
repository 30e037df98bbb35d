"""device="tensorrt-llm": the vision tower on TensorRT plans, the language model on the TensorRT-LLM LLM API.

NOT RUN ON A GPU. Written against the documented TensorRT 10 Python runtime (trt.Runtime.deserialize_cuda_engine,
execution contexts, execute_async_v3) and the TensorRT-LLM LLM API (tensorrt_llm.LLM on the PyTorch backend,
KvCacheConfig, SamplingParams, prompts with "multi_modal_embeddings"); tested on CPU with stand-in modules only.

This module is imported only when that device is asked for, and imports tensorrt / tensorrt_llm only inside the
functions that use them. It lives outside zoomin.runtime because it touches torch: TensorRT-LLM is a PyTorch
program and its LLM API takes image embeddings as torch tensors, so this backend cannot exist without it; the
runtime itself (the ONNX backends) stays torch-free.

How the two queries map onto the LLM API: each `run` sends the whole conversation so far, its images' features
(from the TensorRT vision plans, cached per image within one conversation) as the prompt's multimodal
embeddings. With KvCacheConfig(enable_block_reuse=True), query 2's prompt starts with query 1's prompt and
answer, so their KV blocks are reused instead of recomputed (whole blocks only, keyed by the tokens and, for
image blocks, the multimodal content), as OnnxLM reuses its cache rows.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .runtime.lm import Generation, StepObserver, image_runs, stop_ids
from .runtime.manifest import EngineError, Manifest
from .runtime.preprocess import PreprocessedImage
from .runtime.providers import DeviceError
from .runtime.sampling import Sampler
from .runtime.vision import encode_new

GPU_EXTRA = "pip install 'zoomin[gpu]'"
# (module, pip name, minimum major version or None)
RUNTIME_REQUIRED = (("tensorrt", "tensorrt>=10", 10), ("tensorrt_llm", "tensorrt-llm", None), ("torch", "torch", None))


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # not installed, or broken (a CUDA library missing): either way unusable
        return None


def find_gpu_stack(required: Sequence[tuple[str, str, int | None]], what: str
                   ) -> tuple[dict[str, str], dict[str, Any]]:
    """(versions by module, {"name", "capability"} of GPU 0), or a DeviceError of one line naming all that is
    missing: "<what> needs tensorrt>=10, tensorrt-llm and a CUDA GPU (pip install 'zoomin[gpu]')"."""
    missing, modules = [], {}
    for module, pip_name, major in required:
        mod = _import(module)
        version = str(getattr(mod, "__version__", "0")) if mod else "0"
        if mod is None or (major is not None and int(version.split(".")[0]) < major):
            missing.append(pip_name)
        else:
            modules[module] = mod
    torch = modules.get("torch") or _import("torch")
    has_gpu = torch is not None and torch.cuda.is_available()
    if missing or not has_gpu:
        needs = ", ".join(missing)
        if not has_gpu:
            needs = f"{needs} and a CUDA GPU" if needs else "a CUDA GPU"
        elif len(missing) > 1:
            needs = ", ".join(missing[:-1]) + f" and {missing[-1]}"
        raise DeviceError(f"{what} needs {needs} ({GPU_EXTRA})")
    versions = {m: str(mod.__version__) for m, mod in modules.items()}
    return versions, {"name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0))}


def _major_minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def check_tensorrt_compat(manifest: Manifest, versions: Mapping[str, str], gpu: Mapping[str, Any],
                          where: str | Path = "engine") -> None:
    """Refuse, with one line, TensorRT artefacts this machine cannot run: plans are specific to the GPU's compute
    capability and to the TensorRT version that built them; the quantized checkpoint to the TensorRT-LLM release
    line (major.minor) whose loader it was exported for."""
    rec = manifest.tensorrt
    if not rec:
        raise EngineError(f"{where}: no TensorRT engines in it; build them with zoomin-build --target tensorrt")
    built_gpu = rec["gpu"]
    if list(built_gpu["capability"]) != list(gpu["capability"]):
        cc = ".".join(map(str, built_gpu["capability"]))
        here = ".".join(map(str, gpu["capability"]))
        raise EngineError(f"{where}: TensorRT plans built for {built_gpu['name']} (compute capability {cc}) cannot "
                          f"run on {gpu['name']} (compute capability {here}); rebuild with --target tensorrt here")
    built = rec["versions"]
    if built["tensorrt"] != versions.get("tensorrt"):
        raise EngineError(f"{where}: TensorRT plans built with TensorRT {built['tensorrt']}, this is TensorRT "
                          f"{versions.get('tensorrt')}; rebuild with --target tensorrt")
    if _major_minor(built["tensorrt_llm"]) != _major_minor(versions.get("tensorrt_llm", "")):
        raise EngineError(f"{where}: language model exported for TensorRT-LLM {built['tensorrt_llm']}, this is "
                          f"TensorRT-LLM {versions.get('tensorrt_llm')}; rebuild with --target tensorrt")


class TrtStage:
    """One vision stage plan, callable like zoomin.runtime.vision.Stage (numpy feeds in, numpy outputs back), so
    vision.run_tower drives it unchanged. Inputs are copied to the GPU per call and outputs back: the scheduler
    keeps the frame's residual stream and K/V on the host, as it does for ONNX Runtime."""

    def __init__(self, trt, torch, plan: Path, device: str = "cuda"):
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan}: TensorRT cannot deserialize this plan")
        self.context = self.engine.create_execution_context()
        self.torch, self.device = torch, device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = tuple(n for n in names if mode(n) == trt.TensorIOMode.INPUT)
        self.outputs = tuple(n for n in names if mode(n) == trt.TensorIOMode.OUTPUT)
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, keep = self.torch, []
        for n in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feed[n], dtype=self.dtypes[n])).to(self.device)
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
            keep.append(t)
        outs = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            outs[n] = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, self.dtypes[n])).dtype, device=self.device)
            self.context.set_tensor_address(n, outs[n].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outs.items()}


def prompt_text(ids: np.ndarray, image_pad: int, decode) -> str:
    """The conversation as text with each image's run of pads collapsed to one <|image_pad|>: the placeholder the
    LLM API's input processor expands to its image's embedding rows."""
    keep = np.ones(len(ids), bool)
    for start, end in image_runs(ids, image_pad):
        keep[start + 1:end] = False
    return decode(ids[keep])


def sampling_kwargs(sampler: Sampler, max_tokens: int, stops: Sequence[int], logits: bool) -> dict[str, Any]:
    """SamplingParams for zoomin's Sampling: greedy as top_k=1, else temperature/top_p with the seed."""
    s = sampler.sampling
    kw: dict[str, Any] = {"max_tokens": max_tokens, "stop_token_ids": list(stops), "return_generation_logits": logits}
    if s.temperature == 0:
        kw["top_k"] = 1
    else:
        kw.update(temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    return kw


class TrtLlmLM:
    """The LanguageModel ZoomIn drives (zoomin.runtime.pipeline), on a tensorrt_llm.LLM and a VisionEncoder whose
    stages are TensorRT plans."""

    def __init__(self, llm, sampling_params_cls, vision, config, chat, torch, *, device: str = "cuda",
                 embed_dtype: str = "bfloat16", tokens_per_block: int = 32):
        self.llm, self.SamplingParams, self.vision = llm, sampling_params_cls, vision
        self.config, self.chat, self.torch = config, chat, torch
        self.device, self.embed_dtype, self.tokens_per_block = device, getattr(torch, embed_dtype), tokens_per_block
        self._vision: dict[int, np.ndarray] = {}
        self._previous = np.zeros(0, np.int64)  # the last request's tokens, answer included

    def begin(self) -> None:
        self._vision.clear()

    def run(self, ids: np.ndarray, images: Sequence[PreprocessedImage], *, forced: Sequence[int] | None = None,
            max_new_tokens: int, sampler: Sampler, observer: StepObserver | None = None) -> Generation:
        tok = self.config.tokens
        full = np.concatenate([ids, np.asarray(forced or [], np.int64)])
        if len(image_runs(full, tok.image_pad)) != len(images):
            raise ValueError(f"conversation holds {len(image_runs(full, tok.image_pad))} images but {len(images)} "
                             f"were given")
        t0 = time.perf_counter()
        embeds = self._encode(images)
        t1 = time.perf_counter()
        prompt = {"prompt": prompt_text(full, tok.image_pad, lambda x: self.chat.decode(x, skip_special_tokens=False)),
                  "multi_modal_embeddings": {"image": [self.torch.from_numpy(e).to(self.device, self.embed_dtype)
                                                       for e in embeds]}}
        # a teacher-forced answer is part of the prompt: one token is generated (and dropped) so that its KV
        # blocks are computed and stay in the reuse pool for query 2
        params = self.SamplingParams(**sampling_kwargs(sampler, 1 if forced is not None else max_new_tokens,
                                                       sorted(stop_ids(tok)), observer is not None and forced is None))
        out = self.llm.generate(prompt, sampling_params=params)
        t2 = time.perf_counter()
        completion = out.outputs[0]
        generated, stopped = list(completion.token_ids), forced is not None
        if forced is None and generated and generated[-1] in stop_ids(tok):
            generated, stopped = generated[:-1], True
        if observer is not None and forced is None and getattr(completion, "generation_logits", None) is not None:
            vocab = self.config.text.vocab_size
            logits = completion.generation_logits.float().cpu().numpy().reshape(-1, vocab)
            for i in range(min(len(logits), len(generated) + stopped)):
                observer(generated[:i], logits[i])
        reused = self._shared_blocks(full)
        self._previous = np.concatenate([full, np.asarray(generated if forced is None else [], np.int64)])
        return Generation(tokens=list(forced) if forced is not None else generated, stopped=stopped,
                          prefill_tokens=len(full) - reused, reused_tokens=reused, vision_ms=(t1 - t0) * 1e3,
                          prefill_ms=0.0, decode_ms=(t2 - t1) * 1e3)  # the LLM API times prefill and decode as one

    def _shared_blocks(self, ids: np.ndarray) -> int:
        """Tokens of `ids` in whole KV blocks shared with the previous request: what block reuse can skip."""
        n = min(len(ids) - 1, len(self._previous))
        diff = np.flatnonzero(self._previous[:n] != ids[:n])
        same = int(diff[0]) if diff.size else max(n, 0)
        return same // self.tokens_per_block * self.tokens_per_block

    def _encode(self, images: Sequence[PreprocessedImage]) -> list[np.ndarray]:
        encode_new(self.vision, images, self._vision, self.config.vision.spatial_merge_size)
        return [self._vision[id(im)] for im in images]


def load(engine_dir: str | Path, *, reuse: bool = True, verify: str = "size", device: str = "cuda"):
    """(TrtLlmLM, ChatTokenizer, ModelConfig, Protocol) of an engine built with --target tensorrt; a one-line
    DeviceError when the packages or the GPU are missing, an EngineError when the artefacts do not fit here."""
    from .runtime.chat import ChatFormat, ChatTokenizer
    from .runtime.protocol import Protocol
    from .runtime.vision import VisionEncoder

    versions, gpu = find_gpu_stack(RUNTIME_REQUIRED, "device tensorrt-llm")
    root = Path(engine_dir)
    manifest = Manifest.load(root, verify=verify)
    check_tensorrt_compat(manifest, versions, gpu, root)
    import tensorrt as trt
    import tensorrt_llm
    import torch
    from tensorrt_llm.llmapi import KvCacheConfig

    rec, cfg, graphs = manifest.tensorrt, manifest.config, manifest.graphs
    vision = VisionEncoder([TrtStage(trt, torch, root / p, device) for p in rec["vision"]], cfg.vision)
    llm = tensorrt_llm.LLM(model=str(root / rec["llm"]), kv_cache_config=KvCacheConfig(enable_block_reuse=reuse))
    chat_format = ChatFormat.load(root / graphs["chat"]) if "chat" in graphs else ChatFormat()
    chat = ChatTokenizer.from_file(root / graphs["tokenizer"], cfg, chat_format)
    lm = TrtLlmLM(llm, tensorrt_llm.SamplingParams, vision, cfg, chat, torch, device=device,
                  embed_dtype=rec["settings"].get("dtype", "bfloat16"))
    return lm, chat, cfg, Protocol.load(root / graphs["protocol"])
