"""Export the Qwen2.5-VL vision tower (patch embed, blocks, patch merger) as the stage graphs the runtime chains.

The runtime (zoomin.runtime.vision.run_tower) runs the tower frame by frame in chunks of whole windows of one
shape (zoomin.runtime.vision_meta), so that one call's memory is bounded whatever the image size. The graphs are
therefore functions of one chunk's rows:
- a windowed block reshapes its rows to (windows, window_len) and attends within each window;
- a full-attention block is two graphs: one writes the chunk's keys/values into the frame's K/V (`KeyValue`),
  the other attends with the chunk's queries over all of them (`FullBlock`);
- row-wise pieces (patch embedding, MLPs, norms, the merger) do not care.
All attention runs as ONNX Runtime's com.microsoft MultiHeadAttention in float32 (on the CPU flash attention:
no (heads, N, N) scores). Everything grid-dependent (rotary tables, window shapes) is a host-side input.

The build exports one piece per block (plus patch embedding and merger; a full-attention block gives two), one
block's weights in memory at a time (a generator: the quantized build calibrates and quantizes each piece as it
comes, zoomin.build.streaming), and stitches consecutive pieces into stages (`stage_groups`): every run of pieces
up to a full-attention block's keys/values is one stage, the keys/values another. `VisionGraph` runs the same
pieces, grouped the same way, in torch through the runtime's own scheduler.

fp16: weights and matmuls in fp16, I/O in float32; RMSNorm statistics, rotary and attention run in float32 (as
transformers does in half precision). The down_proj of the blocks in `fp32_down_proj` (default: the last one)
runs in float32 and the residual stream stays float32 from there to the merger: the 3B tower's last down_proj
overflows fp16 (TensorRT Edge-LLM keeps it in fp32 for that reason).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from zoomin.runtime.config import VisionConfig, vision_config
from zoomin.runtime.vision import STAGE_OUTPUTS, VisionEncoder, run_tower
from zoomin.runtime.vision_meta import CHUNK_ROWS, VISION_ROPE_THETA, check_grid, rotary_inv_freq

from .contrib_ops import AttrType, contrib_op
from .export_decoder import PRECISIONS, PieceHook, RMSNorm, cast_linear
from .stitch import Piece, PieceExporter, stitch
from .weights import Parts, as_parts

_MULTI_HEAD_ATTENTION = contrib_op("MultiHeadAttention", ("query", "key", "value"),
                                   {"num_heads": AttrType.INT, "scale": AttrType.FLOAT})

# Grids used by the build's parity check: non-square, partial edge windows, and two images in one call.
CHECK_GRIDS = ((1, 8, 10), (1, 16, 6), (1, 12, 18))


@torch.library.custom_op("zoomin::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v per head and batch row; q (B, S, heads * hd) float32, k and v either (B, L, heads *
    hd) or (B, heads, L, hd). Exported as ONNX Runtime's MultiHeadAttention (`_attention_onnx`), same math."""
    b, s, d = q.shape
    qh = q.reshape(b, s, heads, d // heads).transpose(1, 2)
    kh, vh = (t if t.dim() == 4 else t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (k, v))
    out = torch.softmax((qh @ kh.transpose(2, 3)) * scale, dim=-1) @ vh
    return out.transpose(1, 2).reshape(b, s, d)


@attention.register_fake
def _(q, k, v, heads, scale):
    return torch.empty_like(q)


def _attention_onnx(q, k, v, heads: int, scale: float):
    """MultiHeadAttention without mask, bias or past (key/value 3-D, or 4-D BNSH as the frame's K/V buffers are):
    on the CPU, ONNX Runtime runs it as tiled flash attention, O(L) memory."""
    return _MULTI_HEAD_ATTENTION(q, k, v, num_heads=heads, scale=scale)


ATTENTION_ONNX = {torch.ops.zoomin.attention.default: _attention_onnx}


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (rows, heads, hd) with per-row cos/sin (rows, hd): x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def linear_rows(src: nn.Linear, rows: slice, dtype: torch.dtype) -> nn.Linear:
    """The output features `rows` of `src` as a Linear of their own (q, or k and v, of the fused qkv)."""
    weight = src.weight.detach()[rows]
    dst = nn.Linear(weight.shape[1], weight.shape[0], bias=src.bias is not None, device="meta")
    dst.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if src.bias is not None:
        dst.bias = nn.Parameter(src.bias.detach()[rows].to(dtype), requires_grad=False)
    return dst


class Piece_(nn.Module):
    """A tower piece: `inputs` are its forward's arguments, `outputs` what it returns, both scheduler names
    (zoomin.runtime.vision's stage contract)."""

    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("hidden",)
    positional = None  # forward's named arguments when the rest of `inputs` come as *args (FullBlock's heads)

    def dynamic_shapes(self, dims: Mapping[str, dict]) -> tuple:
        """torch.export's dynamic_shapes for `inputs`, structured like forward's signature."""
        n = len(self.inputs) if self.positional is None else self.positional
        rest = [tuple(dims[x] for x in self.inputs[n:])] if n < len(self.inputs) else []
        return (*(dims[x] for x in self.inputs[:n]), *rest)


class PatchEmbed(Piece_):
    """The patch embedding's Conv3d (kernel == stride over one row of pixel_values) as the Linear it is."""

    inputs = ("pixel_values",)

    def __init__(self, patch_embed: nn.Module, cfg: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False, device="meta")
        self.proj.weight = nn.Parameter(patch_embed.proj.weight.detach().reshape(cfg.hidden_size, -1).to(dtype),
                                        requires_grad=False)
        self.dtype = dtype

    def forward(self, pixel_values):
        return self.proj(pixel_values.to(self.dtype))


class Block(Piece_):
    """Pre-norm attention + SwiGLU MLP; subclasses say how the normed rows attend (`attend`: (rows, D) -> (rows, D)
    before the output projection)."""

    def __init__(self, src: nn.Module, heads: int, dtype: torch.dtype, fp32_down: bool):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(src.norm1, dtype), RMSNorm(src.norm2, dtype)
        self.proj = cast_linear(src.attn.proj, dtype)
        mlp = src.mlp
        self.gate_proj, self.up_proj = cast_linear(mlp.gate_proj, dtype), cast_linear(mlp.up_proj, dtype)
        self.down_proj = cast_linear(mlp.down_proj, torch.float32 if fp32_down else dtype)
        self.heads, self.dtype = heads, dtype
        self.dim = src.attn.proj.in_features
        self.scale = (self.dim // heads) ** -0.5

    def residual(self, x, attend):
        h = self.norm1(x).to(self.dtype)
        x = x + self.proj(attend(h).to(self.dtype)).to(x.dtype)
        h = self.norm2(x).to(self.dtype)
        act = nn.functional.silu(self.gate_proj(h)) * self.up_proj(h)
        down = self.down_proj(act.to(self.down_proj.weight.dtype))
        return x.to(down.dtype) + down  # float32 from the first fp32 down_proj on

    def heads_of(self, x):
        """(rows, heads * hd) -> (rows, heads, hd) float32."""
        return x.float().reshape(x.shape[0], self.heads, -1)


class WindowBlock(Block):
    """A windowed block on one chunk: its rows are `windows` (G, L) whole windows, L rows each."""

    inputs = ("hidden", "rotary_cos", "rotary_sin", "windows")

    def __init__(self, src: nn.Module, heads: int, dtype: torch.dtype, fp32_down: bool):
        super().__init__(src, heads, dtype, fp32_down)
        self.qkv = cast_linear(src.attn.qkv, dtype)

    def forward(self, hidden, rotary_cos, rotary_sin, windows):
        g, length = windows.shape

        def attend(h):
            q, k, v = self.heads_of(self.qkv(h)).reshape(h.shape[0], 3, self.heads, -1).unbind(1)
            q, k = rotary(q, rotary_cos, rotary_sin), rotary(k, rotary_cos, rotary_sin)
            q, k, v = (t.reshape(g, length, self.dim) for t in (q, k, v))
            return attention(q, k, v, self.heads, self.scale).reshape(-1, self.dim)

        return self.residual(hidden, attend)


class KeyValue(Piece_):
    """A full-attention block's keys and values of one chunk, (heads, rows, hd) float32: the runtime writes them
    into the frame's (1, heads, F, hd) buffers, the layout MultiHeadAttention reads without a copy."""

    inputs = ("hidden", "rotary_cos", "rotary_sin")
    outputs = ("key", "value")

    def __init__(self, src: nn.Module, heads: int, dtype: torch.dtype):
        super().__init__()
        dim = src.attn.proj.in_features
        self.norm1 = RMSNorm(src.norm1, dtype)
        self.k = linear_rows(src.attn.qkv, slice(dim, 2 * dim), dtype)
        self.v = linear_rows(src.attn.qkv, slice(2 * dim, 3 * dim), dtype)
        self.heads, self.dtype = heads, dtype

    def forward(self, hidden, rotary_cos, rotary_sin):
        h = self.norm1(hidden).to(self.dtype)
        k = self.k(h).float().reshape(h.shape[0], self.heads, -1)
        v = self.v(h).float().reshape(h.shape[0], self.heads, -1)
        return rotary(k, rotary_cos, rotary_sin).transpose(0, 1), v.transpose(0, 1)


def head_inputs(heads: int) -> tuple[str, ...]:
    """key.0 .. key.{heads-1}, value.0 .. : the frame's keys/values one head at a time (runtime.vision)."""
    return (*(f"key.{h}" for h in range(heads)), *(f"value.{h}" for h in range(heads)))


class FullBlock(Block):
    """A full-attention block on one chunk: its queries attend over the whole frame's keys/values, one head per
    MultiHeadAttention (see zoomin.runtime.vision on why per head)."""

    def __init__(self, src: nn.Module, heads: int, dtype: torch.dtype, fp32_down: bool):
        super().__init__(src, heads, dtype, fp32_down)
        self.q = linear_rows(src.attn.qkv, slice(0, self.dim), dtype)
        self.inputs = ("hidden", "rotary_cos", "rotary_sin", *head_inputs(heads))
        self.positional = 3

    def forward(self, hidden, rotary_cos, rotary_sin, *kv):
        keys, values = kv[:self.heads], kv[self.heads:]

        def attend(h):
            q = rotary(self.heads_of(self.q(h)), rotary_cos, rotary_sin)  # (rows, heads, hd)
            out = [attention(q[None, :, i], k, v, 1, self.scale) for i, (k, v) in enumerate(zip(keys, values))]
            return torch.cat(out, dim=-1).reshape(-1, self.dim)

        return self.residual(hidden, attend)


class Merger(Piece_):
    """Patch merger: RMSNorm, then an MLP over each merged unit of four consecutive rows; float32 out."""

    inputs = ("hidden",)
    outputs = ("image_embeds",)

    def __init__(self, merger: nn.Module, cfg: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.ln_q = RMSNorm(merger.ln_q, dtype)
        self.fc1, self.fc2 = cast_linear(merger.mlp[0], dtype), cast_linear(merger.mlp[2], dtype)
        self.unit_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.dtype = dtype

    def forward(self, hidden):
        h = self.ln_q(hidden).to(self.dtype).reshape(-1, self.unit_dim)
        return self.fc2(nn.functional.gelu(self.fc1(h))).float()


def check_rotary(rotary_module: nn.Module, cfg: VisionConfig) -> None:
    """The host computes the rotary tables (vision_meta); refuse a tower whose frequencies differ from them."""
    inv_freq = rotary_module.inv_freq.detach().float().cpu().numpy()
    if not np.allclose(inv_freq, rotary_inv_freq(cfg), rtol=1e-6, atol=0):
        raise ValueError("vision rotary frequencies differ from zoomin.runtime.vision_meta's (rope_theta "
                         f"{VISION_ROPE_THETA}); the host-side rotary tables would be wrong")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"vision precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def default_fp32_down_proj(cfg: VisionConfig, precision: str) -> tuple[int, ...]:
    return (cfg.depth - 1,) if precision == "fp16" else ()


def tower_pieces(parts: Parts, dtype: torch.dtype, fp32_down_proj: Collection[int]
                 ) -> Iterator[tuple[str, Piece_, str, torch.dtype]]:
    """(name, module, structure key, dtype of its `hidden` input) of every piece in order, each built from the
    parts when it is reached."""
    cfg = parts.vision
    check_rotary(parts.vision_rotary(), cfg)
    yield "patch_embed", PatchEmbed(parts.vision_patch_embed(), cfg, dtype).eval(), "patch_embed", dtype
    full, hidden = frozenset(cfg.fullatt_block_indexes), dtype
    for i in range(cfg.depth):
        src, fp32_down = parts.vision_block(i), i in fp32_down_proj
        if i in full:
            yield f"blocks.{i}.kv", KeyValue(src, cfg.num_heads, dtype).eval(), f"kv {hidden}", hidden
            yield (f"blocks.{i}", FullBlock(src, cfg.num_heads, dtype, fp32_down).eval(),
                   f"full {hidden} {fp32_down}", hidden)
        else:
            yield (f"blocks.{i}", WindowBlock(src, cfg.num_heads, dtype, fp32_down).eval(),
                   f"window {hidden} {fp32_down}", hidden)
        del src
        if fp32_down:
            hidden = torch.float32  # the residual stream stays float32 from an fp32 down_proj on
    yield "merger", Merger(parts.vision_merger(), cfg, dtype).eval(), f"merger {hidden}", hidden


def stage_groups(pieces: Sequence[tuple[Sequence[str], Sequence[str]]]) -> list[list[int]]:
    """Indices of the pieces ((inputs, outputs) each) that form each stage: a piece writing the keys/values of a
    full-attention block is a stage of its own (its results are needed whole before the next piece can run);
    every run of pieces between those is one stage."""
    groups: list[list[int]] = [[]]
    for i, (_, outputs) in enumerate(pieces):
        if "key" in outputs:
            groups += [[i], []]
        else:
            groups[-1].append(i)
    return [g for g in groups if g]


def stage_io(pieces: Sequence[tuple[Sequence[str], Sequence[str]]]) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a stage of `pieces`: the values it reads before writing them, what its last writer
    leaves (the residual stream, keys/values or the merged embeddings)."""
    written: set[str] = set()
    inputs: list[str] = []
    for ins, outs in pieces:
        inputs += [n for n in ins if n not in written and n not in inputs]
        written |= set(outs)
    return inputs, list(pieces[-1][1])


@dataclass(frozen=True)
class _Examples:
    """Example chunk for tracing: 3 windows of 20 rows (rows = 4 x 15 merged units), a frame of 140 patches; no
    dynamic dimension is 1 or equal to another (torch.export would specialise or equate it)."""

    cfg: VisionConfig
    windows: int = 3
    window_len: int = 20
    frame: int = 140

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        cfg, rows, g = self.cfg, self.windows * self.window_len, torch.Generator().manual_seed(0)
        kv = (1, self.frame, cfg.head_dim)
        return {**{n: torch.randn(*kv, generator=g) for n in head_inputs(cfg.num_heads)},
                "pixel_values": torch.randn(rows, cfg.patch_dim, generator=g),
                "hidden": torch.randn(rows, cfg.hidden_size, generator=g).to(dtype),
                "rotary_cos": torch.randn(rows, cfg.head_dim, generator=g),
                "rotary_sin": torch.randn(rows, cfg.head_dim, generator=g),
                "windows": torch.zeros(self.windows, self.window_len, dtype=torch.int64)}

    def dims(self) -> dict[str, dict]:
        rows = 4 * torch.export.Dim("merged_units", min=1)
        windows, window_len = torch.export.Dim("windows", min=1), torch.export.Dim("window_len", min=1)
        frame = torch.export.Dim("frame_len", min=1)
        return {**{n: {1: frame} for n in head_inputs(self.cfg.num_heads)}, "pixel_values": {0: rows},
                "hidden": {0: rows}, "rotary_cos": {0: rows}, "rotary_sin": {0: rows},
                "windows": {0: windows, 1: window_len}}


def vision_pieces(parts: Parts, scratch: Path, *, precision: str = "fp32", opset: int = 18,
                  fp32_down_proj: Collection[int] | None = None) -> Iterator[Piece]:
    """Export the vision tower into `scratch` one piece at a time (`tower_pieces`). A generator, like
    export_decoder.decoder_pieces: one block's weights are loaded at a time.

    fp32_down_proj: vision blocks whose MLP down_proj stays float32 in an fp16 graph (default: the last block).
    """
    _check_precision(precision)
    cfg, dtype = parts.vision, PRECISIONS[precision]
    if fp32_down_proj is None:
        fp32_down_proj = default_fp32_down_proj(cfg, precision)
    examples, exporter = _Examples(cfg), PieceExporter()
    dims = examples.dims()
    for name, module, key, hidden_dtype in tower_pieces(parts, dtype, fp32_down_proj):
        example = examples.tensors(hidden_dtype)
        outputs = [STAGE_OUTPUTS[o] for o in module.outputs]
        path = exporter.export(key, module, tuple(example[n] for n in module.inputs), Path(scratch) / f"{name}.onnx",
                               input_names=list(module.inputs), output_names=outputs,
                               dynamic_shapes=module.dynamic_shapes(dims), opset=opset,
                               custom_translation_table=ATTENTION_ONNX)
        yield Piece(name, path, {n: n for n in module.inputs}, dict(zip(outputs, module.outputs)))
        del module


def stitch_stages(pieces: Sequence[Piece], out_dir: Path) -> Path:
    """The stage graphs out_dir/stage{k}.onnx (+ .data) of the tower's pieces, in order (`stage_groups`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("stage*.onnx*"):
        old.unlink()
    io = [(list(p.inputs.values()), list(p.outputs.values())) for p in pieces]
    for k, group in enumerate(stage_groups(io)):
        inputs, outputs = stage_io([io[i] for i in group])
        stitch([pieces[i] for i in group], out_dir / f"stage{k}.onnx", inputs=inputs, outputs=outputs,
               output_names=[STAGE_OUTPUTS[o] for o in outputs])
    return out_dir


def export_vision(model, out_dir: Path, *, precision: str = "fp32", opset: int = 18,
                  fp32_down_proj: Collection[int] | None = None, on_piece: PieceHook | None = None) -> Path:
    """Write the stage graphs into the directory `out_dir` for a transformers Qwen2_5_VLForConditionalGeneration
    or a checkpoint's parts (zoomin.build.weights): exported piece by piece (`vision_pieces`) and stitched into
    stages; `on_piece` may replace each piece as it is made (see export_decoder.export_decoder)."""
    _check_precision(precision)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.pieces.", dir=out_dir.parent) as scratch:
        pieces = [on_piece(p) if on_piece else p
                  for p in vision_pieces(as_parts(model), Path(scratch), precision=precision, opset=opset,
                                         fp32_down_proj=fp32_down_proj)]
        return stitch_stages(pieces, out_dir)


class TorchStage:
    """Pieces of one stage run in torch, callable like zoomin.runtime.vision.Stage (numpy in, numpy out)."""

    def __init__(self, modules: Sequence[Piece_], device: torch.device):
        self.modules, self.device = list(modules), device
        inputs, outputs = stage_io([(m.inputs, m.outputs) for m in self.modules])
        self.inputs, self.names = tuple(inputs), outputs
        self.outputs = tuple(STAGE_OUTPUTS[o] for o in outputs)

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        space = {n: torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device) for n in self.inputs}
        with torch.no_grad():
            for m in self.modules:
                out = m(*(space[n] for n in m.inputs))
                space.update(zip(m.outputs, out if isinstance(out, tuple) else (out,)))
        return {STAGE_OUTPUTS[n]: space[n].float().cpu().numpy() if n != "hidden" else space[n].cpu().numpy()
                for n in self.names}


class VisionGraph(nn.Module):
    """transformers' Qwen2_5_VisionTransformerPretrainedModel as the build's pieces, grouped into the same stages
    and run by the runtime's scheduler (zoomin.runtime.vision.run_tower) in torch, on any torch device."""

    def __init__(self, model, dtype: torch.dtype = torch.float32, fp32_down_proj: Collection[int] = ()):
        """model: a transformers Qwen2_5_VLForConditionalGeneration or a checkpoint's parts."""
        super().__init__()
        parts = as_parts(model)
        self.pieces = nn.ModuleList(m for _, m, _, _ in tower_pieces(parts, dtype, fp32_down_proj))
        self.cfg = parts.vision

    def encode(self, pixel_values: np.ndarray, grid_thw, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
        """Like zoomin.runtime.vision.VisionEncoder.encode, on the pieces' device."""
        device = next(self.parameters()).device
        pieces = list(self.pieces)
        stages = [TorchStage([pieces[i] for i in g], device)
                  for g in stage_groups([(m.inputs, m.outputs) for m in pieces])]
        return run_tower(stages, np.asarray(pixel_values, np.float32), check_grid(grid_thw, self.cfg), self.cfg,
                         chunk_rows)


def random_pixels(cfg: VisionConfig, grids: Sequence[Sequence[int]], seed: int = 0) -> np.ndarray:
    """Random pixel_values rows for images of patch grids `grids`."""
    rows = int(np.asarray(grids, dtype=np.int64).prod(axis=1).sum())
    return np.random.default_rng(seed).standard_normal((rows, cfg.patch_dim)).astype(np.float32)


@dataclass(frozen=True)
class VisionParity:
    max_rel_err: float  # max|onnx - hf| / max|hf|
    norm_rel_err: float  # ||onnx - hf|| / ||hf||
    seconds: float  # onnxruntime encode time


def vision_parity(model: nn.Module, vision_dir: Path, grids: Sequence[Sequence[int]] = CHECK_GRIDS, *,
                  seed: int = 0, encoder: VisionEncoder | None = None) -> VisionParity:
    """Run the ONNX stage graphs and transformers' `model.model.visual` on the same random pixels, all grids in
    one call.

    model: a Qwen2_5_VLForConditionalGeneration or just its vision tower (zoomin.build.weights' vision_tower).
    """
    visual = model.model.visual if hasattr(model, "model") else model
    cfg = vision_config({"vision_config": visual.config.to_dict()})
    grid = np.asarray(grids, dtype=np.int64)
    pixels = random_pixels(cfg, grid, seed)
    with torch.no_grad():  # what get_image_features splits per image for the language model
        ref = visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid)).pooler_output.float().numpy()
    encoder = encoder or VisionEncoder(vision_dir, cfg)
    t0 = time.perf_counter()
    out = encoder.encode(pixels, grid)
    seconds = time.perf_counter() - t0
    if out.shape != ref.shape:
        raise AssertionError(f"{vision_dir}: image_embeds shape {out.shape} != transformers {ref.shape}")
    diff = out.astype(np.float64) - ref
    return VisionParity(
        max_rel_err=float(np.abs(diff).max() / np.abs(ref).max()),
        norm_rel_err=float(np.linalg.norm(diff) / np.linalg.norm(ref)),
        seconds=seconds,
    )


def check_vision(model: nn.Module, vision_dir: Path, grids: Sequence[Sequence[int]] = CHECK_GRIDS) -> float:
    """Max relative error (max|a-b| / max|b|) of the ONNX vision graphs against transformers, for build reports."""
    return vision_parity(model, vision_dir, grids).max_rel_err
