"""Data-parallel training speed: N MPI processes x 1 thread against 1 process x 1 thread.

    python benchmarks/bench_mpi.py                          # char-512 and bpe-512, 1 vs 2 processes
    python benchmarks/bench_mpi.py --configs char-256 --processes 2 --rounds 5 --steps 8

Each measurement is one `mpiexec -n N` job running the trainer's step on random ids, one global batch of
T x B: forward and backward on this process's B/N rows, one sum of the flat gradient buffer over all
processes (MPI Allreduce), clipping, AdamW. Jobs with 1 and N processes take turns (`--rounds` of each), and
the table gives medians over all timed steps: tokens/s of the whole batch, and the parts of a step: forward
and backward ("compute"), the wait for the slowest process (a barrier), the Allreduce itself, and the update
that every process repeats (mean, clipping, AdamW). On a machine that other work shares, the wall-clock
speed-up measures the scheduler as much as charlm; "CPU tok/s" divides the tokens by rank 0's CPU time per
step without the wait (what each process would reach with a core to itself), and "CPU x" is its ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lstm import BenchConfig, parse_config  # noqa: E402
from charlm.kernels.target import cpu_model  # noqa: E402

TARGET_SPEEDUP = 1.8
CLIP = 1.0
LEARNING_RATE = 1e-3


def worker(config: BenchConfig, steps: int, warmup: int) -> None:
    """One rank of a job: time `warmup + steps` training steps; rank 0 prints its timings as JSON."""
    from charlm.config import ModelConfig
    from charlm.distributed import world
    from charlm.model import LSTMLanguageModel
    from charlm.optim import AdamW, clip_grad_norm
    from charlm.runtime import limit_threads

    processes = world()
    limit_threads(1)
    first, stop = processes.rows(config.batch_size)
    model = LSTMLanguageModel(ModelConfig(vocab_size=config.vocab_size, embed_dim=config.embed_dim,
                                          hidden_size=config.hidden_size, num_layers=config.num_layers,
                                          dropout=0.0), seed=0)
    processes.broadcast_in_place(model.params.values())
    optimizer = AdamW(model.params, lr=LEARNING_RATE)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(config.seq_len + 1, config.batch_size),
                                            dtype=np.int32)
    inputs, targets = np.ascontiguousarray(ids[:-1, first:stop]), np.ascontiguousarray(ids[1:, first:stop])
    state = model.zero_state(stop - first)
    step_times, compute_times, wait_times, allreduce_times, update_times, busy_times = [], [], [], [], [], []
    for step in range(warmup + steps):
        processes.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        _, state = model.forward(inputs, targets, state, train=True, rows=(first, config.batch_size))
        grads, _ = model.backward()
        computed, cpu_computed = time.perf_counter(), time.process_time()
        processes.barrier()
        waited, cpu_waited = time.perf_counter(), time.process_time()
        processes.sum_in_place(model.flat_gradients)
        summed = time.perf_counter()
        if processes.size > 1:
            model.flat_gradients[...] *= np.float32(1.0 / processes.size)
        clip_grad_norm(grads, CLIP)
        optimizer.step(grads, LEARNING_RATE)
        end, cpu_end = time.perf_counter(), time.process_time()
        if step >= warmup:
            step_times.append(end - start)
            compute_times.append(computed - start)
            wait_times.append(waited - computed)
            allreduce_times.append(summed - waited)
            update_times.append(end - summed)
            busy_times.append((cpu_end - cpu_start) - (cpu_waited - cpu_computed))
    if processes.rank == 0:
        print(json.dumps({"processes": processes.size, "step": step_times, "compute": compute_times,
                          "wait": wait_times, "allreduce": allreduce_times, "update": update_times,
                          "busy": busy_times,
                          "gradient_bytes": int(model.flat_gradients.nbytes)}))


def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        sys.exit("no mpiexec beside this Python or on PATH: pip install 'charlm[mpi]'")
    return found


def run_job(processes: int, config: str, steps: int, warmup: int) -> dict:
    command = [mpiexec(), "-n", str(processes), sys.executable, "-m", "mpi4py", __file__, "--worker",
               "--configs", config, "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="char-512,bpe-512", help="comma-separated bench_lstm configs")
    parser.add_argument("--processes", type=int, default=2, help="processes of the parallel job (1 thread each)")
    parser.add_argument("--rounds", type=int, default=3, help="jobs of each size, taking turns")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first in each job")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = [parse_config(name) for name in args.configs.split(",")]
    if args.worker:
        worker(configs[0], args.steps, args.warmup)
        return

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; {args.rounds} rounds x {args.steps} steps; "
          f"1 thread per process")
    width = max(9, *(len(config.name) for config in configs))
    header = (f"{'config':<{width}} {'procs':>5} {'tokens/s':>9} {'step ms':>8} {'compute ms':>10} {'wait ms':>8} "
              f"{'allreduce ms':>12} {'update ms':>9} {'grad MB':>8} {'speed-up':>8} {'CPU tok/s':>10} {'CPU x':>6}")
    print(header)
    results = []
    for config in configs:
        jobs: dict[int, list[dict]] = {1: [], args.processes: []}
        for round_number in range(args.rounds):
            order = (1, args.processes) if round_number % 2 == 0 else (args.processes, 1)
            for size in order:
                jobs[size].append(run_job(size, config.name, args.steps, args.warmup))
        tokens = config.seq_len * config.batch_size
        speeds, busy_speeds = {}, {}
        for size, runs in jobs.items():
            median = {key: statistics.median(t for run in runs for t in run[key])
                      for key in ("step", "compute", "wait", "allreduce", "update", "busy")}
            speeds[size] = tokens / median["step"]
            busy_speeds[size] = tokens / median["busy"]
            record = {"config": config.name, "processes": size, "tokens_per_s": speeds[size],
                      **{f"{key}_ms": 1e3 * value for key, value in median.items()},
                      "gradient_bytes": runs[0]["gradient_bytes"]}
            results.append(record)
            speed_up = speeds[size] / speeds[1]
            verdict = "" if size == 1 else f"{speed_up:.2f}x {'ok' if speed_up >= TARGET_SPEEDUP else 'MISS'}"
            busy_up = "" if size == 1 else f"{busy_speeds[size] / busy_speeds[1]:.2f}x"
            print(f"{config.name:<{width}} {size:>5} {speeds[size]:>9,.0f} {record['step_ms']:>8.1f} "
                  f"{record['compute_ms']:>10.1f} {record['wait_ms']:>8.2f} {record['allreduce_ms']:>12.2f} "
                  f"{record['update_ms']:>9.1f} "
                  f"{record['gradient_bytes'] / 1e6:>8.1f} {verdict:>8} {busy_speeds[size]:>10,.0f} {busy_up:>6}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "args": vars(args) | {"json": str(args.json)},
                                         "records": results}, indent=1))


if __name__ == "__main__":
    main()
