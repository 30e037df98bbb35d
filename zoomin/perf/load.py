"""`zoomin-perf-serve`: images/s and request latency of `zoomin serve` under 1, 4, 8... concurrent clients.

Each configuration is a fresh `zoomin serve` process on a loopback port: `--max-batch 1` is the one-at-a-time
runtime (one lane, nothing batched), `--max-batch N` runs N images at once with their decode steps batched. Clients
are threads in this process, each sending its next request when the last one is answered (closed loop), all with
the same image and the same job (both queries, query 2 on fixed zoom regions, answers of a fixed length: random
weights rarely stop early, and max_new_tokens caps them), so configurations differ only in scheduling. Reported:
images/s over the timed requests, p50/p95 latency, and the ratio to the one-at-a-time runtime at the same client
count. Timings belong here and in perf/RESULTS.md, never in pass/fail tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

DEFAULT_CLIENTS = (1, 4, 8)
ZOOM_REGIONS = [[40, 30, 200, 180], [300, 150, 460, 300]]  # two crops, original pixels


@dataclass
class LoadRun:
    max_batch: int
    clients: int
    requests: int
    seconds: float
    images_per_s: float
    p50_s: float
    p95_s: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`zoomin serve` in a child process, ready when /ready answers 200."""

    def __init__(self, engine: Path, max_batch: int, threads: int | None, log: Path, timeout_s: float = 600):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from zoomin.cli import main; main()", "serve", "--engine", str(engine), "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-queue", "256", "--timeout", "3600"]
        if threads:
            cmd += ["--threads", str(threads)]
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"zoomin serve exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"zoomin serve was not ready within {timeout_s:.0f} s; see {log}")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def drive(url: str, image: bytes, clients: int, requests: int, max_new_tokens: int, warmup: int = 1) -> LoadRun:
    """`clients` closed-loop clients share `requests` timed requests, after `warmup` untimed ones sent alone."""
    import httpx

    params = {"max_new_tokens": str(max_new_tokens), "zoom_regions": json.dumps(ZOOM_REGIONS)}
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    left = [requests]
    barrier = threading.Barrier(clients + 1)

    def one(client: httpx.Client) -> tuple[bool, float]:
        t0 = time.perf_counter()
        r = client.post(url + "/v1/detect", params=params, content=image,
                        headers={"content-type": "application/octet-stream"}, timeout=3600)
        dt = time.perf_counter() - t0
        return r.status_code == 200, dt

    with httpx.Client() as client:
        for _ in range(warmup):
            one(client)

    def worker() -> None:
        with httpx.Client() as client:
            barrier.wait()
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                ok, dt = one(client)
                with lock:
                    latencies.append(dt)
                    errors[0] += not ok

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return LoadRun(0, clients, len(lat), wall, len(lat) / wall, float(np.percentile(lat, 50)),
                   float(np.percentile(lat, 95)), errors[0])


def markdown(runs: list[LoadRun], meta: dict) -> str:
    base = {r.clients: r for r in runs if r.max_batch == 1}
    lines = [f"Engine {meta['engine']} ({meta['precision']}), {meta['machine']}, {meta['threads']} threads, "
             f"image {meta['image']}, max_new_tokens {meta['max_new_tokens']} per query, 2 zoom regions; "
             f"{meta['requests']} timed requests per row after one warm-up request.", "",
             "| max batch | clients | images/s | p50 s | p95 s | images/s vs one at a time | errors |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        b = base.get(r.clients)
        ratio = f"{r.images_per_s / b.images_per_s:.2f}x" if b and r.max_batch != 1 else "-"
        lines.append(f"| {r.max_batch} | {r.clients} | {r.images_per_s:.3f} | {r.p50_s:.2f} | {r.p95_s:.2f} | "
                     f"{ratio} | {r.errors} |")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", "engine_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The photo every request sends [calibration/real/coffee.jpg].")
@click.option("--clients", default=",".join(map(str, DEFAULT_CLIENTS)), show_default=True,
              help="Concurrent client counts, comma-separated.")
@click.option("--max-batch", "batches", default="1,8", show_default=True,
              help="--max-batch of each server, comma-separated (1: the one-at-a-time runtime).")
@click.option("--requests", type=click.IntRange(min=1), default=16, show_default=True,
              help="Timed requests per (server, clients) row.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Server CPU threads [all cores].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("perf/out/serve-load"),
              show_default=True)
def main(engine_dir, image, clients, batches, requests, max_new_tokens, threads, out) -> None:
    """Throughput and latency of the HTTP service, batched against one at a time."""
    from ..runtime.manifest import Manifest

    from .machine import cpu_model, usable_cores

    out.mkdir(parents=True, exist_ok=True)
    image = image or Path(__file__).resolve().parents[2] / "calibration" / "real" / "coffee.jpg"
    data = image.read_bytes()
    counts = [int(c) for c in clients.split(",")]
    runs: list[LoadRun] = []
    for max_batch in [int(b) for b in batches.split(",")]:
        click.echo(f"[zoomin-perf-serve] starting zoomin serve --max-batch {max_batch}", err=True)
        server = ServeProcess(engine_dir, max_batch, threads, out / f"serve-batch{max_batch}.log")
        try:
            for c in counts:
                run = drive(server.url, data, c, requests, max_new_tokens)
                run.max_batch = max_batch
                runs.append(run)
                click.echo(f"[zoomin-perf-serve] max batch {max_batch}, {c} clients: {run.images_per_s:.3f} "
                           f"images/s, p50 {run.p50_s:.2f} s, p95 {run.p95_s:.2f} s", err=True)
        finally:
            server.close()
    m = Manifest.load(engine_dir)
    meta = {"engine": str(engine_dir), "precision": m.precision, "image": image.name, "requests": requests,
            "max_new_tokens": max_new_tokens, "threads": threads or usable_cores(),
            "machine": f"{cpu_model()}, {os.cpu_count()} cores"}
    (out / "serve-load.json").write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in runs]}, indent=1))
    (out / "serve-load.md").write_text(markdown(runs, meta))
    click.echo(markdown(runs, meta))
