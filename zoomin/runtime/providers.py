"""Device name → ONNX Runtime execution providers, with a clear error when a device is not available.

GPU providers are only requested, never imported: onnxruntime-gpu (the `gpu` extra) brings them, and the CPU
build of onnxruntime simply does not list them.
"""

from __future__ import annotations

import os
from pathlib import Path

DEVICES = ("cpu", "cuda", "tensorrt", "jetson")


class DeviceError(ValueError):
    """The requested device cannot run here; the message says what is missing."""


def providers_for(device: str, *, cache_dir: Path | None = None) -> list:
    """Providers in priority order; ORT places each node on the first provider that supports it."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    available = set(ort.get_available_providers())
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise DeviceError(
            f"device {device} needs onnxruntime-gpu with CUDA (pip install 'zoomin[gpu]'); "
            f"this onnxruntime offers only {', '.join(sorted(available))}"
        )
    cuda = ("CUDAExecutionProvider", {"device_id": int(os.environ.get("ZOOMIN_CUDA_DEVICE", "0"))})
    if device == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if "TensorrtExecutionProvider" not in available:
        raise DeviceError(f"device {device} needs onnxruntime-gpu built with TensorRT and the TensorRT libraries")
    if cache_dir is not None:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DeviceError(f"cannot create the TensorRT engine cache {cache_dir} ({e.strerror or e}); "
                              f"pass --trt-cache DIR") from None
    trt_options = {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": cache_dir is not None,
        "trt_engine_cache_path": str(cache_dir or ""),
        "trt_timing_cache_enable": cache_dir is not None,
        "trt_timing_cache_path": str(cache_dir or ""),
    }
    if device == "jetson":  # Orin/Thor share DRAM between CPU and GPU: keep the TensorRT workspace modest
        trt_options["trt_max_workspace_size"] = 2 << 30
    return [("TensorrtExecutionProvider", trt_options), cuda, "CPUExecutionProvider"]


def session_options(threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Every call has new shapes (image sizes, prefill chunks, growing past): memory patterns never repeat, and
    # the CPU arena keeps its high-water mark (rounded up to powers of two) for the life of the process. Without
    # them each tensor is malloc'ed and freed, so a large photo's activations go back to the OS after it.
    so.enable_mem_pattern = False
    so.enable_cpu_mem_arena = False
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so
