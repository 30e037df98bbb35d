"""llama.cpp as a peer, through llama-cpp-python's low-level API (the library built from PyPI).

Conversion: llama.cpp's own `convert_hf_to_gguf.py` (from a llama.cpp source tree: the llama-cpp-python sdist
ships one under vendor/llama.cpp) writes the text model as f32 GGUF, and with `--mmproj` the vision tower;
int4 is `llama_model_quantize` to Q4_0 (the vision projector stays f16, as llama.cpp distributes it). A
checkpoint whose tokenizer the converter does not recognise by hash (a random checkpoint's small vocabulary) but
whose pre-tokenizer is Qwen2's regex is labelled "qwen2", which is what it is, and a vision tower of fewer
than 3 blocks (a truncated test checkpoint) gets a projector name map wide enough for the merger's mlp.2; the
report says when either happened.

Runtime: the raw llama_context API rather than `llama_cpp.Llama`, whose Python-side logits buffer (n_batch x
vocab floats, 300 MB at Qwen's 152k vocabulary) would be charged to llama.cpp's peak RSS. Text prompts are fed as
zoomin's ids and decoding feeds the workload's script, so llama.cpp does exactly zoomin's work. With the mmproj,
libmtmd runs the whole job (its helper lays out Qwen2.5-VL's M-RoPE positions); without it, text only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .peers import ConversionError, JobHost, JobRun, Peer, PeerOptions, Session, TextRun, run_converter

SOURCE_ENV = "ZOOMIN_LLAMA_CPP_SRC"
QWEN2_PRE_TOKENIZER = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                       "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
NOTE = "ZOOMIN-NOTE: "
# Runs convert_hf_to_gguf.py (argv[1]) with its arguments; an unrecognised BPE pre-tokenizer that is Qwen2's regex
# is labelled "qwen2" (with a note on stderr), anything else fails as the converter would.
_CONVERT = f"""
import json, runpy, sys
from pathlib import Path
conv = Path(sys.argv[1]); sys.argv = [str(conv), *sys.argv[2:]]
sys.path.insert(0, str(conv.parent))
from conversion import base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        tj = json.loads((Path(self.dir_model) / "tokenizer.json").read_text())
        if {QWEN2_PRE_TOKENIZER!r} not in json.dumps(tj.get("pre_tokenizer"), ensure_ascii=False).replace("\\\\\\\\", "\\\\"):
            raise
        print({NOTE!r} + "the converter did not recognise the tokenizer's hash; its pre-tokenizer is Qwen2's regex, "
              "labelled qwen2", file=sys.stderr)
        return "qwen2"
base.TextModel.get_vocab_base_pre = pre
import gguf
name_map = gguf.get_tensor_name_map
def widened(arch, n_blocks):
    # the projector's tensor names are looked up by "block" index: Qwen2-VL's merger.mlp.2 needs 3 even when
    # the vision tower (a truncated test checkpoint) has fewer blocks
    if arch == gguf.MODEL_ARCH.MMPROJ and n_blocks < 3:
        print({NOTE!r} + f"vision depth {{n_blocks}} < 3: the converter's projector name map widened to 3 for "
              "merger.mlp.2", file=sys.stderr)
        n_blocks = 3
    return name_map(arch, n_blocks)
gguf.get_tensor_name_map = widened
runpy.run_path(str(conv), run_name="__main__")
"""
_QUANTIZE = """
import ctypes, sys
import llama_cpp as L
p = L.llama_model_quantize_default_params()
p.ftype = L.LLAMA_FTYPE_MOSTLY_Q4_0
p.nthread = int(sys.argv[3])
rc = L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
if rc != 0:
    raise SystemExit(f"RuntimeError: llama_model_quantize returned {rc}")
"""
TEXT_FILE = {"fp32": "model-f32.gguf", "int4": "model-q4_0.gguf"}
MMPROJ_FILE = "mmproj.gguf"
MMPROJ_TYPE = {"fp32": "f32", "int4": "f16"}


def converter_script(options: PeerOptions) -> Path | None:
    src = options.llama_cpp_src or (Path(os.environ[SOURCE_ENV]) if os.environ.get(SOURCE_ENV) else None)
    if src is None:
        return None
    script = Path(src) / "convert_hf_to_gguf.py"
    return script if script.is_file() else None


class LlamaCppPeer(Peer):
    name = "llama.cpp"
    runtime = "llama.cpp"
    requires = ("llama_cpp", "gguf")
    packages = ("llama-cpp-python", "gguf")
    does_vision = True

    def convert(self, ckpt: Path, precision: str, out: Path, log: Path, options: PeerOptions) -> list[str]:
        script = converter_script(options)
        if script is None:
            raise ConversionError("convert_hf_to_gguf.py not found: pass --llama-cpp-src (or set "
                                  f"{SOURCE_ENV}) to a llama.cpp source tree, e.g. the llama-cpp-python sdist's "
                                  "vendor/llama.cpp")
        f32 = out / TEXT_FILE["fp32"]
        run_converter([sys.executable, "-c", _CONVERT, script, ckpt, "--outtype", "f32", "--outfile", f32], log,
                      what="convert_hf_to_gguf.py")
        notes = [f"convert_hf_to_gguf.py --outtype f32{' + llama_model_quantize Q4_0' if precision == 'int4' else ''}"]
        if precision == "int4":
            run_converter([sys.executable, "-c", _QUANTIZE, f32, out / TEXT_FILE["int4"], os.cpu_count() or 1], log,
                          what="llama_model_quantize")
            f32.unlink()
        try:
            run_converter([sys.executable, "-c", _CONVERT, script, ckpt, "--mmproj", "--outtype",
                           MMPROJ_TYPE[precision], "--outfile", out / MMPROJ_FILE], log,
                          what="convert_hf_to_gguf.py --mmproj")
            notes.append(f"vision: mmproj {MMPROJ_TYPE[precision]}")
        except ConversionError as e:
            (out / MMPROJ_FILE).unlink(missing_ok=True)
            notes.append(f"text only: the vision projector did not convert ({e})")
        notes += sorted({ln.split(NOTE, 1)[1].strip() for ln in log.read_text(errors="replace").splitlines()
                         if ln.startswith(NOTE)})
        return notes

    def open(self, path: Path, threads: int) -> Session:
        return _Session(path, threads)


class _Session(Session):
    N_CTX = 8192
    N_BATCH = 512

    def __init__(self, path: Path, threads: int):
        import llama_cpp as L

        self.L = L
        self.notes: list[str] = []
        L.llama_backend_init()
        model_file = next((path / f for f in TEXT_FILE.values() if (path / f).is_file()), None)
        if model_file is None:
            raise FileNotFoundError(f"{path}: no {' or '.join(TEXT_FILE.values())}")
        self.model = L.llama_model_load_from_file(str(model_file).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_file}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = self.N_CTX, self.N_BATCH, self.N_BATCH
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(self.N_BATCH, 0, 1)
        self.mtmd = self._open_vision(path / MMPROJ_FILE, threads)

    def _open_vision(self, mmproj: Path, threads: int):
        if not mmproj.is_file():
            self.notes.append("text only: no vision projector (mmproj) was converted")
            return None
        try:
            from llama_cpp import mtmd_cpp as M
        except ImportError as e:
            self.notes.append(f"text only: this llama-cpp-python has no mtmd bindings ({e})")
            return None
        p = M.mtmd_context_params_default()
        p.use_gpu, p.print_timings, p.n_threads = False, False, threads
        ctx = M.mtmd_init_from_file(str(mmproj).encode(), self.model, p)
        if not ctx:
            self.notes.append(f"text only: libmtmd could not load {mmproj.name}")
            return None
        self.M = M
        return ctx

    def _decode(self, tokens, pos0: int) -> None:
        """Run `tokens` at positions pos0.. in batches; logits for the last one only."""
        L, b = self.L, self.batch
        for start in range(0, len(tokens), self.N_BATCH):
            chunk = tokens[start:start + self.N_BATCH]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), pos0 + start + i, 1, 0
                b.seq_id[i][0] = 0
            b.logits[len(chunk) - 1] = int(start + len(chunk) == len(tokens))
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

    def _feed(self, script: list[int], pos: int) -> int:
        """Decode steps feeding script[:-1] (the last scripted token needs no forward pass); next position."""
        for t in script[:-1]:
            self._decode([t], pos)
            pos += 1
        return pos

    def text(self, prompt: str, ids: np.ndarray, script: list[int]) -> TextRun:
        self.L.llama_memory_clear(self.memory, True)
        t0 = time.perf_counter()
        self._decode(ids.tolist(), 0)
        t1 = time.perf_counter()
        self._feed(script, len(ids))
        t2 = time.perf_counter()
        return TextRun((t1 - t0) * 1e3, len(ids), (t2 - t1) * 1e3, len(script) - 1)

    def job(self, host: JobHost, image: str) -> JobRun | None:
        if self.mtmd is None:
            return None
        from ..runtime.chat import VISION_PLACEHOLDER
        from ..runtime.image_io import load_image

        M = self.M
        job = host.prepare(image)
        marker = M.mtmd_default_marker()
        self.L.llama_memory_clear(self.memory, True)
        t0 = time.perf_counter()
        load_image(image)  # the same file decode zoomin's job starts with (libmtmd takes pixels)
        pos, encode_ms, n1 = self._eval(job.scan_text.replace(VISION_PLACEHOLDER, marker.decode()), job.images1, 0)
        pos = self._feed(job.answer1, pos)
        # the script's last token is fed with query 2's text, as zoomin's continuation feeds it
        pos, _, n2 = self._eval(job.check_text.replace(VISION_PLACEHOLDER, marker.decode()), job.images2, pos,
                                prefix=[job.answer1[-1]])
        self._feed(job.answer2, pos)
        total = (time.perf_counter() - t0) * 1e3
        return JobRun(total, encode_ms, {"stage1_prompt": n1, "stage2_prefill": n2, "crops": len(job.images2) - 1})

    def _eval(self, text: str, images: list[np.ndarray], pos: int, prefix: list[int] = ()) -> tuple[int, float, int]:
        """Tokenize text + images with libmtmd and run every chunk; (next position, first image's encode ms,
        tokens)."""
        import ctypes

        M, L = self.M, self.L
        bitmaps = [M.mtmd_bitmap_init(im.shape[1], im.shape[0],
                                      (ctypes.c_uint8 * im.size).from_buffer_copy(np.ascontiguousarray(im)))
                   for im in images]
        chunks = M.mtmd_input_chunks_init()
        try:
            txt = M.mtmd_input_text(text.encode(), len(text.encode()), False, True)
            arr = (M.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = M.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(txt), arr, len(bitmaps))
            if rc != 0:
                raise RuntimeError(f"mtmd_tokenize returned {rc}")
            if prefix:
                self._decode(list(prefix), pos)
                pos += len(prefix)
            encode_ms, n_tokens = None, len(prefix)
            n = M.mtmd_input_chunks_size(chunks)
            for i in range(n):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                new_pos = L.llama_pos(pos)  # the text helper adds to it, the image helper sets it
                n_tokens += M.mtmd_input_chunk_get_n_tokens(chunk)
                if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    t0 = time.perf_counter()
                    if M.mtmd_encode_chunk(self.mtmd, chunk) != 0:
                        raise RuntimeError("mtmd_encode_chunk failed")
                    embd = M.mtmd_get_output_embd(self.mtmd)
                    if encode_ms is None:
                        encode_ms = (time.perf_counter() - t0) * 1e3
                    rc = M.mtmd_helper_decode_image_chunk(self.mtmd, self.ctx, chunk, embd, pos, 0, self.N_BATCH,
                                                          ctypes.byref(new_pos), M.mtmd_helper_post_decode_callback(), None)
                else:
                    rc = M.mtmd_helper_eval_chunk_single(self.mtmd, self.ctx, chunk, pos, 0, self.N_BATCH,
                                                         i == n - 1, ctypes.byref(new_pos))
                if rc != 0:
                    raise RuntimeError(f"libmtmd could not evaluate chunk {i} ({rc})")
                pos = new_pos.value
            return pos, encode_ms, n_tokens
        finally:
            M.mtmd_input_chunks_free(chunks)
            for b in bitmaps:
                M.mtmd_bitmap_free(b)
