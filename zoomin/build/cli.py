"""`zoomin-build`: turn a Qwen2.5-VL checkpoint into an engine directory."""

from __future__ import annotations

from pathlib import Path

import click

PRECISION_HELP = """Weights/compute precision of the engine.
fp32: reference, any ONNX Runtime device (CPU, CUDA, TensorRT).
fp16: half the size; CUDA/TensorRT native, runs on CPU too (slower).
int8, int4, fp8: quantized engines (not available in this version)."""


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
def main(model: str, precision: str, out: Path | None, force: bool, protocol: Path | None, no_parity: bool) -> None:
    """Export a Qwen2.5-VL checkpoint to a zoomin engine directory (vision encoder, embedding, KV-cache decoder)."""
    from .checkpoint import BuildError
    from .engine import BuildOptions, build_engine, summary_lines

    name = Path(model).name or "model"
    out = out or Path("engines") / f"{name}-{precision}"
    opts = BuildOptions(model=Path(model), out=out, precision=precision.lower(), force=force,
                        protocol=protocol, check_parity=not no_parity)
    try:
        result = build_engine(opts, log=lambda s: click.echo(s, err=True))
    except BuildError as e:
        raise click.ClickException(str(e)) from None
    for line in summary_lines(result):
        click.echo(line)
