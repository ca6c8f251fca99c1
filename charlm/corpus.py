"""Corpus names and paths -> validated train / valid / test text.

A corpus is a UTF-8 text file (split into train / valid by a contiguous tail), a folder holding
train.txt / valid.txt / test.txt, or a name registered in `charlm.corpora` (corpora/registry.json).
Registered files are looked up in $CHARLM_CORPORA/<name>/, then in cache_dir()/corpora/<name>/, and
downloaded from their original URL into the cache when missing. Their sha256 is checked on every
resolve: hashing costs little next to reading the file, so there is nothing worth caching.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from charlm.errors import ConfigError, CorpusError

DEFAULT_VALID_FRACTION = 0.1
SPLITS = ("train", "valid", "test")
SPLIT_FILES = ("train.txt", "valid.txt", "test.txt")
DOWNLOAD_TIMEOUT_SECONDS = 30
ERROR_MODES = ("strict", "replace")


@dataclass(frozen=True)
class CorpusSplits:
    """The text of each split; `checksum` identifies the source bytes and the split rule, for caches."""

    name: str
    train: str
    valid: str
    test: str | None
    checksum: str

    def cache_key(self, split: str) -> str:
        """A key for `encode_cached` that changes whenever this split's text could change."""
        if split not in SPLITS:
            raise ValueError(f"split must be train, valid or test, got {split!r}")
        return f"{self.checksum}:{split}"


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
    """Read a corpus file as UTF-8, refusing what cannot be language-model text."""
    return _read_checked(Path(path), errors)[0]


def resolve_corpus(
    name_or_path: str | os.PathLike, valid_fraction: float | None = None, errors: str = "strict"
) -> CorpusSplits:
    """Turn a file, a split folder or a registered name into its splits.

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
        text, digest = _read_checked(path, errors)
        return _split_single(path.stem, text, digest, valid_fraction or DEFAULT_VALID_FRACTION)
    if path.is_dir():
        return _resolve_folder(path, valid_fraction, errors)
    name = str(name_or_path)
    if name in registry():
        return _resolve_registered(name, valid_fraction, errors)
    if path.suffix or os.sep in name or "/" in name:
        raise CorpusError(f"corpus file not found: {path}")
    raise CorpusError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(registry()))}, or a path")


def _read_checked(path: Path, errors: str) -> tuple[str, str]:
    """(text, sha256 of the bytes); every way a file can fail to be text is a one-line CorpusError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"corpus file not found: {path}") from None
    except IsADirectoryError:
        raise CorpusError(f"corpus path is a folder without train.txt: {path}") from None
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror}") from None
    if not data:
        raise CorpusError(f"corpus file is empty: {path}")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"corpus file looks binary (NUL byte at offset {nul}): {path}")
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}): {path}; "
            "convert it to UTF-8, or replace invalid bytes with --encoding-errors replace (errors='replace' in Python)"
        ) from None
    return text, hashlib.sha256(data).hexdigest()


def _split_single(name: str, text: str, digest: str, valid_fraction: float) -> CorpusSplits:
    train, valid = _split_tail(name, text, valid_fraction)
    checksum = _combine(digest, f"valid_fraction={valid_fraction!r}")
    return CorpusSplits(name=name, train=train, valid=valid, test=None, checksum=checksum)


def _split_tail(name: str, text: str, valid_fraction: float) -> tuple[str, str]:
    """Contiguous tail as validation, cut after a newline so no line (or word) straddles the split."""
    cut = int(len(text) * (1.0 - valid_fraction))
    newline = text.find("\n", max(cut - 1, 0))
    if 0 <= newline < len(text) - 1:
        cut = newline + 1
    if cut <= 0 or cut >= len(text):
        raise CorpusError(
            f"corpus {name!r} is too short ({len(text)} characters) to split off a {valid_fraction:g} validation tail"
        )
    return text[:cut], text[cut:]


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
    """Read the split files (keyed train.txt / valid.txt / test.txt), checking registered hashes."""
    texts, digests = {}, {}
    for split_file, path in files.items():
        texts[split_file], digests[split_file] = _read_checked(path, errors)
        want = expected.get(split_file)
        if want is not None and digests[split_file] != want:
            raise CorpusError(
                f"{path} does not match the registered {name}/{path.name} "
                f"(sha256 {digests[split_file][:12]}…, expected {want[:12]}…); replace it with the original file"
            )
    if "valid.txt" not in texts:
        fraction = valid_fraction or DEFAULT_VALID_FRACTION
        train, valid = _split_tail(name, texts["train.txt"], fraction)
        split_rule = f"valid_fraction={fraction!r}"
    else:
        train, valid, split_rule = texts["train.txt"], texts["valid.txt"], "files"
    checksum = _combine(*(f"{split_file}={digest}" for split_file, digest in sorted(digests.items())), split_rule)
    return CorpusSplits(name=name, train=train, valid=valid, test=texts.get("test.txt"), checksum=checksum)


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
