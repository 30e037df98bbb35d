"""What machine the numbers come from, and how fast its memory is.

Numbers without the machine are meaningless, and a decode step that streams every weight once cannot beat the
memory: the measured bandwidth turns bytes per token into the floor that `floor.py` reports against.
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

import numpy as np

PACKAGES = ("zoomin", "numpy", "onnxruntime", "onnx", "torch", "transformers", "opencv-python-headless", "tokenizers")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD extensions that decide which kernels ORT and torch pick."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
    except OSError:
        pass
    return []


def _meminfo(key: str) -> int | None:
    """A /proc/meminfo field in bytes (Linux), else psutil's figure."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    vm = psutil.virtual_memory()
    return int(vm.total if key == "MemTotal" else vm.available)


def memory_bytes() -> int | None:
    return _meminfo("MemTotal")


def available_memory_bytes() -> int | None:
    return _meminfo("MemAvailable")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), to tell background load apart."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already counted in user


def background_cores(window_s: float = 1.0) -> float | None:
    """Cores kept busy by every other process over a short window (this process's own CPU time subtracted)."""
    busy0, own0 = busy_cpu_seconds(), sum(os.times()[:2])
    if busy0 is None:
        return None
    time.sleep(window_s)
    return max(busy_cpu_seconds() - busy0 - (sum(os.times()[:2]) - own0), 0.0) / window_s


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def describe() -> dict:
    return {
        "cpu": cpu_model(),
        "cores_usable": usable_cores(),
        "cores_logical": os.cpu_count(),
        "cores_physical": physical_cores(),
        "memory_bytes": memory_bytes(),
        "memory_available_at_start": available_memory_bytes(),
        "simd": cpu_flags(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "load_average_at_start": load_average(),
        "versions": versions(),
    }


def measure_bandwidth(threads: int, mib_per_thread: int = 256, tries: int = 15) -> dict:
    """Best sustained DRAM bandwidth (bytes/s) over 1..threads threads, for a copy and for a read-only reduction.

    A copy moves its bytes twice (read + write); a reduction only reads, like a decode step streaming weights.
    Each thread works on its own buffer, far larger than any cache; numpy drops the GIL inside both kernels. The
    best of the two is the floor's bandwidth: the faster the memory is taken to be, the stricter the floor. Best
    of many short tries, so that a moment of background load on a shared machine does not lower it.
    """
    n = mib_per_thread * 2**20 // 4
    results: dict[str, dict[int, float]] = {"copy": {}, "read": {}}
    for t in range(1, threads + 1):
        src = [np.ones(n, np.float32) for _ in range(t)]
        dst = [np.empty_like(a) for a in src]
        kernels = {"copy": (lambda i: np.copyto(dst[i], src[i]), 2), "read": (lambda i: np.add.reduce(src[i]), 1)}
        with ThreadPoolExecutor(t) as pool:
            for name, (kernel, passes) in kernels.items():
                list(pool.map(kernel, range(t)))  # fault the pages in before timing
                best = float("inf")
                for _ in range(tries):
                    t0 = time.perf_counter()
                    list(pool.map(kernel, range(t)))
                    best = min(best, time.perf_counter() - t0)
                results[name][t] = passes * n * 4 * t / best
        del src, dst
    best_copy, best_read = max(results["copy"].values()), max(results["read"].values())
    return {
        "bytes_per_s": max(best_copy, best_read),
        "copy_bytes_per_s": best_copy,
        "read_bytes_per_s": best_read,
        "by_threads": {name: {str(t): v for t, v in r.items()} for name, r in results.items()},
        "buffer_mib_per_thread": mib_per_thread,
    }
