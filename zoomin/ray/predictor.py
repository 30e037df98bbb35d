"""`ZoomInPredictor`: the ZoomIn job as a Ray Data callable class, one engine per actor.

The engine directory travels by path (shared storage: NFS, a mounted bucket, the same image on every node), not
through the object store: each actor checks the manifest it finds against the sha256 the driver computed
(`manifest_sha256`) and every file against the manifest's sha256s, so a node with a stale or half-synced copy
fails at start-up with one clear line instead of producing different answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from zoomin.runtime import ImageError, Manifest, ZoomIn, result_record
from zoomin.runtime.worker import IsolatedZoomIn

from .table import records_table


def is_uri(path: str) -> bool:
    return "://" in path


def read_source(path: str) -> str | bytes:
    """What ZoomIn.detect takes for `path`: the local path itself, or a URI's bytes read through its pyarrow
    filesystem (s3://, gs://, hdfs://, file://, ...). An unreadable URI is an ImageError naming it."""
    if not is_uri(path):
        return path
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            return f.read()
    except (OSError, pa.ArrowException) as e:  # FileNotFoundError is an OSError; bad URIs are ArrowInvalid
        raise ImageError(path, f"cannot read ({e})") from None


class ZoomInPredictor:
    """For `ray.data.Dataset.map_batches(ZoomInPredictor, fn_constructor_kwargs=dict(engine=..., expected_sha=...,
    threads=..., max_new_tokens=..., max_batch=...), concurrency=N, batch_size=..., num_cpus=...)`.

    Takes batches with a `path` column (local paths or URIs) and returns one row per path in `table.SCHEMA`: a bad
    image (unreadable, undecodable, over the limits, out of memory) is a row with its `error`, never a failed task.
    Any other exception is a bug and fails the task.

    Each batch runs through `detect_batch`: up to `max_batch` of its images in flight at once, their decode steps
    sharing one decoder call (continuous batching), so an actor's throughput is that of `zoomin serve --max-batch`.

    isolate (default): the engine runs in a worker process of the actor (`IsolatedZoomIn`), so an image that gets
    the process killed (the OOM killer) is that image's error row (and only the images in flight with it fail).
    In-process, the actor itself would die on it, and Ray, which restarts actors and retries their batches, would
    retry that batch forever.
    """

    def __init__(self, engine: str | Path, expected_sha: str, threads: int | None = None,
                 max_new_tokens: int | None = None, device: str = "cpu", isolate: bool = True, max_batch: int = 4):
        Manifest.load(engine, verify="sha256", expected_sha256=expected_sha)
        load = IsolatedZoomIn if isolate else ZoomIn.load
        self.zi = load(engine, device=device, threads=threads)
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        paths = [str(p) for p in batch["path"]]
        rows: dict[int, dict[str, Any]] = {}
        readable: list[tuple[int, str | bytes]] = []
        for i, path in enumerate(paths):
            try:
                readable.append((i, read_source(path)))
            except ImageError as e:
                rows[i] = result_record(path, None, str(e))
        outs = self.zi.detect_batch((src for _, src in readable), max_batch=self.max_batch,
                                    max_new_tokens=self.max_new_tokens)
        for (i, _), (name, result, error) in zip(readable, outs, strict=True):
            if error is not None and name != paths[i]:  # bytes read from a URI: name the URI, not "<bytes>"
                error = paths[i] + error.removeprefix(name)
            rows[i] = result_record(paths[i], result, error)
        return records_table(rows[i] for i in range(len(paths)))
