"""Peak resident memory of this process, as the build's stage log and the perf workers report it."""

from __future__ import annotations

import sys


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident memory in bytes of this process's own address space.

    Linux: VmHWM (since the last reset_peak_rss). Not getrusage's ru_maxrss, which a spawned worker inherits from
    its parent (Linux folds the RSS the parent had at fork into it at execve): every worker smaller than its
    parent would report the parent's size. Windows: the peak working set; elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if sys.platform == "win32":
        import psutil

        return int(psutil.Process().memory_info().peak_wset)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB elsewhere
