"""Conversation -> prompt text -> token ids, exactly as the Qwen2.5-VL chat template and processor produce them.

The runtime cannot use jinja or transformers, so the published Qwen2.5-VL chat template (see
zoomin/build/tokenizer_gen.py CHAT_TEMPLATE) is re-implemented here as plain string building; the tests hold it
to `apply_chat_template` output byte for byte. A fine-tuned checkpoint may carry its own template: the build
derives what it does differently (its default system turn: another text, or none; `ChatFormat`, stored as the
engine's chat.json) and verifies this renderer against the checkpoint's template through transformers on the
protocol's exact conversations, refusing a template it cannot follow (zoomin.build.chat_check). Token ids come from the checkpoint's own `tokenizer.json` via
`tokenizers`, then each image's single <|image_pad|> is expanded to the image's token count, which is what the
HF processor's text expansion gives (special tokens are split off before BPE, so n pads are n ids either way).

Special-token strings typed inside message text (e.g. a user writing "<|im_end|>") are NOT escaped: the real
tokenizer splits them as special tokens and so does this module, matching transformers. A typed
"<|image_pad|>" therefore counts as an image and trips the image-count check.

Stage 2 of ZoomIn appends a turn to a conversation whose assistant answer was just generated. Because the
continuation text starts with the special token <|im_end|>, its tokens never merge with the answer's (BPE never
crosses a special token), so `prompt ids + generated ids + encode_continuation(...)` is exactly the tail of
`encode(whole conversation)` and the KV cache of the first query can be reused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .config import ModelConfig, TokenIds
from .rope import image_token_count

DEFAULT_SYSTEM = "You are a helpful assistant."
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class Text:
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"Text part needs a str, got {type(self.text).__name__}")


@dataclass(frozen=True)
class Image:
    """Marks where an image goes; its pixels and grid_thw travel separately (grids are passed to encode)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str | tuple[Text | Image, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or not self.role:
            raise ValueError(f"message role must be a non-empty string, got {self.role!r}")
        if isinstance(self.content, str):
            return
        parts = tuple(self.content)
        bad = [p for p in parts if not isinstance(p, (Text, Image))]
        if bad:
            raise ValueError(f"message content must be a str or Text/Image parts, got {bad[0]!r}")
        object.__setattr__(self, "content", parts)


@dataclass(frozen=True)
class ChatFormat:
    """How a checkpoint's chat template departs from the stock Qwen2.5-VL one (found and verified by the build)."""

    default_system: str | None = DEFAULT_SYSTEM  # None: no system turn unless the conversation starts with one
    source: str = "stock Qwen2.5-VL template"  # where it came from, for humans

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ChatFormat":
        try:
            d: dict[str, Any] = json.loads(Path(path).read_text())
            return cls(default_system=d["default_system"], source=str(d.get("source", "")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: unreadable chat format ({e})") from None


def messages_from_dicts(dicts: Sequence[dict[str, Any]]) -> list[Message]:
    """Chat-template dicts ({"role", "content": str | [{"type": "image"|"text", ...}]}) as Message objects."""
    out = []
    for m in dicts:
        content = m["content"]
        if isinstance(content, str):
            out.append(Message(m["role"], content))
        else:
            out.append(Message(m["role"], tuple(Image() if c["type"] == "image" else Text(c["text"])
                                                for c in content)))
    return out


def render_chat(
    messages: Sequence[Message], *, add_generation_prompt: bool, default_system: str | None = DEFAULT_SYSTEM
) -> str:
    """The Qwen2.5-VL chat template: a default system turn (if the format has one) unless the first message is a
    system turn, then every turn."""
    if not messages:
        raise ValueError("cannot render an empty conversation: give at least one message")
    turns = _render_turns(messages, add_generation_prompt)
    if messages[0].role == "system" or default_system is None:
        return turns
    return _render_turn(Message("system", default_system)) + turns


def render_continuation(messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
    """Text that follows a generated assistant answer: close that turn, then `messages`.

    render_chat(history + [assistant(answer)] + messages) ==
    render_chat(history, add_generation_prompt=True) + answer + render_continuation(messages).
    """
    return "<|im_end|>\n" + _render_turns(messages, add_generation_prompt)


class ChatTokenizer:
    """Token ids for Qwen2.5-VL conversations, from the checkpoint's tokenizer.json."""

    def __init__(self, tokenizer: Tokenizer, tokens: TokenIds, merge_size: int,
                 chat_format: ChatFormat = ChatFormat()) -> None:
        for name, token_id in (
            ("<|image_pad|>", tokens.image_pad),
            ("<|vision_start|>", tokens.vision_start),
            ("<|vision_end|>", tokens.vision_end),
            ("<|im_start|>", tokens.im_start),
            ("<|im_end|>", tokens.im_end),
        ):
            if tokenizer.token_to_id(name) != token_id:
                raise ValueError(
                    f"tokenizer maps {name} to {tokenizer.token_to_id(name)}, the model config says {token_id}: "
                    "tokenizer.json and the model config come from different checkpoints"
                )
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.merge_size = merge_size
        self.format = chat_format

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, config: ModelConfig,
                  chat_format: ChatFormat = ChatFormat()) -> "ChatTokenizer":
        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
        return cls(tokenizer, config.tokens, config.image.merge_size, chat_format)

    def encode(
        self,
        messages: Sequence[Message],
        image_grids: Sequence[Sequence[int]] = (),
        *,
        add_generation_prompt: bool,
    ) -> np.ndarray:
        """int64 ids of the whole conversation; image_grids holds one (t, h, w) per Image part, in order."""
        text = render_chat(messages, add_generation_prompt=add_generation_prompt,
                           default_system=self.format.default_system)
        return self._encode_text(text, image_grids)

    def encode_continuation(
        self, messages: Sequence[Message], image_grids: Sequence[Sequence[int]] = (), *, add_generation_prompt: bool
    ) -> np.ndarray:
        """int64 ids to append after a generated assistant answer (see render_continuation).

        The prefix they extend is the prompt ids followed by the generated ids *without* the final <|im_end|>
        (generation stops on it before feeding it); the continuation starts by feeding that <|im_end|>.
        """
        return self._encode_text(render_continuation(messages, add_generation_prompt=add_generation_prompt),
                                 image_grids)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _encode_text(self, text: str, image_grids: Sequence[Sequence[int]]) -> np.ndarray:
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        pads = np.flatnonzero(ids == self.tokens.image_pad)
        if len(pads) != len(image_grids):
            raise ValueError(
                f"the conversation holds {len(pads)} <|image_pad|> tokens (one per image, including any typed in "
                f"text) but {len(image_grids)} image grids were given"
            )
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[pads] = [image_token_count(g, self.merge_size) for g in image_grids]
        return np.repeat(ids, repeats)


def _render_turns(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    bad = [m for m in messages if not isinstance(m, Message)]
    if bad:
        raise ValueError(f"conversation entries must be Message objects, got {bad[0]!r}")
    text = "".join(_render_turn(m) for m in messages)
    return (text + "<|im_start|>assistant\n") if add_generation_prompt else text


def _render_turn(message: Message) -> str:
    if isinstance(message.content, str):
        body = message.content
    else:
        body = "".join(VISION_PLACEHOLDER if isinstance(p, Image) else p.text for p in message.content)
    return f"<|im_start|>{message.role}\n{body}<|im_end|>\n"
