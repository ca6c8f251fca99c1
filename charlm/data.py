"""Token ids -> training windows: an on-disk cache of encoded ids, and truncated-BPTT batches.

Ids are encoded once per (text, tokenizer) and kept as a memory-mapped .npy in cache_dir()/ids, so a
large corpus is not held as text and ids at once and later runs skip encoding. BatchStream cuts the
ids into `batch_size` contiguous streams (pytorch/examples' `batchify`) and walks them in windows of
`seq_len` steps; the hidden state carries from one window to the next and is reset only when an epoch
starts, which each window reports. Or it samples every window's rows at random places in the corpus
(nanoGPT's `get_batch`), each starting from a zero state: batches are then independent draws.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from charlm.corpus import cache_dir
from charlm.errors import ConfigError, CorpusError, require_int
from charlm.tokenize import Tokenizer

RANDOM_LENGTH_STD = 5.0
RANDOM_LENGTH_FULL_PROB = 0.95
MIN_RANDOM_LENGTH = 2
SAMPLINGS = ("streams", "random")


def encode_cached(tokenizer: Tokenizer, text: str, key: str | None = None, unknown: str = "error") -> np.ndarray:
    """Ids of `text`, read-only and memory-mapped from the cache (uint16, or uint32 for vocabularies
    over 65,536). `key` must identify the text exactly (e.g. `CorpusSplits.cache_key("train")`); without
    it the text itself is hashed."""
    text_id = key if key is not None else "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    digest = hashlib.sha256("\0".join([text_id, unknown, tokenizer.to_json()]).encode("utf-8")).hexdigest()
    path = cache_dir() / "ids" / f"{digest}.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            pass  # a damaged cache entry is rebuilt below, never trusted
    ids = tokenizer.encode(text, unknown=unknown)
    if ids.size == 0:
        return ids
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    _save_atomically(path, ids.astype(dtype))
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _save_atomically(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npy.part")
    try:
        with os.fdopen(fd, "wb") as out:
            np.save(out, array, allow_pickle=False)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


class Window(NamedTuple):
    """inputs and targets: (T, B) int32, C-contiguous, targets one step ahead of inputs;
    reset_state: the rows do not continue the previous window's (a new epoch, or random sampling), so
    the trainer starts this window from a zero state."""

    inputs: np.ndarray
    targets: np.ndarray
    reset_state: bool


class BatchStream:
    """`batch_size` contiguous streams over `ids`, read in windows of `seq_len` steps; or, with
    sampling="random", windows whose rows start at uniformly random places (an epoch is then as many
    windows as the streams would make).

    With `random_length`, each window's length is drawn as in AWD-LSTM: N(seq_len, 5) with probability
    0.95, else N(seq_len / 2, 5), at least 2 and at most `max_seq_len` (seq_len + 15). The last window
    of an epoch is shorter when the streams run out, so an epoch covers every target exactly once.
    `state_dict()` captures the cursor and random state: a restored stream yields the same windows.

    rows=(first, stop): yield only those rows of every window (this process's share of a batch split among
    processes); the cursor, random draws and state stay those of the whole batch.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, random_length: bool = False,
                 sampling: str = "streams", seed: int = 0, rows: tuple[int, int] | None = None):
        require_int("batch_size", batch_size)
        require_int("seq_len", seq_len)
        if sampling not in SAMPLINGS:
            raise ConfigError(f"window sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        if random_length and seq_len < MIN_RANDOM_LENGTH:
            raise ConfigError(f"seq_len must be at least {MIN_RANDOM_LENGTH} with random window lengths")
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} of {ids.dtype}")
        steps = len(ids) // batch_size
        if steps < seq_len + 1:
            raise CorpusError(
                f"corpus has {len(ids)} tokens, but one batch window needs batch_size {batch_size} x "
                f"(seq_len {seq_len} + 1) = {batch_size * (seq_len + 1)}; use a smaller batch or window"
            )
        self.batch_size = batch_size
        self.rows = (0, batch_size) if rows is None else rows
        if not 0 <= self.rows[0] < self.rows[1] <= batch_size:
            raise ValueError(f"rows {self.rows} are not a share of a batch of {batch_size}")
        self.seq_len = seq_len
        self.random_length = random_length
        self.sampling = sampling
        self.max_seq_len = seq_len + int(3 * RANDOM_LENGTH_STD) if random_length else seq_len
        self._num_tokens = len(ids)
        self._ids = ids
        self._streams = ids[: steps * batch_size].reshape(batch_size, steps)[self.rows[0]:self.rows[1]]
        self._steps = steps
        self._rng = np.random.default_rng(seed)
        self.current_epoch = 0
        self.position = 0

    @property
    def windows_per_epoch(self) -> int:
        """Exact for fixed lengths; with random lengths, the count at the mean length seq_len."""
        return math.ceil((self._steps - 1) / self.seq_len)

    def next_window(self) -> Window:
        start = self.position
        length = min(self._window_length(), self._steps - 1 - start)
        if self.sampling == "random":
            row_starts = self._rng.integers(0, self._num_tokens - length, self.batch_size)[self.rows[0]:self.rows[1]]
            spans = self._ids[row_starts[None, :] + np.arange(length + 1)[:, None]].astype(np.int32)
            inputs, targets = np.ascontiguousarray(spans[:-1]), np.ascontiguousarray(spans[1:])
        else:
            inputs = np.ascontiguousarray(self._streams[:, start:start + length].T, dtype=np.int32)
            targets = np.ascontiguousarray(self._streams[:, start + 1:start + length + 1].T, dtype=np.int32)
        reset_state = start == 0 or self.sampling == "random"
        self.position = start + length
        if self.position >= self._steps - 1:
            self.position = 0
            self.current_epoch += 1
        return Window(inputs, targets, reset_state)

    def epoch(self) -> Iterator[Window]:
        """The windows left in the current epoch (all of them when it has not started)."""
        while True:
            window = self.next_window()
            yield window
            if self.position == 0:
                return

    def state_dict(self) -> dict:
        """JSON-able cursor: epoch, position and random state, plus the shape it is valid for."""
        return {
            "epoch": self.current_epoch,
            "position": self.position,
            "rng": self._rng.bit_generator.state,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "random_length": self.random_length,
            "sampling": self.sampling,
            "num_tokens": self._num_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = {"sampling": "streams", **state}  # states saved before random sampling existed
        for name, current in (("batch_size", self.batch_size), ("seq_len", self.seq_len),
                              ("random_length", self.random_length), ("sampling", self.sampling),
                              ("num_tokens", self._num_tokens)):
            if saved.get(name) != current:
                raise ConfigError(
                    f"cannot resume the batch stream: {name} was {saved.get(name)!r}, now {current!r}"
                )
        position = state["position"]
        if not 0 <= position < self._steps - 1:
            raise ConfigError(f"cannot resume the batch stream: position {position} is outside the data")
        self.current_epoch = int(state["epoch"])
        self.position = int(position)
        self._rng.bit_generator.state = state["rng"]

    def _window_length(self) -> int:
        if not self.random_length:
            return self.seq_len
        mean = self.seq_len if self._rng.random() < RANDOM_LENGTH_FULL_PROB else self.seq_len / 2
        length = int(round(self._rng.normal(mean, RANDOM_LENGTH_STD)))
        return min(max(length, MIN_RANDOM_LENGTH), self.max_seq_len)
