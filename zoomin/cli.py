"""`zoomin`: the runtime command line (detect) and utilities (random reference checkpoints)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zoomin")
def main() -> None:
    """zoomin: two-stage ZoomIn forensic detection (global scan, then zoomed evidence check) on compiled engines."""


@main.group()
def checkpoint() -> None:
    """Reference checkpoints that need no network."""


@checkpoint.command("random")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--shape", type=click.Choice(["tiny", "small", "3b", "7b"]), default="tiny", show_default=True,
              help="tiny/small: test-sized; 3b/7b: real Qwen2.5-VL-3B/7B dimensions.")
@click.option("--text-layers", type=click.IntRange(min=1), default=None, help="Override the number of LM layers.")
@click.option("--vision-depth", type=click.IntRange(min=1), default=None, help="Override the number of vision blocks.")
@click.option("--seed", type=int, default=0, show_default=True)
def checkpoint_random(out_dir: Path, shape: str, text_layers: int | None, vision_depth: int | None, seed: int) -> None:
    """Write a deterministic random-weight Qwen2.5-VL checkpoint in Hugging Face layout (needs the build extra)."""
    try:
        from .build.random_checkpoint import write_random_checkpoint
    except ImportError as e:
        raise click.ClickException(f"needs the build extra (pip install 'zoomin[build]'): {e}") from None
    path = write_random_checkpoint(out_dir, shape, text_layers=text_layers, vision_depth=vision_depth, seed=seed)
    click.echo(str(path))
