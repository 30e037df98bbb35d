"""The transformers reference backend: the same ZoomIn stages, run by `Qwen2_5_VLForConditionalGeneration`.

It is what a user would write with transformers (eager `generate` on the whole conversation, query 2 recomputing
query 1's prefix), and it serves as the parity reference in tests and the baseline in the perf suite. Only the
model execution differs from the ONNX runtime: tokens, images, protocol, parsing and crops are the shared stages.
Needs the `build` extra (torch, transformers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .runtime.chat import ChatTokenizer
from .runtime.config import ModelConfig
from .runtime.lm import Generation, StepObserver, stop_ids
from .runtime.pipeline import ZoomIn
from .runtime.preprocess import PreprocessedImage
from .runtime.protocol import Protocol
from .runtime.sampling import Sampler


class HfLM:
    def __init__(self, model, config: ModelConfig, *, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = model
        self.config = config
        self._vision_s = 0.0
        model.model.visual.register_forward_pre_hook(self._vision_start)
        model.model.visual.register_forward_hook(self._vision_end)

    def _sync(self) -> None:
        """Stage timestamps on a GPU need the queued work done first (CUDA runs asynchronously)."""
        import torch

        if self.model.device.type == "cuda":
            torch.cuda.synchronize()

    def _vision_start(self, *_):
        self._sync()
        self._t_vision = time.perf_counter()

    def _vision_end(self, *_):
        self._sync()
        self._vision_s += time.perf_counter() - self._t_vision

    def begin(self) -> None:
        """Nothing is cached between queries: every run recomputes the whole conversation."""

    def run(self, ids: np.ndarray, images: Sequence[PreprocessedImage], *, forced: Sequence[int] | None = None,
            max_new_tokens: int, sampler: Sampler, observer: StepObserver | None = None) -> Generation:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        if forced is not None:  # teacher-forced answer: query 2 recomputes it with the rest of the conversation
            return Generation(tokens=list(forced), stopped=True, prefill_tokens=0, reused_tokens=0)
        first: list[float] = []
        sync = self._sync

        class FirstToken(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if not first:
                    sync()
                    first.append(time.perf_counter())
                return scores

        s = sampler.sampling
        sample_kw = ({"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
                     if s.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None,
                                                "top_k": None})
        if s.seed is not None:
            torch.manual_seed(s.seed)
        tok = self.config.tokens
        self._vision_s = 0.0
        t0 = time.perf_counter()
        dev = self.model.device
        inputs = {
            "input_ids": torch.from_numpy(ids)[None],
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.from_numpy(np.concatenate([im.pixel_values for im in images])).to(self.model.dtype),
            "image_grid_thw": torch.from_numpy(np.stack([im.grid_thw for im in images])),
            # what the processor returns; without it transformers 5.x silently falls back to 1-D positions
            "mm_token_type_ids": torch.from_numpy((ids == tok.image_pad).astype(np.int64))[None],
        }
        with torch.inference_mode():
            out = self.model.generate(
                **{k: v.to(dev) for k, v in inputs.items()},
                max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids(tok)), pad_token_id=tok.endoftext,
                logits_processor=LogitsProcessorList([FirstToken()]), output_logits=True,
                return_dict_in_generate=True, **sample_kw)
        self._sync()
        t_end = time.perf_counter()
        gen = out.sequences[0, len(ids):].cpu().tolist()
        stopped = bool(gen) and gen[-1] in stop_ids(tok)
        if stopped:
            gen = gen[:-1]
        if observer is not None:
            for k, step_logits in enumerate(out.logits):
                observer(gen[:k], step_logits[0].float().cpu().numpy())
        t_first = first[0] if first else t_end
        vision_ms = self._vision_s * 1e3
        return Generation(tokens=gen, stopped=stopped, prefill_tokens=len(ids), reused_tokens=0,
                          vision_ms=vision_ms, prefill_ms=(t_first - t0) * 1e3 - vision_ms,
                          decode_ms=(t_end - t_first) * 1e3)


def load_hf(model_dir: str | Path, *, protocol: Protocol | None = None, threads: int | None = None,
            dtype: str = "float32") -> ZoomIn:
    """ZoomIn on a Hugging Face checkpoint (or `tiny-random`), run by transformers."""
    from .build.checkpoint import load_checkpoint, validate_checkpoint

    ckpt = validate_checkpoint(model_dir)
    model = load_checkpoint(ckpt, dtype=dtype)
    config = ModelConfig.from_checkpoint(ckpt)
    from .build.chat_check import derive_chat_format, load_template_tokenizer

    chat = ChatTokenizer.from_file(ckpt / "tokenizer.json", config,
                                   derive_chat_format(load_template_tokenizer(ckpt), str(ckpt)))
    return ZoomIn(HfLM(model, config, threads=threads), chat, config, protocol or Protocol.default(),
                  vocab_size=config.text.vocab_size)
