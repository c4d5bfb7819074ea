"""Keep freed memory inside a training process: glibc malloc settings for the stage workers.

A training step frees and allocates the same large tensors every step (activations, gradient
and convolution buffers). With glibc's defaults a block above the mmap threshold is unmapped
when freed, the heap's top is trimmed, and a worker's executor thread has an arena of its own
whose heaps are at most 64 MiB, so each step page-faults its buffers in again: thousands of
minor faults and up to 10 ms of kernel time per step for a ResNet stage on the 2-core
benchmark machine. With one arena, no mmap and a high trim threshold a worker keeps the heap
of its peak step and reuses it (the peak itself does not change: the same tensors are alive
then). Only glibc reads these settings; elsewhere they do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before any goes back to the OS (mallopt takes an int)
TUNABLES = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(TRIM_THRESHOLD),
}
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters (malloc.h)


def tunables_env(current: str | None = None) -> str:
    """GLIBC_TUNABLES for a new process: these settings added to ``current``, where a setting
    already there (the user's) is kept."""
    parts = [p for p in (current or "").split(":") if p]
    present = {p.split("=", 1)[0] for p in parts}
    parts += [f"{name}={value}" for name, value in TUNABLES.items() if name not in present]
    return ":".join(parts)


def keep_freed_memory() -> bool:
    """The same settings for this process from now on (mallopt; threads that already have an arena
    keep it). False where this is not glibc or a setting was refused."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    accepted = [mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))]
    return all(accepted)


@contextlib.contextmanager
def children_keep_freed_memory() -> Iterator[None]:
    """Processes started inside this block (through the environment) get the settings; the
    environment is as it was afterwards."""
    before = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = tunables_env(before)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = before
