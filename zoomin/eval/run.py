"""Run engines over an evaluation set, resumably, and assemble the report.

Each engine's predictions are appended to `predictions-<engine name>.jsonl` in the report folder as each image
finishes (one JSON object: the sample key, the settings, the error or the whole DetectResult), so a run that is
stopped loses at most the image in flight: the next run skips every key already in the file and recomputes all
metrics from it. A bad image is a record with its error and is not retried. Records carry the engine's identity
(sha256 of its manifest) and max_new_tokens, and a file made with others is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.manifest import MANIFEST, Manifest, sha256_file
from .data import Sample, load_samples, take
from .drift import drift, engine_tokenizer
from .report import build_report, write_report

Record = dict[str, Any]
Progress = Callable[[Sequence[Sample]], Iterable[Sample]]


class EvalError(ValueError):
    """An evaluation that cannot go on (clashing engine names, a predictions file from other settings)."""


@dataclass(frozen=True)
class EngineSpec:
    name: str  # the engine folder's name: labels the report and names its predictions file
    path: Path
    engine_id: str  # sha256 of manifest.json, which holds the sha256 of every engine file

    @classmethod
    def from_dir(cls, path: str | Path) -> "EngineSpec":
        """Checks that `path` is an engine (EngineError otherwise) without loading it."""
        path = Path(path)
        Manifest.load(path)
        return cls(path.resolve().name, path, sha256_file(path / MANIFEST))


def engine_specs(engines: Sequence[str | Path], reference: str | Path | None = None
                 ) -> tuple[list[EngineSpec], EngineSpec | None]:
    """The engines to run, and the reference (one of them when the same folder is given twice). Two different
    folders with the same name would share a predictions file, so they are refused."""
    by_path: dict[Path, EngineSpec] = {}
    for p in [*engines, *([reference] if reference is not None else [])]:
        resolved = Path(p).resolve()
        if resolved not in by_path:
            by_path[resolved] = EngineSpec.from_dir(p)
    names: dict[str, Path] = {}
    for resolved, spec in by_path.items():
        if spec.name in names:
            raise EvalError(f"engines {names[spec.name]} and {resolved} are both named {spec.name!r}; their "
                            f"predictions would share one file: give one of them another folder name")
        names[spec.name] = resolved
    runs = [by_path[Path(p).resolve()] for p in engines]
    runs = list(dict.fromkeys(runs))  # an engine given twice runs once
    ref = by_path[Path(reference).resolve()] if reference is not None else None
    return runs, ref


def predictions_path(out_dir: Path, spec: EngineSpec) -> Path:
    return out_dir / f"predictions-{spec.name}.jsonl"


def read_predictions(path: Path, settings: dict[str, Any]) -> dict[str, Record]:
    """Records already in `path` by sample key. A partial last line (the run was killed while writing it) is cut
    off, so its image runs again."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    records = {}
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key, their = record["key"], record["settings"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvalError(f"{path}, line {n}: not a prediction record; delete the file to start over") from None
        if their != settings:
            raise EvalError(f"{path}, line {n}: made with {their}, this run uses {settings}; use another --out "
                            f"folder or delete the file")
        records[key] = record
    return records


def run_engine(spec: EngineSpec, samples: Sequence[Sample], out_dir: Path, *, max_new_tokens: int | None = None,
               threads: int | None = None, progress: Progress = lambda s: s,
               on_error: Callable[[str], None] = lambda message: None) -> dict[str, Record]:
    """Predictions of one engine for `samples` by key, running only the images not yet in its predictions file.
    The engine is loaded only when there is something to run."""
    from ..runtime import ZoomIn

    settings = {"engine_id": spec.engine_id, "max_new_tokens": max_new_tokens}
    path = predictions_path(out_dir, spec)
    records = read_predictions(path, settings)
    todo = [s for s in samples if s.key not in records]
    if not todo:
        return records
    zi = ZoomIn.load(spec.path, threads=threads)
    with open(path, "a", encoding="utf-8") as f:
        for sample in progress(todo):
            # detect_many turns a bad image (or one that runs out of memory) into its error; a bug still raises
            [(_, result, error)] = zi.detect_many([os.fspath(sample.path)], max_new_tokens=max_new_tokens)
            record = {"key": sample.key, "path": os.fspath(sample.path), "settings": settings, "error": error,
                      **(result.to_dict() if result is not None else {})}
            f.write(json.dumps(record) + "\n")
            f.flush()
            records[sample.key] = record
            if error:
                on_error(error)
    return records


def evaluate(data: str | Path, engines: Sequence[str | Path], out_dir: str | Path, *,
             reference: str | Path | None = None, max_new_tokens: int | None = None, threads: int | None = None,
             limit: int | None = None,
             progress: Callable[[EngineSpec, Sequence[Sample]], Iterable[Sample]] | None = None,
             on_error: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run every engine (and the reference) over the set, resumably, and write metrics.json, report.md and the
    plots into out_dir; returns metrics.json's content. `progress(spec, todo)` wraps the images an engine runs
    (a progress bar); `on_error(message)` hears of each bad image."""
    samples = take(load_samples(data), limit)
    runs, ref = engine_specs(engines, reference)
    specs = [*runs, *([ref] if ref is not None and ref not in runs else [])]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for spec in specs:
        wrap: Progress = (lambda todo, spec=spec: progress(spec, todo)) if progress else (lambda todo: todo)
        records[spec.name] = run_engine(spec, samples, out_dir, max_new_tokens=max_new_tokens, threads=threads,
                                        progress=wrap, on_error=on_error)
    drifts = {}
    if ref is not None:
        tokenize = engine_tokenizer(ref.path)
        drifts = {spec.name: drift(samples, records[spec.name], records[ref.name], tokenize) for spec in runs}
    settings = {"data": str(data), "limit": limit, "max_new_tokens": max_new_tokens,
                "engines": {spec.name: {"path": str(spec.path), "engine_id": spec.engine_id} for spec in specs}}
    report = build_report(samples, records, reference=ref.name if ref else None, drift=drifts, settings=settings)
    write_report(out_dir, report, samples, records)
    return report
