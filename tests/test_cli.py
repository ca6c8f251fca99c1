"""The `charlm` command end to end on a tiny run: every verb, recipes and overrides, and clean user errors."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import charlm.train as train_module
from charlm.cli import cli

TINY = ["--layers", "1", "--hidden", "24", "--embed", "8", "--seq-len", "16", "--batch-size", "4",
        "--lr", "0.02", "--warmup", "2", "--eval-every", "5", "--checkpoint-every", "5", "--log-every", "2"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A corpus and one trained run shared by the read-only commands (own cache, like every test)."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHARLM_CACHE", str(root / "cache"))
        rng = np.random.default_rng(1)
        words = "the cat sat on a mat and we love machine learning today".split()
        lines = [" ".join(words[i] for i in rng.integers(0, len(words), 8)) for _ in range(300)]
        (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        result = invoke("train", "--corpus", root / "corpus.txt", "--out", root / "run", "--max-steps", 10, *TINY)
        assert result.exit_code == 0, result.output
        yield root


def test_train_writes_a_run_and_reports_it(workdir):
    run = workdir / "run"
    assert {p.name for p in run.iterdir()} >= {"last", "best", "metrics.jsonl"}
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events.count("val") == 2 and events.count("train") == 5


def test_info_shows_config_parameters_steps_and_best_loss(workdir):
    result = invoke("info", workdir / "run")
    assert result.exit_code == 0
    assert "1x24 LSTM" in result.output and "parameters" in result.output and "best val" in result.output
    doc = json.loads(invoke("info", workdir / "run", "--json").output)
    assert doc["step"] == 10 and doc["parameters"] > 0 and doc["best_val_loss"] > 0
    assert doc["train"]["max_steps"] == 10


def test_generate_is_reproducible_with_a_seed_and_greedy_at_temperature_zero(workdir):
    run = workdir / "run"
    first = invoke("generate", run, "--prompt", "the ", "--length", 30, "--seed", 7)
    second = invoke("generate", run, "--prompt", "the ", "--length", 30, "--seed", 7)
    assert first.exit_code == 0 and first.output == second.output and first.output.startswith("the ")
    greedy = [invoke("generate", run, "--prompt", "we", "--length", 20, "--temperature", 0).output for _ in range(2)]
    assert greedy[0] == greedy[1]
    two = invoke("generate", run, "--length", 10, "--seed", 1, "--num-samples", 2, "--top-k", 5, "--top-p", 0.9)
    assert two.exit_code == 0 and "-" * 40 in two.output


def test_complete_prints_ranked_json(workdir):
    result = invoke("complete", workdir / "run", "we love machine ___", "--top", 3, "--json")
    assert result.exit_code == 0
    ranked = json.loads(result.output)
    assert 1 <= len(ranked) <= 3 and all(set(r) == {"text", "prob"} for r in ranked)
    assert [r["prob"] for r in ranked] == sorted((r["prob"] for r in ranked), reverse=True)


def test_eval_on_the_validation_split_reproduces_the_logged_loss(workdir):
    result = invoke("eval", workdir / "run", "--json")
    assert result.exit_code == 0
    doc = json.loads(result.output)
    assert doc["split"] == "valid" and doc["tokens"] > 0 and doc["chars"] > 0
    val = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    best = min(m["loss"] for m in val if m["event"] == "val")
    assert doc["loss"] == pytest.approx(best, rel=1e-9)
    assert "bits/char" in invoke("eval", workdir / "run", "--corpus", workdir / "corpus.txt").output


@pytest.mark.parametrize("args, message", [
    (["train", "--corpus", "{corpus}", "--out", "{tmp}/x", "--layers", "0"], "--layers must be a positive integer"),
    (["train", "--corpus", "{corpus}", "--out", "{tmp}/x", "--dropout", "-0.1"], "--dropout must be in"),
    (["train", "--corpus", "no-such-corpus", "--out", "{tmp}/x"], "unknown corpus"),
    (["train", "--out", "{tmp}/x"], "--corpus is required"),
    (["train", "--corpus", "{corpus}", "--out", "{run}"], "already holds a training run"),
    (["train", "--corpus", "{corpus}", "--out", "{run}", "--resume", "--hidden", "32"], "--hidden 24 -> 32"),
    (["train", "--config", "{tmp}/missing.toml"], "config file not found"),
    (["generate", "{run}", "--top-p", "1.5"], "top-p must be in"),
    (["generate", "{run}", "--top-p", "0"], "top-p must be in"),
    (["generate", "{run}", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "{run}", "--top-k", "-1"], "top-k must be >= 0"),
    (["generate", "{run}", "--length", "0"], "length must be at least 1"),
    (["generate", "{run}", "--num-samples", "0"], "--num-samples must be at least 1"),
    (["generate", "{run}", "--prompt", "Zebra!"], "Z"),
    (["complete", "{run}", "no blank here"], "blank"),
    (["eval", "{run}", "--split", "test"], "no test split"),
    (["info", "{tmp}/nowhere"], "no checkpoint"),
])
def test_user_errors_exit_2_with_one_line(workdir, tmp_path, args, message):
    fill = {"corpus": workdir / "corpus.txt", "run": workdir / "run", "tmp": tmp_path}
    result = CliRunner().invoke(cli, [a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_unknown_prompt_characters_can_be_replaced(workdir):
    result = invoke("generate", workdir / "run", "--prompt", "Zebra", "--length", 5, "--unknown", "replace",
                    "--seed", 0)
    assert result.exit_code == 0 and result.output.startswith("Zebra")


def test_recipe_flags_override_and_resume_continues_to_the_requested_steps(workdir, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'corpus = "{workdir / "corpus.txt"}"\nhidden_size = 40\nmax_steps = 4\n')
    out = tmp_path / "run"
    assert invoke("train", "--config", recipe, "--out", out, *TINY).exit_code == 0
    doc = json.loads(invoke("info", out / "last", "--json").output)
    assert doc["model"]["hidden_size"] == 24 and doc["step"] == 4

    again = invoke("train", "--out", out, "--resume")
    assert again.exit_code == 0 and "nothing to do" in again.stderr
    longer = invoke("train", "--out", out, "--resume", "--max-steps", 7)
    assert longer.exit_code == 0
    assert json.loads(invoke("info", out / "last", "--json").output)["step"] == 7


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_training_saves_and_exits_128_plus_signal(workdir, tmp_path, monkeypatch, signum, exit_code):
    real_step = train_module._Run._train_step

    def interrupted(self):
        if self.step == 2:
            os.kill(os.getpid(), signum)
        return real_step(self)

    monkeypatch.setattr(train_module._Run, "_train_step", interrupted)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--corpus", str(workdir / "corpus.txt"), "--out", str(out),
                                      "--max-steps", "20", *TINY])
    assert result.exit_code == exit_code
    assert "interrupted at step 3" in result.stderr and "--resume" in result.stderr
    assert (out / "last").is_dir()


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "charlm", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert all(verb in result.stdout for verb in ("train", "generate", "complete", "eval", "info"))
