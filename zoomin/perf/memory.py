"""`zoomin-perf-memory`: peak resident memory of `zoomin detect` per photo size, and RSS over a long batch.

Each photo runs in a fresh `zoomin detect` process whose peak RSS the kernel reports at exit (wait4's ru_maxrss),
so figures do not depend on what ran before. The batch run samples one process's RSS while it works through many
images: a flat curve means nothing accumulates per image (caches, arenas, leaked buffers).
Memory figures belong here and in perf/RESULTS.md, never in pass/fail tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

GiB = 1 << 30
DEFAULT_SIZES = ("640x427", "2400x1600", "4000x3000", "3000x60")


@dataclass
class PhotoRun:
    size: tuple[int, int]  # (width, height) of the photo given
    model_size: tuple[int, int] | None  # what the model saw
    image_tokens: int | None  # query 1's prompt tokens, image included
    peak_rss_bytes: int
    seconds: float
    error: str | None


@dataclass
class BatchRun:
    images: int
    seconds: float
    rss_samples: list[tuple[float, int]]  # (seconds since start, RSS bytes)
    first_quarter_peak: int
    last_quarter_peak: int
    errors: int


@dataclass
class MemoryReport:
    engine: str
    engine_bytes: int
    budget_bytes: int  # engine bytes on disk + 1.5 GiB, the issue-9 target
    max_image_tokens: int | None = None  # as passed to detect (None: the engine protocol's)
    photos: list[PhotoRun] = field(default_factory=list)
    batch: BatchRun | None = None
    machine: dict = field(default_factory=dict)


def write_photo(width: int, height: int, out: Path) -> Path:
    """scikit-image's coffee photo resized to width x height (JPEG), a stand-in for a camera frame."""
    import cv2
    from skimage import data

    path = out / f"coffee_{width}x{height}.jpg"
    if not path.exists():
        rgb = cv2.resize(data.coffee(), (width, height), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    return path


def detect_command(engine: Path, images: list[Path], json_out: Path, max_new_tokens: int, threads: int | None,
                   max_image_tokens: int | None = None) -> list[str]:
    cmd = [str(Path(sys.executable).with_name("zoomin")), "detect", *map(str, images), "--engine", str(engine),
           "--json", str(json_out), "--max-new-tokens", str(max_new_tokens)]
    cmd += ["--threads", str(threads)] if threads else []
    return cmd + (["--max-image-tokens", str(max_image_tokens)] if max_image_tokens is not None else [])


def run_photo(engine: Path, photo: Path, size: tuple[int, int], work: Path, max_new_tokens: int,
              threads: int | None, max_image_tokens: int | None = None) -> PhotoRun:
    """One `zoomin detect` process on one photo: its peak RSS (children included) and outcome."""
    out = work / f"{photo.stem}.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(detect_command(engine, [photo], out, max_new_tokens, threads, max_image_tokens),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    peak = usage.ru_maxrss * 1024  # wait4 covers the process and its reaped children (detect's worker)
    record = json.loads(out.read_text().splitlines()[0]) if out.exists() and out.read_text().strip() else {}
    error = record.get("error") or (None if os.waitstatus_to_exitcode(status) == 0 else
                                    (stderr.strip().splitlines() or [f"exit status {status}"])[-1])
    return PhotoRun(size=size, model_size=tuple(record["model_size"]) if record.get("model_size") else None,
                    image_tokens=(record.get("tokens") or {}).get("stage1_prompt"),
                    peak_rss_bytes=peak, seconds=seconds, error=error)


def run_batch(engine: Path, count: int, work: Path, max_new_tokens: int, threads: int | None,
              interval_s: float = 0.25) -> BatchRun:
    """`count` distinct small photos through one `zoomin detect`, sampling the process tree's RSS."""
    import cv2
    import numpy as np
    import psutil
    from skimage import data

    folder = work / f"batch-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    base = data.astronaut()
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"img_{i:04d}.jpg"
        if not path.exists():  # distinct content and sizes, so no cache could make images look alike
            w, h = int(rng.integers(320, 900)), int(rng.integers(240, 700))
            rgb = cv2.resize(np.roll(base, int(rng.integers(0, 512)), axis=1), (w, h))
            cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = work / "batch.jsonl"
    t0 = time.perf_counter()
    proc = psutil.Popen(detect_command(engine, [folder], out, max_new_tokens, threads),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, int]] = []
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            samples.append((time.perf_counter() - t0, sum(p.memory_info().rss for p in tree if p.is_running())))
        except psutil.Error:
            pass
        time.sleep(interval_s)
    seconds = time.perf_counter() - t0
    lines = out.read_text().splitlines() if out.exists() else []
    quarter = max(1, len(samples) // 4)
    return BatchRun(images=len(lines), seconds=seconds, rss_samples=samples,
                    first_quarter_peak=max((r for _, r in samples[:quarter]), default=0),
                    last_quarter_peak=max((r for _, r in samples[-quarter:]), default=0),
                    errors=sum(1 for line in lines if json.loads(line).get("error")))


def engine_bytes(engine: Path) -> int:
    return sum(p.stat().st_size for p in engine.rglob("*") if p.is_file())


def markdown(report: MemoryReport) -> list[str]:
    lines = [f"engine `{report.engine}`: {report.engine_bytes / GiB:.2f} GiB on disk; budget (engine + 1.5 GiB) "
             f"{report.budget_bytes / GiB:.2f} GiB; max_image_tokens "
             f"{'protocol' if report.max_image_tokens is None else report.max_image_tokens or 'unlimited'}", "",
             "| photo | seen as | prompt tokens | peak RSS GiB | within budget | seconds | error |",
             "|---|---|---|---|---|---|---|"]
    for r in report.photos:
        seen = f"{r.model_size[0]}x{r.model_size[1]}" if r.model_size else "-"
        lines.append(f"| {r.size[0]}x{r.size[1]} | {seen} | {r.image_tokens or '-'} | {r.peak_rss_bytes / GiB:.2f} | "
                     f"{'-' if r.error else 'yes' if r.peak_rss_bytes <= report.budget_bytes else 'no'} | {r.seconds:.0f} | "
                     f"{r.error or ''} |")
    if report.batch:
        b = report.batch
        lines += ["", f"batch: {b.images} images in {b.seconds:.0f} s ({b.errors} errors); RSS peak in the first "
                      f"quarter {b.first_quarter_peak / GiB:.2f} GiB, last quarter {b.last_quarter_peak / GiB:.2f} GiB"]
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--sizes", default=",".join(DEFAULT_SIZES), show_default=True,
              help="Comma-separated WIDTHxHEIGHT photo sizes, each run in its own process.")
@click.option("--batch", type=click.IntRange(min=0), default=200, show_default=True,
              help="Images in the RSS-over-time batch run (0: skip).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--max-image-tokens", type=click.IntRange(min=0), default=None,
              help="Passed to zoomin detect (0: no limit beyond the preprocessor's) [protocol's].")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("perf/out/memory"),
              show_default=True, help="Photos and JSON outputs.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the figures as JSON here [WORK/memory.json]; a markdown table goes to stdout.")
def main(engine, sizes, batch, max_new_tokens, threads, max_image_tokens, work, report_path) -> None:
    """Peak RSS of `zoomin detect` per photo size, and RSS over a long batch (each in a fresh process)."""
    from .machine import describe

    work.mkdir(parents=True, exist_ok=True)
    size = engine_bytes(engine)
    report = MemoryReport(engine=str(engine), engine_bytes=size, budget_bytes=size + int(1.5 * GiB),
                          max_image_tokens=max_image_tokens, machine=describe())
    for spec in (s.strip() for s in sizes.split(",") if s.strip()):
        try:
            w, h = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{spec!r} is not WIDTHxHEIGHT", param_hint="--sizes") from None
        run = run_photo(engine, write_photo(w, h, work), (w, h), work, max_new_tokens, threads, max_image_tokens)
        click.echo(f"{w}x{h}: peak RSS {run.peak_rss_bytes / GiB:.2f} GiB in {run.seconds:.0f} s"
                   + (f" ({run.error})" if run.error else ""), err=True)
        report.photos.append(run)
    if batch:
        report.batch = run_batch(engine, batch, work, max_new_tokens, threads)
    path = report_path or work / "memory.json"
    path.write_text(json.dumps(asdict(report), indent=1) + "\n")
    click.echo("\n".join(markdown(report)))
