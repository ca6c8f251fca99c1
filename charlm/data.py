"""Token ids -> training windows: an on-disk cache of encoded ids, and truncated-BPTT batches.

Ids are encoded once per (text, tokenizer) and kept in cache_dir()/ids as a flat file of ids in the
smallest dtype that fits the vocabulary plus a JSON index (dtype, count), as Megatron's .bin/.idx; they
are memory-mapped, so a corpus of any size is never held in memory, and later runs skip encoding; a
tokenizer trained on a corpus split is kept beside them, so later runs skip counting too. BatchStream cuts the
ids into `batch_size` contiguous streams (pytorch/examples' `batchify`) and walks them in windows of
`seq_len` steps; the hidden state carries from one window to the next and is reset only when an epoch
starts, which each window reports. Or it samples every window's rows at random places in the corpus
(nanoGPT's `get_batch`), each starting from a zero state: batches are then independent draws.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tokenizers

from charlm.corpus import TextSpan, cache_dir, map_chunks
from charlm.errors import ConfigError, CorpusError, TokenizerError, require_int
from charlm.tokenize import DEFAULT_BPE_SAMPLE_BYTES, Tokenizer, train_tokenizer

RANDOM_LENGTH_STD = 5.0
RANDOM_LENGTH_FULL_PROB = 0.95
MIN_RANDOM_LENGTH = 2
SAMPLINGS = ("streams", "random")
REPORTED_ENCODE_BYTES = 1 << 24  # smaller texts encode in a blink: not worth a line
ID_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32))


def encode_cached(tokenizer: Tokenizer, source: str | TextSpan, key: str | None = None, unknown: str = "error",
                  *, verbose: bool = False) -> np.ndarray:
    """Ids of `source`, read-only and memory-mapped from the cache, in the tokenizer's `id_dtype`.

    `key` must identify the text exactly (e.g. `CorpusSplits.cache_key("train")`); without it a string
    is hashed, a span keyed by its file's size, time and place. A span is encoded chunk by chunk on
    every core (`map_chunks`) and written straight to the cache file, so neither its text nor all of
    its ids are ever in memory; `verbose` prints what encoding a big span cost.
    """
    if key is None:
        key = "sha256:" + hashlib.sha256(source.encode("utf-8")).hexdigest() if isinstance(source, str) \
            else f"file:{_file_identity(source)}"
    digest = hashlib.sha256("\0".join([key, unknown, tokenizer.to_json()]).encode("utf-8")).hexdigest()
    path = cache_dir() / "ids" / f"{digest}.bin"
    cached = _load_entry(path)
    if cached is not None:
        return cached
    if isinstance(source, str):
        pieces = iter([tokenizer.encode(source, unknown=unknown).astype(tokenizer.id_dtype)])
        size = len(source)
    else:
        def encode(data: bytes) -> np.ndarray:
            return tokenizer.encode_utf8(data, unknown=unknown)
        pieces = map_chunks(source, encode, desc=f"encoding ({tokenizer.kind})")
        size = source.size
    started = time.monotonic()
    tokens = _write_entry(path, pieces, tokenizer.id_dtype)
    seconds = time.monotonic() - started
    if verbose and not isinstance(source, str) and size >= REPORTED_ENCODE_BYTES:
        print(f"encoded {size / 1e6:,.1f} MB into {tokens:,} {tokenizer.kind} tokens ({tokenizer.id_dtype.name}) "
              f"in {seconds:.1f} s ({size / 1e6 / max(seconds, 1e-9):,.0f} MB/s)", file=sys.stderr)
    return _load_entry(path) if tokens else np.zeros(0, dtype=tokenizer.id_dtype)


def train_tokenizer_cached(kind: str, source: TextSpan, key: str, vocab_size: int | None = None,
                           bpe_sample_bytes: int = DEFAULT_BPE_SAMPLE_BYTES) -> Tokenizer:
    """`train_tokenizer` on a corpus split, kept in cache_dir()/tokenizers under `key` (e.g.
    `CorpusSplits.cache_key("train")`) and the settings, so a second run on the same corpus skips the
    counting pass as it skips encoding."""
    settings = [key, kind, repr(vocab_size), repr(bpe_sample_bytes) if kind == "bpe" else "", tokenizers.__version__]
    digest = hashlib.sha256("\0".join(settings).encode("utf-8")).hexdigest()
    path = cache_dir() / "tokenizers" / f"{digest}.json"
    try:
        return Tokenizer.from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, TokenizerError):
        pass  # missing or damaged: trained again below
    tokenizer = train_tokenizer(kind, source, vocab_size, bpe_sample_bytes=bpe_sample_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text_atomically(path, tokenizer.to_json())
    return tokenizer


def _file_identity(span: TextSpan) -> str:
    stat = os.stat(span.path)
    return f"{os.path.abspath(span.path)}:{stat.st_size}:{stat.st_mtime_ns}:{span.start}:{span.end}:{span.errors}"


def _load_entry(path: Path) -> np.ndarray | None:
    """The ids of a complete cache entry (raw ids + a JSON index naming dtype and count), or None.
    A damaged entry is rebuilt, never trusted."""
    index = path.with_suffix(".json")
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        dtype, tokens = np.dtype(meta["dtype"]), int(meta["tokens"])
        if dtype not in ID_DTYPES or path.stat().st_size != tokens * dtype.itemsize or tokens == 0:
            return None
        return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_entry(path: Path, pieces: Iterator[np.ndarray], dtype: np.dtype) -> int:
    """Append each piece of ids to a temporary file beside `path`, then rename it and write the index
    last (its presence marks the entry complete); returns the number of ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".bin.part")
    tokens = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for ids in pieces:
                out.write(np.ascontiguousarray(ids, dtype=dtype).data)
                tokens += len(ids)
            out.flush()
            os.fsync(out.fileno())
        if tokens:
            os.replace(tmp_name, path)
            _write_text_atomically(path.with_suffix(".json"),
                                   json.dumps({"dtype": np.dtype(dtype).name, "tokens": tokens}))
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return tokens


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
