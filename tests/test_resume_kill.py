"""Real `charlm train` processes, interrupted for real: SIGKILL at a random step then --resume must end with
bit-identical weights and the same metrics log as an uninterrupted run; SIGINT/SIGTERM save, say where the
checkpoint is and how to resume, and exit 130/143."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.numpy

from helpers import write_word_corpus
from charlm.checkpoint import MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, load_checkpoint
from charlm.train import METRICS_FILE, VOLATILE_METRIC_KEYS

STEPS = 16
WAIT_SECONDS = 120


def train_command(corpus: Path, out: Path, *extra: str) -> list[str]:
    """A tiny model with dropout and random window lengths, so every RNG and the data cursor must resume."""
    return [
        sys.executable, "-m", "charlm", "train", "--corpus", str(corpus), "--out", str(out),
        "--layers", "2", "--hidden", "12", "--embed", "8", "--dropout", "0.3", "--seq-len", "12",
        "--batch-size", "3", "--random-length", "--lr", "0.01", "--warmup", "4", "--max-steps", str(STEPS),
        "--eval-every", "5", "--log-every", "1", "--seed", "7", *extra,
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A generated corpus, a private cache for all the processes, and one uninterrupted reference run."""
    root = tmp_path_factory.mktemp("resume")
    corpus = write_word_corpus(root / "corpus.txt", 150)
    env = {**os.environ, "CHARLM_CACHE": str(root / "cache")}
    reference = root / "reference"
    finished = subprocess.run(train_command(corpus, reference, "--checkpoint-every", "5"), env=env,
                              capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert finished.returncode == 0, finished.stderr
    return corpus, env, reference


def wait_for_step(out: Path, step: int, process: subprocess.Popen) -> int:
    """Poll last/trainer_state.json (skipping moments when a save is swapping folders) until `step`."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        try:
            saved = json.loads((out / "last" / TRAINER_STATE_FILE).read_text())["step"]
        except (OSError, ValueError, KeyError):
            saved = -1
        if saved >= step:
            return saved
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint at step {step} within {WAIT_SECONDS}s")


def stable_metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the fields that measure the machine (timings), which no two runs share."""
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE_METRIC_KEYS} for r in records]


def assert_same_run(out: Path, reference: Path) -> None:
    """Weights, Adam moments and carried hidden state bit for bit, best/ too, and the same metrics."""
    for folder, name in (("last", MODEL_FILE), ("last", OPTIMIZER_FILE), ("best", MODEL_FILE)):
        resumed = safetensors.numpy.load_file(out / folder / name)
        expected = safetensors.numpy.load_file(reference / folder / name)
        assert sorted(resumed) == sorted(expected)
        for key in expected:
            assert resumed[key].dtype == expected[key].dtype
            assert resumed[key].tobytes() == expected[key].tobytes(), f"{folder}/{name}: {key} differs"
    assert load_checkpoint(out / "last").trainer_state["step"] == STEPS
    assert stable_metrics(out) == stable_metrics(reference)


@pytest.mark.parametrize("checkpoint_every", [1, 4])
def test_sigkill_at_random_step_then_resume_is_bit_identical(workspace, tmp_path, checkpoint_every):
    corpus, env, reference = workspace
    # A save must fall at or after kill_after and before the last step, else the run is complete when killed.
    kill_after = random.randrange(1, STEPS - max(2, checkpoint_every))
    out = tmp_path / "run"
    command = train_command(corpus, out, "--checkpoint-every", str(checkpoint_every))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(out, kill_after, process)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before SIGKILL after step {kill_after}"
    killed_at = load_checkpoint(out / "last").trainer_state["step"]
    assert kill_after <= killed_at < STEPS

    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {killed_at}" in resumed.stderr
    assert_same_run(out, reference)


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_explains_and_resumes_exactly(workspace, tmp_path, signum, exit_code):
    corpus, env, reference = workspace
    out = tmp_path / "run"
    command = train_command(corpus, out, "--checkpoint-every", "5")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(out, 5, process)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=WAIT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    stopped_at = load_checkpoint(out / "last").trainer_state["step"]
    assert stopped_at < STEPS
    assert f"interrupted at step {stopped_at}; checkpoint saved to {out / 'last'}" in stderr
    assert "--resume" in stderr
    if signum == signal.SIGINT:  # resuming after SIGTERM is the same path; once keeps the suite short
        resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True,
                                 timeout=WAIT_SECONDS)
        assert resumed.returncode == 0, resumed.stderr
        assert_same_run(out, reference)
