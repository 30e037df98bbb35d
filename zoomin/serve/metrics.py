"""Prometheus metrics of one service instance (its own registry, so several apps in one process never mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from zoomin.runtime.pipeline import DetectResult

# Seconds: a CPU job at 3B widths runs tens of seconds, a GPU stage milliseconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zoomin_requests", "HTTP detect requests by outcome", ["outcome"], registry=r)
        self.images = Counter("zoomin_images", "Images by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge("zoomin_queue_depth", "Images waiting for the engine", registry=r)
        self.running = Gauge("zoomin_running", "Images being processed", registry=r)
        self.stage_seconds = Histogram("zoomin_stage_seconds", "Per-stage latency of the ZoomIn job", ["stage"],
                                       registry=r, buckets=_LATENCY_BUCKETS)
        self.request_seconds = Histogram("zoomin_request_seconds", "Detect request latency, queueing included",
                                         registry=r, buckets=_LATENCY_BUCKETS)
        self.generated_tokens = Counter("zoomin_generated_tokens", "Tokens generated (both queries)", registry=r)
        self.decode_batch_size = Histogram("zoomin_decode_batch_size", "Sequences per batched decode step",
                                           registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
        self.decode_tps = Histogram("zoomin_decode_tokens_per_second", "Decode speed per image", registry=r,
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))

    def observe_result(self, result: DetectResult) -> None:
        for stage, ms in result.timings_ms.items():
            self.stage_seconds.labels(stage).observe(ms / 1e3)
        generated = result.tokens.get("stage1_generated", 0) + result.tokens.get("stage2_generated", 0)
        self.generated_tokens.inc(generated)
        decode_s = (result.timings_ms.get("stage1_decode", 0.0) + result.timings_ms.get("stage2_decode", 0.0)) / 1e3
        if generated and decode_s > 0:
            self.decode_tps.observe(generated / decode_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
