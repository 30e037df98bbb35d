"""ZoomIn in a child process, so that an image that kills the process fails alone instead of ending the batch.

A photo too big for the machine does not always raise MemoryError: the kernel's OOM killer ends the process with
SIGKILL, and nothing in it can write that image's result or go on to the next one. So the engine lives in a
worker (a "spawn" child: no state forked from the parent) fed one image at a time; the parent waits for either the
answer or the worker's death (its process sentinel). A death becomes that image's error, and the next image gets a
fresh worker, which loads the engine again. Results come back pickled: the same DetectResult objects an in-process
`ZoomIn.detect_many` yields.

`detect_batch` sends the worker the whole list and it runs ZoomIn.detect_batch on it, saying when it starts each
image: a death is then the error of every image in flight (at most max_batch), and the images not yet started go to
a fresh worker.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import traceback
from collections.abc import Iterable, Iterator
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from .image_io import ImageSource, source_name

KILL_ON_ENV = "ZOOMIN_TEST_KILL_ON"
"""Test hook: a worker SIGKILLs itself when it starts the file of this name, as the OOM killer would."""


class WorkerError(RuntimeError):
    """The worker died while loading the engine, or raised an unexpected error (a bug) on an image."""


def describe_exit(exitcode: int | None) -> str:
    """How a worker ended, for an error message: `killed by signal 9 (SIGKILL), likely out of memory`."""
    if exitcode is None or exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = f" ({signal.Signals(-exitcode).name})"
    except ValueError:
        name = ""
    oom = ", likely out of memory" if -exitcode == signal.SIGKILL else ""
    return f"killed by signal {-exitcode}{name}{oom}"


class IsolatedZoomIn:
    """`ZoomIn.load(engine_dir, **load_kw)` in a worker process; `detect_many` keeps ZoomIn's contract, and a worker
    death while on an image is that image's error. Loading errors (EngineError, DeviceError, ProtocolError) are
    raised here as they are in-process. Close it (or use it as a context manager) to end the worker."""

    def __init__(self, engine_dir: str | os.PathLike, **load_kw: Any):
        self._args = (os.fspath(engine_dir), load_kw)
        self._context = get_context("spawn")
        self._proc = None
        self._conn: Connection | None = None
        self._busy = False  # an image was sent and its answer not read (the caller was interrupted)
        self._start()

    def _start(self) -> None:
        ours, theirs = self._context.Pipe()
        self._proc = self._context.Process(target=_serve, args=(theirs, *self._args), name="zoomin-worker",
                                           daemon=True)
        self._proc.start()
        theirs.close()
        self._conn = ours
        reply = self._receive()
        if reply is None:
            code = self._discard()
            raise WorkerError(f"the worker died while loading the engine ({describe_exit(code)})")
        kind, payload = reply
        if kind == "failed":
            self.close()
            raise payload

    def _receive(self) -> Any:
        """The worker's next message, or None when it died first."""
        if self._conn in wait([self._conn, self._proc.sentinel]):
            try:
                return self._conn.recv()
            except EOFError:
                pass
        return None

    def _discard(self) -> int | None:
        """Forget the worker (closing the pipe makes an idle one return; a busy or stuck one is killed); its exit
        code."""
        proc, self._proc = self._proc, None
        self._conn.close()
        if self._busy:
            proc.kill()
            self._busy = False
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        return proc.exitcode

    def _ensure_worker(self) -> None:
        """A live worker with nothing pending. One that died is restarted; so is one left mid-answer by a call
        the caller abandoned (a detect_batch iterator dropped before its end): its late replies must not be read
        as the next call's."""
        if self._proc is None or not self._proc.is_alive() or self._busy:
            if self._proc is not None:
                self._discard()
            self._start()

    def detect_many(self, images: Iterable[ImageSource], **kw: Any) -> Iterator[tuple[str, Any, str | None]]:
        for image in images:
            name = source_name(image)
            yield name, *self.try_detect(image, name=name, **kw)

    def try_detect(self, image: ImageSource, *, name: str | None = None, **kw: Any) -> tuple[Any, str | None]:
        """ZoomIn.try_detect in the worker; the worker's death on this image is its error."""
        name = source_name(image) if name is None else name
        self._ensure_worker()
        self._busy = True
        try:
            self._conn.send(("one", image, name, kw))
            reply = self._receive()
        except OSError:  # the pipe broke: the worker is gone
            reply = None
        self._busy = False
        if reply is None:
            code = self._discard()
            return None, f"{name}: the worker died while processing this image ({describe_exit(code)})"
        kind, payload = reply
        if kind == "crashed":
            raise WorkerError(f"{name}: the worker raised an unexpected error\n{payload}")
        return payload

    def detect_batch(self, images: Iterable[ImageSource], *, max_batch: int = 4, **kw: Any
                     ) -> Iterator[tuple[str, Any, str | None]]:
        """ZoomIn.detect_batch in the worker; results in input order. A worker death fails the images it had in
        flight (at most max_batch), each with its own error, and a fresh worker takes the ones not started."""
        images = list(images)
        held: dict[int, Any] = {}
        base, ready = 0, 0  # input index of the first image the next worker gets; of the next result to yield
        while base < len(images):
            top = base + 1
            for index, out in self._run_batch(images[base:], max_batch, kw):
                held[base + index] = out
                top = max(top, base + index + 1)
                while ready in held:
                    yield held.pop(ready)
                    ready += 1
            base = top  # every image up to the last one started has its result (or its error)

    def _run_batch(self, images: list, max_batch: int, kw: dict[str, Any]) -> Iterator[tuple[int, Any]]:
        """(index, result) as the worker completes them; when it dies, an error for each image it had started
        and not finished, then the iteration ends (the caller restarts from the first image not started)."""
        self._ensure_worker()
        self._busy = True
        started, finished = 0, set()
        try:
            self._conn.send(("batch", images, kw, max_batch))
        except OSError:
            pass
        while True:
            try:
                reply = self._receive()
            except OSError:
                reply = None
            if reply is None:
                self._busy = False
                code = self._discard()
                for j in range(max(started, 1)):
                    if j not in finished:
                        name = source_name(images[j])
                        yield j, (name, None, f"{name}: the worker died while processing this image, batched with "
                                              f"up to {max_batch - 1} others ({describe_exit(code)})")
                return
            kind, payload = reply
            if kind == "started":
                started = payload + 1
            elif kind == "done":
                finished.add(payload[0])
                yield payload
            elif kind == "end":
                self._busy = False
                return
            else:
                self._busy = False
                raise WorkerError(f"the worker raised an unexpected error\n{payload}")

    def close(self) -> None:
        """End the worker (at once if it is still on an image: the batch was interrupted)."""
        if self._proc is not None:
            self._discard()

    def __enter__(self) -> "IsolatedZoomIn":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _serve(conn: Connection, engine_dir: str, load_kw: dict[str, Any]) -> None:
    """The worker: load the engine once, then answer ("one", image, name, detect kwargs) and ("batch", images,
    detect kwargs, max_batch) messages until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent ends us
    from .pipeline import ZoomIn

    try:
        zi = ZoomIn.load(engine_dir, **load_kw)
    except Exception as e:
        conn.send(("failed", e if _picklable(e) else WorkerError(f"{type(e).__name__}: {e}")))
        return
    conn.send(("ready", None))
    kill_on = os.environ.get(KILL_ON_ENV)

    def check_kill(name: str) -> None:
        if kill_on and Path(name).name == kill_on:
            os.kill(os.getpid(), signal.SIGKILL)

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "batch":
            _serve_batch(conn, zi, *msg[1:], check_kill)
            continue
        _, image, name, kw = msg
        check_kill(name)
        try:
            conn.send(("done", zi.try_detect(image, name=name, **kw)))
        except Exception:
            conn.send(("crashed", traceback.format_exc()))


def _serve_batch(conn: Connection, zi, images: list, kw: dict[str, Any], max_batch: int, check_kill) -> None:
    """Run one detect_batch, announcing each image as a lane takes it (lanes send from their threads)."""
    lock = threading.Lock()

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    def announced() -> Iterator[ImageSource]:
        for i, image in enumerate(images):
            send(("started", i))
            check_kill(source_name(image))
            yield image

    try:
        for out in zi.detect_completions(announced(), max_batch=max_batch, **kw):
            send(("done", out))
        send(("end", None))
    except Exception:
        send(("crashed", traceback.format_exc()))


def _picklable(e: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        return False
    return True
