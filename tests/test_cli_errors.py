"""Every error a user can cause leaves the CLI as one `error: ...` line on stderr with exit status 2, never a
traceback: bad corpora, prompts outside the vocabulary, missing or damaged checkpoints, out-of-range flags,
run folders that would be overwritten. Hypothesis throws random Unicode prompts at generate and complete."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import rewrite_checksums
from charlm.checkpoint import CHECKSUMS_FILE, CONFIG_FILE, FORMAT_VERSION, MODEL_FILE, TOKENIZER_FILE
from charlm.cli import cli
from charlm.corpus import registry
from charlm.tokenize import train_tokenizer

TINY_MODEL = ["--layers", "1", "--hidden", "16", "--embed", "8", "--seq-len", "16", "--batch-size", "4"]
TINY_RUN = [*TINY_MODEL, "--max-steps", "2", "--eval-every", "2", "--checkpoint-every", "2"]
# Random prompts: any code point but lone surrogates, which test_prompt_with_lone_surrogates covers every time.
ANY_TEXT = st.text(max_size=24)


def invoke(*args: str):
    """Run the CLI in-process; an exception escaping it (which would print a traceback) fails the test."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"charlm {' '.join(map(str, args))} raised instead of exiting") from result.exception
    return result


def user_error(*args: str) -> str:
    """The single `error: ` line of a command that must fail with exit status 2; returns the message."""
    result = invoke(*args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0].removeprefix("error: ")


def write_corpus(path: Path, lines: int = 200) -> Path:
    rng = random.Random(1)
    words = "the cat sat on a mat and the dog ran far away from home".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny char model trained for a few steps: (run folder, corpus), shared by the module."""
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus.txt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHARLM_CACHE", str(root / "cache"))
        result = invoke("train", "--corpus", corpus, "--out", root / "run", *TINY_RUN)
    assert result.exit_code == 0, result.output
    return root / "run", corpus


@pytest.fixture
def checkpoint_copy(trained, tmp_path) -> Path:
    """A private copy of the trained last/ checkpoint, free to damage."""
    return Path(shutil.copytree(trained[0] / "last", tmp_path / "ck"))


# --- corpora -----------------------------------------------------------------------------------------------

def test_missing_corpus(tmp_path):
    message = user_error("train", "--corpus", tmp_path / "nope.txt", "--out", tmp_path / "run", *TINY_RUN)
    assert message == f"corpus file not found: {tmp_path / 'nope.txt'}"


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    message = user_error("train", "--corpus", tmp_path / "empty.txt", "--out", tmp_path / "run", *TINY_RUN)
    assert message == f"corpus file is empty: {tmp_path / 'empty.txt'}"


def test_binary_corpus(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"some text\x00\x01\x02 more")
    message = user_error("train", "--corpus", tmp_path / "data.bin", "--out", tmp_path / "run", *TINY_RUN)
    assert message.startswith("corpus file looks binary (NUL byte at offset 9)")


def test_non_utf8_corpus_fails_unless_replacing(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(write_corpus(tmp_path / "utf8.txt").read_text().replace("cat", "caf\xe9").encode("latin-1"))
    message = user_error("train", "--corpus", latin1, "--out", tmp_path / "run", *TINY_RUN)
    assert message.startswith("corpus file is not UTF-8 (byte 0xe9 at offset")
    replaced = invoke("train", "--corpus", latin1, "--out", tmp_path / "run", "--encoding-errors", "replace",
                      *TINY_RUN)
    assert replaced.exit_code == 0, replaced.output


def test_corpus_shorter_than_one_batch_window(tmp_path):
    (tmp_path / "short.txt").write_text("just a few words\nand a line\n")
    message = user_error("train", "--corpus", tmp_path / "short.txt", "--out", tmp_path / "run", *TINY_RUN)
    assert "one batch window needs batch_size 4 x (seq_len 16 + 1)" in message


def test_unknown_corpus_name_lists_known_ones(tmp_path):
    message = user_error("train", "--corpus", "no-such-corpus", "--out", tmp_path / "run", *TINY_RUN)
    assert message.startswith("unknown corpus 'no-such-corpus'; known corpora:")
    assert all(name in message for name in registry())


# --- prompts -----------------------------------------------------------------------------------------------

def test_generate_prompt_outside_vocabulary_names_the_characters(trained):
    run, _ = trained
    message = user_error("generate", run, "--prompt", "the ☃ cat ✓", "--length", "3")
    assert "'☃'" in message and "'✓'" in message and "'c'" not in message
    replaced = invoke("generate", run, "--prompt", "the ☃ cat ✓", "--length", "3", "--unknown", "replace",
                      "--seed", "1")
    assert replaced.exit_code == 0 and replaced.stdout.startswith("the ☃ cat ✓")


def test_complete_text_outside_vocabulary_names_the_characters(trained):
    run, _ = trained
    assert "'☃'" in user_error("complete", run, "the ☃ sat on ___")
    replaced = invoke("complete", run, "the ☃ sat on ___", "--unknown", "replace", "--top", "2", "--json")
    assert replaced.exit_code == 0 and len(json.loads(replaced.stdout)) >= 1


@pytest.mark.parametrize("unknown", ["error", "replace"])
def test_prompt_with_lone_surrogates(trained, unknown):
    """What Python makes of argv bytes that are not UTF-8 (surrogateescape): never a traceback."""
    run, _ = trained
    for args in (["generate", run, "--prompt", "caf\udce9", "--length", "2"], ["complete", run, "\ud800 ___"]):
        assert invoke(*args, "--unknown", unknown).exit_code in (0, 2)


def test_prompt_with_bytes_that_are_not_utf8_from_a_real_shell(trained):
    """argv bytes that are not UTF-8 reach Python as lone surrogates; that must still be a clean error."""
    run, _ = trained
    for extra in ([], [b"--unknown", b"replace"]):
        process = subprocess.run(
            [sys.executable, "-m", "charlm", "generate", str(run), "--prompt", b"caf\xe9", "--length", "2", *extra],
            capture_output=True,
        )
        assert b"Traceback" not in process.stderr, process.stderr.decode(errors="replace")
        assert process.returncode in (0, 2)
        if process.returncode == 2:
            assert process.stderr.startswith(b"error: ") and process.stderr.count(b"\n") == 1


# --- checkpoints -------------------------------------------------------------------------------------------

def test_missing_checkpoint_folder(tmp_path):
    for command in (["generate"], ["complete"], ["eval"], ["info"]):
        args = [*command, tmp_path / "nothing"] + (["a ___"] if command == ["complete"] else [])
        assert user_error(*args) == f"no checkpoint at {tmp_path / 'nothing'}"


def test_missing_checkpoint_file(checkpoint_copy):
    (checkpoint_copy / MODEL_FILE).unlink()
    assert user_error("generate", checkpoint_copy) == f"checkpoint {checkpoint_copy} is missing {MODEL_FILE}"


def test_truncated_weights(checkpoint_copy):
    data = (checkpoint_copy / MODEL_FILE).read_bytes()
    (checkpoint_copy / MODEL_FILE).write_bytes(data[: len(data) - 100])
    message = user_error("generate", checkpoint_copy)
    assert message.startswith(f"{checkpoint_copy / MODEL_FILE} is truncated or altered")


def test_bit_flipped_weights(checkpoint_copy):
    data = bytearray((checkpoint_copy / MODEL_FILE).read_bytes())
    data[-5] ^= 0x10
    (checkpoint_copy / MODEL_FILE).write_bytes(bytes(data))
    assert user_error("info", checkpoint_copy) == (
        f"{checkpoint_copy / MODEL_FILE} is corrupt (sha256 does not match {CHECKSUMS_FILE})"
    )


def test_weights_that_do_not_match_config(checkpoint_copy):
    config = json.loads((checkpoint_copy / CONFIG_FILE).read_text())
    config["model"]["hidden_size"] = 24
    (checkpoint_copy / CONFIG_FILE).write_text(json.dumps(config))
    rewrite_checksums(checkpoint_copy)
    message = user_error("generate", checkpoint_copy)
    assert "does not match config.json" in message and "expected (96, 8)" in message


def test_tokenizer_that_does_not_match_vocabulary(checkpoint_copy):
    vocab_size = json.loads((checkpoint_copy / CONFIG_FILE).read_text())["model"]["vocab_size"]
    other = train_tokenizer("char", "xyz")
    (checkpoint_copy / TOKENIZER_FILE).write_text(other.to_json())
    rewrite_checksums(checkpoint_copy)
    assert user_error("generate", checkpoint_copy).endswith(
        f"tokenizer.json has {other.vocab_size} tokens but config.json says vocab_size {vocab_size}"
    )


def test_checkpoint_from_a_newer_format(checkpoint_copy):
    config = json.loads((checkpoint_copy / CONFIG_FILE).read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (checkpoint_copy / CONFIG_FILE).write_text(json.dumps(config))
    assert user_error("generate", checkpoint_copy) == (
        f"checkpoint format {FORMAT_VERSION + 1} is newer than this charlm supports ({FORMAT_VERSION}); "
        "upgrade charlm"
    )


def test_resume_with_changed_model_config(trained, tmp_path):
    run, corpus = trained
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    message = user_error("train", "--corpus", corpus, "--out", copy, "--resume", "--hidden", "32")
    assert message.startswith("--resume cannot change the model or data settings of a run")
    assert "--hidden 16 -> 32" in message



def test_resume_without_a_checkpoint_says_so(trained, tmp_path):
    """`--resume` alone on a run whose last/ is gone names the missing checkpoint, not a missing --corpus."""
    run, _ = trained
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    shutil.rmtree(copy / "last")
    assert user_error("train", "--out", copy, "--resume") == (
        f"no checkpoint to resume in {copy} (pass --corpus to start a new run there)"
    )
    assert user_error("train", "--resume") == "--resume needs --out, the folder of the run to continue"


# --- flags -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--hidden", "0"), ("--embed", "-1"), ("--layers", "0"), ("--batch-size", "0"), ("--seq-len", "-4"),
    ("--max-steps", "0"), ("--vocab-size", "-5"), ("--checkpoint-every", "0"),
])
def test_train_sizes_must_be_positive(trained, tmp_path, flag, value):
    _, corpus = trained
    args = ["train", "--corpus", corpus, "--out", tmp_path / "run", *TINY_RUN, flag, value]
    assert user_error(*args) == f"{flag} must be a positive integer, got {value}"


@pytest.mark.parametrize("flags, expected", [
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--top-p", "-0.1"], "top-p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-k", "-3"], "top-k must be >= 0 (0 = all tokens)"),
    (["--length", "0"], "length must be at least 1"),
])
def test_generate_flags_out_of_range(trained, flags, expected):
    assert expected in user_error("generate", trained[0], *flags)


def test_output_folder_with_another_run_needs_resume_or_force(trained, tmp_path):
    run, corpus = trained
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    message = user_error("train", "--corpus", corpus, "--out", copy, *TINY_RUN, "--seed", "3")
    assert message == f"{copy} already holds a training run; pass --resume to continue it or --force to replace it"
    forced = invoke("train", "--corpus", corpus, "--out", copy, *TINY_RUN, "--seed", "3", "--force")
    assert forced.exit_code == 0, forced.output


def test_output_folder_with_unrelated_files(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    message = user_error("train", "--corpus", trained[1], "--out", tmp_path, *TINY_RUN)
    assert message == f"{tmp_path} exists and is not empty; choose another --out or pass --force"


def test_real_entry_point_prints_one_line_and_exits_2(tmp_path):
    process = subprocess.run([sys.executable, "-m", "charlm", "info", str(tmp_path / "missing")],
                             capture_output=True, text=True)
    assert process.returncode == 2
    assert process.stderr == f"error: no checkpoint at {tmp_path / 'missing'}\n"


# --- random prompts ----------------------------------------------------------------------------------------

def assert_clean_outcome(result) -> None:
    """Success, or one `error:` line with status 2; anything else (a traceback) fails."""
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=ANY_TEXT, unknown=st.sampled_from(["error", "replace"]), temperature=st.sampled_from(["0", "0.8"]))
def test_generate_on_random_prompts_never_tracebacks(trained, prompt, unknown, temperature):
    result = invoke("generate", trained[0], "--prompt", prompt, "--length", "4", "--unknown", unknown,
                    "--temperature", temperature, "--seed", "0")
    assert_clean_outcome(result)
    if unknown == "replace":
        assert result.exit_code == 0, result.stderr


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=ANY_TEXT, after=ANY_TEXT, blanks=st.sampled_from([0, 1, 1, 1, 2]),
       unknown=st.sampled_from(["error", "replace"]))
def test_complete_on_random_text_never_tracebacks(trained, before, after, blanks, unknown):
    text = before + "___" * blanks + after
    result = invoke("complete", trained[0], text, "--top", "2", "--beam-width", "2", "--unknown", unknown)
    assert_clean_outcome(result)
