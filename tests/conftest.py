"""Shared fixtures: deterministic random Qwen2.5-VL checkpoints and their engines, made once per test run.

The suite runs in two pytest-xdist workers (pyproject's addopts; whole modules per worker): checkpoints and
engines every module may use are made by the first worker that asks and read by the other (`shared_dir`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# Calibration images of the shared quantized engines (tiny_quantized).
QUANT_CALIB_SIZE = 4

# Modules by their measured cost, slowest first: xdist hands whole modules out in collection order, so starting the
# long ones first keeps the two workers finishing together. Modules not named keep their order after these.
SLOW_MODULES = ("test_streaming_build", "test_quantize", "test_ray", "test_vision_export", "test_build",
                "test_decoder_export", "test_eval", "test_tensorrt", "test_fused_decoder", "test_batch")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))  # stable


def shared_dir(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """`name` in a folder every worker of this run sees, made by `make(path)` in the first worker that asks (the
    others wait on its lock): a checkpoint or engine is made once per test run, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # what a worker that failed half-way left
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The `tiny` shape: head_dim 32, GQA 2:1, 2 text layers, 4 vision blocks, <= 64 image tokens."""
    from zoomin.build.random_checkpoint import write_random_checkpoint

    return shared_dir(tmp_path_factory, "ckpt-tiny", lambda p: write_random_checkpoint(p, "tiny", seed=0))


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    """The second parity shape: head_dim 64, GQA 4:1, tied embeddings, 5 vision blocks."""
    from zoomin.build.random_checkpoint import write_random_checkpoint

    return shared_dir(tmp_path_factory, "ckpt-small", lambda p: write_random_checkpoint(p, "small", seed=1))


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


def _build(ckpt, out, precision="fp32", **options):
    from zoomin.build.engine import BuildOptions, build_engine

    build_engine(BuildOptions(model=ckpt, out=out, precision=precision, **options), log=lambda s: None)


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt, tmp_path_factory):
    """fp32 engine of the tiny checkpoint, built once per run with zoomin-build's own stages (parity included)."""
    return shared_dir(tmp_path_factory, "engine-tiny-fp32", lambda p: _build(tiny_ckpt, p))


@pytest.fixture(scope="session")
def small_engine(small_ckpt, tmp_path_factory):
    return shared_dir(tmp_path_factory, "engine-small-fp32", lambda p: _build(small_ckpt, p))


@pytest.fixture(scope="session")
def tiny_quantized(tiny_ckpt, tmp_path_factory):
    """precision -> BuildResult of the tiny checkpoint's int8 / int4 / fp8 engine (calibrated on QUANT_CALIB_SIZE
    images, parity included), built on first use once per run. Read-only: copy one to change it."""
    from zoomin.build.engine import BuildResult
    from zoomin.runtime.manifest import Manifest

    def get(precision: str) -> BuildResult:
        path = shared_dir(tmp_path_factory, f"engine-tiny-{precision}",
                          lambda p: _build(tiny_ckpt, p, precision, calib_size=QUANT_CALIB_SIZE))
        return BuildResult(path, Manifest.load(path))

    return get


@pytest.fixture(scope="session")
def photos():
    """Real photos from scikit-image (square, landscape, gray) plus a generated tall image, as RGB uint8."""
    import numpy as np
    from skimage import data

    rng = np.random.default_rng(0)
    tall = (rng.random((300, 90, 3)) * 255).astype("uint8")
    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "camera": data.camera(), "tall": tall}
