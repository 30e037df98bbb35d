"""zoomin: an edge-optimized compiled runtime for ZoomIn, the two-stage forensic VLM on Qwen2.5-VL."""

__version__ = "0.1.0"
