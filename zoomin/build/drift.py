"""How far a quantized engine moved from the fp32 graphs of the same checkpoint, on the calibration prompts.

The recorded fp32 run (zoomin.build.calibration.record) is replayed on the quantized graphs: the decoder calls in
order, on the quantized decoder's own KV cache (so quantization error carried through the cache counts), with the
same inputs (fp32 image features, the tokens the fp32 run produced, or in a streamed build the stand-in answer
of calibration.ScriptedDecoder: teacher forcing keeps both runs on one conversation); the vision calls on the
quantized vision graph. Figures:

- next-token distribution: KL(p_fp32 || p_quant) per logit row (query 2's last prompt token and each decode
  step: the rows deployment samples from), mean and max; top-1 agreement; relative logit error
  max|dl| / max|l_fp32| per row, mean and max;
- vision: relative embedding error ||de|| / ||e_fp32|| per call, mean and max;
- token embedding table: with the engine's (quantized) table given, the replay feeds its rows in place of the
  recorded fp32 ones (image-feature rows stay), so the table's error counts in the logit figures too; its own
  relative row error ||de|| / ||e_fp32|| over the rows looked up, mean and max;
- sizes: bytes per engine component and the compression ratio against the fp32 graphs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.config import ModelConfig
from ..runtime.decoder import Decoder
from ..runtime.embedding import EmbeddingTable
from ..runtime.vision import VisionEncoder
from .calibration import DecoderCall, Recording

DRIFT_FILE = "drift.json"

# Files (or directories: all their files) of each engine component whose bytes the size report adds up.
COMPONENTS = {"vision": ("vision",), "decoder": ("decoder.onnx", "decoder.onnx.data"),
              "embed_tokens": ("embed_tokens.npy", "embed_tokens.onnx", "embed_tokens.onnx.data")}


@dataclass
class LogitDrift:
    rows: int
    kl_mean: float
    kl_max: float
    top1_agreement: float
    logit_rel_err_mean: float
    logit_rel_err_max: float


@dataclass
class DriftReport:
    precision: str
    decoder: LogitDrift  # all rows
    prefill: LogitDrift  # rows from prefill calls (last prompt token of each query)
    decode: LogitDrift  # rows from single-token decode steps
    vision_rel_err_mean: float
    vision_rel_err_max: float
    vision_calls: int
    embed_rel_err_mean: float  # 0 when the replay used the recorded fp32 rows (no table given)
    embed_rel_err_max: float
    sizes: dict[str, int]  # component -> bytes in the quantized engine
    reference_sizes: dict[str, int]  # component -> bytes of the fp32 graphs
    calibration: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)  # component -> how it was quantized
    seconds: float = 0.0

    @property
    def compression(self) -> float:
        return sum(self.reference_sizes.values()) / sum(self.sizes.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression"] = self.compression
        return d

    def write(self, engine_dir: Path) -> Path:
        path = Path(engine_dir) / DRIFT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    def summary(self) -> dict[str, float]:
        """The headline figures as flat floats (they go into the engine manifest's parity block)."""
        d = self.decoder
        return {"drift_kl_mean": d.kl_mean, "drift_kl_max": d.kl_max, "drift_top1_agreement": d.top1_agreement,
                "drift_logit_rel_err_max": d.logit_rel_err_max, "drift_vision_rel_err_max": self.vision_rel_err_max,
                "drift_embed_rel_err_max": self.embed_rel_err_max, "compression": self.compression}


def format_report(d: dict) -> list[str]:
    """Printable lines for a drift.json dict."""
    lines = [f"drift of {d['precision']} against the fp32 graphs ({d['calibration'].get('images', '?')} calibration "
             f"images, sha256 {str(d['calibration'].get('sha256', '?'))[:12]}):"]
    for name in ("decoder", "prefill", "decode"):
        g = d[name]
        lines.append(f"  {name:<8} {g['rows']:4d} rows  KL mean {g['kl_mean']:.3g} max {g['kl_max']:.3g}  top-1 "
                     f"agreement {g['top1_agreement']:.1%}  rel logit err mean {g['logit_rel_err_mean']:.3g} "
                     f"max {g['logit_rel_err_max']:.3g}")
    lines.append(f"  vision   {d['vision_calls']:4d} calls rel embedding err mean {d['vision_rel_err_mean']:.3g} "
                 f"max {d['vision_rel_err_max']:.3g}")
    lines.append(f"  table    token rows rel embedding err mean {d['embed_rel_err_mean']:.3g} "
                 f"max {d['embed_rel_err_max']:.3g}")
    for comp, size in d["sizes"].items():
        ref = d["reference_sizes"][comp]
        ratio = f"x{ref / size:.2f}" if size >= 0.01 * ref else "its bytes counted elsewhere"  # a shared table
        lines.append(f"  {comp:<13} {size / 2**20:9.2f} MiB  (fp32 {ref / 2**20:.2f} MiB, {ratio})  "
                     f"{d['methods'].get(comp, '')}")
    lines.append(f"  total compression x{d['compression']:.2f}")
    return lines


def component_sizes(engine_dir: Path) -> dict[str, int]:
    root = Path(engine_dir)

    def size(path: Path) -> int:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size if path.exists() else 0

    return {comp: sum(size(root / f) for f in files) for comp, files in COMPONENTS.items()}


def logit_drift(ref: np.ndarray, got: np.ndarray) -> LogitDrift:
    """Per-row drift figures of logits `got` against `ref`, both (rows, vocab)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if len(ref) == 0:
        return LogitDrift(0, 0.0, 0.0, 1.0, 0.0, 0.0)
    log_p = ref - ref.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = got - got.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    kl = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)  # clamp float rounding below zero
    rel = np.abs(got - ref).max(-1) / np.abs(ref).max(-1)
    return LogitDrift(len(ref), float(kl.mean()), float(kl.max()),
                      float((ref.argmax(-1) == got.argmax(-1)).mean()), float(rel.mean()), float(rel.max()))


def table_embeds(call: DecoderCall, table: EmbeddingTable, image_pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The call's embeddings with `table`'s rows for its tokens (image-feature rows kept); and the relative error
    of each of those rows against the recorded fp32 ones."""
    if call.ids is None:
        raise ValueError("the recording has no token ids: record it with zoomin.build.calibration.record")
    text = call.ids != image_pad
    embeds = call.embeds.copy()
    embeds[text] = table.lookup(call.ids[text])
    ref = call.embeds[text]
    err = np.linalg.norm(embeds[text] - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)
    return embeds, err


def replay_decoder(rec: Recording, decoder: Decoder, table: EmbeddingTable | None = None, image_pad: int = -1
                   ) -> list[np.ndarray]:
    """The recorded decoder calls run again, in order, on `decoder` and its own cache, with `table`'s token rows
    when given (`table_embeds`); logits per call."""
    cache = decoder.new_cache(rec.max_cache)
    out = []
    for call in rec.decoder:
        embeds = call.embeds if table is None else table_embeds(call, table, image_pad)[0]
        cache.truncate(call.past)
        out.append(decoder.forward(embeds, call.positions, cache, call.keep).copy())
    return out


def measure_drift(rec: Recording, engine_dir: Path, reference: Path | Mapping[str, int], config: ModelConfig,
                  precision: str, table: EmbeddingTable | None = None) -> DriftReport:
    """Replay the fp32 recording on the graphs in `engine_dir` (and on the engine's embedding `table`, when
    given); sizes against the fp32 graphs in `reference` (a directory, or their bytes per component when the fp32
    graphs were never written whole)."""
    t0 = time.perf_counter()
    engine_dir = Path(engine_dir)
    decoder = Decoder.load(engine_dir / "decoder.onnx", config.text)
    pad = config.tokens.image_pad
    got = replay_decoder(rec, decoder, table, pad)
    embed_err = np.concatenate([table_embeds(c, table, pad)[1] for c in rec.decoder]) if table is not None \
        else np.zeros(0)
    ref = [c.logits for c in rec.decoder]
    is_prefill = np.concatenate([[len(c.embeds) > 1] * c.keep for c in rec.decoder])
    ref_rows, got_rows = np.concatenate(ref), np.concatenate(got)

    encoder = VisionEncoder(engine_dir / "vision", config.vision)
    vis = [float(np.linalg.norm(encoder.encode(c.pixels, c.grid) - c.embeds) / np.linalg.norm(c.embeds))
           for c in rec.vision]
    return DriftReport(
        precision=precision,
        decoder=logit_drift(ref_rows, got_rows),
        prefill=logit_drift(ref_rows[is_prefill], got_rows[is_prefill]),
        decode=logit_drift(ref_rows[~is_prefill], got_rows[~is_prefill]),
        vision_rel_err_mean=float(np.mean(vis)) if vis else 0.0,
        vision_rel_err_max=float(np.max(vis)) if vis else 0.0,
        vision_calls=len(vis),
        embed_rel_err_mean=float(embed_err.mean()) if len(embed_err) else 0.0,
        embed_rel_err_max=float(embed_err.max(initial=0.0)),
        sizes=component_sizes(engine_dir),
        reference_sizes=dict(reference) if isinstance(reference, Mapping) else component_sizes(reference),
        seconds=time.perf_counter() - t0,
    )
