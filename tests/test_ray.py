"""ZoomIn on Ray: `zoomin batch` (Ray Data, 2 engine actors on a local 2-CPU cluster) writes for every image exactly
the record `ZoomIn.detect` gives directly, bad files as error rows, each path once — after a rerun, and after an
actor killed mid-batch — and the Serve deployment answers HTTP like the direct API."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra (pip install 'zoomin[ray]')")
pq = pytest.importorskip("pyarrow.parquet", reason="needs the ray extra (pip install 'zoomin[ray]')")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from zoomin.cli import main  # noqa: E402
from zoomin.ray import SCHEMA, ZoomInPredictor, list_inputs, read_records, run_batch  # noqa: E402
from zoomin.runtime import EngineError, ZoomIn, result_record  # noqa: E402
from zoomin.runtime.manifest import manifest_sha256  # noqa: E402
from zoomin.runtime.worker import KILL_ON_ENV  # noqa: E402

MAX_NEW = 4
SIZES = [(64, 64), (96, 128), (150, 200), (40, 300), (320, 180)]  # (height, width)


@pytest.fixture(scope="module")
def cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ExitOnce below travels to the actors
    # the engine worker of every actor SIGKILLs itself on poison.png, as the OOM killer would
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {KILL_ON_ENV: "poison.png"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """30 images of 5 sizes (png and jpg, some in a subfolder) and 2 corrupt files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(30):
        h, w = SIZES[i % len(SIZES)]
        folder = root / "sub" if i % 3 == 0 else root
        folder.mkdir(exist_ok=True)
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
        cv2.imwrite(str(folder / f"img_{i:02d}.{'png' if i % 2 else 'jpg'}"), img)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (root / "empty.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def direct(tiny_engine, images):
    """What ZoomIn.detect gives for each image in-process, as a JSON record (timings dropped)."""
    zi = ZoomIn.load(tiny_engine, threads=1)
    out = {}
    for path in list_inputs(str(images)):
        result, error = zi.try_detect(path, max_new_tokens=MAX_NEW)
        out[path] = comparable(result_record(path, result, error))
    return out


def comparable(record: dict) -> dict:
    """A record as JSON, without what depends on the process's history rather than the image: timings, and the
    system-prefix KV reuse (none on an engine's first image, so it differs between actors and this process)."""
    r = {k: v for k, v in json.loads(json.dumps(record)).items() if k != "timings_ms"}
    if r.get("tokens"):
        r["tokens"] = {k: v for k, v in r["tokens"].items() if k not in ("system_prefix_reused", "stage1_prefill")}
    return r


def raw_paths(out: Path) -> list[str]:
    return [p for f in sorted(out.glob("part-*.parquet")) for p in pq.read_table(f, columns=["path"])["path"]
            .to_pylist()]


def batch_args(images, engine, out, *extra):
    return ["batch", str(images), "--engine", str(engine), "--out", str(out), "--actors", "2",
            "--threads-per-actor", "1", "--batch-size", "4", "--max-new-tokens", str(MAX_NEW), *extra]


def test_inputs(images, tmp_path):
    """Folder (recursive, by suffix), glob, .txt list (with a comment and a file:// URI) and URI folder."""
    every = list_inputs(str(images))
    assert len(every) == 32 and all(os.path.isabs(p) for p in every)
    assert {Path(p).name for p in every} >= {"img_00.jpg", "img_29.png", "broken.png", "empty.jpg"}
    assert list_inputs(str(images / "**" / "*.png")) == [p for p in every if p.endswith(".png")]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{every[0]}\n\nfile://{every[1]}\n")
    assert list_inputs(str(listing)) == sorted([every[0], f"file://{every[1]}"])
    assert list_inputs(f"file://{images}") == [f"file://{p}" for p in every]


def test_batch_matches_direct(cluster, tiny_engine, images, direct, tmp_path):
    """Every row equals the direct result (verdict, boxes, texts, scores, sizes, tokens); the corrupt files are
    error rows with the direct error; each path appears once; a rerun writes nothing."""
    out = tmp_path / "out"
    start = time.perf_counter()
    res = CliRunner().invoke(main, batch_args(images, tiny_engine, out))
    elapsed = time.perf_counter() - start
    assert res.exit_code == 0, res.output
    assert "32 written (2 errors), 0 skipped" in res.output
    print(f"\nzoomin batch, 32 images, 2 actors x 1 thread: {elapsed:.1f} s wall; {res.output.splitlines()[-1]}")
    paths = raw_paths(out)
    assert sorted(paths) == sorted(direct) and len(set(paths)) == len(paths)
    for f in out.glob("part-*.parquet"):
        assert pq.read_schema(f).remove_metadata().equals(SCHEMA)
    records = {r["path"]: r for r in read_records(str(out))}
    assert {p: comparable(r) for p, r in records.items()} == direct
    errors = {Path(p).name for p, r in records.items() if r["error"] is not None}
    assert errors == {"broken.png", "empty.jpg"}
    assert all(r["verdict"] in ("real", "generated", None) and isinstance(r["boxes"], list)
               for r in records.values() if r["error"] is None)

    files = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    res = CliRunner().invoke(main, batch_args(images, tiny_engine, out))
    assert res.exit_code == 0, res.output
    assert "0 written (0 errors), 32 skipped" in res.output
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == files


class ExitOnce(ZoomInPredictor):
    """Kills its actor process (as a lost node would) on reaching `victim`, the first time only."""

    victim = ""
    marker = ""

    def __call__(self, batch):
        if any(str(p).endswith(self.victim) for p in batch["path"]) and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().__call__(batch)


def test_killed_actor_yields_every_image_once(cluster, tiny_engine, images, direct, tmp_path):
    """An actor dying mid-batch (a lost node) is restarted and its batch retried: every image still appears exactly
    once, with the direct result. An image that kills the engine every time it is tried (poison.png) is an error
    row, not a batch retried forever. (It is listed last: alone in its batch of 4, no other image is in flight with
    it when it kills its worker.)"""
    ExitOnce.victim, ExitOnce.marker = "img_13.png", str(tmp_path / "exited")
    poison = tmp_path / "poison.png"
    shutil.copy(images / "img_01.png", poison)
    listing = tmp_path / "all.txt"
    listing.write_text("\n".join([*direct, str(poison)]) + "\n")
    out = tmp_path / "out"
    summary = run_batch(str(listing), tiny_engine, str(out), actors=2, batch_size=4, max_new_tokens=MAX_NEW,
                        rows_per_file=8, predictor=ExitOnce, log=lambda s: None)
    assert os.path.exists(ExitOnce.marker)  # the actor did die
    assert summary.written == 33 and summary.errors == 3
    paths = raw_paths(out)
    assert len(paths) == 33 and sorted(set(paths)) == sorted([*direct, str(poison)])
    assert len(list(out.glob("part-*.parquet"))) >= 3 and not list(out.glob("_tmp-*"))  # >= 8 rows a file
    records = {r["path"]: r for r in read_records(str(out))}
    assert records.pop(str(poison)) == {
        "path": str(poison),
        "error": f"{poison}: the worker died while processing this image, batched with up to 3 others (killed by "
                 f"signal 9 (SIGKILL), likely out of memory)"}
    assert {p: comparable(r) for p, r in records.items()} == direct


def test_jsonl_resume(cluster, tiny_engine, images, direct, tmp_path):
    """JSONL output from a .txt list with a file:// URI: `zoomin detect --json` lines; a resumed run does only the
    missing paths, after cutting off a line torn by a crash."""
    every = list_inputs(str(images))
    uri = f"file://{every[2]}"
    first = tmp_path / "first.txt"
    first.write_text("\n".join([*every[:5], uri]) + "\n")
    out = tmp_path / "res.jsonl"
    s1 = run_batch(str(first), tiny_engine, str(out), actors=2, batch_size=4, max_new_tokens=MAX_NEW,
                   log=lambda s: None)
    assert (s1.written, s1.skipped) == (6, 0)
    with open(out, "a") as f:
        f.write('{"path": "torn')  # the driver died mid-line
    full = tmp_path / "full.txt"
    full.write_text("\n".join([*every[:10], uri]) + "\n")
    s2 = run_batch(str(full), tiny_engine, str(out), actors=2, batch_size=4, max_new_tokens=MAX_NEW,
                   log=lambda s: None)
    assert (s2.inputs, s2.written, s2.skipped) == (11, 5, 6)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 11 and len({r["path"] for r in lines}) == 11
    got = {r["path"]: comparable(r) for r in lines}
    assert got[uri] == {**direct[every[2]], "path": uri}  # read through pyarrow's filesystem: same answer
    assert {p: got[p] for p in every[:10]} == {p: direct[p] for p in every[:10]}


def test_engine_checked_on_each_actor(tiny_engine, tmp_path):
    """The actor refuses a manifest other than the driver's, and files that differ from the manifest's sha256s."""
    sha = manifest_sha256(tiny_engine)
    with pytest.raises(EngineError, match="differs from the expected"):
        ZoomInPredictor(tiny_engine, "0" * 64)
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    victim = next(p for p in sorted(copy.glob("*.onnx")))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 check can tell
    victim.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=f"{victim.name} does not match its sha256"):
        ZoomInPredictor(copy, sha)


def test_batch_without_ray(monkeypatch, images, tiny_engine, tmp_path):
    monkeypatch.setitem(sys.modules, "zoomin.ray", None)
    res = CliRunner().invoke(main, batch_args(images, tiny_engine, tmp_path / "out"))
    assert res.exit_code == 1
    assert "pip install 'zoomin[ray]'" in res.output and len(res.output.strip().splitlines()) == 1


def test_serve_deployment(cluster, tiny_engine, images, direct):
    """One Serve replica (batching up to 2 requests) on the local cluster answers POST /v1/detect with the direct
    result."""
    import httpx
    from ray import serve

    from zoomin.ray.serve import app as build_from_args

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = {"engine": str(tiny_engine), "num_replicas": "1", "threads": "1", "max_batch": "2"}
        serve.run(build_from_args(args), name="zoomin", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "replica never became ready"
            time.sleep(0.2)
        path = next(p for p, r in direct.items() if r["error"] is None)
        r = httpx.post(url + "/v1/detect", params={"max_new_tokens": MAX_NEW}, content=Path(path).read_bytes(),
                       headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        assert comparable(r.json()) == {**direct[path], "path": "<body>"}
        bad = httpx.post(url + "/v1/detect", content=b"garbage", headers={"content-type": "image/png"})
        assert bad.status_code == 422
    finally:
        serve.shutdown()
