"""ONNX Runtime GenAI as a peer: its model builder, run with `onnxruntime_genai.Generator`.

For Qwen2.5-VL the builder exports the text decoder only (embedding included, GroupQueryAttention, MatMulNBits at
int4): no vision tower, so no image encode and no ZoomIn job, text prefill and decode only. Prefill is
`append_tokens` (it runs the prompt) plus picking the first token; decode is `generate_next_token` for the rest
(greedy, min_length = max_length so that no EOS ends it early).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .peers import Peer, PeerOptions, Session, TextRun, run_converter

BUILDER_PRECISIONS = {"fp32": "fp32", "int4": "int4"}


class OrtGenAIPeer(Peer):
    name = "ort-genai"
    runtime = "ORT GenAI"
    requires = ("onnxruntime_genai",)
    packages = ("onnxruntime-genai",)

    def convert(self, ckpt: Path, precision: str, out: Path, log: Path, options: PeerOptions) -> list[str]:
        cache = out.parent / f"{out.name}.builder-cache"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", ckpt, "-o", out,
               "-p", BUILDER_PRECISIONS[precision], "-e", "cpu", "-c", cache]
        try:
            run_converter(cmd, log, what="onnxruntime_genai.models.builder")
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        return [f"model builder -p {BUILDER_PRECISIONS[precision]} -e cpu"]

    def open(self, path: Path, threads: int) -> Session:
        return _Session(path, threads)


class _Session(Session):
    def __init__(self, path: Path, threads: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(path))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.notes = ["text only: the model builder exports no vision tower for Qwen2.5-VL (no image encode, no job)"]

    def text(self, prompt: str, ids: np.ndarray, script: list[int]) -> TextRun:
        og = self.og
        total = len(ids) + len(script)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, np.int32))
        gen.generate_next_token()
        t1 = time.perf_counter()
        steps = 0
        while steps < len(script) - 1 and not gen.is_done():
            gen.generate_next_token()
            steps += 1
        t2 = time.perf_counter()
        del gen
        return TextRun((t1 - t0) * 1e3, len(ids), (t2 - t1) * 1e3, steps)
