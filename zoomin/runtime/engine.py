"""Load an engine directory: manifest, ONNX Runtime sessions, embedding table, tokenizer and protocol."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat import ChatFormat, ChatTokenizer
from .config import ModelConfig
from .decoder import Decoder
from .embedding import EmbeddingTable, load_table
from .manifest import EngineError, Manifest
from .protocol import Protocol
from .providers import providers_for, session_options
from .vision import VisionEncoder


@dataclass
class Engine:
    root: Path
    manifest: Manifest
    protocol: Protocol
    chat: ChatTokenizer
    vision: VisionEncoder
    decoder: Decoder
    embed_tokens: EmbeddingTable  # (vocab, hidden); only the rows looked up are read from disk
    device: str

    @property
    def config(self) -> ModelConfig:
        return self.manifest.config

    @classmethod
    def load(cls, engine_dir: str | Path, *, device: str = "cpu", threads: int | None = None,
             verify: str = "size", trt_cache: str | Path | None = None) -> "Engine":
        """trt_cache: the TensorRT execution provider's engine and timing cache directory (tensorrt, jetson);
        default <engine_dir>/.trt_cache. Point it elsewhere when the engine directory is read-only."""
        import onnxruntime as ort

        root = Path(engine_dir)
        manifest = Manifest.load(root, verify=verify)
        cache = Path(trt_cache) if trt_cache is not None else root / ".trt_cache"
        providers = providers_for(device, cache_dir=cache if device in ("tensorrt", "jetson") else None)
        options = session_options(threads)
        graphs = manifest.graphs
        try:
            vision = VisionEncoder(root / graphs["vision"], manifest.config.vision, providers, options)
            decoder = Decoder(ort.InferenceSession(str(root / graphs["decoder"]), options, providers=providers),
                              manifest.config.text, manifest.config.decoder_graph)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise EngineError(f"{root}: cannot load graphs ({str(e).splitlines()[0]})") from None
        t = manifest.config.text
        embed = load_table(root, graphs["embed_tokens"], manifest.embedding, (t.vocab_size, t.hidden_size), threads)
        try:  # engines built before chat.json existed were made for the stock template
            chat_format = ChatFormat.load(root / graphs["chat"]) if "chat" in graphs else ChatFormat()
        except ValueError as e:
            raise EngineError(str(e)) from None
        chat = ChatTokenizer.from_file(root / graphs["tokenizer"], manifest.config, chat_format)
        protocol = Protocol.load(root / graphs["protocol"])
        return cls(root, manifest, protocol, chat, vision, decoder, embed, device)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings (len(ids), hidden) as float32, gathered from the table (zoomin.runtime.embedding)."""
        return self.embed_tokens.lookup(ids)
