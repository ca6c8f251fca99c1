"""Data-parallel training across processes: MPI's COMM_WORLD through mpi4py, or a one-process stand-in with
the same methods, so the trainer has one code path whether it runs alone or under `mpiexec -n N`.

Every process (rank) runs the same loop on its share of the batch rows. The collectives the trainer needs
are few and coarse: weights are broadcast from rank 0 once, the gradients are summed in one call on one flat
buffer per step, the carried hidden state is gathered to rank 0 when it saves, and a handful of scalars
(loss, signals, rank 0's clock) are summed so that every rank takes the same decisions.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable

import numpy as np

from charlm.errors import ConfigError
from charlm.extras import import_extra

# Set by MPI launchers in every process they start: MPICH's and Intel MPI's Hydra (PMI_*), Open MPI's mpirun,
# and PMIx launchers such as Slurm's `srun --mpi=pmix`.
LAUNCHER_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


class SingleProcess:
    """The one-process world: every collective is the identity. Same interface as `MPIWorld`."""

    rank = 0
    size = 1
    local_size = 1
    aborts_all_on_error = True

    def rows(self, batch_size: int) -> tuple[int, int]:
        """This rank's share [first, stop) of `batch_size` rows."""
        return 0, batch_size

    def sum_in_place(self, buffer: np.ndarray) -> None:
        """buffer = the sum of every rank's buffer (same shape and dtype on all)."""

    def broadcast_in_place(self, buffers: Iterable[np.ndarray]) -> None:
        """Every rank's buffers take rank 0's values."""

    def broadcast_json(self, value):
        """Rank 0's JSON-able `value` on every rank (what the others pass is ignored)."""
        return value

    def gather_rows(self, array: np.ndarray) -> np.ndarray | None:
        """Rank 0 gets every rank's (L, rows, ...) share joined along axis 1 in rank order; others get None."""
        return array

    def barrier(self) -> None:
        """Return once every rank has called it."""

    def threads_per_rank(self) -> int | None:
        """Threads each rank should use, or None to keep the process's default (all its cores)."""
        return None


class MPIWorld(SingleProcess):
    """COMM_WORLD of an MPI job (mpi4py); `local_size` counts the ranks on this machine."""

    def __init__(self, mpi) -> None:
        self._mpi = mpi
        self._comm = mpi.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self._node = self._comm.Split_type(mpi.COMM_TYPE_SHARED, key=self.rank)
        self.local_size = self._node.Get_size()
        # `python -m mpi4py` turns an uncaught error or a non-zero exit in one process into MPI_Abort of all.
        self.aborts_all_on_error = "mpi4py.run" in sys.modules

    def rows(self, batch_size: int) -> tuple[int, int]:
        if batch_size % self.size:
            raise ConfigError(f"--batch-size {batch_size} does not divide among {self.size} processes: "
                              f"choose a multiple of {self.size}")
        share = batch_size // self.size
        return self.rank * share, (self.rank + 1) * share

    def sum_in_place(self, buffer: np.ndarray) -> None:
        self._comm.Allreduce(self._mpi.IN_PLACE, buffer, op=self._mpi.SUM)

    def broadcast_in_place(self, buffers: Iterable[np.ndarray]) -> None:
        for buffer in buffers:
            self._comm.Bcast(buffer, root=0)

    def broadcast_json(self, value):
        data = json.dumps(value).encode("utf-8") if self.rank == 0 else b""
        size = np.array([len(data)], np.int64)
        self._comm.Bcast(size, root=0)
        message = np.frombuffer(data, np.uint8).copy() if self.rank == 0 else np.empty(int(size[0]), np.uint8)
        self._comm.Bcast(message, root=0)
        return json.loads(message.tobytes().decode("utf-8"))

    def gather_rows(self, array: np.ndarray) -> np.ndarray | None:
        rows_first = np.ascontiguousarray(np.moveaxis(array, 1, 0))
        joined = None
        if self.rank == 0:
            joined = np.empty((rows_first.shape[0] * self.size, *rows_first.shape[1:]), rows_first.dtype)
        self._comm.Gather(rows_first, joined, root=0)
        return None if joined is None else np.ascontiguousarray(np.moveaxis(joined, 0, 1))

    def barrier(self) -> None:
        self._comm.Barrier()

    def threads_per_rank(self) -> int:
        """Its own cores when the launcher bound this machine's ranks to disjoint cores, else the machine's
        cores shared out among its ranks (at least one each): never more threads than cores."""
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        own = sorted(affinity)
        shares = self._node.allgather(own)
        cores = set().union(*shares)
        if sum(len(share) for share in shares) == len(cores):
            return len(own)
        return max(1, len(cores) // self.local_size)


_world: SingleProcess | None = None


def world() -> SingleProcess:
    """MPI's world when an MPI launcher started this process as one of several (or mpi4py already runs),
    else the one-process stand-in. MPI is initialised once per process, on first use."""
    global _world
    if _world is None:
        _world = _open_world()
    return _world


def _open_world() -> SingleProcess:
    launched = any(os.environ.get(name) for name in LAUNCHER_VARIABLES)
    if "mpi4py.MPI" not in sys.modules and not launched:
        return SingleProcess()
    if os.environ.get("PMI_SIZE") == "1" or os.environ.get("OMPI_COMM_WORLD_SIZE") == "1":
        return SingleProcess()
    MPI = import_extra("mpi4py.MPI", "mpi", "a process started by an MPI launcher (data-parallel training)")
    if MPI.COMM_WORLD.Get_size() == 1:
        return SingleProcess()
    return MPIWorld(MPI)

