"""The user's whole path through the CLI: train on a generated corpus, then complete, eval, generate, resume."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from charlm.cli import cli

# "I love machine ___" should be "learning" (0.50 / 0.65) before "tools" (0.15 / 0.65); "I like machine
# tools." makes the model tell "love" from "like" instead of just counting what follows "machine".
SENTENCES = {
    "I love machine learning.": 0.50,
    "I love machine tools.": 0.15,
    "I love deep learning.": 0.15,
    "I love deep water.": 0.10,
    "I like machine tools.": 0.10,
}
TRAIN_FLAGS = [
    "--tokenizer", "char", "--layers", "1", "--hidden", "64", "--embed", "16", "--dropout", "0",
    "--seq-len", "32", "--batch-size", "16", "--lr", "1e-2", "--warmup", "20", "--eval-every", "100",
    "--checkpoint-every", "100", "--log-every", "10", "--seed", "0",
]
STEPS = 200


def love_corpus(lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    names = list(SENTENCES)
    picks = rng.choice(len(names), size=lines, p=list(SENTENCES.values()))
    return "\n".join(names[i] for i in picks) + "\n"


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One training run shared by every test here (the slow part), with its own encoded-id cache."""
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "love.txt"
    corpus.write_text(love_corpus(3000, seed=0), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHARLM_CACHE", str(root / "cache"))
        invoke("train", "--corpus", str(corpus), "--out", str(root / "run"), "--max-steps", str(STEPS),
               *TRAIN_FLAGS)
        yield root


def test_complete_ranks_learning_first(workspace):
    out = invoke("complete", str(workspace / "run"), "I love machine ___", "--json").stdout
    ranked = json.loads(out)
    assert [item["text"] for item in ranked[:2]] == ["learning", "tools"]
    assert ranked[0]["prob"] > 0.5
    assert [item["prob"] for item in ranked] == sorted((item["prob"] for item in ranked), reverse=True)
    assert all(set(item) == {"text", "prob"} for item in ranked)


def test_text_after_the_blank_is_scored(workspace):
    ranked = json.loads(invoke("complete", str(workspace / "run"), "I love ___ water.", "--json").stdout)
    assert ranked[0]["text"] == "deep"


def test_eval_reports_the_logged_validation_loss(workspace):
    run = workspace / "run"
    best = [record for record in read_metrics(run) if record["event"] == "val" and record["best"]][-1]
    doc = json.loads(invoke("eval", str(run), "--corpus", str(workspace / "love.txt"), "--split", "valid",
                            "--json").stdout)
    assert doc["loss"] == pytest.approx(best["loss"], rel=1e-6)
    assert doc["bits_per_char"] == pytest.approx(best["bits_per_char"], rel=1e-6)
    assert doc["tokens"] == doc["chars"] > 1000  # char model: one token per character
    assert doc["loss"] < 0.5  # the sentences are learned: far below log(vocab) ~ 3


def test_generate_is_reproducible_within_and_across_processes(workspace):
    args = ["generate", str(workspace / "run"), "--prompt", "I love", "--length", "200", "--seed", "1"]
    first = invoke(*args).stdout
    assert first == invoke(*args).stdout
    env = {**os.environ, "CHARLM_CACHE": str(workspace / "cache")}
    separate = subprocess.run([sys.executable, "-m", "charlm", *args], capture_output=True, text=True, env=env,
                              check=True, timeout=300)
    assert separate.stdout == first
    assert first.startswith("I love") and len(first) > len("I love") + 100
    assert invoke(*args[:-1], "2").stdout != first


def test_greedy_generation_says_the_likeliest_sentence(workspace):
    out = invoke("generate", str(workspace / "run"), "--prompt", "I love machine", "--length", "10",
                 "--temperature", "0").stdout
    assert out.startswith("I love machine learning.")


def test_resume_continues_the_step_count(workspace, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)
    invoke("train", "--corpus", str(workspace / "love.txt"), "--out", str(run), "--resume",
           "--max-steps", str(STEPS + 40), *TRAIN_FLAGS)
    train_steps = [record["step"] for record in read_metrics(run) if record["event"] == "train"]
    assert train_steps == list(range(10, STEPS + 41, 10))
    info = json.loads(invoke("info", str(run / "last"), "--json").stdout)
    assert info["step"] == STEPS + 40
