"""OpenVINO GenAI as a peer: optimum-intel's `optimum-cli export openvino`, run with `openvino_genai.VLMPipeline`.

VLMPipeline runs the whole job: query 1 and query 2 are two turns of one chat (`start_chat`, so query 2 reuses
query 1's KV cache), images placed with OpenVINO's `<ov_genai_image_N>` tags, numbered across the chat. It picks
its own tokens (no way to feed a script), so its answers have the workload's lengths (min = max new tokens,
EOS ignored) but not its text. Times come from its own perf metrics: vision encode from query 1's
`get_vision_encoding_duration`, prefill from TTFT, decode from TPOT.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .peers import JobHost, JobRun, Peer, PeerOptions, Session, TextRun, pythonpath_env, run_converter

WEIGHT_FORMATS = {"fp32": "fp32", "int4": "int4"}


class OpenVINOPeer(Peer):
    name = "openvino"
    runtime = "OpenVINO GenAI"
    requires = ("openvino_genai", "optimum.exporters.openvino")
    packages = ("openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "optimum", "nncf")
    does_vision = True

    def convert(self, ckpt: Path, precision: str, out: Path, log: Path, options: PeerOptions) -> list[str]:
        cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino", "-m", ckpt,
               "--task", "image-text-to-text", "--weight-format", WEIGHT_FORMATS[precision], out]
        run_converter(cmd, log, env=pythonpath_env(options.optimum_pythonpath), what="optimum-cli export openvino")
        notes = [f"optimum-cli export openvino --weight-format {WEIGHT_FORMATS[precision]}"]
        if options.optimum_pythonpath:
            notes.append(f"exported with PYTHONPATH={options.optimum_pythonpath} in front")
        return notes

    def open(self, path: Path, threads: int) -> Session:
        return _Session(path, threads)


class _Session(Session):
    def __init__(self, path: Path, threads: int):
        import openvino_genai as ov_genai

        self.ov_genai = ov_genai
        self.pipe = ov_genai.VLMPipeline(str(path), "CPU", INFERENCE_NUM_THREADS=threads)
        self.notes: list[str] = []

    def _config(self, n: int):
        c = self.ov_genai.GenerationConfig()
        c.max_new_tokens = c.min_new_tokens = n
        c.ignore_eos = True
        c.do_sample = False
        return c

    def text(self, prompt: str, ids: np.ndarray, script: list[int]) -> TextRun:
        r = self.pipe.generate(prompt, images=[], generation_config=self._config(len(script)))
        pm = r.perf_metrics
        steps = pm.get_num_generated_tokens() - 1
        return TextRun(pm.get_ttft().mean, pm.get_num_input_tokens(), pm.get_tpot().mean * steps, steps)

    def job(self, host: JobHost, image: str) -> JobRun:
        import openvino as ov

        from ..runtime.image_io import load_image

        job = host.prepare(image)
        t0 = time.perf_counter()
        load_image(image)  # the same file decode zoomin's job starts with (VLMPipeline takes pixels)
        tensors = lambda arrays: [ov.Tensor(np.ascontiguousarray(a)[None]) for a in arrays]  # noqa: E731
        self.pipe.start_chat(job.system)
        try:
            r1 = self.pipe.generate(_tagged(job.scan, 0), images=tensors(job.images1),
                                    generation_config=self._config(len(job.answer1)))
            r2 = self.pipe.generate(_tagged(job.check, len(job.images1)), images=tensors(job.images2),
                                    generation_config=self._config(len(job.answer2)))
        finally:
            self.pipe.finish_chat()
        total = (time.perf_counter() - t0) * 1e3
        pm1, pm2 = r1.perf_metrics, r2.perf_metrics
        return JobRun(total, pm1.get_vision_encoding_duration().mean,
                      {"stage1_prompt": pm1.get_num_input_tokens(), "stage2_prompt": pm2.get_num_input_tokens(),
                       "crops": len(job.images2) - 1})


def _tagged(parts: list[str | None], first_image: int) -> str:
    """A user turn as VLMPipeline text: each image part becomes the tag of its index in the whole chat."""
    out, k = [], first_image
    for p in parts:
        if p is None:
            out.append(f"<ov_genai_image_{k}>")
            k += 1
        else:
            out.append(p)
    return "".join(out)
