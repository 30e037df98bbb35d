"""Checkpoint → engine directory, one named function per build stage.

The engine is written into a hidden temporary sibling of `--out` and renamed into place only after every stage
(including the parity check) succeeded, so an interrupted or failed build never leaves half an engine behind.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.config import ModelConfig
from ..runtime.manifest import Manifest
from ..runtime.protocol import Protocol
from .checkpoint import BuildError, load_checkpoint, validate_checkpoint

PRECISIONS = ("fp32", "fp16", "int8", "int4", "fp8")

# Files copied verbatim from the checkpoint: the runtime tokenizes and preprocesses from these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json")


@dataclass
class BuildOptions:
    model: Path
    out: Path
    precision: str = "fp32"
    force: bool = False
    protocol: Path | None = None
    check_parity: bool = True
    # quantized precisions (int8, int4, fp8) only; see zoomin/build/quantize.py and calibration.py
    calib_images: Path | None = None  # default: the repository's calibration/ set
    calib_size: int | None = None  # default: every image of the set
    block_size: int = 32  # int4 weights per scale
    int4_algo: str = "gptq"


@dataclass
class BuildResult:
    engine_dir: Path
    manifest: Manifest
    stage_seconds: dict[str, float] = field(default_factory=dict)


Log = Callable[[str], None]


@contextmanager
def _stage(name: str, index: int, total: int, log: Log, times: dict[str, float]) -> Iterator[None]:
    log(f"[{index}/{total}] {name} ...")
    t0 = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t0
    log(f"[{index}/{total}] {name} done ({times[name]:.1f} s)")


def prepare_output(out: Path, force: bool) -> Path:
    """Refuse an existing --out without --force; return a fresh temporary sibling to build into."""
    if out.exists() and not force:
        raise BuildError(f"{out} already exists; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.building.", dir=out.parent))
    except OSError as e:
        raise BuildError(f"cannot write to {out.parent}: {e.strerror or e}") from None


def publish(tmp: Path, out: Path) -> None:
    """Atomically swap the finished engine into place (the old one, if any, is removed only now)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def copy_tokenizer(ckpt: Path, engine: Path) -> None:
    for name in TOKENIZER_FILES:
        if (ckpt / name).exists():
            shutil.copy2(ckpt / name, engine / name)


def write_embedding(model, engine: Path, precision: str) -> str:
    """The token embedding as a .npy the runtime memory-maps and gathers rows from.

    A gather needs no graph: numpy indexes a memory-mapped table in microseconds, only the touched rows are paged in
    (a 152k x 3584 table is 2 GB in fp32), and the decoder can take `inputs_embeds` that already hold the image
    features merged in.
    """
    import numpy as np

    weight = model.get_input_embeddings().weight.detach().float().numpy()
    dtype = np.float16 if precision == "fp16" else np.float32
    name = "embed_tokens.npy"
    np.save(engine / name, weight.astype(dtype))
    return name


def provenance(ckpt: Path) -> dict:
    import onnx
    import torch
    import transformers

    from .. import __version__

    cfg_bytes = (ckpt / "config.json").read_bytes()
    return {
        "source": str(ckpt.resolve()),
        "source_config_sha256": hashlib.sha256(cfg_bytes).hexdigest(),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "zoomin": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
        "host": f"{platform.system()} {platform.machine()}",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def build_engine(opts: BuildOptions, log: Log = print) -> BuildResult:
    """Run every stage; on any failure remove the temporary directory and raise BuildError."""
    from .calibration import decoder_feeds, load_calibration_set, record, vision_feeds
    from .drift import measure_drift
    from .export_decoder import check_decoder, export_decoder
    from .export_vision import check_vision, export_vision
    from .quantize import QUANT_PRECISIONS, QuantConfig, quantize_graph

    if opts.precision not in PRECISIONS:
        raise BuildError(f"unknown precision {opts.precision!r}; choose one of {', '.join(PRECISIONS)}")
    quant = QuantConfig(opts.precision, opts.block_size, opts.int4_algo) if opts.precision in QUANT_PRECISIONS else None
    ckpt = validate_checkpoint(opts.model)
    protocol = Protocol.load(opts.protocol) if opts.protocol else Protocol.default()
    calib = load_calibration_set(opts.calib_images, opts.calib_size) if quant else None
    tmp = prepare_output(opts.out, opts.force)
    # A quantized build exports the fp32 graphs into a scratch engine inside tmp (removed before publishing),
    # calibrates on them through the runtime, and writes only the quantized graphs into the engine.
    ref = tmp / ".fp32-reference" if quant else tmp
    graph_precision = "fp32" if quant else opts.precision
    opset = {"opset": quant.export_opset} if quant and quant.export_opset else {}
    times: dict[str, float] = {}
    total = 10 if quant else 7
    try:
        with _stage("load checkpoint", 1, total, log, times):
            model = load_checkpoint(ckpt)
            config = ModelConfig.from_checkpoint(ckpt)
        with _stage(f"export vision encoder ({graph_precision})", 2, total, log, times):
            ref.mkdir(exist_ok=True)
            export_vision(model, ref / "vision.onnx", precision=graph_precision, **opset)
        with _stage("write token embedding", 3, total, log, times):
            embed_name = write_embedding(model, ref, graph_precision)
            if quant:
                write_embedding(model, tmp, "fp16")
        with _stage(f"export language-model decoder ({graph_precision})", 4, total, log, times):
            export_decoder(model, ref / "decoder.onnx", precision=graph_precision, **opset)
        with _stage("copy tokenizer, preprocessing and protocol", 5, total, log, times):
            for d in {tmp, ref}:
                copy_tokenizer(ckpt, d)
                protocol.save(d / "protocol.json")
        parity: dict = {}
        with _stage("check parity against transformers" + (" (fp32 reference graphs)" if quant else ""), 6, total,
                    log, times):
            if opts.check_parity:
                parity["vision_max_rel_err"] = check_vision(model, ref / "vision.onnx")
                parity.update(check_decoder(model, ref / "decoder.onnx"))
        graphs = {"vision": "vision.onnx", "decoder": "decoder.onnx", "embed_tokens": embed_name,
                  "tokenizer": "tokenizer.json", "protocol": "protocol.json"}
        prov = provenance(ckpt)
        if quant:
            del model  # calibration and quantization work on the ONNX graphs
            with _stage(f"calibrate on {len(calib.images)} images through the ZoomIn protocol", 7, total, log,
                        times):
                Manifest(precision="fp32", config=config, files={}, graphs=graphs, provenance={}).write(ref)
                recording = record(ref, calib)
                tc = config.text
                feeds = {"decoder": decoder_feeds(recording, tc.num_hidden_layers, tc.num_key_value_heads,
                                                  tc.head_dim),
                         "vision": vision_feeds(recording, config.vision)}
            with _stage(f"quantize graphs ({opts.precision})", 8, total, log, times):
                for role in ("vision", "decoder"):
                    quantize_graph(role, ref / f"{role}.onnx", tmp / f"{role}.onnx", quant, feeds[role],
                                   tmp / ".quantize-scratch", vocab_size=config.text.vocab_size)
                shutil.rmtree(tmp / ".quantize-scratch", ignore_errors=True)
            with _stage("measure drift against the fp32 graphs", 9, total, log, times):
                drift = measure_drift(recording, tmp, ref, config, opts.precision)
                drift.calibration, drift.methods = calib.describe(), quant.describe()
                drift.write(tmp)
                log(f"drift: KL mean {drift.decoder.kl_mean:.3g}, top-1 agreement {drift.decoder.top1_agreement:.1%}, "
                    f"vision rel err max {drift.vision_rel_err_max:.3g}, compression x{drift.compression:.2f}")
            shutil.rmtree(ref)
            parity = {"reference": parity, "drift": drift.summary()}
            prov["calibration"] = calib.describe()
            prov["quantization"] = {"precision": quant.precision, "block_size": quant.block_size,
                                    "int4_algo": quant.int4_algo, **quant.describe()}
        with _stage("write manifest", total, total, log, times):
            manifest = Manifest(
                precision=opts.precision,
                config=config,
                files={},
                graphs=graphs,
                provenance=prov,
                parity=parity,
            )
            manifest.write(tmp)
        publish(tmp, opts.out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (BuildError, KeyboardInterrupt)):
            raise
        if isinstance(e, OSError):
            raise BuildError(f"cannot write engine to {opts.out}: {e.strerror or e}") from e
        raise
    return BuildResult(engine_dir=opts.out, manifest=manifest, stage_seconds=times)


def summary_lines(result: BuildResult) -> list[str]:
    m = result.manifest
    lines = [f"engine {result.engine_dir} ({m.precision}, {m.total_bytes / 2**20:.1f} MiB)"]
    for name, meta in sorted(m.files.items()):
        lines.append(f"  {name:<28} {meta['size'] / 2**20:9.2f} MiB")
    figures = {k: v for k, v in m.parity.items() if isinstance(v, float) and k != "seconds"}
    if figures:
        lines.append("parity vs transformers (max relative error): "
                     + ", ".join(f"{k} {v:.2e}" for k, v in figures.items()))
    return lines
