"""`charlm plot`: a PNG of a real run's loss curves, also while the run is still writing its metrics."""

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from charlm.cli import cli
from charlm.config import TrainConfig
from charlm.plot import read_metrics
from charlm.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny real training run whose metrics.jsonl ends in a torn line, as while training writes it."""
    root = tmp_path_factory.mktemp("plot")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and we love machine learning today".split()
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(200)) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHARLM_CACHE", str(root / "cache"))
        config = TrainConfig.from_dict(dict(
            corpus=str(root / "corpus.txt"), out=str(root / "run"), num_layers=1, hidden_size=16, embed_dim=8,
            seq_len=12, batch_size=4, lr=1e-2, warmup_steps=3, max_steps=20, eval_every=5, checkpoint_every=10,
            log_every=2, seed=1))
        train(config, verbose=False)
    with open(root / "run" / "metrics.jsonl", "a", encoding="utf-8") as metrics:
        metrics.write('{"event": "train", "step": 22, "loss": 2.')
    return root / "run"


def test_plot_draws_a_png_of_every_complete_record(run, tmp_path):
    pytest.importorskip("matplotlib")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
    val_losses = [r["loss"] for r in records if r["event"] == "val"]
    best = min(range(len(val_losses)), key=val_losses.__getitem__)
    best_step = [r["step"] for r in records if r["event"] == "val"][best]

    result = invoke("plot", run, "--out", tmp_path / "loss.png")
    assert result.exit_code == 0, result.output
    assert result.output == (f"wrote {tmp_path / 'loss.png'}: 10 training and 4 validation records to step 20; "
                             f"best validation loss {val_losses[best]:.4f} at step {best_step}\n")
    image = (tmp_path / "loss.png").read_bytes()
    assert image.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")
    assert (width, height) == (1100, 420)
    assert not list(tmp_path.glob(".*tmp*"))

    assert invoke("plot", run).exit_code == 0
    assert (run / "loss.png").read_bytes().startswith(PNG_SIGNATURE)


def test_read_metrics_skips_torn_lines_and_non_finite_losses(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"event": "train", "step": 2, "loss": 3.5, "lr": 0.001, "elapsed": 1.5}\n'
        '{"event": "train", "step": 4, "loss": null, "lr": 0.002, "elapsed": 2.5}\n'
        '{"event": "val", "step": 4, "loss": 3.25, "best": true, "elapsed": 3.0}\n'
        '{"event": "train", "step": 6, "loss": 3.0, "elapsed": 4.0}\n'
        '{"event": "train", "step": 8, "lo'
    )
    train_curve, val_curve = read_metrics(path)
    assert (train_curve.steps, train_curve.seconds, train_curve.losses, train_curve.lrs) == (
        [2, 6], [1.5, 4.0], [3.5, 3.0], [0.001, None])
    assert (val_curve.steps, val_curve.losses) == ([4], [3.25])


@pytest.mark.parametrize("content", [None, "", '{"event": "train", "step": 1, "lo'], ids=["missing", "empty", "torn"])
def test_missing_or_empty_metrics_are_one_line_errors(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    message = one_line_error(invoke("plot", tmp_path))
    if content is None:
        assert message == f"no metrics.jsonl at {tmp_path}; pass a run folder made by charlm train"
    else:
        assert message == f"{tmp_path / 'metrics.jsonl'} holds no training or validation records yet"
    assert not (tmp_path / "loss.png").exists()


def test_missing_matplotlib_is_one_line_naming_the_pip_install(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what the import meets without matplotlib
    message = one_line_error(invoke("plot", run, "--out", tmp_path / "loss.png"))
    assert message == "charlm plot needs matplotlib, which is not installed: pip install 'charlm[plot]'"


def test_an_image_format_matplotlib_cannot_write_is_one_line(run, tmp_path):
    pytest.importorskip("matplotlib")
    message = one_line_error(invoke("plot", run, "--out", tmp_path / "loss.xyz"))
    assert message.startswith(f"cannot write {tmp_path / 'loss.xyz'}: ")
    assert not list(tmp_path.iterdir())
