"""The checkpoint's own chat template, followed by the runtime or refused at build time.

The runtime renders ChatML by hand (zoomin.runtime.chat: no jinja, no transformers on appliances). A fine-tuned
ZoomIn checkpoint may ship another template; a silent difference would change every prompt. So the build asks
transformers' `apply_chat_template` (the checkpoint's chat_template.jinja or tokenizer_config.json template) what
it does: the default system turn it adds to a conversation without one (another text, or none) becomes the
engine's ChatFormat, and then every conversation the protocol produces (query 1, query 1 + answer + query 2 with
0..max_boxes crops, without and with the protocol's system prompt) must render byte-identical in the runtime,
including the query-2 continuation the KV-cache reuse depends on. Anything else is refused with the first
difference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from zoomin.runtime.chat import ChatFormat, messages_from_dicts, render_chat, render_continuation
from zoomin.runtime.parse import Box
from zoomin.runtime.protocol import Protocol

from .checkpoint import BuildError

_SYSTEM_TURN = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", re.S)


class ChatTemplateError(BuildError):
    """The checkpoint's chat template renders a conversation differently from the runtime's renderer."""


def load_template_tokenizer(ckpt: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))


def derive_chat_format(tokenizer, where: str) -> ChatFormat:
    """The default system turn the template adds to a conversation that has none."""
    if not getattr(tokenizer, "chat_template", None):
        return ChatFormat(source=f"stock Qwen2.5-VL template ({where} has no chat template)")
    probe = _hf(tokenizer, [{"role": "user", "content": [{"type": "text", "text": "x"}]}], False)
    if probe.startswith("<|im_start|>user\n"):
        return ChatFormat(default_system=None, source=f"{where}: template without a default system turn")
    m = _SYSTEM_TURN.match(probe)
    if m is None:
        raise ChatTemplateError(f"{where}: the chat template is not ChatML (<|im_start|>role ... <|im_end|>); "
                                f"it renders a one-word user turn as {probe[:120]!r}")
    default = m.group(1)
    source = "stock Qwen2.5-VL template" if default == ChatFormat().default_system else f"{where}: own template"
    return ChatFormat(default_system=default, source=source)


def verify_chat(tokenizer, fmt: ChatFormat, protocol: Protocol, where: str) -> int:
    """Check the runtime renderer against the template on the protocol's conversations; returns how many."""
    answer = protocol.format_answer("The lighting on the face is inconsistent.",
                                    [Box(10, 12, 80, 90, "face"), Box(40, 30, 120, 150, "hand")], "generated")
    count = 0
    for p in (protocol, protocol.replace(system_prompt="")):
        scan = p.scan_messages()
        _same(_hf(tokenizer, scan, True), render_chat(messages_from_dicts(scan), add_generation_prompt=True,
                                                      default_system=fmt.default_system), "query 1", where)
        count += 1
        for k in range(max(p.max_boxes, 3) + 1):
            boxes = [Box(5 * i, 5 * i, 5 * i + 40, 5 * i + 30, f"region {i}") for i in range(k)]
            whole = p.check_messages(answer, boxes)
            turn = whole[-1:]
            ours = (render_chat(messages_from_dicts(scan), add_generation_prompt=True,
                                default_system=fmt.default_system)
                    + answer + render_continuation(messages_from_dicts(turn), add_generation_prompt=True))
            _same(_hf(tokenizer, whole, True), ours, f"query 2 with {k} crops", where)
            count += 1
    return count


def write_chat_format(ckpt: Path, protocol: Protocol, engine: Path) -> ChatFormat:
    """Derive and verify the checkpoint's chat format; write it as the engine's chat.json."""
    tokenizer = load_template_tokenizer(ckpt)
    fmt = derive_chat_format(tokenizer, str(ckpt))
    verify_chat(tokenizer, fmt, protocol, str(ckpt))
    fmt.save(engine / "chat.json")
    return fmt


def _hf(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _same(theirs: str, ours: str, what: str, where: str) -> None:
    if theirs == ours:
        return
    at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    lo = max(0, at - 30)
    raise ChatTemplateError(
        f"{where}: the checkpoint's chat template renders the {what} conversation differently from zoomin's "
        f"ChatML renderer at character {at}: template {theirs[lo:at + 40]!r}, runtime {ours[lo:at + 40]!r}. "
        "zoomin follows ChatML templates that differ only in their default system turn")
