"""Random reference checkpoints: deterministic bytes, real HF layout, real Qwen2.5-VL dimensions."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from zoomin.build.random_checkpoint import SHAPES, make_config, write_random_checkpoint
from zoomin.build.tokenizer_gen import SPECIAL_TOKENS


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes(tiny_ckpt, tmp_path):
    again = write_random_checkpoint(tmp_path / "tiny", "tiny", seed=0)
    assert _digest(again) == _digest(tiny_ckpt)
    other = write_random_checkpoint(tmp_path / "tiny1", "tiny", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(tiny_ckpt)["model.safetensors"]


def test_loads_offline_with_transformers_and_generates(tiny_ckpt, hf_model_factory):
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = hf_model_factory(tiny_ckpt)
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    for t in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id and len(tok.encode(t)) == 1
    proc = Qwen2VLImageProcessorPil.from_pretrained(tiny_ckpt)
    img = (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)
    px = proc(images=[img], return_tensors="pt")
    n = int(px["image_grid_thw"].prod()) // 4
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Real?"}]}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                         mm_token_type_ids=(ids == model.config.image_token_id).long(), max_new_tokens=5,
                         do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or int(out[0, -1]) in (tok.convert_tokens_to_ids("<|im_end|>"),)


@pytest.mark.parametrize("shape,hidden,heads,kv,vocab,out_hidden", [
    ("3b", 2048, 16, 2, 151936, 2048), ("7b", 3584, 28, 4, 152064, 3584)])
def test_real_dimensions(shape, hidden, heads, kv, vocab, out_hidden):
    from transformers import Qwen2_5_VLConfig

    ids = {t: 151643 + i for i, t in enumerate(SPECIAL_TOKENS)} | {"vocab_size": 151665}
    cfg = Qwen2_5_VLConfig(**make_config(SHAPES[shape], ids))
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.vocab_size) == (hidden, heads, kv, vocab)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (v.hidden_size, v.depth, v.window_size, v.out_hidden_size) == (1280, 32, 112, out_hidden)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31]
    with torch.device("meta"):  # instantiates every module with the real shapes, without allocating them
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n > (3e9 if shape == "3b" else 7e9)
