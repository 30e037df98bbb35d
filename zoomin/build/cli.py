"""`zoomin-build`: turn a Qwen2.5-VL checkpoint into an engine directory."""

from __future__ import annotations

from pathlib import Path

import click

PRECISION_HELP = """Weights/compute precision of the engine.

fp32: reference, any ONNX Runtime device (CPU, CUDA, TensorRT).

fp16: half the size; CUDA/TensorRT native, runs on CPU too (slower).

int8: dynamic int8 MatMuls (int8 per-channel weights, activations quantized at run time); ORT CPU and CUDA.

int4: 4-bit block-wise decoder weights (MatMulNBits; GPTQ on the calibration set by default), 4-bit lm_head
(with tied embeddings the token table is the lm_head's own codes, stored once), int8 vision; ORT CPU and CUDA
(com.microsoft MatMulNBits), not TensorRT.

fp8: QDQ float8 e4m3 graphs (per-channel weights, calibrated activation scales), opset 19; for TensorRT >= 10
on FP8 GPUs (Ada, Hopper, Blackwell); ORT CPU runs it slowly (how its accuracy is checked).

int8/int4/fp8 calibrate on --calib-images through the ZoomIn protocol and write drift.json."""


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model", required=True, metavar="CKPT_DIR|tiny-random",
              help="Hugging Face Qwen2.5-VL checkpoint folder, or tiny-random for the embedded test model.")
@click.option("--precision", default="fp32", show_default=True, metavar="fp32|fp16|int8|int4|fp8", help=PRECISION_HELP)
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Engine directory to write [default: engines/<model-name>-<precision>].")
@click.option("--force", is_flag=True, help="Replace an existing engine directory.")
@click.option("--protocol", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="ZoomIn prompt/output protocol JSON to store with the engine [default: built-in ZoomIn protocol].")
@click.option("--no-parity", is_flag=True, help="Skip the parity check against transformers at the end.")
@click.option("--calib-images", type=click.Path(path_type=Path), default=None,
              help="int8/int4/fp8: folder of calibration images (with an optional manifest.json of regions) "
                   "[default: the calibration/ set: real photos and synthetic stand-ins].")
@click.option("--calib-size", type=int, default=None,
              help="int8/int4/fp8: number of calibration images, spread over the set [default: all].")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="int4: weights per quantization scale [default: 32].")
@click.option("--int4-algo", type=click.Choice(["gptq", "hqq", "rtn"]), default=None,
              help="int4: gptq (uses the calibration activations), hqq (data-free) or rtn (round to nearest) "
                   "[default: gptq].")
@click.option("--lm-head-bits", type=click.Choice(["4", "8"]), default=None,
              help="int4: bits of the lm_head (and of a tied embedding table, which shares its codes); 8 moves the "
                   "logits less for 1.8x the head's bytes [default: 4].")
@click.option("--target", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True,
              help="onnx: the ONNX engine only. tensorrt: also TensorRT plans of the vision stages and a "
                   "ModelOpt-quantized TensorRT-LLM language model (tensorrt/ in the engine; needs the gpu extra "
                   "and an NVIDIA GPU; not yet run on a GPU).")
@click.option("--vision-precision", type=click.Choice(["fp16", "fp8"]), default="fp16", show_default=True,
              help="--target tensorrt: vision plans in fp16, or fp8 from the calibrated graphs of --precision fp8.")
@click.option("--llm-quant", type=click.Choice(["auto", "fp8", "int4_awq"]), default="auto", show_default=True,
              help="--target tensorrt: language-model weights FP8 (with FP8 activations) or INT4-AWQ (blocks of "
                   "128); auto: fp8 on GPUs with FP8 (compute capability >= 8.9), else int4_awq.")
@click.option("--kv-cache", type=click.Choice(["auto", "fp16", "bf16", "fp8"]), default="auto", show_default=True,
              help="--target tensorrt: KV cache dtype; auto keeps the model's (bf16). fp8 is opt-in: validate it.")
def main(model: str, precision: str, out: Path | None, force: bool, protocol: Path | None, no_parity: bool,
         calib_images: Path | None, calib_size: int | None, block_size: str | None, int4_algo: str | None,
         lm_head_bits: str | None, target: str, vision_precision: str, llm_quant: str, kv_cache: str) -> None:
    """Export a Qwen2.5-VL checkpoint to a zoomin engine directory (vision encoder, embedding, KV-cache decoder)."""
    import json

    from .checkpoint import BuildError
    from .drift import DRIFT_FILE, format_report
    from .engine import BuildOptions, build_engine, summary_lines

    name = Path(model).name or "model"
    out = out or Path("engines") / f"{name}-{precision}"
    precision = precision.lower()
    if precision in ("fp32", "fp16") and target == "onnx" and (calib_images or calib_size is not None):
        raise click.UsageError("--calib-images/--calib-size apply to the quantized precisions int8, int4, fp8 and "
                               "to --target tensorrt")
    trt = None
    if target == "tensorrt":  # refuse before the ONNX build, not after it
        from .tensorrt import TensorRTOptions, require_gpu_stack, resolve_options

        try:
            stack = require_gpu_stack()
            trt = resolve_options(TensorRTOptions(vision_precision, llm_quant, kv_cache), precision, stack)
        except BuildError as e:
            raise click.ClickException(str(e)) from None
    elif (vision_precision, llm_quant, kv_cache) != ("fp16", "auto", "auto"):
        raise click.UsageError("--vision-precision/--llm-quant/--kv-cache apply to --target tensorrt")
    if precision != "int4" and (block_size or int4_algo or lm_head_bits):
        raise click.UsageError("--block-size/--int4-algo/--lm-head-bits apply to --precision int4")
    opts = BuildOptions(model=Path(model), out=out, precision=precision, force=force, protocol=protocol,
                        check_parity=not no_parity, calib_images=calib_images, calib_size=calib_size,
                        block_size=int(block_size or 32), int4_algo=int4_algo or "gptq",
                        lm_head_bits=int(lm_head_bits or 4))
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    try:
        result = build_engine(opts, log=log)
        if trt is not None:
            from ..runtime.manifest import Manifest
            from .calibration import load_calibration_set
            from .tensorrt import build_tensorrt

            build_tensorrt(out, Path(model), trt, stack, load_calibration_set(calib_images, calib_size), log)
            result.manifest = Manifest.load(out)
    except BuildError as e:
        raise click.ClickException(str(e)) from None
    for line in summary_lines(result):
        click.echo(line)
    drift = result.engine_dir / DRIFT_FILE
    if drift.is_file():
        for line in format_report(json.loads(drift.read_text())):
            click.echo(line)
