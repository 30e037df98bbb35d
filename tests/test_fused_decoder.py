"""The gqa decoder graph (com.microsoft GroupQueryAttention over one shared cache buffer per layer), as zoomin-build
writes it, against transformers through every way the runtime drives a cache.

The graphs are the session's fp32 engines (conftest tiny_engine / small_engine), so this module exports nothing.
Errors are max|a-b| / max|b| over all logits of a call; the reference is transformers run from scratch on the
same sequence (causal attention: a cached run must give exactly those rows). Measured on tiny/small: <= 1e-6 for
every call (prefill, a later chunk after a cached prefix, decode, after truncation); bound 1e-4 as in
test_decoder_export.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from zoomin.build.export_decoder import TextDecoder, image_prompt_positions, relative_error
from zoomin.runtime.config import ModelConfig
from zoomin.runtime.decoder import Decoder, KVCache, empty_cache_inputs
from zoomin.runtime.engine import Engine
from zoomin.runtime.lm import prefill_chunk
from zoomin.runtime.manifest import EngineError

FP32_BOUND = 1e-4


def engine_decoder(engine_dir, ckpt) -> tuple[Decoder, ModelConfig]:
    cfg = ModelConfig.from_checkpoint(ckpt)
    return Decoder.load(engine_dir / "decoder.onnx", cfg.text, graph="gqa"), cfg


@pytest.mark.parametrize("shape", ["tiny", "small"])
def test_chunks_decode_and_truncation_match_transformers(request, hf_model_factory, shape):
    """An image prompt prefilled as a prefix plus a later 8-token chunk, 3 decode steps, then truncate() back into
    the prompt and continue with a different 4-token chunk and 2 decode steps: every call's logits equal
    transformers' full-sequence logits. The cache starts as NaN, so any read of a row beyond the valid length
    (stale or never written) would show."""
    ckpt = request.getfixturevalue(f"{shape}_ckpt")
    engine = request.getfixturevalue(f"{shape}_engine")
    model = hf_model_factory(ckpt)
    dec, cfg = engine_decoder(engine, ckpt)
    prompt_pos, delta = image_prompt_positions(model, (1, 6, 4), 4, 10)
    s = prompt_pos.shape[1]
    total = s + 3
    positions = torch.cat([prompt_pos, (torch.arange(s, total + 4) + delta).expand(3, -1)], dim=1)
    table = model.get_input_embeddings().weight.detach()
    rows = torch.randint(table.shape[0], (total + 4,), generator=torch.Generator().manual_seed(5))
    embeds = table[rows].numpy()
    other = table[torch.randint(table.shape[0], (6,), generator=torch.Generator().manual_seed(6))].numpy()

    def reference(seq, pos):
        with torch.no_grad():
            return model(inputs_embeds=torch.from_numpy(seq)[None], position_ids=pos[:, None]).logits[0].numpy()

    cache = dec.new_cache(64)
    for buf in cache.keys + cache.values:
        buf[:] = np.nan
    ref = reference(embeds[:total], positions[:, :total])
    prefix = s - 8
    errors = {}

    def call(name, x, pos, lo, hi, want):
        got = dec.forward(x, pos.numpy(), cache, logits_to_keep=len(x))
        errors[name] = relative_error(got, want[lo:hi])

    call("prefix", embeds[:prefix], positions[:, :prefix], 0, prefix, ref)
    call("chunk after prefix", embeds[prefix:s], positions[:, prefix:s], prefix, s, ref)
    for i in range(s, total):
        call(f"decode {i}", embeds[i:i + 1], positions[:, i:i + 1], i, i + 1, ref)
    keep = prefix + 2
    cache.truncate(keep)
    seq_b = np.concatenate([embeds[:keep], other])
    pos_b = torch.cat([positions[:, :keep], (torch.arange(keep, keep + 6) + delta).expand(3, -1)], dim=1)
    ref_b = reference(seq_b, pos_b)
    call("chunk after truncate", other[:4], pos_b[:, keep:keep + 4], keep, keep + 4, ref_b)
    for i in range(keep + 4, keep + 6):
        call(f"decode {i} after truncate", seq_b[i:i + 1], pos_b[:, i:i + 1], i, i + 1, ref_b)
    assert cache.length == keep + 6
    assert max(errors.values()) <= FP32_BOUND, errors
    assert all(np.isnan(buf[:, :, total:]).all() for buf in cache.keys)  # the op wrote only valid rows


def test_torch_group_query_attention_equals_onnx_runtime(tiny_ckpt, tiny_engine, hf_model_factory):
    """The custom op's torch body (what TextDecoder runs eagerly) computes what ONNX Runtime's GroupQueryAttention
    computes: a 5-token chunk after a 6-row random past, logits and presents, unbound session.run."""
    model = hf_model_factory(tiny_ckpt)
    dec, cfg = engine_decoder(tiny_engine, tiny_ckpt)
    t = cfg.text
    rng = np.random.default_rng(2)
    p, s = 6, 5
    embeds = (rng.standard_normal((1, s, t.hidden_size)) * 0.05).astype(np.float32)
    positions = np.tile(np.arange(p, p + s, dtype=np.int64), (3, 1, 1))
    pasts = [(rng.standard_normal((1, t.num_key_value_heads, p, t.head_dim)) * 0.5).astype(np.float32)
             for _ in range(2 * t.num_hidden_layers)]
    feeds = {"inputs_embeds": embeds, "position_ids": positions, "logits_to_keep": np.array([s]),
             **empty_cache_inputs("gqa", t.num_hidden_layers, t.num_key_value_heads, t.head_dim, 1, p + s)}
    feeds.update({f"past_{k}.{i}": pasts[j * t.num_hidden_layers + i] for j, k in enumerate(("key", "value"))
                  for i in range(t.num_hidden_layers)})
    names = [o.name for o in dec.session.get_outputs()]
    got = dict(zip(names, dec.session.run(None, feeds)))
    torch_dec = TextDecoder(model, graph="gqa").eval()
    with torch.no_grad():
        logits, keys, values = torch_dec(torch.from_numpy(embeds), torch.from_numpy(positions),
                                         (torch.from_numpy(feeds["seqlens_k"]),
                                          torch.from_numpy(feeds["total_sequence_length"])), torch.tensor([s]),
                                         [torch.from_numpy(a) for a in pasts[:t.num_hidden_layers]],
                                         [torch.from_numpy(a) for a in pasts[t.num_hidden_layers:]])
    assert relative_error(got["logits"], logits.numpy()) <= FP32_BOUND
    for i in range(t.num_hidden_layers):
        assert got[f"present_key.{i}"].shape == keys[i].shape == (1, t.num_key_value_heads, p + s, t.head_dim)
        np.testing.assert_array_equal(keys[i][:, :, :p].numpy(), pasts[i])
        np.testing.assert_allclose(got[f"present_key.{i}"], keys[i].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[f"present_value.{i}"], values[i].numpy(), rtol=0, atol=1e-5)


def test_manifest_records_the_flavour_and_the_runtime_checks_it(tiny_engine, tmp_path):
    """zoomin-build records decoder_graph "gqa" for fp32; Engine.load binds a head-major cache for it and refuses an
    unknown flavour, or one the graph is not, with one line."""
    engine = Engine.load(tiny_engine)
    assert engine.config.decoder_graph == "gqa" and engine.decoder.graph == "gqa"
    assert engine.decoder.new_cache(8).layout == "BNSH"
    for declared, message in (("paged", "unknown decoder graph 'paged'"),
                              ("plain", "declares a plain decoder graph but the graph is gqa")):
        copy = tmp_path / declared
        shutil.copytree(tiny_engine, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["config"]["decoder_graph"] = declared
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(EngineError, match=message) as err:
            Engine.load(copy)
        assert "\n" not in str(err.value)


def test_head_major_cache_releases_each_heads_tail():
    """release(n) on a BNSH cache hands back whole pages past position n in every head's block and keeps [0, n)."""
    cache = KVCache.allocate(1, 4096, 2, 64, layout="BNSH")
    for buf in cache.keys + cache.values:
        buf[:] = 1.0
    cache.release(100)
    row_pages = 4096 // (64 * 4)  # 16 positions per page
    first_free = -(-100 // row_pages) * row_pages
    for buf in cache.keys + cache.values:
        assert (buf[:, :, :100] == 1).all()
        assert (buf[:, :, first_free:] == 0).all()
    other = KVCache.allocate(1, 4096, 2, 64)  # BSNH: a layout the BNSH cache cannot load from
    with pytest.raises(ValueError, match="layout"):
        cache.load_prefix(other, 0)


def test_gqa_prefill_chunks_are_not_bounded_by_score_memory():
    """The plain graph's chunks keep (heads, chunk, context) scores within budget; the gqa kernel holds none."""
    assert prefill_chunk(16, 8192, graph="plain") < prefill_chunk(16, 8192, graph="gqa") == 1024
