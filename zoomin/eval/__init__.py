"""`zoomin eval`: accuracy, calibration, query-1 -> query-2 changes and precision drift of engines on a labelled
set. Runtime only (numpy, the engine); matplotlib, when installed, draws the plots."""

from .data import DatasetError, Sample, load_samples
from .drift import drift
from .report import build_report, engine_metrics, write_report
from .run import EngineSpec, EvalError, evaluate, run_engine

__all__ = ["DatasetError", "EngineSpec", "EvalError", "Sample", "build_report", "drift", "engine_metrics",
           "evaluate", "load_samples", "run_engine", "write_report"]
