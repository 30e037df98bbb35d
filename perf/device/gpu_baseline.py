"""One-shot GPU check for a lent NVIDIA machine (torch + transformers present, no onnxruntime-gpu/TensorRT).

What it measures, at the real Qwen2.5-VL-3B/7B dimensions with random weights built directly on the GPU:
1. the transformers baseline doing the full two-stage ZoomIn job (same stages as `zoomin detect --backend hf`),
   per stage, bf16, with the device-to-device copy bandwidth and the decode floor it implies;
2. the numerics of zoomin's export modules (the torch modules the ONNX graphs are traced from) in fp16 against
   transformers in fp32 at those dimensions — the fp16 engine's accuracy at real size, which the 2-core CI
   machine cannot hold.
Usage: python perf/device/gpu_baseline.py --out OUT_DIR [--shapes 3b,7b] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from zoomin.build.export_decoder import TextDecoder  # noqa: E402
from zoomin.build.export_vision import VisionGraph, random_pixels  # noqa: E402
from zoomin.build.random_checkpoint import SHAPES, make_config, preprocessor_config  # noqa: E402
from zoomin.build.tokenizer_gen import save_tokenizer  # noqa: E402
from zoomin.hf_backend import HfLM  # noqa: E402
from zoomin.runtime import ModelConfig, Protocol, ZoomIn  # noqa: E402
from zoomin.runtime.chat import ChatTokenizer  # noqa: E402
from zoomin.runtime.rope import mrope_positions  # noqa: E402


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 10)."""
    n = int(gib * 2**30) // 4
    a = torch.rand(n, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / statistics.median(times[2:])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def skeleton(shape: str, root: Path) -> Path:
    """Config, tokenizer and preprocessor files of a random checkpoint (weights are made on the GPU instead)."""
    root.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(root)
    spec = SHAPES[shape]
    (root / "config.json").write_text(json.dumps(make_config(spec, ids)))
    (root / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(spec)))
    return root


def random_model(ckpt: Path, device: str, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(**json.loads((ckpt / "config.json").read_text()))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype).eval()
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def export_numerics(model, device: str) -> dict:
    """fp32 and fp16 export modules vs transformers fp32 at real dimensions (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    # language model: a 600-token prompt with a 24x24-patch image (144 image tokens) at real M-RoPE positions
    tcfg = model.config.text_config
    image_token = model.config.image_token_id
    ids = np.concatenate([np.full(40, 5), np.full(144, image_token), np.full(416, 7)])
    pos, _ = mrope_positions(ids, [(1, 24, 24)], image_token_id=image_token, spatial_merge_size=2)
    g = torch.Generator(device="cpu").manual_seed(1)
    embeds = (torch.randn(1, len(ids), tcfg.hidden_size, generator=g) * 0.02).to(device)
    position_ids = torch.from_numpy(pos)[:, None].to(device)
    lm = model.model.language_model
    ref = model.lm_head(lm(inputs_embeds=embeds, position_ids=position_ids).last_hidden_state)[0, -64:]
    mask = torch.ones(1, len(ids), dtype=torch.long, device=device)
    empty = [torch.zeros(1, 0, tcfg.num_key_value_heads, tcfg.hidden_size // tcfg.num_attention_heads,
                         device=device)] * tcfg.num_hidden_layers
    keep = torch.tensor([64], device=device)
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        dec = TextDecoder(model, dtype, graph="plain").to(device).eval()  # sequence-major past, additive mask
        logits = dec(embeds, position_ids, (mask,), keep, [e.to(dtype) for e in empty],
                     [e.to(dtype) for e in empty])[0]
        out[f"decoder_{name}_max_rel_err"] = rel(logits[0], ref)
        out[f"decoder_{name}_top1_agree"] = float((logits[0].argmax(-1) == ref.argmax(-1)).float().mean())
        out[f"decoder_{name}_finite"] = bool(torch.isfinite(logits).all())
        del dec
    # vision tower: one 36x36-patch image (324 merged tokens)
    vcfg_dict = model.config.vision_config.to_dict()
    from zoomin.runtime.config import vision_config

    vcfg = vision_config({"vision_config": vcfg_dict})
    grid = [(1, 36, 36)]
    pixels = random_pixels(vcfg, grid)
    ref_v = model.model.get_image_features(torch.from_numpy(pixels).to(device), torch.tensor(grid, device=device))
    ref_v = ref_v.pooler_output if hasattr(ref_v, "pooler_output") else ref_v
    ref_v = torch.cat(list(ref_v)) if isinstance(ref_v, (list, tuple)) else ref_v
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        vg = VisionGraph(model, dtype, (vcfg.depth - 1,) if name == "fp16" else ()).to(device)
        got = torch.from_numpy(vg.encode(pixels, grid)).to(device)
        out[f"vision_{name}_max_rel_err"] = rel(got, ref_v)
        out[f"vision_{name}_finite"] = bool(torch.isfinite(got).all())
        del vg
    return out


def two_stage(model, ckpt: Path, device: str, repeats: int, max_new: int) -> dict:
    from skimage import data

    config = ModelConfig.from_checkpoint(ckpt)
    zi = ZoomIn(HfLM(model, config), ChatTokenizer.from_file(ckpt / "tokenizer.json", config), config,
                Protocol.default(), vocab_size=config.text.vocab_size)
    regions = [((150, 60, 330, 260), "face"), ((20, 300, 200, 500), "texture")]
    results = {}
    for name, image in (("astronaut_512x512", data.astronaut()), ("coffee_600x400", data.coffee())):
        zi.detect(image, zoom_regions=regions, max_new_tokens=max_new)  # warm-up
        runs = [zi.detect(image, zoom_regions=regions, max_new_tokens=max_new) for _ in range(repeats)]
        stages = {k: statistics.median(r.timings_ms[k] for r in runs) for k in runs[0].timings_ms}
        gen = runs[0].tokens["stage2_generated"]
        results[name] = {"timings_ms_median": stages, "tokens": runs[0].tokens,
                         "decode_ms_per_token": stages["stage2_decode"] / max(gen - 1, 1)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="3b,7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    import transformers

    dev = args.device
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__,
                          "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor(),
                          "copy_bandwidth_GBps": copy_bandwidth(dev, 2.0 if dev.startswith("cuda") else 0.25) / 1e9},
              "shapes": {}}
    print(json.dumps(report["machine"]), flush=True)
    for shape in args.shapes.split(","):
        t0 = time.perf_counter()
        ckpt = skeleton(shape, Path(tempfile.mkdtemp()) / shape)
        model = random_model(ckpt, dev, torch.float32)
        entry = {"export_numerics": export_numerics(model, dev)}
        print(shape, json.dumps(entry["export_numerics"]), flush=True)
        model = model.to(torch.bfloat16)
        lm_bytes = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n) * 2
        entry["lm_weight_bytes_bf16"] = lm_bytes
        entry["decode_floor_ms_per_token"] = lm_bytes / (report["machine"]["copy_bandwidth_GBps"] * 1e9) * 1e3
        entry["two_stage_bf16"] = two_stage(model, ckpt, dev, args.repeats, args.max_new_tokens)
        entry["seconds"] = time.perf_counter() - t0
        for img, r in entry["two_stage_bf16"].items():
            frac = entry["decode_floor_ms_per_token"] / r["decode_ms_per_token"]
            print(shape, img, json.dumps({k: round(v, 1) for k, v in r["timings_ms_median"].items()}),
                  f"decode {r['decode_ms_per_token']:.2f} ms/token, floor {entry['decode_floor_ms_per_token']:.2f}"
                  f" ({frac:.0%})", flush=True)
        report["shapes"][shape] = entry
        del model
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_baseline.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
