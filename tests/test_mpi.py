"""Data-parallel training under a real `mpiexec` (the MPI wheel's, next to this Python): 2 processes compute
what 1 does, a run stopped on 2 resumes on 1, SIGINT saves once, and a killed process ends the job."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from helpers import write_word_corpus
from charlm.checkpoint import MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, load_checkpoint
from charlm.config import ModelConfig, TrainConfig
from charlm.model import param_shapes
from charlm.train import METRICS_FILE, train

pytest.importorskip("mpi4py", reason="data-parallel training needs mpi4py: pip install 'charlm[mpi]'")

TOLERANCE = 1e-5
WAIT_SECONDS = 120
# Dropout (its masks must be the whole batch's), random window lengths (the data order), a carried state, and
# validation on a sample of the split's rows (shared out among the processes).
OPTIONS = dict(num_layers=2, hidden_size=16, embed_dim=8, dropout=0.3, seq_len=12, batch_size=4,
               random_length=True, lr=1e-2, warmup_steps=4, eval_every=10, eval_tokens=400, checkpoint_every=5,
               log_every=1, seed=7)


def mpiexec() -> str:
    """The mpiexec installed beside this Python (the mpich wheel's), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    assert found, "mpi4py is installed but no mpiexec was found beside Python or on PATH"
    return found


def flags(options: dict) -> list[str]:
    names = {"num_layers": "layers", "hidden_size": "hidden", "embed_dim": "embed", "warmup_steps": "warmup"}
    args = []
    for name, value in options.items():
        flag = "--" + names.get(name, name).replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def mpi_command(processes: int, corpus: Path, out: Path, *extra: str, **options) -> list[str]:
    return [mpiexec(), "-n", str(processes), sys.executable, "-m", "mpi4py", "-m", "charlm", "train",
            "--corpus", str(corpus), "--out", str(out), *flags({**OPTIONS, **options}), *extra]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A generated corpus, a cache private to this module's processes, and a 1-process reference run."""
    root = tmp_path_factory.mktemp("mpi")
    corpus = write_word_corpus(root / "corpus.txt", 300)
    env = {**os.environ, "CHARLM_CACHE": str(root / "cache")}
    reference = root / "reference"
    finished = subprocess.run([sys.executable, "-m", "charlm", "train", "--corpus", str(corpus), "--out",
                               str(reference), *flags({**OPTIONS, "max_steps": 40})],
                              env=env, capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert finished.returncode == 0, finished.stderr
    return corpus, env, reference


def losses(out: Path) -> list[tuple[str, int, float]]:
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    return [(r["event"], r["step"], r["loss"]) for r in records]


def assert_same_run(out: Path, reference: Path) -> None:
    """The same loss curve and, within TOLERANCE (absolute, or relative for the larger cell states), the same
    weights, Adam moments and carried state."""
    ran, expected = losses(out), losses(reference)
    assert [r[:2] for r in ran] == [r[:2] for r in expected]
    np.testing.assert_allclose([r[2] for r in ran], [r[2] for r in expected], rtol=0, atol=TOLERANCE)
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        got = safetensors.numpy.load_file(out / "last" / name)
        want = safetensors.numpy.load_file(reference / "last" / name)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=TOLERANCE, atol=TOLERANCE, err_msg=f"{name}: {key}")


def wait_for_step(out: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        try:
            if json.loads((out / "last" / TRAINER_STATE_FILE).read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint at step {step} within {WAIT_SECONDS}s")


def rank_pids(launcher: int) -> dict[int, int]:
    """MPI rank -> process id of the ranks started by the mpiexec with PID `launcher` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    ranks, todo = {}, list(children.get(launcher, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [line.split(b"=", 1)[1] for line in environ if line.startswith(b"PMI_RANK=")]
        if rank and b"charlm" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
            ranks[int(rank[0])] = pid
    return ranks


def test_two_processes_train_what_one_does(workspace, tmp_path):
    corpus, env, reference = workspace
    out = tmp_path / "two"
    finished = subprocess.run(mpi_command(2, corpus, out, max_steps=40), env=env, capture_output=True, text=True,
                              timeout=WAIT_SECONDS)
    assert finished.returncode == 0, finished.stderr
    assert "on 2 processes (2 rows, " in finished.stderr
    assert finished.stderr.count("done (max_steps)") == 1  # rank 0 alone reports
    assert_same_run(out, reference)


def test_sigint_to_mpiexec_saves_once_and_the_run_resumes_on_one_process(workspace, tmp_path):
    corpus, env, reference = workspace
    out = tmp_path / "run"
    process = subprocess.Popen(mpi_command(2, corpus, out, max_steps=40), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(out, 5, process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=WAIT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    stopped_at = load_checkpoint(out / "last").trainer_state["step"]
    assert 5 <= stopped_at < 40
    assert stderr.count(f"interrupted at step {stopped_at}; checkpoint saved to {out / 'last'}") == 1, stderr

    config = TrainConfig.from_dict({"corpus": str(corpus), "out": str(out), "max_steps": 40, **OPTIONS})
    resumed = train(config, resume=True, verbose=False)
    assert resumed.step == 40
    assert_same_run(out, reference)


def test_a_killed_process_ends_the_job_and_the_last_checkpoint_resumes_exactly(workspace, tmp_path):
    corpus, env, reference = workspace
    out = tmp_path / "run"
    command = mpi_command(2, corpus, out, max_steps=40)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(out, 5, process)
        os.kill(rank_pids(process.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        process.communicate(timeout=30)
        ended_after = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode != 0
    assert ended_after < 10, f"the job went on for {ended_after:.1f}s after a process was killed"
    killed_at = load_checkpoint(out / "last", load_optimizer=True).trainer_state["step"]
    assert 5 <= killed_at < 40

    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {killed_at}" in resumed.stderr
    assert_same_run(out, reference)


def test_the_benchmark_runs_and_reports_every_part_of_a_step(tmp_path):
    """bench_mpi.py on a micro model, so the benchmark cannot rot."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mpi.py"
    out = tmp_path / "mpi.json"
    done = subprocess.run([sys.executable, str(script), "--configs", "V65-E16-H32-L2-T16-B4", "--rounds", "1",
                           "--steps", "2", "--warmup", "1", "--json", str(out)], capture_output=True, text=True,
                          timeout=WAIT_SECONDS)
    assert done.returncode == 0, done.stderr
    records = json.loads(out.read_text())["records"]
    assert [r["processes"] for r in records] == [1, 2]
    parameters = sum(math.prod(shape) for shape in param_shapes(
        ModelConfig(vocab_size=65, embed_dim=16, hidden_size=32, num_layers=2)).values())
    for record in records:
        assert record["tokens_per_s"] > 0 and record["step_ms"] >= record["compute_ms"] > 0
        assert record["gradient_bytes"] == 4 * parameters  # one float32 buffer, every parameter once
    assert records[1]["allreduce_ms"] > 0
