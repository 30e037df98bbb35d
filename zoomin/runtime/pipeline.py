"""The ZoomIn job, one named function per stage: decode → preprocess → query 1 (global scan) → boxes → crops →
query 2 (local evidence check) → verdict.

The stages are backend-agnostic: the same code drives the ONNX engine (`ZoomIn.load`) and the transformers
reference (`zoomin.hf_backend.load_hf`), so protocol, parsing, crops and token assembly cannot drift between them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol as Interface

import numpy as np

from .batch import SlotFull
from .chat import ChatTokenizer, messages_from_dicts
from .config import ImageConfig, ModelConfig
from .crop import CropConfig, box_to_original, make_crop
from .image_io import ImageError, ImageSource, load_image, source_name
from .lm import Generation, StepObserver
from .parse import Box, explanation_text, parse_boxes, parse_verdict
from .preprocess import PreprocessedImage, preprocess_image, smart_resize
from .protocol import Protocol
from .sampling import Sampler, Sampling, VerdictScorer


class LanguageModel(Interface):
    def begin(self) -> None: ...

    def run(self, ids: np.ndarray, images: Sequence[PreprocessedImage], *, forced: Sequence[int] | None,
            max_new_tokens: int, sampler: Sampler, observer: StepObserver | None) -> Generation: ...


@dataclass
class Region:
    """One examined region. `box` is in original-image pixels; `crop` is the (margin-expanded) area zoomed."""

    box: tuple[float, float, float, float]
    label: str | None
    box_model: tuple[float, float, float, float]  # pixels of the resized image the model saw
    crop: tuple[int, int, int, int] | None = None


@dataclass
class DetectResult:
    verdict: str | None  # "real" | "generated" | None (no parseable final verdict)
    score: float | None  # P("generated") at the final verdict word
    boxes: list[Region]
    explanation: str  # final (query 2, or query 1 when query 2 is skipped)
    stage1_explanation: str
    stage1_verdict: str | None
    stage1_score: float | None
    stage1_text: str  # raw answers, special tokens kept
    final_text: str
    image_size: tuple[int, int]  # (width, height) of the original
    model_size: tuple[int, int]  # (width, height) the model saw
    tokens: dict[str, int] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def result_record(path: str, result: DetectResult | None, error: str | None) -> dict[str, Any]:
    """One image's answer as `zoomin detect --json` writes it (and the HTTP service and `zoomin batch` return):
    path and error, then the result's fields when there is one."""
    return {"path": path, "error": error, **(result.to_dict() if result is not None else {})}


RegionInput = Sequence[float] | tuple[Sequence[float], str]


class ZoomIn:
    """Two-stage ZoomIn detection. `ZoomIn.load(engine_dir)` for the ONNX engine."""

    def __init__(self, lm: LanguageModel, chat: ChatTokenizer, config: ModelConfig, protocol: Protocol,
                 *, vocab_size: int):
        self.lm = lm
        self.chat = chat
        self.config = config
        self.protocol = protocol
        self._vocab_size = vocab_size
        self._scorer: VerdictScorer | None = None
        self._lanes: list[ZoomIn] = []  # detect_batch's, made on first use

    @classmethod
    def load(cls, engine_dir: str | Path, *, device: str = "cpu", reuse: bool = True, threads: int | None = None,
             trt_cache: str | Path | None = None, **protocol_overrides: Any) -> "ZoomIn":
        """device: cpu, cuda, tensorrt or jetson (the ONNX graphs on ONNX Runtime; trt_cache: where the TensorRT
        execution provider keeps its engines, default <engine>/.trt_cache), or tensorrt-llm (the engine's
        TensorRT plans and TensorRT-LLM language model from zoomin-build --target tensorrt; not yet run on a GPU)."""
        if device == "tensorrt-llm":
            from .. import trtllm

            lm, chat, config, protocol = trtllm.load(engine_dir, reuse=reuse)
            protocol = protocol.replace(**protocol_overrides) if protocol_overrides else protocol
            return cls(lm, chat, config, protocol, vocab_size=config.text.vocab_size)
        from .engine import Engine
        from .lm import OnnxLM

        engine = Engine.load(engine_dir, device=device, threads=threads, trt_cache=trt_cache)
        protocol = engine.protocol.replace(**protocol_overrides) if protocol_overrides else engine.protocol
        return cls(OnnxLM(engine, reuse=reuse), engine.chat, engine.config, protocol,
                   vocab_size=engine.config.text.vocab_size)

    # -- stages ---------------------------------------------------------------------------------------------

    def decode_image(self, image: ImageSource) -> np.ndarray:
        return load_image(image)

    def preprocess(self, rgb: np.ndarray, name: str = "<array>") -> PreprocessedImage:
        """The vision tower's input; an image over `max_image_tokens` is downscaled to fit or refused (`oversize`).

        The limit is checked on smart_resize's target size, before anything is resized or normalised.
        """
        img, p = self.config.image, self.protocol
        limit = p.max_image_tokens
        if limit is not None:
            h, w = rgb.shape[:2]
            (rh, rw), tokens = _target(h, w, img, img.min_pixels, img.max_pixels, name)
            if tokens > limit:
                if p.oversize == "refuse":
                    raise ImageError(name, f"{tokens} image tokens at {rw}x{rh} (resized from {w}x{h}) exceed the "
                                           f"limit of {limit} (max_image_tokens; oversize=refuse)")
                max_pixels = limit * img.factor**2
                min_pixels = min(img.min_pixels, max_pixels)
                (rh, rw), tokens = _target(h, w, img, min_pixels, max_pixels, name)
                if tokens > limit:  # sides cannot go below one 28-pixel block: extreme aspect ratios
                    raise ImageError(name, f"cannot fit the limit of {limit} image tokens (max_image_tokens): "
                                           f"downscaled to {rw}x{rh} it still takes {tokens}")
                return preprocess_image(rgb, min_pixels=min_pixels, max_pixels=max_pixels, config=img)
        return preprocess_image(rgb, config=img)

    def scan_ids(self, pre: PreprocessedImage) -> np.ndarray:
        return self.chat.encode(messages_from_dicts(self.protocol.scan_messages()), [pre.grid_thw],
                                add_generation_prompt=True)

    def model_boxes(self, regions: Sequence[RegionInput], pre: PreprocessedImage) -> list[Box]:
        """Caller regions (original pixels, optionally labelled) as integer boxes in model coordinates."""
        boxes = []
        for r in regions:
            coords, label = (r[0], r[1]) if len(r) == 2 and isinstance(r[1], str) else (r, None)
            x1, y1, x2, y2 = box_to_original(tuple(float(v) for v in coords), pre.original_hw, pre.resized_hw)
            boxes.append(Box(round(x1), round(y1), round(x2), round(y2), label))
        return boxes

    def forced_answer(self, regions: Sequence[RegionInput], pre: PreprocessedImage) -> list[int]:
        """Query 1's answer written from caller-supplied regions, in the protocol's box format."""
        text = self.protocol.format_answer("Regions supplied by the caller.", self.model_boxes(regions, pre), None)
        return self.chat.tokenizer.encode(text, add_special_tokens=False).ids

    def find_boxes(self, answer: str, pre: PreprocessedImage) -> list[Box]:
        p = self.protocol
        return parse_boxes(answer, image_hw=pre.resized_hw, max_boxes=p.max_boxes, max_area_frac=p.max_box_area_frac)

    def crops(self, pre: PreprocessedImage, boxes: Sequence[Box]) -> tuple[list[Region], list[PreprocessedImage]]:
        """Zoomed crops of the boxes (degenerate ones dropped), each preprocessed like a full image."""
        p, img = self.protocol, self.config.image
        max_pixels = min(p.crop_max_pixels, img.max_pixels)
        cfg = CropConfig(margin=p.crop_margin, min_size=p.min_crop_size, factor=img.factor,
                         min_pixels=min(CropConfig.min_pixels, max_pixels), max_pixels=max_pixels)
        crop_img_cfg = replace(img, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        regions, crops = [], []
        for box in boxes:
            crop = make_crop(pre.image, box.as_tuple(), pre.resized_hw, cfg)
            if crop is None:
                continue
            orig = box_to_original(box.as_tuple(), pre.resized_hw, pre.original_hw)
            regions.append(Region(box=tuple(orig), label=box.label, box_model=box.as_tuple(), crop=crop.box_original))
            crops.append(preprocess_image(crop.image, config=crop_img_cfg))
        return regions, crops

    def check_ids(self, pre: PreprocessedImage, regions: Sequence[Region], crops: Sequence[PreprocessedImage]
                  ) -> tuple[np.ndarray, list[PreprocessedImage]]:
        """The query-2 turn appended after query 1's answer, and the images it shows, in order."""
        boxes = [Box(*r.box_model, r.label) for r in regions]
        turn = self.protocol.check_messages("", boxes)[-1]
        images = [pre if part.get("source") == "original" else crops[part["index"]]
                  for part in turn["content"] if part["type"] == "image"]
        ids = self.chat.encode_continuation(messages_from_dicts([turn]), [im.grid_thw for im in images],
                                            add_generation_prompt=True)
        return ids, images

    # -- the job ----------------------------------------------------------------------------------------------

    def detect(self, image: ImageSource, *, regions: Sequence[RegionInput] | None = None,
               zoom_regions: Sequence[RegionInput] | None = None, max_new_tokens: int | None = None,
               sampling: Sampling = Sampling(), deadline: float | None = None) -> DetectResult:
        """Run both queries on one image.

        regions (original pixels): query 1's answer is teacher-forced from them (its KV is still prefilled).
        zoom_regions (original pixels): query 1 is generated as usual, but query 2 zooms into these instead of
        the boxes parsed from its answer (region proposals from elsewhere; a fixed workload for benchmarks).
        deadline (time.monotonic()): past it, the job stops at the next decode step with DeadlineExceeded, so a
        service's timed-out request does not hold the engine for the rest of its answer.
        """
        p = self.protocol
        times: dict[str, float] = {}
        t = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            times[name] = (now - t) * 1e3
            t = now

        t_start = t
        rgb = self.decode_image(image)
        lap("decode")
        pre = self.preprocess(rgb, source_name(image))
        lap("preprocess")

        sampler = Sampler(sampling)
        self.lm.begin()
        ids1 = self.scan_ids(pre)
        forced = self.forced_answer(regions, pre) if regions is not None else None
        obs1 = self._observer(deadline)
        g1 = self.lm.run(ids1, [pre], forced=forced, max_new_tokens=max_new_tokens or p.max_new_tokens_scan,
                         sampler=sampler, observer=obs1)
        t = time.perf_counter()
        times.update(vision_full=g1.vision_ms, stage1_prefill=g1.prefill_ms, stage1_decode=g1.decode_ms)
        text1 = self.chat.decode(g1.tokens, skip_special_tokens=False)
        boxes = self.find_boxes(text1, pre)
        verdict1 = parse_verdict(text1, p)
        tokens = {"stage1_prompt": len(ids1), "stage1_generated": 0 if forced else len(g1.tokens),
                  "system_prefix_reused": g1.reused_tokens, "stage1_prefill": g1.prefill_tokens}

        if zoom_regions is not None:
            boxes = self.model_boxes(zoom_regions, pre)
        examined = p.stage2_boxes(boxes, pre.resized_hw)
        regions_out: list[Region] = []
        final_text, verdict2, score2 = text1, verdict1, obs1.score
        if examined is not None:
            regions_out, crops = self.crops(pre, examined)
            cont, images2 = self.check_ids(pre, regions_out, crops)
            lap("crop")
            ids2 = np.concatenate([ids1, np.asarray(g1.tokens, np.int64), cont])
            obs2 = self._observer(deadline)
            g2 = self.lm.run(ids2, [pre, *images2], forced=None,
                             max_new_tokens=max_new_tokens or p.max_new_tokens_check, sampler=sampler, observer=obs2)
            times.update(vision_crops=g2.vision_ms, stage2_prefill=g2.prefill_ms, stage2_decode=g2.decode_ms)
            final_text = self.chat.decode(g2.tokens, skip_special_tokens=False)
            verdict2, score2 = parse_verdict(final_text, p), obs2.score
            tokens.update(stage2_prompt=len(ids2), reused_prefix=g2.reused_tokens, stage2_prefill=g2.prefill_tokens,
                          stage2_generated=len(g2.tokens), crops=len(crops))
        times["total"] = (time.perf_counter() - t_start) * 1e3
        h, w = pre.original_hw
        rh, rw = pre.resized_hw
        return DetectResult(
            verdict=verdict2.label, score=score2 if verdict2.label is not None else None, boxes=regions_out,
            explanation=explanation_text(final_text, p), stage1_explanation=explanation_text(text1, p),
            stage1_verdict=verdict1.label, stage1_score=obs1.score if verdict1.label is not None else None,
            stage1_text=text1, final_text=final_text, image_size=(w, h), model_size=(rw, rh),
            tokens=tokens, timings_ms=times)

    def detect_many(self, images: Iterable[ImageSource], **kw: Any) -> Iterator[tuple[str, DetectResult | None,
                                                                                    str | None]]:
        """(name, result, error) per image; a bad image, or one that runs out of memory, yields its error and the
        batch goes on. Any other exception is a bug and propagates."""
        for image in images:
            name = source_name(image)
            yield name, *self.try_detect(image, name=name, **kw)

    def try_detect(self, image: ImageSource, *, name: str | None = None, **kw: Any
                   ) -> tuple[DetectResult | None, str | None]:
        """(result, None), or (None, error) for a bad image or one that runs out of memory; the error names
        `name` (default: the source as given), so bytes read from elsewhere are reported by where they came from.
        Any other exception is a bug and propagates."""
        name = source_name(image) if name is None else name
        try:
            return self.detect(image, **kw), None
        except ImageError as e:
            return None, f"{name}: {e.problem}"
        except SlotFull as e:
            return None, f"{name}: {e}"
        except Exception as e:
            detail = out_of_memory(e)
            if detail is None:
                raise
            return None, f"{name}: out of memory ({detail})"

    def lanes(self, count: int, max_len: int | None = None) -> list["ZoomIn"]:
        """`count` detectors on this engine whose decode steps run batched (zoomin.runtime.batch): call them from
        `count` threads at once and the steps of every answer in progress share one decoder call. They share the
        engine, tokenizer and protocol; each keeps its own conversation (and system-prompt prefix) in its slot of
        one KV cache of `max_len` rows per sequence [conversation_rows: the longest conversation the protocol
        allows]. Which steps merge depends on the precision (zoomin.runtime.batch.merge_policy)."""
        from .batch import Lane, StepScheduler, merge_policy
        from .lm import OnnxLM

        if not isinstance(self.lm, OnnxLM):
            raise ValueError("batched decoding runs on an ONNX engine (ZoomIn.load), not this backend")
        rows = max_len or conversation_rows(self.protocol, self.config.image)
        e = self.lm.engine
        scheduler = StepScheduler(e.decoder, count, rows, merge_policy(e.manifest.precision, e.decoder.graph))
        return [ZoomIn(OnnxLM(self.lm.engine, reuse=self.lm.reuse, prefill_limit=self.lm.prefill_limit,
                              lane=Lane(scheduler, b)), self.chat, self.config, self.protocol,
                       vocab_size=self._vocab_size) for b in range(count)]

    def detect_batch(self, images: Iterable[ImageSource], *, max_batch: int = 4, max_len: int | None = None,
                     **kw: Any) -> Iterator[tuple[str, DetectResult | None, str | None]]:
        """detect_many with up to `max_batch` images in flight, their decode steps batched (continuous batching:
        an image starts as soon as a lane is free). Yields (name, result, error) in input order; `images` is read
        lazily. Greedy results of fp32/fp16/int8 engines are token-identical to detect's; int4's never depend on
        the other images in flight but can differ from detect's by MatMulNBits' M = 1 rounding
        (zoomin.runtime.batch). max_len: as for `lanes`."""
        held: dict[int, tuple[str, DetectResult | None, str | None]] = {}
        i = 0
        for index, out in self.detect_completions(images, max_batch=max_batch, max_len=max_len, **kw):
            held[index] = out
            while i in held:
                yield held.pop(i)
                i += 1

    def detect_completions(self, images: Iterable[ImageSource], *, max_batch: int = 4, max_len: int | None = None,
                           **kw: Any) -> Iterator[tuple[int, tuple[str, DetectResult | None, str | None]]]:
        """detect_batch's results as they complete: (input index, (name, result, error)).

        A lane takes its next image only after the consumer has come back for the next result: whatever the
        consumer does with a result (zoomin.runtime.worker sends it to its parent) is done before that lane starts
        anything new, so a process death never takes a finished result with it."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        rows = max_len or conversation_rows(self.protocol, self.config.image)
        if len(self._lanes) != max_batch or self._lanes[0].lm.lane.scheduler.max_len != rows:
            for lane in self._lanes[:1]:
                lane.lm.lane.scheduler.close()
            self._lanes = self.lanes(max_batch, rows)
        source, taken = iter(images), [0]
        done: list[tuple[int, Any]] = []
        acked: set[int] = set()
        pull, cond, stop = threading.Lock(), threading.Condition(), threading.Event()
        live = [len(self._lanes)]

        def run(lane: ZoomIn) -> None:
            try:
                while not stop.is_set():
                    with pull:  # not under `cond`: a source that blocks must not hold up finished images
                        try:
                            image = next(source)
                        except StopIteration:
                            return
                        i, taken[0] = taken[0], taken[0] + 1
                    try:
                        out: Any = next(lane.detect_many([image], **kw))
                    except BaseException as e:  # a bug: handed to the consumer, raised there
                        out = e
                    with cond:
                        done.append((i, out))
                        cond.notify_all()
                        cond.wait_for(lambda: i in acked or stop.is_set())
                        acked.discard(i)
            finally:
                with cond:
                    live[0] -= 1
                    cond.notify_all()

        threads = [threading.Thread(target=run, args=(lane,), name=f"zoomin-batch-{b}", daemon=True)
                   for b, lane in enumerate(self._lanes)]
        for t in threads:
            t.start()
        try:
            while True:
                with cond:
                    cond.wait_for(lambda: done or live[0] == 0)
                    if not done:
                        return
                    i, out = done.pop(0)
                if isinstance(out, BaseException):
                    raise out
                yield i, out
                with cond:
                    acked.add(i)
                    cond.notify_all()
        finally:
            with cond:
                stop.set()  # lanes finish the image they are on, take no more
                cond.notify_all()
            for t in threads:
                t.join()

    def _observer(self, deadline: float | None = None) -> "_ScoreObserver":
        if self._scorer is None:
            p = self.protocol
            self._scorer = VerdictScorer(self.chat.tokenizer, f"<{p.verdict_tag}>", p.real_word, p.generated_word,
                                         self._vocab_size)
        return _ScoreObserver(self.chat, self._scorer, deadline)


# How allocation failures read: onnxruntime's arena ("Failed to allocate memory for requested buffer of size N"),
# C++ std::bad_alloc ("std::bad_alloc", MSVC "bad allocation"), CUDA ("out of memory"), torch's CPU allocator,
# OpenCV ("(-4:Insufficient memory) Failed to allocate N bytes").
_ALLOCATION_FAILURES = ("failed to allocate", "bad allocation", "bad_alloc", "out of memory",
                        "can't allocate memory", "insufficient memory")
# Exception types (module, name) that carry an allocation failure only in their message.
_ENGINE_ERRORS = {("onnxruntime.capi.onnxruntime_pybind11_state", "Fail"),
                  ("onnxruntime.capi.onnxruntime_pybind11_state", "RuntimeException"), ("cv2", "error")}


def out_of_memory(e: BaseException) -> str | None:
    """What ran out, when `e` is an allocation failure; None for any other exception.

    A MemoryError (numpy, Python) always is one. Native libraries report theirs as a generic exception with a
    message: onnxruntime as its pybind `Fail`/`RuntimeException` (not RuntimeError subclasses), OpenCV as
    `cv2.error`, torch as a RuntimeError (its OutOfMemoryError included); those count only when the message says
    memory ran out. Told apart by type name, so that nothing here imports them.
    """
    kind = type(e)
    package = kind.__module__.partition(".")[0]
    label = kind.__name__ if package == "builtins" else f"{package}.{kind.__name__}"  # onnxruntime.Fail, cv2.error
    if isinstance(e, MemoryError):
        return f"{label}: {e}" if str(e) else label
    from_engine = isinstance(e, RuntimeError) or (kind.__module__, kind.__name__) in _ENGINE_ERRORS
    message = str(e)
    found = [i for i in (message.lower().find(m) for m in _ALLOCATION_FAILURES) if i >= 0]
    if not from_engine or not found:
        return None
    at = min(found)
    return f"{label}: {message[at:].splitlines()[0][:200]}"


def _target(h: int, w: int, cfg: ImageConfig, min_pixels: int, max_pixels: int, name: str
            ) -> tuple[tuple[int, int], int]:
    """smart_resize's (height, width) for an h x w image and the <|image_pad|> tokens it takes."""
    try:
        rh, rw = smart_resize(h, w, cfg.factor, min_pixels, max_pixels)
    except ValueError as e:
        raise ImageError(name, str(e)) from None
    return (rh, rw), (rh // cfg.patch_size) * (rw // cfg.patch_size) // cfg.merge_size**2


def conversation_rows(protocol: Protocol, image: ImageConfig, text_rows: int = 1024) -> int:
    """KV rows the longest conversation of `protocol` takes: the full image in query 1 (and again in query 2 when
    shown), max_boxes crops, both answers at their max_new_tokens, and `text_rows` of prompts and captions."""
    per_token = image.factor ** 2
    full = image.max_pixels // per_token
    if protocol.max_image_tokens is not None:
        full = min(full, protocol.max_image_tokens)
    crop = min(protocol.crop_max_pixels, image.max_pixels) // per_token
    shown = 2 if protocol.show_original_in_check else 1
    return (shown * full + protocol.max_boxes * crop + protocol.max_new_tokens_scan + protocol.max_new_tokens_check
            + text_rows)


class DeadlineExceeded(TimeoutError):
    """The job passed its `deadline` and stopped between decode steps."""


class _ScoreObserver:
    """Feeds each decode step to the verdict scorer; keeps the last score (the final verdict's). Stops the job
    at its deadline."""

    def __init__(self, chat: ChatTokenizer, scorer: VerdictScorer, deadline: float | None = None):
        self.chat, self.scorer, self.deadline = chat, scorer, deadline
        self.score: float | None = None

    def __call__(self, generated: list[int], logits: np.ndarray) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"deadline passed after {len(generated)} generated tokens")
        s = self.scorer.step(self.chat.decode(generated, skip_special_tokens=False), logits)
        if s is not None:
            self.score = s
