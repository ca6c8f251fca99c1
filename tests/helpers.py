"""Helpers shared by several test modules (pytest puts this folder on sys.path)."""

import hashlib
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from charlm.checkpoint import CHECKSUMS_FILE


def rewrite_checksums(folder: Path) -> None:
    """Re-sign a deliberately edited checkpoint, as a careless or hostile author would, so the check under
    test is not the checksum's."""
    manifest = json.loads((folder / CHECKSUMS_FILE).read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(manifest))


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`charlm serve CHECKPOINT` in a child process on a free loopback port; `url` is its base address."""

    def __init__(self, checkpoint, *flags: str, startup_seconds: float = 90.0):
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "charlm", "serve", str(checkpoint), "--port", str(self.port), *flags],
            stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + startup_seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited at start:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the server did not start in time") from None
                time.sleep(0.1)

    def stop(self) -> str:
        """Terminate (SIGTERM) and wait; returns everything the server printed."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.output()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()


def write_word_corpus(path: Path, lines: int) -> Path:
    """A small corpus of random ten-word lines over a fixed 16-word vocabulary, the same for a given size."""
    rng = random.Random(0)
    words = "a stitch in time saves nine but the early bird gets the worm while cats sleep".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(lines)) + "\n")
    return path
