"""Timed runs of the fixed job, each configuration (backend x precision) in its own spawned worker process.

A process per configuration keeps the numbers honest: peak RSS is that configuration's own (not the largest of
everything loaded so far), the runtime process never imports torch, and no allocator or cache state leaks from
one configuration into another. The workers stay loaded and the parent asks them for one run at a time, so the
repeats can be interleaved: on a machine whose background load drifts, every configuration then sees the same
drift instead of one of them getting the quiet minutes.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass

import numpy as np

from ..runtime.rss import peak_rss
from .machine import background_cores, busy_cpu_seconds
from .workload import ScriptedLM, Workload, run_scripted, scripts_for

STAGES = ("decode", "preprocess", "vision_full", "stage1_prefill", "stage1_decode", "crop", "vision_crops",
          "stage2_prefill", "stage2_decode")
# Per-run metrics in ms: the stages, what lies outside them, time to first token, stage-2 cost, end to end,
# decode time per token.
TIME_METRICS = (*STAGES, "other", "ttft", "stage2", "total", "decode_ms_per_token")
TOKEN_KEYS = ("stage1_prompt", "stage1_generated", "stage1_prefill", "stage2_prompt", "stage2_prefill",
              "stage2_generated", "reused_prefix", "crops")


@dataclass
class Job:
    """One configuration to measure. `path` is the engine (zoomin) or the checkpoint (transformers)."""

    label: str
    backend: str  # "zoomin" | "transformers"
    path: str
    workload: Workload
    threads: int
    ablation: bool = False  # zoomin only: also run without KV reuse


class WorkerError(RuntimeError):
    """A worker failed to load or run; the message is one line."""


def summarize(values: list[float]) -> dict:
    """Median and spread (interquartile range, min, max) of one metric over the timed repeats."""
    a = np.asarray(values, np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1), "min": float(a.min()),
            "max": float(a.max()), "n": int(a.size)}


def run_metrics(timings_ms: dict[str, float], tokens: dict[str, int]) -> dict[str, float]:
    """Per-run metrics from one DetectResult's timings and token counters.

    ttft runs from the image file to the logits of query 1's first answer token. A decode stage of g tokens makes
    g - 1 forward passes (the first token comes from prefill), so per-token decode time divides by those.
    """
    m = {s: float(timings_ms.get(s, 0.0)) for s in STAGES}
    m["total"] = float(timings_ms["total"])
    m["other"] = m["total"] - sum(m[s] for s in STAGES)
    m["ttft"] = m["decode"] + m["preprocess"] + m["vision_full"] + m["stage1_prefill"]
    m["stage2"] = m["vision_crops"] + m["stage2_prefill"] + m["stage2_decode"]
    steps = max(tokens.get("stage1_generated", 0) - 1, 0) + max(tokens.get("stage2_generated", 0) - 1, 0)
    decode = m["stage1_decode"] + m["stage2_decode"]
    m["decode_ms_per_token"] = decode / steps if steps else float("nan")
    m["decode_tok_s"] = 1e3 * steps / decode if steps and decode > 0 else float("nan")
    return m


class Worker:
    """A configuration loaded in its own spawned process; each `run` is one timed detect there."""

    def __init__(self, job: Job, images: list[str]):
        self.load_s = self._start(_serve, job, images)["load_s"]

    def _start(self, serve, job, images: list[str]) -> dict:
        """Spawn serve(conn, job, images) and return its load reply."""
        ctx = multiprocessing.get_context("spawn")
        self.job = job
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child, job, images), daemon=True, name=job.label)
        self.process.start()
        child.close()
        return self._reply()

    def run(self, image: str, *, reuse: bool = True, timeout: float | None = None) -> dict:
        """One timed detect; past `timeout` seconds the worker is killed and WorkerError raised."""
        return self._ask("run", image, reuse, timeout=timeout)

    def finish(self) -> dict:
        """Peak RSS and model facts; the worker exits."""
        try:
            return self._ask("finish")
        finally:
            self.close()

    def close(self) -> None:
        self.conn.close()
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()

    def _ask(self, *msg, timeout: float | None = None):
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError):
            raise WorkerError(self._death()) from None
        return self._reply(timeout)

    def _reply(self, timeout: float | None = None):
        if timeout is not None and not self.conn.poll(timeout):
            self.process.kill()
            raise WorkerError(f"too slow: one run did not finish within {timeout:.0f} s")
        try:
            ok, payload = self.conn.recv()
        except (EOFError, OSError):
            raise WorkerError(self._death()) from None
        if not ok:
            raise WorkerError(payload)
        return payload

    def _death(self) -> str:
        self.process.join(timeout=5)
        code = self.process.exitcode
        why = " (killed, out of memory?)" if code is not None and code < 0 else ""
        return f"the worker process died with exit code {code}{why}"


def _serve(conn, job: Job, images: list[str]) -> None:
    """Worker main loop: load, then answer ("run", image, reuse) and ("finish",) requests."""
    try:
        t0 = time.perf_counter()
        zi = load(job)
        detectors = {True: zi}
        if job.ablation:
            from ..runtime.lm import OnnxLM
            from ..runtime.pipeline import ZoomIn

            lm = OnnxLM(zi.lm.inner.engine, reuse=False)
            detectors[False] = ZoomIn(ScriptedLM(lm), zi.chat, zi.config, zi.protocol,
                                      vocab_size=zi.config.text.vocab_size)
        scripts = {p: scripts_for(zi, zi.preprocess(zi.decode_image(p)), job.workload) for p in images}
        conn.send((True, {"load_s": time.perf_counter() - t0}))
    except Exception as e:
        conn.send((False, _one_line(e)))
        return

    def handle(msg: tuple) -> tuple[object, bool]:
        if msg[0] == "run":
            _, image, reuse = msg
            return _timed_run(detectors[reuse], image, scripts[image]), False
        return {"peak_rss_bytes": peak_rss(), "info": backend_info(zi, job)}, True

    answer_requests(conn, handle)


def answer_requests(conn, handle) -> None:
    """A worker's request loop: handle(message) -> (reply, whether it was the last); an exception goes back as
    one line and ends the worker, as does the parent closing the pipe."""
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        try:
            reply, last = handle(msg)
        except Exception as e:
            conn.send((False, _one_line(e)))
            return
        conn.send((True, reply))
        if last:
            return


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _timed_run(zi, image: str, scripts) -> dict:
    """One detect, with how many cores other processes kept busy meanwhile (0 on a quiet machine)."""
    own0, busy0, w0 = _own_cpu(), busy_cpu_seconds(), time.perf_counter()
    r = run_scripted(zi, image, scripts)
    own1, busy1, w1 = _own_cpu(), busy_cpu_seconds(), time.perf_counter()
    background = None if busy0 is None else max((busy1 - busy0) - (own1 - own0), 0.0) / (w1 - w0)
    return {"timings_ms": r.timings_ms, "tokens": {k: r.tokens.get(k, 0) for k in TOKEN_KEYS},
            "image_size": list(r.image_size), "model_size": list(r.model_size), "background_cores": background}


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def load(job: Job):
    """The detector for a job, its language model wrapped so that every query follows the workload's script."""
    if job.backend == "zoomin":
        from ..runtime.pipeline import ZoomIn

        zi = ZoomIn.load(job.path, threads=job.threads, **job.workload.protocol_overrides())
    elif job.backend == "transformers":
        from transformers.utils import logging as hf_logging

        from ..hf_backend import load_hf
        from ..runtime.protocol import Protocol

        hf_logging.disable_progress_bar()
        zi = load_hf(job.path, threads=job.threads,
                     protocol=Protocol.default().replace(**job.workload.protocol_overrides()))
    else:
        raise ValueError(f"unknown backend {job.backend!r}")
    zi.lm = ScriptedLM(zi.lm)
    return zi


def backend_info(zi, job: Job) -> dict:
    """What the floor and the report need to know about the loaded model."""
    tc = zi.config.text
    kv_values = 2 * tc.num_hidden_layers * tc.num_key_value_heads * tc.head_dim  # keys + values per position
    if job.backend == "zoomin":
        engine = zi.lm.inner.engine
        return {"precision": engine.manifest.precision, "engine_bytes": engine.manifest.total_bytes,
                "kv_bytes_per_position": kv_values * engine.decoder.cache_dtype.itemsize}
    model = zi.lm.inner.model._model
    text = model.model.language_model
    head = model.lm_head.weight
    embed = text.get_input_embeddings().weight
    # every text-model weight and lm_head once; the embedding table only if it *is* lm_head (tied): a step
    # gathers a single row of it otherwise
    touched = {id(p): p for p in text.parameters() if p is not embed} | {id(head): head}
    return {"precision": str(head.dtype).replace("torch.", ""),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "decode_weight_bytes": sum(p.numel() * p.element_size() for p in touched.values())
            + embed.shape[1] * embed.element_size(),
            "kv_bytes_per_position": kv_values * head.element_size()}



class QuietGate:
    """Holds each timed run until other processes leave the cores alone, within a total waiting budget.

    On a shared machine a neighbour's burst halves a 2-core benchmark; waiting it out (and recording the
    background load of every run either way) keeps one configuration from being measured in a bad minute.
    """

    def __init__(self, budget_s: float, threshold_cores: float = 0.25, log=print):
        self.budget_s, self.threshold, self.log = budget_s, threshold_cores, log
        self.waited_s = 0.0

    def wait(self) -> None:
        if self.budget_s <= 0:
            return
        announced = False
        while (load := background_cores(0.5)) is not None and load >= self.threshold:
            if self.waited_s >= self.budget_s:
                self.log(f"  quiet-wait budget of {self.budget_s:.0f} s spent: measuring under background load")
                self.budget_s = 0.0
                return
            if not announced:
                self.log(f"  waiting for background load ({load:.2f} cores) to drop below {self.threshold} ...")
                announced = True
            time.sleep(2.0)
            self.waited_s += 2.5


def round_robin(workers: dict, action, raw: dict, failed: dict, log, rotate: int = 0) -> None:
    """action(label, worker) on every worker, starting `rotate` places in (so no worker always runs first); one
    that fails is closed and dropped, its raw runs removed and its reason kept in `failed`."""
    labels = list(workers)
    k = rotate % len(labels) if labels else 0
    for label in labels[k:] + labels[:k]:
        try:
            action(label, workers[label])
        except WorkerError as e:
            failed[label] = f"run: {e}"
            log(f"  {label}: {e}")
            raw.pop(label, None)
            workers.pop(label).close()


def measure_all(jobs: list[Job], images: list[str], reference: str, *, repeats: int, warmup: int,
                interleave: bool, max_run_s: float | None = None, quiet: QuietGate | None = None,
                log=print) -> tuple[dict[str, dict], dict[str, str]]:
    """Raw runs of every job: ({label: raw}, {label: why it failed}).

    interleave: all workers loaded at once and the repeats taken round-robin, the order rotating every round;
    otherwise one worker at a time. Each worker first warms up on the reference image (with and, for the
    ablation, without reuse). A worker that fails, or whose warm-up run does not finish within max_run_s, is
    dropped with its reason; the others go on. `quiet` holds every timed run until the machine is quiet.
    """
    gate = quiet or QuietGate(0.0)
    raw: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for group in [jobs] if interleave else [[j] for j in jobs]:
        workers: dict[str, Worker] = {}
        for job in group:
            log(f"loading {job.label} ...")
            try:
                workers[job.label] = Worker(job, images)
            except WorkerError as e:
                failed[job.label] = f"load: {e}"
                log(f"  {job.label}: {e}")
                continue
            raw[job.label] = {"label": job.label, "backend": job.backend, "path": job.path, "threads": job.threads,
                              "load_s": workers[job.label].load_s, "images": {p: [] for p in images}}
            if job.ablation:
                raw[job.label]["no_reuse"] = {reference: []}

        def each(action, rotate: int = 0) -> None:
            round_robin(workers, action, raw, failed, log, rotate)

        def warm(label: str, w: Worker) -> None:
            for _ in range(warmup):
                w.run(reference, timeout=max_run_s)
                if w.job.ablation:
                    w.run(reference, reuse=False, timeout=max_run_s)

        def timed(label: str, w: Worker, image: str, reuse: bool = True) -> None:
            gate.wait()
            raw[label]["images" if reuse else "no_reuse"][image].append(w.run(image, reuse=reuse))

        each(warm)
        for r in range(repeats):
            if not workers:
                break
            t0 = time.perf_counter()
            for image in images:
                each(lambda label, w: timed(label, w, image), rotate=r)
            each(lambda label, w: timed(label, w, reference, reuse=False) if w.job.ablation else None, rotate=r)
            log(f"  round {r + 1}/{repeats} ({', '.join(workers)}) took {time.perf_counter() - t0:.0f} s")
        each(lambda label, w: raw[label].update(w.finish()))
    return raw, failed
