"""`zoomin-perf`: per-stage profile of the two-stage job against the transformers baseline, in one run."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from ..build.engine import PRECISIONS


def _precisions(ctx, param, value: tuple[str, ...]) -> list[str] | None:
    if not value:
        return None
    out = [p.strip() for v in value for p in v.split(",") if p.strip()]
    bad = [p for p in out if p not in PRECISIONS]
    if bad:
        raise click.BadParameter(f"unknown precision(s) {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(out))


def _peers(ctx, param, value: tuple[str, ...]) -> list[str]:
    from .peers import parse_peers

    try:
        return list(dict.fromkeys(p for v in value for p in parse_peers(v)))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(["quick", "3b", "7b"]), default="quick", show_default=True,
              help="quick: 3b widths, 2 text layers, 2 vision blocks (minutes on 2 cores); 3b/7b: full shapes.")
@click.option("--model", default=None,
              help="Checkpoint directory (e.g. from `zoomin checkpoint random`) or tiny-random, instead of the "
                   "preset's random checkpoint.")
@click.option("--precision", "precision", multiple=True, callback=_precisions,
              help="Engine precisions to sweep, comma-separated or repeated, from "
                   f"{','.join(PRECISIONS)} [preset's]. One that does not build is reported as such.")
@click.option("--engine", "engines", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A prebuilt engine of --model to measure as is; repeatable. With --engine and no --precision, "
                   "nothing is built.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Image file; repeatable [default: scikit-image photos at three sizes].")
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed runs per image [preset's].")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Untimed runs first [preset's].")
@click.option("--stage1-tokens", type=click.IntRange(min=1), default=None, help="Query-1 answer length [preset's].")
@click.option("--stage2-tokens", type=click.IntRange(min=1), default=None, help="Query-2 answer length [preset's].")
@click.option("--boxes", type=click.IntRange(1, 4), default=None, help="Boxes (= crops) per image [preset's].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for both backends [all].")
@click.option("--interleave/--sequential", default=False, show_default=True,
              help="Keep every configuration loaded and take the repeats round-robin (fairer under drifting "
                   "background load; needs every configuration's peak memory at once), or one after another.")
@click.option("--max-run-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Drop (and report) a configuration whose warm-up run does not finish within this [preset's].")
@click.option("--quiet-wait-s", type=click.FloatRange(min=0), default=900, show_default=True,
              help="Total seconds timed runs may wait for other processes to leave the cores alone (0: never).")
@click.option("--peers", "peers", multiple=True, callback=_peers, metavar="LIST",
              help="Other runtimes to measure side by side with zoomin, comma-separated or repeated: openvino "
                   "(OpenVINO GenAI), ort-genai (ONNX Runtime GenAI), llama.cpp, or all. Each converts the checkpoint "
                   "with its own tool; one not installed (the peers extra) is skipped with a note.")
@click.option("--peers-only", is_flag=True,
              help="Only the side-by-side comparison with --peers (no transformers baseline, no per-stage profile).")
@click.option("--optimum-pythonpath", default=None, metavar="PATH",
              help="Put PATH in front of PYTHONPATH for optimum-intel's OpenVINO export only: optimum-intel 2.2 "
                   "exports Qwen2.5-VL only with transformers <= 5.0, so PATH may hold that release (pip install "
                   "--no-deps --target PATH transformers==5.0.0 'tokenizers<0.23' 'huggingface_hub<1.22').")
@click.option("--llama-cpp-src", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              envvar="ZOOMIN_LLAMA_CPP_SRC", show_envvar=True,
              help="llama.cpp source tree with convert_hf_to_gguf.py (e.g. the llama-cpp-python sdist's "
                   "vendor/llama.cpp).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("perf/out"), show_default=True,
              help="Cache for checkpoints, engines and photos (reused across runs when their inputs match).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where perf.json, perf.md and the plots go [OUT/report-PRESET].")
def main(preset, model, precision, engines, images, repeats, warmup, stage1_tokens, stage2_tokens, boxes, threads,
         interleave, max_run_s, quiet_wait_s, peers, peers_only, optimum_pythonpath, llama_cpp_src, out,
         report_dir) -> None:
    """Profile zoomin engines against the transformers baseline (per stage, with ratios), on this machine."""
    from dataclasses import replace

    from ..build.checkpoint import BuildError, validate_checkpoint
    from ..runtime.manifest import EngineError
    from .machine import usable_cores
    from .peers import PeerOptions
    from .report import write_all
    from .suite import PRESETS, SuiteConfig, preset_checkpoint, run_suite, write_photos
    from .workload import WorkloadError

    def log(msg: str) -> None:
        click.echo(f"[zoomin-perf] {msg}", err=True)

    if peers_only and not peers:
        raise click.UsageError("--peers-only needs --peers")
    p = PRESETS[preset]
    try:
        workload = replace(p.workload, **{k: v for k, v in (("stage1_tokens", stage1_tokens),
                                                            ("stage2_tokens", stage2_tokens), ("boxes", boxes))
                                          if v is not None})
        ckpt = validate_checkpoint(model) if model else preset_checkpoint(p, out / "checkpoints", log)
    except (BuildError, WorkloadError) as e:
        raise click.ClickException(str(e)) from None
    try:
        photos = list(images) or write_photos(p.photos, out / "images")
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    cfg = SuiteConfig(
        checkpoint=ckpt, precisions=precision or ([] if engines else list(p.precisions)), engines=list(engines),
        images=photos, workload=workload,
        repeats=repeats or p.repeats, warmup=p.warmup if warmup is None else warmup,
        threads=threads or usable_cores(), cache=out, interleave=interleave,
        max_run_s=max_run_s if max_run_s is not None else p.max_run_s, quiet_wait_s=quiet_wait_s,
        command=" ".join(["zoomin-perf", *map(shlex.quote, sys.argv[1:])]), preset=preset,
        peers=peers, peers_only=peers_only,
        peer_options=PeerOptions(optimum_pythonpath=optimum_pythonpath, llama_cpp_src=llama_cpp_src))
    try:
        results = run_suite(cfg, log)
    except (WorkloadError, EngineError) as e:
        raise click.ClickException(str(e)) from None
    paths = write_all(results, report_dir or out / f"report-{preset if not model else Path(str(ckpt)).name}")
    for kind, path in paths.items():
        log(f"{kind}: {os.path.relpath(path)}")
    if peers_only:
        if not results["peers"]["configs"]:
            raise click.ClickException("no configuration could be measured: " + "; ".join(
                f"{k}: {v}" for k, v in {**results["failed"], **results["peers"]["failed"]}.items()))
    elif not results["configs"]:
        raise click.ClickException("no configuration could be measured: " + "; ".join(
            f"{k}: {v}" for k, v in results["failed"].items()))
