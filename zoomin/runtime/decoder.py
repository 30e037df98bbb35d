"""Run the exported Qwen2.5-VL text decoder with a preallocated KV cache that ONNX Runtime reads and writes in place.

Two graph flavours (zoomin/build/export_decoder.py), each with its cache layout; the manifest says which one an
engine holds and `Decoder` checks it against the graph:
- "gqa": com.microsoft GroupQueryAttention with past_present_share_buffer. Each layer's cache is one head-major
  buffer (1, kv_heads, max_len, head_dim) bound as both past_key.{i} and present_key.{i}; seqlens_k and
  total_sequence_length tell the op how many rows are valid after the call, so it writes the S new rows at
  [P, P+S) itself and reads rows [0, P+S) of every head without any copy or concat.
- "plain": standard ONNX ops. The cache is sequence-major (1, max_len, kv_heads, head_dim), so with B = 1 the first
  P rows are one contiguous block: IO binding hands ORT a pointer to that prefix as `past_*` and a pointer to rows
  [P, P+S) as `present_*`, and the step's new keys land straight in the cache.
Either way nothing is copied or reallocated per token on the host side, and a prefix (e.g. the system prompt)
survives any later step untouched, so `truncate(n)` alone rolls a cache back to it.

Buffers are numpy arrays on the CPU, or OrtValues allocated on the device for a GPU execution provider
(`device="cuda"`); both are bound by raw pointer, so the binding code is the same.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import onnxruntime as ort

from .config import TextConfig

Buffer = Union[np.ndarray, ort.OrtValue]

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

DECODER_GRAPHS = ("gqa", "plain")
# Graph inputs besides embeddings, positions, logits_to_keep and the past, per flavour.
CACHE_INPUTS = {"gqa": ("seqlens_k", "total_sequence_length"), "plain": ("attention_mask",)}
# KV buffer layout per flavour: "BNSH" head-major (1, kv_heads, max_len, D), "BSNH" sequence-major.
CACHE_LAYOUTS = {"gqa": "BNSH", "plain": "BSNH"}


class DecoderError(ValueError):
    """Bad decoder input, a graph that does not match the config, or a full KV cache."""


@dataclass
class KVCache:
    """Per-layer key/value buffers in `layout` ("BNSH": (1, kv_heads, max_len, head_dim), "BSNH":
    (1, max_len, kv_heads, head_dim)); positions [0, length) are valid."""

    keys: list[Buffer]
    values: list[Buffer]
    length: int = 0
    device: str = "cpu"
    device_id: int = 0
    layout: str = "BSNH"

    @classmethod
    def allocate(cls, num_layers: int, max_len: int, kv_heads: int, head_dim: int, dtype=np.float32,
                 device: str = "cpu", device_id: int = 0, layout: str = "BSNH", slots: int = 1) -> "KVCache":
        """slots > 1 (BNSH on the CPU): `slots` sequences' caches in one buffer per layer, (slots, kv_heads,
        max_len, head_dim); `slot(b)` is sequence b's cache, and a batched decode step binds them all at once."""
        if max_len < 1:
            raise DecoderError(f"KV cache max_len must be >= 1, got {max_len}")
        if layout not in CACHE_LAYOUTS.values():
            raise DecoderError(f"unknown KV cache layout {layout!r}")
        if slots != 1 and (layout != "BNSH" or device != "cpu"):
            raise DecoderError("a multi-slot KV cache needs the head-major (gqa) layout on the CPU")
        shape = (slots, kv_heads, max_len, head_dim) if layout == "BNSH" else (1, max_len, kv_heads, head_dim)

        def buffer() -> Buffer:
            if device == "cpu":
                return _anonymous_zeros(shape, dtype)
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, device_id)

        return cls([buffer() for _ in range(num_layers)], [buffer() for _ in range(num_layers)], 0, device, device_id,
                   layout)

    @property
    def slots(self) -> int:
        return _shape(self.keys[0])[0]

    def slot(self, b: int) -> "KVCache":
        """Sequence b's cache: views of slot b of every buffer (one contiguous block each), its own length."""
        if not 0 <= b < self.slots:
            raise DecoderError(f"slot {b} is outside the cache's {self.slots} slots")
        return KVCache([k[b:b + 1] for k in self.keys], [v[b:b + 1] for v in self.values], 0, self.device,
                       self.device_id, self.layout)

    @property
    def seq_axis(self) -> int:
        return 2 if self.layout == "BNSH" else 1

    @property
    def max_len(self) -> int:
        return _shape(self.keys[0])[self.seq_axis]

    @property
    def row_shape(self) -> tuple[int, int]:
        """(kv_heads, head_dim)."""
        shape = _shape(self.keys[0])
        return (shape[1], shape[3]) if self.layout == "BNSH" else (shape[2], shape[3])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.keys[0].dtype if self.device == "cpu" else _ORT_TYPES[self.keys[0].data_type()])

    def release(self, n: int) -> None:
        """Give the memory of positions [n, max_len) back to the OS (they read as zeros after); [0, n) stay.

        One large photo writes thousands of rows; without this they stay resident for the life of the process
        even when every later conversation is short. CPU buffers only (device memory is the provider's).
        """
        if self.device != "cpu":
            return
        for buf in (*self.keys, *self.values):
            _release_rows(buf, n, self.seq_axis)

    def truncate(self, n: int) -> None:
        """Roll back to the first n positions (kept rows are untouched; later steps overwrite the rest)."""
        if not 0 <= n <= self.length:
            raise DecoderError(f"cannot truncate a KV cache of length {self.length} to {n}")
        self.length = n

    def copy_prefix(self, n: int | None = None, max_len: int | None = None) -> "KVCache":
        """A new, independent cache holding this cache's first n positions (default: all of them)."""
        n = self.length if n is None else n
        if not 0 <= n <= self.length:
            raise DecoderError(f"prefix length {n} is outside the cache's valid length {self.length}")
        out = KVCache.allocate(len(self.keys), max_len or self.max_len, *self.row_shape, dtype=self.dtype,
                               device=self.device, device_id=self.device_id, layout=self.layout)
        out.load_prefix(self, n)
        return out

    def load_prefix(self, src: "KVCache", n: int | None = None) -> None:
        """Overwrite this cache with src's first n positions, reusing this cache's buffers."""
        n = src.length if n is None else n
        if not 0 <= n <= src.length or n > self.max_len:
            raise DecoderError(f"cannot load {n} positions from a cache of length {src.length} into max_len "
                               f"{self.max_len}")
        if (src.row_shape, src.dtype, len(src.keys), src.layout) != (self.row_shape, self.dtype, len(self.keys),
                                                                     self.layout):
            raise DecoderError("KV caches differ in layers, heads, head_dim, dtype or layout")
        rows = (slice(None),) * self.seq_axis + (slice(0, n),)
        for dst_list, src_list in ((self.keys, src.keys), (self.values, src.values)):
            for i, (dst, s) in enumerate(zip(dst_list, src_list)):
                if isinstance(dst, np.ndarray):
                    dst[rows] = _host(s)[rows]
                else:  # device buffers: ORT's Python API has no device-to-device copy, go through the host once
                    staged = _host(dst)
                    staged[rows] = _host(s)[rows]
                    dst.update_inplace(staged)
        self.length = n


def _anonymous_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros on their own anonymous mapping: pages are committed only as rows get written, and `_release_rows`
    can hand them back (madvise), which memory from np.zeros (malloc) does not allow."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(memory, dtype, count=int(np.prod(shape))).reshape(shape)


def _release_rows(buf: np.ndarray, n: int, seq_axis: int) -> None:
    """madvise away positions [n, max_len) of every block before `seq_axis` (each head's rows in BNSH). `buf` may
    be a view of one slot of a larger mapping (zoomin.runtime.batch's slot caches)."""
    root, owner = buf, buf.base
    while isinstance(owner, np.ndarray):
        root, owner = owner, owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner  # np.frombuffer holds a view of the mapping
    if not isinstance(owner, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    offset = buf.ctypes.data - root.ctypes.data  # where the view starts in the mapping (np.frombuffer: offset 0)
    blocks = int(np.prod(buf.shape[:seq_axis]))
    block_bytes = buf.nbytes // blocks
    row_bytes = block_bytes // buf.shape[seq_axis]
    page = mmap.PAGESIZE
    for b in range(blocks):
        start = -(-(offset + b * block_bytes + n * row_bytes) // page) * page  # whole pages only: round inwards
        end = offset + (b + 1) * block_bytes
        end = len(owner) if end >= len(owner) else end // page * page
        if start < end:
            owner.madvise(mmap.MADV_DONTNEED, start, end - start)


def _shape(buf: Buffer) -> tuple[int, ...]:
    return tuple(buf.shape) if isinstance(buf, np.ndarray) else tuple(buf.shape())


def _host(buf: Buffer) -> np.ndarray:
    return buf if isinstance(buf, np.ndarray) else buf.numpy()


def _ptr(buf: Buffer) -> int:
    return buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()


def graph_flavour(input_names) -> str:
    """Which decoder flavour a graph with these input names is (GroupQueryAttention graphs take seqlens_k)."""
    return "gqa" if "seqlens_k" in set(input_names) else "plain"


def empty_cache_inputs(graph: str, num_layers: int, kv_heads: int, head_dim: int, batch: int, seq: int,
                       dtype=np.float32) -> dict[str, np.ndarray]:
    """The cache inputs and (empty) past of a `seq`-token prefill on an empty cache, for a plain session.run
    (calibration and parity probes feed whole prompts this way; ORT then allocates the presents itself)."""
    if graph == "gqa":
        feeds = {"seqlens_k": np.full(batch, seq - 1, np.int32), "total_sequence_length": np.array(seq, np.int32)}
        empty = np.zeros((batch, kv_heads, 0, head_dim), dtype)
    else:
        feeds = {"attention_mask": np.ones((batch, seq), np.int64)}
        empty = np.zeros((batch, 0, kv_heads, head_dim), dtype)
    feeds.update({f"past_{kind}.{i}": empty for kind in ("key", "value") for i in range(num_layers)})
    return feeds


class Decoder:
    """One step of the text decoder: embeddings + M-RoPE positions in, logits out, KV cache advanced in place.

    graph: the flavour the engine's manifest declares (None: whichever the graph is).
    """

    def __init__(self, session: ort.InferenceSession, config: TextConfig, graph: str | None = None):
        self.session = session
        self.config = config
        layers = config.num_hidden_layers
        self.past_names = [(f"past_key.{i}", f"past_value.{i}") for i in range(layers)]
        self.present_names = [(f"present_key.{i}", f"present_value.{i}") for i in range(layers)]
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        found = graph_flavour(inputs)
        if graph is not None and graph not in DECODER_GRAPHS:
            raise DecoderError(f"unknown decoder graph {graph!r}: this runtime binds {', '.join(DECODER_GRAPHS)}; "
                               f"rebuild the engine with this zoomin")
        if graph is not None and graph != found:
            raise DecoderError(f"the manifest declares a {graph} decoder graph but the graph is {found}")
        self.graph = found
        wanted_in = {"inputs_embeds", "position_ids", "logits_to_keep", *CACHE_INPUTS[found]}
        wanted_in |= {n for pair in self.past_names for n in pair}
        wanted_out = {"logits"} | {n for pair in self.present_names for n in pair}
        if set(inputs) != wanted_in or set(outputs) != wanted_out:
            raise DecoderError(
                f"decoder graph does not match a {layers}-layer text config: inputs {sorted(inputs)}, outputs "
                f"{sorted(outputs)}"
            )
        kv = inputs["past_key.0"]
        kvh, d = config.num_key_value_heads, config.head_dim
        heads_dims = [kv.shape[1], kv.shape[3]] if found == "gqa" else list(kv.shape[2:])
        if kv.type not in _ORT_TYPES or len(kv.shape) != 4 or heads_dims != [kvh, d]:
            layout = f"(B, {kvh}, C, {d})" if found == "gqa" else f"(B, P, {kvh}, {d})"
            raise DecoderError(f"past_key.0 is {kv.type} {kv.shape}; config wants {layout} float or float16")
        self.cache_dtype = np.dtype(_ORT_TYPES[kv.type])
        self._binding = session.io_binding()
        self._mask = np.ones((1, 0), np.int64)  # plain: grown to the largest cache seen, then sliced per step
        self._logits: dict[int, np.ndarray] = {}  # (1, K, vocab) output buffers, one per K used
        self._batch_binding = session.io_binding()
        self._batch_logits: dict[int, np.ndarray] = {}  # (B, 1, vocab) output buffers of batched steps

    @classmethod
    def load(cls, path: str | Path, config: TextConfig, providers: list | None = None,
             options: ort.SessionOptions | None = None, graph: str | None = None) -> "Decoder":
        path = Path(path)
        if not path.is_file():
            raise DecoderError(f"decoder graph not found: {path}")
        session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        return cls(session, config, graph)

    def new_cache(self, max_len: int, device: str = "cpu", device_id: int = 0, slots: int = 1) -> KVCache:
        c = self.config
        return KVCache.allocate(c.num_hidden_layers, max_len, c.num_key_value_heads, c.head_dim,
                                self.cache_dtype, device, device_id, CACHE_LAYOUTS[self.graph], slots)

    def forward(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache, logits_to_keep: int = 1
                ) -> np.ndarray:
        """Run S new positions; returns logits (K, vocab) of the last K of them and advances cache.length by S.

        On the CPU the returned array is a reused output buffer, overwritten by the next call with the same K:
        copy it to keep it.
        """
        embeds, positions = np.asarray(embeds), np.asarray(positions)
        s, p = self._check(embeds, positions, cache, logits_to_keep)
        # Host inputs stay referenced by these locals until the run has finished.
        host_inputs = {
            "inputs_embeds": np.ascontiguousarray(embeds, np.float32)[None],
            "position_ids": np.ascontiguousarray(positions, np.int64)[:, None],
            "logits_to_keep": np.array([logits_to_keep], np.int64),
        }
        if self.graph == "gqa":
            host_inputs["seqlens_k"] = np.array([p + s - 1], np.int32)
            host_inputs["total_sequence_length"] = np.array(p + s, np.int32)
        else:
            if self._mask.shape[1] < cache.max_len:
                self._mask = np.ones((1, cache.max_len), np.int64)
            host_inputs["attention_mask"] = self._mask[:, : p + s]
        b = self._binding
        for name, array in host_inputs.items():
            b.bind_cpu_input(name, array)
        kv_heads, head_dim = cache.row_shape
        row_bytes = kv_heads * head_dim * self.cache_dtype.itemsize
        for (past_k, past_v), (new_k, new_v), key, value in zip(self.past_names, self.present_names,
                                                                   cache.keys, cache.values):
            for past, new, buf in ((past_k, new_k, key), (past_v, new_v, value)):
                base = _ptr(buf)
                if self.graph == "gqa":  # one buffer for both: the op appends rows [p, p + s) of every head
                    shape = [1, kv_heads, cache.max_len, head_dim]
                    b.bind_input(past, cache.device, cache.device_id, self.cache_dtype, shape, base)
                    b.bind_output(new, cache.device, cache.device_id, self.cache_dtype, shape, base)
                else:
                    b.bind_input(past, cache.device, cache.device_id, self.cache_dtype, [1, p, kv_heads, head_dim],
                                 base)
                    b.bind_output(new, cache.device, cache.device_id, self.cache_dtype, [1, s, kv_heads, head_dim],
                                  base + p * row_bytes)
        if cache.device == "cpu":
            logits = self._logits.get(logits_to_keep)
            if logits is None:
                logits = self._logits[logits_to_keep] = np.empty(
                    (1, logits_to_keep, self.config.vocab_size), np.float32)
            b.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        else:
            b.bind_output("logits", cache.device, cache.device_id)
        self.session.run_with_iobinding(b)
        cache.length = p + s
        if cache.device != "cpu":
            logits = b.get_outputs()[-1].numpy()  # bound last
        return logits[0]

    def forward_batch(self, embeds: np.ndarray, positions: np.ndarray, caches: Sequence[KVCache],
                      active: Sequence[bool] | None = None) -> np.ndarray:
        """One decode step of len(caches) sequences in one call: row b of embeds (B, hidden) and positions (3, B)
        is sequence b's next token. Returns (B, vocab) logits (a reused buffer: copy what you keep).

        gqa graph only: GroupQueryAttention takes each sequence's own length (seqlens_k), so sequences of any
        lengths share the call, and writes each new row at its sequence's length. The caches must be consecutive
        slots of one multi-slot cache (KVCache.slot), bound as one (B, kv_heads, max_len, head_dim) buffer. A slot
        with active False rides along without advancing: its row lands past its valid length, where the next
        write overwrites it, and its logits are to be ignored.
        """
        if self.graph != "gqa":
            raise DecoderError("batched decoding needs the gqa decoder graph; rebuild the engine with this zoomin")
        embeds, positions = np.asarray(embeds), np.asarray(positions)
        n = len(caches)
        active = [True] * n if active is None else list(active)
        if n < 1 or embeds.shape != (n, self.config.hidden_size) or positions.shape != (3, n) or len(active) != n:
            raise DecoderError(f"a batched step takes embeds ({n}, {self.config.hidden_size}) and positions (3, {n})"
                               f" for {n} caches, got {embeds.shape} and {positions.shape}")
        first = caches[0]
        lengths = np.array([c.length for c in caches], np.int32)
        for c in caches:
            self._check(embeds[:1], positions[:, :1], c, 1)
        slot_bytes = [_shape(k)[1] * _shape(k)[2] * _shape(k)[3] * self.cache_dtype.itemsize for k in first.keys]
        for j, c in enumerate(caches):
            for i, (k, v) in enumerate(zip(c.keys, c.values)):
                if (_ptr(k), _ptr(v)) != (_ptr(first.keys[i]) + j * slot_bytes[i], _ptr(first.values[i]) + j *
                                          slot_bytes[i]) or c.max_len != first.max_len:
                    raise DecoderError("batched caches must be consecutive slots of one multi-slot KV cache")
        host_inputs = {
            "inputs_embeds": np.ascontiguousarray(embeds, np.float32)[:, None],
            "position_ids": np.ascontiguousarray(positions, np.int64)[:, :, None],
            "logits_to_keep": np.array([1], np.int64),
            "seqlens_k": lengths,  # each sequence's length after the step, minus 1
            "total_sequence_length": np.array(lengths.max() + 1, np.int32),
        }
        b = self._batch_binding
        for name, array in host_inputs.items():
            b.bind_cpu_input(name, array)
        kv_heads, head_dim = first.row_shape
        shape = [n, kv_heads, first.max_len, head_dim]
        for (past_k, past_v), (new_k, new_v), key, value in zip(self.past_names, self.present_names, first.keys,
                                                                   first.values):
            for past, new, buf in ((past_k, new_k, key), (past_v, new_v, value)):
                b.bind_input(past, "cpu", 0, self.cache_dtype, shape, _ptr(buf))
                b.bind_output(new, "cpu", 0, self.cache_dtype, shape, _ptr(buf))
        logits = self._batch_logits.get(n)
        if logits is None:
            logits = self._batch_logits[n] = np.empty((n, 1, self.config.vocab_size), np.float32)
        b.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(b)
        for c, on in zip(caches, active):
            c.length += bool(on)
        return logits[:, 0]

    def _check(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache, keep: int) -> tuple[int, int]:
        hidden = self.config.hidden_size
        if embeds.ndim != 2 or embeds.shape[1] != hidden or embeds.shape[0] < 1:
            raise DecoderError(f"embeds must be (S, {hidden}) with S >= 1, got {embeds.shape}")
        s = embeds.shape[0]
        if positions.shape != (3, s) or not np.issubdtype(positions.dtype, np.integer):
            raise DecoderError(f"positions must be integer (3, {s}) M-RoPE rows, got {positions.dtype} "
                               f"{positions.shape}")
        if not 1 <= keep <= s:
            raise DecoderError(f"logits_to_keep must be in [1, {s}], got {keep}")
        if cache.dtype != self.cache_dtype or cache.row_shape != (self.config.num_key_value_heads,
                                                                  self.config.head_dim):
            raise DecoderError(f"KV cache {cache.dtype} {cache.row_shape} does not fit this decoder "
                               f"({self.cache_dtype}, {self.config.num_key_value_heads}, {self.config.head_dim})")
        if cache.layout != CACHE_LAYOUTS[self.graph]:
            raise DecoderError(f"KV cache layout {cache.layout} does not fit this {self.graph} decoder "
                               f"({CACHE_LAYOUTS[self.graph]}); make caches with Decoder.new_cache")
        if len(cache.keys) != self.config.num_hidden_layers:
            raise DecoderError(f"KV cache has {len(cache.keys)} layers, decoder {self.config.num_hidden_layers}")
        if cache.length + s > cache.max_len:
            raise DecoderError(f"KV cache full: {cache.length} + {s} positions exceed max_len {cache.max_len}")
        return s, cache.length
