"""The README's quick tour and Python example run as written, on a tiny corpus and a tiny model."""

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from charlm.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"
# The tour trains on a registered corpus for minutes; here the same commands train a tiny model for a few steps.
TINY_TRAINING = ["--layers", "1", "--hidden", "32", "--embed", "8", "--seq-len", "16", "--batch-size", "4",
                 "--max-steps", "6", "--eval-every", "3", "--checkpoint-every", "3"]
STOP_FLAGS = {"--time-budget", "--max-steps", "--epochs"}


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def tour_commands() -> list[list[str]]:
    """Every `$ charlm ...` line of the quick tour, as argument lists."""
    lines = [line[2:] for line in section("Quick tour").splitlines() if line.startswith("$ charlm ")]
    return [shlex.split(line)[1:] for line in lines]


@pytest.fixture
def tiny_corpus(tmp_path):
    lines = ["To be, or not to be, that is the question.", "ROMEO: But soft, what light through yonder window?"]
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(lines * 60) + "\n", encoding="utf-8")
    return path


def shrunk(args: list[str], corpus: Path) -> list[str]:
    """A `train` command on the tiny corpus with a tiny model and a few steps instead of its budget."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in STOP_FLAGS or arg == "--corpus":
            skip = True
            if arg == "--corpus":
                out += ["--corpus", str(corpus)]
            continue
        out.append(arg)
    return out + TINY_TRAINING


def test_quick_tour_runs_as_written(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = tour_commands()
    assert [args[0] for args in commands] == ["train", "generate", "complete", "eval", "info"]
    for args in commands:
        if args[0] == "train":
            args = shrunk(args, tiny_corpus)
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, (args, result.output, result.exception)
        if args[0] == "generate":
            prompt = args[args.index("--prompt") + 1]
            assert result.stdout.startswith(prompt)
        if args[0] == "complete":
            assert result.stdout.startswith(" 1. ")
        if args[0] == "eval":
            assert "bits/char" in result.stdout
        if args[0] == "info":
            assert "parameters" in result.stdout


def test_python_example_runs_as_written(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", section("Python API"), flags=re.S)
    assert len(blocks) == 1
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 10
    code = code.replace('"tinyshakespeare"', repr(str(tiny_corpus)))
    code = re.sub(r"max_steps=\d+", "max_steps=4", code)
    code = re.sub(r"hidden_size=\d+", "hidden_size=16", code)
    exec(compile(code, "README.md", "exec"), {})


def test_every_relative_link_exists():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in t]
    assert targets
    missing = [t for t in targets if not (README.parent / t).exists()]
    assert not missing, missing


def test_module_table_names_every_module():
    built = section("How it is built")
    package = README.parent / "charlm"
    modules = {p.name for p in package.glob("*.py")} - {"__init__.py", "__main__.py"}
    assert not [name for name in sorted(modules) if f"{name}`" not in built]
    assert "`charlm/kernels/`" in built
    kernels = {p.stem for p in (package / "kernels").glob("*.py")} - {"__init__"}
    assert not [name for name in sorted(kernels) if f"`{name}`" not in built]
