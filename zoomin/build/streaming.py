"""The quantized build's calibration and quantization, one piece (layer, block) at a time.

No float32 model, graph or engine ever exists whole. The export (export_vision / export_decoder) hands each fp32
piece to `StreamedQuantizer`, which
1. runs it on that piece's calibration inputs: the float32 outputs of the pieces before it, on every calibration
   call (like GPTQ's own layer-wise procedure, each layer sees the float32 model's activations),
2. quantizes it with zoomin.build.quantize on exactly those inputs,
3. stores its outputs as the next piece's inputs and deletes the fp32 piece (or keeps it for a reference graph),
and the export stitches the quantized pieces. Quantizing a piece with the same feeds it would see inside the whole
graph gives the whole-graph result: dynamic int8 and RTN/HQQ never look at activations, GPTQ's Hessians and fp8's
activation scales are per MatMul input, which a piece computes exactly as the whole graph does.

The order is vision first (its float32 features are query 2's inputs), then the decoder:
- `record` the conversations with a stand-in engine (placeholder features) to get the vision calls' pixels;
- the vision pieces on those calls' feeds -> every call's float32 image features;
- `record` again with those features replayed: every decoder call's inputs (calibration.conversation_feed);
- the decoder pieces on one empty-cache prefill per conversation; the epilogue's float32 logits fill in the
  recording (`DecoderQuantizer.fill_logits`), which the drift replay compares the quantized engine against.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..runtime.vision_meta import Chunk, check_grid, chunk_inputs, patch_positions, vision_plan
from .calibration import Recording, VisionCall
from .quantize import QuantConfig, quantize_graph
from .stitch import Piece

Namespace = dict[str, np.ndarray]


def piece_session(piece: Piece) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(piece.path), options, providers=["CPUExecutionProvider"])


def run_piece(piece: Piece, spaces: Sequence[Namespace], keep: Callable[[str], bool] = lambda name: True
              ) -> list[dict[str, np.ndarray]]:
    """Run `piece` on every namespace (one per calibration call) and store its outputs there (those `keep` wants).

    Returns the feeds it ran on, keyed by the piece's own input names: the piece's calibration feeds.
    """
    session = piece_session(piece)
    names = list(piece.outputs)
    feeds = []
    for space in spaces:
        feed = {inp: space[value] for inp, value in piece.inputs.items()}
        for name, out in zip(names, session.run(names, feed)):
            if keep(piece.outputs[name]):
                space[piece.outputs[name]] = out
        feeds.append(feed)
    return feeds


class StreamedQuantizer:
    """The `on_piece` hook of a streamed quantized export: run, quantize, hand on (see the module docstring)."""

    def __init__(self, role: str, spaces: list[Namespace], quant: QuantConfig, scratch: Path, *,
                 vocab_size: int, reference: Path | None = None, keep: Callable[[str], bool] = lambda name: True):
        self.role, self.spaces, self.quant, self.vocab_size = role, spaces, quant, vocab_size
        self.scratch = Path(scratch) / role
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.reference = reference  # directory keeping the fp32 pieces (None: delete them)
        self.reference_pieces: list[Piece] = []
        self.fp32_bytes = 0
        self.keep = keep

    def __call__(self, piece: Piece) -> Piece:
        feeds = run_piece(piece, self.spaces, self.keep)
        self.after_run(piece, feeds)
        self.fp32_bytes += sum(f.stat().st_size for f in piece.data_files())
        out = self.scratch / f"{piece.name}.onnx"
        quantize_graph(self.role, piece.path, out, self.quant, feeds, self.scratch / "tmp", vocab_size=self.vocab_size)
        shutil.rmtree(self.scratch / "tmp", ignore_errors=True)
        del feeds
        if self.reference is not None:
            self.reference.mkdir(parents=True, exist_ok=True)
            for f in piece.data_files():
                f.rename(self.reference / f.name)
            self.reference_pieces.append(piece.with_path(self.reference / piece.path.name))
        else:
            for f in piece.data_files():
                f.unlink()
        gc.collect()  # onnxruntime.quantization's model wrappers are cycles holding the piece's weights
        return piece.with_path(out)

    def after_run(self, piece: Piece, feeds: list[dict[str, np.ndarray]]) -> None:
        """What a role does with a piece's float32 results before the piece is quantized and dropped."""


@dataclass(frozen=True)
class ChunkOf:
    """Where a vision namespace's chunk belongs: recorded call, frame (numbered over all calls) and the chunk."""

    call: int
    frame: int
    chunk: Chunk


def vision_spaces(calls: Sequence[VisionCall], cfg) -> tuple[list[Namespace], list[ChunkOf]]:
    """One namespace per chunk of every recorded call (zoomin.runtime.vision_meta.vision_plan), and where each
    belongs."""
    spaces, where, frame_id = [], [], 0
    for c, call in enumerate(calls):
        grid = check_grid(call.grid, cfg)
        positions = patch_positions(grid, cfg.spatial_merge_size)
        for frame in vision_plan(grid, cfg):
            for chunk in frame.chunks:
                spaces.append({"pixel_values": call.pixels[chunk.patches], **chunk_inputs(chunk, positions, cfg)})
                where.append(ChunkOf(c, frame_id, chunk))
            frame_id += 1
    return spaces, where


def gather_frames(spaces: Sequence[Namespace], where: Sequence[ChunkOf], names: Sequence[str]) -> None:
    """A key/value piece wrote each chunk's (heads, rows, hd) rows under `names`: give every chunk its frame's
    whole keys/values per head, `{name}.{h}` (1, F, hd), as the runtime feeds them to the next piece."""
    frames: dict[int, list[int]] = {}
    for i, w in enumerate(where):
        frames.setdefault(w.frame, []).append(i)
    for members in frames.values():  # a frame's chunks are consecutive rows in plan order
        for name in names:
            whole = np.concatenate([spaces[i].pop(name) for i in members], axis=1)[:, None]
            for i in members:
                spaces[i].update({f"{name}.{h}": head for h, head in enumerate(whole)})


def vision_features(spaces: Sequence[Namespace], where: Sequence[ChunkOf], calls: Sequence[VisionCall], cfg
                    ) -> list[VisionCall]:
    """The recorded vision calls with the float32 features the streamed pass computed for them."""
    out = [np.empty((len(call.pixels) // cfg.spatial_merge_size**2, cfg.out_hidden_size), np.float32)
           for call in calls]
    for space, w in zip(spaces, where):
        out[w.call][w.chunk.units] = space["image_embeds"]
    return [VisionCall(call.pixels, call.grid, embeds) for call, embeds in zip(calls, out)]


class DecoderQuantizer(StreamedQuantizer):
    """Decoder pieces on one prefill per conversation; the epilogue also computes every recorded call's logits."""

    def __init__(self, rec: Recording, spaces: list[Namespace], *args, **kwargs):
        super().__init__("decoder", spaces, *args, keep=lambda name: not name.startswith("present_"), **kwargs)
        self.rec = rec

    def after_run(self, piece: Piece, feeds: list[dict[str, np.ndarray]]) -> None:
        if piece.name == "epilogue":
            self.fill_logits(piece_session(piece))

    def fill_logits(self, epilogue: ort.InferenceSession) -> None:
        """Each recorded call's float32 logits: the epilogue on the final hidden states of the conversation's rows
        up to that call's last position (causal attention: a prefix of the prefill is the call's own context)."""
        for space, (start, end) in zip(self.spaces, self.rec.conversations):
            hidden, embeds = space["hidden"], space["inputs_embeds"][0]
            for call in self.rec.decoder[start:end]:
                stop = call.past + len(call.embeds)
                if not np.array_equal(embeds[call.past:stop], call.embeds):
                    raise ValueError("a recorded decoder call is not a prefix of its conversation's prefill")
                call.logits = epilogue.run(["logits"], {"hidden": hidden[:, :stop],
                                                        "logits_to_keep": np.array([call.keep], np.int64)})[0][0]


class VisionQuantizer(StreamedQuantizer):
    """Vision pieces on every recorded vision call; the merger's outputs are the calls' float32 features."""

    def __init__(self, calls: Sequence[VisionCall], cfg, *args, **kwargs):
        spaces, self.where = vision_spaces(calls, cfg)
        super().__init__("vision", spaces, *args, **kwargs)
        self.calls, self.cfg = list(calls), cfg
        self.features: list[VisionCall] = []

    def after_run(self, piece: Piece, feeds: list[dict[str, np.ndarray]]) -> None:
        if "key" in piece.outputs.values():
            gather_frames(self.spaces, self.where, ("key", "value"))
        if piece.name == "merger":
            self.features = vision_features(self.spaces, self.where, self.calls, self.cfg)


def _opset(quant: QuantConfig) -> dict:
    return {"opset": quant.export_opset} if quant.export_opset else {}


def quantize_vision(parts, out_dir: Path, calls: Sequence[VisionCall], quant: QuantConfig, scratch: Path, *,
                    reference: Path | None = None) -> VisionQuantizer:
    """Export the vision tower's stage graphs into `out_dir` quantized, each block calibrated on the recorded
    `calls`.

    The returned hook holds the calls with their float32 features (`features`), the fp32 pieces' bytes
    (`fp32_bytes`) and, with `reference`, the fp32 pieces kept there (`reference_pieces`).
    """
    from .export_vision import export_vision

    hook = VisionQuantizer(calls, parts.vision, quant, scratch, vocab_size=parts.text.vocab_size, reference=reference)
    export_vision(parts, out_dir, on_piece=hook, **_opset(quant))
    hook.spaces = []
    return hook


def quantize_decoder(parts, out_path: Path, rec: Recording, quant: QuantConfig, scratch: Path, *,
                     reference: Path | None = None, check: Callable[[Piece], Piece] | None = None
                     ) -> DecoderQuantizer:
    """Export the decoder to `out_path` quantized (graph flavour export_decoder.graph_for(precision)), each layer
    calibrated on one prefill per recorded conversation; fills in the recording's float32 logits (see
    `quantize_vision` for the returned hook). `check` sees each fp32 piece first (layer_parity.DecoderLayerParity)."""
    from .calibration import decoder_feeds
    from .export_decoder import export_decoder, graph_for

    t, graph = parts.text, graph_for(quant.precision)
    spaces = decoder_feeds(rec, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, graph)
    hook = DecoderQuantizer(rec, spaces, quant, scratch, vocab_size=t.vocab_size, reference=reference)
    export_decoder(parts, out_path, graph=graph, on_piece=hook if check is None else lambda piece: hook(check(piece)),
                   **_opset(quant))
    hook.spaces = []
    return hook
