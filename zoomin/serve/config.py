"""Service settings: the engine to load and every limit a request is held to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    engine: Path
    device: str = "cpu"
    threads: int | None = None
    max_batch: int = 1  # images in flight at once, their decode steps batched (ZoomIn.lanes)
    max_queue: int = 32  # images waiting for the engine; one more is answered 429
    max_body_bytes: int = 32 << 20
    max_image_pixels: int = 8192 * 8192  # refused before decoding (decompression bombs)
    max_images: int = 16  # per request
    max_new_tokens: int = 4096  # the most a request may ask for, per query
    request_timeout_s: float = 300.0  # queueing + running, per request
    protocol_overrides: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_image_pixels", "max_images", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
