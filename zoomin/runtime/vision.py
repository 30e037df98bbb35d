"""Run the exported vision encoder: pixel_values of one or more images -> the merged image embeddings the LM takes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .config import VisionConfig
from .vision_meta import META_NAMES, VisionInputError, check_grid, graph_feeds, patch_counts

INPUT_NAMES = ("pixel_values", *META_NAMES)
OUTPUT_NAME = "image_embeds"


class VisionEncoder:
    """Wraps the vision graph; the grid-dependent inputs are computed here on the host (vision_meta)."""

    def __init__(self, session: ort.InferenceSession | str | Path, cfg: VisionConfig,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 options: ort.SessionOptions | None = None):
        if not isinstance(session, ort.InferenceSession):
            path = Path(session)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: vision graph not found")
            session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        names = {i.name for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if names != set(INPUT_NAMES) or outputs != [OUTPUT_NAME]:
            raise ValueError(
                f"not a zoomin vision graph: inputs {sorted(names)}, outputs {outputs}; "
                f"expected inputs {list(INPUT_NAMES)} and output {OUTPUT_NAME!r}")
        self.session, self.cfg = session, cfg

    def encode(self, pixel_values: np.ndarray, grid_thw: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """(sum t*h*w / merge^2, out_hidden_size) float32 embeddings, images in order.

        pixel_values: (sum t*h*w, patch_dim), the images' rows concatenated in image order (as the image
        processor returns them); grid_thw: (n_images, 3). Runs of equally sized images share one graph call
        (vision_meta.frame_runs): full-attention blocks take unpadded frames.
        """
        grid = check_grid(grid_thw, self.cfg)
        pixels = np.asarray(pixel_values)
        n = int(patch_counts(grid).sum())
        if pixels.shape != (n, self.cfg.patch_dim):
            raise VisionInputError(
                f"pixel_values has shape {pixels.shape}; grid_thw {grid.tolist()} needs ({n}, {self.cfg.patch_dim})")
        if not np.issubdtype(pixels.dtype, np.floating):
            raise VisionInputError(f"pixel_values must be floating point, got dtype {pixels.dtype}")
        feeds = graph_feeds(np.ascontiguousarray(pixels, dtype=np.float32), grid, self.cfg)
        out = [self.session.run([OUTPUT_NAME], feed)[0] for feed in feeds]
        return out[0] if len(out) == 1 else np.concatenate(out)
