"""Thread pinning: BLAS and Numba each run their own thread pool, and on a small CPU the two must not
oversubscribe the cores (a 2-core machine running 2 BLAS + 2 Numba spinning threads loses a lot)."""

from __future__ import annotations

import os

import numba
from threadpoolctl import ThreadpoolController

from charlm.errors import ConfigError

_limiter = None  # keeps threadpoolctl's limits object alive for the life of the process


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's total."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def limit_threads(n: int | None = None) -> int:
    """Pin BLAS (via threadpoolctl) and Numba to `n` threads (default: the available cores); returns n."""
    global _limiter
    n = available_cores() if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"thread count must be a positive integer, got {n!r}")
    _limiter = ThreadpoolController().limit(limits=n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n


def ensure_threads_limited() -> None:
    """Apply the default `limit_threads()` unless the caller already chose a limit."""
    if _limiter is None:
        limit_threads()
