"""Quantize fp32 ONNX graphs with onnxruntime.quantization, keeping every graph input and output.

The streamed build (zoomin.build.streaming) quantizes each exported piece (a decoder layer, a vision block, the
lm_head) on its own calibration inputs and stitches the quantized pieces; the functions below take any graph.

Graph I/O is untouched (float32 embeddings/logits, float32 KV cache), so the runtime's Decoder and VisionEncoder
load every precision unchanged. Only constant-weight MatMuls are quantized: attention's activation x activation
MatMuls, softmax, norms and rotary stay float32 in every precision.

  int8  both graphs: dynamic int8 (quantize_dynamic): int8 weights per output channel, activations quantized
        per tensor at run time (DynamicQuantizeLinear + MatMulInteger). ORT CPU and CUDA.
  int4  decoder: MatMulNBits 4-bit block-wise weights (block 32/64/128), found by GPTQ on the calibration
        activations (default), HQQ (data-free) or plain round-to-nearest; the lm_head in `lm_head_bits`
        (default 4) blocks of the same size, by GPTQ with GPTQ, else by round-to-nearest (HQQ's float zero points
        have no embedding gather). With tied embeddings its codes are the embedding table too
        (zoomin.build.embedding_table): GPTQ tunes them for the head, and still wins with the table replayed
        (small, tied: KL 3.2e-4 against 5.9e-4 for an RTN head; table row error 0.087 against 0.080).
        Vision: dynamic int8 as in int8 (the tower is ~9% of a 7B's weights, so 4 bits would save little on the
        part whose features carry the boxes). ORT CPU, CUDA.
  fp8   both graphs: QDQ float8 e4m3fn on the two inputs of every weight MatMul, weight scales per output
        channel and activation scales per tensor, both amax / 448 over the weights / calibration activations;
        opset 19. The form TensorRT builds FP8 engines from; ORT CPU executes the Q/DQ pairs as written
        (slowly), which is how drift is measured.

The token embedding table is block-quantized too in int8 and int4 engines (zoomin.build.embedding_table, with
the `BlockCodes` below); fp8 engines keep an fp16 table.

Written here, because onnxruntime.quantization (1.32) does not do it for this model:
- `gemms_to_matmuls`: the vision exporter emits its linears as Gemm; the dynamic and weight-only quantizers only
  take MatMul.
- `gptq_codes`, `rtn_codes` + `matmulnbits_node`: onnxruntime's GPTQ reduces to round-to-nearest (see
  gptq_codes), and its MatMulNBits packer fails on zero points when a row has an odd number of blocks (e.g.
  K = 96, block 32); the lm_head's layout must be known exactly to share it with the embedding gather.
- `fp8_overrides`: amax scales instead of onnxruntime's standard-deviation ones (see there), passed to
  quantize_static as its TensorQuantOverrides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .checkpoint import BuildError

QUANT_PRECISIONS = ("int8", "int4", "fp8")
INT4_ALGOS = ("gptq", "hqq", "rtn")
BLOCK_SIZES = (32, 64, 128)
FP8_OPSET = 19  # float8 QuantizeLinear/DequantizeLinear
LM_HEAD_BITS = (4, 8)
FP8_MAX = 448.0  # largest finite float8 e4m3fn
PROTOBUF_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB, less room for the graph itself


@dataclass(frozen=True)
class QuantConfig:
    precision: str
    block_size: int = 32  # int4 (and int4's lm_head) weights per scale
    int4_algo: str = "gptq"
    lm_head_bits: int = 4  # int4: the lm_head's (and a tied embedding table's) bits

    def __post_init__(self) -> None:
        if self.precision not in QUANT_PRECISIONS:
            raise BuildError(f"not a quantized precision: {self.precision!r} (one of {', '.join(QUANT_PRECISIONS)})")
        if self.block_size not in BLOCK_SIZES:
            raise BuildError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.int4_algo not in INT4_ALGOS:
            raise BuildError(f"--int4-algo must be one of {', '.join(INT4_ALGOS)}, got {self.int4_algo!r}")
        if self.lm_head_bits not in LM_HEAD_BITS:
            raise BuildError(f"lm_head bits must be one of {', '.join(map(str, LM_HEAD_BITS))}, "
                             f"got {self.lm_head_bits}")

    @property
    def export_opset(self) -> int | None:
        """Opset the fp32 graphs must be exported at for this precision (None: the exporter's default)."""
        return FP8_OPSET if self.precision == "fp8" else None

    def describe(self) -> dict[str, str]:
        """How each graph is quantized (the embedding table describes itself: embedding_table.describe)."""
        if self.precision == "int8":
            dec = "dynamic int8 (MatMulInteger), int8 weights per output channel"
        elif self.precision == "int4":
            dec = (f"MatMulNBits 4-bit, block {self.block_size}, {self.int4_algo.upper()}; lm_head MatMulNBits "
                   f"{self.lm_head_bits}-bit block {self.block_size}, {'GPTQ' if self.int4_algo == 'gptq' else 'RTN'}")
        else:
            dec = "QDQ float8 e4m3fn, amax scales per weight channel and per activation tensor"
        vis = dec if self.precision == "fp8" else "dynamic int8 (MatMulInteger), int8 weights per output channel"
        return {"decoder": dec, "vision": vis}


def quantize_graph(role: str, src: Path, dst: Path, cfg: QuantConfig, feeds: Sequence[dict[str, np.ndarray]],
                   scratch: Path, *, vocab_size: int | None = None) -> Path:
    """Quantize the fp32 graph `src` ("vision" or "decoder") to `dst` (+ `dst`.data)."""
    import onnx

    scratch.mkdir(parents=True, exist_ok=True)
    if role == "vision":
        src = gemms_to_matmuls(src, scratch / "vision.matmul.onnx")
    if not weight_matmuls(onnx.load(str(src), load_external_data=False)):
        # nothing to quantize (a streamed build's decoder prologue: mask and rotary tables only)
        ir.save(ir.load(str(src)), str(dst), external_data=dst.name + ".data")
        return dst
    with _quiet_ort_logging():
        if cfg.precision == "fp8":
            quantize_fp8(src, dst, feeds, scratch)
        elif cfg.precision == "int4" and role == "decoder":
            quantize_int4(src, dst, cfg, feeds, scratch, vocab_size=vocab_size)
        else:
            quantize_int8(src, dst)
    return dst


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # reduce_range: 7-bit weights. Without VNNI (AVX2 x86: AMD Zen 1-3, older Intel) ONNX Runtime's u8s8 kernel adds
    # pairs of products in saturating int16 (vpmaddubsw); full-range weights can overflow it (tiny int8 KL 1.0e-5
    # on an AVX-512-VNNI Xeon, 1.7e-4 on a Zen 3 EPYC). 7 bits cannot overflow on any x86.
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                     weight_type=QuantType.QInt8, use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True})


def quantize_fp8(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], scratch: Path) -> None:
    """quantize_static to QDQ float8: Q/DQ on the two inputs of every weight MatMul, amax scales (`fp8_overrides`).

    Outputs stay float (TensorRT fuses DQ -> GEMM and writes the GEMM's output in the surrounding precision);
    left to itself onnxruntime would also quantize MatMul outputs, attention's activation x activation MatMuls
    (MatMulConstBOnly is not honoured in QDQ mode) and with them the logits.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .calibration import FeedReader

    model = onnx.load(str(src))
    nodes = list(weight_matmuls(model))
    overrides = fp8_overrides(model, feeds, scratch)
    del model
    # quantize_static insists on its Distribution calibration for float8 even though every scale is overridden;
    # one feed per pass: its histogram collector stacks a pass's outputs into one array, which fails for feeds
    # of different lengths (every image has its own).
    quantize_static(src, dst, FeedReader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    nodes_to_quantize=nodes, per_channel=True, activation_type=QuantType.QFLOAT8E4M3FN,
                    weight_type=QuantType.QFLOAT8E4M3FN, calibrate_method=CalibrationMethod.Distribution,
                    use_external_data_format=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibStridedMinMax": 1,
                                   "OpTypesToExcludeOutputQuantization": ["MatMul"],
                                   "TensorQuantOverrides": overrides})


def quantize_int4(src: Path, dst: Path, cfg: QuantConfig, feeds: Sequence[dict[str, np.ndarray]], scratch: Path,
                  *, vocab_size: int | None) -> None:
    """lm_head to cfg.lm_head_bits blocks, every other weight MatMul to 4-bit blocks, with cfg.int4_algo (the
    lm_head RTN unless GPTQ: HQQ's float zero points have no embedding gather)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    targets = weight_matmuls(model)
    heads = [n for n, w in targets.items() if vocab_size is not None and w.shape[-1] == vocab_size]
    body = [n for n in targets if n not in heads]
    if cfg.int4_algo == "gptq":
        hessians = input_hessians(model, list(targets.values()), feeds, scratch)
        gptq_to_matmulnbits(model, heads, hessians, cfg.block_size, cfg.lm_head_bits)
        gptq_to_matmulnbits(model, body, hessians, cfg.block_size)
    else:
        inits = {t.name: t for t in model.graph.initializer}
        for name in heads:
            weight = onnx.numpy_helper.to_array(inits[targets[name].weight])
            replace_with_matmulnbits(model, name, rtn_codes(weight.T, cfg.block_size, cfg.lm_head_bits))
            del weight
        del inits
        algo = (HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=4) if cfg.int4_algo == "hqq"
                else DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=False, bits=4))
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=cfg.block_size, algo_config=algo)
        quantizer.process()
        model = quantizer.model.model
    set_accuracy_level(model, INT4_ACCURACY_LEVEL)
    _save(model, dst)


# MatMulNBits accuracy_level 4 lets ORT's CPU kernel quantize activations to int8 and use integer dot products.
# Measured on the 3b-shaped perf preset (2 cores, AVX-512 VNNI): the default level (fp32 activations) took
# > 120 s for one two-stage run; level 4 decodes at 16 ms/token (perf/RESULTS.md). CUDA ignores the attribute.
INT4_ACCURACY_LEVEL = 4


def set_accuracy_level(model, level: int) -> None:
    import onnx

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])


@dataclass(frozen=True)
class WeightMatMul:
    node: str
    input: str  # activation input name
    weight: str  # initializer name
    shape: tuple[int, int]  # (K, N)


def weight_matmuls(model) -> dict[str, WeightMatMul]:
    """MatMul nodes whose second input is a 2-D float initializer, by node name, in graph order."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        t = inits.get(n.input[1]) if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") else None
        if t is not None and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT:
            out[n.name] = WeightMatMul(n.name, n.input[0], n.input[1], (int(t.dims[0]), int(t.dims[1])))
    return out


def probe_activations(model, targets: Sequence[WeightMatMul], feeds: Sequence[dict[str, np.ndarray]],
                      scratch: Path, visit: Callable[[str, np.ndarray], None], budget_bytes: int = 1 << 30) -> None:
    """Call visit(name, x (rows, K) float32) with every target's input activation on every calibration feed.

    onnxruntime runs the graph with the activations exposed as extra outputs, a bounded number of them per run
    (`budget_bytes` of float32 rows) so that a large model never holds all of them at once.
    """
    import onnx
    import onnxruntime as ort

    names = list(dict.fromkeys(t.input for t in targets))
    width = {t.input: t.shape[0] for t in targets}
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in names:
        if name not in existing:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave the cores to numpy between runs
    if _initializer_bytes(augmented) >= PROTOBUF_LIMIT:
        path = scratch / "activation-probe.onnx"
        onnx.save_model(augmented, str(path), save_as_external_data=True, location=path.name + ".data")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    else:
        session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del augmented
    for feed in feeds:
        rows = max(int(np.prod(v.shape[:-1])) for v in feed.values() if v.dtype == np.float32)
        chunk: list[str] = []
        for i, name in enumerate(names):
            chunk.append(name)
            nxt = width[names[i + 1]] if i + 1 < len(names) else 0
            if not nxt or 4 * rows * (sum(width[n] for n in chunk) + nxt) > budget_bytes:
                for n, x in zip(chunk, session.run(chunk, feed)):
                    visit(n, x.reshape(-1, width[n]))
                chunk = []


def input_hessians(model, targets: Sequence[WeightMatMul], feeds: Sequence[dict[str, np.ndarray]], scratch: Path
                   ) -> dict[str, np.ndarray]:
    """H = mean over calibration rows of x^T x for each target's input activation x (float64, K x K)."""
    sums = {t.input: np.zeros((t.shape[0], t.shape[0])) for t in targets}
    rows = dict.fromkeys(sums, 0)

    def visit(name: str, x: np.ndarray) -> None:
        sums[name] += (x.T @ x).astype(np.float64)  # one feed's rows in float32, the running sum in float64
        rows[name] += len(x)

    probe_activations(model, targets, feeds, scratch, visit)
    return {n: h / max(rows[n], 1) for n, h in sums.items()}


def fp8_overrides(model, feeds: Sequence[dict[str, np.ndarray]], scratch: Path) -> dict[str, list[dict]]:
    """TensorQuantOverrides giving quantize_static amax scales: max|x| / 448 per activation tensor (over the
    calibration set) and per output channel of each weight.

    onnxruntime's own float8 scales map the tensor's standard deviation onto e4m3's (std / 100), which
    saturates everything beyond ~4.5 sigma: harmless for Gaussian data, ruinous for the outlier channels LLM
    activations are known for (30% error on a Gaussian with 0.02% outliers at 30 sigma, against 2.6% with amax
    scales; e4m3's 2^-9..448 range has room for the small values). amax / 448 is the scale TensorRT's own
    tooling calibrates.
    """
    import ml_dtypes
    import onnx

    targets = list(weight_matmuls(model).values())
    amax: dict[str, float] = {}

    def visit(name: str, x: np.ndarray) -> None:
        amax[name] = max(amax.get(name, 0.0), float(np.abs(x).max(initial=0.0)))

    probe_activations(model, targets, feeds, scratch, visit)
    zero = np.array(0, ml_dtypes.float8_e4m3fn)

    def scale(m) -> np.ndarray:
        # a hair above amax / 448: onnxruntime casts weights to float8 without saturating, and 448.00003 is NaN
        return np.asarray(np.where(m > 0, np.float64(m) / FP8_MAX * (1 + 2**-20), 1.0), np.float32)

    overrides = {name: [{"scale": scale(np.float32(m)), "zero_point": zero}] for name, m in amax.items()}
    inits = {t.name: t for t in model.graph.initializer}
    for t in targets:
        per_channel = np.abs(onnx.numpy_helper.to_array(inits[t.weight])).max(axis=0)
        overrides[t.weight] = [{"axis": 1, "scale": scale(m), "zero_point": zero} for m in per_channel]
    return overrides


def hessian_factor(hessian: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): the upper Cholesky factor of the damped inverse Hessian, H^-1 = U^T U, and the input channels
    that never saw a non-zero activation (they get weight 0 and unit curvature, as in the GPTQ paper's code).

    U is read off the Cholesky factor of H with rows and columns reversed: if rev(H) = L L^T then
    U = rev(L^-1). That is one Cholesky and one triangular solve (float32, torch's multithreaded LAPACK), about
    4x faster than numpy inverting H in float64 and factoring the inverse (23 s against 100 s for the 11008-wide
    down_proj of a 3B on 2 cores).
    """
    import torch

    h = torch.from_numpy(np.asarray(hessian, np.float32)).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    lower = torch.linalg.cholesky(torch.flip(h, (0, 1)))
    inv = torch.linalg.solve_triangular(lower, torch.eye(len(h)), upper=False)
    return torch.flip(inv, (0, 1)).numpy(), dead.numpy()


def gptq_codes(weight: np.ndarray, factor: tuple[np.ndarray, np.ndarray], block_size: int, bits: int = 4,
               lazy: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022) for a (K, N) MatMul weight: asymmetric `bits`-bit codes per block of
    `block_size` input rows, each row's rounding error pushed onto the rows not yet quantized through the
    inverse Hessian of the layer inputs (`hessian_factor`), so that the layer's outputs on the calibration
    activations move least.

    onnxruntime's own GPTQ (quantization.neural_compressor.weight_only.gptq, 1.32) reads the error-feedback
    coefficients from the zero half of its triangular factor, so it returns plain round-to-nearest; this is
    the algorithm as published. Group scales are set when a block starts, from the already-updated rows.
    Returns codes (K, N) uint8, scales (blocks, N) float32, zero points (blocks, N) uint8.
    """
    u, dead = factor
    k, n = weight.shape
    qmax = 2**bits - 1
    w = np.array(weight, np.float32)
    w[dead] = 0.0
    blocks = -(-k // block_size)
    codes = np.zeros((k, n), np.uint8)
    scales = np.zeros((blocks, n), np.float32)
    zeros = np.zeros((blocks, n), np.float32)
    lazy = max(lazy // block_size, 1) * block_size  # lazy batches hold whole quantization blocks
    for b0 in range(0, k, lazy):
        b1 = min(b0 + lazy, k)
        w1, err = w[b0:b1], np.zeros((b1 - b0, n), np.float32)
        u1 = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            r = b0 + i
            if r % block_size == 0:
                group = w1[i:i + block_size]
                lo, hi = np.minimum(group.min(0), 0.0), np.maximum(group.max(0), 0.0)
                scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
                zero = np.clip(np.round(-lo / scale), 0, qmax)
                scales[r // block_size], zeros[r // block_size] = scale, zero
            q = np.clip(np.round(w1[i] / scale) + zero, 0, qmax)
            codes[r] = q
            err[i] = (w1[i] - (q - zero) * scale) / u1[i, i]
            w1[i + 1:] -= np.outer(u1[i, i + 1:], err[i])
        w[b1:] -= u[b0:b1, b1:].T @ err
    return codes, scales, zeros.astype(np.uint8)


@dataclass
class BlockCodes:
    """Block-wise asymmetric codes of a MatMul weight W (K, N), one row per output channel n (a vocabulary entry
    for the lm_head, which makes a row of the embedding table when the two are tied):
    W[k, n] = (codes[n, k] - zeros[n, k // block]) * scales[n, k // block], in float32 — MatMulNBits'
    dequantization, and GatherBlockQuantized's (the embedding gather), bit for bit.
    """

    codes: np.ndarray  # (N, blocks, block) uint8 in [0, 2^bits), K zero-padded to blocks * block
    scales: np.ndarray  # (N, blocks) float32
    zeros: np.ndarray  # (N, blocks) uint8
    k: int
    bits: int

    @property
    def block_size(self) -> int:
        return self.codes.shape[2]

    @classmethod
    def from_columns(cls, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int,
                     bits: int = 4) -> "BlockCodes":
        """From gptq_codes' layout: codes (K, N), scales and zeros (blocks, N)."""
        k, n = codes.shape
        blocks = scales.shape[0]
        padded = np.zeros((blocks * block_size, n), np.uint8)
        padded[:k] = codes
        return cls(np.ascontiguousarray(padded.T).reshape(n, blocks, block_size), np.ascontiguousarray(scales.T),
                   np.ascontiguousarray(zeros.T), k, bits)

    def packed(self) -> np.ndarray:
        """MatMulNBits' B (N, blocks, block * bits / 8): element k of a block in byte k * bits // 8, low nibble
        first for 4 bits."""
        c = self.codes
        return c.copy() if self.bits == 8 else (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)

    def packed_zeros(self) -> np.ndarray:
        """Zero points (N, ceil(blocks * bits / 8)), packed like the codes (a row's odd last nibble is 0)."""
        if self.bits == 8:
            return self.zeros.copy()
        n, blocks = self.zeros.shape
        z = np.zeros((n, blocks + blocks % 2), np.uint8)
        z[:, :blocks] = self.zeros
        return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)

    def dequantize(self) -> np.ndarray:
        """W (K, N) float32 as MatMulNBits computes it."""
        w = (self.codes.astype(np.float32) - self.zeros[..., None].astype(np.float32)) * self.scales[..., None]
        return np.ascontiguousarray(w.reshape(len(w), -1)[:, :self.k].T)


def rtn_codes(rows: np.ndarray, block_size: int, bits: int, chunk: int = 8192) -> BlockCodes:
    """Round-to-nearest BlockCodes of the rows (N, K) of a weight's transpose (for the lm_head: the (vocab, hidden)
    table), `chunk` rows at a time; the same scales, zero points and rounding as gptq_codes without feedback."""
    n, k = rows.shape
    qmax = 2**bits - 1
    blocks = -(-k // block_size)
    codes = np.empty((n, blocks, block_size), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    zeros = np.empty((n, blocks), np.uint8)
    for s in range(0, n, chunk):
        w = np.zeros((min(chunk, n - s), blocks * block_size), np.float32)
        w[:, :k] = rows[s:s + chunk]
        w = w.reshape(len(w), blocks, block_size)
        lo, hi = np.minimum(w.min(-1), 0.0), np.maximum(w.max(-1), 0.0)
        scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, qmax)
        codes[s:s + chunk] = np.clip(np.round(w / scale[..., None]) + zero[..., None], 0, qmax)
        scales[s:s + chunk], zeros[s:s + chunk] = scale, zero
    return BlockCodes(codes, scales, zeros, k, bits)


def matmulnbits_node(node, q: BlockCodes):
    """A com.microsoft MatMulNBits node + initializers replacing MatMul `node` (weight input[1]) by `q`.

    Layout per the contrib op: B (N, blocks, block * bits / 8) (K padded with zero codes), scales (N, blocks),
    zero points (N, ceil(blocks * bits / 8)): `BlockCodes.packed` / `packed_zeros`.
    """
    import onnx

    base = f"{node.input[1]}_Q{q.bits}"
    inits = [onnx.numpy_helper.from_array(q.packed(), base),
             onnx.numpy_helper.from_array(q.scales, f"{base}_scales"),
             onnx.numpy_helper.from_array(q.packed_zeros(), f"{base}_zero_points")]
    new = onnx.helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in inits)], list(node.output),
                                name=f"{node.name}_Q{q.bits}", domain="com.microsoft", K=q.k, N=len(q.codes),
                                bits=q.bits, block_size=q.block_size)
    return new, inits


def replace_with_matmulnbits(model, name: str, q: BlockCodes) -> None:
    """Replace MatMul node `name` in `model` (in place) by MatMulNBits `q`; drops the float weight."""
    import onnx

    node = next(n for n in model.graph.node if n.name == name)
    weight = node.input[1]
    new, inits = matmulnbits_node(node, q)
    node.CopyFrom(new)
    model.graph.initializer.extend(inits)
    if not any(weight in n.input for n in model.graph.node):
        index = next(i for i, t in enumerate(model.graph.initializer) if t.name == weight)
        del model.graph.initializer[index]  # in place: rebuilding the list would copy every weight
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def gptq_to_matmulnbits(model, nodes: Sequence[str], hessians: dict[str, np.ndarray], block_size: int,
                        bits: int = 4) -> None:
    """Replace the named MatMuls in `model` (in place) by GPTQ-quantized `bits`-bit MatMulNBits."""
    import onnx

    targets = weight_matmuls(model)
    inits = {t.name: t for t in model.graph.initializer}
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # q/k/v (and gate/up) share their input's factor
    for name in nodes:
        t = targets[name]
        if t.input not in factors:
            factors[t.input] = hessian_factor(hessians.pop(t.input))
        codes, scales, zeros = gptq_codes(onnx.numpy_helper.to_array(inits[t.weight]), factors[t.input], block_size,
                                          bits)
        if all(targets[m].input != t.input for m in nodes[nodes.index(name) + 1:]):
            del factors[t.input]  # last user of this input: free the K x K factor
        replace_with_matmulnbits(model, name, BlockCodes.from_columns(codes, scales, zeros, block_size, bits))


def _save(model, dst: Path) -> None:
    import onnx

    for old in (dst, dst.with_name(dst.name + ".data")):
        old.unlink(missing_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)


def _initializer_bytes(model) -> int:
    import onnx

    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)


def gemms_to_matmuls(src: Path, dst: Path) -> Path:
    """Rewrite Gemm(x, W, b; transB=1) with a constant W as MatMul(x, W^T) [+ Add(b)], written to `dst`.

    Exact (same products and sums); needed because onnxruntime's dynamic and weight-only quantizers only
    handle MatMul, and a MatMul weight's output channels are its last axis, where per-channel scales go.
    """
    model = ir.load(str(src))
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {k: v.value for k, v in node.attributes.items()}
        w = node.inputs[1]
        if (attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transA", 0)) != (1.0, 1.0, 0) \
                or w is None or w.const_value is None:
            continue
        weight = w.const_value.numpy()
        if attrs.get("transB", 0):
            weight = weight.T
        wt = ir.Value(name=f"{w.name}.matmul", const_value=ir.tensor(np.ascontiguousarray(weight),
                                                                       name=f"{w.name}.matmul"))
        wt.shape, wt.dtype = ir.Shape(weight.shape), w.dtype
        graph.register_initializer(wt)
        out = node.outputs[0]
        matmul = ir.Node("", "MatMul", [node.inputs[0], wt], name=f"{node.name}.matmul")
        new = [matmul]
        result = matmul.outputs[0]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            add = ir.Node("", "Add", [result, node.inputs[2]], name=f"{node.name}.bias")
            new.append(add)
            result = add.outputs[0]
        result.shape, result.dtype = out.shape, out.dtype
        graph.insert_after(node, new)
        name, out.name = out.name, f"{out.name}.gemm"
        ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
        result.name = name  # a graph output (image_embeds) keeps its name
        graph.remove(node, safe=True)
    for value in list(graph.initializers.values()):
        if not value.uses() and value not in graph.outputs:
            del graph.initializers[value.name]
    ir.save(model, str(dst), external_data=dst.name + ".data")
    return dst


@contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """onnxruntime.quantization logs every node on the root logger and prints calibration progress to stdout
    (where zoomin-build writes its results); keep both out of the build's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
            yield
    finally:
        root.setLevel(level)
