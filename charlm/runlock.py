"""One writer per run folder: an advisory lock on a file inside it, held for the whole run.

The lock is `fcntl.flock` on an open file, so the kernel drops it when the process ends however it ends
(a crash or SIGKILL leaves no stale lock); the holder's PID written inside the file is only for the
message a second writer sees.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from charlm.errors import ConfigError

LOCK_FILE = "train.lock"


class RunLock:
    """Context manager: exclusive use of `folder` (created if missing) for writing a run; a ConfigError
    naming the holder's PID if another process has it. A folder that the lock alone created is removed
    again on exit if nothing else was written to it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._handle = None
        self._created_folder = False

    def __enter__(self) -> RunLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"--out {self.folder} is a file, not a folder")
        self._created_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot create --out {self.folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(f"{self.folder} is being written by another charlm process (PID {holder}); "
                              "wait for it to finish or stop it, or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is None:
            return
        if self._created_folder and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            try:
                self.folder.rmdir()
            except OSError:
                pass  # someone wrote to it meanwhile: theirs now
        self._handle.close()
        self._handle = None
