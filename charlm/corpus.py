"""Corpus names and paths -> checked train / valid / test spans of text files, read as a stream.

A corpus is a UTF-8 text file (split into train / valid by a contiguous tail), a folder holding
train.txt / valid.txt / test.txt, or a name registered in `charlm.corpora` (corpora/registry.json).
Registered files are looked up in $CHARLM_CORPORA/<name>/, then in cache_dir()/corpora/<name>/, and
downloaded from their original URL into the cache when missing. Every resolve reads each file once in
blocks (sha256, NUL bytes, UTF-8 validity) and keeps only where each split lies, so a corpus of any size
is never held in memory; its text is then read in line-aligned pieces (`TextSpan`, `map_chunks`).
"""

from __future__ import annotations

import bisect
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from charlm.kernels import utf8
from charlm.errors import ConfigError, CorpusError
from charlm.runtime import available_cores

DEFAULT_VALID_FRACTION = 0.1
SPLITS = ("train", "valid", "test")
SPLIT_FILES = ("train.txt", "valid.txt", "test.txt")
DOWNLOAD_TIMEOUT_SECONDS = 30
ERROR_MODES = ("strict", "replace")
SCAN_BLOCK_BYTES = 1 << 24
CHUNK_BYTES = 1 << 22
CUT_WINDOW_BYTES = 1 << 20
SAMPLE_BLOCK_BYTES = 1 << 20
T = TypeVar("T")

# Cut points, tried in order within a window (see `_cut_after`); each regex's match ends at the cut.
_TOKEN_BOUNDARY = re.compile(rb"\n(?= ?\w)")
_AFTER_NEWLINE = re.compile(rb"\n")
_BEFORE_SPACE = re.compile(rb"(?= )")
_CHARACTER_START = re.compile(rb"(?=[^\x80-\xbf])")


@dataclass(frozen=True)
class TextSpan:
    """Bytes [start, end) of a checked UTF-8 file: one split of a corpus, read in pieces, never whole
    unless asked (`read_text`). Pieces end at line boundaries, so no character or word straddles two."""

    path: Path
    start: int
    end: int
    errors: str = "strict"

    @property
    def size(self) -> int:
        return self.end - self.start

    def read_bytes(self, start: int, end: int) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)

    def decode(self, data: bytes) -> str:
        return data.decode("utf-8", errors=self.errors)

    def read_text(self) -> str:
        """The whole span as one string: for small texts and tests, not for corpora of any size."""
        return self.decode(self.read_bytes(self.start, self.end))

    def byte_ranges(self, chunk_bytes: int | None = None) -> list[tuple[int, int]]:
        """Consecutive (start, end) file offsets of about `chunk_bytes` (default CHUNK_BYTES) covering the
        span, each cut where a token cannot straddle the cut (see `_cut_after`)."""
        chunk_bytes = chunk_bytes or CHUNK_BYTES
        if self.size == 0:
            return []
        cuts = [self.start]
        with open(self.path, "rb") as handle:
            while self.end - cuts[-1] > chunk_bytes:
                cut = _cut_after(handle, cuts[-1] + chunk_bytes, self.end)
                if cut >= self.end:
                    break
                cuts.append(cut)
        cuts.append(self.end)
        return list(zip(cuts[:-1], cuts[1:]))

    def sample_ranges(self, sample_bytes: int) -> list[tuple[int, int]]:
        """About `sample_bytes` of the span as evenly spaced blocks (all of it when it is no larger):
        the same blocks every time, so a tokenizer trained on them is reproducible."""
        if self.size <= sample_bytes:
            return self.byte_ranges()
        block_bytes = min(SAMPLE_BLOCK_BYTES, sample_bytes)
        blocks = max(1, sample_bytes // block_bytes)
        stride = self.size // blocks
        ranges = []
        with open(self.path, "rb") as handle:
            for k in range(blocks):
                nominal = self.start + k * stride
                first = self.start if k == 0 else _cut_after(handle, nominal, self.end)
                last = _cut_after(handle, first + block_bytes, self.end)
                if first < last:
                    ranges.append((first, last))
        return ranges

    def chunks(self, ranges: list[tuple[int, int]] | None = None) -> Iterator[str]:
        """The text of `ranges` (default: all of the span), one piece at a time."""
        with open(self.path, "rb") as handle:
            for start, end in ranges if ranges is not None else self.byte_ranges():
                handle.seek(start)
                yield self.decode(handle.read(end - start))


@dataclass(frozen=True)
class CorpusSplits:
    """Where each split's text lies; `checksum` identifies the source bytes and the split rule, for caches."""

    name: str
    train: TextSpan
    valid: TextSpan
    test: TextSpan | None
    checksum: str

    def cache_key(self, split: str) -> str:
        """A key for `encode_cached` that changes whenever this split's text could change."""
        if split not in SPLITS:
            raise ValueError(f"split must be train, valid or test, got {split!r}")
        return f"{self.checksum}:{split}"


@dataclass(frozen=True)
class _FileScan:
    """What one streaming pass over a file learns: its size and sha256, and the code points before each
    block it read (to find a character's byte offset by reading one block)."""

    path: Path
    size: int
    sha256: str
    block_starts: tuple[int, ...]
    chars_before: tuple[int, ...]

    @property
    def chars(self) -> int:
        return self.chars_before[-1]


def cache_dir() -> Path:
    """Where encoded ids and downloads go: never beside a corpus, which may be read-only."""
    override = os.environ.get("CHARLM_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "charlm"


@cache
def registry() -> dict[str, dict]:
    """The registered corpora: name -> files (bytes, sha256, url), split rule, licence."""
    text = resources.files("charlm.corpora").joinpath("registry.json").read_text(encoding="utf-8")
    return json.loads(text)


def read_text(path: str | os.PathLike, errors: str = "strict") -> str:
    """Read a (small) corpus file as UTF-8, refusing what cannot be language-model text."""
    path = Path(path)
    scan = _scan_file(path, errors)
    return TextSpan(path, 0, scan.size, errors).read_text()


def resolve_corpus(
    name_or_path: str | os.PathLike, valid_fraction: float | None = None, errors: str = "strict"
) -> CorpusSplits:
    """Turn a file, a split folder or a registered name into its splits, checking every file in one
    streaming pass (sha256, NUL bytes, UTF-8) without holding it in memory.

    `valid_fraction` splits a single file (default: the registry's rule, else 0.1); folders and
    registered corpora with their own valid file ignore it. `errors="replace"` turns invalid UTF-8
    bytes into U+FFFD instead of failing.
    """
    if valid_fraction is not None and not 0.0 < valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be between 0 and 1, got {valid_fraction!r}")
    if errors not in ERROR_MODES:
        raise ConfigError(f"errors must be one of {', '.join(ERROR_MODES)}, got {errors!r}")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _split_single(path.stem, _scan_file(path, errors), errors, valid_fraction or DEFAULT_VALID_FRACTION)
    if path.is_dir():
        return _resolve_folder(path, valid_fraction, errors)
    name = str(name_or_path)
    if name in registry():
        return _resolve_registered(name, valid_fraction, errors)
    if path.suffix or os.sep in name or "/" in name:
        raise CorpusError(f"corpus file not found: {path}")
    raise CorpusError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(registry()))}, or a path")


def map_chunks(span: TextSpan, work: Callable[[bytes], T], *, ranges: list[tuple[int, int]] | None = None,
               desc: str | None = None) -> Iterator[T]:
    """work(bytes of each range) on one thread per core, results in order, at most two ranges per thread
    in flight (bounded memory); with `desc`, a tqdm bar on a terminal shows the MB/s."""
    ranges = span.byte_ranges() if ranges is None else ranges
    total = sum(end - start for start, end in ranges)
    workers = min(available_cores(), len(ranges)) or 1
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, dynamic_ncols=True,
               disable=desc is None or not sys.stderr.isatty(), leave=False)

    def read_and_work(first: int, last: int) -> T:
        with open(span.path, "rb") as handle:
            handle.seek(first)
            return work(handle.read(last - first))

    with bar, ThreadPoolExecutor(workers, thread_name_prefix="charlm-corpus") as pool:
        pending: deque = deque()
        for first, last in ranges:
            pending.append((pool.submit(read_and_work, first, last), last - first))
            if len(pending) >= 2 * workers:
                yield _finish(pending.popleft(), bar)
        while pending:
            yield _finish(pending.popleft(), bar)


def _finish(entry, bar):
    future, size = entry
    result = future.result()
    bar.update(size)
    return result


def _scan_file(path: Path, errors: str) -> _FileScan:
    """One pass in blocks: sha256 on a second thread while this one checks NUL bytes and UTF-8 and counts
    code points; every way a file can fail to be text is a one-line CorpusError naming the offset."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise CorpusError(f"corpus file not found: {path}") from None
    except IsADirectoryError:
        raise CorpusError(f"corpus path is a folder without train.txt: {path}") from None
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror}") from None
    digest = hashlib.sha256()
    block_starts, chars_before = [0], [0]
    offset, carry = 0, b""
    with handle, ThreadPoolExecutor(1, thread_name_prefix="charlm-sha256") as hasher:
        hashing = None
        while True:
            try:
                data = handle.read(SCAN_BLOCK_BYTES)
            except OSError as exc:
                raise CorpusError(f"cannot read corpus file {path}: {exc.strerror}") from None
            if hashing is not None:
                hashing.result()
            hashing = hasher.submit(digest.update, data) if data else None
            nul = data.find(b"\x00")
            if nul >= 0:
                raise CorpusError(f"corpus file looks binary (NUL byte at offset {offset + len(carry) + nul}): {path}")
            block = carry + data if carry else data
            if not block:
                break
            array = np.frombuffer(block, dtype=np.uint8)
            bad, chars, consumed = utf8.scan(array)
            if bad >= 0 or (not data and consumed < len(block)):
                if errors == "strict":
                    position = offset + (bad if bad >= 0 else consumed)
                    raise CorpusError(
                        f"corpus file is not UTF-8 (byte 0x{block[bad if bad >= 0 else consumed]:02x} at offset "
                        f"{position}): {path}; convert it to UTF-8, or replace invalid bytes with "
                        "--encoding-errors replace (errors='replace' in Python)")
                consumed = len(block) if not data else max(consumed, len(block) - 3)
                chars = int(np.count_nonzero((array[:consumed] & 0xC0) != 0x80))
            offset += consumed
            carry = block[consumed:]
            block_starts.append(offset)
            chars_before.append(chars_before[-1] + chars)
            if not data:
                break
        if hashing is not None:
            hashing.result()
    if offset == 0:
        raise CorpusError(f"corpus file is empty: {path}")
    return _FileScan(path, offset, digest.hexdigest(), tuple(block_starts), tuple(chars_before))


def _split_single(name: str, scan: _FileScan, errors: str, valid_fraction: float) -> CorpusSplits:
    cut = _tail_cut(name, scan, valid_fraction)
    checksum = _combine(scan.sha256, f"valid_fraction={valid_fraction!r}")
    return CorpusSplits(name=name, train=TextSpan(scan.path, 0, cut, errors),
                        valid=TextSpan(scan.path, cut, scan.size, errors), test=None, checksum=checksum)


def _tail_cut(name: str, scan: _FileScan, valid_fraction: float) -> int:
    """Byte offset of a contiguous validation tail of `valid_fraction` of the characters, moved to just
    after the next newline so no line (or word) straddles the split; found by seeking, not by reading."""
    cut_char = int(scan.chars * (1.0 - valid_fraction))
    cut = _char_offset(scan, cut_char)
    with open(scan.path, "rb") as handle:
        newline = _find_from(handle, b"\n", _char_offset(scan, max(cut_char - 1, 0)), scan.size)
    if 0 <= newline < scan.size - 1:
        cut = newline + 1
    if cut <= 0 or cut >= scan.size:
        raise CorpusError(
            f"corpus {name!r} is too short ({scan.chars} characters) to split off a {valid_fraction:g} validation tail"
        )
    return cut


def _char_offset(scan: _FileScan, char_index: int) -> int:
    """Byte offset of the character `char_index` (the file's size past the last), reading one block."""
    if char_index >= scan.chars:
        return scan.size
    if scan.chars == scan.size:
        return char_index  # ASCII
    block = bisect.bisect_right(scan.chars_before, char_index) - 1
    with open(scan.path, "rb") as handle:
        handle.seek(scan.block_starts[block])
        data = handle.read(scan.block_starts[block + 1] - scan.block_starts[block])
    starts = np.flatnonzero((np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80)
    return scan.block_starts[block] + int(starts[char_index - scan.chars_before[block]])


def _find_from(handle, needle: bytes, start: int, end: int) -> int:
    """Offset of the first `needle` (one byte) in [start, end) of an open file, or -1."""
    handle.seek(start)
    position = start
    while position < end:
        data = handle.read(min(CUT_WINDOW_BYTES, end - position))
        found = data.find(needle)
        if found >= 0:
            return position + found
        position += len(data)
    return -1


def _cut_after(handle, position: int, end: int) -> int:
    """The first offset at or after `position` where a token cannot straddle a cut: after a newline that
    an ASCII word character (or a space and one) follows, which is a boundary for the char, whitespace
    and byte-level (GPT-2 regex) pre-tokenizers alike; else after any newline, else at a space, else at
    a character's first byte (one line longer than the window: its words may then be cut)."""
    if position >= end:
        return end
    handle.seek(position - 1)
    window = handle.read(min(CUT_WINDOW_BYTES, end - position + 1))
    for pattern in (_TOKEN_BOUNDARY, _AFTER_NEWLINE, _BEFORE_SPACE, _CHARACTER_START):
        match = pattern.search(window, 1)
        if match is not None:
            return position - 1 + match.end()
    return end


def _resolve_folder(folder: Path, valid_fraction: float | None, errors: str) -> CorpusSplits:
    files = {name: folder / name for name in SPLIT_FILES if (folder / name).is_file()}
    if "train.txt" not in files:
        raise CorpusError(f"corpus folder has no train.txt: {folder}")
    return _splits_from_files(folder.name, files, valid_fraction, errors, expected={})


def _resolve_registered(name: str, valid_fraction: float | None, errors: str) -> CorpusSplits:
    entry = registry()[name]
    rule = entry["split"]
    files, expected = {}, {}
    for split, split_file in zip(SPLITS, SPLIT_FILES):
        if split in rule:
            spec = entry["files"][rule[split]]
            files[split_file] = _locate_registered_file(name, rule[split], spec)
            expected[split_file] = spec["sha256"]
    fraction = valid_fraction or rule.get("valid_fraction", DEFAULT_VALID_FRACTION)
    return _splits_from_files(name, files, fraction, errors, expected)


def _splits_from_files(
    name: str, files: dict[str, Path], valid_fraction: float | None, errors: str, expected: dict[str, str]
) -> CorpusSplits:
    """Scan the split files (keyed train.txt / valid.txt / test.txt), checking registered hashes."""
    scans = {}
    for split_file, path in files.items():
        scans[split_file] = _scan_file(path, errors)
        want = expected.get(split_file)
        if want is not None and scans[split_file].sha256 != want:
            raise CorpusError(
                f"{path} does not match the registered {name}/{path.name} "
                f"(sha256 {scans[split_file].sha256[:12]}…, expected {want[:12]}…); replace it with the original file"
            )
    spans = {split_file: TextSpan(scan.path, 0, scan.size, errors) for split_file, scan in scans.items()}
    if "valid.txt" not in scans:
        fraction = valid_fraction or DEFAULT_VALID_FRACTION
        cut = _tail_cut(name, scans["train.txt"], fraction)
        whole = spans["train.txt"]
        train, valid = TextSpan(whole.path, 0, cut, errors), TextSpan(whole.path, cut, whole.end, errors)
        split_rule = f"valid_fraction={fraction!r}"
    else:
        train, valid, split_rule = spans["train.txt"], spans["valid.txt"], "files"
    checksum = _combine(*(f"{split_file}={scan.sha256}" for split_file, scan in sorted(scans.items())), split_rule)
    return CorpusSplits(name=name, train=train, valid=valid, test=spans.get("test.txt"), checksum=checksum)


def _combine(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def _locate_registered_file(name: str, filename: str, spec: dict) -> Path:
    """$CHARLM_CORPORA first (shared, read-only), then the user cache, else download into the cache."""
    candidates = []
    shared = os.environ.get("CHARLM_CORPORA")
    if shared:
        candidates.append(Path(shared).expanduser() / name / filename)
    cached = cache_dir() / "corpora" / name / filename
    candidates.append(cached)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = " or ".join(str(c) for c in candidates) if shared else f"{cached} (or under $CHARLM_CORPORA/{name}/)"
    _download(spec["url"], cached, spec["sha256"], where)
    return cached


def _download(url: str, target: Path, sha256: str, where: str) -> None:
    """Fetch into a temporary file beside `target`, check the hash, then rename: never a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            except (OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise CorpusError(
                    f"corpus file {target.parent.name}/{target.name} is missing and could not be downloaded "
                    f"from {url} ({reason}); put it at {where}"
                ) from None
        if digest.hexdigest() != sha256:
            raise CorpusError(
                f"download of {url} has sha256 {digest.hexdigest()[:12]}…, expected {sha256[:12]}…; "
                f"put the original file at {where}"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
