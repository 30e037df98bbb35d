"""Continuous batching: several ZoomIn jobs in flight at once, their decode steps merged into one decoder call.

Decode is memory-bound: one step reads every weight once whatever the batch, so B sequences stepping together cost
little more than one. Each job runs on its own *lane* (a thread with its own OnnxLM and conversation), and every
lane's sequence lives in its own slot of one multi-slot KV cache (KVCache.slot). The lanes do their host work
(decode, resize, vision, sampling, parsing) in parallel; every decoder call goes through one `StepScheduler`
thread, which runs a lane's prefill chunk alone and the pending decode steps of all lanes together
(Decoder.forward_batch). A lane joins the batch with its first decode step and leaves it when its answer ends, so
sequences come and go between steps; each keeps its own positions, rope delta and cache rows, and query 2 still
reuses its own query 1 prefix. GroupQueryAttention reads each sequence's own rows and length.

What a merged step computes depends on the precision's kernels (`merge_policy`, measured in tests/test_batch.py):
- fp32 / fp16: every row is what the sequence computes alone, bit for bit: merged.
- int4: MatMulNBits rows are independent of each other and of the batch size for M >= 2, but its M = 1 kernel
  rounds differently (3B widths: max |logit difference| 0.035 of 5). Steps are merged and a lone step rides along
  with a neighbour slot, so a sequence's answer never depends on what else runs (batch-invariant); it can differ
  from a one-at-a-time `detect` (M = 1 throughout) by that rounding.
- int8: dynamic quantization scales each MatMul's activations per tensor, so merged rows would share one scale
  and change each other: steps run one sequence at a time (exact, no batching gain).
- plain graphs (fp8): no per-sequence lengths in the graph: one at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .decoder import Decoder, DecoderError, KVCache

MERGE_WAIT_S = 0.002  # how long a step waits for the other decoding lanes' steps before it runs without them
MERGE_POLICIES = ("merge", "merge2", "single")  # merged; merged with at least 2 rows; one sequence per call


def merge_policy(precision: str, graph: str | None) -> str:
    """How decode steps of an engine of `precision` and decoder `graph` may share a call (see the module doc)."""
    if graph != "gqa" or precision == "int8":
        return "single"
    return "merge2" if precision == "int4" else "merge"


class SlotFull(DecoderError):
    """A conversation needs more KV rows than its lane's slot holds: that image's error, not the batch's."""


@dataclass
class _Step:
    slot: int
    embeds: np.ndarray
    positions: np.ndarray
    future: Future = field(default_factory=Future)


class StepScheduler:
    """Owns the multi-slot KV cache and runs every decoder call of `slots` lanes on one thread.

    max_len: rows per slot (a conversation that needs more fails with SlotFull; rows are committed only when
    written, so a generous bound costs address space, not memory). batch_sizes counts the decode steps run per
    batch size; each of `observers` is called with the size of every batched step (the service's histogram).
    """

    def __init__(self, decoder: Decoder, slots: int, max_len: int, policy: str = "merge",
                 merge_wait_s: float = MERGE_WAIT_S):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if policy not in MERGE_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(MERGE_POLICIES)}, got {policy!r}")
        self.decoder, self.policy = decoder, policy
        # + 1 row: the one a riding-along slot writes; merge2 needs a neighbour even for a single lane
        total = max(slots, 2) if policy == "merge2" else slots
        self.cache = decoder.new_cache(max_len + 1, slots=total) if policy != "single" else None
        self.caches = [self.cache.slot(b) if self.cache is not None else decoder.new_cache(max_len + 1)
                       for b in range(total)]
        self.max_len = max_len
        self.merge_wait_s = merge_wait_s
        self.batch_sizes: dict[int, int] = {}
        self.observers: list[Callable[[int], None]] = []
        self._cond = threading.Condition()
        self._prefills: list[_Step] = []
        self._decodes: dict[int, _Step] = {}
        self._decoding: set[int] = set()  # lanes between their first decode step and the end of their answer
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="zoomin-steps", daemon=True)
        self._thread.start()

    # -- lane side --------------------------------------------------------------------------------------------

    def prefill(self, slot: int, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run a prefill chunk on `slot`'s cache; returns the last position's logits (vocab,)."""
        if self.caches[slot].length + len(embeds) > self.max_len:
            raise SlotFull(f"the conversation needs {self.caches[slot].length + len(embeds)} positions, more than "
                           f"the batch cache's {self.max_len} per sequence")
        return self._submit(_Step(slot, embeds, positions), prefill=True)

    def decode(self, slot: int, embed: np.ndarray, position: np.ndarray) -> np.ndarray:
        """One decode step of `slot` (embed (1, hidden), position (3, 1)), merged with the other lanes' steps."""
        if self.caches[slot].length + 1 > self.max_len:
            raise SlotFull(f"the conversation needs more than the batch cache's {self.max_len} positions per "
                           f"sequence")
        with self._cond:
            self._decoding.add(slot)
        return self._submit(_Step(slot, embed, position), prefill=False)

    def done(self, slot: int) -> None:
        """`slot`'s answer ended: the other lanes' steps no longer wait for it."""
        with self._cond:
            self._decoding.discard(slot)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _submit(self, step: _Step, prefill: bool) -> np.ndarray:
        with self._cond:
            if self._closed:
                raise RuntimeError("the step scheduler is closed")
            if prefill:
                self._prefills.append(step)
            else:
                self._decodes[step.slot] = step
            self._cond.notify_all()
        return step.future.result()

    # -- scheduler thread -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                work = self._next_work()
                if work is None:
                    return
            self._run(*work)

    def _next_work(self) -> tuple[str, list[_Step]] | None:
        """Under the lock: all decoding lanes' steps once they are in; else the oldest prefill chunk; else the
        steps that came in, after MERGE_WAIT_S for the rest."""
        waited_since = None
        while True:
            if self._closed and not self._prefills and not self._decodes:
                return None
            if self._decodes and self.policy == "single":
                return "decode", [self._decodes.pop(min(self._decodes))]
            ready = self._decodes and self._decoding <= set(self._decodes)
            if ready:
                return "decode", self._take_decodes()
            if self._prefills:
                return "prefill", [self._prefills.pop(0)]
            if self._decodes:
                now = time.monotonic()
                waited_since = waited_since or now
                left = self.merge_wait_s - (now - waited_since)
                if left <= 0:
                    return "decode", self._take_decodes()
                self._cond.wait(left)
            else:
                waited_since = None
                self._cond.wait()

    def _take_decodes(self) -> list[_Step]:
        steps = sorted(self._decodes.values(), key=lambda s: s.slot)
        self._decodes.clear()
        return steps

    def _run(self, kind: str, steps: list[_Step]) -> None:
        try:
            if kind == "prefill":
                s = steps[0]
                logits = self.decoder.forward(s.embeds, s.positions, self.caches[s.slot], 1)
                s.future.set_result(logits[-1].copy())
                return
            if self.policy == "single":
                s = steps[0]
                logits = self.decoder.forward(s.embeds, s.positions, self.caches[s.slot], 1)
                self._count(1)
                s.future.set_result(logits[-1].copy())
                return
            lo, hi = steps[0].slot, steps[-1].slot + 1
            if self.policy == "merge2" and hi - lo == 1:  # a neighbour rides along: never the M = 1 kernel
                lo, hi = (lo, hi + 1) if hi < len(self.caches) else (lo - 1, hi)
            by_slot = {s.slot: s for s in steps}
            hidden = steps[0].embeds.shape[1]
            embeds = np.zeros((hi - lo, hidden), np.float32)
            positions = np.zeros((3, hi - lo), np.int64)
            for b in range(lo, hi):  # slots in the range without a step ride along at their own length
                s = by_slot.get(b)
                embeds[b - lo] = s.embeds[0] if s else 0.0
                positions[:, b - lo] = s.positions[:, 0] if s else self.caches[b].length
            logits = self.decoder.forward_batch(embeds, positions, self.caches[lo:hi],
                                                active=[b in by_slot for b in range(lo, hi)])
            self._count(len(steps))
            for s in steps:
                s.future.set_result(logits[s.slot - lo].copy())
        except BaseException as e:  # every waiting lane gets the error; the scheduler goes on
            for s in steps:
                if not s.future.done():
                    s.future.set_exception(e)


    def _count(self, sequences: int) -> None:
        self.batch_sizes[sequences] = self.batch_sizes.get(sequences, 0) + 1
        for observe in self.observers:
            observe(sequences)


class Lane:
    """One lane's view of the scheduler: its slot's cache and the decoder calls OnnxLM makes (zoomin.runtime.lm)."""

    def __init__(self, scheduler: StepScheduler, slot: int):
        self.scheduler, self.slot = scheduler, slot

    @property
    def cache(self) -> KVCache:
        return self.scheduler.caches[self.slot]

    def prefill(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.scheduler.prefill(self.slot, embeds, positions)

    def decode(self, embed: np.ndarray, position: np.ndarray) -> np.ndarray:
        return self.scheduler.decode(self.slot, embed, position)

    def done(self) -> None:
        self.scheduler.done(self.slot)


def scheduler_of(detector) -> StepScheduler | None:
    """The step scheduler a detector's decoder calls go through (ZoomIn.lanes), or None."""
    lane = getattr(getattr(detector, "lm", None), "lane", None)
    return lane.scheduler if lane is not None else None
