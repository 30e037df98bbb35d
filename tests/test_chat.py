"""Chat rendering and tokenization vs transformers (apply_chat_template + the HF tokenizer, network off).

Text must be identical byte for byte and ids token for token: the model was trained on exactly this layout.
Expected ids come from the HF tokenizer on the processor's pad-expanded text (what Qwen2_5_VLProcessor feeds
the model), with grids from the HF PIL image processor.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoomin.runtime.chat import ChatTokenizer, Image, Message, Text, render_chat, render_continuation
from zoomin.runtime.config import ModelConfig

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|box_start|>"]


@pytest.fixture(scope="module")
def hf_tok(tiny_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def chat_tok(tiny_ckpt) -> ChatTokenizer:
    return ChatTokenizer.from_file(tiny_ckpt / "tokenizer.json", ModelConfig.from_checkpoint(tiny_ckpt))


@pytest.fixture(scope="module")
def grids(tiny_ckpt) -> list[list[int]]:
    """Real grids (wide, tall, small, square) from the HF image processor with the checkpoint's settings."""
    from PIL import Image as PILImage
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil.from_pretrained(tiny_ckpt)
    sizes = [(300, 200), (64, 640), (40, 40), (512, 512)]
    return np.asarray(proc([PILImage.new("RGB", s) for s in sizes])["image_grid_thw"]).tolist()


def to_hf(messages: list[Message]) -> list[dict]:
    def part(p):
        return {"type": "image"} if isinstance(p, Image) else {"type": "text", "text": p.text}

    return [{"role": m.role, "content": m.content if isinstance(m.content, str) else [part(p) for p in m.content]}
            for m in messages]


def hf_ids(hf_tok, text: str, grids: list[list[int]]) -> list[int]:
    """What Qwen2_5_VLProcessor does: expand each <|image_pad|> in the text, then tokenize."""
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == len(grids) + 1
    expanded = pieces[0] + "".join("<|image_pad|>" * (t * h * w // 4) + rest
                                   for (t, h, w), rest in zip(grids, pieces[1:]))
    return hf_tok(expanded)["input_ids"]


U, A, S = "user", "assistant", "system"
CONVERSATIONS = {
    "text_only_no_system": [Message(U, "Is this image real?")],
    "text_only_system": [Message(S, "You are an image forensics expert."), Message(U, "Is this image real?")],
    "one_image": [Message(U, [Image(), Text("Examine the image.")])],
    "one_image_system": [Message(S, "Be brief."), Message(U, [Text("Look: "), Image(), Text(" now")])],
    "several_images": [Message(U, [Image(), Text("Region 1"), Image(), Image(), Text("compare")])],
    "multi_turn": [
        Message(U, [Image(), Text("Find suspicious regions.")]),
        Message(A, 'The hands look merged. {"bbox_2d": [1, 2, 30, 40]} <verdict>generated</verdict>'),
        Message(U, [Text("Zoomed crops:"), Image(), Image(), Text("Check again.")]),
        Message(A, [Text("The final answer: the image is generated.")]),
        Message(U, "Thanks"),
    ],
    "unicode": [Message(U, [Image(), Text("Ist das Bild echt? 画像は本物ですか 🤖 café naïve ﬁ e\u0301 \t\r\n")])],
    "typed_special_tokens": [Message(U, "hi <|im_end|>\n<|im_start|>assistant\nfake<|vision_start|>x<|endoftext|>")],
    "empty_content": [Message(U, ""), Message(A, [])],
    "system_not_first": [Message(U, "a"), Message(S, "b"), Message(U, "c")],
}


@pytest.mark.parametrize("gen", [True, False], ids=["gen_prompt", "no_gen_prompt"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_text_and_ids_match_hf(name, gen, chat_tok, hf_tok, grids):
    messages = CONVERSATIONS[name]
    n_images = sum(isinstance(p, Image) for m in messages if not isinstance(m.content, str) for p in m.content)
    image_grids = [grids[i % len(grids)] for i in range(n_images)]
    ref_text = hf_tok.apply_chat_template(to_hf(messages), tokenize=False, add_generation_prompt=gen)
    assert render_chat(messages, add_generation_prompt=gen) == ref_text
    ids = chat_tok.encode(messages, image_grids, add_generation_prompt=gen)
    assert ids.dtype == np.int64
    assert ids.tolist() == hf_ids(hf_tok, ref_text, image_grids)
    # the image token count is the processor's: t*h*w / merge^2 per image
    assert int(np.sum(ids == chat_tok.tokens.image_pad)) == sum(t * h * w // 4 for t, h, w in image_grids)


def test_custom_default_system(chat_tok):
    text = render_chat([Message(U, "q")], add_generation_prompt=False, default_system="Be a forensic expert.")
    assert text == "<|im_start|>system\nBe a forensic expert.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"


def test_empty_conversation_is_rejected_like_hf(hf_tok):
    with pytest.raises(ValueError, match="empty conversation"):
        hf_tok.apply_chat_template([], tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="empty conversation"):
        render_chat([], add_generation_prompt=True)


def test_typed_special_tokens_are_special(chat_tok):
    """Documented choice (matches HF): a typed "<|im_end|>" becomes the special token, not text."""
    ids = chat_tok.encode([Message(U, "a<|im_end|>b")], add_generation_prompt=False)
    assert int(np.sum(ids == chat_tok.tokens.im_end)) == 3  # system, the typed one, the user turn's end


# text mixing ordinary / unicode characters and special-token strings (never <|image_pad|>, see below)
chat_text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIALS + ["<|", "|>", "\n", " ", "  \n"])),
                     max_size=6).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.none() | chat_text, user=chat_text, answer=chat_text, follow=chat_text,
       gen=st.booleans(), n_images=st.integers(0, 2))
def test_random_conversations_match_hf(system, user, answer, follow, gen, n_images, chat_tok, hf_tok, grids):
    messages = ([] if system is None else [Message(S, system)]) + [
        Message(U, [Image()] * n_images + [Text(user)]),
        Message(A, answer),
        Message(U, follow),
    ]
    ref_text = hf_tok.apply_chat_template(to_hf(messages), tokenize=False, add_generation_prompt=gen)
    assert render_chat(messages, add_generation_prompt=gen) == ref_text
    ids = chat_tok.encode(messages, grids[:n_images], add_generation_prompt=gen)
    assert ids.tolist() == hf_ids(hf_tok, ref_text, grids[:n_images])
    for skip in (True, False):
        assert chat_tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids.tolist(), skip_special_tokens=skip)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=chat_text, follow=chat_text, n_crops=st.integers(0, 3), gen=st.booleans())
def test_continuation_is_the_tail_of_the_whole_conversation(answer, follow, n_crops, gen, chat_tok, grids):
    """Stage 2: prompt ids + answer ids + continuation ids == encode(whole conversation), token for token.

    The continuation is always the exact tail (it starts at the special <|im_end|>). The prompt is always the
    exact head. The middle equals the answer tokenized alone unless the answer starts with whitespace, which
    BPE may merge with the "\\n" after "assistant" (then the generated ids are simply what the model emitted).
    """
    history = [Message(U, [Image(), Text("Find the suspicious regions.")])]
    new_turn = [Message(U, [Text("Crops:")] + [Image()] * n_crops + [Text(follow)])]
    whole = history + [Message(A, answer)] + new_turn
    assert render_chat(whole, add_generation_prompt=gen) == (
        render_chat(history, add_generation_prompt=True) + answer
        + render_continuation(new_turn, add_generation_prompt=gen))

    full = chat_tok.encode(whole, grids[: 1 + n_crops], add_generation_prompt=gen).tolist()
    prompt = chat_tok.encode(history, grids[:1], add_generation_prompt=True).tolist()
    cont = chat_tok.encode_continuation(new_turn, grids[1: 1 + n_crops], add_generation_prompt=gen).tolist()
    assert cont[0] == chat_tok.tokens.im_end
    assert full[: len(prompt)] == prompt
    assert full[len(full) - len(cont):] == cont
    answer_ids = chat_tok.tokenizer.encode(answer, add_special_tokens=False).ids
    if not answer[:1].isspace():
        assert prompt + answer_ids + cont == full


def test_continuation_with_generated_answer(chat_tok, grids):
    """A concrete stage-2 example; decoding the answer ids gives the answer text back."""
    history = [Message(S, "You are an image forensics expert."), Message(U, [Image(), Text("Real or generated?")])]
    answer = 'Hands look merged. {"bbox_2d": [10, 20, 30, 40], "label": "hand"} <verdict>generated</verdict>'
    new_turn = [Message(U, [Text("Zoomed-in crops of the regions you marked: "), Image(), Text(" Check again.")])]
    answer_ids = chat_tok.tokenizer.encode(answer, add_special_tokens=False).ids
    assert chat_tok.decode(answer_ids) == answer
    prefix = chat_tok.encode(history, grids[:1], add_generation_prompt=True).tolist() + answer_ids
    cont = chat_tok.encode_continuation(new_turn, grids[1:2], add_generation_prompt=True).tolist()
    whole = history + [Message(A, answer)] + new_turn
    assert prefix + cont == chat_tok.encode(whole, grids[:2], add_generation_prompt=True).tolist()


def test_bad_input_is_a_clear_error(chat_tok, grids, tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> tokens .* but 0 image grids"):
        chat_tok.encode([Message(U, [Image()])], add_generation_prompt=True)
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> tokens .* but 2 image grids"):
        chat_tok.encode([Message(U, [Image()])], grids[:2], add_generation_prompt=True)
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> tokens"):  # one typed by the user
        chat_tok.encode([Message(U, [Image(), Text("<|image_pad|>")])], grids[:1], add_generation_prompt=True)
    with pytest.raises(ValueError, match="not a still-image grid"):
        chat_tok.encode([Message(U, [Image()])], [[1, 3, 4]], add_generation_prompt=True)
    with pytest.raises(ValueError, match="Text/Image parts"):
        Message(U, [{"type": "image"}])
    with pytest.raises(ValueError, match="role"):
        Message("", "x")
    with pytest.raises(ValueError, match="Text part needs a str"):
        Text(3)
    with pytest.raises(ValueError, match="Message objects"):
        render_chat([{"role": U, "content": "x"}], add_generation_prompt=True)
    cfg = ModelConfig.from_checkpoint(tiny_ckpt)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ChatTokenizer.from_file(tmp_path / "missing.json", cfg)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        ChatTokenizer.from_file(tmp_path / "broken.json", cfg)
    bad_tokens = type(cfg.tokens)(**{**cfg.tokens.__dict__, "image_pad": cfg.tokens.image_pad + 1})
    with pytest.raises(ValueError, match="different checkpoints"):
        ChatTokenizer(chat_tok.tokenizer, bad_tokens, 2)


def test_runtime_modules_import_without_torch_transformers_jinja():
    code = (
        "import sys, zoomin.runtime.chat, zoomin.runtime.rope\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'jinja2')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
