"""Export the Qwen2.5-VL vision tower (patch embed, blocks, patch merger) to one ONNX graph for any image grid.

Everything that depends on the image grid (rotary tables, window and frame groups) is computed on the host by
`zoomin.runtime.vision_meta` and fed as graph inputs, so a single graph serves every size, aspect ratio and number
of equally sized images per call (the runtime splits other lists, vision_meta.frame_runs). See vision_meta for the
layout; in short the graph keeps the processor's patch order; windowed blocks gather q/k/v rows into padded groups
of 64 patches, attend within each group under a key-validity mask and gather the results back; full-attention
blocks attend over whole frames with ONNX Runtime's MultiHeadAttention (flash attention on the CPU, no N x N
scores). That is exact: transformers' window permutation and its reverse index only exist to make windows
contiguous for `cu_seqlens`.

Graph I/O (N patches, Gw windows, Gf frames of L patches; see vision_meta.vision_inputs):
  pixel_values float32 (N, 1176)   + vision_meta.META_NAMES   ->   image_embeds float32 (N / 4, out_hidden_size)

The build exports the tower piece by piece (`vision_pieces`: patch embedding with the window tables, one piece per
block, the merger) and stitches the pieces (zoomin.build.stitch): one block's weights in memory at a time, the
same graph outputs as one export of the whole VisionGraph.

fp16: weights and matmuls in fp16, I/O in float32; RMSNorm statistics, rotary, softmax and the full-attention
blocks' attention run in float32 (as transformers does in half precision). The down_proj of the blocks in `fp32_down_proj` (default: the last one)
runs in float32 and the residual stream stays float32 from there to the merger: the 3B tower's last down_proj
overflows fp16 (TensorRT Edge-LLM keeps it in fp32 for that reason).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import torch
from torch import nn

from zoomin.runtime.config import VisionConfig, vision_config
from zoomin.runtime.vision import VisionEncoder
from zoomin.runtime.vision_meta import META_NAMES, VISION_ROPE_THETA, rotary_inv_freq, vision_inputs

from .export_decoder import PRECISIONS, PieceHook, RMSNorm, cast_linear, rotate
from .stitch import Piece, PieceExporter, stitch
from .weights import Parts, as_parts



def _contrib_op(name: str, inputs: Sequence[str], attributes: dict[str, "onnx.defs.OpSchema.AttrType"]):
    """An onnxscript op for an ONNX Runtime contrib op (onnx ships no schema for them): float inputs, one output."""
    schema = onnx.defs.OpSchema(
        name, "com.microsoft", 1,
        inputs=[onnx.defs.OpSchema.FormalParameter(i, "T") for i in inputs],
        outputs=[onnx.defs.OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[onnx.defs.OpSchema.Attribute(a, t, "", required=True) for a, t in attributes.items()])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), name, schema)


_MULTI_HEAD_ATTENTION = _contrib_op("MultiHeadAttention", ("query", "key", "value"),
                                    {"num_heads": onnx.defs.OpSchema.AttrType.INT,
                                     "scale": onnx.defs.OpSchema.AttrType.FLOAT})

# Grids used by the build's parity check: non-square, partial edge windows, and two images in one call.
CHECK_GRIDS = ((1, 8, 10), (1, 16, 6), (1, 12, 18))


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an integer index of any shape, exported as one ONNX Gather (plain indexing gives GatherND)."""
    return x.index_select(0, index.reshape(-1)).reshape(*index.shape, *x.shape[1:])


def mask_bias(valid: torch.Tensor) -> torch.Tensor:
    """(G, L) key validity -> (G, 1, 1, L) additive float32 bias (0 or -inf)."""
    return torch.where(valid, 0.0, float("-inf"))[:, None, None, :]


def grouped_attention(qkv, cos, sin, gather, bias, scatter, heads: int) -> torch.Tensor:
    """Attention within padded groups of rows (the windowed blocks): qkv (N, 3*D) -> (N, D).

    gather (G, L) picks each slot's row, bias (G, 1, 1, L) masks padding keys, scatter (N,) picks each row's slot
    back out of the (G*L) results. cos/sin (G, L, head_dim) are the rotary tables already gathered to the slots.
    """
    g, length = gather.shape
    x = take_rows(qkv, gather).view(g, length, 3, heads, -1)  # (G, L, 3, H, hd)
    q, k, v = x.unbind(2)
    scale = q.shape[-1] ** -0.5
    # Rotary in float32; the softmax scale is folded into q, which keeps half-precision scores small.
    q = (rotate(q.float(), cos, sin) * scale).to(qkv.dtype).transpose(1, 2)  # (G, H, L, hd)
    k = rotate(k.float(), cos, sin).to(qkv.dtype).transpose(1, 2)
    v = v.transpose(1, 2)
    probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)).float() + bias, dim=-1).to(qkv.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(g * length, -1)  # (G*L, D)
    return take_rows(out, scatter)


@torch.library.custom_op("zoomin::frame_attention", mutates_args=())
def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T) v per head; q, k, v (F, L, heads * hd) float32, q already scaled. Exported as ONNX
    Runtime's com.microsoft MultiHeadAttention (see `_frame_attention_onnx`); this body is the same math."""
    f, length, d = q.shape
    qh, kh, vh = (t.reshape(f, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.softmax(qh @ kh.transpose(2, 3), dim=-1) @ vh
    return out.transpose(1, 2).reshape(f, length, d)


@frame_attention.register_fake
def _(q, k, v, heads):
    return torch.empty_like(q)


def _frame_attention_onnx(q, k, v, heads: int):
    """MultiHeadAttention without mask, bias or past: on the CPU, ONNX Runtime runs it as tiled flash attention
    (O(L) memory, no (heads, L, L) scores); scale 1 because q comes scaled."""
    return _MULTI_HEAD_ATTENTION(q, k, v, num_heads=heads, scale=1.0)


def frame_attention_block(qkv, cos, sin, frames, heads: int) -> torch.Tensor:
    """Full attention within each frame (the full-attention blocks): qkv (N, 3*D) -> (N, D).

    Frames are consecutive, equally long runs of rows (vision_meta.vision_inputs), so `frames` (F, L) only gives
    the shape: a reshape groups them, no gather or padding mask is needed. Attention runs in float32 in every
    precision (the contrib op's CPU kernel is float32; transformers' softmax is float32 too).
    """
    f, length = frames.shape
    x = qkv.view(f, length, 3, heads, -1)
    q, k, v = x.unbind(2)
    scale = q.shape[-1] ** -0.5
    cos, sin = cos.view(f, length, -1), sin.view(f, length, -1)
    q = (rotate(q.float(), cos, sin) * scale).reshape(f, length, -1)
    k = rotate(k.float(), cos, sin).reshape(f, length, -1)
    out = frame_attention(q, k, v.float().reshape(f, length, -1), heads)
    return out.to(qkv.dtype).reshape(f * length, -1)


class Block(nn.Module):
    def __init__(self, src: nn.Module, heads: int, dtype: torch.dtype, fp32_down: bool):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(src.norm1, dtype), RMSNorm(src.norm2, dtype)
        self.qkv, self.proj = cast_linear(src.attn.qkv, dtype), cast_linear(src.attn.proj, dtype)
        mlp = src.mlp
        self.gate_proj, self.up_proj = cast_linear(mlp.gate_proj, dtype), cast_linear(mlp.up_proj, dtype)
        self.down_proj = cast_linear(mlp.down_proj, torch.float32 if fp32_down else dtype)
        self.heads, self.dtype = heads, dtype

    def forward(self, x, attention):
        """attention(qkv) -> (N, D): the block's attention pattern (windows or whole frames) with its metadata."""
        h = self.norm1(x).to(self.dtype)
        x = x + self.proj(attention(self.qkv(h), self.heads)).to(x.dtype)
        h = self.norm2(x).to(self.dtype)
        act = nn.functional.silu(self.gate_proj(h)) * self.up_proj(h)
        down = self.down_proj(act.to(self.down_proj.weight.dtype))
        return x.to(down.dtype) + down  # float32 from the first fp32 down_proj on


def check_rotary(rotary: nn.Module, cfg: VisionConfig) -> None:
    """The host computes the rotary tables (vision_meta); refuse a tower whose frequencies differ from them."""
    inv_freq = rotary.inv_freq.detach().float().cpu().numpy()
    if not np.allclose(inv_freq, rotary_inv_freq(cfg), rtol=1e-6, atol=0):
        raise ValueError("vision rotary frequencies differ from zoomin.runtime.vision_meta's (rope_theta "
                         f"{VISION_ROPE_THETA}); the host-side rotary tables would be wrong")


def patch_linear(patch_embed: nn.Module, cfg: VisionConfig, dtype: torch.dtype) -> nn.Linear:
    """The patch embedding's Conv3d (kernel == stride over one row of pixel_values) as the Linear it is."""
    linear = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False, device="meta")
    linear.weight = nn.Parameter(patch_embed.proj.weight.detach().reshape(cfg.hidden_size, -1).to(dtype),
                                 requires_grad=False)
    return linear


class VisionGraph(nn.Module):
    """transformers' Qwen2_5_VisionTransformerPretrainedModel as a function of pixel_values + host metadata."""

    def __init__(self, visual: nn.Module, cfg: VisionConfig, dtype: torch.dtype = torch.float32,
                 fp32_down_proj: Collection[int] = ()):
        super().__init__()
        check_rotary(visual.rotary_pos_emb, cfg)
        self.patch_embed = patch_linear(visual.patch_embed, cfg, dtype)
        self.blocks = nn.ModuleList(
            Block(b, cfg.num_heads, dtype, fp32_down=i in fp32_down_proj) for i, b in enumerate(visual.blocks))
        merger = visual.merger
        self.ln_q = RMSNorm(merger.ln_q, dtype)
        self.fc1, self.fc2 = cast_linear(merger.mlp[0], dtype), cast_linear(merger.mlp[2], dtype)
        self.full = frozenset(cfg.fullatt_block_indexes)
        self.unit_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.dtype = dtype

    def forward(self, pixel_values, rotary_cos, rotary_sin, window_gather, window_valid, window_scatter,
                full_gather):
        x = self.patch_embed(pixel_values.to(self.dtype))
        win = (take_rows(rotary_cos, window_gather), take_rows(rotary_sin, window_gather), window_gather,
               mask_bias(window_valid), window_scatter)
        layouts = {
            False: lambda qkv, heads: grouped_attention(qkv, *win, heads),
            True: lambda qkv, heads: frame_attention_block(qkv, rotary_cos, rotary_sin, full_gather, heads),
        }
        for i, block in enumerate(self.blocks):
            x = block(x, layouts[i in self.full])
        # Four consecutive patches form one merged unit in the processor's order: no reverse permutation needed.
        h = self.ln_q(x).to(self.dtype).reshape(-1, self.unit_dim)
        return self.fc2(nn.functional.gelu(self.fc1(h))).float()


def random_pixels(cfg: VisionConfig, grids: Sequence[Sequence[int]], seed: int = 0) -> np.ndarray:
    """Random pixel_values rows for images of patch grids `grids`."""
    rows = int(np.asarray(grids, dtype=np.int64).prod(axis=1).sum())
    return np.random.default_rng(seed).standard_normal((rows, cfg.patch_dim)).astype(np.float32)


def example_inputs(cfg: VisionConfig, grids: Sequence[Sequence[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random pixel_values for `grids` (equally sized frames: one graph call) plus their metadata, in order."""
    return {"pixel_values": random_pixels(cfg, grids, seed), **vision_inputs(np.asarray(grids, np.int64), cfg)}


class VisionPrologue(nn.Module):
    """Patch embedding plus what every windowed block shares: the rotary tables gathered to the window slots and
    the windows' key mask as an additive bias (VisionGraph.forward computes the same once per call)."""

    def __init__(self, patch_embed: nn.Module, cfg: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.patch_embed = patch_linear(patch_embed, cfg, dtype)
        self.dtype = dtype

    def forward(self, pixel_values, rotary_cos, rotary_sin, window_gather, window_valid):
        return (self.patch_embed(pixel_values.to(self.dtype)), take_rows(rotary_cos, window_gather),
                take_rows(rotary_sin, window_gather), mask_bias(window_valid))


class WindowBlock(Block):
    """One windowed block as a function of the residual stream and the prologue's window tables."""

    def forward(self, hidden, window_cos, window_sin, window_gather, window_bias, window_scatter):
        return super().forward(hidden, lambda qkv, heads: grouped_attention(
            qkv, window_cos, window_sin, window_gather, window_bias, window_scatter, heads))


class FrameBlock(Block):
    """One full-attention block (attention within each frame)."""

    def forward(self, hidden, rotary_cos, rotary_sin, full_gather):
        return super().forward(hidden, lambda qkv, heads: frame_attention_block(
            qkv, rotary_cos, rotary_sin, full_gather, heads))


class Merger(nn.Module):
    """Patch merger: RMSNorm, then an MLP over each merged unit of four consecutive patches; float32 out."""

    def __init__(self, merger: nn.Module, cfg: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.ln_q = RMSNorm(merger.ln_q, dtype)
        self.fc1, self.fc2 = cast_linear(merger.mlp[0], dtype), cast_linear(merger.mlp[2], dtype)
        self.unit_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.dtype = dtype

    def forward(self, hidden):
        h = self.ln_q(hidden).to(self.dtype).reshape(-1, self.unit_dim)
        return self.fc2(nn.functional.gelu(self.fc1(h))).float()


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"vision precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def vision_pieces(parts: Parts, scratch: Path, *, precision: str = "fp32", opset: int = 18,
                  fp32_down_proj: Collection[int] | None = None) -> Iterator[Piece]:
    """Export the vision tower into `scratch` one piece at a time: prologue (patch embedding, window tables), each
    block, merger. A generator, like export_decoder.decoder_pieces: one block's weights are loaded at a time.

    fp32_down_proj: vision blocks whose MLP down_proj stays float32 in an fp16 graph (default: the last block).
    """
    _check_precision(precision)
    cfg, dtype = parts.vision, PRECISIONS[precision]
    if fp32_down_proj is None:
        fp32_down_proj = (cfg.depth - 1,) if precision == "fp16" else ()
    check_rotary(parts.vision_rotary(), cfg)
    scratch = Path(scratch)
    # Three equal frames (one call holds equally sized frames), partial edge windows: no dynamic dimension is 1 or
    # equal to another (torch.export would specialise or equate it).
    example = {k: torch.from_numpy(v) for k, v in example_inputs(cfg, [(1, 10, 14)] * 3).items()}
    units = torch.export.Dim("merged_units", min=1)
    patches = cfg.spatial_merge_size**2 * units
    windows, frames, frame_len = (torch.export.Dim(n, min=1) for n in ("windows", "frames", "frame_len"))
    attention_onnx = {torch.ops.zoomin.frame_attention.default: _frame_attention_onnx}
    exporter = PieceExporter()

    def piece(name, key, module, inputs: dict, outputs: list[str], dims: tuple, **kwargs) -> Piece:
        path = exporter.export(key, module, tuple(inputs.values()), scratch / f"{name}.onnx",
                               input_names=list(inputs), output_names=outputs, dynamic_shapes=dims, opset=opset,
                               **kwargs)
        return Piece(name, path, {n: n for n in inputs}, {o: o.removesuffix("_out") for o in outputs})

    names = ["pixel_values", "rotary_cos", "rotary_sin", "window_gather", "window_valid"]
    prologue = VisionPrologue(parts.vision_patch_embed(), cfg, dtype).eval()
    yield piece("prologue", "prologue", prologue, {n: example[n] for n in names},
                ["hidden", "window_cos", "window_sin", "window_bias"],
                ({0: patches}, {0: patches}, {0: patches}, {0: windows}, {0: windows}))
    with torch.no_grad():
        hidden, window_cos, window_sin, window_bias = prologue(*(example[n] for n in names))
    del prologue

    full = frozenset(cfg.fullatt_block_indexes)
    for i in range(cfg.depth):
        kind = FrameBlock if i in full else WindowBlock
        block = kind(parts.vision_block(i), cfg.num_heads, dtype, fp32_down=i in fp32_down_proj).eval()
        if i in full:
            yield piece(f"blocks.{i}", ("frame", hidden.dtype, i in fp32_down_proj), block,
                        {"hidden": hidden, **{n: example[n] for n in ("rotary_cos", "rotary_sin", "full_gather")}},
                        ["hidden_out"], ({0: patches}, {0: patches}, {0: patches}, {0: frames, 1: frame_len}),
                        custom_translation_table=attention_onnx)
        else:
            yield piece(f"blocks.{i}", ("window", hidden.dtype, i in fp32_down_proj), block,
                        {"hidden": hidden, "window_cos": window_cos, "window_sin": window_sin,
                         "window_gather": example["window_gather"], "window_bias": window_bias,
                         "window_scatter": example["window_scatter"]},
                        ["hidden_out"], ({0: patches}, {0: windows}, {0: windows}, {0: windows}, {0: windows},
                                         {0: patches}))
        del block
        if i in fp32_down_proj:
            hidden = hidden.float()  # the residual stream stays float32 from an fp32 down_proj on

    def name_output(model: ir.Model) -> None:
        model.graph.outputs[0].shape = ir.Shape([ir.SymbolicDim("merged_units"), cfg.out_hidden_size])

    yield piece("merger", ("merger", hidden.dtype), Merger(parts.vision_merger(), cfg, dtype).eval(),
                {"hidden": hidden}, ["image_embeds"],
                ({0: patches},), finalize=name_output)


def export_vision(model, out_path: Path, *, precision: str = "fp32", opset: int = 18,
                  fp32_down_proj: Collection[int] | None = None, on_piece: PieceHook | None = None) -> Path:
    """Write `out_path` (+ `out_path.data`, the weights) for a transformers Qwen2_5_VLForConditionalGeneration or
    a checkpoint's parts (zoomin.build.weights): exported piece by piece (`vision_pieces`) and stitched; `on_piece`
    may replace each piece as it is made (see export_decoder.export_decoder).
    """
    _check_precision(precision)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.pieces.", dir=out_path.parent) as scratch:
        pieces = [on_piece(p) if on_piece else p
                  for p in vision_pieces(as_parts(model), Path(scratch), precision=precision, opset=opset,
                                         fp32_down_proj=fp32_down_proj)]
        return stitch(pieces, out_path, inputs=["pixel_values", *META_NAMES], outputs=["image_embeds"])


@dataclass(frozen=True)
class VisionParity:
    max_rel_err: float  # max|onnx - hf| / max|hf|
    norm_rel_err: float  # ||onnx - hf|| / ||hf||
    seconds: float  # onnxruntime encode time


def vision_parity(model: nn.Module, onnx_path: Path, grids: Sequence[Sequence[int]] = CHECK_GRIDS, *,
                  seed: int = 0, encoder: VisionEncoder | None = None) -> VisionParity:
    """Run the ONNX graph and transformers' `model.model.visual` on the same random pixels, all grids in one call.

    model: a Qwen2_5_VLForConditionalGeneration or just its vision tower (zoomin.build.weights' vision_tower).
    """
    visual = model.model.visual if hasattr(model, "model") else model
    cfg = vision_config({"vision_config": visual.config.to_dict()})
    grid = np.asarray(grids, dtype=np.int64)
    pixels = random_pixels(cfg, grid, seed)
    with torch.no_grad():  # what get_image_features splits per image for the language model
        ref = visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid)).pooler_output.float().numpy()
    encoder = encoder or VisionEncoder(onnx_path, cfg)
    t0 = time.perf_counter()
    out = encoder.encode(pixels, grid)
    seconds = time.perf_counter() - t0
    if out.shape != ref.shape:
        raise AssertionError(f"{onnx_path}: image_embeds shape {out.shape} != transformers {ref.shape}")
    diff = out.astype(np.float64) - ref
    return VisionParity(
        max_rel_err=float(np.abs(diff).max() / np.abs(ref).max()),
        norm_rel_err=float(np.linalg.norm(diff) / np.linalg.norm(ref)),
        seconds=seconds,
    )


def check_vision(model: nn.Module, onnx_path: Path, grids: Sequence[Sequence[int]] = CHECK_GRIDS) -> float:
    """Max relative error (max|a-b| / max|b|) of the ONNX vision graph against transformers, for build reports."""
    return vision_parity(model, onnx_path, grids).max_rel_err
