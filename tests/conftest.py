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


def _build(ckpt, out, precision="fp32"):
    from zoomin.build.engine import BuildOptions, build_engine

    build_engine(BuildOptions(model=ckpt, out=out, precision=precision), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt, tmp_path_factory):
    """fp32 engine of the tiny checkpoint, built once per session with zoomin-build's own stages."""
    return _build(tiny_ckpt, tmp_path_factory.mktemp("engines") / "tiny-fp32")


@pytest.fixture(scope="session")
def small_engine(small_ckpt, tmp_path_factory):
    return _build(small_ckpt, tmp_path_factory.mktemp("engines") / "small-fp32")


@pytest.fixture(scope="session")
def photos():
    """Real photos from scikit-image (square, landscape, gray) plus a generated tall image, as RGB uint8."""
    import numpy as np
    from skimage import data

    rng = np.random.default_rng(0)
    tall = (rng.random((300, 90, 3)) * 255).astype("uint8")
    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "camera": data.camera(), "tall": tall}
