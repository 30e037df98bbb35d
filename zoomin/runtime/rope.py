"""Multimodal rotary positions (M-RoPE) of a Qwen2.5-VL token sequence, in numpy.

Each token gets three position ids (temporal, height, width rows). Text advances all three rows by one per
token. An image's merged tokens all sit at the image's start position on the temporal row and count their
row / column on the height / width rows; the text after the image resumes at start + max(h, w) / merge.
Positions therefore fall behind token indices after an image, by `rope_delta = max(position) + 1 - len(ids)`.

That single number is all a cached prefix has to keep: every text token at cache index i after the last image
sits at i + rope_delta, which gives both the decode-step rule and the start of an appended turn. The results
are identical to transformers' `Qwen2_5_VLModel.get_rope_index` (the reference the tests hold this to).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def image_token_count(grid_thw: Sequence[int], merge_size: int) -> int:
    """LLM tokens of one image: its (t, h, w) patch grid after the vision tower's merge x merge pooling.

    A still image is a single temporal patch (the image processor repeats the frame to fill it), so t must be 1;
    h and w must be multiples of the merge size, as every grid the image processor produces is.
    """
    t, h, w = _grid(grid_thw)
    if t != 1 or h % merge_size or w % merge_size:
        raise ValueError(
            f"image grid_thw {(t, h, w)} is not a still-image grid for merge size {merge_size}: "
            f"need t == 1 and h, w multiples of {merge_size}"
        )
    return h * w // merge_size**2


def mrope_positions(
    input_ids: Sequence[int] | np.ndarray,
    image_grid_thw: Sequence[Sequence[int]] | np.ndarray | None = None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    past_len: int = 0,
    past_rope_delta: int = 0,
) -> tuple[np.ndarray, int]:
    """M-RoPE positions (int64, shape (3, N)) of `input_ids` and the sequence's rope_delta.

    Every maximal run of `image_token_id` is one image, matched in order with `image_grid_thw` (one (t, h, w)
    per image, as the image processor returns it); a run must hold exactly that image's token count.

    For a whole sequence leave `past_len` / `past_rope_delta` at 0: the result is HF's get_rope_index.
    To append tokens (a new turn, with or without images) to a cached prefix of `past_len` tokens whose
    rope_delta was `past_rope_delta`, pass both: the positions and the returned rope_delta are those of the
    whole conversation computed from scratch, so prefill can run on the new tokens only. The split must not
    fall inside an image's run of tokens.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"input_ids must be a 1-D integer sequence, got shape {ids.shape} dtype {ids.dtype}")
    grids = [] if image_grid_thw is None else list(image_grid_thw)
    n = ids.size
    is_image = ids == image_token_id
    cuts = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    bounds = np.concatenate([[0], cuts, [n]]) if n else np.zeros(1, np.int64)

    positions = np.empty((3, n), dtype=np.int64)
    next_pos = past_len + past_rope_delta
    image = 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        if not is_image[start]:
            positions[:, start:end] = np.arange(next_pos, next_pos + end - start)
            next_pos += end - start
            continue
        if image >= len(grids):
            raise ValueError(f"input_ids hold more image token runs than the {len(grids)} image grids given")
        count = image_token_count(grids[image], spatial_merge_size)
        _, h, w = _grid(grids[image])
        if end - start != count:
            raise ValueError(
                f"image {image} has {end - start} image tokens in input_ids but its grid_thw {(1, h, w)} needs {count}"
            )
        h, w = h // spatial_merge_size, w // spatial_merge_size
        positions[:, start:end] = np.indices((1, h, w)).reshape(3, -1) + next_pos
        next_pos += max(h, w)
        image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} image grids given but input_ids hold {image} image token runs")
    if n == 0:
        return positions, past_rope_delta
    return positions, int(positions.max()) + 1 - (past_len + n)


def decode_positions(cache_index: int, rope_delta: int, count: int = 1) -> np.ndarray:
    """Positions (int64, (3, count)) of text tokens fed at cache indices cache_index, ...: index + rope_delta.

    This is the rule HF applies during generation (cache_position + rope_deltas on all three rows); it holds
    for any text that follows the sequence's last image.
    """
    return np.broadcast_to(np.arange(cache_index, cache_index + count, dtype=np.int64) + rope_delta, (3, count)).copy()


def _grid(grid_thw: Sequence[int]) -> tuple[int, int, int]:
    values = [int(v) for v in np.asarray(grid_thw).reshape(-1)]
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"grid_thw must be three positive integers (t, h, w), got {list(values)}")
    return values[0], values[1], values[2]
