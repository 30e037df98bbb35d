"""ZoomIn on a Ray cluster (extra `ray`): batch detection over Ray Data, and the HTTP service on Ray Serve.

`zoomin batch` drives `run_batch`; `ZoomInPredictor` is the Ray Data callable class behind it, usable on its own in
any pipeline (`ds.map_batches(ZoomInPredictor, fn_constructor_kwargs=..., concurrency=N)`). The Serve deployment
lives in `zoomin.ray.serve` (imported separately: it needs Serve's extra dependencies).
"""

from .batch import BatchSummary, read_records, run_batch
from .inputs import list_inputs
from .predictor import ZoomInPredictor, read_source
from .table import JSON_COLUMNS, SCHEMA, records_table, table_records

__all__ = ["BatchSummary", "JSON_COLUMNS", "SCHEMA", "ZoomInPredictor", "list_inputs", "read_records",
           "read_source", "records_table", "run_batch", "table_records"]
