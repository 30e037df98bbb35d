"""Run the exported vision encoder: pixel_values of one or more images -> the merged image embeddings the LM takes.

The tower is a short chain of *stage* graphs (zoomin.build.export_vision): a run of blocks that only mix rows
within windows, or the keys/values of one full-attention block. `run_tower` drives them frame by frame and chunk
by chunk over the host-side plan of zoomin.runtime.vision_meta, so the memory of one call is bounded by one frame
(its residual stream and one block's K/V) plus one chunk's activations, whatever the image size.

Stage I/O contract (rows: one chunk's, window order; F: the frame's patches):
  reads   pixel_values (rows, patch_dim) | hidden (rows, D); rotary_cos, rotary_sin (rows, head_dim);
          windows (G, L) (shape only); key.{h}, value.{h} (1, F, head_dim) float32 per head h (after a
          key/value stage)
  writes  hidden_out (rows, D) | key_out, value_out (heads, rows, head_dim) float32 | image_embeds (rows / 4, out)

Keys/values go in per head: ONNX Runtime's CPU MultiHeadAttention runs flash attention only on (B, L, heads*hd)
keys, which it first copies into a per-head layout; one head at a time that copy is F x head_dim (20 MB at 65k
patches) instead of the whole K/V (630 MB). (With (B, heads, L, hd) keys it would not copy, but it materialises
the (heads, rows, F) scores instead.) The frame's buffers are (heads, 1, F, head_dim), so each head's is a view.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .config import VisionConfig
from .vision_meta import (CHUNK_ROWS, VisionInputError, check_grid, chunk_inputs, patch_counts, patch_positions,
                          vision_plan)

STAGE_INPUTS = frozenset({"pixel_values", "hidden", "rotary_cos", "rotary_sin", "windows"})
HEAD_INPUT = re.compile(r"(key|value)\.(\d+)")  # key.{h} / value.{h}
# what a stage writes -> the graph output's name (a graph cannot name an output like an input)
STAGE_OUTPUTS = {"hidden": "hidden_out", "key": "key_out", "value": "value_out", "image_embeds": "image_embeds"}
STAGE_FILE = re.compile(r"stage(\d+)\.onnx")


class Stage:
    """One stage graph in an onnxruntime session, called with the scheduler's values (it reads what it needs)."""

    def __init__(self, session: ort.InferenceSession, name: str = "stage"):
        self.session = session
        self.inputs = tuple(i.name for i in session.get_inputs())
        self.outputs = tuple(o.name for o in session.get_outputs())
        known = all(n in STAGE_INPUTS or HEAD_INPUT.fullmatch(n) for n in self.inputs)
        if not known or not self.outputs or \
                not set(self.outputs) <= set(STAGE_OUTPUTS.values()):
            raise ValueError(f"{name}: not a zoomin vision stage graph: inputs {list(self.inputs)}, outputs "
                             f"{list(self.outputs)}; expected inputs among {sorted(STAGE_INPUTS)}, key.N, value.N "
                             f"and outputs "
                             f"among {sorted(STAGE_OUTPUTS.values())}")

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(list(self.outputs), {n: feed[n] for n in self.inputs})))


StageFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def stage_files(directory: Path) -> list[Path]:
    """The stage graphs of a vision directory, in order (stage0.onnx, stage1.onnx, ...)."""
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := STAGE_FILE.fullmatch(p.name)))
    if [i for i, _ in found] != list(range(len(found))) or not found:
        raise FileNotFoundError(f"{directory}: no vision stage graphs stage0.onnx .. stageN.onnx")
    return [p for _, p in found]


def run_tower(stages: Sequence[StageFn], pixel_values: np.ndarray, grid: np.ndarray, cfg: VisionConfig,
              chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """(N / merge^2, out_hidden_size) float32 embeddings of images `grid` whose rows `pixel_values` (N, patch_dim)
    are concatenated in order; each stage is a callable with `inputs` / `outputs` names (Stage)."""
    positions = patch_positions(grid, cfg.spatial_merge_size)
    out = np.empty((int(patch_counts(grid).sum()) // cfg.spatial_merge_size**2, cfg.out_hidden_size), np.float32)
    for frame in vision_plan(grid, cfg, chunk_rows):
        shared = [chunk_inputs(c, positions, cfg) for c in frame.chunks]
        hidden = key = value = None
        for stage in stages:
            written, heads = hidden, sum(1 for n in stage.inputs if n.startswith("key."))
            if "key_out" in stage.outputs:
                key = value = None  # the last full-attention block's: no later stage reads them
            for chunk, feed in zip(frame.chunks, shared):
                feed = dict(feed)
                if "pixel_values" in stage.inputs:
                    feed["pixel_values"] = pixel_values[chunk.patches]
                if "hidden" in stage.inputs:
                    feed["hidden"] = hidden[chunk.rows]
                for h in range(heads):
                    feed[f"key.{h}"], feed[f"value.{h}"] = key[h], value[h]
                res = stage(feed)
                if "image_embeds" in res:
                    out[chunk.units] = res["image_embeds"]
                if "hidden_out" in res:
                    h = res["hidden_out"]
                    if written is None or written.dtype != h.dtype:  # the stream turns float32 at an fp32 down_proj
                        written = np.empty((frame.length, h.shape[1]), h.dtype)
                    written[chunk.rows] = h  # in place: a chunk's rows are read by no other chunk of the stage
                if "key_out" in res:
                    if key is None:
                        shape = (res["key_out"].shape[0], 1, frame.length, res["key_out"].shape[2])
                        key, value = np.empty(shape, np.float32), np.empty(shape, np.float32)
                    key[:, 0, chunk.rows], value[:, 0, chunk.rows] = res["key_out"], res["value_out"]
            hidden = written
    return out


class VisionEncoder:
    """The vision stage graphs of an engine; the grid-dependent plan is computed here on the host (vision_meta)."""

    def __init__(self, stages: str | Path | Sequence[ort.InferenceSession | StageFn], cfg: VisionConfig,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 options: ort.SessionOptions | None = None, chunk_rows: int = CHUNK_ROWS):
        if isinstance(stages, (str, Path)):
            directory = Path(stages)
            if not directory.is_dir():
                raise FileNotFoundError(f"{directory}: vision graph directory not found")
            stages = [ort.InferenceSession(str(p), sess_options=options, providers=list(providers))
                      for p in stage_files(directory)]
        # sessions are wrapped; anything else is already a stage callable with inputs/outputs (TensorRT plans,
        # zoomin.trtllm.TrtStage)
        self.stages = [Stage(s, f"vision stage {i}") if isinstance(s, ort.InferenceSession) else s
                       for i, s in enumerate(stages)]
        if "pixel_values" not in self.stages[0].inputs or self.stages[-1].outputs != ("image_embeds",):
            raise ValueError("not a zoomin vision graph: the first stage must read pixel_values and the last write "
                             "image_embeds")
        self.cfg, self.chunk_rows = cfg, chunk_rows

    def encode(self, pixel_values: np.ndarray, grid_thw: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """(sum t*h*w / merge^2, out_hidden_size) float32 embeddings, images in order.

        pixel_values: (sum t*h*w, patch_dim), the images' rows concatenated in image order (as the image
        processor returns them); grid_thw: (n_images, 3). Images of any sizes go in one call.
        """
        grid = check_grid(grid_thw, self.cfg)
        pixels = np.asarray(pixel_values)
        n = int(patch_counts(grid).sum())
        if pixels.shape != (n, self.cfg.patch_dim):
            raise VisionInputError(
                f"pixel_values has shape {pixels.shape}; grid_thw {grid.tolist()} needs ({n}, {self.cfg.patch_dim})")
        if not np.issubdtype(pixels.dtype, np.floating):
            raise VisionInputError(f"pixel_values must be floating point, got dtype {pixels.dtype}")
        return run_tower(self.stages, np.asarray(pixels, dtype=np.float32), grid, self.cfg, self.chunk_rows)


def encode_new(encoder, images, cache: dict[int, np.ndarray], merge_size: int) -> None:
    """Encode the PreprocessedImages not yet in `cache` (keyed by id, one conversation's) in one `encoder.encode`
    call and store each image's slice of the embeddings there; language-model backends share it."""
    todo = [im for im in images if id(im) not in cache]
    if not todo:
        return
    merge2 = merge_size ** 2
    # one image (the usual call) goes in as it is: concatenating would copy its pixels (288 MB at 12.8 MP)
    pixels = todo[0].pixel_values if len(todo) == 1 else np.concatenate([im.pixel_values for im in todo])
    embeds = encoder.encode(pixels, np.stack([im.grid_thw for im in todo]))
    offset = 0
    for im in todo:
        n = int(np.prod(im.grid_thw)) // merge2
        cache[id(im)] = embeds[offset:offset + n]
        offset += n
