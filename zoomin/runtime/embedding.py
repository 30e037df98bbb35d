"""The token embedding table: rows gathered for token ids, as float32, without ever loading the table whole.

dense (fp32 / fp16 engines): a memory-mapped .npy indexed by numpy; only the touched rows are paged in.
block_quantized (int8 / int4 engines): a graph of one com.microsoft GatherBlockQuantized over the block codes
(with tied embeddings, the decoder's own lm_head MatMulNBits initializers, read from its external data file at
their offsets). ONNX Runtime memory-maps the external data, so this too pages in only the rows it gathers, and
dequantizes them with the formula MatMulNBits uses. Measured on the 2-core CPU, 151936 x 2048 4-bit table: 1 token
0.06 ms (numpy doing the same 0.09 ms), 5000 tokens 74 ms (numpy 176 ms: ORT unpacks on both cores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import EngineError, TableSpec


class DenseTable:
    def __init__(self, table: np.ndarray):
        self.table = table  # (vocab, hidden)

    @classmethod
    def load(cls, path: Path) -> "DenseTable":
        return cls(np.load(path, mmap_mode="r"))

    @property
    def shape(self) -> tuple[int, int]:
        return self.table.shape

    @property
    def row_bytes(self) -> int:
        """Bytes one lookup reads per token."""
        return self.table.shape[1] * self.table.dtype.itemsize

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.table[ids], dtype=np.float32)


class BlockQuantizedTable:
    INPUT, OUTPUT = "input_ids", "embeds"  # the gather graph's interface

    def __init__(self, session, spec: TableSpec, shape: tuple[int, int]):
        self.session, self.spec, self.shape = session, spec, shape

    @classmethod
    def load(cls, path: Path, spec: TableSpec, shape: tuple[int, int], threads: int | None = None
             ) -> "BlockQuantizedTable":
        import onnxruntime as ort

        from .providers import session_options

        options = session_options(threads)
        # the decoder runs right after a lookup: idle gather threads must not spin on its cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return cls(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), spec, shape)

    @property
    def row_bytes(self) -> int:
        return block_row_bytes(self.spec, self.shape[1])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"token ids must be in [0, {self.shape[0]}), got {ids.min()}..{ids.max()}")
        out = self.session.run([self.OUTPUT], {self.INPUT: np.ascontiguousarray(ids.reshape(-1))})[0]
        return out.reshape(*ids.shape, self.shape[1])


def block_row_bytes(spec: TableSpec, hidden: int) -> int:
    """Bytes one lookup reads from a block_quantized table: the row's codes, float32 scales and zero points."""
    blocks = -(-hidden // spec.block_size)
    return -(-blocks * spec.block_size * spec.bits // 8) + 4 * blocks + -(-blocks * spec.bits // 8)


EmbeddingTable = DenseTable | BlockQuantizedTable


def load_table(root: Path, name: str, spec: TableSpec, shape: tuple[int, int], threads: int | None = None
               ) -> EmbeddingTable:
    """The engine's table (`name`: graphs["embed_tokens"]) as its manifest describes it; shape (vocab, hidden)."""
    path = Path(root) / name
    try:
        if spec.format == "dense":
            table = DenseTable.load(path)
            if table.shape != tuple(shape):
                raise EngineError(f"{path}: table is {table.shape}, the config says {tuple(shape)}")
            return table
        return BlockQuantizedTable.load(path, spec, shape, threads)
    except EngineError:
        raise
    except Exception as e:  # numpy / onnxruntime errors for unreadable files
        raise EngineError(f"{path}: cannot load the embedding table ({str(e).splitlines()[0]})") from None
