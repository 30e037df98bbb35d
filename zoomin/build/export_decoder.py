"""Export the Qwen2.5-VL language model (layers, final norm, lm_head) to one ONNX graph with an explicit KV cache.

The torch modules below re-implement the transformers text model with plain tensors (no Cache objects, no mask
helpers) so torch.onnx.export sees a static, readable graph; they share the Hugging Face weights and reproduce the
HF logits to float32 rounding. The graph is exported one piece at a time (prologue: M-RoPE tables, and the mask
bias of the plain graph; one piece per layer; epilogue: final norm, lm_head, logits_to_keep) and stitched
(zoomin.build.stitch), so a checkpoint of any depth exports with one layer's weights in memory; the stitched graph
computes exactly what one export of the whole TextDecoder does.

Two graph flavours (zoomin.runtime.decoder.DECODER_GRAPHS), recorded in the engine manifest:
- "gqa" (default): attention is ONNX Runtime's com.microsoft GroupQueryAttention over a KV cache it updates in
  place. past_key.{i} and present_key.{i} are bound to the same preallocated head-major buffer
  (1, kv_heads, max_len, head_dim); seqlens_k / total_sequence_length say how many rows are valid after the call,
  so the op appends the new rows itself and reads the cache without any concat or mask tensor, and a shorter
  seqlens_k is all a truncation needs. M-RoPE is applied to q/k before it (per-token cos/sin from the prologue).
- "plain": standard ONNX ops only, for TensorRT (fp8's QDQ graphs): the graph takes the past in sequence-major
  layout (B, P, kv_heads, head_dim), returns only the S new rows (the runtime binds both into one buffer), and
  masks with an additive bias; GQA is a grouped matmul, so K/V are never repeated.

Graph I/O (B batch, S new tokens, P past tokens, C cache rows (>= P), K = logits_to_keep):
  inputs_embeds  float32 (B, S, hidden)      position_ids int64 (3, B, S)  (M-RoPE rows t, h, w)
  logits_to_keep int64   (1,)                -> logits float32 (B, K, vocab)
  gqa:   seqlens_k int32 (B,) = P + S - 1,   total_sequence_length int32 () = P + S
         past_key.{i} / past_value.{i} cache dtype (B, kv_heads, C, head_dim)
         -> present_key.{i} / present_value.{i} (B, kv_heads, max(C, P + S), head_dim): past with rows [P, P+S)
  plain: attention_mask int64 (B, P+S), 1 = attend
         past_key.{i} / past_value.{i} cache dtype (B, P, kv_heads, head_dim)
         -> present_key.{i} / present_value.{i} (B, S, kv_heads, head_dim): the new rows only
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zoomin.runtime.config import TextConfig, text_config
from zoomin.runtime.decoder import CACHE_INPUTS, DECODER_GRAPHS

from .contrib_ops import AttrType, contrib_op
from .stitch import Piece, PieceExporter, stitch
from .weights import Parts, as_parts

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """torch.onnx.export under no_grad, without the exporter's expected noise: inputs that share one Dim on
    purpose, and torch's own deprecated pytree call."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # "no torchvision"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
        yield


def cast_linear(src: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    """A Linear holding src's weights in `dtype`; shares the tensors (no copy) when the dtype already matches."""
    dst = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None, device="meta")
    dst.weight = nn.Parameter(src.weight.detach().to(dtype), requires_grad=False)
    if src.bias is not None:
        dst.bias = nn.Parameter(src.bias.detach().to(dtype), requires_grad=False)
    return dst


class RMSNorm(nn.Module):
    """Normalise in float32, scale in the compute dtype: the order transformers uses in half precision."""

    def __init__(self, src: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(src.weight.detach().to(dtype), requires_grad=False)
        self.eps = float(src.variance_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """The plain graph's attention over [past ; new] keys; queries are grouped per KV head so K/V are never
    repeated."""

    def __init__(self, src: nn.Module, cfg: TextConfig, dtype: torch.dtype):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (cast_linear(p, dtype) for p in (src.q_proj, src.k_proj, src.v_proj))
        self.o_proj = cast_linear(src.o_proj, dtype)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.groups = self.heads // self.kv_heads
        self.scaling = self.head_dim**-0.5

    def forward(self, x, cos, sin, bias, past_k, past_v):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim)
        # Rotary in float32 whatever the compute dtype; the softmax scale is folded into q here, which keeps
        # half-precision scores small (same value as scaling after the matmul).
        q = (rotate(q.float(), cos, sin) * self.scaling).to(x.dtype)
        k = rotate(k.float(), cos, sin).to(x.dtype)
        keys = torch.cat([past_k, k], dim=1)  # (B, T, kvh, D)
        values = torch.cat([past_v, v], dim=1)
        # (B, S, kvh*g, D) -> (B, kvh, g, S, D): query head h reads KV head h // g, as transformers' repeat_kv does.
        qg = q.view(b, s, self.kv_heads, self.groups, self.head_dim).permute(0, 2, 3, 1, 4)
        scores = torch.matmul(qg, keys.permute(0, 2, 3, 1).unsqueeze(2))  # (B, kvh, g, S, T)
        probs = torch.softmax(scores.float() + bias, dim=-1).to(x.dtype)
        out = torch.matmul(probs, values.permute(0, 2, 1, 3).unsqueeze(2))  # (B, kvh, g, S, D)
        out = out.permute(0, 3, 1, 2, 4).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(out), k, v


@torch.library.custom_op("zoomin::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                          heads: int, kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal GQA of S new tokens after P = total_sequence_length - S cached ones, what ONNX Runtime's
    com.microsoft GroupQueryAttention computes (exported as it, see `_group_query_attention_onnx`).

    q (B, S, heads*D), k/v (B, S, kv_heads*D); past_key/value (B, kv_heads, C, D) with rows [0, P) valid.
    Returns the attention output (B, S, heads*D) and present_key/value (B, kv_heads, max(C, P+S), D): the past
    with the new rows written at [P, P+S). Every batch row has the same length here (seqlens_k = P + S - 1).
    """
    b, s, _ = q.shape
    total = int(total_sequence_length)
    if not bool((seqlens_k == total - 1).all()):
        raise ValueError("group_query_attention: every batch row must hold total_sequence_length positions")
    p, d = total - s, q.shape[-1] // heads
    length = max(past_key.shape[2], total)
    presents = []
    for past, new in ((past_key, k), (past_value, v)):
        present = past.new_zeros(b, kv_heads, length, d)
        present[:, :, :p] = past[:, :, :p]
        present[:, :, p:total] = new.view(b, s, kv_heads, d).transpose(1, 2)
        presents.append(present)
    keys, values = (t[:, :, None, :total].float() for t in presents)  # (B, kvh, 1, T, D)
    qg = q.view(b, s, kv_heads, heads // kv_heads, d).permute(0, 2, 3, 1, 4).float()  # (B, kvh, g, S, D)
    causal = torch.arange(total, device=q.device) <= (torch.arange(s, device=q.device) + p)[:, None]  # query i: P + i
    scores = torch.where(causal, torch.matmul(qg, keys.transpose(-1, -2)) * scale, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, kvh, g, S, D)
    return out.permute(0, 3, 1, 2, 4).reshape(b, s, heads * d).to(q.dtype), presents[0], presents[1]


@group_query_attention.register_fake
def _(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, heads, kv_heads, scale):
    length = torch.library.get_ctx().new_dynamic_size()  # max(C, P + S): depends on a tensor's value
    shape = (past_key.shape[0], past_key.shape[1], length, past_key.shape[3])
    return torch.empty_like(q), past_key.new_empty(shape), past_value.new_empty(shape)


_GROUP_QUERY_ATTENTION = contrib_op(
    "GroupQueryAttention",
    ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"),
    {"num_heads": AttrType.INT, "kv_num_heads": AttrType.INT, "scale": AttrType.FLOAT},
    outputs=("output", "present_key", "present_value"), int32_inputs=("seqlens_k", "total_sequence_length"))


def _group_query_attention_onnx(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, heads: int,
                                kv_heads: int, scale: float):
    """GroupQueryAttention without rotary (q/k come rotated): with past_key and present_key bound to one buffer
    ONNX Runtime appends the new rows in place (past_present_share_buffer), on the CPU for a first prompt, a
    later chunk of any length and a single decode token alike."""
    return _GROUP_QUERY_ATTENTION(q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
                                  num_heads=heads, kv_num_heads=kv_heads, scale=scale)


CUSTOM_OPS = {torch.ops.zoomin.group_query_attention.default: _group_query_attention_onnx}


class GQAttention(Attention):
    """The gqa graph's attention: projections and M-RoPE here, attention and the cache update in the fused op."""

    def forward(self, x, cos, sin, seqlens_k, total_sequence_length, past_k, past_v):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        q = rotate(q.float(), cos, sin).to(x.dtype).reshape(b, s, -1)  # rotary in float32, as in Attention
        k = rotate(k.float(), cos, sin).to(x.dtype).reshape(b, s, -1)
        out, present_k, present_v = group_query_attention(q, k, self.v_proj(x), past_k, past_v, seqlens_k,
                                                          total_sequence_length, self.heads, self.kv_heads,
                                                          self.scaling)
        return self.o_proj(out), present_k, present_v


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (B, S, heads, D) with cos/sin (B, S, D): x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


class MLP(nn.Module):
    def __init__(self, src: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            cast_linear(p, dtype) for p in (src.gate_proj, src.up_proj, src.down_proj)
        )

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    """One decoder layer of the plain graph (its attention reads the mask bias and the past rows)."""

    attention = Attention

    def __init__(self, src: nn.Module, cfg: TextConfig, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(src.input_layernorm, dtype)
        self.self_attn = self.attention(src.self_attn, cfg, dtype)
        self.post_attention_layernorm = RMSNorm(src.post_attention_layernorm, dtype)
        self.mlp = MLP(src.mlp, dtype)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        return self.finish(x, *self.self_attn(self.input_layernorm(x), cos, sin, bias, past_k, past_v))

    def finish(self, x, attn, k, v):
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class GQALayer(Layer):
    """One decoder layer of the gqa graph (its attention reads the cache lengths and the shared cache buffer)."""

    attention = GQAttention

    def forward(self, x, cos, sin, seqlens_k, total_sequence_length, past_k, past_v):
        return self.finish(x, *self.self_attn(self.input_layernorm(x), cos, sin, seqlens_k, total_sequence_length,
                                              past_k, past_v))


class Prologue(nn.Module):
    """What every layer shares: the compute-dtype residual stream and the M-RoPE cos/sin."""

    def __init__(self, rotary: nn.Module, cfg: TextConfig, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(rotary.attention_scaling)
        self.sections = list(cfg.mrope_section)
        self.dtype = dtype

    def rope_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, S, head_dim) in float32; frequency band j of mrope_section reads position row j % 3."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # (3, B, S, D/2)
        bands, start = [], 0
        for j, width in enumerate(self.sections):
            bands.append(freqs[j % 3, :, :, start : start + width])
            start += width
        emb = torch.cat(bands, dim=-1)
        emb = torch.cat([emb, emb], dim=-1)
        return emb.cos() * self.rope_scale, emb.sin() * self.rope_scale

    def forward(self, inputs_embeds, position_ids):
        cos, sin = self.rope_tables(position_ids)
        return inputs_embeds.to(self.dtype), cos, sin


class MaskedPrologue(Prologue):
    """The plain graph's prologue: also the causal + padding mask as an additive float32 bias (B, 1, 1, S, T)."""

    def forward(self, inputs_embeds, position_ids, attention_mask):
        s = inputs_embeds.shape[1]
        total = attention_mask.shape[1]
        query_pos = torch.arange(s, device=inputs_embeds.device) + (total - s)  # query i sits at absolute P + i
        causal = torch.arange(total, device=inputs_embeds.device).unsqueeze(0) <= query_pos.unsqueeze(1)
        allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None]
        return *super().forward(inputs_embeds, position_ids), bias


class Epilogue(nn.Module):
    """Final norm and lm_head on the last `logits_to_keep` positions only; logits float32."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.norm = RMSNorm(norm, dtype)
        self.lm_head = cast_linear(lm_head, dtype)

    def forward(self, x, logits_to_keep):
        s = x.shape[1]
        keep = logits_to_keep.reshape(-1)[0].item()
        torch._check(keep >= 1)
        torch._check(keep <= s)
        return self.lm_head(self.norm(x[:, s - keep :])).float()


class TextDecoder(nn.Module):
    """Qwen2.5-VL text model + lm_head as a function of (embeddings, M-RoPE positions, cache inputs, past KV),
    whole: `forward(inputs_embeds, position_ids, cache_inputs, logits_to_keep, past_keys, past_values)` with
    cache_inputs the tuple of the flavour's cache inputs (CACHE_INPUTS, in io_names order).

    The build exports it piece by piece (`decoder_pieces`); this composition of the same pieces is what those
    pieces stitch back to, and what a torch baseline runs.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, graph: str = "gqa"):
        super().__init__()
        _check_graph(graph)
        parts = as_parts(model)
        self.cfg = parts.text
        self.dtype = dtype
        self.prologue = (Prologue if graph == "gqa" else MaskedPrologue)(parts.text_rotary(), self.cfg, dtype)
        layer = GQALayer if graph == "gqa" else Layer
        self.layers = nn.ModuleList(layer(parts.text_layer(i), self.cfg, dtype)
                                    for i in range(self.cfg.num_hidden_layers))
        self.epilogue = Epilogue(parts.text_norm(), parts.lm_head(), dtype)
        self.graph = graph

    def forward(self, inputs_embeds, position_ids, cache_inputs, logits_to_keep, past_keys, past_values):
        if self.graph == "gqa":  # cache_inputs: seqlens_k, total_sequence_length, read by every layer
            x, cos, sin = self.prologue(inputs_embeds, position_ids)
            layer_cache = cache_inputs
        else:  # cache_inputs: attention_mask, which the prologue turns into the bias every layer reads
            x, cos, sin, bias = self.prologue(inputs_embeds, position_ids, *cache_inputs)
            layer_cache = (bias,)
        presents_k, presents_v = [], []
        for layer, pk, pv in zip(self.layers, past_keys, past_values):
            x, k, v = layer(x, cos, sin, *layer_cache, pk, pv)
            presents_k.append(k)
            presents_v.append(v)
        return self.epilogue(x, logits_to_keep), presents_k, presents_v


def io_names(num_layers: int, graph: str = "gqa") -> tuple[list[str], list[str]]:
    """Graph input and output names, in TextDecoder.forward's flattened argument / result order."""
    inputs = ["inputs_embeds", "position_ids", *CACHE_INPUTS[graph], "logits_to_keep"]
    inputs += [f"past_key.{i}" for i in range(num_layers)] + [f"past_value.{i}" for i in range(num_layers)]
    outputs = ["logits"] + [f"present_key.{i}" for i in range(num_layers)]
    outputs += [f"present_value.{i}" for i in range(num_layers)]
    return inputs, outputs


def graph_for(precision: str) -> str:
    """The decoder graph flavour a build of `precision` gets: fp8 engines are QDQ graphs for TensorRT, which cannot
    run com.microsoft ops, so they keep the plain graph; every other precision gets the fused gqa graph."""
    return "plain" if precision == "fp8" else "gqa"


def _check_graph(graph: str) -> None:
    if graph not in DECODER_GRAPHS:
        raise ValueError(f"unknown decoder graph {graph!r}; choose one of {', '.join(DECODER_GRAPHS)}")


def _check_export_args(precision: str, opset: int, graph: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if opset < 17:
        raise ValueError(f"opset {opset} is not supported (17 or newer)")
    _check_graph(graph)


def decoder_pieces(parts: Parts, scratch: Path, *, precision: str = "fp32", opset: int = 17, graph: str = "gqa"
                   ) -> Iterator[Piece]:
    """Export the decoder into `scratch` one piece at a time: prologue, each layer, epilogue (norm + lm_head).

    A generator: each piece is exported when the caller asks for the next one, so only one layer's weights are
    ever loaded (and the caller may run, quantize or delete a piece before the next is made). The dynamo exporter
    runs with dynamic batch / new / past lengths; torchlib emits opset 18, and opset 17 (what older TensorRT
    releases accept) is reached by a small rewrite of each piece, see `_downgrade_to_17`.
    """
    _check_export_args(precision, opset, graph)
    cfg, dtype = parts.text, PRECISIONS[precision]
    # Example sizes are all distinct and > 1 so that torch.export cannot specialise or equate any dynamic dim.
    b, s, p = 2, 3, 4
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    finalize = _downgrade_to_17 if opset == 17 else None
    common = dict(opset=max(opset, 18), finalize=finalize)
    scratch = Path(scratch)
    exporter = PieceExporter()
    fused = graph == "gqa"

    embeds, positions = torch.zeros(b, s, cfg.hidden_size), torch.arange(s).expand(3, b, s).contiguous()
    if fused:
        prologue = Prologue(parts.text_rotary(), cfg, dtype).eval()
        args, names, dims, dim_names = (embeds, positions), ["inputs_embeds", "position_ids"], \
            ({0: batch, 1: seq}, {1: batch, 2: seq}), {}
    else:
        prologue = MaskedPrologue(parts.text_rotary(), cfg, dtype).eval()
        args = (embeds, positions, torch.ones(b, p + s, dtype=torch.int64))
        names = ["inputs_embeds", "position_ids", "attention_mask"]
        # The mask length is past + seq; torch.export infers that relation itself (Dim.AUTO).
        dims = ({0: batch, 1: seq}, {1: batch, 2: seq}, {0: batch, 1: torch.export.Dim.AUTO})
        dim_names = {("attention_mask", 1): "past_plus_seq"}
    shared = ["hidden", "rope_cos", "rope_sin", *([] if fused else ["mask_bias"])]
    path = exporter.export(("prologue", graph), prologue, args, scratch / "prologue.onnx", input_names=names,
                           output_names=shared, dynamic_shapes=dims, dim_names=dim_names, **common)
    yield Piece("prologue", path, {n: n for n in names}, {n: n for n in shared})
    with torch.no_grad():
        outputs = prologue(*args)
    del prologue

    if fused:  # the shared buffer: C cache rows, P + S = 7 of them valid after the call
        kv = [torch.zeros(b, cfg.num_key_value_heads, p + s + 1, cfg.head_dim, dtype=dtype) for _ in range(2)]
        cache = {"seqlens_k": torch.full((b,), p + s - 1, dtype=torch.int32),
                 "total_sequence_length": torch.tensor(p + s, dtype=torch.int32)}
        cache_dims = ({0: batch}, None, {0: batch, 2: past}, {0: batch, 2: past})
        layer_dim_names = {("present_key", 2): "present", ("present_value", 2): "present"}
    else:  # two tensors: torch.export would treat one tensor passed twice as one input
        kv = [torch.zeros(b, p, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype) for _ in range(2)]
        cache = {"mask_bias": outputs[3]}
        cache_dims = ({0: batch, 3: seq, 4: torch.export.Dim.AUTO}, {0: batch, 1: past}, {0: batch, 1: past})
        layer_dim_names = {("mask_bias", 4): "past_plus_seq"}
    hidden, cos, sin = outputs[:3]
    layer_in = ["hidden", "rope_cos", "rope_sin", *cache, "past_key", "past_value"]
    layer_out = ["hidden_out", "present_key", "present_value"]  # a graph cannot reuse an input's name
    layer_dims = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}, *cache_dims)
    for i in range(cfg.num_hidden_layers):
        layer = (GQALayer if fused else Layer)(parts.text_layer(i), cfg, dtype).eval()
        path = exporter.export(("layer", graph), layer, (hidden, cos, sin, *cache.values(), *kv),
                               scratch / f"layers.{i}.onnx", input_names=layer_in, output_names=layer_out,
                               dynamic_shapes=layer_dims, dim_names=layer_dim_names,
                               custom_translation_table=CUSTOM_OPS if fused else None, **common)
        del layer
        yield Piece(f"layers.{i}", path,
                    {**{n: n for n in layer_in[:-2]}, "past_key": f"past_key.{i}", "past_value": f"past_value.{i}"},
                    {"hidden_out": "hidden", "present_key": f"present_key.{i}", "present_value": f"present_value.{i}"})

    epilogue = Epilogue(parts.text_norm(), parts.lm_head(), dtype).eval()
    path = exporter.export("epilogue", epilogue, (hidden, torch.tensor([2], dtype=torch.int64)),
                           scratch / "epilogue.onnx",
                        input_names=["hidden", "logits_to_keep"], output_names=["logits"],
                        dynamic_shapes=({0: batch, 1: seq}, None), dim_names={("logits", 1): "keep"}, **common)
    del epilogue
    yield Piece("epilogue", path, {"hidden": "hidden", "logits_to_keep": "logits_to_keep"}, {"logits": "logits"})


PieceHook = Callable[[Piece], Piece]


def export_decoder(model, out_path: Path, *, precision: str = "fp32", opset: int = 17, graph: str = "gqa",
                   on_piece: PieceHook | None = None) -> Path:
    """Export the language model + lm_head to `out_path` (weights in `<name>.onnx.data`); returns the path.

    model: a transformers Qwen2_5_VLForConditionalGeneration or the parts of a checkpoint (zoomin.build.weights).
    graph: "gqa" or "plain" (see the module docstring; `graph_for` picks one per build precision).
    The graph is exported piece by piece (`decoder_pieces`) and stitched; `on_piece` may replace each piece as it
    is made (the quantized build calibrates and quantizes it there) before the next piece is exported.
    """
    _check_export_args(precision, opset, graph)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    parts = as_parts(model)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.pieces.", dir=out_path.parent) as scratch:
        pieces = [on_piece(p) if on_piece else p for p in decoder_pieces(parts, Path(scratch), precision=precision,
                                                                        opset=opset, graph=graph)]
        inputs, outputs = io_names(parts.text.num_hidden_layers, graph)
        return stitch(pieces, out_path, inputs=inputs, outputs=outputs)


# Ops whose `axes` moved from attribute to input in opset 18.
_AXES_INPUT_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                  "ReduceLogSumExp", "ReduceSumSquare"}


def _downgrade_to_17(model) -> None:
    """Rewrite torchlib's opset-18 graph as opset 17.

    The only opset-18 change this graph uses is Reduce*'s constant `axes` input, which becomes an attribute again.
    onnx.version_converter cannot do it (it fails on the unoptimised graph and leaves `noop_with_empty_axes` behind
    on the optimised one) and needs the whole model in one 2 GB protobuf; this pass works on the lazily loaded IR.
    Any other opset-18 construct would fail onnx.checker's opset-17 schema check in the tests.
    """
    import onnx_ir as ir

    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _AXES_INPUT_18:
            continue
        noop = node.attributes.pop("noop_with_empty_axes", None)
        if noop is not None and noop.value:
            raise ValueError(f"{node.name}: noop_with_empty_axes=1 has no opset-17 form")
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = node.inputs[1].const_value
            if axes is None:
                raise ValueError(f"{node.name}: {node.op_type} axes are not constant; cannot express in opset 17")
            node.attributes["axes"] = ir.AttrInt64s("axes", [int(a) for a in axes.numpy().reshape(-1)])
            node.resize_inputs(1)
        node.version = None
    model.opset_imports[""] = 17
    model.graph.opset_imports[""] = 17


def image_prompt_positions(model: nn.Module, grid_thw: tuple[int, int, int], text_before: int, text_after: int
                           ) -> tuple[torch.Tensor, int]:
    """M-RoPE positions (3, S) and rope delta of `text_before` tokens, one image of `grid_thw`, `text_after` tokens.

    Computed by transformers' own get_rope_index, so parity checks exercise the real position layout (image rows
    share t, h/w rows walk the merged grid, text after the image resumes at max + 1).
    """
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    n_image = grid_thw[0] * grid_thw[1] * grid_thw[2] // merge**2
    text = 0  # any non-special id: only the image-token mask matters for positions
    ids = [text] * text_before + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image
    ids += [cfg.vision_end_token_id] + [text] * text_after
    ids_t = torch.tensor([ids])
    positions, delta = model.model.get_rope_index(
        ids_t, mm_token_type_ids=(ids_t == cfg.image_token_id).int(), image_grid_thw=torch.tensor([grid_thw])
    )
    return positions[:, 0], int(delta.reshape(-1)[0])


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max|ref|: one figure that does not depend on the logits' overall scale."""
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def check_decoder(model: nn.Module, onnx_path: Path, *, grid_thw: tuple[int, int, int] = (1, 6, 4),
                  text_len: int = 8, decode_steps: int = 4, seed: int = 0) -> dict[str, Any]:
    """Relative logit errors of the exported decoder (run by the runtime's Decoder) against `model` in float32.

    Prefill: an image-bearing prompt (random embedding-table rows as inputs_embeds, real M-RoPE positions), all
    positions' logits compared. Decode: `decode_steps` single-token steps through the KV cache, positions
    cache index + rope delta, compared with transformers stepping its own cache. Returns
    {"prefill": err, "decode": max step err, "decode_steps": [err, ...], "seconds": wall time}.
    """
    from zoomin.runtime.decoder import Decoder

    start = time.perf_counter()
    cfg = text_config(model.config.to_dict())
    positions, delta = image_prompt_positions(model, grid_thw, text_len // 2, text_len - text_len // 2)
    s = positions.shape[1]
    table = model.get_input_embeddings().weight.detach().float()
    rows = torch.randint(table.shape[0], (s + decode_steps,), generator=torch.Generator().manual_seed(seed))
    embeds = table[rows]
    decoder = Decoder.load(onnx_path, cfg)
    cache = decoder.new_cache(s + decode_steps)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds[None, :s], position_ids=positions[:, None],
                    attention_mask=torch.ones(1, s, dtype=torch.long), use_cache=True)
        got = decoder.forward(embeds[:s].numpy(), positions.numpy(), cache, logits_to_keep=s)
        result: dict[str, Any] = {"prefill": relative_error(got, ref.logits[0].numpy())}
        hf_cache, steps = ref.cache, []
        for i in range(s, s + decode_steps):
            pos = torch.full((3, 1, 1), i + delta, dtype=torch.long)
            ref = model(inputs_embeds=embeds[None, i : i + 1], position_ids=pos, cache=hf_cache,
                        attention_mask=torch.ones(1, i + 1, dtype=torch.long), use_cache=True)
            hf_cache = ref.cache
            got = decoder.forward(embeds[i : i + 1].numpy(), pos[:, 0].numpy(), cache)
            steps.append(relative_error(got, ref.logits[0, -1:].numpy()))
    result.update(decode=max(steps, default=0.0), decode_steps=steps, seconds=time.perf_counter() - start)
    return result
