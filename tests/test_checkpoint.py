"""Checkpoint folders: exact round trip, atomic saves that survive failures and SIGKILL, and loading that
turns every kind of damage (missing, truncated, bit-flipped, mismatched, newer, hostile) into one clear error."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import charlm.checkpoint as checkpoint
from helpers import rewrite_checksums
from charlm.checkpoint import (
    CHECKSUMS_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    MODEL_FILE,
    OPTIMIZER_FILE,
    TOKENIZER_FILE,
    TRAINER_STATE_FILE,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from charlm.config import ModelConfig
from charlm.errors import CheckpointError
from charlm.model import param_shapes
from charlm.tokenize import train_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog.\n"


def make_run(seed: int = 0, dtype: str = "float32"):
    tokenizer = train_tokenizer("char", TEXT)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embed_dim=6, hidden_size=5, num_layers=2, dtype=dtype)
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape).astype(dtype) for name, shape in param_shapes(config).items()}
    moments = {f"{m}.{name}": rng.random(p.shape).astype(dtype) for m in "mv" for name, p in params.items()}
    trainer_state = {
        "step": 17 + seed,
        "epoch": 2,
        "data": {"position": 123, "rng": np.random.default_rng(seed).bit_generator.state},
        "dropout_rng": np.random.default_rng(seed + 1).bit_generator.state,
        "best_valid_loss": 1.25,
        "optimizer_step": 17 + seed,
    }
    return dict(
        model_config=config,
        params=params,
        tokenizer_json=tokenizer.to_json(),
        trainer_state=trainer_state,
        optimizer_state=moments,
        train_config={"lr": 0.002, "batch_size": 4, "seq_len": 16},
    )


def load_error(folder, **kwargs) -> str:
    """The CheckpointError message for loading `folder`; every one must be a single line."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_exact(tmp_path, dtype):
    run = make_run(dtype=dtype)
    folder = save_checkpoint(tmp_path / "last", **run)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, TOKENIZER_FILE, TRAINER_STATE_FILE, CHECKSUMS_FILE]
    )
    ckpt = load_checkpoint(folder, load_optimizer=True)
    assert ckpt.model_config == run["model_config"]
    assert_same_tensors(ckpt.params, run["params"])
    assert_same_tensors(ckpt.optimizer_state, run["optimizer_state"])
    assert ckpt.trainer_state == run["trainer_state"]  # including 128-bit PCG64 state integers
    assert ckpt.train_config == run["train_config"]
    assert ckpt.tokenizer_json == run["tokenizer_json"]
    assert ckpt.tokenizer.vocab_size == run["model_config"].vocab_size
    assert all(p.flags.writeable and p.flags.c_contiguous for p in ckpt.params.values())
    assert siblings(folder) == []


def test_files_are_standard_formats(tmp_path):
    folder = save_checkpoint(tmp_path / "ck", **make_run())
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["model"] == make_run()["model_config"].to_dict()
    assert json.loads((folder / TRAINER_STATE_FILE).read_text())["format_version"] == FORMAT_VERSION
    weights = safetensors.numpy.load_file(folder / MODEL_FILE)
    assert sorted(weights) == sorted(make_run()["params"])


def test_non_contiguous_arrays_are_saved_by_value(tmp_path):
    run = make_run()
    run["params"] = {name: np.asfortranarray(p) for name, p in run["params"].items()}
    folder = save_checkpoint(tmp_path / "ck", **run)
    assert_same_tensors(load_checkpoint(folder).params, make_run()["params"])


def test_optimizer_is_loaded_only_on_request(tmp_path):
    run = make_run()
    folder = save_checkpoint(tmp_path / "ck", **run)
    assert load_checkpoint(folder).optimizer_state is None
    run["optimizer_state"] = None
    save_checkpoint(folder, **run)
    assert "missing optimizer.safetensors" in load_error(folder, load_optimizer=True)


def test_load_model_builds_model_and_tokenizer(tmp_path):
    run = make_run()
    save_checkpoint(tmp_path / "run" / "last", **run)
    model, tokenizer, ckpt = load_model(tmp_path / "run")
    assert ckpt.folder == tmp_path / "run" / "last"
    assert model.config == run["model_config"]
    assert_same_tensors(model.params, run["params"])
    assert tokenizer.vocab_size == run["model_config"].vocab_size


def test_resolve_prefers_best_then_last(tmp_path):
    run_folder = tmp_path / "run"
    save_checkpoint(run_folder / "last", **make_run(0))
    assert resolve_checkpoint(run_folder) == run_folder / "last"
    save_checkpoint(run_folder / "best", **make_run(1))
    assert resolve_checkpoint(run_folder) == run_folder / "best"
    assert resolve_checkpoint(run_folder / "last") == run_folder / "last"
    assert resolve_checkpoint(run_folder / "last" / MODEL_FILE) == run_folder / "last"


def test_resolve_errors_name_the_path(tmp_path):
    for path, expected in [
        (tmp_path / "nowhere", "no checkpoint at"),
        (tmp_path, "neither a checkpoint folder nor a run folder"),
    ]:
        with pytest.raises(CheckpointError, match=expected) as info:
            resolve_checkpoint(path)
        assert str(path) in str(info.value)
    stray = tmp_path / "notes.txt"
    stray.write_text("hi")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint folder"):
        resolve_checkpoint(stray)


def test_missing_folder_and_missing_files(tmp_path):
    assert "no checkpoint at" in load_error(tmp_path / "absent")
    folder = save_checkpoint(tmp_path / "ck", **make_run())
    for name in [MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE, TRAINER_STATE_FILE, CHECKSUMS_FILE]:
        data = (folder / name).read_bytes()
        (folder / name).unlink()
        assert f"missing {name}" in load_error(folder)
        (folder / name).write_bytes(data)
    load_checkpoint(folder)


def test_truncated_weights(tmp_path):
    folder = save_checkpoint(tmp_path / "ck", **make_run())
    data = (folder / MODEL_FILE).read_bytes()
    (folder / MODEL_FILE).write_bytes(data[: len(data) // 2])
    message = load_error(folder)
    assert "model.safetensors is truncated" in message and str(len(data)) in message


@pytest.mark.parametrize("name", [MODEL_FILE, TOKENIZER_FILE, TRAINER_STATE_FILE, OPTIMIZER_FILE])
def test_bit_flip_is_detected(tmp_path, name):
    folder = save_checkpoint(tmp_path / "ck", **make_run())
    data = bytearray((folder / name).read_bytes())
    data[len(data) - 9] ^= 0x04  # in the tensor data / JSON body, past any header
    (folder / name).write_bytes(bytes(data))
    assert f"{name} is corrupt" in load_error(folder, load_optimizer=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_bit_flip_anywhere_is_an_error(tmp_path, data):
    """No flipped bit in any file may load silently: checksums cover the bytes, versions cover the manifest."""
    folder = tmp_path / "ck"
    if not folder.exists():
        save_checkpoint(folder, **make_run())
    name = data.draw(st.sampled_from(sorted(p.name for p in folder.iterdir())))
    original = (folder / name).read_bytes()
    position = data.draw(st.integers(0, len(original) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(original)
    flipped[position] ^= 1 << bit
    (folder / name).write_bytes(bytes(flipped))
    try:
        load_error(folder, load_optimizer=True)
    finally:
        (folder / name).write_bytes(original)


def test_newer_format_version_is_refused(tmp_path):
    folder = save_checkpoint(tmp_path / "ck", **make_run())
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    rewrite_checksums(folder)
    assert load_error(folder) == (
        f"checkpoint format {FORMAT_VERSION + 1} is newer than this charlm supports ({FORMAT_VERSION}); "
        "upgrade charlm"
    )


def test_weights_that_do_not_match_the_config(tmp_path):
    base = make_run()
    cases = {
        "missing decoder.weight": {k: v for k, v in base["params"].items() if k != "decoder.weight"},
        "unexpected extra": {**base["params"], "extra": np.zeros(3, np.float32)},
        "lstm.0.w_hh has shape (20, 4), expected (20, 5)": {
            **base["params"], "lstm.0.w_hh": np.zeros((20, 4), np.float32)
        },
        "embedding is float64, expected float32": {
            **base["params"], "embedding": base["params"]["embedding"].astype(np.float64)
        },
    }
    for expected, params in cases.items():
        folder = save_checkpoint(tmp_path / "ck", **{**base, "params": params})
        message = load_error(folder)
        assert "does not match config.json" in message and expected in message, message


def test_optimizer_moments_that_do_not_match_the_weights(tmp_path):
    run = make_run()
    run["optimizer_state"]["m.embedding"] = np.zeros((2, 2), np.float32)
    folder = save_checkpoint(tmp_path / "ck", **run)
    load_checkpoint(folder)
    assert "m.embedding has shape (2, 2)" in load_error(folder, load_optimizer=True)


def test_tokenizer_that_does_not_match_the_vocabulary(tmp_path):
    run = make_run()
    small = train_tokenizer("char", "abc")
    run["tokenizer_json"] = small.to_json()
    folder = save_checkpoint(tmp_path / "ck", **run)
    vocab_size = run["model_config"].vocab_size
    assert load_error(folder).endswith(
        f"tokenizer.json has {small.vocab_size} tokens but config.json says vocab_size {vocab_size}"
    )


def test_tokenizer_that_is_not_a_tokenizer(tmp_path):
    run = make_run()
    run["tokenizer_json"] = '{"hello": "world"}'
    assert "not a valid tokenizer" in load_error(save_checkpoint(tmp_path / "ck", **run))


def test_model_config_with_bad_values(tmp_path):
    folder = save_checkpoint(tmp_path / "ck", **make_run())
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["model"]["hidden_size"] = -5
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    rewrite_checksums(folder)
    assert "hidden_size must be a positive integer" in load_error(folder)


def test_non_finite_weights_are_never_saved(tmp_path):
    folder = save_checkpoint(tmp_path / "ck", **make_run(0))
    for key, value in [("params", np.nan), ("params", np.inf), ("optimizer_state", -np.inf)]:
        run = make_run(1)
        name = next(iter(run[key]))
        run[key][name][0] = value
        with pytest.raises(CheckpointError, match=f"refusing to save non-finite .*{name}"):
            save_checkpoint(folder, **run)
    assert load_checkpoint(folder).trainer_state["step"] == make_run(0)["trainer_state"]["step"]


def test_non_finite_weights_in_a_handmade_file_are_refused(tmp_path):
    run = make_run()
    folder = save_checkpoint(tmp_path / "ck", **run)
    params = dict(run["params"])
    params["decoder.bias"] = np.full_like(params["decoder.bias"], np.nan)
    safetensors.numpy.save_file(params, folder / MODEL_FILE)
    rewrite_checksums(folder)
    assert "non-finite weights: decoder.bias" in load_error(folder)


class _Payload:
    """Unpickling this would create a marker file: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = save_checkpoint(tmp_path / "ck", **make_run())
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        (folder / name).write_bytes(pickle.dumps({"embedding": _Payload(marker)}))
    rewrite_checksums(folder)
    assert "model.safetensors is not a valid safetensors file" in load_error(folder, load_optimizer=True)
    assert not marker.exists()


def test_writer_failure_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    folder = save_checkpoint(tmp_path / "last", **make_run(0))
    real_write = checkpoint._write_file_synced
    written = []

    def disk_fills_up(path, data):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write_file_synced", disk_fills_up)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint there is intact"):
        save_checkpoint(folder, **make_run(1))
    monkeypatch.undo()

    ckpt = load_checkpoint(folder, load_optimizer=True)
    assert_same_tensors(ckpt.params, make_run(0)["params"])
    assert siblings(folder) == []
    save_checkpoint(folder, **make_run(1))
    assert_same_tensors(load_checkpoint(folder).params, make_run(1)["params"])


def test_failure_between_the_renames_restores_previous(tmp_path, monkeypatch):
    folder = save_checkpoint(tmp_path / "last", **make_run(0))
    real_rename = os.rename

    def rename_tmp_fails(src, dst):
        if ".tmp-" in str(src):
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename_tmp_fails)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, **make_run(1))
    monkeypatch.undo()
    assert_same_tensors(load_checkpoint(folder).params, make_run(0)["params"])
    assert siblings(folder) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_crash_between_renames_is_recovered_on_load(tmp_path):
    """A SIGKILL after `last -> last.old-<pid>` but before `tmp -> last` leaves no `last`: load puts it back."""
    run_folder = tmp_path / "run"
    folder = save_checkpoint(run_folder / "last", **make_run(0))
    pid = _dead_pid()
    os.rename(folder, run_folder / f"last.old-{pid}")
    (run_folder / f"last.tmp-{pid}").mkdir()
    (run_folder / f"last.tmp-{pid}" / MODEL_FILE).write_bytes(b"half written")

    assert resolve_checkpoint(run_folder) == folder
    assert_same_tensors(load_checkpoint(folder).params, make_run(0)["params"])
    save_checkpoint(folder, **make_run(1))
    assert siblings(folder) == []


def test_failed_save_after_a_crash_between_renames_keeps_the_recovered_checkpoint(tmp_path, monkeypatch):
    folder = save_checkpoint(tmp_path / "last", **make_run(0))
    os.rename(folder, tmp_path / f"last.old-{_dead_pid()}")

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_file_synced", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(folder, **make_run(1))
    assert_same_tensors(load_checkpoint(folder).params, make_run(0)["params"])
    assert siblings(folder) == []


def test_junk_from_a_killed_save_does_not_break_the_next(tmp_path):
    folder = tmp_path / "last"
    pid = _dead_pid()
    (tmp_path / f"last.tmp-{pid}").mkdir()
    (tmp_path / f"last.tmp-{pid}" / CONFIG_FILE).write_text("{")
    (tmp_path / "last.tmp-notapid").mkdir()
    save_checkpoint(folder, **make_run(0))
    assert siblings(folder) == ["last.tmp-notapid"]
    load_checkpoint(folder)


SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from charlm.checkpoint import save_checkpoint
    from charlm.config import ModelConfig
    from charlm.model import param_shapes
    from charlm.tokenize import train_tokenizer

    folder = sys.argv[1]
    tokenizer = train_tokenizer("char", "abcdefgh")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embed_dim=64, hidden_size=128, num_layers=2)
    shapes = param_shapes(config)
    step = 0
    while True:
        params = {name: np.full(shape, step, np.float32) for name, shape in shapes.items()}
        save_checkpoint(folder, model_config=config, params=params, tokenizer_json=tokenizer.to_json(),
                        trainer_state={"step": step}, optimizer_state=params)
        print(step, flush=True)
        step += 1
    """
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_during_repeated_saves_leaves_a_loadable_checkpoint(tmp_path, seed):
    folder = tmp_path / "last"
    saver = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert saver.stdout.readline().strip() == "0"
        time.sleep(random.Random(seed).uniform(0.0, 0.3))
    finally:
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    ckpt = load_checkpoint(folder, load_optimizer=True)
    step = ckpt.trainer_state["step"]
    for tensors in (ckpt.params, ckpt.optimizer_state):
        assert all(np.all(array == step) for array in tensors.values())
    save_checkpoint(folder, **make_run())
    assert siblings(folder) == []


def test_loading_while_another_process_keeps_saving(tmp_path):
    """`charlm generate run/` during training: a load racing a save's folder swap still sees one whole checkpoint."""
    folder = tmp_path / "last"
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert saver.stdout.readline().strip() == "0"
        steps = set()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            ckpt = load_checkpoint(folder, load_optimizer=True)
            step = ckpt.trainer_state["step"]
            assert all(np.all(array == step) for array in ckpt.params.values())
            steps.add(step)
    finally:
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    assert len(steps) > 1, "the saver never overwrote the checkpoint during the test"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hand_edited_and_resigned_config_loads_or_fails_cleanly(tmp_path, data):
    """A stranger can re-sign any config.json; whatever it holds, loading raises CheckpointError or works."""
    folder = tmp_path / "ck"
    if not folder.exists():
        save_checkpoint(folder, **make_run())
    original = (folder / CONFIG_FILE).read_bytes()
    config = json.loads(original)
    section = data.draw(st.sampled_from(["model", "train", "whole model"]))
    if section == "whole model":
        config["model"] = data.draw(JSON_VALUES)
    elif section == "model":
        config["model"][data.draw(st.sampled_from(sorted(config["model"]) + ["extra"]))] = data.draw(JSON_VALUES)
    else:
        config["train"] = data.draw(JSON_VALUES)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    rewrite_checksums(folder)
    try:
        load_checkpoint(folder)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
    finally:
        (folder / CONFIG_FILE).write_bytes(original)
        rewrite_checksums(folder)


def test_names_with_line_breaks_in_a_hostile_file_keep_the_message_one_line(tmp_path):
    run = make_run()
    folder = save_checkpoint(tmp_path / "ck", **run)
    hostile = {**run["params"], "evil\nname\r\u2028x": np.zeros(1, np.float32)}
    safetensors.numpy.save_file(hostile, folder / MODEL_FILE)
    rewrite_checksums(folder)
    assert "unexpected evil\\nname" in load_error(folder)
