"""One-shot check of the TensorRT / TensorRT-LLM engines on a GPU machine (tensorrt, tensorrt-llm, nvidia-modelopt,
torch with CUDA). NOT RUN YET: written with zoomin.build.tensorrt and zoomin.trtllm, which have only been
tested on CPU against stand-in modules.

What it does, for a random Qwen2.5-VL checkpoint at real 3B/7B widths (depth reducible to fit the time):
1. builds the ONNX fp32 engine, then `--target tensorrt` on it (vision plans, ModelOpt-quantized LM), timing both;
2. parity against the ONNX fp32 engine: vision max relative error of the TensorRT plans on the same pixels, and
   greedy tokens of both ZoomIn queries (fixed zoom regions, so query 2 always has crops): how many of the first
   --max-new-tokens agree (quantized weights need not agree token for token; exact agreement is only expected of
   an fp16/bf16 LM, so the figure is reported, not asserted);
3. per-stage times of the whole two-query job with device tensorrt-llm against transformers bf16 (eager; query 2
   recomputing query 1), same images and regions, after one warm-up.
Usage: python perf/device/gpu_engines.py --out OUT_DIR [--shape 3b] [--text-layers 4] [--vision-depth 8]
       [--llm-quant auto] [--vision-precision fp16] [--calib-size 4] [--max-new-tokens 32]
Exits with one line when a package or the GPU is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from zoomin.build.tensorrt import BUILD_REQUIRED  # noqa: E402
from zoomin.runtime.providers import DeviceError  # noqa: E402
from zoomin.trtllm import find_gpu_stack  # noqa: E402

REGIONS = [((150, 60, 330, 260), "face"), ((20, 300, 200, 500), "texture")]


def agreement(a: str, b: str, tokenizer) -> dict:
    x, y = tokenizer.encode(a, add_special_tokens=False).ids, tokenizer.encode(b, add_special_tokens=False).ids
    same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    return {"tokens": [len(x), len(y)], "first_divergence": same, "identical": x == y}


def stage_medians(zi, image, repeats: int, max_new: int) -> dict:
    zi.detect(image, zoom_regions=REGIONS, max_new_tokens=max_new)  # warm-up (TensorRT contexts, CUDA graphs)
    runs = [zi.detect(image, zoom_regions=REGIONS, max_new_tokens=max_new).timings_ms for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="3b", choices=["3b", "7b"])
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--vision-depth", type=int, default=8, help=">= 8 keeps a full-attention block (index 7)")
    ap.add_argument("--vision-precision", default="fp16", choices=["fp16"])  # fp8 needs a calibrated fp8 build
    ap.add_argument("--llm-quant", default="auto", choices=["auto", "fp8", "int4_awq"])
    ap.add_argument("--calib-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        versions, gpu = find_gpu_stack(BUILD_REQUIRED, "gpu_engines.py")
    except DeviceError as e:
        sys.exit(str(e))

    import numpy as np
    import torch
    import transformers
    from skimage import data

    from zoomin.build.calibration import load_calibration_set
    from zoomin.build.engine import BuildOptions, build_engine
    from zoomin.build.random_checkpoint import write_random_checkpoint
    from zoomin.build.tensorrt import GpuStack, TensorRTOptions, build_tensorrt
    from zoomin.hf_backend import HfLM
    from zoomin.runtime import Manifest, ZoomIn
    from zoomin.runtime.chat import ChatTokenizer
    from zoomin.runtime.preprocess import preprocess_image

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"versions": versions, "gpu": gpu, "args": {k: str(v) for k, v in vars(args).items()}}
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "ckpt", args.shape, text_layers=args.text_layers,
                                       vision_depth=args.vision_depth, seed=0)
        engine = Path(tmp) / "engine"
        t = time.perf_counter()
        build_engine(BuildOptions(model=ckpt, out=engine, precision="fp32", check_parity=False), log=log)
        report["onnx_build_s"] = time.perf_counter() - t
        stack = GpuStack(versions, gpu["name"], tuple(gpu["capability"]))
        t = time.perf_counter()
        report["tensorrt"] = build_tensorrt(engine, ckpt, TensorRTOptions(args.vision_precision, args.llm_quant),
                                            stack, load_calibration_set(size=args.calib_size), log)
        report["tensorrt_build_s"] = time.perf_counter() - t
        report["tensorrt_bytes"] = sum(f["size"] for n, f in Manifest.load(engine).files.items()
                                       if n.startswith("tensorrt/"))

        onnx_zi = ZoomIn.load(engine, device="cpu")
        trt_zi = ZoomIn.load(engine, device="tensorrt-llm")
        image = data.astronaut()
        pre = preprocess_image(image, config=onnx_zi.config.image)
        ref = onnx_zi.lm.engine.vision.encode(pre.pixel_values, [pre.grid_thw])
        got = trt_zi.lm.vision.encode(pre.pixel_values, [pre.grid_thw])
        report["vision_max_rel_err"] = float(np.abs(got - ref).max() / np.abs(ref).max())
        a = onnx_zi.detect(image, zoom_regions=REGIONS, max_new_tokens=args.max_new_tokens)
        b = trt_zi.detect(image, zoom_regions=REGIONS, max_new_tokens=args.max_new_tokens)
        tok = onnx_zi.chat.tokenizer
        report["query1_tokens"] = agreement(a.stage1_text, b.stage1_text, tok)
        report["query2_tokens"] = agreement(a.final_text, b.final_text, tok)
        report["trtllm_reused_prefix"] = b.tokens.get("reused_prefix")

        report["stages_ms"] = {"tensorrt_llm": stage_medians(trt_zi, image, args.repeats, args.max_new_tokens)}
        protocol = onnx_zi.protocol
        del trt_zi, onnx_zi
        model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(ckpt), dtype=torch.bfloat16).cuda().eval()
        config = Manifest.load(engine).config
        hf_zi = ZoomIn(HfLM(model, config), ChatTokenizer.from_file(ckpt / "tokenizer.json", config), config,
                       protocol, vocab_size=config.text.vocab_size)
        report["stages_ms"]["transformers_bf16"] = stage_medians(hf_zi, image, args.repeats, args.max_new_tokens)
    (args.out / "gpu_engines.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("vision_max_rel_err", "query1_tokens", "query2_tokens")}))


if __name__ == "__main__":
    main()
