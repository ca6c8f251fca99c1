"""Threads: BLAS and Numba each run their own pool, and on a small, shared CPU they must not oversubscribe
the cores. The model parallelises itself instead: `parallel_chunks` gives each thread a contiguous share
(e.g. of the batch rows, which an LSTM keeps independent through all T steps) while BLAS runs one thread
per call, so threads meet once per phase instead of in every time step. Per-step barriers inside a
multi-threaded BLAS cost little on an idle machine but are ruinous when other processes share the cores.
Batch-1 generation is the exception: its threads meet several times per token, at the spinning barrier
`meet` of compiled code (see `meeting_counters`).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from threadpoolctl import ThreadpoolController

from charlm.errors import ConfigError

# Below this many elements an elementwise pass is not worth handing to a second thread.
MIN_ELEMENTWISE_CHUNK = 1 << 15

_controller: ThreadpoolController | None = None
_limiter = None  # keeps threadpoolctl's limits object alive for the life of the process
_threads = 1
_pool: ThreadPoolExecutor | None = None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's total."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def limit_threads(n: int | None = None) -> int:
    """Pin BLAS (via threadpoolctl) and Numba to `n` threads (default: the available cores); returns n."""
    global _controller, _limiter, _threads, _pool
    n = available_cores() if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"thread count must be a positive integer, got {n!r}")
    _controller = ThreadpoolController()
    _limiter = _controller.limit(limits=n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if n != _threads:
        if _pool is not None:
            _pool.shutdown()
        _pool = ThreadPoolExecutor(n - 1, thread_name_prefix="charlm") if n > 1 else None
        _threads = n
    return n


def thread_count() -> int:
    """Threads the model may use: `parallel_chunks` runs that many chunks at once."""
    ensure_threads_limited()
    return _threads


def one_cpu_each(n: int) -> list[int | None]:
    """A CPU for each of n threads (distinct while the process may use that many), for `pinned_to_cpu`;
    None where the OS does not say which CPUs the process may use."""
    if not hasattr(os, "sched_getaffinity"):
        return [None] * n
    cpus = sorted(os.sched_getaffinity(0))
    return [cpus[k % len(cpus)] for k in range(n)]


@contextmanager
def pinned_to_cpu(cpu: int | None) -> Iterator[None]:
    """Run the calling thread on that one CPU inside the block, then as before (Linux; elsewhere, or with
    None, or where the OS refuses, as it is). For threads that meet every few microseconds and so need a
    core each: woken after an idle spell, Linux at times put two of generation's threads on one CPU for
    tens of milliseconds before it moved one away."""
    before = None
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cpu})
        except OSError:
            before = None
    try:
        yield
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)


def others_keep_cores_busy() -> bool:
    """Whether other work leaves fewer idle cores than the threads the model may use. Code that meets its
    threads many times per second should then run on one thread: every meeting waits for a descheduled
    thread.

    On Linux, judged by the threads of other processes runnable right now (/proc), not by the load
    average: that remembers a minute of this process's own busy threads (say a benchmark's previous phase)
    and would wrongly see others. Elsewhere, by the 1-minute load average less the caller. Busy only if a
    second look 1 ms later agrees: a kernel thread passing through is not a process sharing the cores
    (docs/performance.md)."""
    ensure_threads_limited()
    spare = available_cores() - _threads + 0.5
    if _others_running() <= spare:
        return False
    time.sleep(0.001)
    return _others_running() > spare


def _others_running() -> float:
    """Threads of other processes that are runnable now (Linux), else the 1-minute load average less one."""
    try:
        with open("/proc/loadavg") as file:
            running = int(file.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/stat") as file:
                own += file.read().rpartition(")")[2].split()[0] == "R"
        return running - own
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] - 1.0 if hasattr(os, "getloadavg") else 0.0


def ensure_threads_limited() -> None:
    """Apply the default `limit_threads()` unless the caller already chose a limit."""
    if _limiter is None:
        limit_threads()


def single_threaded_blas() -> AbstractContextManager:
    """Context in which every BLAS call runs on its calling thread (for calls made from `parallel_chunks`)."""
    ensure_threads_limited()
    return _controller.limit(limits=1, user_api="blas")


def parallel_chunks(n_items: int, work: Callable[[int, int], object], min_chunk: int = 1) -> list:
    """Run work(start, stop) over contiguous chunks of range(n_items), one per thread (the caller takes the
    first) and none smaller than min_chunk; returns the results in chunk order. `work` should release the
    GIL (BLAS, nogil kernels)."""
    ensure_threads_limited()
    n_chunks = max(1, min(_threads, n_items // min_chunk))
    bounds = [n_items * k // n_chunks for k in range(n_chunks + 1)]
    futures = [_pool.submit(work, bounds[k], bounds[k + 1]) for k in range(1, n_chunks)]
    first = work(bounds[0], bounds[1])
    return [first] + [future.result() for future in futures]


def parallel_matmul(a, b, out) -> None:
    """out = a @ b with the rows of a and out split across the threads; call it inside
    `single_threaded_blas()`, so that each thread's BLAS call runs on that thread alone."""

    def rows(start: int, stop: int) -> None:
        np.matmul(a[start:stop], b, out=out[start:stop])

    parallel_chunks(a.shape[0], rows)


_MEETING_STRIDE = 8  # int64 counters 64 bytes apart, so each thread's counter has a cache line of its own
# A counter value above any count: a thread whose own counter holds it returns from every meeting, and one
# waiting on it stops waiting (see `meetings_released_on_error`).
_ABANDONED = 1 << 62
# A waiting thread pauses this many times (some µs) before it starts yielding its core at every turn.
_SPINS_BEFORE_YIELD = 1 << 10
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _is_counters(array_type) -> bool:
    """Whether a Numba type is the int64, C-contiguous array of `meeting_counters`."""
    return isinstance(array_type, types.Array) and array_type.dtype == types.int64 and array_type.layout == "C"


@intrinsic
def _publish(typingctx, counters, index, value):
    """counters[index] = value as a release store: a thread that reads the new value (`_observe`) also sees
    every write made before it."""
    if not _is_counters(counters):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        builder.store_atomic(args[2], builder.gep(array.data, [args[1]]), ordering="release", align=8)
        return context.get_dummy_value()

    return types.void(counters, types.intp, types.int64), codegen


@intrinsic
def _observe(typingctx, counters, index):
    """counters[index] as an acquire load (see `_publish`), read afresh on every call."""
    if not _is_counters(counters):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(array.data, [args[1]]), ordering="acquire", align=8)

    return types.int64(counters, types.intp), codegen


@intrinsic
def _wait_a_little(typingctx, spins):
    """One turn of a spin-wait: the CPU's pause hint while spins < _SPINS_BEFORE_YIELD, then sched_yield, so
    that a waiting thread which shares its core with the one it waits for hands the core over."""
    if not isinstance(spins, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        module = builder.module
        short = builder.icmp_signed("<", args[0], ir.Constant(args[0].type, _SPINS_BEFORE_YIELD))
        with builder.if_else(short) as (then, otherwise):
            with then:
                if _X86:
                    builder.call(cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), []),
                                                                "llvm.x86.sse2.pause"), [])
            with otherwise:
                builder.call(cgutils.get_or_insert_function(module, ir.FunctionType(ir.IntType(32), []),
                                                            "sched_yield"), [])
        return context.get_dummy_value()

    return types.void(spins), codegen


def meeting_counters(n_parts: int) -> np.ndarray:
    """Zeroed counters for `meet` among n_parts threads: one per 64-byte line, so no thread's spinning reads
    the line another writes."""
    return np.zeros(n_parts * _MEETING_STRIDE, np.int64)


@contextmanager
def meetings_released_on_error(meetings):
    """If the body raises (a thread that never came to its meetings: Ctrl-C before the call, a failed
    dispatch), mark every counter abandoned, so that no other thread waits for it forever; then re-raise."""
    try:
        yield
    except BaseException:
        meetings[:] = _ABANDONED
        raise


@njit(cache=True, nogil=True)
def meet(meetings, part, n_parts):
    """Barrier of the n_parts threads of one generation call: each counts its arrivals in its own slot of
    meetings (`meeting_counters`, zero on entry to the call) and waits until every other has arrived as often.
    A spinning wait, as the threads meet every few microseconds: a sleeping one would take longer to wake."""
    if n_parts == 1:
        return
    arrived = _observe(meetings, part * _MEETING_STRIDE) + 1
    if arrived > _ABANDONED:
        return
    _publish(meetings, part * _MEETING_STRIDE, arrived)
    for other in range(n_parts):
        spins = 0
        while _observe(meetings, other * _MEETING_STRIDE) < arrived:
            _wait_a_little(spins)
            spins += 1
