"""A checkpoint's own chat template: followed when it differs only in its default system turn, refused otherwise.

transformers' apply_chat_template on the checkpoint's template is the reference for every prompt the runtime
renders (ids compared token for token).
"""

from __future__ import annotations

import json
import shutil

import pytest

from zoomin.build.chat_check import (ChatTemplateError, derive_chat_format, load_template_tokenizer, verify_chat,
                                     write_chat_format)
from zoomin.runtime import Protocol, ZoomIn
from zoomin.runtime.chat import DEFAULT_SYSTEM, ChatFormat, ChatTokenizer, messages_from_dicts
from zoomin.runtime.config import ModelConfig
from zoomin.runtime.preprocess import preprocess_image

STOCK_SYSTEM_TURN = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
                     "You are a helpful assistant.<|im_end|>\n{% endif %}")


def with_template(src, dst, edit):
    """A copy of checkpoint `src` whose chat template (both places transformers reads it from) is edit(template)."""
    shutil.copytree(src, dst)
    template = edit((dst / "chat_template.jinja").read_text())
    (dst / "chat_template.jinja").write_text(template)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def variants(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    assert STOCK_SYSTEM_TURN in (tiny_ckpt / "chat_template.jinja").read_text()
    return {
        "stock": tiny_ckpt,
        "other_system": with_template(tiny_ckpt, root / "other", lambda t: t.replace(
            "You are a helpful assistant.", "You are a forensic image analyst.")),
        "no_system": with_template(tiny_ckpt, root / "none", lambda t: t.replace(STOCK_SYSTEM_TURN, "")),
    }


EXPECTED = {"stock": DEFAULT_SYSTEM, "other_system": "You are a forensic image analyst.", "no_system": None}


def hf_ids(tok, messages, grids) -> list[int]:
    """The processor's layout: apply_chat_template's text with each <|image_pad|> expanded, then tokenized."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pieces = text.split("<|image_pad|>")
    text = pieces[0] + "".join("<|image_pad|>" * (t * h * w // 4) + rest for (t, h, w), rest in zip(grids, pieces[1:]))
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_format_is_derived_and_every_protocol_conversation_matches(variants, name):
    tok = load_template_tokenizer(variants[name])
    fmt = derive_chat_format(tok, name)
    assert fmt.default_system == EXPECTED[name]
    assert verify_chat(tok, fmt, Protocol.default(), name) >= 10


@pytest.mark.parametrize("name", list(EXPECTED))
def test_runtime_ids_equal_the_templates_without_a_system_prompt(variants, name, photos):
    """With no system prompt in the protocol the template's default turn shows: ids must follow it."""
    ckpt = variants[name]
    tok = load_template_tokenizer(ckpt)
    config = ModelConfig.from_checkpoint(ckpt)
    chat = ChatTokenizer.from_file(ckpt / "tokenizer.json", config, derive_chat_format(tok, name))
    protocol = Protocol.default().replace(system_prompt="")
    pre = preprocess_image(photos["coffee"], config=config.image)
    scan = protocol.scan_messages()
    ours = chat.encode(messages_from_dicts(scan), [pre.grid_thw], add_generation_prompt=True)
    assert ours.tolist() == hf_ids(tok, scan, [pre.grid_thw])
    if name != "stock":  # the difference is real: the stock renderer would have produced other ids
        stock = ChatTokenizer.from_file(ckpt / "tokenizer.json", config)
        assert stock.encode(messages_from_dicts(scan), [pre.grid_thw], add_generation_prompt=True).tolist() != \
            ours.tolist()


@pytest.mark.parametrize("edit,words", [
    (lambda t: "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}", "not ChatML"),
    (lambda t: t.replace("{% if add_vision_id %}Picture", "{% if true %}Picture"), "differently"),
    (lambda t: t.replace("{{ message['role'] }}\n", "{{ message['role'] | upper }}\n"), "not ChatML"),
    (lambda t: t.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}"),
     "query 1 conversation differently"),
])
def test_a_template_the_runtime_cannot_follow_is_refused(tiny_ckpt, tmp_path, edit, words):
    ckpt = with_template(tiny_ckpt, tmp_path / "bad", edit)
    with pytest.raises(ChatTemplateError, match=words) as e:
        write_chat_format(ckpt, Protocol.default(), tmp_path)
    assert str(ckpt) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "chat.json").exists()


def test_engine_carries_the_format_and_the_transformers_backend_follows_it_too(variants, tmp_path, photos):
    from zoomin.build.engine import BuildOptions, build_engine
    from zoomin.hf_backend import load_hf

    ckpt = variants["no_system"]
    build_engine(BuildOptions(model=ckpt, out=tmp_path / "engine", precision="fp32", check_parity=False),
                 log=lambda s: None)
    assert ChatFormat.load(tmp_path / "engine" / "chat.json").default_system is None
    protocol = {"system_prompt": ""}
    zi, hf = ZoomIn.load(tmp_path / "engine", **protocol), load_hf(ckpt, protocol=Protocol.default().replace(**protocol))
    pre = zi.preprocess(photos["coffee"])
    ids = zi.scan_ids(pre)
    assert ids.tolist() == hf.scan_ids(pre).tolist()
    assert ids.tolist() == hf_ids(load_template_tokenizer(ckpt), zi.protocol.scan_messages(), [pre.grid_thw])
