"""Allocator settings for the data path (glibc only).

Every read and every write of the data path handles buffers of up to a few
hundred KiB.  glibc serves allocations that large with ``mmap`` and gives
them back with ``munmap`` (and trims the heap back to the system), so each
buffer's pages were faulted in and zeroed anew: about a tenth of the relay's
CPU on a bulk transfer.  Raising both thresholds keeps such buffers in the
heap, where they are reused (docs/performance.md).
"""

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024

_done = False


def tune():
    """Apply the settings once; False where the C library is not glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version          # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _done = bool(ok)
    return _done
