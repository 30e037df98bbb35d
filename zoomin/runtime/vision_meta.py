"""Host-side plan of the vision encoder: which rows each graph call takes, computed from `grid_thw` in numpy.

The Qwen2.5-VL vision tower mixes two attention patterns whose structure depends on the image grid: windowed
blocks attend within 112 px windows (4 x 4 merged units = 64 patches, partial at the right/bottom edges) and
full-attention blocks attend within one frame. Such data-dependent structure cannot live in an exported graph,
so the runtime computes it here.

Design (exact, bounded memory for any image size). Every op of the tower is row-wise except attention, frames
never interact, and a window's rows only meet each other until the next full-attention block. So the tower runs
frame by frame, each frame as `chunks` of at most ~CHUNK_ROWS patch rows; a chunk holds whole windows of one
shape (full 4x4 windows, the right edge's, the bottom edge's, the corner), its rows in transformers' window order
(units row-major inside a window, the 4 patches of a unit consecutive). A windowed block is then a reshape to
(windows, window_len) and plain attention per window: no gather, no padding, no mask. A full-attention block
needs every key of its frame: one graph call per chunk computes that chunk's keys/values into the frame's K/V
buffers, then each chunk's queries attend over all of them (ONNX Runtime's MultiHeadAttention: tiled flash
attention, no (heads, N, N) scores). What a frame holds at once is its residual stream, one block's K/V and one
chunk's activations; a 12.8-megapixel photo (65k patches) needs ~1 GB instead of the ~5 GB of one whole-tower
call.

The merger's groups of four consecutive patches are merged units in both orders, so the last stage's rows are
merged units in window order: `Chunk.units` puts them back in the processor's order.

Index arrays are int64, rotary tables float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import VisionConfig

# The vision tower's axial rotary base; Qwen2.5-VL configs do not carry it (transformers' default for "axial").
VISION_ROPE_THETA = 10_000.0

# Patch rows per graph call (whole windows: up to 32 full windows). A chunk's activations (the MLP's two
# (rows, 3420) float32 intermediates, qkv) stay ~100 MB at 3B widths; larger chunks are no faster (the matmuls
# are already large) and smaller ones multiply the calls.
CHUNK_ROWS = 2048


class VisionInputError(ValueError):
    """grid_thw / pixel_values the vision encoder cannot take; the message names the problem."""


def check_grid(grid_thw: np.ndarray | Sequence[Sequence[int]], cfg: VisionConfig) -> np.ndarray:
    """`grid_thw` as an (n, 3) int64 array, or a VisionInputError saying what is wrong with it."""
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise VisionInputError(f"grid_thw must have shape (n_images, 3) with n_images >= 1, got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise VisionInputError(f"grid_thw must be integer, got dtype {grid.dtype}")
    grid = grid.astype(np.int64)
    m = cfg.spatial_merge_size
    for t, h, w in grid.tolist():
        if t < 1 or h < m or w < m or h % m or w % m:
            raise VisionInputError(
                f"grid_thw row {(t, h, w)} is invalid: need t >= 1 and h, w positive multiples of the "
                f"spatial merge size {m}"
            )
    return grid


def patch_counts(grid: np.ndarray) -> np.ndarray:
    """Patches (pixel_values rows) per image: t * h * w."""
    return grid.prod(axis=1)


def patch_positions(grid: np.ndarray, merge: int) -> np.ndarray:
    """(N, 2) int64 (row, col) of every patch, in the processor's merge-block-major order, frames repeated."""
    out = []
    for t, h, w in grid.tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        pos = np.stack([rows.reshape(block).transpose(0, 2, 1, 3).ravel(),
                        cols.reshape(block).transpose(0, 2, 1, 3).ravel()], axis=-1)
        out.append(np.tile(pos, (t, 1)))
    return np.concatenate(out).astype(np.int64)


def rotary_inv_freq(cfg: VisionConfig) -> np.ndarray:
    """(head_dim / 4,) float32 inverse frequencies, shared by the row and the column angles."""
    spatial_dim = cfg.head_dim // 2
    exponent = np.arange(0, spatial_dim, 2, dtype=np.float32) / np.float32(spatial_dim)
    return (1.0 / np.float32(VISION_ROPE_THETA) ** exponent).astype(np.float32)


def rotary_at(positions: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (len(positions), head_dim) float32, for (row, col) patch positions: axial rope with the
    h angles then the w angles, twice over; computed in float32 exactly as transformers does."""
    angles = positions.astype(np.float32)[:, :, None] * rotary_inv_freq(cfg)
    angles = angles.reshape(len(angles), -1)  # (n, [h freqs, w freqs])
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotary_tables(grid: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (N, head_dim) float32, of every patch in the processor's order."""
    return rotary_at(patch_positions(grid, cfg.spatial_merge_size), cfg)


def window_units(grid: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    """(n_windows, units_per_window) int64: the merged units of every window, -1 where the window is cut off.

    Windows tile each frame from the top-left in row-major order; inside a window the units are row-major.
    This is exactly transformers' window order (its `window_index` is the valid entries, flattened).
    """
    m = cfg.spatial_merge_size
    side = cfg.window_size // m // cfg.patch_size  # merged units per window side (4)
    windows, offset = [], 0
    for t, h, w in grid.tolist():
        lh, lw = h // m, w // m
        nh, nw = -(-lh // side), -(-lw // side)
        for _ in range(t):
            units = np.full((nh * side, nw * side), -1, dtype=np.int64)
            units[:lh, :lw] = offset + np.arange(lh * lw).reshape(lh, lw)
            windows.append(units.reshape(nh, side, nw, side).transpose(0, 2, 1, 3).reshape(nh * nw, side * side))
            offset += lh * lw
    return np.concatenate(windows)


def window_index(grid: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """transformers' (window_index, cu_window_seqlens): merged units in window order and patch boundaries.

    The plan does not use these (it cuts windows by shape directly); they document and test the window order.
    """
    units = window_units(grid, cfg)
    valid = units >= 0
    cu = np.concatenate([[0], np.cumsum(valid.sum(axis=1)) * cfg.spatial_merge_size**2]).astype(np.int32)
    return units[valid], cu


@dataclass(frozen=True)
class Chunk:
    """One graph call: `windows` whole windows of one shape, `window_len` patches each, of one frame."""

    rows: slice  # its rows of the frame's sequence (chunks in plan order, rows in window order)
    patches: np.ndarray  # (rows,) int64: the pixel_values row of each of its rows
    windows: int
    window_len: int

    @property
    def units(self) -> np.ndarray:
        """(rows / 4,) int64: the merged unit (image_embeds row) each group of 4 rows becomes."""
        return self.patches[::4] // 4

    def window_rows(self) -> np.ndarray:
        """(windows, window_len) int64, the graph input `windows`: the graph takes only its shape."""
        return self.patches.reshape(self.windows, self.window_len)


@dataclass(frozen=True)
class Frame:
    length: int  # patches; full-attention blocks attend over all of them
    chunks: tuple[Chunk, ...]


def _window_blocks(units: int, side: int) -> list[tuple[int, int]]:
    """[start, size) of the windows along one axis of `units` merged units: full windows, then the cut-off one."""
    full, rest = divmod(units, side)
    return [(i * side, side) for i in range(full)] + ([(full * side, rest)] if rest else [])


def frame_chunks(first_unit: int, lh: int, lw: int, cfg: VisionConfig, chunk_rows: int = CHUNK_ROWS
                 ) -> tuple[Chunk, ...]:
    """The chunks of one frame of lh x lw merged units whose first unit is `first_unit` (global index)."""
    side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    unit = cfg.spatial_merge_size**2
    grid_units = first_unit + np.arange(lh * lw, dtype=np.int64).reshape(lh, lw)
    rows, cols = _window_blocks(lh, side), _window_blocks(lw, side)
    # windows grouped by shape (hr x wc units); inside a group, transformers' row-major window order
    shapes: dict[tuple[int, int], list[np.ndarray]] = {}
    for r0, hr in rows:
        for c0, wc in cols:
            shapes.setdefault((hr, wc), []).append(grid_units[r0:r0 + hr, c0:c0 + wc].ravel())
    chunks, start = [], 0
    for (hr, wc), windows in shapes.items():
        length = hr * wc * unit
        per_call = max(1, chunk_rows // length)
        for i in range(0, len(windows), per_call):
            group = np.concatenate(windows[i:i + per_call])
            patches = (group[:, None] * unit + np.arange(unit)).ravel()
            chunks.append(Chunk(slice(start, start + len(patches)), patches, len(windows[i:i + per_call]), length))
            start += len(patches)
    return tuple(chunks)


def vision_plan(grid_thw: np.ndarray | Sequence[Sequence[int]], cfg: VisionConfig, chunk_rows: int = CHUNK_ROWS
                ) -> list[Frame]:
    """Every frame of images `grid_thw` (in order; a t-frame image gives t frames) cut into chunks."""
    grid = check_grid(grid_thw, cfg)
    m = cfg.spatial_merge_size
    frames, first = [], 0
    for t, h, w in grid.tolist():
        lh, lw = h // m, w // m
        for _ in range(t):
            frames.append(Frame(h * w, frame_chunks(first, lh, lw, cfg, chunk_rows)))
            first += lh * lw
    return frames


def chunk_inputs(chunk: Chunk, positions: np.ndarray, cfg: VisionConfig) -> dict[str, np.ndarray]:
    """The inputs every stage call of `chunk` takes besides its rows: rotary tables and the window shape.

    positions: patch_positions of the whole call's grid.
      rotary_cos, rotary_sin  (rows, head_dim)      float32
      windows                 (windows, window_len) int64
    """
    cos, sin = rotary_at(positions[chunk.patches], cfg)
    return {"rotary_cos": cos, "rotary_sin": sin, "windows": chunk.window_rows()}
