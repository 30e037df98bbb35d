"""Host-side metadata of the vision encoder graph, computed from `grid_thw` in numpy.

The Qwen2.5-VL vision tower mixes two attention patterns whose structure depends on the image grid: windowed
blocks attend within 112 px windows (4 x 4 merged units = 64 patches, partial at the right/bottom edges) and
full-attention blocks attend within one frame. Such data-dependent indices cannot live in an exported graph, so
the runtime computes them here and feeds them as inputs.

Design (exact, no O(N^2) masks or scores). Transformers permutes the patch sequence into window order so that windows
become contiguous `cu_seqlens` segments, then undoes the permutation after the merger. The graph instead keeps
the processor's patch order end to end (every op but attention is row-wise, and the merger's groups of four
consecutive patches are the same in both orders). Windowed blocks run *grouped* attention: the rows of q/k/v
are gathered into padded groups `(G, L)`, one per window (L = 64, patches in the order transformers puts them,
so even the summation order matches), attention runs per group with a key-validity mask, and the results are
gathered back to patch order; full-attention blocks attend within each frame. No permutation / reverse index (`argsort`) is needed, and every window holds at least one valid key, so no
softmax row is fully masked.

Full-attention groups are never padded: the frames of one call must all have the same length (`frame_runs` splits
a list of images into such calls). That lets the graph run those blocks through ONNX Runtime's MultiHeadAttention
without a mask, which on the CPU is a tiled (flash) kernel: O(N) memory instead of the (heads, N, N) scores that
made a 4-megapixel photo need ~25 GB.

All index arrays are int64 (onnx Gather accepts it; an int32/int64 mix is what broke ONNX Slice in a public
export), masks are bool, rotary tables float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import VisionConfig

# The vision tower's axial rotary base; Qwen2.5-VL configs do not carry it (transformers' default for "axial").
VISION_ROPE_THETA = 10_000.0

# Graph input names, in order, after `pixel_values`.
META_NAMES = (
    "rotary_cos",
    "rotary_sin",
    "window_gather",
    "window_valid",
    "window_scatter",
    "full_gather",
)


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


def rotary_tables(grid: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (N, head_dim) float32: axial rope with the h angles then the w angles, twice over.

    Computed in float32 exactly as transformers does (position * inv_freq, then cos/sin).
    """
    angles = patch_positions(grid, cfg.spatial_merge_size).astype(np.float32)[:, :, None] * rotary_inv_freq(cfg)
    angles = angles.reshape(len(angles), -1)  # (N, [h freqs, w freqs])
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


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

    The graph does not take these (it gathers windows directly); they document and test the window order.
    """
    units = window_units(grid, cfg)
    valid = units >= 0
    cu = np.concatenate([[0], np.cumsum(valid.sum(axis=1)) * cfg.spatial_merge_size**2]).astype(np.int32)
    return units[valid], cu


def grouped(groups: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gather, valid, scatter) for grouped attention over rows `groups` (G, L), -1 marking padding.

    gather (G, L) int64: the row each slot reads (padding reads row 0 and is masked out as a key);
    valid  (G, L) bool:  which slots are real rows;
    scatter (N,) int64:  the flat slot (g * L + l) that holds each row, to gather the results back.
    """
    valid = groups >= 0
    scatter = np.empty(n_rows, dtype=np.int64)
    scatter[groups[valid]] = np.flatnonzero(valid)
    return np.where(valid, groups, 0).astype(np.int64), valid, scatter


def window_groups(grid: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gather, valid, scatter) of the windowed blocks' groups (`grouped`), for images of any sizes."""
    units = window_units(grid, cfg)
    unit = cfg.spatial_merge_size**2
    win = np.where(units[:, :, None] >= 0, units[:, :, None] * unit + np.arange(unit), -1)
    return grouped(win.reshape(len(units), -1), int(patch_counts(grid).sum()))


def frame_runs(grid_thw: np.ndarray | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """[start, end) image ranges of consecutive images whose frames are all the same size: one graph call each."""
    sizes = [h * w for _, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist()]
    runs, start = [], 0
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or sizes[i] != sizes[start]:
            runs.append((start, i))
            start = i
    return runs


def vision_inputs(grid_thw: np.ndarray | Sequence[Sequence[int]], cfg: VisionConfig) -> dict[str, np.ndarray]:
    """Every graph input besides `pixel_values`, for images with patch grids `grid_thw` (n, 3).

    N = sum(t*h*w) patches (pixel_values rows, in processor order), Gw windows, Gf = sum(t) frames:
      rotary_cos, rotary_sin  (N, head_dim)  float32
      window_gather           (Gw, 64)       int64   patch rows of each window (64 = (window/patch)^2)
      window_valid            (Gw, 64)       bool
      window_scatter          (N,)           int64   flat window slot of each patch
      full_gather             (Gf, L)        int64   patch rows of each frame, L = h*w (equal for every frame);
                                                     frames are consecutive rows, so the graph only reshapes by
                                                     this input's shape (no gather, no scatter back)
    """
    grid = check_grid(grid_thw, cfg)
    if len(frame_runs(grid)) > 1:
        raise VisionInputError(f"grid_thw {grid.tolist()}: frames of one call must have equal h*w (full-attention "
                               "blocks are unpadded); split the images with frame_runs")
    n = int(patch_counts(grid).sum())
    window_gather, window_valid, window_scatter = window_groups(grid, cfg)
    frame_len = int(grid[0, 1] * grid[0, 2])
    full_gather = np.arange(n, dtype=np.int64).reshape(-1, frame_len)  # frames are consecutive rows

    cos, sin = rotary_tables(grid, cfg)
    return {
        "rotary_cos": cos,
        "rotary_sin": sin,
        "window_gather": window_gather,
        "window_valid": window_valid,
        "window_scatter": window_scatter,
        "full_gather": full_gather,
    }


def graph_feeds(pixel_values: np.ndarray, grid_thw: np.ndarray | Sequence[Sequence[int]], cfg: VisionConfig
                ) -> list[dict[str, np.ndarray]]:
    """The vision graph's feeds for images `grid_thw` whose rows `pixel_values` are concatenated in order: one
    feed per run of equally sized images (`frame_runs`), since one call takes only equal frames."""
    grid = check_grid(grid_thw, cfg)
    rows = np.concatenate([[0], np.cumsum(patch_counts(grid))])
    return [{"pixel_values": pixel_values[rows[a]:rows[b]], **vision_inputs(grid[a:b], cfg)}
            for a, b in frame_runs(grid)]
