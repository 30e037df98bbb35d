"""Calibration inputs for quantized builds, produced by running calibration images through the real ZoomIn protocol.

Quantizers see exactly the activations deployment produces: every calibration image goes through `ZoomIn.detect`
(query 1 with the full image, teacher-forced with the image's regions so that query 2 and its crops exist even on
random weights, then query 2 with the crops and a few generated tokens). Taps on the engine's Decoder and
VisionEncoder record each call's inputs and outputs; nothing of the runtime is re-implemented.

`record` runs either a built fp32 engine or, in the streamed build (zoomin.build.streaming), a stand-in engine
without any graph (`stand_in_engine`): the conversations do not depend on the model as long as query 1 is
teacher-forced, except for the tokens query 2 generates, which need the whole model. The stand-in's
`ScriptedDecoder` writes a fixed answer in their place, and its calls' logits are filled in afterwards by the
streamed fp32 pass; the vision calls' features come from that pass too (`ReplayVision`).

The recording serves twice:
- calibration feeds: per conversation one empty-cache prefill of every token the conversation processed (causal
  attention makes its activations those of the incremental run), and every vision call's inputs;
- drift replay (zoomin.build.drift): the recorded calls are replayed, in order and with their cache lengths, on
  the quantized graphs and compared with the recorded fp32 outputs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ..runtime.decoder import empty_cache_inputs
from ..runtime.image_io import IMAGE_SUFFIXES
from ..runtime.image_io import ImageError, load_image
from ..runtime.manifest import sha256_file
from .checkpoint import BuildError

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "calibration"
MANIFEST = "manifest.json"
CALIB_NEW_TOKENS = 4  # query-2 tokens generated per image: 1 prefill logit row + 3 decode steps

Region = tuple[tuple[float, float, float, float], str]


class CalibrationError(BuildError):
    """A calibration set that cannot be used; the message names the directory or file and the problem."""


@dataclass(frozen=True)
class CalibImage:
    path: Path
    sha256: str
    regions: tuple[Region, ...]  # original-image pixels; teacher-forced as query 1's boxes
    kind: str  # "real" | "synthetic" (default set) or "image" (a plain --calib-images folder)


@dataclass(frozen=True)
class CalibrationSet:
    root: Path
    images: tuple[CalibImage, ...]

    @property
    def sha256(self) -> str:
        """Hash of what calibration saw: each selected image's bytes and regions, in order (not file names)."""
        h = hashlib.sha256()
        for im in self.images:
            h.update(json.dumps([im.sha256, [[list(b), label] for b, label in im.regions]]).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        kinds: dict[str, int] = {}
        for im in self.images:
            kinds[im.kind] = kinds.get(im.kind, 0) + 1
        return {"sha256": self.sha256, "images": len(self.images), "kinds": kinds, "source": str(self.root)}


def default_regions(width: int, height: int) -> tuple[Region, ...]:
    """Two boxes for images without a manifest: the centre ninth and an upper-left one (each ~11% of the area)."""
    w, h = width / 3, height / 3
    return (((round(w), round(h), round(2 * w), round(2 * h)), "centre"),
            ((round(w / 4), round(h / 4), round(w * 1.25), round(h * 1.25)), "upper left"))


def load_calibration_set(directory: str | Path | None = None, size: int | None = None) -> CalibrationSet:
    """The images of `directory` (default: the repository's calibration/), each checked to decode.

    A folder with a manifest.json (the default set's format) uses its files, hashes and regions; any other folder
    uses its image files, sorted by name, with `default_regions`. `size` takes that many images spread evenly over
    the set (the default set alternates real and synthetic images, so any size mixes both).
    """
    root = Path(directory) if directory is not None else DEFAULT_DIR
    if not root.exists():
        raise CalibrationError(f"{root}: calibration image directory not found")
    if not root.is_dir():
        raise CalibrationError(f"{root}: --calib-images must be a directory of images")
    images = _from_manifest(root) if (root / MANIFEST).is_file() else _from_folder(root)
    if not images:
        raise CalibrationError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) to calibrate on")
    if size is not None:
        if size < 1:
            raise CalibrationError(f"--calib-size must be >= 1, got {size}")
        if size > len(images):
            raise CalibrationError(f"--calib-size {size} but {root} holds only {len(images)} images")
        images = [images[i * len(images) // size] for i in range(size)]
    return CalibrationSet(root, tuple(images))


def _from_manifest(root: Path) -> list[CalibImage]:
    path = root / MANIFEST
    try:
        entries = json.loads(path.read_text())["images"]
        items = [(e["file"], e.get("sha256"), e.get("kind", "image"),
                  [(tuple(float(v) for v in r["box"]), str(r.get("label") or "region")) for r in e.get("regions", [])])
                 for e in entries]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CalibrationError(f"{path}: malformed calibration manifest ({type(e).__name__}: {e})") from None
    out = []
    for name, digest, kind, regions in items:
        file = root / name
        if not file.is_file():
            raise CalibrationError(f"{path}: lists {name}, which is missing")
        actual = sha256_file(file)
        if digest is not None and actual != digest:
            raise CalibrationError(f"{file}: sha256 differs from {path} (file changed; regenerate the manifest)")
        w, h = _image_size(file)
        for box, _ in regions:
            if len(box) != 4 or not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
                raise CalibrationError(f"{path}: region {list(box)} of {name} is not inside its {w}x{h} pixels")
        out.append(CalibImage(file, actual, tuple(regions) or default_regions(w, h), kind))
    return out


def _from_folder(root: Path) -> list[CalibImage]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    out = []
    for file in files:
        w, h = _image_size(file)
        out.append(CalibImage(file, sha256_file(file), default_regions(w, h), "image"))
    return out


def _image_size(file: Path) -> tuple[int, int]:
    try:
        h, w = load_image(file).shape[:2]
    except ImageError as e:
        raise CalibrationError(f"calibration image {e}") from None
    return w, h


# -- recording the fp32 engine -----------------------------------------------------------------------------------


@dataclass
class DecoderCall:
    embeds: np.ndarray  # (S, hidden) float32, image features merged in
    positions: np.ndarray  # (3, S) int64 M-RoPE rows
    past: int  # cache rows before the call
    keep: int  # logits_to_keep
    logits: np.ndarray  # (keep, vocab) float32 from the fp32 graph
    ids: np.ndarray | None = None  # (S,) the token ids whose table rows `embeds` holds (image pads: features)


@dataclass
class VisionCall:
    pixels: np.ndarray  # (patches, patch_dim) float32
    grid: np.ndarray  # (images, 3) int64
    embeds: np.ndarray  # fp32 graph output


@dataclass
class Recording:
    decoder: list[DecoderCall] = field(default_factory=list)
    vision: list[VisionCall] = field(default_factory=list)
    conversations: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each image's calls
    seconds: float = 0.0

    @property
    def max_cache(self) -> int:
        return max(c.past + len(c.embeds) for c in self.decoder)


class _TableTap:
    """Stands in for the engine's embedding table: remembers the ids of the last lookup (the next decoder call's)."""

    def __init__(self, inner):
        self.inner, self.last = inner, None

    def lookup(self, ids):
        self.last = np.array(ids, np.int64)
        return self.inner.lookup(ids)


class _DecoderTap:
    """Stands in for the engine's Decoder: forwards every call and records inputs, token ids and logits."""

    def __init__(self, inner, calls: list[DecoderCall], table: _TableTap):
        self.inner, self.calls, self.table = inner, calls, table

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward(self, embeds, positions, cache, logits_to_keep: int = 1):
        past = cache.length
        ids, self.table.last = self.table.last, None
        if ids is None or len(ids) != len(embeds):
            raise ValueError("a decoder call's embeddings do not come from the table lookup just before it")
        logits = self.inner.forward(embeds, positions, cache, logits_to_keep)
        self.calls.append(DecoderCall(np.array(embeds, np.float32), np.array(positions, np.int64), past,
                                      logits_to_keep, np.array(logits, np.float32), ids))
        return logits


class _VisionTap:
    def __init__(self, inner, calls: list[VisionCall]):
        self.inner, self.calls = inner, calls

    def encode(self, pixel_values, grid_thw):
        out = self.inner.encode(pixel_values, grid_thw)
        self.calls.append(VisionCall(np.array(pixel_values, np.float32), np.array(grid_thw, np.int64).reshape(-1, 3),
                                     np.array(out, np.float32)))
        return out


class ScriptedDecoder:
    """A decoder without weights: each call returns logits whose argmax is the next token of `script` (counted from
    the last call on an empty cache), so greedy sampling writes that answer. Query 1 is teacher-forced anyway; query
    2 answers with the script, where the real model's own tokens would need a whole forward pass per token."""

    def __init__(self, vocab_size: int, script: Sequence[int]):
        self.vocab_size, self.script = vocab_size, list(script)
        self._step = 0

    def new_cache(self, max_len: int, device: str = "cpu", device_id: int = 0):
        from ..runtime.decoder import KVCache

        return KVCache.allocate(1, max_len, 1, 1)  # holds nothing; counts positions for the caller

    def forward(self, embeds, positions, cache, logits_to_keep: int = 1):
        if cache.length == 0:
            self._step = 0
        token = self.script[min(self._step, len(self.script) - 1)]
        self._step += 1
        cache.length += len(embeds)
        logits = np.zeros((logits_to_keep, self.vocab_size), np.float32)
        logits[:, token] = 1.0
        return logits


class PlaceholderVision:
    """Zero image features of the right shape: enough to lay out the conversations (they do not depend on them)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def encode(self, pixel_values, grid_thw):
        grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
        return np.zeros((int(grid.prod(axis=1).sum()) // self.cfg.spatial_merge_size**2, self.cfg.out_hidden_size),
                        np.float32)


class ReplayVision:
    """The features of earlier-recorded vision calls, served in the same order (checked against their pixels)."""

    def __init__(self, calls: Sequence[VisionCall]):
        self.calls, self._next = list(calls), 0

    def encode(self, pixel_values, grid_thw):
        if self._next >= len(self.calls):
            raise CalibrationError("the calibration run asked for more vision calls than were recorded")
        call = self.calls[self._next]
        self._next += 1
        if not (np.array_equal(call.grid, np.asarray(grid_thw).reshape(-1, 3)) and
                np.array_equal(call.pixels, pixel_values)):
            raise CalibrationError("the calibration run's vision calls differ from the recorded ones")
        return call.embeds


def scripted_answer(protocol, tokenizer) -> list[int]:
    """Query 2's stand-in answer: the protocol's own answer layout (explanation, then the verdict)."""
    text = protocol.format_answer("The enlarged regions show consistent texture, lighting and edges.", [], "real")
    return tokenizer.encode(text, add_special_tokens=False).ids


def stand_in_engine(config, protocol, tokenizer_json: Path, embed_tokens: Path, vision, chat_format=None):
    """An Engine for `record` with no graph: `vision` (PlaceholderVision / ReplayVision) and a ScriptedDecoder;
    token embeddings are gathered from the fp32 table `embed_tokens` like the runtime does."""
    from ..runtime.chat import ChatFormat, ChatTokenizer
    from ..runtime.embedding import DenseTable
    from ..runtime.engine import Engine
    from ..runtime.manifest import Manifest

    chat = ChatTokenizer.from_file(tokenizer_json, config, chat_format or ChatFormat())
    script = [*scripted_answer(protocol, chat.tokenizer), config.tokens.im_end]
    manifest = Manifest(precision="fp32", config=config, files={}, graphs={}, provenance={})
    return Engine(Path(embed_tokens).parent, manifest, protocol, chat, vision,
                  ScriptedDecoder(config.text.vocab_size, script), DenseTable.load(embed_tokens), "cpu")


def record(engine, calib: CalibrationSet, *, max_new_tokens: int = CALIB_NEW_TOKENS,
           threads: int | None = None) -> Recording:
    """Run ZoomIn on `engine` (an engine directory, or an Engine such as `stand_in_engine`'s) for every
    calibration image, recording every decoder and vision call.

    Reuse is off so that query 2 prefills its whole conversation from an empty cache: that call is the
    conversation's calibration feed as it stands (see `conversation_feed`).
    """
    from ..runtime.engine import Engine
    from ..runtime.lm import OnnxLM
    from ..runtime.pipeline import ZoomIn

    rec = Recording()
    if not isinstance(engine, Engine):
        engine = Engine.load(engine, threads=threads)
    table = _TableTap(engine.embed_tokens)
    engine = replace(engine, decoder=_DecoderTap(engine.decoder, rec.decoder, table),
                     vision=_VisionTap(engine.vision, rec.vision), embed_tokens=table)
    # one decoder call per prefill (no chunking): conversation_feed reads query 2's prefill as a single call
    zoom = ZoomIn(OnnxLM(engine, reuse=False, prefill_limit=1 << 30), engine.chat, engine.config, engine.protocol,
                  vocab_size=engine.config.text.vocab_size)
    t0 = time.perf_counter()
    for image in calib.images:
        start = len(rec.decoder)
        zoom.detect(image.path, regions=list(image.regions), max_new_tokens=max_new_tokens)
        rec.conversations.append((start, len(rec.decoder)))
    rec.seconds = time.perf_counter() - t0
    return rec


def conversation_feed(calls: Sequence[DecoderCall]) -> tuple[np.ndarray, np.ndarray, int]:
    """(embeds, positions, keep) of one empty-cache prefill covering every token a conversation processed.

    The last empty-cache call is query 2's full prefill; the decode steps after it append one token each. keep
    covers exactly the rows whose logits deployment computed (query 2's last prompt token and each step).
    """
    start = max(i for i, c in enumerate(calls) if c.past == 0)
    seq = calls[start:]
    length = 0
    for c in seq:
        if c.past != length:
            raise ValueError(f"recorded decoder calls are not contiguous (past {c.past}, expected {length})")
        length += len(c.embeds)
    if any(len(c.embeds) != c.keep for c in seq[1:]):
        raise ValueError("decode steps must keep the logits of every position they run")
    keep = length - (len(seq[0].embeds) - seq[0].keep)
    return (np.concatenate([c.embeds for c in seq]), np.concatenate([c.positions for c in seq], axis=1), keep)


def decoder_feeds(rec: Recording, num_layers: int, kv_heads: int, head_dim: int, graph: str = "gqa"
                  ) -> list[dict[str, np.ndarray]]:
    """One ONNX feed per conversation for the decoder graph of flavour `graph` (empty past)."""
    feeds = []
    for start, end in rec.conversations:
        embeds, positions, keep = conversation_feed(rec.decoder[start:end])
        feed = {"inputs_embeds": embeds[None], "position_ids": positions[:, None],
                "logits_to_keep": np.array([keep], np.int64)}
        feed.update(empty_cache_inputs(graph, num_layers, kv_heads, head_dim, 1, len(embeds)))
        feeds.append(feed)
    return feeds


def vision_feeds(rec: Recording, vision_dir: Path, vision_cfg) -> list[list[dict[str, np.ndarray]]]:
    """Per stage graph of the fp32 vision directory `vision_dir`, the feeds of its every call on the recorded
    vision calls (full images and each query's crops), as the runtime's scheduler makes them."""
    from ..runtime.vision import VisionEncoder, run_tower

    encoder = VisionEncoder(vision_dir, vision_cfg)
    feeds: list[list[dict[str, np.ndarray]]] = [[] for _ in encoder.stages]

    def tap(k, stage):
        def run(feed):
            feeds[k].append({n: np.array(feed[n]) for n in stage.inputs})
            return stage(feed)
        run.inputs, run.outputs = stage.inputs, stage.outputs
        return run

    stages = [tap(k, s) for k, s in enumerate(encoder.stages)]
    for call in rec.vision:
        run_tower(stages, call.pixels, call.grid, vision_cfg)
    return feeds


class FeedReader(CalibrationDataReader):
    """onnxruntime.quantization's data reader over a list of feeds (deep-copyable, rewindable)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve only feeds [start, end) (quantize_static's CalibStridedMinMax calibrates in such slices)."""
        self._it = iter(self.feeds[start_index:end_index])

    def __len__(self) -> int:
        return len(self.feeds)

    def __deepcopy__(self, memo):
        return FeedReader(self.feeds)  # the arrays are read-only inputs: share them
