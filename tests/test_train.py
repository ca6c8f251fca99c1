"""The training loop on tiny models: learning, exact resume, signals, non-finite steps, run folders."""

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest

import charlm.train as train_module
from charlm.checkpoint import load_checkpoint, load_model, save_checkpoint, saved_train_config
from charlm.config import TrainConfig, merge_options, option_default
from charlm.corpus import resolve_corpus
from charlm.errors import ConfigError, CorpusError
from charlm.evaluate import evaluate
from charlm.train import VOLATILE_METRIC_KEYS, TrainingDiverged, train


@pytest.fixture
def corpus(tmp_path):
    """A small, learnable text: a few sentences repeated with varying order."""
    rng = np.random.default_rng(0)
    sentences = ["the cat sat on the mat.", "a dog ran in the park!", "birds sing at dawn?", "we love tea."]
    lines = [" ".join(sentences[i] for i in rng.integers(0, len(sentences), 3)) for _ in range(200)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(corpus, out, **overrides) -> TrainConfig:
    options = dict(corpus=str(corpus), out=str(out), num_layers=1, hidden_size=24, embed_dim=8, dropout=0.1,
                   seq_len=12, batch_size=4, lr=1e-2, warmup_steps=3, max_steps=24, eval_every=8,
                   checkpoint_every=5, log_every=3, seed=3)
    options.update(overrides)
    return TrainConfig.from_dict(options)


def stable_metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE_METRIC_KEYS} for line in lines]


def weights(folder: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(folder).params


class Killed(Exception):
    """Stands in for SIGKILL: the process stops dead, nothing is saved."""


def test_training_lowers_validation_loss_and_writes_the_run_folder(corpus, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(corpus, out, max_steps=60, eval_every=20, dropout=0.0, lr=3e-2, hidden_size=32,
                               seq_len=24, batch_size=8), verbose=False)
    assert result.stop_reason == "max_steps" and result.step == 60
    val = [m for m in stable_metrics(out) if m["event"] == "val"]
    assert [m["step"] for m in val] == [20, 40, 60]
    assert val[-1]["loss"] < 0.5 * math.log(load_checkpoint(out / "last").model_config.vocab_size)
    assert result.best_val_loss == min(m["loss"] for m in val)
    assert load_checkpoint(out / "best").trainer_state["best_val_loss"] == result.best_val_loss
    state = load_checkpoint(out / "last", load_optimizer=True)
    assert state.trainer_state["step"] == 60 and state.trainer_state["optimizer_steps"] == 60
    assert {"state.h", "state.c"} <= set(state.optimizer_state)
    assert state.train_config["max_steps"] == 60


@pytest.mark.parametrize("options", [
    dict(dropout=0.3, random_length=True, seq_len=10),
    dict(dropout=0.3, locked_dropout=False, weight_drop=0.2, window_sampling="random", seq_len=10),
    dict(dropout=0.3, ema_decay=0.9, seq_len=10),
], ids=["streams", "random-windows", "weight-average"])
def test_killed_run_resumes_bit_identically(corpus, tmp_path, monkeypatch, options):
    """Dropout and weight-drop masks, random windows or lengths and a carried state all survive a kill
    between checkpoints."""
    reference = tmp_path / "reference"
    train(tiny_config(corpus, reference, **options), verbose=False)

    killed = tmp_path / "killed"
    real_step = train_module._Run._train_step

    def dies_at_step_13(self):
        if self.step == 13:
            raise Killed
        return real_step(self)

    monkeypatch.setattr(train_module._Run, "_train_step", dies_at_step_13)
    with pytest.raises(Killed):
        train(tiny_config(corpus, killed, **options), verbose=False)
    monkeypatch.setattr(train_module._Run, "_train_step", real_step)
    assert load_checkpoint(killed / "last").trainer_state["step"] == 10
    assert max(m["step"] for m in stable_metrics(killed)) == 12

    result = train(tiny_config(corpus, killed, **options), resume=True, verbose=False)
    assert result.step == 24
    for name, array in weights(reference / "last").items():
        assert np.array_equal(array, weights(killed / "last")[name]), name
    assert stable_metrics(killed) == stable_metrics(reference)


def test_the_weight_average_is_validated_and_saved_while_training_moves_the_weights(corpus, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(corpus, out, ema_decay=0.9), verbose=False)
    last = load_checkpoint(out / "last", load_optimizer=True)
    trained = {name.removeprefix("train."): array for name, array in last.optimizer_state.items()
               if name.startswith("train.")}
    assert set(trained) == set(last.params)
    assert all(not np.array_equal(trained[name], last.params[name]) for name in trained)
    # The logged validation loss is the saved average's: evaluating best/ on the same split reproduces it.
    model, tokenizer, best = load_model(out / "best")
    splits = resolve_corpus(str(corpus))
    assert evaluate(model, tokenizer, splits.valid).loss == pytest.approx(result.best_val_loss, rel=1e-5)


def test_sigint_saves_and_resume_matches_uninterrupted(corpus, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    train(tiny_config(corpus, reference), verbose=False)

    out = tmp_path / "interrupted"
    real_step = train_module._Run._train_step

    def interrupted_at_step_7(self):
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self)

    monkeypatch.setattr(train_module._Run, "_train_step", interrupted_at_step_7)
    result = train(tiny_config(corpus, out), verbose=False)
    monkeypatch.setattr(train_module._Run, "_train_step", real_step)
    assert result.signal_number == signal.SIGINT and result.stop_reason == "interrupted"
    assert result.step == 7
    assert load_checkpoint(out / "last").trainer_state["step"] == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    train(tiny_config(corpus, out), resume=True, verbose=False)
    for name, array in weights(reference / "last").items():
        assert np.array_equal(array, weights(out / "last")[name]), name
    assert stable_metrics(out) == stable_metrics(reference)


def test_resume_keeps_going_to_a_larger_max_steps_and_stops_when_done(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_steps=6), verbose=False)
    again = train(tiny_config(corpus, out, max_steps=6), resume=True, verbose=False)
    assert again.stop_reason.startswith("already finished") and again.step == 6
    longer = train(tiny_config(corpus, out, max_steps=9), resume=True, verbose=False)
    assert longer.step == 9
    assert load_checkpoint(out / "last").trainer_state["step"] == 9


def test_non_finite_steps_are_skipped_then_stop_the_run(corpus, tmp_path, monkeypatch):
    real_clip = train_module.clip_grad_norm
    calls = {"n": 0}

    def nan_on_calls_3_and_4(grads, max_norm):
        calls["n"] += 1
        norm = real_clip(grads, max_norm)
        return math.nan if calls["n"] in (3, 4) else norm

    monkeypatch.setattr(train_module, "clip_grad_norm", nan_on_calls_3_and_4)
    result = train(tiny_config(corpus, tmp_path / "skips", max_steps=8), verbose=False)
    assert result.nonfinite_steps == 2 and result.step == 8
    assert load_checkpoint(tmp_path / "skips" / "last", load_optimizer=True).trainer_state["optimizer_steps"] == 6

    monkeypatch.setattr(train_module, "clip_grad_norm", lambda grads, max_norm: math.inf)
    out = tmp_path / "diverged"
    with pytest.raises(TrainingDiverged, match="5 steps in a row"):
        train(tiny_config(corpus, out, checkpoint_every=100), verbose=False)
    assert not (out / "last").exists()


def test_output_folder_holding_a_run_needs_resume_or_force(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_steps=3), verbose=False)
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(tiny_config(corpus, out, max_steps=3), verbose=False)
    with pytest.raises(ConfigError, match="not both"):
        train(tiny_config(corpus, out, max_steps=3), resume=True, force=True, verbose=False)
    with pytest.raises(CorpusError):
        train(tiny_config(tmp_path / "missing.txt", out), force=True, verbose=False)
    assert (out / "last").is_dir()  # a failed --force start leaves the old run alone
    result = train(tiny_config(corpus, out, max_steps=4, seed=5), force=True, verbose=False)
    assert result.step == 4
    assert [m["step"] for m in stable_metrics(out)][0] == 3

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        train(tiny_config(corpus, other, max_steps=3), verbose=False)


def test_resume_refuses_a_changed_model(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_steps=3, ema_decay=0.0), verbose=False)
    with pytest.raises(ConfigError, match="--hidden 24 -> 32"):
        train(tiny_config(corpus, out, hidden_size=32, ema_decay=0.0), resume=True, verbose=False)
    # A run saved before a setting existed ran with the default of its day (no weight average, where today's
    # default is one): turning the average on is a change, and resuming from the saved options keeps it off.
    last = out / "last"
    checkpoint = load_checkpoint(last, load_optimizer=True)
    del checkpoint.train_config["ema_decay"]
    save_checkpoint(last, model_config=checkpoint.model_config, params=checkpoint.params,
                    tokenizer_json=checkpoint.tokenizer_json, trainer_state=checkpoint.trainer_state,
                    optimizer_state=checkpoint.optimizer_state, train_config=checkpoint.train_config)
    with pytest.raises(ConfigError, match="--ema-decay 0.0 -> 0.9"):
        train(tiny_config(corpus, out, ema_decay=0.9), resume=True, verbose=False)
    with pytest.raises(ConfigError, match=f"--ema-decay 0.0 -> {option_default('ema_decay')}"):
        train(tiny_config(corpus, out, max_steps=4), resume=True, verbose=False)
    saved = saved_train_config(out)
    assert saved["ema_decay"] == 0.0
    assert train(TrainConfig.from_dict(merge_options(saved, {"max_steps": 4})), resume=True, verbose=False).step == 4


def test_default_warmup_is_a_share_of_the_run(corpus, tmp_path):
    """Without warmup_steps the rate warms up over 2 % of the planned steps: 2 of 100 here."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, warmup_steps=None, max_steps=100, log_every=1, eval_every=100), verbose=False)
    rates = [m["lr"] for m in stable_metrics(out) if m["event"] == "train"]
    assert rates[:3] == pytest.approx([0.5e-2, 1e-2, 1e-2]) and rates[3] < 1e-2


def test_time_budget_and_epochs_stop_cleanly(corpus, tmp_path):
    timed = train(tiny_config(corpus, tmp_path / "timed", max_steps=None, time_budget=1e-4), verbose=False)
    assert timed.stop_reason == "time_budget" and timed.step >= 1
    assert (tmp_path / "timed" / "best").is_dir() and (tmp_path / "timed" / "last").is_dir()

    one_epoch = train(tiny_config(corpus, tmp_path / "epoch", max_steps=None, epochs=1, seq_len=50, batch_size=32,
                                  eval_every=1000), verbose=False)
    state = load_checkpoint(tmp_path / "epoch" / "last").trainer_state
    assert one_epoch.stop_reason == "epochs" and state["epoch"] == 1
    assert state["data"]["position"] == 0  # every window of the epoch used, the cursor back at the start
    assert [m["epoch"] for m in stable_metrics(tmp_path / "epoch")][:-1] == [0] * (len(stable_metrics(
        tmp_path / "epoch")) - 1)


def test_a_budget_spent_validating_ends_the_run_with_that_validation(corpus, tmp_path, monkeypatch):
    """The scheduled validation at step 3 uses up the budget: the run ends there, without a step 4 and a
    second validation of nearly the same weights."""
    spent = {"seconds": 0.0}
    real_elapsed, real_evaluate = train_module._Run.elapsed, train_module.evaluate_ids

    def slow_evaluate(*args, **kwargs):
        spent["seconds"] = 3600.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module._Run, "elapsed", lambda self: real_elapsed(self) + spent["seconds"])
    monkeypatch.setattr(train_module, "evaluate_ids", slow_evaluate)
    out = tmp_path / "run"
    result = train(tiny_config(corpus, out, max_steps=None, time_budget=30.0, eval_every=3), verbose=False)
    assert result.stop_reason == "time_budget" and result.step == 3
    assert [m["step"] for m in stable_metrics(out) if m["event"] == "val"] == [3]


def test_flops_estimate_counts_every_matrix():
    config = TrainConfig(corpus="x", out="y").model.with_vocab_size(10)
    lstm = 4 * 512 * (128 + 512) + 4 * 512 * (512 + 512)
    assert train_module.training_flops_per_token(config) == 6 * (lstm + 10 * 512)


def test_a_non_finite_validation_loss_is_logged_as_null_and_never_best(corpus, tmp_path, monkeypatch):
    from charlm.evaluate import EvalResult

    nan = EvalResult(loss=math.nan, perplexity=math.nan, bits_per_char=math.nan, tokens=10, chars=10)
    monkeypatch.setattr(train_module, "evaluate_ids", lambda *args, **kwargs: nan)
    out = tmp_path / "run"
    result = train(tiny_config(corpus, out, max_steps=4, eval_every=2), verbose=False)
    assert result.best_val_loss is None and not (out / "best").exists()
    val = [m for m in stable_metrics(out) if m["event"] == "val"]
    assert [m["loss"] for m in val] == [None, None] and not any(m["best"] for m in val)


def test_validation_on_a_fixed_sample_of_a_large_split(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, eval_tokens=320, max_steps=16, eval_every=4), verbose=True)
    val = [m for m in stable_metrics(out) if m["event"] == "val"]
    assert len(val) == 4 and {m["tokens"] for m in val} == {320}  # 16 streams of 20 predictions, every time
    assert "fixed sample of 320 of the" in capsys.readouterr().err
    whole = tmp_path / "whole"
    train(tiny_config(corpus, whole, eval_tokens=0, max_steps=16, eval_every=4), verbose=False)
    assert [m["tokens"] for m in stable_metrics(whole) if m["event"] == "val"][0] > 320
    assert load_checkpoint(out / "last").params.keys() == load_checkpoint(whole / "last").params.keys()
