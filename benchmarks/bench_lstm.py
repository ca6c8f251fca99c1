"""Speed benchmark: charlm against PyTorch on the same LSTM language models, interleaved step by step.

    python benchmarks/bench_lstm.py                    # charlm only
    python benchmarks/bench_lstm.py --vs-torch         # side by side, charlm/PyTorch ratios
    python benchmarks/bench_lstm.py --vs-torch --json bench.json --configs char-512 --tasks train

Tasks (medians of per-step times; warm-up repetitions discarded):
  train     one truncated-BPTT window of (T, B) tokens: forward + backward + Adam step, state carried
  eval      forward only (loss), B=32, T=128, state carried; the weights are fixed for the whole phase,
            as in an evaluation pass (charlm packs them once, as `charlm eval` does)
  generate  batch 1, one token at a time: every layer + decoder + softmax sampling, in ms/token

The machine is shared and noisy, so both libraries run in the same process and take turns: each repetition
runs one charlm step and one PyTorch step, alternating which goes first. Every call starts --settle seconds
(default 0.02) after the previous one returned: PyTorch's OpenMP threads spin for ~10 ms of CPU after each
call, and without the pause the next charlm call shared the cores with them (charlm's threads block at once).

FLOP accounting (nominal dense model FLOPs, the same for both libraries):
  forward FLOPs/token = 2 * sum over layers of 4H * (In + H)  +  2 * H * V      (In = E for layer 0, else H)
  training FLOPs/token = 3 * forward (forward + backward)
The first layer's input projection is counted even though charlm replaces it by a table lookup: it is the
same model, so the faster formulation shows up as a higher achieved rate. Achieved GFLOP/s = FLOPs/token *
tokens/s; its share of peak divides by a float32 GEMM (numpy, 4096x576 @ 576x2048) timed in the same run at
the same thread count, before and after the benchmark.

Peak RSS is measured per (config, task, library) in a child process that loads only that library, so
neither pollutes the other (VmHWM of the child; ru_maxrss would inherit the parent's peak across exec).

Every ratio is "how many times better charlm is": > 1 means charlm wins (speed: faster; RSS: smaller).

The header names the machine: CPU model, the ISA charlm compiles for and its tile shapes, the L2/L3 sizes,
and the memory read bandwidth (a streaming sum over a buffer several times the L3, on --threads threads).
Batch-1 generation reads every weight once per token: where the weights exceed the L3, that bandwidth is
its limit, and the table gives the share of it achieved. `--isa avx2` restricts all three libraries to
AVX2 (Numba/LLVM, PyTorch's oneDNN and ATen kernels, numpy's OpenBLAS), so an AVX-512 machine measures
both ISAs in one sitting; the libraries read these settings when they load, so the script re-executes
itself with them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# charlm before numpy, as in the `charlm` command: its import picks OpenBLAS's kernels (see charlm/__init__.py).
import charlm  # noqa: F401
import numpy as np

TASKS = ("train", "eval", "generate")
# The environment that restricts each library to one ISA, read when it loads: Numba's target CPU (with its
# own features: NUMBA_CPU_NAME alone keeps the host's), PyTorch's oneDNN and ATen kernels, OpenBLAS's.
ISA_ENVIRONMENTS = {
    "avx2": {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2", "OPENBLAS_CORETYPE": "Haswell"},
}
# Generation of weights beyond the L3 is bound by memory bandwidth: its target is this share of it.
BANDWIDTH_SHARE_TARGET = 0.8
EVAL_SEQ_LEN = 128
EVAL_BATCH = 32
LEARNING_RATE = 1e-3
GEMM_SHAPE = (4096, 576, 2048)

# Issue 2 targets: the minimum charlm/PyTorch ratio per task, and the training share of GEMM peak.
SPEED_TARGETS = {
    ("char-256", "train"): 1.0,
    ("char-512", "train"): 1.0,
    ("bpe-512", "train"): 1.15,
    ("char-256", "eval"): 1.0,
    ("char-512", "eval"): 1.0,
    ("bpe-512", "eval"): 1.0,
    ("char-256", "generate"): 10.0,
    ("char-512", "generate"): 10.0,
    ("bpe-512", "generate"): 10.0,
}
TRAIN_PEAK_SHARE_TARGETS = {"char-512": 0.85}


@dataclass(frozen=True)
class BenchConfig:
    """One model shape and its training window (T steps of B parallel streams)."""

    name: str
    vocab_size: int
    embed_dim: int
    hidden_size: int
    num_layers: int
    seq_len: int
    batch_size: int

    def forward_flops_per_token(self) -> int:
        recurrent = sum(
            4 * self.hidden_size * ((self.embed_dim if layer == 0 else self.hidden_size) + self.hidden_size)
            for layer in range(self.num_layers)
        )
        return 2 * recurrent + 2 * self.hidden_size * self.vocab_size

    def flops_per_token(self, task: str) -> int:
        return 3 * self.forward_flops_per_token() if task == "train" else self.forward_flops_per_token()

    def generation_weight_bytes(self, tokens: int) -> int:
        """float32 weight bytes one batch-1 token reads: every layer's W_ih and W_hh and the decoder; layer 0's
        W_ih is a row of its precomputed table instead when generating at least V tokens (as charlm does)."""
        matrices = self.hidden_size * self.vocab_size
        for layer in range(self.num_layers):
            inputs = self.embed_dim if layer == 0 else self.hidden_size
            if layer > 0 or tokens < self.vocab_size:
                matrices += 4 * self.hidden_size * inputs
            matrices += 4 * self.hidden_size * self.hidden_size
        return 4 * matrices


NAMED_CONFIGS = {
    c.name: c
    for c in (
        BenchConfig("char-256", 65, 64, 256, 2, 64, 32),
        BenchConfig("char-512", 65, 128, 512, 2, 128, 32),
        BenchConfig("bpe-512", 8000, 256, 512, 2, 64, 32),
    )
}
SPEC_PATTERN = re.compile(r"V(\d+)-E(\d+)-H(\d+)-L(\d+)-T(\d+)-B(\d+)")


def parse_config(name: str) -> BenchConfig:
    """A named config, or an ad-hoc shape spelled like `V65-E16-H32-L2-T16-B4` (its own name)."""
    if name in NAMED_CONFIGS:
        return NAMED_CONFIGS[name]
    match = SPEC_PATTERN.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown config {name!r}: use one of {', '.join(NAMED_CONFIGS)} or V65-E16-H32-L2-T16-B4")
    return BenchConfig(name, *(int(g) for g in match.groups()))


@dataclass
class Workload:
    """Random token ids shared by both libraries, so they see exactly the same data."""

    train_inputs: list[np.ndarray]
    train_targets: list[np.ndarray]
    eval_inputs: list[np.ndarray]
    eval_targets: list[np.ndarray]
    prompt: list[int]

    @classmethod
    def random(cls, config: BenchConfig, seed: int = 0, windows: int = 4) -> Workload:
        rng = np.random.default_rng(seed)

        def stream(seq_len: int, batch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
            ids = rng.integers(0, config.vocab_size, size=(windows * seq_len + 1, batch), dtype=np.int32)
            inputs = [ids[w * seq_len : (w + 1) * seq_len].copy() for w in range(windows)]
            targets = [ids[w * seq_len + 1 : (w + 1) * seq_len + 1].copy() for w in range(windows)]
            return inputs, targets

        train_inputs, train_targets = stream(config.seq_len, config.batch_size)
        eval_inputs, eval_targets = stream(EVAL_SEQ_LEN, EVAL_BATCH)
        prompt = [int(t) for t in rng.integers(0, config.vocab_size, size=8)]
        return cls(train_inputs, train_targets, eval_inputs, eval_targets, prompt)


class CharlmRunner:
    """charlm through its public API: forward/backward, AdamW, generate_ids."""

    library = "charlm"

    def __init__(self, config: BenchConfig, workload: Workload, dropout: float, gen_tokens: int) -> None:
        from charlm.config import ModelConfig
        from charlm.model import LSTMLanguageModel
        from charlm.optim import AdamW

        model_config = ModelConfig(
            vocab_size=config.vocab_size,
            embed_dim=config.embed_dim,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=dropout,
        )
        self.model = LSTMLanguageModel(model_config, seed=0)
        self.optimizer = AdamW(self.model.params, lr=LEARNING_RATE)
        self.workload = workload
        self.gen_tokens = gen_tokens
        self.rng = np.random.default_rng(0)
        self.train_state = self.model.zero_state(config.batch_size)
        self.eval_state = self.model.zero_state(EVAL_BATCH)
        self.train_window = 0
        self.eval_window = 0
        self.gen_seed = 0

    def train(self) -> float:
        w = self.train_window % len(self.workload.train_inputs)
        self.train_window += 1
        start = time.perf_counter()
        _, self.train_state = self.model.forward(
            self.workload.train_inputs[w], self.workload.train_targets[w], self.train_state, train=True, rng=self.rng
        )
        grads, _ = self.model.backward()
        self.optimizer.step(grads, LEARNING_RATE)
        return time.perf_counter() - start

    def phase(self, task: str):
        """Evaluation holds the weights fixed, so it packs them once, as evaluate_ids does for `charlm eval`."""
        return self.model.frozen_weights() if task == "eval" else contextlib.nullcontext()

    def eval(self) -> float:
        w = self.eval_window % len(self.workload.eval_inputs)
        self.eval_window += 1
        start = time.perf_counter()
        _, self.eval_state = self.model.forward(
            self.workload.eval_inputs[w], self.workload.eval_targets[w], self.eval_state, train=False
        )
        return time.perf_counter() - start

    def generate(self) -> float:
        """Seconds for `gen_tokens` tokens after the first (which also reads the prompt)."""
        self.gen_seed += 1
        tokens = self.model.generate_ids(
            np.asarray(self.workload.prompt, dtype=np.int32), self.gen_tokens + 1, temperature=1.0, seed=self.gen_seed
        )
        next(tokens)
        start = time.perf_counter()
        for _ in tokens:
            pass
        return time.perf_counter() - start


class TorchRunner:
    """The same model as PyTorch users write it: nn.Embedding + nn.LSTM + dropout + nn.Linear, Adam."""

    library = "torch"

    def __init__(self, config: BenchConfig, workload: Workload, dropout: float, gen_tokens: int) -> None:
        # Imported here so the charlm side (and its RSS child) never loads torch.
        import torch
        from torch import nn

        self.torch = torch
        torch.manual_seed(0)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_size, num_layers=config.num_layers, dropout=dropout)
        self.output_dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.modules = (self.embedding, self.lstm, self.output_dropout, self.decoder)
        self.optimizer = torch.optim.Adam(
            [p for m in self.modules for p in m.parameters()], lr=LEARNING_RATE
        )
        self.config = config
        self.gen_tokens = gen_tokens
        self.train_inputs = [torch.from_numpy(x).long() for x in workload.train_inputs]
        self.train_targets = [torch.from_numpy(y).long().reshape(-1) for y in workload.train_targets]
        self.eval_inputs = [torch.from_numpy(x).long() for x in workload.eval_inputs]
        self.eval_targets = [torch.from_numpy(y).long().reshape(-1) for y in workload.eval_targets]
        self.prompt = torch.tensor(workload.prompt, dtype=torch.long).reshape(-1, 1)
        self.train_state = None
        self.eval_state = None
        self.train_window = 0
        self.eval_window = 0
        self.generator = torch.Generator().manual_seed(0)

    def phase(self, task: str):
        return contextlib.nullcontext()

    def _set_training(self, training: bool) -> None:
        for module in self.modules:
            module.train(training)

    def _loss(self, inputs, targets, state):
        output, state = self.lstm(self.embedding(inputs), state)
        logits = self.decoder(self.output_dropout(output))
        return self.torch.nn.functional.cross_entropy(logits.reshape(-1, self.config.vocab_size), targets), state

    def train(self) -> float:
        w = self.train_window % len(self.train_inputs)
        self.train_window += 1
        self._set_training(True)
        start = time.perf_counter()
        state = None if self.train_state is None else tuple(s.detach() for s in self.train_state)
        loss, self.train_state = self._loss(self.train_inputs[w], self.train_targets[w], state)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        loss.item()
        return time.perf_counter() - start

    def eval(self) -> float:
        w = self.eval_window % len(self.eval_inputs)
        self.eval_window += 1
        self._set_training(False)
        start = time.perf_counter()
        with self.torch.inference_mode():
            loss, self.eval_state = self._loss(self.eval_inputs[w], self.eval_targets[w], self.eval_state)
            loss.item()
        return time.perf_counter() - start

    def generate(self) -> float:
        """char-rnn style sampling: embed -> LSTM step -> linear -> softmax -> multinomial, hidden carried."""
        torch = self.torch
        self._set_training(False)
        with torch.inference_mode():
            output, state = self.lstm(self.embedding(self.prompt), None)
            token = self._sample(output[-1])
            start = time.perf_counter()
            for _ in range(self.gen_tokens):
                output, state = self.lstm(self.embedding(token), state)
                token = self._sample(output[-1])
            return time.perf_counter() - start

    def _sample(self, hidden):
        probs = self.torch.softmax(self.decoder(hidden), dim=-1)
        token = self.torch.multinomial(probs, 1, generator=self.generator)
        int(token)
        return token


RUNNERS = {"charlm": CharlmRunner, "torch": TorchRunner}


def task_tokens(config: BenchConfig, task: str, gen_tokens: int) -> int:
    if task == "train":
        return config.seq_len * config.batch_size
    if task == "eval":
        return EVAL_SEQ_LEN * EVAL_BATCH
    return gen_tokens


def time_interleaved(runners: list, task: str, reps: int, warmup: int, settle: float = 0.0) -> dict[str, float]:
    """Median seconds per call of `task` for each runner; each repetition alternates who goes first, and every
    call starts `settle` seconds after the one before (see --settle)."""
    times: dict[str, list[float]] = {r.library: [] for r in runners}
    with contextlib.ExitStack() as phases:
        for runner in runners:
            phases.enter_context(runner.phase(task))
        for rep in range(warmup + reps):
            for runner in runners if rep % 2 == 0 else runners[::-1]:
                time.sleep(settle)
                elapsed = getattr(runner, task)()
                if rep >= warmup:
                    times[runner.library].append(elapsed)
    return {library: statistics.median(t) for library, t in times.items()}


def measure_gemm_peak(reps: int = 7) -> list[float]:
    """GFLOP/s of numpy float32 4096x576 @ 576x2048, one figure per repetition (after two warm-ups)."""
    m, k, n = GEMM_SHAPE
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    rates = []
    for rep in range(reps + 2):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        elapsed = time.perf_counter() - start
        if rep >= 2:
            rates.append(2 * m * k * n / elapsed / 1e9)
    return rates


def default_bandwidth_bytes() -> int:
    """A buffer for the bandwidth measurement: four times the L3 (256 MiB where sysfs does not say), so that
    no cache holds a noticeable part of it, but at most a quarter of the memory available."""
    from charlm.kernels.target import caches

    wanted = 4 * (caches().l3 or 64 << 20)
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) << 10 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return wanted
    return min(wanted, available // 4)


def measure_bandwidth(n_bytes: int, reps: int = 5) -> float:
    """Memory read bandwidth in GB/s: a vectorised float32 sum streaming through n_bytes, split across the
    threads charlm may use (charlm.runtime.parallel_chunks); median of reps passes after one warm-up."""
    from numba import njit

    from charlm.runtime import parallel_chunks

    @njit(nogil=True, fastmath=True)
    def stream_sum(values):
        total = np.float32(0.0)
        for i in range(values.shape[0]):  # indexed: LLVM left the `for value in values` form scalar
            total += values[i]
        return total

    buffer = np.ones(n_bytes // 4, np.float32)
    passes = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        parallel_chunks(buffer.size, lambda lo, hi: stream_sum(buffer[lo:hi]))
        if rep:
            passes.append(buffer.nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(passes)


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM), not inherited from the parent that spawned it."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_rss_child(spec: str, args: argparse.Namespace) -> None:
    """Child-process entry: run one library's task a few times and print its peak RSS as JSON."""
    library, config_name, task = spec.split(":")
    if library == "charlm":
        from charlm.runtime import limit_threads

        limit_threads(args.threads)
    else:
        import torch

        torch.set_num_threads(args.threads)
    config = parse_config(config_name)
    runner = RUNNERS[library](config, Workload.random(config), args.dropout, args.gen_tokens)
    with runner.phase(task):
        for _ in range(3):
            getattr(runner, task)()
    if library == "charlm" and "torch" in sys.modules:
        raise RuntimeError("the charlm side imported torch")
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def measure_peak_rss(jobs: list[tuple[str, BenchConfig, str]], args: argparse.Namespace) -> list[float]:
    """Peak RSS in MiB of each (library, config, task), each in its own child process. The children run
    concurrently: CPU contention does not change their peak memory, and it keeps the run short."""
    children = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--rss-child", f"{library}:{config.name}:{task}",
             "--threads", str(args.threads), "--dropout", str(args.dropout), "--gen-tokens", str(args.gen_tokens)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for library, config, task in jobs
    ]
    peaks = []
    for child, (library, config, task) in zip(children, jobs):
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"peak-RSS child for {library} {config.name} {task} failed:\n{stderr}")
        peaks.append(json.loads(stdout.strip().splitlines()[-1])["peak_rss_mib"])
    return peaks


def ratio(charlm: float | None, torch: float | None, higher_is_better: bool) -> float | None:
    if charlm is None or torch is None:
        return None
    return charlm / torch if higher_is_better else torch / charlm


def record(config: str, task: str, metric: str, unit: str, charlm, torch, higher_is_better: bool) -> dict:
    return {
        "config": config, "task": task, "metric": metric, "charlm": charlm, "torch": torch, "unit": unit,
        "ratio": ratio(charlm, torch, higher_is_better),
    }


@dataclass
class TaskResult:
    """Raw measurements of one (config, task): median seconds per call and peak RSS, per library."""

    config: BenchConfig
    task: str
    seconds: dict[str, float]
    peak_rss: dict[str, float]

    def records(self, gen_tokens: int, gemm_peak: float, bandwidth: float, l3_bytes: int | None) -> list[dict]:
        """Speed, achieved GFLOP/s, share of the GEMM peak and peak RSS, as JSON-able records. Generation's
        also carry the weight bytes a token reads, whether they exceed the L3 and the share of the memory
        bandwidth (GB/s) charlm's tokens achieve reading them."""
        name, task = self.config.name, self.task
        tokens = task_tokens(self.config, task, gen_tokens)
        if task == "generate":
            speed = {lib: 1e3 * s / tokens for lib, s in self.seconds.items()}
            speed_record = record(name, task, "speed", "ms/token", speed["charlm"], speed.get("torch"), False)
        else:
            speed = {lib: tokens / s for lib, s in self.seconds.items()}
            speed_record = record(name, task, "speed", "tokens/s", speed["charlm"], speed.get("torch"), True)
        gflops = {lib: self.config.flops_per_token(task) * tokens / s / 1e9 for lib, s in self.seconds.items()}
        share = {lib: g / gemm_peak for lib, g in gflops.items()}
        records = [
            speed_record,
            record(name, task, "gflops", "GFLOP/s", gflops["charlm"], gflops.get("torch"), True),
            record(name, task, "peak_share", "fraction of GEMM peak", share["charlm"], share.get("torch"), True),
            record(name, task, "peak_rss", "MiB", self.peak_rss["charlm"], self.peak_rss.get("torch"), False),
        ]
        if task == "generate":
            weights = self.config.generation_weight_bytes(gen_tokens + 1)
            achieved = weights * tokens / self.seconds["charlm"] / 1e9
            for r in records:
                r.update(weights_bytes=weights, exceeds_l3=l3_bytes is not None and weights > l3_bytes,
                         bandwidth_share=achieved / bandwidth)
        return records


def benchmark_config(config: BenchConfig, args: argparse.Namespace) -> list[TaskResult]:
    """Time every task of one config, interleaving the libraries, then measure each one's peak RSS alone."""
    workload = Workload.random(config)
    libraries = ["charlm", "torch"] if args.vs_torch else ["charlm"]
    runners = [RUNNERS[lib](config, workload, args.dropout, args.gen_tokens) for lib in libraries]
    seconds = {}
    for task in args.tasks:
        seconds[task] = time_interleaved(runners, task, args.reps, args.warmup, args.settle)
        progress = ", ".join(f"{lib} {1e3 * s:.1f} ms" for lib, s in seconds[task].items())
        print(f"{config.name} {task}: median per call {progress}", file=sys.stderr, flush=True)
    del runners
    jobs = [(lib, config, task) for task in args.tasks for lib in libraries]
    peaks = dict(zip(((lib, task) for lib, _, task in jobs), measure_peak_rss(jobs, args)))
    return [
        TaskResult(config, task, seconds[task], {lib: peaks[lib, task] for lib in libraries})
        for task in args.tasks
    ]


def environment(args: argparse.Namespace, bandwidth: float, bandwidth_bytes: int) -> dict:
    import numba
    from threadpoolctl import threadpool_info

    from charlm.kernels import gemm, target

    blas = [
        f"{Path(i['filepath']).parent.name}: {i['internal_api']} {i['version']} "
        f"({i.get('architecture', '?')} kernels, {i['num_threads']} threads)"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]
    machine = target.describe()
    tile = gemm.default_tile()
    env = {
        "cpu": machine["cpu_model"],
        "cpu_model": machine["cpu_model"],
        "llvm_cpu": machine["cpu_name"],
        "isa": machine["isa"],
        "isa_restriction": args.isa,
        "vector_bytes": machine["vector_bytes"],
        "vector_registers": machine["vector_registers"],
        "tile": f"{tile.rows} rows x {tile.panels} panels of {tile.vector_bytes} B",
        "batch1_block": f"{tile.vector_panels} vectors of {tile.vector_bytes} B",
        "l2_bytes": machine["l2_bytes"],
        "l3_bytes": machine["l3_bytes"],
        "bandwidth_gbs": round(bandwidth, 2),
        "bandwidth_buffer_bytes": bandwidth_bytes,
        "cores": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": "; ".join(blas),
        "numba": numba.__version__,
        "dropout": args.dropout,
        "reps": args.reps,
        "warmup": args.warmup,
        "settle": args.settle,
        "gen_tokens": args.gen_tokens,
    }
    if args.vs_torch:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return env


def mib(n_bytes: int | None) -> str:
    return "unknown" if n_bytes is None else f"{n_bytes / (1 << 20):g} MiB"


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def target_verdict(config: str, task: str, speed_ratio: float | None, charlm_share: float,
                   speed_record: dict) -> str:
    """The targets that apply to this row, each marked ok/MISS; generation of weights beyond the L3 may
    meet its target by bandwidth instead."""
    verdicts = []
    target = SPEED_TARGETS.get((config, task))
    if target is not None and speed_ratio is not None:
        met = speed_ratio >= target
        if speed_record.get("exceeds_l3"):
            met = met or speed_record["bandwidth_share"] >= BANDWIDTH_SHARE_TARGET
            verdicts.append(f">={target:g}x or >={BANDWIDTH_SHARE_TARGET:.0%} bandwidth {'ok' if met else 'MISS'}")
        else:
            verdicts.append(f">={target:g}x {'ok' if met else 'MISS'}")
    share_target = TRAIN_PEAK_SHARE_TARGETS.get(config)
    if task == "train" and share_target is not None:
        verdicts.append(f">={share_target:.0%} peak {'ok' if charlm_share >= share_target else 'MISS'}")
    return ", ".join(verdicts)


def format_table(records: list[dict]) -> str:
    by_key = {(r["config"], r["task"], r["metric"]): r for r in records}
    header = (
        "config", "task", "charlm", "torch", "unit", "ratio",
        "charlm GFLOP/s (peak)", "torch GFLOP/s (peak)", "RSS MiB charlm/torch", "weights MB (bandwidth)", "target",
    )
    rows = [header]
    for r in records:
        if r["metric"] != "speed":
            continue
        key = (r["config"], r["task"])
        gflops, share, rss = (by_key[key + (m,)] for m in ("gflops", "peak_share", "peak_rss"))
        rows.append((
            r["config"], r["task"], format_number(r["charlm"]), format_number(r["torch"]), r["unit"],
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
            f"{format_number(gflops['charlm'])} ({share['charlm']:.0%})",
            "-" if gflops["torch"] is None else f"{format_number(gflops['torch'])} ({share['torch']:.0%})",
            f"{rss['charlm']:.0f} / {format_number(rss['torch'])}",
            f"{r['weights_bytes'] / 1e6:.1f} ({r['bandwidth_share']:.0%})" if "weights_bytes" in r else "",
            target_verdict(r["config"], r["task"], r["ratio"], share["charlm"], r),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(NAMED_CONFIGS),
                        help=f"comma-separated: {', '.join(NAMED_CONFIGS)} or a shape like V65-E16-H32-L2-T16-B4")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of train,eval,generate")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per task (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (JIT, caches)")
    parser.add_argument("--threads", type=int, default=2, help="threads for charlm, PyTorch and the GEMM peak")
    parser.add_argument("--dropout", type=float, default=0.0, help="same dropout on both sides")
    parser.add_argument("--gen-tokens", type=int, default=200, help="tokens timed per generation repetition")
    parser.add_argument("--settle", type=float, default=0.02,
                        help="seconds to wait before every timed call, so that it does not share the cores with "
                             "threads still spinning after the other library's call (PyTorch's OpenMP threads "
                             "spin ~10 ms)")
    parser.add_argument("--vs-torch", action="store_true", help="run the same models in PyTorch, interleaved")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON records")
    parser.add_argument("--isa", choices=("native", *ISA_ENVIRONMENTS), default="native",
                        help="restrict charlm, PyTorch and numpy's BLAS to this ISA (native: what the CPU has)")
    parser.add_argument("--bandwidth-mib", type=int,
                        help="buffer for the memory bandwidth measurement (default: 4x the L3, at most a "
                             "quarter of the available memory)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown or not args.tasks:
        parser.error(f"--tasks must be a subset of {','.join(TASKS)}, got {','.join(unknown) or 'nothing'}")
    try:
        args.configs = [parse_config(name) for name in args.configs.split(",") if name]
    except ValueError as exc:
        parser.error(str(exc))
    for name in ("reps", "threads", "gen_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if not 0 <= args.settle <= 1:
        parser.error("--settle must be between 0 and 1 seconds")
    return args


def restrict_isa(isa: str, argv: list[str] | None) -> None:
    """Re-execute this script with the environment that restricts every library to `isa`, unless it has it
    already (numpy, and with it OpenBLAS, has loaded by now; its RSS children inherit the environment)."""
    wanted = ISA_ENVIRONMENTS[isa]
    if all(os.environ.get(name) == value for name, value in wanted.items()):
        return
    sys.stdout.flush()
    command = [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
    os.execve(sys.executable, command, {**os.environ, **wanted})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.isa != "native":
        restrict_isa(args.isa, argv)
    if args.rss_child:
        run_rss_child(args.rss_child, args)
        return
    if args.vs_torch:
        import torch

        torch.set_num_threads(args.threads)
    from charlm.runtime import limit_threads

    limit_threads(args.threads)
    bandwidth_bytes = (args.bandwidth_mib << 20) if args.bandwidth_mib else default_bandwidth_bytes()
    bandwidth = measure_bandwidth(bandwidth_bytes)
    gemm_rates = measure_gemm_peak()
    results = [result for config in args.configs for result in benchmark_config(config, args)]
    gemm_rates += measure_gemm_peak()
    gemm_peak = statistics.median(gemm_rates)
    env = environment(args, bandwidth, bandwidth_bytes)
    records = [r for result in results for r in result.records(args.gen_tokens, gemm_peak, bandwidth, env["l3_bytes"])]
    print(f"CPU: {env['cpu_model']} (LLVM: {env['llvm_cpu']}), {env['cores']} cores; L2 {mib(env['l2_bytes'])} per "
          f"core, L3 {mib(env['l3_bytes'])}")
    print(f"charlm ISA: {env['isa']} ({env['vector_registers']} vector registers of {env['vector_bytes']} B"
          f"{', restricted by --isa ' + args.isa if args.isa != 'native' else ''}); tile {env['tile']}, "
          f"batch-1 blocks of {env['batch1_block']}")
    print(f"memory read bandwidth ({args.threads} threads, streaming sum over {mib(bandwidth_bytes)}): "
          f"{bandwidth:.1f} GB/s")
    print(", ".join(f"{k}: {v}" for k, v in env.items()))
    print(f"float32 GEMM peak ({'x'.join(map(str, GEMM_SHAPE))}, numpy, {args.threads} threads, median of "
          f"{len(gemm_rates)} before+after): {gemm_peak:.1f} GFLOP/s")
    print(f"dropout {args.dropout:g} on both sides; medians of {args.reps} interleaved reps after {args.warmup} "
          f"warm-up, each call {1e3 * args.settle:g} ms after the last; ratio > 1 = charlm better")
    print(format_table(records))
    if args.json:
        payload = {"environment": env, "gemm_peak_gflops": gemm_peak, "records": records}
        with open(args.json, "w") as out:
            json.dump(payload, out, indent=2)


if __name__ == "__main__":
    main()
