"""A checkpoint's weights one block at a time: a lazy safetensors reader and the transformers parts built from it.

A Qwen2.5-VL-7B checkpoint is 16 GB in bf16 and 33 GB once transformers loads it in float32, which does not fit
the machines the build should run on. `CheckpointWeights` memory-maps the *.safetensors files (one file, or the
shards of model.safetensors.index.json) and returns single tensors in the dtype they are stored in;
`CheckpointParts` builds one transformers submodule at a time (a decoder layer, a vision block, the merger) on the
meta device and fills it with that block's tensors (`load_state_dict(assign=True)`), so the export wrappers, which
take transformers modules, run unchanged while at most one block's weights are resident.

`ModelParts` serves the same parts from a transformers model already in memory (the tests' checkpoints, and
`.bin` checkpoints, which cannot be read lazily).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from ..runtime.config import TextConfig, VisionConfig, text_config, vision_config
from .checkpoint import CheckpointError, load_checkpoint

INDEX_FILE = "model.safetensors.index.json"
# Where the parts live: transformers 5 saves (and the Hub stores) the first layout, transformers 4.5x the second.
TEXT_PREFIXES = ("model.", "model.language_model.")
VISION_PREFIXES = ("visual.", "model.visual.")


class CheckpointWeights:
    """Tensors of a safetensors checkpoint by name, read on demand in their stored dtype."""

    def __init__(self, ckpt: Path):
        from safetensors import safe_open

        self.root = Path(ckpt)
        index = self.root / INDEX_FILE
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {name: self.root / file for name, file in weight_map.items()}
            else:
                files = {}
                for path in sorted(self.root.glob("*.safetensors")):
                    with safe_open(str(path), framework="pt") as f:
                        files.update(dict.fromkeys(f.keys(), path))
        except Exception as e:  # safetensors raises its own error types for unreadable headers
            raise CheckpointError(f"{self.root}: cannot load weights ({_first_line(e)})") from None
        if not files:
            raise CheckpointError(f"{self.root}: no weights in *.safetensors")
        self._file = files

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._file if n.startswith(prefix))

    @contextmanager
    def _open(self, names: Sequence[str]) -> Iterator[Callable[[str], object]]:
        """Handles on the files holding `names`, closed afterwards: safetensors memory-maps a file, and every page
        read through a map that stays open would stay in this process's resident set (a 15 GB checkpoint would
        look like a 15 GB build)."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self._file]
        if missing:
            raise CheckpointError(f"{self.root}: weights {missing[:3]} not found in the checkpoint")
        with ExitStack() as stack:
            handles = {}
            for path in dict.fromkeys(self._file[n] for n in names):
                try:
                    handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot load weights ({_first_line(e)})") from None
            yield lambda name: handles[self._file[name]]

    def tensors(self, names: Sequence[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors as stored (bf16, fp16, fp32), converted to `dtype` only when one is given."""
        out = {}
        with self._open(names) as handle:
            for name in names:
                try:
                    t = handle(name).get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{self._file[name]}: cannot read {name} ({_first_line(e)})") from None
                # a copy: safetensors returns views of its memory map, whose pages would count as resident for
                # as long as anything (an exporter cache, a cycle not yet collected) holds such a view
                out[name] = t.clone() if dtype is None or t.dtype == dtype else t.to(dtype)
        return out

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.tensors([name], dtype)[name]

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor, reading only those rows."""
        with self._open([name]) as handle:
            t = handle(name).get_slice(name)[start:stop].clone()
        return t if dtype is None else t.to(dtype)

    def shape(self, name: str) -> list[int]:
        with self._open([name]) as handle:
            return list(handle(name).get_slice(name).get_shape())

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix`, keyed by the rest of its name (a submodule's state_dict)."""
        return {n[len(prefix):]: t for n, t in self.tensors(self.names(prefix)).items()}

    def numel(self) -> int:
        """Elements of every tensor (from the headers)."""
        with self._open(list(self._file)) as handle:
            return sum(_numel(handle(n).get_slice(n).get_shape()) for n in self._file)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def assign(factory: Callable[[], nn.Module], state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """`factory()` built on the meta device (no memory), then given `state`'s tensors as its parameters."""
    with torch.device("meta"):
        module = factory()
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not fit the config ({_first_line(e)})") from None
    if any(t.is_meta for t in module.buffers()):
        raise CheckpointError(f"{where}: has buffers that are not in the checkpoint (built on the meta device)")
    return module.eval()


class CheckpointParts:
    """The transformers parts of a Qwen2.5-VL checkpoint, each built on demand from its own tensors."""

    def __init__(self, ckpt: Path):
        from transformers import Qwen2_5_VLConfig

        self.root = Path(ckpt)
        self.weights = CheckpointWeights(self.root)
        self.hf_config = Qwen2_5_VLConfig.from_pretrained(self.root)
        # parts run standalone (the parity checks): transformers' reference attention, no dispatch to choose
        for sub in (self.hf_config.text_config, self.hf_config.vision_config):
            sub._attn_implementation = "eager"
        raw = json.loads((self.root / "config.json").read_text())
        self.text: TextConfig = text_config(raw)
        self.vision: VisionConfig = vision_config(raw)
        self._text = self._prefix(TEXT_PREFIXES, "embed_tokens.weight")
        self._vision = self._prefix(VISION_PREFIXES, "patch_embed.proj.weight")

    def _prefix(self, candidates: tuple[str, ...], probe: str) -> str:
        for p in candidates:
            if p + probe in self.weights:
                return p
        raise CheckpointError(f"{self.root}: no {probe} under any of {', '.join(candidates)} (not Qwen2.5-VL weights)")

    def _part(self, factory: Callable[[], nn.Module], prefix: str) -> nn.Module:
        return assign(factory, self.weights.group(prefix), f"{self.root}: {prefix.rstrip('.')}")

    # -- language model -------------------------------------------------------------------------------------------

    def text_layer(self, i: int) -> nn.Module:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

        return self._part(lambda: Qwen2_5_VLDecoderLayer(self.hf_config.text_config, i), f"{self._text}layers.{i}.")

    def text_norm(self) -> nn.Module:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

        t = self.text
        return self._part(lambda: Qwen2_5_VLRMSNorm(t.hidden_size, eps=t.rms_norm_eps), f"{self._text}norm.")

    def text_rotary(self) -> nn.Module:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

        return Qwen2_5_VLRotaryEmbedding(config=self.hf_config.text_config)  # buffers only, computed from config

    def lm_head(self) -> nn.Linear:
        """The output projection; with tied embeddings (3B) it is the embedding table, as transformers ties it."""
        name = self.embed_name if self.text.tie_word_embeddings or "lm_head.weight" not in self.weights \
            else "lm_head.weight"
        t = self.text
        return assign(lambda: nn.Linear(t.hidden_size, t.vocab_size, bias=False),
                      {"weight": self.weights.tensor(name)}, f"{self.root}: {name}")

    @property
    def embed_name(self) -> str:
        return f"{self._text}embed_tokens.weight"

    def embedding_rows(self, chunk_rows: int) -> Iterator[torch.Tensor]:
        """The token embedding table in chunks of rows, in stored dtype."""
        name = self.embed_name
        vocab = self.weights.shape(name)[0]
        for start in range(0, vocab, chunk_rows):
            yield self.weights.rows(name, start, min(vocab, start + chunk_rows))

    def float32_bytes(self) -> int:
        """What transformers would hold in float32: 4 bytes per stored element."""
        return 4 * self.weights.numel()

    # -- vision tower ---------------------------------------------------------------------------------------------

    def vision_patch_embed(self) -> nn.Module:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

        v = self.vision
        return self._part(lambda: Qwen2_5_VisionPatchEmbed(v.patch_size, v.temporal_patch_size, v.in_channels,
                                                           v.hidden_size), f"{self._vision}patch_embed.")

    def vision_rotary(self) -> nn.Module:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding

        return Qwen2_5_VLVisionRotaryEmbedding(self.hf_config.vision_config)

    def vision_block(self, i: int) -> nn.Module:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock

        return self._part(lambda: Qwen2_5_VLVisionBlock(self.hf_config.vision_config), f"{self._vision}blocks.{i}.")

    def vision_merger(self) -> nn.Module:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

        v = self.vision
        return self._part(lambda: Qwen2_5_VLPatchMerger(v.out_hidden_size, v.hidden_size, v.spatial_merge_size),
                          f"{self._vision}merger.")

    def vision_tower(self) -> nn.Module:
        """The whole vision tower (2.7 GB in float32 at every Qwen2.5-VL size): for the parity check."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
            Qwen2_5_VLVisionRotaryEmbedding,
        )

        cfg = self.hf_config.vision_config
        with torch.device("meta"):
            tower = Qwen2_5_VisionTransformerPretrainedModel(cfg)
        tower.rotary_pos_emb = Qwen2_5_VLVisionRotaryEmbedding(cfg)  # computed from config, not stored
        state = {k: v.float() for k, v in self.weights.group(self._vision).items()}
        return assign(lambda: tower, state, f"{self.root}: vision tower")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class ModelParts:
    """The same parts, served from a transformers Qwen2_5_VLForConditionalGeneration already in memory."""

    def __init__(self, model: nn.Module):
        self.model = model
        raw = model.config.to_dict()
        self.text: TextConfig = text_config(raw)
        self.vision: VisionConfig = vision_config(raw)
        self._lm = model.model.language_model
        self._visual = model.model.visual

    def text_layer(self, i: int) -> nn.Module:
        return self._lm.layers[i]

    def text_norm(self) -> nn.Module:
        return self._lm.norm

    def text_rotary(self) -> nn.Module:
        return self._lm.rotary_emb

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def embedding_rows(self, chunk_rows: int) -> Iterator[torch.Tensor]:
        table = self.model.get_input_embeddings().weight.detach()
        for start in range(0, len(table), chunk_rows):
            yield table[start:start + chunk_rows]

    def float32_bytes(self) -> int:
        return sum(4 * p.numel() for p in self.model.parameters())

    def vision_patch_embed(self) -> nn.Module:
        return self._visual.patch_embed

    def vision_rotary(self) -> nn.Module:
        return self._visual.rotary_pos_emb

    def vision_block(self, i: int) -> nn.Module:
        return self._visual.blocks[i]

    def vision_merger(self) -> nn.Module:
        return self._visual.merger

    def vision_tower(self) -> nn.Module:
        return self._visual


Parts = CheckpointParts | ModelParts


def as_parts(source) -> Parts:
    """Parts of a transformers model, or the parts object itself."""
    return source if isinstance(source, (CheckpointParts, ModelParts)) else ModelParts(source)


def open_parts(ckpt: Path) -> Parts:
    """Lazy parts of a safetensors checkpoint; a .bin-only checkpoint has to be loaded whole by transformers."""
    if any(Path(ckpt).glob("*.safetensors")):
        return CheckpointParts(ckpt)
    return ModelParts(load_checkpoint(ckpt))
