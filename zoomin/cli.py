"""`zoomin`: the runtime command line (detect, eval, serve) and utilities (random reference checkpoints)."""

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


def collect_images(inputs: tuple[Path, ...]) -> list[Path]:
    """Files as given (whatever their suffix: a non-image gets its own error), folders by image suffix, sorted."""
    from .runtime.image_io import IMAGE_SUFFIXES

    out: list[Path] = []
    for p in inputs:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def parse_region(text: str) -> tuple[tuple[float, float, float, float], str] | tuple[float, float, float, float]:
    """`x1,y1,x2,y2` or `x1,y1,x2,y2:label` in original-image pixels."""
    coords, _, label = text.partition(":")
    try:
        values = tuple(float(v) for v in coords.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise click.BadParameter(f"{text!r} is not x1,y1,x2,y2[:label]", param_hint="--region")
    return (values, label) if label else values


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--engine", "engine_dir", type=click.Path(path_type=Path), help="Engine directory from zoomin-build.")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write one JSON object per image (JSON Lines); '-' for stdout.")
@click.option("--annotate", "annotate_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write each image with its boxes and verdict drawn on it, as PNG, into this folder.")
@click.option("--region", "regions", multiple=True, metavar="x1,y1,x2,y2[:label]",
              help="Examine this region (original pixels) instead of the model's own boxes; repeatable. "
                   "Applies to every image.")
@click.option("--no-regions", is_flag=True, help="Teacher-force query 1 with no boxes (query 2 sees the full image).")
@click.option("--no-reuse", is_flag=True, help="Recompute the whole conversation for query 2 (ablation).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Per query [default: protocol's].")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt", "jetson", "tensorrt-llm"]), default="cpu",
              show_default=True,
              help="cpu/cuda/tensorrt/jetson: the ONNX graphs on ONNX Runtime (tensorrt: its TensorRT execution "
                   "provider); tensorrt-llm: the TensorRT plans and TensorRT-LLM model of zoomin-build --target "
                   "tensorrt (not yet run on a GPU).")
@click.option("--trt-cache", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="--device tensorrt/jetson: ONNX Runtime's TensorRT engine cache [default: ENGINE/.trt_cache].")
@click.option("--backend", type=click.Choice(["onnx", "hf"]), default="onnx", show_default=True,
              help="onnx: the engine; hf: transformers on the original checkpoint (reference; needs the build extra).")
@click.option("--model", "model_dir", default=None, help="Checkpoint for --backend hf (or tiny-random).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(min=0, min_open=True, max=1), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all cores].")
@click.option("--max-image-tokens", type=click.IntRange(min=0), default=None,
              help="Most vision tokens (one per 28x28 pixels) a full image may take; 0: no limit beyond the "
                   "preprocessor's max_pixels [default: protocol's, 4096].")
@click.option("--oversize", type=click.Choice(["downscale", "refuse"]), default=None,
              help="An image over --max-image-tokens is downscaled to fit, or refused with its own error "
                   "[default: protocol's, downscale].")
@click.option("--batch", "max_batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images in flight at once, their decode steps batched into one decoder call (continuous "
                   "batching; the onnx backend).")
@click.option("--isolate/--no-isolate", default=True, show_default=True,
              help="Run the engine in a worker process: an image that kills it (out of memory) gets its own error "
                   "and a fresh worker takes the next one. --backend hf always runs in-process.")
def detect(images, engine_dir, json_out, annotate_dir, regions, no_regions, no_reuse, max_new_tokens, device, trt_cache,
           backend, model_dir, temperature, top_p, seed, threads, max_image_tokens, oversize, max_batch, isolate) -> None:
    """Run ZoomIn (global scan, then zoomed evidence check) on images or folders of images."""
    import json
    import sys
    from functools import partial

    from tqdm import tqdm

    from .runtime import EngineError, Sampling, result_record
    from .runtime.image_io import load_image
    from .runtime.providers import DeviceError
    from .runtime.worker import IsolatedZoomIn, WorkerError

    if regions and no_regions:
        raise click.UsageError("--region and --no-regions exclude each other")
    if max_batch > 1 and backend != "onnx":
        raise click.UsageError("--batch needs --backend onnx")
    region_list = [parse_region(r) for r in regions] if regions else ([] if no_regions else None)
    overrides = {k: v for k, v in (("max_image_tokens", max_image_tokens), ("oversize", oversize)) if v is not None}
    if max_image_tokens == 0:
        overrides["max_image_tokens"] = None
    files = collect_images(images)
    if not files:
        raise click.ClickException("no images found in " + ", ".join(map(str, images)))
    try:
        zi = _load_detector(backend, engine_dir, model_dir, device, no_reuse, threads, overrides, isolate, trt_cache)
    except (EngineError, DeviceError, ValueError, WorkerError) as e:
        raise click.ClickException(str(e)) from None
    sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
    sink = None
    failed = 0
    try:
        sink = sys.stdout if json_out == Path("-") else (open(json_out, "w") if json_out else None)
        bar = tqdm(files, unit="img", disable=len(files) < 2, file=sys.stderr)
        run = zi.detect_many if max_batch == 1 else partial(zi.detect_batch, max_batch=max_batch)
        for name, result, error in run(bar, regions=region_list, max_new_tokens=max_new_tokens, sampling=sampling):
            record = result_record(name, result, error)
            if sink:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            if error:
                failed += 1
                tqdm.write(f"error: {error}", file=sys.stderr)
                continue
            if annotate_dir:
                from .runtime.annotate import save_annotated

                save_annotated(load_image(name), result, annotate_dir / (Path(name).stem + ".png"))
            if sink is not sys.stdout:
                score = "-" if result.score is None else f"{result.score:.3f}"
                tqdm.write(f"{name}\t{result.verdict or 'none'}\tp(generated)={score}\tboxes={len(result.boxes)}"
                           f"\t{result.timings_ms['total']:.0f} ms")
    finally:
        if sink and sink is not sys.stdout:
            sink.close()
        if isinstance(zi, IsolatedZoomIn):
            zi.close()
    if failed:
        raise click.ClickException(f"{failed} of {len(files)} images failed")


def _load_detector(backend: str, engine_dir, model_dir, device: str, no_reuse: bool, threads, overrides: dict,
                   isolate: bool, trt_cache: Path | None = None):
    """The detector `detect` feeds: in-process ZoomIn, or (onnx, isolated) a worker process running it."""
    if backend == "hf":
        if not model_dir:
            raise click.UsageError("--backend hf needs --model CKPT_DIR")
        try:
            from .hf_backend import load_hf
        except ImportError as e:
            raise click.ClickException(f"--backend hf needs the build extra (pip install 'zoomin[build]'): {e}")
        from .runtime import Protocol

        return load_hf(model_dir, protocol=Protocol.default().replace(**overrides), threads=threads)
    if not engine_dir:
        raise click.UsageError("--engine DIR is required (build one with zoomin-build)")
    from .runtime import ZoomIn
    from .runtime.worker import IsolatedZoomIn

    load = IsolatedZoomIn if isolate else ZoomIn.load
    if trt_cache is not None:
        overrides = {**overrides, "trt_cache": trt_cache}
    return load(engine_dir, device=device, reuse=not no_reuse, threads=threads, **overrides)


@main.command("eval")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--engine", "engines", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Engine directory to evaluate; repeatable.")
@click.option("--reference-engine", "reference", type=click.Path(path_type=Path), default=None,
              help="Engine (say fp32) the others' drift is measured against, on the same images.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Report folder: metrics.json, report.md, plots, predictions-<engine>.jsonl (a rerun resumes).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Per query [default: protocol's].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all cores].")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N images, alternating between the labels.")
def evaluate(data, engines, reference, out_dir, max_new_tokens, threads, limit) -> None:
    """Evaluate engines on a labelled set: DATA is a folder with real/ and generated/, or a CSV/JSONL manifest
    (path, label, optional boxes as JSON [[x1,y1,x2,y2], ...] in original pixels)."""
    import sys

    from tqdm import tqdm

    from .eval import DatasetError, EvalError, evaluate as run_eval
    from .runtime import EngineError, ProtocolError

    def progress(spec, todo):
        return tqdm(todo, desc=spec.name, unit="img", file=sys.stderr)

    def on_error(message):
        tqdm.write(f"error: {message}", file=sys.stderr)

    try:
        report = run_eval(data, engines, out_dir, reference=reference, max_new_tokens=max_new_tokens,
                          threads=threads, limit=limit, progress=progress, on_error=on_error)
    except (DatasetError, EvalError, EngineError, ProtocolError) as e:
        raise click.ClickException(str(e)) from None
    for name, e in report["engines"].items():
        acc = "-" if e["accuracy"] is None else f"{e['accuracy']:.3f}"
        click.echo(f"{name}\taccuracy={acc}\tno-verdict={e['n_no_verdict']}/{e['n_evaluated']}"
                   f"\terrors={e['n_errors']}")
    click.echo(f"report: {out_dir / 'report.md'}")
    if report["errors"]:
        failed = len({e["key"] for e in report["errors"]})
        raise click.ClickException(f"{failed} of {report['n_samples']} images failed (skipped; listed in "
                                   f"{out_dir / 'metrics.json'} under errors)")


@main.command()
@click.argument("input_spec", metavar="INPUT")
@click.option("--engine", "engine_dir", required=True, type=click.Path(path_type=Path),
              help="Engine directory from zoomin-build, at the same path on every node (shared storage).")
@click.option("--out", required=True,
              help="Directory (local or URI) of Parquet files, or a local file ending in .jsonl.")
@click.option("--ray-address", default=None,
              help="Cluster to join: auto, ray://HOST:10001, ... [default: a local one].")
@click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True,
              help="Engine actors (one engine each).")
@click.option("--threads-per-actor", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads per engine; also the CPUs each actor reserves.")
@click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs each actor reserves (use with --device cuda/tensorrt).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt", "jetson"]), default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per actor call.")
@click.option("--max-batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images in flight per actor, their decode steps batched into one decoder call.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Per query [default: protocol's].")
def batch(input_spec, engine_dir, out, ray_address, actors, threads_per_actor, gpus_per_actor, device, batch_size,
          max_batch, max_new_tokens) -> None:
    """Detect a folder, glob or .txt list of images (paths or URIs) on a Ray cluster into OUT; resumable: images
    already in OUT are skipped (needs the ray extra)."""
    try:
        from .ray import run_batch
    except ImportError as e:
        raise click.ClickException(f"needs the ray extra (pip install 'zoomin[ray]'): {e}") from None
    from .runtime import EngineError

    try:
        summary = run_batch(input_spec, engine_dir, out, address=ray_address, actors=actors,
                            threads_per_actor=threads_per_actor, gpus_per_actor=gpus_per_actor, device=device,
                            batch_size=batch_size, max_batch=max_batch, max_new_tokens=max_new_tokens,
                            log=click.echo)
    except (EngineError, OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{summary.written} written ({summary.errors} errors), {summary.skipped} skipped, "
               f"{summary.images_per_s:.2f} images/s")


@main.command()
@click.option("--engine", "engine_dir", required=True, type=click.Path(path_type=Path),
              help="Engine directory from zoomin-build.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images in flight at once, their decode steps batched into one decoder call (continuous "
                   "batching; gqa engines).")
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images waiting for the engine; more are answered 429.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=32.0, show_default=True)
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=8192 * 8192, show_default=True,
              help="Larger images are refused before decoding (413).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True, help="Seconds per request, queueing included (504 after).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt", "jetson"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all cores].")
@click.option("--max-image-tokens", type=click.IntRange(min=0), default=None,
              help="Override the protocol's image-token limit (0 = none).")
def serve(engine_dir, host, port, max_batch, max_queue, max_body_mb, max_image_pixels, timeout_s, device, threads,
          max_image_tokens) -> None:
    """Serve ZoomIn over HTTP: POST /v1/detect, GET /health /ready /metrics /v1/engine (needs the serve extra)."""
    try:
        import uvicorn

        from .serve import ServeConfig, create_app
    except ImportError as e:
        raise click.ClickException(f"needs the serve extra (pip install 'zoomin[serve]'): {e}") from None
    from .runtime import EngineError, Manifest

    try:
        Manifest.load(engine_dir)  # a wrong path fails here, not as a server that is never ready
    except EngineError as e:
        raise click.ClickException(str(e)) from None
    overrides = () if max_image_tokens is None else (("max_image_tokens", max_image_tokens or None),)
    cfg = ServeConfig(engine=engine_dir, device=device, threads=threads, max_batch=max_batch, max_queue=max_queue,
                      max_body_bytes=int(max_body_mb * (1 << 20)), max_image_pixels=max_image_pixels,
                      request_timeout_s=timeout_s, protocol_overrides=overrides)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="info", timeout_graceful_shutdown=timeout_s)
