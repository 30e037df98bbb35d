"""Model and preprocessing settings the runtime needs, read from plain JSON (never from transformers).

The build writes these into `manifest.json`; the runtime reads them back. Both sides parse a Hugging Face
`config.json` / `preprocessor_config.json` with the same functions, so the contract cannot drift.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one row of pixel_values: C * T * P * P (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, int, int]
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ImageConfig:
    """Qwen2-VL image processor settings (preprocessor_config.json)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (28 = patch 14 x merge 2)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageConfig":
        size = d.get("size") or {}
        kw: dict[str, Any] = {
            "min_pixels": d.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
            "max_pixels": d.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
        }
        for name in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor"):
            if name in d:
                kw[name] = d[name]
        for name in ("image_mean", "image_std"):
            if name in d:
                kw[name] = tuple(float(v) for v in d[name])
        return cls(**kw)


@dataclass(frozen=True)
class TokenIds:
    image_pad: int
    vision_start: int
    vision_end: int
    im_start: int
    im_end: int
    endoftext: int


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image: ImageConfig
    tokens: TokenIds
    extra: dict[str, Any] = field(default_factory=dict)
    # The engine's decoder graph flavour (zoomin.runtime.decoder.DECODER_GRAPHS), set by the build; None (engines
    # from before the flavours, configs read from a checkpoint): whichever flavour the graph is.
    decoder_graph: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        def make(kind, data):
            names = {f.name for f in fields(kind)}
            kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
            return kind(**kw)

        return cls(
            text=make(TextConfig, d["text"]),
            vision=make(VisionConfig, d["vision"]),
            image=make(ImageConfig, d["image"]),
            tokens=make(TokenIds, d["tokens"]),
            extra=dict(d.get("extra", {})),
            decoder_graph=d.get("decoder_graph"),
        )

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path) -> "ModelConfig":
        """Parse a Hugging Face Qwen2.5-VL checkpoint directory (config, preprocessor, tokenizer files)."""
        ckpt = Path(ckpt_dir)
        hf = json.loads((ckpt / "config.json").read_text())
        pre_path = ckpt / "preprocessor_config.json"
        pre = json.loads(pre_path.read_text()) if pre_path.exists() else {}
        tok = json.loads((ckpt / "tokenizer.json").read_text())
        return cls(text=text_config(hf), vision=vision_config(hf), image=ImageConfig.from_dict(pre),
                   tokens=token_ids(hf, tok))


def text_config(hf: dict[str, Any]) -> TextConfig:
    """Accept both layouts: transformers >= 4.5x nested `text_config` and the older flat one."""
    t = {**hf, **(hf.get("text_config") or {})}
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    section = rope.get("mrope_section")
    if section is None:
        raise ValueError("config has no mrope_section: not a Qwen2.5-VL language model")
    tie = hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    return TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        mrope_section=tuple(section),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1_000_000.0))),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(t.get("max_position_embeddings", 128000)),
        tie_word_embeddings=bool(tie),
    )


def vision_config(hf: dict[str, Any]) -> VisionConfig:
    v = hf["vision_config"]
    return VisionConfig(
        depth=v["depth"],
        hidden_size=v["hidden_size"],
        num_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"],
        out_hidden_size=v["out_hidden_size"],
        patch_size=v.get("patch_size", 14),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        window_size=v.get("window_size", 112),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        in_channels=v.get("in_channels", 3),
    )


def token_ids(hf: dict[str, Any], tokenizer_json: dict[str, Any]) -> TokenIds:
    added = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}

    def tid(name: str) -> int:
        if name not in added:
            raise ValueError(f"tokenizer lacks the special token {name}")
        return added[name]

    return TokenIds(
        image_pad=hf.get("image_token_id", tid("<|image_pad|>")),
        vision_start=hf.get("vision_start_token_id", tid("<|vision_start|>")),
        vision_end=hf.get("vision_end_token_id", tid("<|vision_end|>")),
        im_start=tid("<|im_start|>"),
        im_end=tid("<|im_end|>"),
        endoftext=tid("<|endoftext|>"),
    )
