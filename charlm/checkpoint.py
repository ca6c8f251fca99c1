"""Checkpoints as folders of standard files, written atomically and verified on load.

A checkpoint folder holds:

    model.safetensors      weights (named tensors; loading them cannot run code)
    optimizer.safetensors  optimizer moments (only needed to resume training)
    config.json            {"format_version", "model": ModelConfig, "train": training config or null}
    tokenizer.json         the `tokenizers` library's tokenizer file
    trainer_state.json     step, epoch, data cursor, RNG states, best validation loss, format version
    checksums.json         size and sha256 of every other file

safetensors validates its header but not the tensor bytes, so a flipped bit would load as silently wrong
weights; the checksums turn that into a clear error. A save writes a sibling `<name>.tmp-<pid>` folder,
fsyncs it, then swaps it in with two renames, so a crash, a full disk or Ctrl-C at any moment leaves the
previous checkpoint loadable (if the crash falls between the renames, the next load renames it back).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy

from charlm.config import EARLIER_DEFAULTS, ModelConfig
from charlm.errors import CharlmError, CheckpointError
from charlm.model import LSTMLanguageModel, param_shapes
from charlm.tokenize import Tokenizer

FORMAT_VERSION = 1

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKSUMS_FILE = "checksums.json"

TMP_INFIX = ".tmp-"
OLD_INFIX = ".old-"
SWAP_WAIT_SECONDS = 2.0
READ_ATTEMPTS = 3
VERIFY_ATTEMPTS = 10  # while another process saves: ~0.5 s in all


@dataclass
class Checkpoint:
    """Everything in a checkpoint folder, already validated against its own config."""

    folder: Path
    model_config: ModelConfig
    params: dict[str, np.ndarray]
    tokenizer: Tokenizer
    tokenizer_json: str
    trainer_state: dict
    train_config: dict | None
    optimizer_state: dict[str, np.ndarray] | None


def save_checkpoint(
    folder: str | os.PathLike,
    *,
    model_config: ModelConfig,
    params: dict[str, np.ndarray],
    tokenizer_json: str,
    trainer_state: dict,
    optimizer_state: dict[str, np.ndarray] | None = None,
    train_config: dict | None = None,
) -> Path:
    """Write a checkpoint folder atomically; on any failure the folder's previous contents survive.

    Refuses non-finite weights or optimizer moments: a diverged model must never replace a good checkpoint.
    An OSError (full disk, permissions) becomes a CheckpointError saying the previous checkpoint is intact.
    """
    folder = Path(folder)
    for what, tensors in (("weights", params), ("optimizer state", optimizer_state or {})):
        bad = _non_finite(tensors)
        if bad:
            raise _checkpoint_error(f"refusing to save non-finite {what} ({', '.join(bad)}) to {folder}")
    files = {
        MODEL_FILE: _tensor_bytes(params),
        CONFIG_FILE: _json_bytes(
            {"format_version": FORMAT_VERSION, "model": model_config.to_dict(), "train": train_config}
        ),
        TOKENIZER_FILE: tokenizer_json.encode("utf-8"),
        TRAINER_STATE_FILE: _json_bytes({"format_version": FORMAT_VERSION, **trainer_state}),
    }
    if optimizer_state is not None:
        files[OPTIMIZER_FILE] = _tensor_bytes(optimizer_state)
    files[CHECKSUMS_FILE] = _json_bytes(
        {
            "format_version": FORMAT_VERSION,
            "files": {
                name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in files.items()
            },
        }
    )
    try:
        _write_folder_atomically(folder, files)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise _checkpoint_error(
            f"could not save checkpoint {folder}: {reason}; the previous checkpoint there is intact"
        ) from exc
    return folder


def load_checkpoint(folder: str | os.PathLike, load_optimizer: bool = False) -> Checkpoint:
    """Read and validate a checkpoint folder; any problem is a one-line CheckpointError.

    Checks, in order: the files exist, the format is not newer than this charlm, every file matches its
    recorded size and sha256, the weights have exactly the names, shapes and dtype the config implies and
    are finite, and the tokenizer's vocabulary size equals the config's.
    """
    folder = Path(folder)
    names = [CONFIG_FILE, CHECKSUMS_FILE, MODEL_FILE, TOKENIZER_FILE, TRAINER_STATE_FILE]
    if load_optimizer:
        names.append(OPTIMIZER_FILE)
    raw, config_doc = _read_verified(folder, names)

    model_config = _parse_model_config(folder, config_doc.get("model"))
    train_config = config_doc.get("train")
    if train_config is not None and not isinstance(train_config, dict):
        raise _checkpoint_error(f"{folder / CONFIG_FILE}: \"train\" must be an object or null")

    params = _parse_tensors(folder, MODEL_FILE, raw[MODEL_FILE])
    _check_params(folder, params, model_config)

    optimizer_state = None
    if load_optimizer:
        optimizer_state = _parse_tensors(folder, OPTIMIZER_FILE, raw[OPTIMIZER_FILE])
        _check_optimizer_state(folder, optimizer_state, params)

    tokenizer_json = raw[TOKENIZER_FILE].decode("utf-8", errors="replace")
    tokenizer = _parse_tokenizer(folder, tokenizer_json, model_config.vocab_size)

    trainer_state = _parse_json(folder, TRAINER_STATE_FILE, raw[TRAINER_STATE_FILE])
    _check_format_version(folder, TRAINER_STATE_FILE, trainer_state)
    del trainer_state["format_version"]

    return Checkpoint(
        folder=folder,
        model_config=model_config,
        params=params,
        tokenizer=tokenizer,
        tokenizer_json=tokenizer_json,
        trainer_state=trainer_state,
        train_config=train_config,
        optimizer_state=optimizer_state,
    )


def saved_train_config(run: str | os.PathLike) -> dict | None:
    """The training options of the run checkpointed in `run/last`, or None when there is nothing to resume."""
    last = Path(run) / "last"
    if not last.exists():
        return None
    train_config = load_checkpoint(last).train_config
    if train_config is None:
        raise _checkpoint_error(f"{last} records no training options to resume with; start a new run with --force")
    # An option added after the checkpoint was written: the run used the default of its day.
    return {**EARLIER_DEFAULTS, **train_config}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Map what a user types to a checkpoint folder.

    A run folder (holding best/ and last/) means its best checkpoint, else its last; a checkpoint folder
    means itself; a file inside a checkpoint folder (say model.safetensors) means that folder.
    """
    path = Path(path)
    for candidate in (path, path / "best", path / "last"):
        _recover_interrupted_swap(candidate)
    if not path.exists():
        raise _checkpoint_error(f"no checkpoint at {path}")
    if path.is_file():
        if (path.parent / CONFIG_FILE).is_file():
            return path.parent
        raise _checkpoint_error(f"{path} is a file, not a checkpoint folder")
    for name in ("best", "last"):
        if (path / name).is_dir():
            return path / name
    if (path / CONFIG_FILE).is_file() or (path / MODEL_FILE).is_file():
        return path
    raise _checkpoint_error(f"{path} is neither a checkpoint folder nor a run folder with best/ or last/")


def load_model(path: str | os.PathLike) -> tuple[LSTMLanguageModel, Tokenizer, Checkpoint]:
    """Everything `generate`, `complete` and `eval` need, from a run folder or a checkpoint folder."""
    checkpoint = load_checkpoint(resolve_checkpoint(path))
    model = LSTMLanguageModel(checkpoint.model_config, params=checkpoint.params)
    return model, checkpoint.tokenizer, checkpoint


def _write_folder_atomically(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` into a fsynced sibling folder, then swap it in place of `folder` by renames."""
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_swap(folder)
    _remove_abandoned_siblings(folder)
    pid = os.getpid()
    tmp = parent / f"{folder.name}{TMP_INFIX}{pid}"
    old = parent / f"{folder.name}{OLD_INFIX}{pid}"
    try:
        tmp.mkdir()
        for name, data in files.items():
            _write_file_synced(tmp / name, data)
        _fsync_dir(tmp)
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
        _fsync_dir(parent)
    except BaseException:
        if old.exists() and not folder.exists():
            os.rename(old, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable (POSIX only; Windows cannot open directories)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writer_folders(folder: Path, infixes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """The `<name>.tmp-<pid>` / `<name>.old-<pid>` folders beside `folder`, each with its writer's pid."""
    if not folder.parent.is_dir():
        return []
    found = []
    for sibling in folder.parent.iterdir():
        for infix in infixes:
            pid = sibling.name.removeprefix(folder.name + infix)
            if pid != sibling.name and pid.isdigit() and sibling.is_dir():
                found.append((sibling, int(pid)))
    return found


def _abandoned(pid: int) -> bool:
    """A writer folder is abandoned when its process is gone (or is us, so not mid-save)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_abandoned_siblings(folder: Path) -> None:
    """Delete tmp/old folders left by a crashed or killed save (after any recovery)."""
    for sibling, pid in _writer_folders(folder, (TMP_INFIX, OLD_INFIX)):
        if _abandoned(pid):
            shutil.rmtree(sibling, ignore_errors=True)


def _recover_interrupted_swap(folder: Path) -> None:
    """If a save died between its two renames, put the previous checkpoint (`<name>.old-<pid>`) back.

    While that writer is still alive its swap is microseconds from done, so wait for it (never steal it).
    """
    deadline = time.monotonic() + SWAP_WAIT_SECONDS
    while not folder.exists():
        olds = _writer_folders(folder, (OLD_INFIX,))
        dead = [path for path, pid in olds if _abandoned(pid)]
        if dead:
            try:
                os.rename(max(dead, key=lambda path: path.stat().st_mtime), folder)
            except OSError:
                pass
            return
        if not olds or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _read_verified(folder: Path, names: list[str]) -> tuple[dict[str, bytes], dict]:
    """`names` read from one version of `folder`, every file matching checksums.json, and the parsed config.

    A read that fails while another process is saving here, or just saved, is retried: folder identities
    can be reused by a later save, so only the checksums prove that all files come from one version."""
    attempt = 1
    while True:
        version = _version_in_place(folder)
        try:
            raw = _read_consistent(folder, names)
            config_doc = _parse_json(folder, CONFIG_FILE, raw[CONFIG_FILE])
            _check_format_version(folder, CONFIG_FILE, config_doc)
            manifest = _parse_json(folder, CHECKSUMS_FILE, raw[CHECKSUMS_FILE])
            _check_format_version(folder, CHECKSUMS_FILE, manifest)
            for name in names:
                if name != CHECKSUMS_FILE:
                    _verify_checksum(folder, name, raw[name], manifest)
            return raw, config_doc
        except CheckpointError:
            saved_meanwhile = _another_process_saving(folder) or _version_in_place(folder) != version
            if attempt == VERIFY_ATTEMPTS or not saved_meanwhile:
                raise
        time.sleep(0.01 * attempt)
        attempt += 1


def _another_process_saving(folder: Path) -> bool:
    return any(not _abandoned(pid) for _, pid in _writer_folders(folder, (TMP_INFIX, OLD_INFIX)))


def _version_in_place(folder: Path) -> tuple[int, int, int] | None:
    """`_folder_identity`, or None while there is no checkpoint folder at all."""
    try:
        return _folder_identity(folder)
    except CheckpointError:
        return None


def _read_consistent(folder: Path, names: list[str]) -> dict[str, bytes]:
    """Read `names` from one version of `folder`, retrying if a save swapped the folder mid-read."""
    for _ in range(READ_ATTEMPTS):
        before = _folder_identity(folder)
        raw = {}
        for name in names:
            try:
                raw[name] = (folder / name).read_bytes()
            except FileNotFoundError:
                raw[name] = None
            except IsADirectoryError:
                raise _checkpoint_error(f"{folder / name} is a folder, expected a file") from None
        if _folder_identity(folder) == before:
            break
    missing = [name for name, data in raw.items() if data is None]
    if missing:
        raise _checkpoint_error(f"checkpoint {folder} is missing {', '.join(missing)}")
    return raw


def _folder_identity(folder: Path) -> tuple[int, int, int]:
    """Which version of `folder` is in place (device, inode and the change time a swap's rename sets);
    waits out saves caught between their two renames."""
    deadline = time.monotonic() + SWAP_WAIT_SECONDS
    while True:
        _recover_interrupted_swap(folder)
        try:
            info = folder.stat()
            break
        except FileNotFoundError:
            # The next save may have begun its swap since: wait for it while a live writer holds the old folder.
            if time.monotonic() > deadline or not _writer_folders(folder, (OLD_INFIX,)):
                raise _checkpoint_error(f"no checkpoint at {folder}") from None
    if not stat.S_ISDIR(info.st_mode):  # from the same stat call: a second lookup could race a swap
        raise _checkpoint_error(f"{folder} is a file, not a checkpoint folder")
    return info.st_dev, info.st_ino, info.st_ctime_ns


def _parse_json(folder: Path, name: str, data: bytes) -> dict:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _checkpoint_error(f"{folder / name} is corrupt (not valid JSON)") from None
    if not isinstance(doc, dict):
        raise _checkpoint_error(f"{folder / name} is corrupt (expected a JSON object)")
    return doc


def _check_format_version(folder: Path, name: str, doc: dict) -> None:
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _checkpoint_error(f"{folder / name} has no valid format_version")
    if version > FORMAT_VERSION:
        raise _checkpoint_error(
            f"checkpoint format {version} is newer than this charlm supports ({FORMAT_VERSION}); upgrade charlm"
        )


def _verify_checksum(folder: Path, name: str, data: bytes, manifest: dict) -> None:
    entry = (manifest.get("files") or {}).get(name)
    if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry:
        raise _checkpoint_error(f"{folder / CHECKSUMS_FILE} has no checksum for {name}")
    if len(data) != entry["bytes"]:
        raise _checkpoint_error(
            f"{folder / name} is truncated or altered ({len(data)} bytes, expected {entry['bytes']})"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _checkpoint_error(f"{folder / name} is corrupt (sha256 does not match {CHECKSUMS_FILE})")


def _parse_model_config(folder: Path, doc) -> ModelConfig:
    """A hand-edited config.json can hold any JSON: wrong types are a CheckpointError, not a TypeError."""
    where = folder / CONFIG_FILE
    if not isinstance(doc, dict):
        raise _checkpoint_error(f"{where}: \"model\" must be an object of model settings")
    try:
        return ModelConfig.from_dict(doc)
    except CharlmError as exc:
        raise _checkpoint_error(f"{where}: {exc}") from None
    except (TypeError, ValueError):
        raise _checkpoint_error(f"{where}: model settings have the wrong types: {json.dumps(doc)[:200]}") from None


def _parse_tensors(folder: Path, name: str, data: bytes) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # the safetensors parser reports every malformed file as its own error type
        raise _checkpoint_error(f"{folder / name} is not a valid safetensors file: {_first_line(exc)}") from None
    return {key: np.require(array, requirements=("C", "W")) for key, array in tensors.items()}


def _check_params(folder: Path, params: dict[str, np.ndarray], config: ModelConfig) -> None:
    where = folder / MODEL_FILE
    expected = param_shapes(config)
    missing = [name for name in expected if name not in params]
    if missing:
        raise _checkpoint_error(f"{where} does not match {CONFIG_FILE}: missing {', '.join(missing)}")
    unexpected = sorted(set(params) - set(expected))
    if unexpected:
        raise _checkpoint_error(f"{where} does not match {CONFIG_FILE}: unexpected {', '.join(unexpected)}")
    for name, shape in expected.items():
        array = params[name]
        if array.shape != tuple(shape):
            raise _checkpoint_error(
                f"{where} does not match {CONFIG_FILE}: {name} has shape {array.shape}, expected {tuple(shape)}"
            )
        if array.dtype != np.dtype(config.dtype):
            raise _checkpoint_error(
                f"{where} does not match {CONFIG_FILE}: {name} is {array.dtype}, expected {config.dtype}"
            )
    bad = _non_finite(params)
    if bad:
        raise _checkpoint_error(f"{where} holds non-finite weights: {', '.join(bad)}")


def _check_optimizer_state(folder: Path, state: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> None:
    """Moments are named `<moment>.<param name>` and must have their parameter's shape."""
    where = folder / OPTIMIZER_FILE
    for key, array in state.items():
        _, _, param_name = key.partition(".")
        if param_name in params and array.shape != params[param_name].shape:
            raise _checkpoint_error(
                f"{where} does not match the weights: {key} has shape {array.shape}, "
                f"expected {params[param_name].shape}"
            )
    bad = _non_finite(state)
    if bad:
        raise _checkpoint_error(f"{where} holds non-finite values: {', '.join(bad)}")


def _parse_tokenizer(folder: Path, tokenizer_json: str, vocab_size: int) -> Tokenizer:
    where = folder / TOKENIZER_FILE
    try:
        tokenizer = Tokenizer.from_json(tokenizer_json)
    except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
        raise _checkpoint_error(f"{where} is not a valid tokenizer: {_first_line(exc)}") from None
    if tokenizer.vocab_size != vocab_size:
        raise _checkpoint_error(
            f"{where} has {tokenizer.vocab_size} tokens but {CONFIG_FILE} says vocab_size {vocab_size}"
        )
    return tokenizer


def _non_finite(tensors: dict[str, np.ndarray]) -> list[str]:
    return [name for name, array in tensors.items() if not np.all(np.isfinite(array))]


def _tensor_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """safetensors reads raw memory, so every array must be C-contiguous first."""
    return safetensors.numpy.save({name: np.ascontiguousarray(array) for name, array in tensors.items()})


def _json_bytes(doc: dict) -> bytes:
    """Strict JSON (no NaN/Infinity) so that any tool can read the file."""
    return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _checkpoint_error(message: str) -> CheckpointError:
    """Names and keys may come from a stranger's file: escape their line breaks to keep the message one line."""
    return CheckpointError("\\n".join(message.splitlines()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
