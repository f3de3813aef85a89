"""Process memory behaviour that decides peak resident memory on large volumes."""

from __future__ import annotations

import ctypes
import sys

__all__ = ["set_malloc_mmap_threshold"]


def set_malloc_mmap_threshold(threshold_bytes: int) -> bool:
    """Serve heap allocations of at least ``threshold_bytes`` with mmap (glibc ``M_MMAP_THRESHOLD``).

    PyTorch's CPU tensors come from malloc. glibc raises its mmap threshold up to 32 MB as blocks
    are freed, after which freed activation memory stays in the process heap in pieces too small
    to reuse, so resident memory grows well beyond what is allocated. A fixed threshold returns
    large blocks to the operating system on free (at the price of page faults on reuse). Process
    wide; a no-op returning False where glibc is not the allocator.

    Args:
        threshold_bytes: blocks this large or larger are mmapped.

    Returns:
        True when the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold_bytes)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
