"""`zoomin-perf`: per-stage profile of the two-stage job against the transformers baseline."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Profile zoomin engines against the transformers baseline (per stage, with ratios)."""
    raise click.ClickException("the perf suite is not implemented yet")
