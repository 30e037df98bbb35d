"""Continuous batching (zoomin.runtime.batch): a batched decode step computes for every sequence what it computes
alone, bit for bit; detect_batch gives every image detect's own answer (mixed sizes and answer lengths), keeps
input order and per-image errors; a worker death under `zoomin detect --batch` fails only the images in flight."""

from __future__ import annotations

import json
import threading

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from zoomin.cli import main
from zoomin.runtime import ZoomIn
from zoomin.runtime.batch import StepScheduler
from zoomin.runtime.decoder import DecoderError
from zoomin.runtime.engine import Engine
from zoomin.runtime.worker import KILL_ON_ENV

MAX_NEW = 12


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return Engine.load(tiny_engine)


@pytest.fixture(scope="module")
def zi(tiny_engine):
    return ZoomIn.load(tiny_engine)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    """Photos of different sizes (prompts of different lengths), a synthetic image and one corrupt file."""
    d = tmp_path_factory.mktemp("batch-images")
    rng = np.random.default_rng(5)
    images = {"a_coffee.png": photos["coffee"], "b_tall.png": photos["tall"],
              "c_camera.png": photos["camera"][..., None].repeat(3, 2),
              "d_noise.png": (rng.random((61, 233, 3)) * 255).astype(np.uint8),
              "f_small.png": cv2.resize(photos["coffee"], (96, 64))}
    for name, rgb in images.items():
        cv2.imwrite(str(d / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (d / "e_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return d


def random_rows(engine, n: int, rng) -> np.ndarray:
    return rng.standard_normal((n, engine.config.text.hidden_size)).astype(np.float32)


def test_batched_steps_equal_single_steps_bit_for_bit(engine):
    """Three sequences of different lengths step together (one riding along without a step) and each gets
    exactly the logits, and the cache rows, of running alone."""
    d, rng = engine.decoder, np.random.default_rng(0)
    lengths = [5, 17, 9]
    multi = d.new_cache(64, slots=3)
    slots = [multi.slot(b) for b in range(3)]
    alone = [d.new_cache(64) for _ in lengths]
    for n, slot, own in zip(lengths, slots, alone):
        x, pos = random_rows(engine, n, rng), np.tile(np.arange(n), (3, 1))
        d.forward(x, pos, own, 1)
        d.forward(x, pos, slot, 1)
    for step in range(4):
        active = [True, step != 2, True]
        x = random_rows(engine, 3, rng)
        pos = np.array([[c.length] * 3 for c in alone]).T
        got = d.forward_batch(x, pos, slots, active=active).copy()
        for b in range(3):
            if active[b]:
                want = d.forward(x[b:b + 1], pos[:, b:b + 1], alone[b], 1)[-1]
                np.testing.assert_array_equal(got[b], want)
        assert [c.length for c in slots] == [c.length for c in alone]
    n = slots[1].length
    for layer in range(len(multi.keys)):
        np.testing.assert_array_equal(multi.keys[layer][1, :, :n], alone[1].keys[layer][0, :, :n])
        np.testing.assert_array_equal(multi.values[layer][2, :, :n], alone[2].values[layer][0, :, :slots[1].length])
        assert multi.keys[layer][1:2].base is not None  # a view of the shared buffer, not a copy


def test_batched_step_checks_its_caches(engine):
    d = engine.decoder
    multi = d.new_cache(16, slots=3)
    x, pos = np.zeros((2, engine.config.text.hidden_size), np.float32), np.zeros((3, 2), np.int64)
    with pytest.raises(DecoderError, match="consecutive slots"):
        d.forward_batch(x, pos, [multi.slot(0), multi.slot(2)])
    with pytest.raises(DecoderError, match="consecutive slots"):
        d.forward_batch(x, pos, [d.new_cache(16), d.new_cache(16)])
    with pytest.raises(DecoderError, match=r"embeds \(3,"):
        d.forward_batch(x, pos, [multi.slot(b) for b in range(3)])
    with pytest.raises(DecoderError, match="multi-slot"):
        type(multi).allocate(1, 8, 2, 4, layout="BSNH", slots=2)


def test_releasing_one_slot_leaves_the_others(engine):
    d = engine.decoder
    multi = d.new_cache(4096, slots=2)
    for b in range(2):
        for k in (*multi.keys, *multi.values):
            k[b] = b + 1.0
    slot = multi.slot(0)
    slot.release(100)
    row_bytes = multi.keys[0].shape[3] * multi.keys[0].itemsize
    first_free = -(-100 * row_bytes // 4096) * 4096 // row_bytes  # whole pages only
    for k in (*multi.keys, *multi.values):
        assert (k[0, :, :100] == 1).all() and (k[0, :, first_free:] == 0).all()
        assert (k[1] == 2).all()


def test_detect_batch_answers_are_detect_answers_in_order(zi, folder):
    files = sorted(folder.iterdir())
    alone = list(zi.detect_many(files, max_new_tokens=MAX_NEW))
    batched = list(zi.detect_batch(files, max_batch=3, max_new_tokens=MAX_NEW))
    assert [n for n, _, _ in batched] == [n for n, _, _ in alone] == [str(f) for f in files]
    prompt_lengths = set()
    for (name, want, werr), (_, got, gerr) in zip(alone, batched):
        if name.endswith("broken.jpg"):
            assert got is None and want is None and gerr == werr and "broken.jpg" in gerr
            continue
        assert gerr is None and got is not None
        for field in ("verdict", "score", "boxes", "stage1_text", "final_text", "stage1_score", "model_size"):
            assert getattr(got, field) == getattr(want, field), (name, field)
        prompt_lengths.add(got.tokens["stage1_prompt"])
        assert got.tokens["stage1_prompt"] == want.tokens["stage1_prompt"]
    assert len(prompt_lengths) >= 4  # the images really were of different sizes
    sizes = zi._lanes[0].lm.lane.scheduler.batch_sizes
    assert max(sizes) >= 2, sizes  # steps did merge


def test_detect_batch_mixed_answer_lengths_and_caller_regions(zi, folder):
    """Teacher-forced query 1 (no decode) for all, query 2 generated: lanes join and leave at different steps."""
    files = [f for f in sorted(folder.iterdir()) if f.suffix == ".png"]
    kw = dict(regions=[((10, 10, 60, 50), "face")], max_new_tokens=MAX_NEW + 5)
    alone = [zi.detect(f, **kw) for f in files]
    batched = [r for _, r, _ in zi.detect_batch(files, max_batch=4, **kw)]
    assert [r.final_text for r in batched] == [r.final_text for r in alone]
    assert [r.boxes for r in batched] == [r.boxes for r in alone]


def test_a_conversation_longer_than_its_slot_fails_alone(zi, folder):
    files = [folder / "f_small.png", folder / "a_coffee.png", folder / "f_small.png"]
    alone = zi.detect(files[0], max_new_tokens=MAX_NEW)
    need = alone.tokens["stage2_prompt"] + alone.tokens["stage2_generated"]
    out = list(zi.detect_batch(files, max_batch=2, max_len=need + 2, max_new_tokens=MAX_NEW))
    assert out[1][1] is None and "a_coffee.png" in out[1][2] and "batch cache" in out[1][2]
    for name, result, error in (out[0], out[2]):
        assert error is None and result.final_text == alone.final_text


def test_stopping_early_ends_the_lanes(zi, folder):
    files = sorted(folder.glob("*.png"))
    before = threading.active_count()
    for _ in zi.detect_batch(files, max_batch=2, max_new_tokens=4):
        break
    assert threading.active_count() <= before  # the lane threads ended; the scheduler thread stays with the lanes
    assert len(list(zi.detect_batch(files, max_batch=2, max_new_tokens=4))) == len(files)


def test_scheduler_rejects_no_slots(engine):
    with pytest.raises(ValueError, match="slots"):
        StepScheduler(engine.decoder, 0, 16)


def test_cli_batch_matches_one_at_a_time_and_a_worker_death_fails_only_the_images_in_flight(tiny_engine, folder,
                                                                                             tmp_path, monkeypatch):
    runner = CliRunner()
    args = ["detect", str(folder), "--engine", str(tiny_engine), "--max-new-tokens", "6"]
    one = runner.invoke(main, [*args, "--json", str(tmp_path / "one.jsonl")])
    many = runner.invoke(main, [*args, "--batch", "3", "--json", str(tmp_path / "many.jsonl")])
    assert one.exit_code == many.exit_code == 1 and "1 of 6 images failed" in many.output
    rows = {p: [json.loads(line) for line in (tmp_path / f"{p}.jsonl").read_text().splitlines()]
            for p in ("one", "many")}
    assert [r["path"] for r in rows["one"]] == [r["path"] for r in rows["many"]]
    assert [r.get("final_text") for r in rows["one"]] == [r.get("final_text") for r in rows["many"]]

    monkeypatch.setenv(KILL_ON_ENV, "c_camera.png")
    killed = runner.invoke(main, [*args, "--batch", "2", "--json", str(tmp_path / "killed.jsonl")])
    got = [json.loads(line) for line in (tmp_path / "killed.jsonl").read_text().splitlines()]
    assert [r["path"] for r in got] == [r["path"] for r in rows["one"]]  # nothing lost, nothing twice
    died = [r["path"].rsplit("/", 1)[-1] for r in got if r["error"] and "worker died" in r["error"]]
    assert "c_camera.png" in died and 1 <= len(died) <= 2  # the image and at most the one batched with it
    for want, r in zip(rows["one"], got):
        if not r["error"]:
            assert r["final_text"] == want["final_text"]
    assert killed.exit_code == 1


def test_merge_policy_by_precision_and_graph():
    from zoomin.runtime.batch import merge_policy

    assert [merge_policy(p, "gqa") for p in ("fp32", "fp16", "int4", "int8")] == ["merge", "merge", "merge2", "single"]
    assert merge_policy("fp8", "plain") == "single"
