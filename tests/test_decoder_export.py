"""The exported text decoder + the runtime's KV-cache runner against transformers' Qwen2.5-VL.

Both graph flavours: "gqa" (GroupQueryAttention over a shared cache buffer, what fp32/fp16/int8/int4 builds get)
on tiny and small in fp32 and fp16, "plain" (standard ops, fp8/TensorRT builds) on tiny in fp32. Each is exported
once for this module. Errors are max|a-b| / max|b| over the logits. Measured on tiny/small (2-core CPU): fp32
<= 1e-6, fp16 <= 1e-3 (both prefill and decode, either flavour); the bounds below keep 100x / 10x headroom.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

from zoomin.build.export_decoder import check_decoder, export_decoder, image_prompt_positions, relative_error
from zoomin.runtime.config import ModelConfig
from zoomin.runtime.decoder import Decoder, DecoderError, KVCache, empty_cache_inputs

FP32_BOUND = 1e-4
FP16_BOUND = 1e-2
SHAPES = ["tiny", "small"]


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory, hf_model_factory):
    """(shape, precision, graph) -> path of the exported graph; each exported at most once in this module."""
    made = {}

    def get(shape: str, precision: str = "fp32", graph: str = "gqa"):
        if (shape, precision, graph) not in made:
            ckpt = request.getfixturevalue(f"{shape}_ckpt")
            out = tmp_path_factory.mktemp(f"decoder-{shape}-{precision}-{graph}") / "decoder.onnx"
            made[shape, precision, graph] = export_decoder(hf_model_factory(ckpt), out, precision=precision,
                                                           graph=graph)
        return made[shape, precision, graph]

    return get


def load(request, hf_model_factory, exported, shape: str, precision: str = "fp32", graph: str = "gqa"):
    ckpt = request.getfixturevalue(f"{shape}_ckpt")
    cfg = ModelConfig.from_checkpoint(ckpt)
    return hf_model_factory(ckpt), cfg, Decoder.load(exported(shape, precision, graph), cfg.text)


# (shape, precision, graph) of every export the module makes
GQA_CASES = [(shape, precision, "gqa") for shape in SHAPES for precision in ("fp32", "fp16")]
PLAIN_CASE = ("tiny", "fp32", "plain")


@pytest.mark.parametrize("shape,precision,graph", [*GQA_CASES, PLAIN_CASE])
def test_graph_contract(request, hf_model_factory, exported, shape, precision, graph):
    """Opset-17-valid graph, contract names/dtypes/dynamic dims, weights external in <name>.onnx.data; only the gqa
    graph holds com.microsoft ops (one GroupQueryAttention per layer)."""
    path = exported(shape, precision, graph)
    cfg = ModelConfig.from_checkpoint(request.getfixturevalue(f"{shape}_ckpt")).text
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    data = path.with_name(path.name + ".data")
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert data.is_file() and len(external) >= 7 * cfg.num_hidden_layers  # q, k, v, o, gate, up, down
    assert max(onnx.numpy_helper.to_array(t).nbytes for t in inline) <= 256  # only small constants stay inline
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {data.name}

    kv_type = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT

    def sig(values):
        return {v.name: (v.type.tensor_type.elem_type,
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values}

    kvh, d = cfg.num_key_value_heads, cfg.head_dim
    f32, i64, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT32
    if graph == "gqa":
        past, present = ["batch", kvh, "past", d], ["batch", kvh, "present", d]
        cache = {"seqlens_k": (i32, ["batch"]), "total_sequence_length": (i32, [])}
    else:
        past, present = ["batch", "past", kvh, d], ["batch", "seq", kvh, d]
        cache = {"attention_mask": (i64, ["batch", "past_plus_seq"])}
    kv_in = {f"past_{k}.{i}": (kv_type, past) for k in ("key", "value") for i in range(cfg.num_hidden_layers)}
    kv_out = {f"present_{k}.{i}": (kv_type, present) for k in ("key", "value") for i in range(cfg.num_hidden_layers)}
    assert sig(model.graph.input) == {
        "inputs_embeds": (f32, ["batch", "seq", cfg.hidden_size]),
        "position_ids": (i64, [3, "batch", "seq"]),
        **cache,
        "logits_to_keep": (i64, [1]),
        **kv_in,
    }
    assert sig(model.graph.output) == {"logits": (f32, ["batch", "keep", cfg.vocab_size]), **kv_out}
    contrib = [n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert contrib == (["GroupQueryAttention"] * cfg.num_hidden_layers if graph == "gqa" else [])


@pytest.mark.parametrize("shape,graph", [("tiny", "gqa"), ("small", "gqa"), ("tiny", "plain")])
def test_fp32_matches_transformers(hf_model_factory, request, exported, shape, graph):
    """Prefill over real M-RoPE image positions (all logits) and 4 KV-cache decode steps, vs transformers."""
    model = hf_model_factory(request.getfixturevalue(f"{shape}_ckpt"))
    errors = check_decoder(model, exported(shape, "fp32", graph))
    assert errors["prefill"] <= FP32_BOUND and errors["decode"] <= FP32_BOUND, errors
    assert len(errors["decode_steps"]) == 4


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_within_bound_and_runs_on_cpu(hf_model_factory, request, exported, shape):
    """The fp16 graph runs on ORT's CPU EP; logits stay within FP16_BOUND of the fp32 transformers model."""
    model = hf_model_factory(request.getfixturevalue(f"{shape}_ckpt"))
    errors = check_decoder(model, exported(shape, "fp16"))
    assert errors["prefill"] <= FP16_BOUND and errors["decode"] <= FP16_BOUND, errors
    assert errors["prefill"] > 0  # really computed in half precision


def test_attention_mask_and_batch_match_transformers(request, hf_model_factory, exported):
    """Plain graph: a 2-row batch with masked-out keys equals transformers given the same 2-D mask, row by row."""
    model, cfg, dec = load(request, hf_model_factory, exported, "tiny", graph="plain")
    positions, _ = image_prompt_positions(model, (1, 4, 4), 3, 3)
    s = positions.shape[1]
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, s, cfg.text.hidden_size, generator=g) * 0.05
    mask = torch.ones(2, s, dtype=torch.long)
    mask[0, 1:4] = 0
    mask[1, 5] = 0
    pos = positions[:, None].expand(3, 2, s).contiguous()
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).logits
    t = cfg.text
    feeds = {"inputs_embeds": embeds.numpy(), "position_ids": pos.numpy(), "logits_to_keep": np.array([2]),
             **empty_cache_inputs("plain", t.num_hidden_layers, t.num_key_value_heads, t.head_dim, 2, s),
             "attention_mask": mask.numpy()}
    got = dec.session.run(["logits"], feeds)[0]
    assert got.shape == (2, 2, cfg.text.vocab_size)
    assert relative_error(got, ref[:, -2:].numpy()) <= FP32_BOUND
    unmasked = model(inputs_embeds=embeds, position_ids=pos).logits[:, -2:].detach().numpy()
    assert relative_error(got, unmasked) > 1e-2  # the mask really changed the result


def test_gqa_batch_matches_transformers(request, hf_model_factory, exported):
    """gqa graph: a 2-row batch of different prompts on an empty cache equals transformers, row by row."""
    model, cfg, dec = load(request, hf_model_factory, exported, "tiny")
    t = cfg.text
    positions, _ = image_prompt_positions(model, (1, 4, 4), 3, 3)
    s = positions.shape[1]
    embeds = torch.randn(2, s, t.hidden_size, generator=torch.Generator().manual_seed(4)) * 0.05
    pos = positions[:, None].expand(3, 2, s).contiguous()
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, position_ids=pos).logits[:, -2:].numpy()
    feeds = {"inputs_embeds": embeds.numpy(), "position_ids": pos.numpy(), "logits_to_keep": np.array([2]),
             **empty_cache_inputs("gqa", t.num_hidden_layers, t.num_key_value_heads, t.head_dim, 2, s)}
    got = dec.session.run(["logits"], feeds)[0]
    assert relative_error(got, ref) <= FP32_BOUND
    assert relative_error(got[0], ref[1]) > 1e-2  # the rows really differ


def hf_image_prompt(model, ckpt, grid_thw=(1, 8, 8), seed=0):
    """Token ids of a chat-formatted image + question prompt, HF-merged inputs_embeds and pixel inputs."""
    from tokenizers import Tokenizer

    merge = model.config.vision_config.spatial_merge_size
    n_image = int(np.prod(grid_thw)) // merge**2
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * n_image + "<|vision_end|>Is this image real or generated?<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = torch.tensor([Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text).ids])
    patch_dim = model.config.vision_config.in_channels * model.config.vision_config.temporal_patch_size * 14**2
    pixels = torch.randn(int(np.prod(grid_thw)), patch_dim, generator=torch.Generator().manual_seed(seed))
    grid = torch.tensor([grid_thw])
    image_mask = ids == model.config.image_token_id
    assert int(image_mask.sum()) == n_image
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = torch.cat(model.model.get_image_features(pixels, grid).pooler_output)
        embeds = embeds.masked_scatter(image_mask[..., None].expand_as(embeds), features)
    return ids, embeds[0], pixels, grid


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_generation_matches_hf_generate(request, hf_model_factory, exported, shape):
    """32 greedy tokens through Decoder + KVCache are token-identical to transformers' generate(), and every
    step's logits agree with generate's own within FP32_BOUND (random checkpoints may repeat one token, so the
    logits are what makes each step count)."""
    ckpt = request.getfixturevalue(f"{shape}_ckpt")
    model, cfg, dec = load(request, hf_model_factory, exported, shape)
    ids, embeds, pixels, grid = hf_image_prompt(model, ckpt)
    mm_types = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             image_grid_thw=grid, mm_token_type_ids=mm_types, do_sample=False, max_new_tokens=32,
                             return_dict_in_generate=True, output_logits=True)
    ref_tokens = ref.sequences[0, ids.shape[1]:].tolist()
    positions, delta = model.model.get_rope_index(ids, mm_token_type_ids=mm_types, image_grid_thw=grid)
    table = model.get_input_embeddings().weight.detach().numpy()

    cache = dec.new_cache(ids.shape[1] + 32)
    logits = [dec.forward(embeds.numpy(), positions[:, 0].numpy(), cache)[-1].copy()]
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < 32 and tokens[-1] != cfg.tokens.im_end:
        pos = np.full((3, 1), cache.length + int(delta), np.int64)
        logits.append(dec.forward(table[tokens[-1:]], pos, cache)[-1].copy())
        tokens.append(int(logits[-1].argmax()))
    assert tokens == ref_tokens and len(tokens) == 32
    assert cache.length == ids.shape[1] + 31
    step_errors = [relative_error(got, want[0].numpy()) for got, want in zip(logits, ref.logits, strict=True)]
    assert max(step_errors) <= FP32_BOUND, step_errors


@pytest.fixture(scope="module", params=["gqa", "plain"])
def tiny_run(request, hf_model_factory, exported):
    """Tiny fp32 decoder (each flavour) plus a fixed random prompt (S=12) and 6 follow-up embeddings with
    positions."""
    _, cfg, dec = load(request, hf_model_factory, exported, "tiny", graph=request.param)
    rng = np.random.default_rng(7)
    embeds = (rng.standard_normal((18, cfg.text.hidden_size)) * 0.05).astype(np.float32)
    positions = np.tile(np.arange(18, dtype=np.int64) + 3, (3, 1))
    positions[1:, 2:6] -= 1  # rows differ, as around an image
    return dec, embeds, positions


def steps(dec, cache, embeds, positions, start, stop):
    return [dec.forward(embeds[i : i + 1], positions[:, i : i + 1], cache).copy() for i in range(start, stop)]


def test_truncate_then_rerun_reproduces_logits(tiny_run):
    dec, embeds, positions = tiny_run
    cache = dec.new_cache(32)
    dec.forward(embeds[:12], positions[:, :12], cache)
    first = steps(dec, cache, embeds, positions, 12, 18)
    cache.truncate(12)
    assert cache.length == 12
    again = steps(dec, cache, embeds, positions, 12, 18)
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    # Diverge after truncation: the overwritten rows must match a fresh cache fed the same sequence.
    cache.truncate(13)
    other = embeds[::-1].copy()
    diverged = steps(dec, cache, other, positions, 13, 16)
    fresh = dec.new_cache(32)
    dec.forward(np.concatenate([embeds[:13], other[13:15]]), positions[:, :15], fresh)
    np.testing.assert_allclose(dec.forward(other[15:16], positions[:, 15:16], fresh), diverged[-1], rtol=0,
                               atol=1e-5 * np.abs(diverged[-1]).max())


def test_prefix_snapshot_reuse_matches_full_run(tiny_run):
    """A cached prompt prefix (snapshot or loaded into another cache) continues exactly like a full prefill."""
    dec, embeds, positions = tiny_run
    prefix = dec.new_cache(32)
    dec.forward(embeds[:8], positions[:, :8], prefix)
    snapshot = prefix.copy_prefix()
    dec.forward(embeds[8:18][::-1].copy(), positions[:, 8:18], prefix)  # clobbers rows 8.. of `prefix` only
    work = dec.new_cache(32)
    for source in (snapshot, prefix):
        work.load_prefix(source, 8)
        got = dec.forward(embeds[8:18], positions[:, 8:18], work, logits_to_keep=10).copy()
        full = dec.new_cache(32)
        ref = dec.forward(embeds[:18], positions[:, :18], full, logits_to_keep=10)
        assert relative_error(got, ref) <= 1e-5
        assert snapshot.length == 8 and work.length == 18


@pytest.mark.parametrize("precision,graph", [("fp32", "gqa"), ("fp16", "gqa"), ("fp32", "plain")])
def test_present_rows_are_written_in_place(request, hf_model_factory, exported, precision, graph):
    """IO binding is zero-copy: ORT writes positions [P, P+S) of the cache buffers themselves (gqa: the presents
    are the whole shared buffers; plain: they alias rows [P, P+S)), equal to an unbound run, positions < P kept and
    positions >= P+S untouched."""
    _, cfg, dec = load(request, hf_model_factory, exported, "tiny", precision, graph)
    t = cfg.text
    rng = np.random.default_rng(1)
    embeds = (rng.standard_normal((7, t.hidden_size)) * 0.05).astype(np.float32)
    positions = np.tile(np.arange(7, dtype=np.int64), (3, 1))
    cache = dec.new_cache(16)
    for buf in cache.keys + cache.values:
        buf[:] = np.nan  # any row ORT did not write stays NaN
    rows = (lambda n, m: (slice(None), slice(None), slice(n, m))) if graph == "gqa" else \
        (lambda n, m: (slice(None), slice(n, m)))
    dec.forward(embeds[:4], positions[:, :4], cache)
    before = [buf[rows(0, 4)].copy() for buf in cache.keys + cache.values]
    logits = dec.forward(embeds[4:], positions[:, 4:], cache, logits_to_keep=3)
    assert cache.length == 7
    bound = dec._binding.get_outputs()  # bind order: key.0, value.0, key.1, ..., logits
    row = t.num_key_value_heads * t.head_dim * np.dtype(dec.cache_dtype).itemsize
    buffers = [b for pair in zip(cache.keys, cache.values) for b in pair]
    offset = 0 if graph == "gqa" else 4 * row
    assert [o.data_ptr() for o in bound[:-1]] == [b.ctypes.data + offset for b in buffers]

    feeds = {"inputs_embeds": embeds[None, 4:], "position_ids": positions[:, None, 4:], "logits_to_keep": np.array([3]),
             **empty_cache_inputs(graph, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, 1, 7)}
    for i in range(t.num_hidden_layers):
        feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = before[i], before[t.num_hidden_layers + i]
    names = [o.name for o in dec.session.get_outputs()]
    plain = dict(zip(names, dec.session.run(None, feeds)))
    np.testing.assert_array_equal(plain["logits"][0], logits)
    fresh = rows(4, 7) if graph == "gqa" else rows(0, 3)  # unbound, gqa returns the past + new rows, plain the new
    for i in range(t.num_hidden_layers):
        np.testing.assert_array_equal(cache.keys[i][rows(4, 7)], plain[f"present_key.{i}"][fresh])
        np.testing.assert_array_equal(cache.values[i][rows(4, 7)], plain[f"present_value.{i}"][fresh])
        np.testing.assert_array_equal(cache.keys[i][rows(0, 4)], before[i])
        assert np.isnan(cache.keys[i][rows(7, None)]).all() and np.isnan(cache.values[i][rows(7, None)]).all()


def test_bad_inputs_raise_clear_errors(request, hf_model_factory, exported, tmp_path):
    _, cfg, dec = load(request, hf_model_factory, exported, "tiny")
    h = cfg.text.hidden_size
    cache = dec.new_cache(4)
    pos = np.zeros((3, 3), np.int64)
    with pytest.raises(DecoderError, match="embeds must be"):
        dec.forward(np.zeros((3, h + 1), np.float32), pos, cache)
    with pytest.raises(DecoderError, match="positions must be"):
        dec.forward(np.zeros((3, h), np.float32), pos[:2], cache)
    with pytest.raises(DecoderError, match="logits_to_keep"):
        dec.forward(np.zeros((3, h), np.float32), pos, cache, logits_to_keep=4)
    dec.forward(np.zeros((3, h), np.float32), pos, cache)
    with pytest.raises(DecoderError, match="KV cache full"):
        dec.forward(np.zeros((2, h), np.float32), pos[:, :2], cache)
    assert cache.length == 3
    with pytest.raises(DecoderError, match="truncate"):
        cache.truncate(4)
    wrong = KVCache.allocate(cfg.text.num_hidden_layers, 8, cfg.text.num_key_value_heads, cfg.text.head_dim,
                             np.float16)
    with pytest.raises(DecoderError, match="does not fit"):
        dec.forward(np.zeros((1, h), np.float32), pos[:, :1], wrong)
    plain_layout = KVCache.allocate(cfg.text.num_hidden_layers, 8, cfg.text.num_key_value_heads, cfg.text.head_dim)
    with pytest.raises(DecoderError, match="layout BSNH does not fit this gqa decoder"):
        dec.forward(np.zeros((1, h), np.float32), pos[:, :1], plain_layout)
    with pytest.raises(DecoderError, match="unknown decoder graph 'paged'"):
        Decoder(dec.session, cfg.text, "paged")
    with pytest.raises(DecoderError, match="declares a plain decoder graph but the graph is gqa"):
        Decoder(dec.session, cfg.text, "plain")
    with pytest.raises(DecoderError, match="not found"):
        Decoder.load(tmp_path / "missing.onnx", cfg.text)
    small = ModelConfig.from_checkpoint(request.getfixturevalue("small_ckpt")).text
    with pytest.raises(DecoderError, match="does not match"):
        Decoder(dec.session, small)
    with pytest.raises(ValueError, match="precision"):
        export_decoder(None, tmp_path / "x.onnx", precision="int3")
    with pytest.raises(ValueError, match="unknown decoder graph"):
        export_decoder(None, tmp_path / "x.onnx", graph="paged")
