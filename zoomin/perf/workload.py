"""The fixed two-stage job both backends run: scripted answers of exact lengths, with a fixed number of boxes.

Random weights never write boxes and rarely stop, and a quantized engine may pick other tokens than the fp32
baseline, so letting each backend generate freely would give them different work. Instead every query's answer is
a script of token ids fed back one decode step at a time: the cost of a step does not depend on which token it
emits, so this measures true decode speed, while the text (boxes included) and every length are identical by
construction. Query 1's script holds `boxes` boxes, so query 2 always zooms into that many crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..runtime.lm import Generation, StepObserver
from ..runtime.parse import Box
from ..runtime.pipeline import LanguageModel, ZoomIn
from ..runtime.preprocess import PreprocessedImage
from ..runtime.sampling import Sampler, Sampling

FILLER = ("The lighting, shadows and reflections agree with one light source, and the textures of skin, hair and "
          "fabric look like those of a camera photograph. ")


class WorkloadError(ValueError):
    """A workload the scripts cannot express (e.g. too few tokens for the boxes), or a backend that deviated."""


@dataclass(frozen=True)
class Workload:
    stage1_tokens: int = 96  # query 1 answer: explanation + boxes + preliminary verdict
    stage2_tokens: int = 32  # query 2 answer: explanation + final verdict
    boxes: int = 2  # ZoomIn-7B marks ~1.95 boxes per image on average

    def __post_init__(self) -> None:
        if self.stage1_tokens < 1 or self.stage2_tokens < 1:
            raise WorkloadError("scripted answers need at least 1 token per query")
        if not 1 <= self.boxes <= 4:
            raise WorkloadError(f"boxes must be in 1..4 (the protocol's max_boxes), got {self.boxes}")

    def protocol_overrides(self) -> dict[str, int]:
        return {"max_new_tokens_scan": self.stage1_tokens, "max_new_tokens_check": self.stage2_tokens}


def script_boxes(n: int, resized_hw: tuple[int, int]) -> list[Box]:
    """n boxes along the diagonal of the image the model sees, each <= 25% of it (kept by the 50% area rule)."""
    h, w = resized_hw
    side = min(0.9 / n, 0.5)
    out = []
    for i in range(n):
        f = 0.05 + 0.9 * i / n
        out.append(Box(round(f * w), round(f * h), round(min(f + side, 0.95) * w), round(min(f + side, 0.95) * h)))
    return out


def scripted_answer(zi: ZoomIn, core_text: str, length: int, what: str) -> list[int]:
    """Exactly `length` ids: filler prose, then `core_text` (boxes and verdict) so the answer ends complete."""
    tok = zi.chat.tokenizer
    core = tok.encode(core_text, add_special_tokens=False).ids
    if len(core) > length:
        raise WorkloadError(f"{what} needs at least {len(core)} tokens for its boxes and verdict, got {length}")
    filler = tok.encode(FILLER, add_special_tokens=False).ids
    need = length - len(core)
    return (filler * (need // len(filler) + 1))[:need] + core


def scripts_for(zi: ZoomIn, pre: PreprocessedImage, workload: Workload) -> tuple[list[int], list[int]]:
    """The two answers for one image (box coordinates depend on the resized image size)."""
    p = zi.protocol
    boxes = script_boxes(workload.boxes, pre.resized_hw)
    answer1 = scripted_answer(zi, p.format_answer("", boxes, "real"), workload.stage1_tokens, "query 1")
    answer2 = scripted_answer(zi, p.verdict_markup("generated"), workload.stage2_tokens, "query 2")
    return answer1, answer2


class ScriptSampler(Sampler):
    """Emits the script's next id whatever the logits say; `sampling` stays greedy for backends that read it."""

    def __init__(self, script: Sequence[int]):
        super().__init__(Sampling())
        self.script = list(script)
        self.step = 0

    def __call__(self, logits: np.ndarray) -> int:
        token = self.script[self.step]
        self.step += 1
        return token


class ScriptedLM:
    """A LanguageModel decorator that makes each run emit the next queued script and checks that it did.

    For the transformers backend the script also reaches `generate`, through a logits processor (see
    `_ForcingModel`), since HfLM lets `generate` choose tokens instead of calling the sampler.
    """

    def __init__(self, inner: LanguageModel):
        self.inner = inner
        self.queue: list[list[int]] = []
        self.forcing: _ForcingModel | None = None
        if hasattr(inner, "model"):  # HfLM
            self.forcing = inner.model = _ForcingModel(inner.model)

    def begin(self) -> None:
        self.inner.begin()

    def run(self, ids: np.ndarray, images: Sequence[PreprocessedImage], *, forced: Sequence[int] | None,
            max_new_tokens: int, sampler: Sampler, observer: StepObserver | None) -> Generation:
        if not self.queue:
            raise WorkloadError("no script queued for this query")
        script = self.queue.pop(0)[:max_new_tokens]
        if self.forcing is not None:
            self.forcing.script = script
        g = self.inner.run(ids, images, forced=forced, max_new_tokens=max_new_tokens, sampler=ScriptSampler(script),
                           observer=observer)
        if g.tokens != script:
            raise WorkloadError(f"backend emitted {len(g.tokens)} tokens that differ from the {len(script)}-token "
                                f"script: the two backends would not do the same work")
        return g


class _ForcingModel:
    """Proxy of a transformers model whose `generate` also applies a logits processor forcing the script."""

    def __init__(self, model):
        self._model = model
        self.script: list[int] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, **kwargs):
        kwargs["logits_processor"].append(_ForceScript(self.script, kwargs["input_ids"].shape[1]))
        return self._model.generate(**kwargs)


class _ForceScript:
    """transformers LogitsProcessor (duck-typed): all scores -inf except the script's id for this step."""

    def __init__(self, script: list[int], prompt_len: int):
        self.script, self.prompt_len = script, prompt_len

    def __call__(self, input_ids, scores):
        token = self.script[input_ids.shape[1] - self.prompt_len]
        scores.fill_(float("-inf"))
        scores[:, token] = 0.0
        return scores


def run_scripted(zi: ZoomIn, image: str, answers: tuple[list[int], list[int]]):
    """One timed `detect` of the fixed job; returns its DetectResult."""
    lm = zi.lm
    if not isinstance(lm, ScriptedLM):
        raise TypeError("wrap the detector's language model with ScriptedLM first")
    lm.queue = [list(answers[0]), list(answers[1])]
    result = zi.detect(image)
    if lm.queue:
        raise WorkloadError("query 2 did not run: the scripted boxes were not parsed")
    return result
