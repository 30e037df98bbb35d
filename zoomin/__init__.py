"""zoomin: an edge-optimized compiled runtime for ZoomIn, the two-stage forensic VLM on Qwen2.5-VL.

`from zoomin import ZoomIn; zi = ZoomIn.load("engines/tiny-random"); r = zi.detect("photo.jpg")`
"""

__version__ = "0.1.0"

_RUNTIME = ("ZoomIn", "DetectResult", "Region", "Protocol", "Sampling", "preprocess_image")


def __getattr__(name: str):
    # Lazy: `import zoomin` (e.g. for the build CLI) does not pay for onnxruntime until the runtime is used.
    if name in _RUNTIME:
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'zoomin' has no attribute {name!r}")
