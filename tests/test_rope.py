"""M-RoPE positions: numpy runtime vs transformers' Qwen2_5_VLModel.get_rope_index and HF generation.

All comparisons are exact (integer positions): any difference would rotate queries/keys by the wrong angle.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zoomin.runtime.config import ModelConfig
from zoomin.runtime.rope import decode_positions, image_token_count, mrope_positions

MERGE = 2


@pytest.fixture(scope="module")
def cfg(tiny_ckpt) -> ModelConfig:
    return ModelConfig.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def tiny_hf(tiny_ckpt, hf_model_factory):
    return hf_model_factory(tiny_ckpt)


def hf_rope(model, ids: np.ndarray, grids: list) -> tuple[np.ndarray, int]:
    image_id = model.config.image_token_id
    input_ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None]
    pos, delta = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == image_id).int(),
        image_grid_thw=torch.tensor(grids, dtype=torch.long) if grids else None,
    )
    return pos[:, 0].numpy(), int(delta.reshape(-1)[0])


def build_ids(segments, cfg: ModelConfig, seed: int = 0) -> tuple[np.ndarray, list, list[int]]:
    """ids from segments: an int n = n random text tokens, a (t, h, w) tuple = one image with its markers.

    Also returns the valid split points (indices that are not inside an image's token run).
    """
    rng = np.random.default_rng(seed)
    tok = cfg.tokens
    ids: list[int] = []
    grids: list = []
    for seg in segments:
        if isinstance(seg, int):
            ids += rng.integers(0, tok.endoftext, seg).tolist()
        else:
            grids.append(list(seg))
            ids += [tok.vision_start] + [tok.image_pad] * image_token_count(seg, MERGE) + [tok.vision_end]
    arr = np.asarray(ids, dtype=np.int64)
    inside = np.r_[False, (arr[1:] == tok.image_pad) & (arr[:-1] == tok.image_pad)]
    splits = [i for i in range(len(arr) + 1) if i == len(arr) or not inside[i]]
    return arr, grids, splits


CASES = {
    "text_only": [17],
    "one_image_square": [5, (1, 8, 8), 9],
    "one_image_wide": [5, (1, 4, 12), 9],
    "one_image_tall": [3, (1, 14, 2), 4],
    "smallest_image": [2, (1, 2, 2), 1],
    "image_first": [(1, 6, 4), 7],
    "image_last": [7, (1, 6, 4)],
    "several_images": [4, (1, 6, 10), 3, (1, 2, 8), 5, (1, 12, 6), 2],
    "multi_turn": [20, (1, 8, 6), 12, 30, 9, (1, 4, 4), 2, (1, 6, 2), (1, 2, 10), 11],
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_hf_get_rope_index(name, cfg, tiny_hf):
    ids, grids, _ = build_ids(CASES[name], cfg)
    pos, delta = mrope_positions(ids, grids, image_token_id=cfg.tokens.image_pad, spatial_merge_size=MERGE)
    ref_pos, ref_delta = hf_rope(tiny_hf, ids, grids)
    assert pos.dtype == np.int64 and pos.shape == (3, len(ids))
    np.testing.assert_array_equal(pos, ref_pos)
    assert delta == ref_delta
    assert delta == pos.max() + 1 - len(ids)


def test_matches_hf_on_small_checkpoint(small_ckpt, hf_model_factory):
    """Second checkpoint (other merge-independent dims): the rule does not depend on model size."""
    cfg = ModelConfig.from_checkpoint(small_ckpt)
    model = hf_model_factory(small_ckpt)
    ids, grids, _ = build_ids(CASES["multi_turn"], cfg, seed=3)
    pos, delta = mrope_positions(ids, grids, image_token_id=cfg.tokens.image_pad,
                                 spatial_merge_size=cfg.vision.spatial_merge_size)
    ref_pos, ref_delta = hf_rope(model, ids, grids)
    np.testing.assert_array_equal(pos, ref_pos)
    assert delta == ref_delta


segment = st.one_of(
    st.integers(1, 12),
    st.tuples(st.just(1), st.integers(1, 8).map(lambda v: 2 * v), st.integers(1, 8).map(lambda v: 2 * v)),
)


@settings(max_examples=60, deadline=None)
@given(segments=st.lists(segment, min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_random_sequences_and_every_split(segments, seed, cfg, tiny_hf):
    """Random text/image layouts equal HF; and continuing from any split point equals the whole sequence."""
    ids, grids, splits = build_ids(segments, cfg, seed)
    image_id = cfg.tokens.image_pad
    whole, delta = mrope_positions(ids, grids, image_token_id=image_id, spatial_merge_size=MERGE)
    ref_pos, ref_delta = hf_rope(tiny_hf, ids, grids)
    np.testing.assert_array_equal(whole, ref_pos)
    assert delta == ref_delta
    for split in splits:
        n_prefix_images = int(np.sum(np.diff(np.r_[0, ids[:split] == image_id].astype(int)) == 1))
        head, head_delta = mrope_positions(ids[:split], grids[:n_prefix_images], image_token_id=image_id,
                                           spatial_merge_size=MERGE)
        tail, tail_delta = mrope_positions(ids[split:], grids[n_prefix_images:], image_token_id=image_id,
                                           spatial_merge_size=MERGE, past_len=split, past_rope_delta=head_delta)
        np.testing.assert_array_equal(np.concatenate([head, tail], axis=1), whole)
        assert tail_delta == delta


def test_continuation_with_images_in_stage2_layout(cfg):
    """Stage 2: prompt+image, generated answer, then a turn with two crops; the appended turn alone equals HF."""
    stage1 = [25, (1, 8, 8), 10, 40]  # prompt with the image, then the generated answer
    ids, grids, _ = build_ids(stage1 + [6, (1, 4, 6), 3, (1, 10, 2), 5], cfg)
    image_id = cfg.tokens.image_pad
    split = 25 + (1 + 16 + 1) + 10 + 40
    whole, delta = mrope_positions(ids, grids, image_token_id=image_id, spatial_merge_size=MERGE)
    _, head_delta = mrope_positions(ids[:split], grids[:1], image_token_id=image_id, spatial_merge_size=MERGE)
    tail, tail_delta = mrope_positions(ids[split:], grids[1:], image_token_id=image_id, spatial_merge_size=MERGE,
                                       past_len=split, past_rope_delta=head_delta)
    np.testing.assert_array_equal(tail, whole[:, split:])
    assert tail_delta == delta and head_delta != delta  # the crops shift the delta again


def test_decode_positions_rule():
    np.testing.assert_array_equal(decode_positions(10, -3), [[7], [7], [7]])
    np.testing.assert_array_equal(decode_positions(4, 2, count=3), np.tile([6, 7, 8], (3, 1)))
    assert decode_positions(0, 0).dtype == np.int64


def test_decode_positions_equal_the_text_that_follows(cfg):
    """Appending plain text via mrope_positions gives exactly the decode-step rule."""
    ids, grids, _ = build_ids([5, (1, 6, 10), 3], cfg)
    _, delta = mrope_positions(ids, grids, image_token_id=cfg.tokens.image_pad, spatial_merge_size=MERGE)
    text = np.arange(7, dtype=np.int64)
    tail, _ = mrope_positions(text, image_token_id=cfg.tokens.image_pad, spatial_merge_size=MERGE,
                              past_len=len(ids), past_rope_delta=delta)
    np.testing.assert_array_equal(tail, decode_positions(len(ids), delta, count=7))


def _generate_positions(model, ids: np.ndarray, grids: list, steps: int) -> list[np.ndarray]:
    """Positions HF feeds the rotary embedding at prefill and each decode step of generate()."""
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda _mod, args: seen.append(args[1][:, 0].detach().clone().numpy())
    )
    vis = model.config.vision_config
    patch_dim = vis.in_channels * vis.temporal_patch_size * vis.patch_size**2
    n_patches = sum(t * h * w for t, h, w in grids)
    input_ids = torch.from_numpy(ids)[None]
    try:
        with torch.no_grad():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=torch.randn(n_patches, patch_dim, generator=torch.Generator().manual_seed(0)),
                image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=(input_ids == model.config.image_token_id).int(),
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
            )
    finally:
        hook.remove()
    return seen


def test_positions_hf_uses_during_generation(cfg, tiny_hf):
    """Prefill = mrope_positions; decode step k (cache index N + k) = decode_positions(N + k, rope_delta)."""
    ids, grids, _ = build_ids([12, (1, 6, 10), 8, (1, 4, 2), 5], cfg, seed=7)
    seen = _generate_positions(tiny_hf, ids, grids, steps=4)
    pos, delta = mrope_positions(ids, grids, image_token_id=cfg.tokens.image_pad, spatial_merge_size=MERGE)
    assert len(seen) == 4
    np.testing.assert_array_equal(seen[0], pos)
    for k, step in enumerate(seen[1:]):
        np.testing.assert_array_equal(step, decode_positions(len(ids) + k, delta))


def test_stage2_continuation_matches_hf_generation(cfg, tiny_hf):
    """HF generating the whole stage-2 conversation from scratch uses, for the appended turn and the decode
    steps after it, exactly the positions the runtime gets from the cached prefix's rope_delta alone."""
    image_id = cfg.tokens.image_pad
    ids, grids, _ = build_ids([20, (1, 8, 6), 9, 15, 4, (1, 2, 4), 2, (1, 6, 6), 6], cfg, seed=11)
    split = 20 + (1 + 12 + 1) + 9 + 15
    _, prefix_delta = mrope_positions(ids[:split], grids[:1], image_token_id=image_id, spatial_merge_size=MERGE)
    tail, delta = mrope_positions(ids[split:], grids[1:], image_token_id=image_id, spatial_merge_size=MERGE,
                                  past_len=split, past_rope_delta=prefix_delta)
    seen = _generate_positions(tiny_hf, ids, grids, steps=3)
    assert len(seen) == 3 and delta != prefix_delta
    np.testing.assert_array_equal(seen[0][:, split:], tail)
    for k, step in enumerate(seen[1:]):
        np.testing.assert_array_equal(step, decode_positions(len(ids) + k, delta))


def test_bad_input_is_a_clear_error(cfg):
    ids, grids, _ = build_ids([3, (1, 4, 4), 2], cfg)
    kw = dict(image_token_id=cfg.tokens.image_pad, spatial_merge_size=MERGE)
    with pytest.raises(ValueError, match="more image token runs"):
        mrope_positions(ids, [], **kw)
    with pytest.raises(ValueError, match="2 image grids given but input_ids hold 1"):
        mrope_positions(ids, grids * 2, **kw)
    with pytest.raises(ValueError, match="has 4 image tokens in input_ids but its grid_thw"):
        mrope_positions(ids, [[1, 4, 6]], **kw)
    with pytest.raises(ValueError, match="not a still-image grid"):
        mrope_positions(ids, [[2, 4, 2]], **kw)
    with pytest.raises(ValueError, match="not a still-image grid"):
        mrope_positions(ids, [[1, 3, 4]], **kw)
    with pytest.raises(ValueError, match="three positive integers"):
        mrope_positions(ids, [[1, 4]], **kw)
    with pytest.raises(ValueError, match="1-D integer"):
        mrope_positions(ids[None], grids, **kw)
    empty, delta = mrope_positions(ids[:0], **kw, past_len=9, past_rope_delta=-4)
    assert empty.shape == (3, 0) and delta == -4
