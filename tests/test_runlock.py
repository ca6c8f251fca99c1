"""One writer per run folder: a second trainer is refused with the first one's PID, and the lock of a
killed trainer does not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from charlm.errors import ConfigError
from charlm.runlock import LOCK_FILE, RunLock
from test_cli_errors import TINY_RUN, user_error, write_corpus

HOLD_LOCK = ("import sys, time; from charlm.runlock import RunLock; lock = RunLock(sys.argv[1]).__enter__(); "
             "print('locked', flush=True); time.sleep(120)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run; killed with SIGKILL at the end of the test."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_a_second_writer_is_refused_naming_the_first_ones_pid(tmp_path, holder):
    with pytest.raises(ConfigError, match=rf"being written by another charlm process \(PID {holder.pid}\)"):
        with RunLock(tmp_path / "run"):
            pass
    assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(holder.pid)


@pytest.mark.parametrize("extra", [[], ["--force"], ["--resume"]])
def test_charlm_train_into_a_folder_being_written_refuses(tmp_path, holder, extra):
    corpus = write_corpus(tmp_path / "corpus.txt")
    message = user_error("train", "--corpus", corpus, "--out", tmp_path / "run", *TINY_RUN, *extra)
    assert f"PID {holder.pid}" in message
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing written, nothing removed


def test_the_lock_of_a_killed_process_does_not_block(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path / "run") as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


def test_the_lock_is_released_on_exit_and_an_unused_folder_removed(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(ConfigError, match=rf"PID {os.getpid()}"):
            RunLock(tmp_path / "run").__enter__()  # a second open file in the same process is refused too
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept"):
        (tmp_path / "kept" / "metrics.jsonl").write_text("")
    with RunLock(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept" / "metrics.jsonl").exists()


def test_a_file_in_the_way_is_a_config_error(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file"):
        RunLock(tmp_path / "run").__enter__()
