"""Parity against transformers one decoder layer at a time, for models the build does not load whole.

`DecoderLayerParity` is an `on_piece` hook of the decoder export: every fp32/fp16 piece runs, as it is exported,
on a fixed probe prompt (rows of the embedding table, M-RoPE positions around one image), and the transformers
module it was exported from (rebuilt from the checkpoint in float32) runs on the very same inputs: layer i's inputs
are the ONNX outputs of the pieces before it, so each figure is that piece's own error and errors do not compound
through the depth the way a whole-model comparison's do. The prologue is covered by the layers, which take its
rotary tables (and the plain graph's mask) while transformers' layers take transformers' own rotary embedding and
a causal mask of their own.

The vision tower is small enough to be checked whole at every Qwen2.5-VL size (670M parameters, 2.7 GB in
float32): `vision_tower` builds just the tower from the checkpoint for export_vision.vision_parity.
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.decoder import empty_cache_inputs
from ..runtime.rope import mrope_positions
from .export_decoder import relative_error
from .stitch import Piece
from .streaming import run_piece

PROBE_TEXT = 6  # text tokens on each side of the probe's image
PROBE_GRID = (1, 8, 8)  # the probe image's patch grid: 16 image tokens


class DecoderLayerParity:
    """`errors`: max relative error per piece (layers.i: hidden states out; epilogue: logits)."""

    def __init__(self, parts, graph: str = "gqa", seed: int = 0):
        """graph: the flavour of the decoder being exported (export_decoder.graph_for)."""
        self.parts = parts
        t, merge = parts.text, parts.vision.spatial_merge_size
        image = int(np.prod(PROBE_GRID)) // merge**2
        ids = np.array([0] * PROBE_TEXT + [1] * image + [0] * PROBE_TEXT)  # only which tokens are image pads counts
        positions, _ = mrope_positions(ids, [PROBE_GRID], image_token_id=1, spatial_merge_size=merge)
        table = next(iter(parts.embedding_rows(4096))).float().numpy()
        rows = np.random.default_rng(seed).integers(len(table), size=len(ids))
        self.space = {"inputs_embeds": table[rows][None], "position_ids": positions[:, None],
                      "logits_to_keep": np.array([len(ids)], np.int64),
                      **empty_cache_inputs(graph, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, 1, len(ids))}
        # transformers' layers take the causal mask as an additive (B, 1, S, S) bias
        self.causal = torch.full((len(ids), len(ids)), torch.finfo(torch.float32).min).triu(1)[None, None]
        self.rotary = parts.text_rotary()
        self.errors: dict[str, float] = {}

    def __call__(self, piece: Piece) -> Piece:
        inputs = dict(self.space)
        if piece.name != "prologue":  # the cache dtype follows the graph (fp16 graphs take fp16 past rows)
            dtype = inputs["hidden"].dtype
            inputs.update({k: v.astype(dtype) for k, v in inputs.items() if k.startswith("past_")})
            self.space.update(inputs)
        run_piece(piece, [self.space], keep=lambda name: not name.startswith("present_"))
        with torch.no_grad():
            if piece.name.startswith("layers."):
                layer = self.parts.text_layer(int(piece.name.split(".")[1])).float()
                x = torch.from_numpy(inputs["hidden"]).float()
                cos, sin = self.rotary(x, torch.from_numpy(inputs["position_ids"]))
                ref = layer(x, attention_mask=self.causal, position_embeddings=(cos, sin))
                self.errors[piece.name] = relative_error(self.space["hidden"], ref.numpy())
            elif piece.name == "epilogue":
                x = torch.from_numpy(inputs["hidden"]).float()
                ref = self.parts.lm_head().float()(self.parts.text_norm().float()(x))
                self.errors[piece.name] = relative_error(self.space["logits"], ref.numpy())
        return piece

    def summary(self) -> dict:
        layers = [v for k, v in self.errors.items() if k.startswith("layers.")]
        return {"decoder_layer_max_rel_err": max(layers), "logits_max_rel_err": self.errors["epilogue"],
                "decoder_layer_errors": self.errors}
