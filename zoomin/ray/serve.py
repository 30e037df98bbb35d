"""The HTTP service (`zoomin.serve`) as a Ray Serve deployment: same routes, limits and answers, N replicas.

    serve run zoomin.ray.serve:app engine=/shared/engines/zoomin-7b num_replicas=4 threads=4

`app` is a Serve application builder: every `key=value` after the import path is one `build_app` argument
(`num_replicas`, `min_replicas` / `max_replicas` for autoscaling, `threads`, `num_gpus`, `device`, `max_batch`,
`max_queue`, `timeout_s`). Each replica runs the FastAPI app of `zoomin serve` with its own engine (loaded in the
background as in `zoomin serve`; its /ready answers 503 until then) after checking, like the batch actors, that the
engine directory it sees is the one the deploying process hashed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from zoomin.runtime.manifest import Manifest, manifest_sha256
from zoomin.serve import ServeConfig, create_app
from zoomin.serve.app import load_engine_detectors


@serve.deployment
@serve.ingress()
class ZoomInService:
    """One replica: `zoomin serve`'s app over one engine, checked against the deploying process's manifest hash."""

    def __init__(self, cfg: ServeConfig, expected_sha: str):
        self.cfg, self.expected_sha = cfg, expected_sha

    def _load(self, cfg: ServeConfig):
        Manifest.load(cfg.engine, verify="sha256", expected_sha256=self.expected_sha)
        return load_engine_detectors(cfg)

    def __serve_build_asgi_app__(self):
        return create_app(self.cfg, load_detectors=self._load)


def build_app(engine: str | Path, *, num_replicas: int = 1, autoscaling_config: dict[str, Any] | None = None,
              threads: int = 1, num_gpus: float = 0.0, device: str = "cpu", max_batch: int = 1,
              max_queue: int = 32, timeout_s: float = 300.0) -> Application:
    """The bound deployment, for `serve.run(build_app(...))`. With `autoscaling_config` (Serve's own dict:
    min_replicas, max_replicas, target_ongoing_requests, ...) `num_replicas` is ignored. Each replica reserves
    `threads` CPUs and `num_gpus` GPUs, batches the decode steps of up to `max_batch` requests (as `zoomin serve
    --max-batch`), and admits up to `max_queue` requests (more are answered 429 by the app)."""
    engine = os.path.abspath(engine)
    Manifest.load(engine)  # a wrong path fails here, not as replicas that never become ready
    cfg = ServeConfig(engine=Path(engine), device=device, threads=threads, max_batch=max_batch,
                      max_queue=max_queue, request_timeout_s=timeout_s)
    scaling = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": num_replicas}
    return ZoomInService.options(
        ray_actor_options={"num_cpus": threads, "num_gpus": num_gpus}, max_ongoing_requests=max_queue, **scaling,
    ).bind(cfg, manifest_sha256(engine))


def app(args: dict[str, str]) -> Application:
    """`serve run zoomin.ray.serve:app engine=DIR [num_replicas=N | min_replicas=A max_replicas=B] ...`."""
    args = dict(args)
    if "engine" not in args:
        raise ValueError("serve run zoomin.ray.serve:app needs engine=DIR")
    autoscaling = {k: int(args.pop(k)) for k in ("min_replicas", "max_replicas") if k in args}
    kinds = {"num_replicas": int, "threads": int, "num_gpus": float, "device": str, "max_batch": int,
             "max_queue": int, "timeout_s": float}
    unknown = sorted(set(args) - set(kinds) - {"engine"})
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}; accepted: engine, min_replicas, max_replicas, "
                         + ", ".join(kinds))
    kw = {k: kinds[k](v) for k, v in args.items() if k != "engine"}
    return build_app(args["engine"], autoscaling_config=autoscaling or None, **kw)
