"""Shared fixtures: deterministic random Qwen2.5-VL checkpoints, written once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The `tiny` shape: head_dim 32, GQA 2:1, 2 text layers, 4 vision blocks, <= 64 image tokens."""
    from zoomin.build.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    """The second parity shape: head_dim 64, GQA 4:1, tied embeddings, 5 vision blocks."""
    from zoomin.build.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", "small", seed=1)


@pytest.fixture(scope="session", params=["tiny", "small"])
def any_ckpt(request):
    return request.getfixturevalue(f"{request.param}_ckpt")


@pytest.fixture(scope="session")
def hf_model_factory():
    """Load a checkpoint with transformers exactly as a user would (from_pretrained, eval, fp32)."""
    cache = {}

    def load(path):
        from transformers import Qwen2_5_VLForConditionalGeneration

        key = str(path)
        if key not in cache:
            cache[key] = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype="float32").eval()
        return cache[key]

    return load
