"""One perf run: inputs (checkpoint, engines, photos) cached under the output folder, every configuration
measured on the same machine in one go, and the numbers combined into one results dict (ratios, ablation, floor,
targets) that `report.py` writes out.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.manifest import Manifest
from . import machine
from .bench import TIME_METRICS, Job, QuietGate, measure_all, run_metrics, summarize
from .floor import decode_floor, engine_decode_weight_bytes, mean_decode_context
from .peers import PEER_CLASSES, PeerOptions
from .workload import Workload

BASELINE = "transformers-fp32"
# Tokens both backends must agree on (prefill/reuse counters differ by design: the baseline recomputes).
SAME_WORK = ("stage1_prompt", "stage1_generated", "stage2_prompt", "stage2_generated", "crops")
# Targets from the issue, reported against (never asserted).
TARGET_SPEEDUP_INT4 = 6.0
TARGET_REUSE_RATIO = 0.3
TARGET_FLOOR_FRACTION = 0.7

Log = Callable[[str], None]


@dataclass(frozen=True)
class Preset:
    name: str
    shape: str
    text_layers: int | None  # None: the shape's real depth
    vision_depth: int | None
    repeats: int
    warmup: int
    workload: Workload
    precisions: tuple[str, ...]
    max_run_s: float | None = None
    photos: tuple[str, ...] = ("chelsea", "astronaut", "hubble_deep_field")


PRESETS = {
    # 3b widths (the real 1.2 GB lm_head) with 2 text layers and 2 vision blocks: < 4 GB peak per configuration.
    # fp16/fp8 are GPU formats that ORT's CPU provider only runs through casts to fp32 (slower than fp32 there):
    # add them with --precision.
    "quick": Preset("quick", "3b", 2, 2, repeats=3, warmup=1, workload=Workload(96, 32, 2),
                    precisions=("fp32", "int8", "int4"), max_run_s=120),
    "3b": Preset("3b", "3b", None, None, repeats=3, warmup=1, workload=Workload(160, 64, 2),
                 precisions=("fp32", "fp16", "int8", "int4", "fp8")),
    "7b": Preset("7b", "7b", None, None, repeats=3, warmup=1, workload=Workload(160, 64, 2),
                 precisions=("fp32", "fp16", "int8", "int4", "fp8")),
}


@dataclass
class SuiteConfig:
    checkpoint: Path
    precisions: list[str]
    images: list[Path]
    workload: Workload
    repeats: int
    warmup: int
    threads: int
    cache: Path  # engines are built (and reused) under cache/engines
    engines: list[Path] = field(default_factory=list)  # prebuilt engines to measure instead of building
    interleave: bool = False  # all configurations loaded at once, repeats round-robin (needs their memory)
    max_run_s: float | None = None  # drop a configuration whose warm-up run takes longer
    quiet_wait_s: float = 0.0  # total time timed runs may wait for background load to go away
    command: str = ""
    preset: str | None = None
    peers: list[str] = field(default_factory=list)  # other runtimes to measure side by side (peers.PEER_NAMES)
    peers_only: bool = False  # only the side-by-side comparison: no transformers baseline, no per-stage profile
    peer_options: PeerOptions = field(default_factory=PeerOptions)


# -- inputs ------------------------------------------------------------------------------------------------------

def write_photos(names: tuple[str, ...], folder: Path) -> list[Path]:
    """scikit-image's bundled photos (no download) as JPEG files, so the decode stage decodes a real JPEG."""
    import cv2

    try:
        from skimage import data
    except ImportError as e:
        raise RuntimeError(f"the default photos come from scikit-image (the dev extra); pass --image instead ({e})")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        path = folder / f"{name}.jpg"
        if not path.exists():
            rgb = getattr(data, name)()
            if rgb.ndim == 2:
                rgb = np.stack([rgb] * 3, axis=-1)
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise RuntimeError(f"cannot encode photo {name}")
            path.write_bytes(buf.tobytes())
        out.append(path)
    return out


def preset_checkpoint(preset: Preset, folder: Path, log: Log) -> Path:
    """The preset's random checkpoint, written once and reused while its recorded shape matches."""
    from ..build.random_checkpoint import SHAPES, write_random_checkpoint

    spec = SHAPES[preset.shape]
    layers, depth = preset.text_layers or spec.layers, preset.vision_depth or spec.vision_depth
    path = folder / f"{preset.shape}-l{layers}-v{depth}"
    want = {"shape": preset.shape, "seed": 0, "text_layers": layers, "vision_depth": depth}
    meta = path / "zoomin_random.json"
    if not (meta.is_file() and json.loads(meta.read_text()) == want):
        log(f"writing random {preset.shape} checkpoint ({layers} text layers, {depth} vision blocks) to {path}")
        write_random_checkpoint(path, preset.shape, text_layers=layers, vision_depth=depth, seed=0)
    return path


def checkpoint_fingerprint(ckpt: Path) -> str:
    """config.json's bytes and each weight file's name, size and mtime: cheap, and changes when weights do."""
    h = hashlib.sha256((ckpt / "config.json").read_bytes())
    for f in sorted(ckpt.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def build_code_fingerprint() -> str:
    """The build package's sources: a changed exporter must not be measured through a stale engine."""
    h = hashlib.sha256()
    for f in sorted((Path(__file__).parent.parent / "build").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def ensure_engine(ckpt: Path, precision: str, folder: Path, log: Log) -> tuple[Path | None, str | None]:
    """(engine dir, None), reusing a cached engine whose inputs match; (None, reason) when it cannot be built."""
    from ..runtime.manifest import EngineError

    engine = folder / f"{ckpt.name}-{precision}"
    stamp = folder / f"{engine.name}.inputs.json"
    inputs = {"checkpoint": str(ckpt.resolve()), "checkpoint_fingerprint": checkpoint_fingerprint(ckpt),
              "precision": precision, "build_code": build_code_fingerprint()}
    if stamp.is_file() and json.loads(stamp.read_text()) == inputs:
        try:
            Manifest.load(engine)
            log(f"reusing engine {engine}")
            return engine, None
        except EngineError:
            pass
    log(f"building {precision} engine {engine} (log: {engine}.build.log)")
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stamp.unlink(missing_ok=True)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            error = pool.submit(_build, str(ckpt), precision, str(engine)).result()
    except BrokenProcessPool:
        error = "the build process died (killed for memory?)"
    if error:
        log(f"  {precision}: not built: {error}")
        return None, error
    stamp.write_text(json.dumps(inputs, indent=2) + "\n")
    log(f"  built in {time.perf_counter() - t0:.0f} s")
    return engine, None


def _build(ckpt: str, precision: str, out: str) -> str | None:
    """Runs in a worker process; returns the reason a build failed (a precision the build does not offer yet)."""
    import os

    from ..build.engine import BuildOptions, build_engine

    with open(f"{out}.build.log", "w") as logf:
        for fd in (1, 2):  # the exporters' own chatter (torch.onnx, warnings) goes to the log, not the console
            os.dup2(logf.fileno(), fd)
        try:
            build_engine(BuildOptions(model=Path(ckpt), out=Path(out), precision=precision, force=True),
                         log=lambda s: print(s, file=logf, flush=True))
        except Exception as e:  # BuildError, or an exporter failing on this precision: report it, do not crash
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"FAILED: {type(e).__name__}: {first}", file=logf)
            return f"{type(e).__name__}: {first}"
    return None


# -- the run ---------------------------------------------------------------------------------------------------

def reference_image(images: list[Path]) -> Path:
    """The middle image by pixel count: the one the per-stage tables, the ablation and the floor use."""
    from ..runtime.image_io import load_image

    by_area = sorted(images, key=lambda p: int(np.prod(load_image(p).shape[:2])))
    return by_area[(len(by_area) - 1) // 2]


def run_suite(cfg: SuiteConfig, log: Log = print) -> dict:
    t_start = time.perf_counter()
    desc = machine.describe()
    log(f"machine: {desc['cpu']}, {desc['cores_usable']} cores, {desc['memory_bytes'] / 2**30:.1f} GiB, "
        f"load average {desc['load_average_at_start']}")
    bandwidth = machine.measure_bandwidth(cfg.threads)
    log(f"memory bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (measured again at the end)")
    ref = reference_image(cfg.images)
    images = [str(p) for p in cfg.images]

    def job(label: str, backend: str, path: Path, ablation: bool = False) -> Job:
        return Job(label, backend, str(path), cfg.workload, cfg.threads, ablation)

    jobs, failed = ([] if cfg.peers_only else [job(BASELINE, "transformers", cfg.checkpoint)]), {}
    config_sha = hashlib.sha256((cfg.checkpoint / "config.json").read_bytes()).hexdigest()
    for engine in cfg.engines:
        manifest = Manifest.load(engine)
        label = f"zoomin-{manifest.precision}"
        label = label if label not in (j.label for j in jobs) else f"{label}-{engine.name}"
        if manifest.provenance.get("source_config_sha256") != config_sha:
            failed[label] = f"{engine} was built from another checkpoint than {cfg.checkpoint}"
        else:
            jobs.append(job(label, "zoomin", engine, ablation=True))
    for precision in cfg.precisions:
        engine, error = ensure_engine(cfg.checkpoint, precision, cfg.cache / "engines", log)
        if engine is None:
            failed[f"zoomin-{precision}"] = f"build: {error}"
        else:
            jobs.append(job(f"zoomin-{precision}", "zoomin", engine, ablation=True))

    interleave = cfg.interleave
    log(f"measuring {len(jobs)} configurations, {'interleaved' if interleave else 'one after another'}: "
        f"{len(images)} images x {cfg.repeats} repeats after {cfg.warmup} warm-up")
    gate = QuietGate(cfg.quiet_wait_s, log=log)
    raw, run_failed = ({}, {}) if cfg.peers_only else measure_all(
        jobs, images, str(ref), repeats=cfg.repeats, warmup=cfg.warmup, interleave=interleave,
        max_run_s=cfg.max_run_s, quiet=gate, log=log)
    failed |= run_failed
    configs = {}
    for j in jobs:
        if j.label not in raw:
            continue
        configs[j.label] = summarize_job(raw[j.label])
        if j.backend == "zoomin":
            configs[j.label]["info"]["decode_weight_bytes"] = engine_decode_weight_bytes(j.path)
        total = configs[j.label]["images"][str(ref)]["metrics"]["total"]["median"]
        log(f"{j.label}: end to end on {ref.name} {total:.0f} ms")
    peers = run_peer_comparison(cfg, jobs, ref, gate, log) if cfg.peers else None

    # Background load can only lower a bandwidth measurement: the machine's figure is the better of two.
    at_end = machine.measure_bandwidth(cfg.threads)
    log(f"memory bandwidth at the end: {at_end['bytes_per_s'] / 1e9:.1f} GB/s")
    bandwidth = max(bandwidth, at_end, key=lambda b: b["bytes_per_s"]) | {
        "start_bytes_per_s": bandwidth["bytes_per_s"], "end_bytes_per_s": at_end["bytes_per_s"]}
    results = {
        "machine": desc | {"load_average_at_end": machine.load_average()},
        "bandwidth": bandwidth,
        "command": cfg.command,
        "preset": cfg.preset,
        "settings": {"checkpoint": str(cfg.checkpoint), "checkpoint_config": _checkpoint_shape(cfg.checkpoint),
                     "precisions": cfg.precisions, "engines": [str(e) for e in cfg.engines], "repeats": cfg.repeats,
                     "warmup": cfg.warmup, "threads": cfg.threads, "interleaved": interleave,
                     "max_run_s": cfg.max_run_s, "quiet_wait_budget_s": cfg.quiet_wait_s,
                     "quiet_waited_s": gate.waited_s, "workload": asdict(cfg.workload), "reference_image": str(ref),
                     "peers": cfg.peers, "peers_only": cfg.peers_only},
        "images": images,
        "baseline": BASELINE,
        "configs": configs,
        "failed": failed,
    }
    results["token_check"] = token_check(results)
    results["ratios"] = ratios(results)
    results["ablation"] = ablation(results)
    results["floor"] = floors(results)
    results["targets"] = targets(results)
    if peers is not None:
        results["peers"] = peers
    results["wall_s"] = time.perf_counter() - t_start
    return results


def run_peer_comparison(cfg: SuiteConfig, jobs: list[Job], ref: Path, gate: QuietGate, log: Log) -> dict:
    """The side-by-side section: every peer against the zoomin engine of each precision, same run, same gate."""
    from ..runtime.protocol import Protocol
    from .peers import PeersConfig, run_peers

    engines: dict[str, Path] = {}
    for j in jobs:
        if j.backend == "zoomin":
            engines.setdefault(Manifest.load(j.path).precision, Path(j.path))
    if not engines:
        log("peers: no zoomin engine to compare with")
    first = next(iter(engines.values()), None)
    protocol = (Protocol.load(first / Manifest.load(first).graphs["protocol"]) if first else Protocol.default())
    log(f"side by side with {', '.join(cfg.peers)} at {', '.join(engines) or 'no precision'}: "
        f"{cfg.repeats} repeats after {cfg.warmup} warm-up, interleaved per precision")
    return run_peers(PeersConfig(
        checkpoint=cfg.checkpoint, engines=engines, peers={n: PEER_CLASSES[n] for n in cfg.peers}, image=str(ref),
        protocol=protocol.to_dict(), workload=cfg.workload, threads=cfg.threads, cache=cfg.cache,
        repeats=cfg.repeats, warmup=cfg.warmup, options=cfg.peer_options, max_run_s=cfg.max_run_s), gate, log)


def _checkpoint_shape(ckpt: Path) -> dict:
    from ..runtime.config import ModelConfig

    c = ModelConfig.from_checkpoint(ckpt)
    return {"hidden": c.text.hidden_size, "text_layers": c.text.num_hidden_layers, "vocab": c.text.vocab_size,
            "vision_hidden": c.vision.hidden_size, "vision_depth": c.vision.depth}


def summarize_job(raw: dict) -> dict:
    """Per image: median/spread of every metric over the repeats, the token counts, the sizes."""

    def per_image(runs_by_image: dict) -> dict:
        out = {}
        for path, runs in runs_by_image.items():
            metrics = [run_metrics(r["timings_ms"], r["tokens"]) | {"background_cores": r["background_cores"]}
                       for r in runs]
            tokens = runs[0]["tokens"]
            if any(r["tokens"] != tokens for r in runs):
                raise RuntimeError(f"{raw['label']}: token counts changed between repeats on {path}")
            out[path] = {"metrics": {k: summarize([m[k] for m in metrics]) for k in metrics[0]
                                     if k != "background_cores"},
                         "runs": metrics, "tokens": tokens, "image_size": runs[0]["image_size"],
                         "model_size": runs[0]["model_size"]}
        return out

    out = {k: raw[k] for k in ("backend", "path", "threads", "load_s", "peak_rss_bytes", "info")}
    background = [r["background_cores"] for runs in raw["images"].values() for r in runs
                  if r["background_cores"] is not None]
    # cores other processes kept busy while this configuration ran (0 on a quiet machine)
    out["background_cores"] = summarize(background) if background else None
    out["images"] = per_image(raw["images"])
    if "no_reuse" in raw:
        out["no_reuse"] = per_image(raw["no_reuse"])
    return out


def token_check(results: dict) -> dict:
    """Every configuration did the same work as the baseline: same prompts, answers and crops per image."""
    base = results["configs"].get(BASELINE)
    mismatches = []
    if base is not None:
        for label, c in results["configs"].items():
            for path, img in c["images"].items():
                for key in SAME_WORK:
                    if img["tokens"][key] != base["images"][path]["tokens"][key]:
                        mismatches.append(f"{label} {Path(path).name} {key}: {img['tokens'][key]} vs "
                                          f"{base['images'][path]['tokens'][key]}")
    return {"keys": list(SAME_WORK), "equal": base is not None and not mismatches, "mismatches": mismatches}


def ratios(results: dict) -> dict:
    """zoomin / baseline, per configuration, image and time metric (median over median; < 1 is faster)."""
    base = results["configs"].get(BASELINE)
    out: dict = {}
    if base is None:
        return out
    for label, c in results["configs"].items():
        if label == BASELINE:
            continue
        out[label] = {}
        for path, img in c["images"].items():
            b = base["images"][path]["metrics"]
            out[label][path] = {k: _ratio(img["metrics"][k]["median"], b[k]["median"]) for k in TIME_METRICS}
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 and np.isfinite(a) and np.isfinite(b) else None


def ablation(results: dict) -> dict:
    """Stage-2 cost on the reference image with KV reuse on and off (same engine, same work)."""
    ref = results["settings"]["reference_image"]
    out = {}
    for label, c in results["configs"].items():
        if "no_reuse" not in c:
            continue
        on, off = c["images"][ref], c["no_reuse"][ref]
        out[label] = {
            "image": ref,
            "stage2_prefill_tokens": {"reuse": on["tokens"]["stage2_prefill"],
                                      "no_reuse": off["tokens"]["stage2_prefill"]},
            **{k: {"reuse": on["metrics"][k]["median"], "no_reuse": off["metrics"][k]["median"],
                   "ratio": _ratio(on["metrics"][k]["median"], off["metrics"][k]["median"])}
               for k in ("stage2_prefill", "stage2", "total")},
        }
    return out


def floors(results: dict) -> dict:
    """Per configuration: bytes per decoded token, the bandwidth floor and the fraction of it achieved."""
    ref = results["settings"]["reference_image"]
    bw = results["bandwidth"]["bytes_per_s"]
    out = {}
    for label, c in results["configs"].items():
        img = c["images"][ref]
        info = c["info"]
        out[label] = decode_floor(info["decode_weight_bytes"], info["kv_bytes_per_position"],
                                  mean_decode_context(img["tokens"]), bw,
                                  img["metrics"]["decode_ms_per_token"]["median"])
    return out


def targets(results: dict) -> dict:
    """The issue's three targets, each with its measured value and whether it is met (None: not measurable)."""
    ref = results["settings"]["reference_image"]
    base = results["configs"].get(BASELINE)
    int4 = results["configs"].get("zoomin-int4")
    speedup = (base["images"][ref]["metrics"]["total"]["median"] / int4["images"][ref]["metrics"]["total"]["median"]
               if base and int4 else None)
    reuse = {label: a["stage2"]["ratio"] for label, a in results["ablation"].items()}
    reuse_prefill = {label: a["stage2_prefill"]["ratio"] for label, a in results["ablation"].items()}
    floor = {label: f["fraction_of_floor"] for label, f in results["floor"].items() if label != BASELINE}

    def met(value, ok):
        return None if value is None else bool(ok(value))

    return {
        "int4_speedup_vs_baseline": {"target": f">= {TARGET_SPEEDUP_INT4}x", "value": speedup,
                                     "met": met(speedup, lambda v: v >= TARGET_SPEEDUP_INT4)},
        "stage2_reuse_ratio": {"target": f"<= {TARGET_REUSE_RATIO}", "value": reuse,
                               "met": {k: met(v, lambda v: v <= TARGET_REUSE_RATIO) for k, v in reuse.items()},
                               "stage2_prefill_only": reuse_prefill},
        "decode_floor_fraction": {"target": f">= {TARGET_FLOOR_FRACTION}", "value": floor,
                                  "met": {k: met(v, lambda v: v >= TARGET_FLOOR_FRACTION) for k, v in floor.items()}},
    }

