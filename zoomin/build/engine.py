"""Checkpoint → engine directory, one named function per build stage.

The engine is written into a hidden temporary sibling of `--out` and renamed into place only after every stage
(including the parity check) succeeded, so an interrupted or failed build never leaves half an engine behind.

The checkpoint is never loaded whole: weights are read block by block from the safetensors files in the dtype
they are stored in (zoomin.build.weights), the graphs are exported one layer / block at a time and stitched, and a
quantized build calibrates and quantizes each piece as it is exported (zoomin.build.streaming). Peak memory is
then about one layer's weights plus the calibration activations, whatever the depth; every stage reports its
time and peak resident memory.
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
from dataclasses import dataclass, field, replace
from pathlib import Path


from ..runtime.config import ModelConfig
from ..runtime.embedding import load_table
from ..runtime.manifest import Manifest
from ..runtime.protocol import Protocol
from ..runtime.rss import peak_rss, reset_peak_rss
from .chat_check import write_chat_format
from .checkpoint import BuildError, load_checkpoint, validate_checkpoint
from .embedding_table import engine_table, write_embedding

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
    lm_head_bits: int = 4  # int4: the lm_head's (and a tied embedding table's) bits


@dataclass
class BuildResult:
    engine_dir: Path
    manifest: Manifest
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_peak_rss: dict[str, int] = field(default_factory=dict)  # bytes; see peak_rss


Log = Callable[[str], None]


@dataclass
class Stages:
    """Runs the build's stages in order, logging each with its time and peak RSS."""

    total: int
    log: Log
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    index: int = 0

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.index += 1
        prefix = f"[{self.index}/{self.total}]"
        self.log(f"{prefix} {name} ...")
        reset_peak_rss()
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0
        self.peak_rss[name] = peak_rss()
        self.log(f"{prefix} {name} done ({self.seconds[name]:.1f} s, peak RSS {self.peak_rss[name] / 2**30:.2f} GiB)")


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


def make_world_readable(root: Path) -> None:
    """Directories 0755, files 0644: the engine is data for whoever runs it (mkdtemp creates 0700)."""
    for d, _, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)


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


# The decoder's parity check against transformers loads the whole model in float32 next to the build up to this
# size; above it (what streaming is for) each layer is checked against its transformers layer instead.
PARITY_MAX_BYTES = 2 << 30


def whole_model_parity(parts) -> bool:
    return parts.float32_bytes() <= PARITY_MAX_BYTES


def check_parity(parts, ckpt: Path, vision: Path, decoder: Path, layers=None) -> dict:
    """Relative errors of the fp32/fp16 graphs against transformers in float32.

    Vision: the whole tower against transformers' tower (export_vision.vision_parity; the tower is 2.7 GB in
    float32 at every Qwen2.5-VL size). Decoder: the whole model (export_decoder.check_decoder: prefill over image
    positions and KV-cache decode steps) when `whole_model_parity`, else the per-layer figures that `layers`
    (layer_parity.DecoderLayerParity) collected while the decoder was exported.
    """
    from .export_decoder import check_decoder
    from .export_vision import vision_parity
    from .weights import ModelParts

    out = {"vision_max_rel_err": vision_parity(parts.vision_tower(), vision).max_rel_err}
    if layers is not None:
        out.update(layers.summary())
    else:
        model = parts.model if isinstance(parts, ModelParts) else load_checkpoint(ckpt)
        out.update(check_decoder(model, decoder))
    return out


def build_engine(opts: BuildOptions, log: Log = print) -> BuildResult:
    """Run every stage; on any failure remove the temporary directory and raise BuildError."""
    from .quantize import QUANT_PRECISIONS, QuantConfig

    if opts.precision not in PRECISIONS:
        raise BuildError(f"unknown precision {opts.precision!r}; choose one of {', '.join(PRECISIONS)}")
    quant = QuantConfig(opts.precision, opts.block_size, opts.int4_algo, opts.lm_head_bits) \
        if opts.precision in QUANT_PRECISIONS else None
    ckpt = validate_checkpoint(opts.model)
    protocol = Protocol.load(opts.protocol) if opts.protocol else Protocol.default()
    if quant:
        from .calibration import load_calibration_set

        calib = load_calibration_set(opts.calib_images, opts.calib_size)
    tmp = prepare_output(opts.out, opts.force)
    stages = Stages(10 if quant else 7, log)
    try:
        with stages("open checkpoint (weights are read block by block)"):
            from .weights import open_parts

            parts = open_parts(ckpt)
            from .export_decoder import graph_for

            config = replace(ModelConfig.from_checkpoint(ckpt), decoder_graph=graph_for(opts.precision))
        prov = provenance(ckpt)
        if quant:
            parity, (table_file, table) = _quantized_stages(opts, quant, calib, parts, ckpt, config, protocol, tmp,
                                                            stages)
            prov["calibration"] = calib.describe()
            prov["quantization"] = {"precision": quant.precision, "block_size": quant.block_size,
                                    "int4_algo": quant.int4_algo, "lm_head_bits": quant.lm_head_bits,
                                    **quant.describe(), "embed_tokens": table.describe()}
        else:
            parity, (table_file, table) = _float_stages(opts, parts, ckpt, protocol, tmp, stages)
        graphs = {"vision": "vision", "decoder": "decoder.onnx", "embed_tokens": table_file,
                  "tokenizer": "tokenizer.json", "protocol": "protocol.json", "chat": "chat.json"}
        with stages("write manifest"):
            make_world_readable(tmp)
            manifest = Manifest(precision=opts.precision, config=config, files={}, graphs=graphs, provenance=prov,
                                parity=parity, embedding=table)
            manifest.write(tmp)
            os.chmod(tmp / "manifest.json", 0o644)
        publish(tmp, opts.out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (BuildError, KeyboardInterrupt)):
            raise
        if isinstance(e, OSError):
            raise BuildError(f"cannot write engine to {opts.out}: {e.strerror or e}") from e
        raise
    return BuildResult(engine_dir=opts.out, manifest=manifest, stage_seconds=stages.seconds,
                       stage_peak_rss=stages.peak_rss)


def _float_stages(opts: BuildOptions, parts, ckpt: Path, protocol: Protocol, tmp: Path, stages: Stages):
    from . import export_decoder as ed
    from . import export_vision as ev
    from .layer_parity import DecoderLayerParity

    graph = ed.graph_for(opts.precision)
    layers = DecoderLayerParity(parts, graph) if opts.check_parity and not whole_model_parity(parts) else None
    with stages(f"export vision encoder ({opts.precision}, block by block)"):
        ev.export_vision(parts, tmp / "vision", precision=opts.precision)
    with stages("write token embedding"):
        table = engine_table(opts.precision, parts, tmp, "decoder.onnx")
    with stages(f"export language-model decoder ({opts.precision}, layer by layer)"):
        ed.export_decoder(parts, tmp / "decoder.onnx", precision=opts.precision, graph=graph, on_piece=layers)
    with stages("copy tokenizer, preprocessing and protocol; verify the chat template"):
        copy_tokenizer(ckpt, tmp)
        protocol.save(tmp / "protocol.json")
        stages.log(f"chat template: {write_chat_format(ckpt, protocol, tmp).source} (verified)")
    with stages("check parity against transformers"):
        parity = check_parity(parts, ckpt, tmp / "vision", tmp / "decoder.onnx", layers) if opts.check_parity \
            else {}
    return parity, table


def _quantized_stages(opts: BuildOptions, quant, calib, parts, ckpt: Path, config: ModelConfig, protocol: Protocol,
                      tmp: Path, stages: Stages):
    """Calibrate and quantize while exporting (zoomin.build.streaming); scratch files live in tmp/.scratch.
    Returns the parity block and the engine's (table file, TableSpec)."""
    from .calibration import PlaceholderVision, ReplayVision, record, stand_in_engine
    from .drift import measure_drift
    from .layer_parity import DecoderLayerParity
    from .streaming import quantize_decoder, quantize_vision

    scratch = tmp / ".scratch"
    scratch.mkdir()
    # For the parity check (check_parity) the fp32 vision pieces are kept and stitched into a reference graph, and
    # so are the decoder's when the model is small enough for a whole-model check; else its layers are checked one
    # by one as they are exported.
    reference = scratch / "fp32" if opts.check_parity else None
    whole = whole_model_parity(parts)
    layers = DecoderLayerParity(parts, config.decoder_graph) if opts.check_parity and not whole else None
    with stages("write token embedding (fp32, for calibration)"):
        (scratch / "table").mkdir()
        table = scratch / "table" / write_embedding(parts, scratch / "table", "fp32")
    with stages("copy tokenizer, preprocessing and protocol; verify the chat template"):
        copy_tokenizer(ckpt, tmp)
        protocol.save(tmp / "protocol.json")
        chat_format = write_chat_format(ckpt, protocol, tmp)
        stages.log(f"chat template: {chat_format.source} (verified)")

    def stand_in(vision):
        return stand_in_engine(config, protocol, tmp / "tokenizer.json", table, vision, chat_format)

    with stages(f"lay out the ZoomIn conversations of {len(calib.images)} calibration images"):
        layout = record(stand_in(PlaceholderVision(config.vision)), calib)
    with stages(f"vision encoder: export, calibrate and quantize ({opts.precision}) block by block"):
        vision_q = quantize_vision(parts, tmp / "vision", layout.vision, quant, scratch,
                                   reference=reference / "vision" if reference else None)
        rec = record(stand_in(ReplayVision(vision_q.features)), calib)
    with stages(f"language-model decoder: export, calibrate and quantize ({opts.precision}) layer by layer"):
        decoder_q = quantize_decoder(parts, tmp / "decoder.onnx", rec, quant, scratch,
                                     reference=reference / "decoder" if reference and whole else None, check=layers)
    with stages(f"token embedding table ({opts.precision})"):
        engine_tab = engine_table(opts.precision, parts, tmp, "decoder.onnx")
        stages.log(f"  {engine_tab[1].describe()}")
    with stages("check parity against transformers (fp32 reference graphs)"):
        parity: dict = {}
        if reference is not None:
            from .export_decoder import io_names
            from .export_vision import stitch_stages
            from .stitch import stitch

            stitch_stages(vision_q.reference_pieces, reference / "vision")
            if whole:
                inputs, outputs = io_names(config.text.num_hidden_layers, config.decoder_graph)
                stitch(decoder_q.reference_pieces, reference / "decoder.onnx", inputs=inputs, outputs=outputs)
            parity = check_parity(parts, ckpt, reference / "vision", reference / "decoder.onnx", layers)
    with stages("measure drift against the fp32 pieces' outputs"):
        fp32_sizes = {"vision": vision_q.fp32_bytes, "decoder": decoder_q.fp32_bytes,
                      "embed_tokens": table.stat().st_size}
        shutil.rmtree(scratch)
        t = config.text
        embed = load_table(tmp, *engine_tab, (t.vocab_size, t.hidden_size))
        drift = measure_drift(rec, tmp, fp32_sizes, config, opts.precision, table=embed)
        del embed
        drift.calibration = calib.describe()
        drift.methods = {**quant.describe(), "embed_tokens": engine_tab[1].describe()}
        drift.write(tmp)
        stages.log(f"drift: KL mean {drift.decoder.kl_mean:.3g}, top-1 agreement {drift.decoder.top1_agreement:.1%}, "
                   f"vision rel err max {drift.vision_rel_err_max:.3g}, embedding rel err max "
                   f"{drift.embed_rel_err_max:.3g}, compression x{drift.compression:.2f}")
    return {"reference": parity, "drift": drift.summary()}, engine_tab


def summary_lines(result: BuildResult) -> list[str]:
    m = result.manifest
    lines = [f"engine {result.engine_dir} ({m.precision}, {m.total_bytes / 2**20:.1f} MiB)"]
    for name, meta in sorted(m.files.items()):
        lines.append(f"  {name:<28} {meta['size'] / 2**20:9.2f} MiB")
    figures = {k: v for k, v in m.parity.items() if isinstance(v, float) and k != "seconds"}
    if figures:
        lines.append("parity vs transformers (max relative error): "
                     + ", ".join(f"{k} {v:.2e}" for k, v in figures.items()))
    lines.append("stages (time, peak RSS):")
    for name, seconds in result.stage_seconds.items():
        lines.append(f"  {seconds:8.1f} s  {result.stage_peak_rss.get(name, 0) / 2**30:6.2f} GiB  {name}")
    return lines
