"""`manifest.json`: the only contract between `zoomin-build` and the runtime.

It names every file of an engine with its sha256 and size, the model config the runtime needs, the precision,
how the token embedding table is stored (`TableSpec`) and where the engine came from. The runtime refuses an
engine whose format (or table format) it does not know or whose files do not match, with one clear line, instead
of failing later inside onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig

# 2: vision graphs take unpadded frames (no full_valid / full_scatter); 3: "embedding" describes the token table;
# 4: graphs["vision"] is a directory of stage graphs run chunk by chunk (zoomin.runtime.vision)
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
TABLE_FORMATS = ("dense", "block_quantized")


class EngineError(ValueError):
    """An engine directory that cannot be used; the message names the directory and the problem."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under root (except the manifest itself), by posix relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


@dataclass(frozen=True)
class TableSpec:
    """How the token embedding table is stored (the manifest's "embedding").

    The file is the manifest's graphs["embed_tokens"].
    dense: a (vocab, hidden) .npy of `dtype` (fp32, fp16), memory-mapped and indexed.
    block_quantized: a graph of one com.microsoft GatherBlockQuantized over `bits`-bit codes in blocks of
      `block_size` along hidden, with float32 scales and zero points, stored in `data`: (code - zero) * scale, as
      MatMulNBits dequantizes. shared_with "lm_head": those are the decoder's lm_head MatMulNBits initializers
      (tied embeddings: the table is stored once), else the table has its own data file.
    """

    format: str
    dtype: str = "float32"  # dense: the .npy's; block_quantized: the rows it returns
    bits: int | None = None
    block_size: int | None = None
    data: str | None = None
    shared_with: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: Path) -> "TableSpec":
        fmt = d.get("format") if isinstance(d, dict) else None
        if fmt not in TABLE_FORMATS:
            raise EngineError(f"{where}: embedding table format {fmt!r} is not one this runtime reads "
                              f"({', '.join(TABLE_FORMATS)}); rebuild the engine")
        try:
            return cls(**d)
        except TypeError as e:
            raise EngineError(f"{where}: malformed embedding table entry ({e})") from None

    def describe(self) -> str:
        if self.format == "dense":
            return f"{self.dtype} table (runtime gathers rows)"
        shared = ", the lm_head's own codes (stored once)" if self.shared_with else ""
        return f"{self.bits}-bit blocks of {self.block_size} (GatherBlockQuantized){shared}"
def manifest_sha256(engine_dir: str | Path) -> str:
    """sha256 of an engine's manifest.json. The manifest pins every other file's sha256, so this one hash names
    the whole engine: what a driver hands its workers to check (`Manifest.load(expected_sha256=...)`)."""
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise EngineError(f"{engine_dir}: not an engine directory (no {MANIFEST}); build one with zoomin-build")
    return sha256_file(path)


@dataclass
class Manifest:
    precision: str
    config: ModelConfig
    files: dict[str, dict[str, Any]]
    graphs: dict[str, str]  # role ("vision", "decoder", "embed_tokens", ...) -> file name
    provenance: dict[str, Any]
    parity: dict[str, Any] = field(default_factory=dict)
    embedding: TableSpec | None = None  # None only for stand-in engines that are never written
    # `zoomin-build --target tensorrt`: versions, GPU, settings and files of the TensorRT / TensorRT-LLM artefacts
    # (zoomin.build.tensorrt.tensorrt_record); checked by zoomin.trtllm.check_tensorrt_compat
    tensorrt: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    def write(self, engine_dir: Path) -> None:
        self.files = hash_tree(engine_dir)
        (engine_dir / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())

    @classmethod
    def load(cls, engine_dir: str | Path, *, verify: str = "size", expected_sha256: str | None = None) -> "Manifest":
        """Read and check an engine's manifest.

        verify: "none", "size" (cheap, default: catches truncated copies) or "sha256" (reads every byte).
        expected_sha256: the manifest file's own sha256 as computed elsewhere (`manifest_sha256`, e.g. by a
        driver that ships the engine by path to other machines): a different manifest is refused, so every
        worker runs the engine the driver meant, and with verify="sha256" byte for byte.
        """
        root = Path(engine_dir)
        path = root / MANIFEST
        if not root.is_dir():
            raise EngineError(f"{root}: engine directory not found")
        if not path.is_file():
            raise EngineError(f"{root}: not an engine directory (no {MANIFEST}); build one with zoomin-build")
        try:
            raw = path.read_bytes()
            d = json.loads(raw)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineError(f"{path}: unreadable manifest ({e})") from None
        if expected_sha256 is not None and (actual := hashlib.sha256(raw).hexdigest()) != expected_sha256:
            raise EngineError(f"{path}: sha256 {actual} differs from the expected {expected_sha256}: this is not "
                              f"the engine the caller hashed (changed since, or another copy on this machine)")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise EngineError(f"{path}: engine format {version!r}, this runtime reads format {FORMAT_VERSION}; rebuild it")
        try:
            m = cls(
                precision=d["precision"],
                config=ModelConfig.from_dict(d["config"]),
                files=d["files"],
                graphs=d["graphs"],
                provenance=d.get("provenance", {}),
                parity=d.get("parity", {}),
                embedding=TableSpec.from_dict(d.get("embedding"), path),
                tensorrt=d.get("tensorrt"),
            )
        except (KeyError, TypeError) as e:
            raise EngineError(f"{path}: malformed manifest (missing {e})") from None
        if verify != "none":
            m.verify(root, deep=verify == "sha256")
        return m

    def verify(self, root: Path, *, deep: bool) -> None:
        for name, meta in self.files.items():
            p = root / name
            if not p.is_file():
                raise EngineError(f"{root}: file {name} listed in the manifest is missing")
            if p.stat().st_size != meta["size"]:
                raise EngineError(f"{root}: file {name} has {p.stat().st_size} bytes, manifest says {meta['size']}")
            if deep and sha256_file(p) != meta["sha256"]:
                raise EngineError(f"{root}: file {name} does not match its sha256 in the manifest")
