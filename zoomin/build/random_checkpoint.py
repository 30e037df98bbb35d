"""Deterministic random-weight Qwen2.5-VL checkpoints in real Hugging Face layout.

No weights may come from a hub, yet export, parity and perf work need a checkpoint that transformers loads
exactly like a real one. `tiny`/`small` are test-sized; `3b`/`7b` carry the real Qwen2.5-VL dimensions (with
whatever layer counts the caller can afford) so that benchmarks move the real bytes per token.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from .tokenizer_gen import save_tokenizer


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]
    vocab: int  # 0: just the tokenizer's size (rounded up to 64)
    tie_embeddings: bool
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_heads: int
    rope_theta: float = 1_000_000.0
    max_pixels: int = 12845056
    min_pixels: int = 3136


SHAPES: dict[str, Shape] = {
    # head_dim 32, GQA 2:1, 2 text layers, 4 vision blocks (2 windowed, 2 full); <= 64 image tokens per image.
    "tiny": Shape(128, 256, 2, 4, 2, (4, 6, 6), 0, False, 64, 128, 4, 4, max_pixels=64 * 28 * 28),
    # a second, differently factored shape for parity: head_dim 64, GQA 4:1, tied embeddings.
    "small": Shape(256, 512, 3, 4, 1, (8, 12, 12), 0, True, 96, 192, 5, 6, max_pixels=100 * 28 * 28),
    # real Qwen2.5-VL-3B-Instruct / 7B-Instruct dimensions.
    "3b": Shape(2048, 11008, 36, 16, 2, (16, 24, 24), 151936, True, 1280, 3420, 32, 16),
    "7b": Shape(3584, 18944, 28, 28, 4, (16, 24, 24), 152064, False, 1280, 3420, 32, 16),
}


def full_attention_blocks(depth: int) -> list[int]:
    """Qwen2.5-VL uses full attention in every 8th block (7, 15, 23, 31); keep one even in shallow towers."""
    blocks = [i for i in range(depth) if i % 8 == 7]
    if depth <= 4:
        blocks = [i for i in range(depth) if i % 2 == 1]
    return blocks or [depth - 1]


def make_config(shape: Shape, token_ids: dict[str, int]) -> dict:
    vocab = shape.vocab or -(-token_ids["vocab_size"] // 64) * 64
    head_dim = shape.hidden // shape.heads
    assert sum(shape.mrope_section) * 2 == head_dim, "mrope_section must cover head_dim / 2"
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": shape.tie_embeddings,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": vocab,
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": shape.rope_theta,
                "mrope_section": list(shape.mrope_section),
            },
            "bos_token_id": token_ids["<|endoftext|>"],
            "eos_token_id": token_ids["<|im_end|>"],
            "pad_token_id": token_ids["<|endoftext|>"],
            "tie_word_embeddings": shape.tie_embeddings,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": shape.vision_depth,
            "hidden_size": shape.vision_hidden,
            "intermediate_size": shape.vision_intermediate,
            "num_heads": shape.vision_heads,
            "hidden_act": "silu",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "out_hidden_size": shape.hidden,
            "fullatt_block_indexes": full_attention_blocks(shape.vision_depth),
        },
    }


def preprocessor_config(shape: Shape) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": shape.min_pixels,
        "max_pixels": shape.max_pixels,
        "size": {"shortest_edge": shape.min_pixels, "longest_edge": shape.max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def write_random_checkpoint(
    out_dir: str | os.PathLike,
    shape: str = "tiny",
    *,
    text_layers: int | None = None,
    vision_depth: int | None = None,
    seed: int = 0,
    init_std: float = 0.02,
) -> Path:
    """Write a random Qwen2.5-VL checkpoint; same arguments give byte-identical files.

    Built in a temporary sibling directory and renamed into place, so an interrupted run leaves nothing.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    spec = SHAPES[shape]
    if text_layers is not None:
        spec = replace(spec, layers=text_layers)
    if vision_depth is not None:
        spec = replace(spec, vision_depth=vision_depth)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        token_ids = save_tokenizer(tmp)
        cfg_dict = make_config(spec, token_ids)
        cfg_dict["text_config"]["initializer_range"] = init_std
        cfg_dict["vision_config"]["initializer_range"] = init_std
        config = Qwen2_5_VLConfig(**cfg_dict)
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = Qwen2_5_VLForConditionalGeneration(config).eval()
        _perturb_norms(model, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(spec), indent=2) + "\n")
        (tmp / "zoomin_random.json").write_text(
            json.dumps({"shape": shape, "seed": seed, "text_layers": spec.layers, "vision_depth": spec.vision_depth})
            + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _perturb_norms(model, seed: int) -> None:
    """RMSNorm weights init to exactly 1; jitter them so a wrong norm weight in an export cannot hide."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def cache_dir() -> Path:
    root = os.environ.get("ZOOMIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zoomin")
    return Path(root)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """`tiny-random` (or `small-random`) → generated once into the cache; anything else is a checkpoint path."""
    name = str(name_or_path)
    if name.endswith("-random") and name[: -len("-random")] in ("tiny", "small"):
        shape = name[: -len("-random")]
        path = cache_dir() / "checkpoints" / name
        if not (path / "config.json").exists():
            write_random_checkpoint(path, shape)
        return path
    return Path(name)
