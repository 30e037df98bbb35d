"""The output rows of `zoomin batch` as an Arrow table with one fixed schema.

A row holds the same fields as a `zoomin detect --json` line (`result_record`): `path`, `error` (null when the image
was detected), then DetectResult's fields (null on an error row). Scalars keep their types (strings, float64
scores, `image_size` / `model_size` as [width, height] int64 lists); the nested, variable-shaped fields
(`JSON_COLUMNS`: boxes, tokens, timings_ms) are JSON-encoded strings, so every Parquet file has the same flat schema
whatever the images produced (a batch of error rows included) and any reader can load it. `table_records` undoes
the encoding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import fields
from typing import Any

import pyarrow as pa

from zoomin.runtime.pipeline import DetectResult

JSON_COLUMNS = ("boxes", "tokens", "timings_ms")
_TYPES = {"score": pa.float64(), "stage1_score": pa.float64(), "image_size": pa.list_(pa.int64()),
          "model_size": pa.list_(pa.int64())}  # every other DetectResult field is a string

SCHEMA = pa.schema(
    [pa.field("path", pa.string(), nullable=False), pa.field("error", pa.string())]
    + [pa.field(f.name, pa.string() if f.name in JSON_COLUMNS else _TYPES.get(f.name, pa.string()))
       for f in fields(DetectResult)])


def records_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    """`result_record` dicts as a table of SCHEMA (absent fields, as on error rows, become nulls)."""
    rows = [{k: json.dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in r.items()} for r in records]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def table_records(table: pa.Table) -> Iterator[dict[str, Any]]:
    """The rows of a SCHEMA table as `zoomin detect --json` objects: an error row is just {path, error}."""
    for row in table.to_pylist():
        if row["error"] is not None:
            yield {"path": row["path"], "error": row["error"]}
        else:
            yield {k: json.loads(v) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()}
