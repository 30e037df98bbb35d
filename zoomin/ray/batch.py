"""`zoomin batch`: ZoomIn over a folder, glob or list of images on a Ray cluster, resumable.

Data flow: the driver lists the inputs and drops those already in OUT; Ray Data feeds the remaining paths to a
fixed pool of `ZoomInPredictor` actors (each reads its images itself, locally or through a pyarrow filesystem);
the small result rows stream back to the driver, which alone writes OUT.

Output, chosen by OUT's name:
- a directory (local or a URI): Parquet files `part-<run>-<n>.parquet` of `table.SCHEMA`, each holding up to
  `rows_per_file` rows. A file is written under a temporary name (`_tmp-...`, ignored by readers) and then renamed,
  so a file is either complete or absent.
- a local path ending in `.jsonl`: one JSON Lines file, exactly the lines `zoomin detect --json` writes, appended
  and fsynced per group of rows. A line torn by a crash of the driver is cut off when the run is resumed.

Exactly-once: Ray Data restarts an actor of its pool that dies and retries the batch it was on (the pool's defaults,
`max_restarts=-1` and `max_task_retries=-1`; tests/test_ray.py kills one to hold it to that); a retried batch's rows
are returned once, because Ray Data hands the driver each finished block once, and nothing is written from the
actors. (An image that kills the engine every time would make that retry endless; the predictor's engine worker
process turns it into the image's error row instead.) So one run writes each input path at most once, and a run that
finishes has written every path not already in OUT exactly once. A run interrupted between writes loses only the
rows not yet written (at most `rows_per_file`); rerunning reads the `path` column of OUT, skips those paths (error
rows too: delete them from OUT to retry), and does the rest. `read_records` also keeps only the first row per path,
so even an OUT assembled by hand from overlapping runs reads back without duplicates.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from zoomin.runtime.manifest import Manifest, manifest_sha256

from .inputs import list_inputs
from .predictor import ZoomInPredictor, is_uri
from .table import SCHEMA, table_records


@dataclass
class BatchSummary:
    inputs: int  # paths named by INPUT
    skipped: int  # already in OUT
    written: int  # rows written by this run
    errors: int  # of those, error rows
    seconds: float  # from the start of the Ray job to the last write

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def run_batch(inputs: str, engine: str | Path, out: str, *, address: str | None = None, actors: int = 1,
              threads_per_actor: int = 1, gpus_per_actor: float = 0.0, device: str = "cpu", batch_size: int = 8,
              max_batch: int = 4, max_new_tokens: int | None = None, rows_per_file: int = 1024,
              predictor: type[ZoomInPredictor] = ZoomInPredictor, log: Callable[[str], None] = print
              ) -> BatchSummary:
    """Detect every image named by `inputs` (see `list_inputs`) not yet in `out`, with `actors` engine actors.

    address: a running cluster ("auto", "ray://host:10001", ...); None starts a local one (unless this process
    is already connected). max_batch: images in flight per actor (continuous batching; at most batch_size
    matter). `predictor`: ZoomInPredictor or a subclass; rows are written in SCHEMA.
    """
    engine = os.path.abspath(engine)
    Manifest.load(engine)  # a wrong path fails here, on the driver, not in every actor
    expected_sha = manifest_sha256(engine)
    sink = open_sink(out)
    paths = list_inputs(inputs)
    if not paths:
        raise ValueError(f"no images found in {inputs}")
    done = sink.done_paths()
    todo = [p for p in paths if p not in done]
    log(f"{len(paths)} images, {len(paths) - len(todo)} already in {out}, {len(todo)} to do")
    summary = BatchSummary(len(paths), len(paths) - len(todo), 0, 0, 0.0)
    if not todo:
        return summary
    if not ray.is_initialized():
        ray.init(address=address)
    start = time.perf_counter()
    ds = ray.data.from_items([{"path": p} for p in todo]).map_batches(
        predictor, fn_constructor_kwargs=dict(engine=engine, expected_sha=expected_sha, threads=threads_per_actor,
                                              max_new_tokens=max_new_tokens, device=device, max_batch=max_batch),
        concurrency=actors, batch_size=batch_size, num_cpus=threads_per_actor, num_gpus=gpus_per_actor)
    for table in _grouped(ds.iter_batches(batch_size=None, batch_format="pyarrow"), rows_per_file):
        sink.write(table)
        summary.written += table.num_rows
        summary.errors += table.num_rows - table["error"].null_count
    summary.seconds = time.perf_counter() - start
    return summary


def _grouped(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Blocks as they finish, regrouped into tables of at least `rows` rows (the last one: what is left)."""
    pending: list[pa.Table] = []
    size = 0
    for t in tables:
        pending.append(t.select(SCHEMA.names).cast(SCHEMA))
        size += t.num_rows
        if size >= rows:
            yield pa.concat_tables(pending)
            pending, size = [], 0
    if pending:
        yield pa.concat_tables(pending)


def read_records(out: str) -> list[dict[str, Any]]:
    """Every image in OUT as a `zoomin detect --json` object, one per path (the first written)."""
    return open_sink(out).records()


def open_sink(out: str) -> "ParquetDir | JsonlFile":
    return JsonlFile(out) if out.endswith(".jsonl") else ParquetDir(out)


class ParquetDir:
    """A directory of Parquet files, local or behind a pyarrow filesystem URI."""

    def __init__(self, out: str):
        if is_uri(out):
            self.fs, self.root = pafs.FileSystem.from_uri(out)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(out)
        self.fs.create_dir(self.root, recursive=True)
        self.run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.count = 0

    def files(self) -> list[str]:
        entries = self.fs.get_file_info(pafs.FileSelector(self.root))
        return sorted(e.path for e in entries if e.type == pafs.FileType.File and e.base_name.startswith("part-")
                      and e.base_name.endswith(".parquet"))

    def done_paths(self) -> set[str]:
        return {p for f in self.files() for p in pq.read_table(f, columns=["path"], filesystem=self.fs)["path"]
                .to_pylist()}

    def write(self, table: pa.Table) -> None:
        name = f"part-{self.run}-{self.count:06d}.parquet"
        self.count += 1
        tmp, final = f"{self.root}/_tmp-{name}", f"{self.root}/{name}"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, final)

    def records(self) -> list[dict[str, Any]]:
        return _first_per_path(r for f in self.files() for r in table_records(pq.read_table(f, filesystem=self.fs)))


class JsonlFile:
    """One local JSON Lines file, appended by the driver."""

    def __init__(self, out: str):
        if is_uri(out):
            raise ValueError(f"{out}: JSON Lines output is a local file; write Parquet (a directory) to a URI")
        self.path = Path(out)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _lines(self, *, repair: bool = False) -> list[str]:
        """The complete lines; with `repair`, a torn last line (the driver died mid-write) is cut off the file so
        that the next append starts on a line of its own."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if repair and end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        return data[:end].decode("utf-8").splitlines()

    def done_paths(self) -> set[str]:
        return {json.loads(line)["path"] for line in self._lines(repair=True)}

    def write(self, table: pa.Table) -> None:
        text = "".join(json.dumps(r) + "\n" for r in table_records(table))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        return _first_per_path(json.loads(line) for line in self._lines())


def _first_per_path(records) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for r in records:
        seen.setdefault(r["path"], r)
    return list(seen.values())
