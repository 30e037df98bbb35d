"""What bounds the runtime's footprint: flash attention in the vision graph, chunked prefill, KV rows handed back.

Behaviour only; the measured figures (peak RSS per photo size, RSS over a long batch) are zoomin-perf-memory's and
live in perf/RESULTS.md.
"""

from __future__ import annotations

import numpy as np
import onnx
import psutil

from zoomin.runtime.decoder import KVCache
from zoomin.runtime.lm import ATTENTION_BUDGET, PREFILL_CHUNK, prefill_chunk


def test_full_attention_blocks_are_unmasked_multi_head_attention(tiny_engine):
    """The blocks that attend over whole frames use the contrib op without mask inputs: ONNX Runtime's CPU kernel
    then runs tiled flash attention instead of materialising (heads, N, N) scores."""
    from zoomin.runtime.manifest import Manifest

    from zoomin.runtime.vision import stage_files

    cfg = Manifest.load(tiny_engine).config.vision
    nodes = [n for f in stage_files(tiny_engine / "vision") for n in onnx.load(str(f), load_external_data=False).graph.node]
    mha = [n for n in nodes if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
    full = len(cfg.fullatt_block_indexes)
    assert full > 0 and len(mha) == cfg.num_heads * full + cfg.depth - full  # one per head in full-attention blocks
    for node in mha:
        assert len(node.input) == 3  # query, key, value: no bias, key_padding_mask, attention bias or past
    heads = sorted({a.i for n in mha for a in n.attribute if a.name == "num_heads"})
    assert heads == ([1, cfg.num_heads] if cfg.num_heads > 1 else [1])


def test_prefill_chunk_keeps_scores_within_budget():
    for heads in (2, 16, 28):
        for context in (1, 100, 5_000, 20_000, 130_000):
            chunk = prefill_chunk(heads, context)
            assert 16 <= chunk <= PREFILL_CHUNK
            assert chunk == 16 or 4 * heads * chunk * context <= ATTENTION_BUDGET
    assert prefill_chunk(16, 300) == PREFILL_CHUNK  # short prompts: one call up to the limit
    assert prefill_chunk(16, 300, limit=16) == 16


def test_kv_release_hands_rows_back():
    """Rows past the kept prefix go back to the OS and read as zeros; the prefix is untouched."""
    cache = KVCache.allocate(2, 40_000, 2, 128)  # 4 x 41 MB
    for buf in (*cache.keys, *cache.values):
        buf[:, :] = 1.0
    cache.length = 40_000
    proc = psutil.Process()
    before = proc.memory_info().rss
    cache.release(100)
    freed = before - proc.memory_info().rss
    assert freed > 0.8 * 4 * 40_000 * 256 * 4
    for buf in (*cache.keys, *cache.values):
        assert np.all(buf[0, :100] == 1.0)
        assert not buf[0, 1_000:].any()
