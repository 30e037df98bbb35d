"""zoomin side by side with the runtimes users would pick instead, in one run on one machine.

Each peer converts the same checkpoint with its own tool (in a subprocess, so a tool that does not know the
installed transformers fails alone, as one line) and is then measured in its own spawned worker process (peak
RSS is that process's own), interleaved round-robin with the zoomin engine of the same precision, behind the same
quiet-machine gate as the rest of the suite. Every runtime does the same things:

- text: a text-only prompt of exactly `prefill_tokens` ids (512), then `decode_tokens` (128) generated tokens;
  prefill tok/s = prompt tokens / time to the first token's logits, decode tok/s = (tokens - 1) / the rest
  (the first token comes from prefill);
- job: the whole two-stage ZoomIn job on the reference image (both queries, query 2 with the original and the
  zoomed crops of the workload's scripted boxes, answer lengths from the workload), where the peer can run it,
  with the full image's vision encode time from inside the job;
- peak RSS of the worker process and the converted model's size on disk.

A peer module only says how to convert and how to run those two things (`Peer`, `Session`); this module does the
rest. zoomin itself is a `Peer` too (`ZoomInPeer`), so the comparison runs zoomin through the same interface.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from ..runtime.rss import peak_rss
from .bench import QuietGate, Worker, WorkerError, _one_line, answer_requests, round_robin, summarize
from .workload import FILLER, Workload

PEER_NAMES = ("openvino", "ort-genai", "llama.cpp")
PEER_PRECISIONS = ("fp32", "int4")
# Per-run quantities, with which way is better (for the ratio zoomin / peer).
METRICS = {"image_encode_ms": "lower", "prefill_tok_s": "higher", "decode_tok_s": "higher", "job_s": "lower"}
SIZE_METRICS = {"peak_rss_bytes": "lower", "size_bytes": "lower"}
INSTALL_HINT = "pip install 'zoomin[peers]'"

Log = Callable[[str], None]


class ConversionError(RuntimeError):
    """A peer's converter failed; the message is one line naming the failure."""


@dataclass(frozen=True)
class TextWork:
    prefill_tokens: int = 512
    decode_tokens: int = 128


@dataclass(frozen=True)
class PeerOptions:
    """Where the peers' converters come from (parent side only)."""

    # prepended to PYTHONPATH of optimum-intel's export only: optimum-intel 2.2 exports Qwen2.5-VL only with
    # transformers <= 5.0, the other converters want the installed (newer) one
    optimum_pythonpath: str | None = None
    llama_cpp_src: Path | None = None  # a llama.cpp source tree (convert_hf_to_gguf.py), e.g. the sdist's vendor/


@dataclass
class Converted:
    path: Path
    notes: list[str] = field(default_factory=list)


@dataclass
class TextRun:
    prefill_ms: float
    prefill_tokens: int
    decode_ms: float
    decode_steps: int  # forward passes after prefill (generated tokens - 1)


@dataclass
class JobRun:
    total_ms: float
    image_encode_ms: float | None  # the full image's vision encode inside the job (None: not reported)
    tokens: dict[str, int] = field(default_factory=dict)


# -- the interface a peer implements ------------------------------------------------------------------------------

class Session:
    """A loaded model in the worker process."""

    def text(self, prompt: str, ids: np.ndarray, script: list[int]) -> TextRun:
        """Prefill the user message `prompt` (in the chat template: `ids`), then generate len(script) tokens.

        Runtimes that take ids take `ids`; those that can be fed tokens feed `script` while decoding."""
        raise NotImplementedError

    def job(self, host: "JobHost", image: str) -> JobRun | None:
        """The two-stage ZoomIn job on `image`; None when this runtime cannot run it."""
        return None


class Peer:
    name = ""
    runtime = ""  # how the report names it
    requires: tuple[str, ...] = ()  # modules the peer needs (runtime and converter)
    packages: tuple[str, ...] = ()  # distributions whose versions are recorded
    does_vision = False  # whether its conversion exports the vision tower at all

    def __init__(self, workload: Workload = Workload()):
        self.workload = workload

    def missing(self) -> str | None:
        """Why this peer cannot run here (one line), or None."""
        absent = [m for m in self.requires if not _module_exists(m)]
        if absent:
            return f"not installed (no module {', '.join(absent)}; {INSTALL_HINT})"
        return None

    def versions(self) -> dict[str, str | None]:
        out = {}
        for p in self.packages:
            try:
                out[p] = metadata.version(p)
            except metadata.PackageNotFoundError:
                out[p] = None
        return out

    def convert(self, ckpt: Path, precision: str, out: Path, log: Path, options: PeerOptions) -> list[str]:
        """Convert `ckpt` into the folder `out`; returns notes for the report. Raises ConversionError."""
        raise NotImplementedError

    def open(self, path: Path, threads: int) -> Session:
        raise NotImplementedError


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def run_converter(cmd: list[str], log: Path, *, env: dict[str, str] | None = None, what: str = "") -> None:
    """Run one conversion command with its output in `log`; a failure becomes a one-line ConversionError."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = os.environ | (env or {})
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=full_env).returncode
    if rc != 0:
        raise ConversionError(f"{what or Path(str(cmd[0])).name} exited with {rc}: {failure_line(log)} (log: {log})")


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Interrupt)|error)\b[^:\n]*:.*")


def failure_line(log: Path) -> str:
    """The line of a tool's output that names its failure: the last exception line, else the last line."""
    lines = [ln.rstrip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _ERROR_LINE.match(ln):
            return ln.strip()[:300]
    return lines[-1].strip()[:300] if lines else "no output"


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pythonpath_env(prefix: str | None) -> dict[str, str]:
    """Environment additions putting `prefix` in front of PYTHONPATH (none without a prefix)."""
    if not prefix:
        return {}
    rest = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": prefix + (os.pathsep + rest if rest else "")}


# -- zoomin through the same interface ----------------------------------------------------------------------------

class ZoomInPeer(Peer):
    """zoomin's own engine as a peer: what every other runtime is compared against."""

    name = "zoomin"
    runtime = "zoomin"
    packages = ("zoomin", "onnxruntime")
    does_vision = True

    def open(self, path: Path, threads: int) -> Session:
        return _ZoomInSession(path, threads, self.workload)


class _ZoomInSession(Session):
    def __init__(self, engine: Path, threads: int, workload: Workload):
        from ..runtime.lm import OnnxLM
        from .bench import Job, load

        self.workload = workload
        self.zi = load(Job("zoomin", "zoomin", str(engine), workload, threads))  # the suite's scripted detector
        # Text runs get their own LM without KV reuse: a repeat must not reuse the previous repeat's prompt.
        self.text_lm = OnnxLM(self.zi.lm.inner.engine, reuse=False)
        self.scripts: dict[str, tuple[list[int], list[int]]] = {}

    def text(self, prompt: str, ids: np.ndarray, script: list[int]) -> TextRun:
        from .workload import ScriptSampler

        g = self.text_lm.run(ids, [], forced=None, max_new_tokens=len(script), sampler=ScriptSampler(script))
        if g.tokens != script:
            raise RuntimeError(f"zoomin stopped after {len(g.tokens)} of {len(script)} scripted tokens")
        return TextRun(g.prefill_ms, g.prefill_tokens, g.decode_ms, len(g.tokens) - 1)

    def job(self, host: "JobHost", image: str) -> JobRun:
        from .workload import run_scripted, scripts_for

        if image not in self.scripts:
            self.scripts[image] = scripts_for(self.zi, self.zi.preprocess(self.zi.decode_image(image)), self.workload)
        r = run_scripted(self.zi, image, self.scripts[image])
        return JobRun(r.timings_ms["total"], r.timings_ms.get("vision_full"),
                      {k: r.tokens.get(k, 0) for k in ("stage1_prompt", "stage2_prompt", "stage2_prefill", "crops")})


# -- the job's host side, shared by every peer ------------------------------------------------------------------

class JobHost:
    """What the ZoomIn job shows each runtime: zoomin's protocol, prompts, scripted answers and crops.

    Built from the checkpoint with the runtime's own (numpy/OpenCV/tokenizers) code, so every peer gets the same
    conversation zoomin runs: query 1 = system prompt + full image + scan instruction, answered with the
    workload's script (boxes included); query 2 = the captioned original and crops of those boxes + the check
    instruction. `prepare` does the host work once per image (decode, resize, crops), outside the timed job.
    """

    def __init__(self, checkpoint: Path, protocol: dict, workload: Workload):
        from ..runtime.chat import ChatTokenizer
        from ..runtime.config import ModelConfig
        from ..runtime.pipeline import ZoomIn
        from ..runtime.protocol import Protocol

        config = ModelConfig.from_checkpoint(checkpoint)
        chat = ChatTokenizer.from_file(Path(checkpoint) / "tokenizer.json", config)
        proto = Protocol.from_dict(protocol).replace(**workload.protocol_overrides())
        self.zi = ZoomIn(None, chat, config, proto, vocab_size=config.text.vocab_size)
        self.workload = workload
        self._prepared: dict[str, PreparedJob] = {}

    @property
    def chat(self):
        return self.zi.chat

    def text_prompt(self, n: int) -> tuple[str, np.ndarray]:
        """A user message whose whole chat (default system turn + user turn + assistant header) is n ids."""
        from ..runtime.chat import Message

        def ids_for(chars: int) -> np.ndarray:
            return self.chat.encode([Message("user", filler[:chars])], add_generation_prompt=True)

        per_filler = len(self.chat.tokenizer.encode(FILLER, add_special_tokens=False).ids)
        filler = FILLER * (n // max(per_filler, 1) + 2)
        if len(ids_for(len(filler))) < n:
            raise ValueError(f"cannot build a {n}-token prompt from the filler text")
        lo, hi = 0, len(filler)  # smallest prefix reaching n tokens
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if len(ids_for(mid)) < n else (lo, mid)
        for chars in (lo, lo - 1, lo + 1, lo - 2, lo + 2):
            ids = ids_for(chars)
            if len(ids) == n:
                return filler[:chars], ids
        raise ValueError(f"no prefix of the filler text tokenizes to exactly {n} ids")

    def decode_script(self, n: int) -> list[int]:
        """n ids of prose without stop tokens: what runtimes that can be fed tokens emit while decoding."""
        filler = self.chat.tokenizer.encode(FILLER, add_special_tokens=False).ids
        return (filler * (n // len(filler) + 1))[:n]

    def prepare(self, image: str) -> "PreparedJob":
        from ..runtime.chat import messages_from_dicts, render_chat, render_continuation
        from ..runtime.resize import resize_bicubic
        from .workload import script_boxes, scripts_for

        if image not in self._prepared:
            zi = self.zi
            pre = zi.preprocess(zi.decode_image(image))
            answer1, answer2 = scripts_for(zi, pre, self.workload)
            regions, crops = zi.crops(pre, script_boxes(self.workload.boxes, pre.resized_hw))
            boxes = [_box(r) for r in regions]
            turn = zi.protocol.check_messages("", boxes)[-1]
            seen = resize_bicubic(pre.image, pre.resized_hw)  # the full image at the size zoomin's model sees it
            images2 = [seen if part.get("source") == "original" else crops[part["index"]].image
                       for part in turn["content"] if part["type"] == "image"]
            scan_msgs = zi.protocol.scan_messages()
            self._prepared[image] = PreparedJob(
                scan=_parts(scan_msgs[-1]), check=_parts(turn),
                scan_text=render_chat(messages_from_dicts(scan_msgs), add_generation_prompt=True),
                check_text=render_continuation(messages_from_dicts([turn]), add_generation_prompt=True),
                system=zi.protocol.system_prompt, images1=[seen], images2=images2,
                answer1=answer1, answer2=answer2, ids1=zi.scan_ids(pre),
                ids2_continuation=zi.check_ids(pre, regions, crops)[0])
        return self._prepared[image]


def _box(region):
    from ..runtime.protocol import Box

    return Box(*region.box_model, region.label)


def _parts(message: dict) -> list[str | None]:
    """A chat-template message's content as text strings, with None where an image goes."""
    return [None if c["type"] == "image" else c["text"] for c in message["content"]]


@dataclass
class PreparedJob:
    """One image's job, ready for any runtime.

    Images are RGB uint8 arrays: the full image already resized to the size zoomin's preprocessor gives it (its
    max_image_tokens cap included) and the zoomed crops, so that every runtime's own resize keeps them as they are
    and all see the same number of image tokens.
    """

    system: str
    scan: list[str | None]  # query 1's user turn: text parts, None = an image
    check: list[str | None]  # query 2's user turn
    scan_text: str  # query 1 in the chat template, each image as chat.VISION_PLACEHOLDER
    check_text: str  # what follows query 1's answer: the answer's end, query 2's turn, the assistant header
    images1: list[np.ndarray]
    images2: list[np.ndarray]
    answer1: list[int]  # the workload's scripted answers (ids)
    answer2: list[int]
    ids1: np.ndarray  # zoomin's query-1 prompt ids and query-2 continuation ids (for token counts)
    ids2_continuation: np.ndarray


# -- the worker -------------------------------------------------------------------------------------------------

@dataclass
class PeerSpec:
    """One configuration to measure, everything the worker process needs (picklable)."""

    label: str
    peer: str  # "module:Class" of the Peer
    precision: str
    path: str  # the converted model (or zoomin engine)
    checkpoint: str
    protocol: dict
    workload: Workload
    text: TextWork
    threads: int
    log: str  # the worker's stdout/stderr (runtimes' own chatter) go here


def peer_class(ref: str) -> type[Peer]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def make_peer(ref: str, workload: Workload) -> Peer:
    return peer_class(ref)(workload)


class PeerWorker(Worker):
    """bench.Worker's process and pipe handling, serving a peer's text and job runs instead of detect runs."""

    def __init__(self, spec: PeerSpec, images: list[str]):
        reply = self._start(_serve_peer, spec, images)
        self.load_s, self.info = reply["load_s"], reply["info"]

    def text(self, timeout: float | None = None) -> dict:
        return self._ask("text", timeout=timeout)

    def job_run(self, image: str, timeout: float | None = None) -> dict | None:
        return self._ask("job", image, timeout=timeout)


def _serve_peer(conn, spec: PeerSpec, images: list[str]) -> None:
    with open(spec.log, "a") as logf:
        for fd in (1, 2):  # runtimes print to the C-level stdout/stderr: keep that in the log, not the console
            os.dup2(logf.fileno(), fd)
    try:
        t0 = time.perf_counter()
        peer = make_peer(spec.peer, spec.workload)
        session = peer.open(Path(spec.path), spec.threads)
        host = JobHost(Path(spec.checkpoint), spec.protocol, spec.workload)
        prompt, ids = host.text_prompt(spec.text.prefill_tokens)
        script = host.decode_script(spec.text.decode_tokens)
        for image in images:
            host.prepare(image)
        info = {"notes": getattr(session, "notes", [])}
        conn.send((True, {"load_s": time.perf_counter() - t0, "info": info}))
    except Exception as e:
        conn.send((False, _one_line(e)))
        return

    def handle(msg: tuple) -> tuple[object, bool]:
        if msg[0] == "text":
            return asdict(session.text(prompt, ids, script)), False
        if msg[0] == "job":
            run = session.job(host, msg[1])
            return (None if run is None else asdict(run)), False
        return {"peak_rss_bytes": peak_rss(), "info": {"notes": getattr(session, "notes", [])}}, True

    answer_requests(conn, handle)


def run_metrics(text: dict, job: dict | None) -> dict[str, float]:
    """One round's quantities from a text run and a job run (NaN where the runtime cannot do it)."""
    nan = float("nan")
    out = {
        "prefill_tok_s": 1e3 * text["prefill_tokens"] / text["prefill_ms"] if text["prefill_ms"] > 0 else nan,
        "decode_tok_s": 1e3 * text["decode_steps"] / text["decode_ms"] if text["decode_ms"] > 0 else nan,
        "prefill_ms": text["prefill_ms"], "prefill_tokens": float(text["prefill_tokens"]),
        "decode_ms": text["decode_ms"], "decode_steps": float(text["decode_steps"]),
        "job_s": nan, "image_encode_ms": nan,
    }
    if job is not None:
        out["job_s"] = job["total_ms"] / 1e3
        if job["image_encode_ms"] is not None:
            out["image_encode_ms"] = job["image_encode_ms"]
    return out


# -- conversion -----------------------------------------------------------------------------------------------

def converter_fingerprint(peer: Peer) -> str:
    """The peer module's source: a changed conversion recipe must not reuse a stale conversion."""
    import hashlib
    import inspect

    return hashlib.sha256(Path(inspect.getsourcefile(type(peer))).read_bytes()).hexdigest()


def ensure_conversion(peer: Peer, ckpt: Path, precision: str, folder: Path, options: PeerOptions,
                      log: Log) -> tuple[Converted | None, str | None]:
    """(converted model, None), reusing a cached conversion whose inputs match; (None, one-line reason)."""
    import shutil

    from .suite import checkpoint_fingerprint

    out = folder / f"{ckpt.name}-{peer.name}-{precision}"
    stamp = folder / f"{out.name}.inputs.json"
    logf = folder / f"{out.name}.convert.log"
    inputs = {"checkpoint": str(ckpt.resolve()), "checkpoint_fingerprint": checkpoint_fingerprint(ckpt),
              "precision": precision, "versions": peer.versions(), "converter_code": converter_fingerprint(peer),
              "optimum_pythonpath": options.optimum_pythonpath,
              "llama_cpp_src": str(options.llama_cpp_src) if options.llama_cpp_src else None}
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("inputs") == inputs and out.exists():
            log(f"reusing {peer.name} {precision} conversion {out}")
            return Converted(out, saved.get("notes", [])), None
    log(f"converting for {peer.name} ({precision}) into {out} (log: {logf})")
    stamp.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logf.write_text("")
    t0 = time.perf_counter()
    try:
        notes = peer.convert(ckpt, precision, out, logf, options)
    except ConversionError as e:
        log(f"  {peer.name} {precision}: conversion failed: {e}")
        return None, f"conversion failed: {e}"
    stamp.write_text(json.dumps({"inputs": inputs, "notes": notes}, indent=2) + "\n")
    log(f"  converted in {time.perf_counter() - t0:.0f} s ({dir_bytes(out) / 2**20:,.0f} MiB)")
    return Converted(out, notes), None


# -- the comparison -----------------------------------------------------------------------------------------------

PEER_CLASSES = {
    "openvino": "zoomin.perf.peer_openvino:OpenVINOPeer",
    "ort-genai": "zoomin.perf.peer_ortgenai:OrtGenAIPeer",
    "llama.cpp": "zoomin.perf.peer_llamacpp:LlamaCppPeer",
}
ZOOMIN = "zoomin.perf.peers:ZoomInPeer"


def parse_peers(text: str) -> list[str]:
    """'openvino,ort-genai,llama.cpp' -> names, checked and deduplicated ('all' for every peer)."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return list(PEER_NAMES)
    bad = [n for n in names if n not in PEER_CLASSES]
    if bad:
        raise ValueError(f"unknown peer(s) {', '.join(bad)}; choose from {', '.join(PEER_NAMES)} (or all)")
    return list(dict.fromkeys(names))


@dataclass
class PeersConfig:
    checkpoint: Path
    engines: dict[str, Path]  # precision -> zoomin engine of that precision
    peers: dict[str, str]  # name -> "module:Class"
    image: str  # the reference image (job and vision encode)
    protocol: dict
    workload: Workload
    threads: int
    cache: Path  # conversions under cache/peers
    repeats: int = 3
    warmup: int = 1
    text: TextWork = TextWork()
    options: PeerOptions = PeerOptions()
    max_run_s: float | None = None


def run_peers(cfg: PeersConfig, gate: QuietGate | None = None, log: Log = print) -> dict:
    """Convert, then measure each precision's group (zoomin + every peer) interleaved; the results section."""
    gate = gate or QuietGate(0.0)
    folder = cfg.cache / "peers"
    folder.mkdir(parents=True, exist_ok=True)
    skipped, failed, notes = {}, {}, {}
    peers: dict[str, Peer] = {}
    for name, ref in cfg.peers.items():
        try:
            peer = make_peer(ref, cfg.workload)
            why = peer.missing()
        except Exception as e:  # a peer module that does not even import
            why = f"unusable: {_one_line(e)}"
        if why:
            skipped[name] = why
            log(f"peer {name}: skipped, {why}")
        else:
            peers[name] = peer
    zoomin = make_peer(ZOOMIN, cfg.workload)
    versions = {name: p.versions() for name, p in {"zoomin": zoomin, **peers}.items()}

    groups: dict[str, list[tuple[PeerSpec, Peer]]] = {}
    for precision, engine in cfg.engines.items():
        if precision not in PEER_PRECISIONS:
            continue

        def spec(label: str, ref: str, path: Path) -> PeerSpec:
            return PeerSpec(label, ref, precision, str(path), str(cfg.checkpoint), cfg.protocol, cfg.workload,
                            cfg.text, cfg.threads, str(folder / f"{label}.run.log"))

        group = [(spec(f"zoomin-{precision}", ZOOMIN, engine), zoomin)]
        for name, peer in peers.items():
            label = f"{name}-{precision}"
            converted, error = ensure_conversion(peer, cfg.checkpoint, precision, folder, cfg.options, log)
            if converted is None:
                failed[label] = error
                continue
            notes[label] = converted.notes
            group.append((spec(label, cfg.peers[name], converted.path), peer))
        groups[precision] = group

    configs: dict[str, dict] = {}
    for precision, group in groups.items():
        raw, run_failed = _measure_group(group, cfg, gate, log)
        failed |= run_failed
        for spec_, peer in group:
            if spec_.label not in raw:
                continue
            r = raw[spec_.label]
            runs = [run_metrics(t, j) for t, j in zip(r["text"], r["job"])]
            configs[spec_.label] = {
                "peer": peer.name, "runtime": peer.runtime, "precision": precision, "path": spec_.path,
                "size_bytes": dir_bytes(Path(spec_.path)), "peak_rss_bytes": r["peak_rss_bytes"],
                "load_s": r["load_s"], "notes": notes.get(spec_.label, []) + r["notes"],
                "metrics": {k: summarize([m[k] for m in runs]) for k in runs[0]}, "runs": runs,
                "job_tokens": r["job"][0]["tokens"] if r["job"] and r["job"][0] else None,
            }
    results = {
        "settings": {"checkpoint": str(cfg.checkpoint), "image": cfg.image, "threads": cfg.threads,
                     "repeats": cfg.repeats, "warmup": cfg.warmup, "text": asdict(cfg.text),
                     "workload": asdict(cfg.workload), "engines": {k: str(v) for k, v in cfg.engines.items()},
                     "optimum_pythonpath": cfg.options.optimum_pythonpath,
                     "llama_cpp_src": str(cfg.options.llama_cpp_src) if cfg.options.llama_cpp_src else None},
        "versions": versions,
        "skipped": skipped,
        "failed": failed,
        "configs": configs,
    }
    results["ratios"] = peer_ratios(configs)
    return results


def _measure_group(group: list[tuple[PeerSpec, Peer]], cfg: PeersConfig, gate: QuietGate, log: Log
                   ) -> tuple[dict[str, dict], dict[str, str]]:
    """All workers of one precision loaded at once; warm-up, then the repeats round-robin, order rotating."""
    raw: dict[str, dict] = {}
    failed: dict[str, str] = {}
    workers: dict[str, PeerWorker] = {}
    for spec, _ in group:
        log(f"loading {spec.label} ...")
        try:
            w = PeerWorker(spec, [cfg.image])
        except WorkerError as e:
            failed[spec.label] = f"load: {e}"
            log(f"  {spec.label}: {e}")
            continue
        workers[spec.label] = w
        raw[spec.label] = {"load_s": w.load_s, "notes": w.info["notes"], "text": [], "job": []}
        for note in w.info["notes"]:
            log(f"  {spec.label}: {note}")

    def each(action, rotate: int = 0) -> None:
        round_robin(workers, action, raw, failed, log, rotate)

    def warm(label: str, w: PeerWorker) -> None:
        for _ in range(cfg.warmup):
            w.text(timeout=cfg.max_run_s)
            w.job_run(cfg.image, timeout=cfg.max_run_s)

    def timed(label: str, w: PeerWorker) -> None:
        gate.wait()
        text = w.text()
        gate.wait()
        raw[label]["text"].append(text)
        raw[label]["job"].append(w.job_run(cfg.image))

    each(warm)
    for r in range(cfg.repeats):
        if not workers:
            break
        t0 = time.perf_counter()
        each(timed, rotate=r)
        log(f"  round {r + 1}/{cfg.repeats} ({', '.join(workers)}) took {time.perf_counter() - t0:.0f} s")

    def finish(label: str, w: PeerWorker) -> None:
        reply = w.finish()
        raw[label]["peak_rss_bytes"] = reply["peak_rss_bytes"]
        raw[label]["notes"] = list(dict.fromkeys(raw[label]["notes"] + reply["info"]["notes"]))

    each(finish)
    return raw, failed


def peer_ratios(configs: dict[str, dict]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{precision: {peer label: {quantity: zoomin / peer}}} on medians; None where either side lacks it.

    Time, memory and size: < 1 means zoomin is better; tok/s: > 1 means zoomin is better.
    """
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for label, c in configs.items():
        if c["peer"] == "zoomin":
            continue
        z = configs.get(f"zoomin-{c['precision']}")
        if z is None:
            continue
        row = {k: _ratio(z["metrics"][k]["median"], c["metrics"][k]["median"]) for k in METRICS}
        row |= {k: _ratio(float(z[k]), float(c[k])) for k in SIZE_METRICS}
        out.setdefault(c["precision"], {})[label] = row
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if np.isfinite(a) and np.isfinite(b) and b > 0 else None
