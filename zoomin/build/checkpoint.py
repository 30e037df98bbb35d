"""Validate and load a Hugging Face Qwen2.5-VL checkpoint, failing with one clear line instead of a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from .random_checkpoint import resolve_model

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


class BuildError(ValueError):
    """A build that cannot proceed; the message is one line naming the problem."""


class CheckpointError(BuildError):
    """The checkpoint cannot be built from; the message names the directory and the problem."""


def validate_checkpoint(model: str | Path) -> Path:
    """Resolve `tiny-random` etc. and check the files a Qwen2.5-VL build needs, before any heavy import."""
    ckpt = resolve_model(model)
    if not ckpt.exists():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory (expected a Hugging Face checkpoint folder)")
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{ckpt}: no config.json (not a Hugging Face checkpoint)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: corrupt config.json ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: corrupt config.json (not a JSON object)")
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type != "qwen2_5_vl" and ARCHITECTURE not in archs:
        found = model_type or ", ".join(archs) or "unknown"
        raise CheckpointError(f"{ckpt}: architecture {found} is not Qwen2.5-VL ({ARCHITECTURE})")
    if not (ckpt / "tokenizer.json").is_file():
        raise CheckpointError(f"{ckpt}: missing tokenizer.json (the engine needs the fast tokenizer file)")
    try:
        json.loads((ckpt / "tokenizer.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'tokenizer.json'}: corrupt tokenizer ({e})") from None
    weights = list(ckpt.glob("*.safetensors")) + list(ckpt.glob("*.bin"))
    if not weights:
        raise CheckpointError(f"{ckpt}: no weight files (*.safetensors)")
    return ckpt


def load_checkpoint(ckpt: Path, dtype: str = "float32"):
    """transformers' own loader in eval mode (fp32 by default); a corrupt weight file becomes a CheckpointError."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    try:
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).eval()
    except Exception as e:  # transformers/safetensors raise many types for unreadable weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt}: cannot load weights ({first})") from None
