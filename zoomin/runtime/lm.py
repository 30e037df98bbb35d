"""The language model behind the two ZoomIn queries, on ONNX Runtime, with exact KV-cache reuse.

Each `run` gets the whole conversation so far (token ids plus the images whose pads it holds) and prefills only
what the cache does not hold yet: within one image's conversation that is the new turn (query 2 reuses query 1's
prompt and answer), across images it is everything after the system-prompt prefix, which is computed once per
loaded engine. Positions follow M-RoPE from the cached prefix's rope delta, so reuse changes no number.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .batch import Lane
from .engine import Engine
from .preprocess import PreprocessedImage
from .rope import decode_positions, mrope_positions
from .sampling import Sampler
from .vision import encode_new

# observer(generated ids so far, logits for the next token): used for the verdict score.
StepObserver = Callable[[list[int], np.ndarray], None]

INITIAL_CACHE = 4096  # rows; np.zeros commits memory only for rows written, and the cache grows when needed
PREFILL_CHUNK = 1024  # most tokens per prefill call
ATTENTION_BUDGET = 256 << 20  # bytes of attention scores one prefill call may hold (per live copy)


def prefill_chunk(heads: int, context: int, limit: int = PREFILL_CHUNK, graph: str | None = None) -> int:
    """Tokens per prefill call: at most `limit`, and for the plain graph (which holds one call's (heads, chunk,
    context) float32 scores) few enough for those to fit ATTENTION_BUDGET.

    A 4-megapixel photo is ~5k prompt tokens: prefilled in one call its scores alone are 1.6 GB at 3B widths and
    every MLP activation scales with it too; in chunks through the KV cache the peak stays flat and the result is
    the same causal attention (float rounding aside). GroupQueryAttention's CPU kernel works in tiles and holds no
    scores, so the gqa graph's chunks are bounded by `limit` (the MLP activations) alone. graph: the engine's
    decoder flavour (ModelConfig.decoder_graph; None, an engine that does not say, is treated as plain).
    """
    if graph == "gqa":
        return limit
    return max(16, min(limit, ATTENTION_BUDGET // (4 * heads * max(context, 1))))


@dataclass
class Generation:
    tokens: list[int]  # the answer's ids, without the stop token
    stopped: bool  # ended on <|im_end|> (False: max_new_tokens reached, or teacher-forced)
    prefill_tokens: int  # tokens run through prefill by this call
    reused_tokens: int  # tokens whose KV came from the cache
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


def image_runs(ids: np.ndarray, image_token: int) -> list[tuple[int, int]]:
    """[start, end) of each run of image pads, in order: one run per image."""
    is_img = np.concatenate([[0], (ids == image_token).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(is_img))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def stop_ids(engine_tokens) -> frozenset[int]:
    return frozenset({engine_tokens.im_end, engine_tokens.endoftext})


class OnnxLM:
    """lane (zoomin.runtime.batch): run the decoder through a step scheduler, in the lane's slot of its
    multi-slot cache, so that this conversation's decode steps batch with other lanes'. None: call it directly."""

    def __init__(self, engine: Engine, *, reuse: bool = True, prefill_limit: int = PREFILL_CHUNK,
                 lane: "Lane | None" = None):
        self.engine = engine
        self.reuse = reuse
        self.prefill_limit = prefill_limit
        self.lane = lane
        # On a GPU the KV cache lives in device memory, so decode steps move no KV across PCIe (not yet run on one).
        self._kv_device = "cpu" if engine.device == "cpu" else "cuda"
        self.cache = lane.cache if lane is not None else engine.decoder.new_cache(INITIAL_CACHE,
                                                                                  device=self._kv_device)
        self._ids = np.zeros(0, np.int64)  # ids whose KV rows are in the cache, in order
        self._positions = np.zeros((3, 0), np.int64)
        self._limit = 0  # cached ids usable by the next run (a new image caps it at the first image)
        self._vision: dict[int, np.ndarray] = {}  # id(PreprocessedImage) -> embeds, for this conversation

    def begin(self) -> None:
        """A new image: keep only the text prefix (system prompt, user turn header) of the cache."""
        runs = image_runs(self._ids, self.engine.config.tokens.image_pad)
        self._limit = runs[0][0] if runs else len(self._ids)
        self._vision.clear()
        self.cache.release(self._limit)  # the last image's rows: no later conversation reads them

    def run(self, ids: np.ndarray, images: Sequence[PreprocessedImage], *, forced: Sequence[int] | None = None,
            max_new_tokens: int, sampler: Sampler, observer: StepObserver | None = None) -> Generation:
        e = self.engine
        tok = e.config.tokens
        full = np.concatenate([ids, np.asarray(forced or [], np.int64)])
        reuse = self._reusable(full)
        new_ids = full[reuse:]

        t0 = time.perf_counter()
        runs = image_runs(full, tok.image_pad)
        if len(runs) != len(images):
            raise ValueError(f"conversation holds {len(runs)} images but {len(images)} were given")
        new_images = [(r, im) for r, im in zip(runs, images) if r[0] >= reuse]
        self._encode_images([im for _, im in new_images])
        t1 = time.perf_counter()

        past_delta = int(self._positions[:, :reuse].max()) + 1 - reuse if reuse else 0
        pos, delta = mrope_positions(new_ids, [im.grid_thw for _, im in new_images], image_token_id=tok.image_pad,
                                     spatial_merge_size=e.config.vision.spatial_merge_size, past_len=reuse,
                                     past_rope_delta=past_delta)
        self._ensure_capacity(reuse, len(new_ids) + max_new_tokens)
        self.cache.truncate(reuse)
        logits = self._prefill(new_ids, pos, [(start - reuse, end - reuse, self._vision[id(im)])
                                              for (start, end), im in new_images])
        t2 = time.perf_counter()
        self._ids = full
        self._positions = np.concatenate([self._positions[:, :reuse], pos], axis=1)

        gen: list[int] = []
        stopped = forced is not None
        if forced is None:
            stops = stop_ids(tok)
            try:
                for step in range(max_new_tokens):
                    if observer is not None:
                        observer(gen, logits)
                    token = sampler(logits)
                    if token in stops:
                        stopped = True
                        break
                    gen.append(token)
                    if step + 1 == max_new_tokens:
                        break
                    p = decode_positions(self.cache.length, delta)
                    logits = self._decode_step(e.embed(np.array([token])), p)
                    self._ids = np.append(self._ids, token)
                    self._positions = np.concatenate([self._positions, p], axis=1)
            finally:
                if self.lane is not None:
                    self.lane.done()
        self._limit = len(self._ids)  # the rest of this conversation may reuse all of it, answer included
        t3 = time.perf_counter()
        return Generation(
            tokens=list(forced) if forced is not None else gen,
            stopped=stopped,
            prefill_tokens=len(new_ids),
            reused_tokens=reuse,
            vision_ms=(t1 - t0) * 1e3,
            prefill_ms=(t2 - t1) * 1e3,
            decode_ms=(t3 - t2) * 1e3,
        )

    def _prefill(self, ids: np.ndarray, positions: np.ndarray, images: Sequence[tuple[int, int, np.ndarray]]
                 ) -> np.ndarray:
        """Run `ids` (image pads replaced by the features of `images`: [start, end) in ids, embeds) through the
        decoder after the cache's rows, in chunks (`prefill_chunk`); returns the last position's logits."""
        e, start = self.engine, 0
        heads = e.config.text.num_attention_heads
        while start < len(ids):
            end = min(len(ids), start + prefill_chunk(heads, self.cache.length + len(ids), self.prefill_limit,
                                                      e.config.decoder_graph))
            embeds = e.embed(ids[start:end])
            for a, b, feats in images:
                lo, hi = max(a, start), min(b, end)
                if lo < hi:
                    embeds[lo - start:hi - start] = feats[lo - a:hi - a]
            if self.lane is not None:
                logits = self.lane.prefill(embeds, positions[:, start:end])
            else:
                logits = e.decoder.forward(embeds, positions[:, start:end], self.cache, 1)[-1]
            start = end
        return logits.copy()

    def _decode_step(self, embed: np.ndarray, position: np.ndarray) -> np.ndarray:
        if self.lane is not None:
            return self.lane.decode(embed, position)
        return self.engine.decoder.forward(embed, position, self.cache, 1)[-1].copy()

    def _reusable(self, ids: np.ndarray) -> int:
        if not self.reuse:
            return 0
        n = min(self._limit, len(self._ids), len(ids) - 1)  # keep >= 1 token to prefill: it gives the logits
        if n <= 0:
            return 0
        diff = np.flatnonzero(self._ids[:n] != ids[:n])
        return int(diff[0]) if diff.size else n

    def _encode_images(self, images: Sequence[PreprocessedImage]) -> None:
        encode_new(self.engine.vision, images, self._vision, self.engine.config.vision.spatial_merge_size)

    def _ensure_capacity(self, keep: int, extra: int) -> None:
        need = keep + extra
        if self.lane is not None:  # a slot of a shared cache cannot grow (its scheduler checks every call)
            return
        if need <= self.cache.max_len:
            return
        bigger = self.engine.decoder.new_cache(max(need, 2 * self.cache.max_len), device=self._kv_device)
        bigger.load_prefix(self.cache, min(keep, self.cache.length))
        self.cache = bigger
