from pathlib import Path

import pytest

from charlm.config import Architecture, ModelConfig, TrainConfig, load_recipe, merge_options, merge_train_config
from charlm.corpus import registry
from charlm.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def train_options(**overrides) -> TrainConfig:
    return TrainConfig.from_dict({"corpus": "c.txt", "out": "run", "num_layers": 1, "hidden_size": 24,
                                  "embed_dim": 8, **overrides})


@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", 0, "vocab_size must be a positive integer"),
    ("hidden_size", 2.5, "hidden_size must be a positive integer"),
    ("num_layers", True, "num_layers must be a positive integer"),
    ("dropout", 1.0, "dropout must be in"),
    ("dropout", "0.2", "dropout must be a number"),
    ("weight_drop", -0.1, "weight_drop must be in"),
    ("locked_dropout", 1, "locked_dropout must be true or false"),
    ("tie_weights", "yes", "tie_weights must be true or false"),
    ("dtype", "float16", "dtype must be one of"),
])
def test_out_of_range_values_are_config_errors(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{"vocab_size": 10, field: value})


def test_tie_weights_needs_equal_embedding_and_hidden_sizes():
    with pytest.raises(ConfigError, match="embed_dim == hidden_size"):
        ModelConfig(vocab_size=10, embed_dim=8, hidden_size=16, tie_weights=True)


def test_dict_round_trip_and_unknown_keys():
    config = ModelConfig(vocab_size=10, embed_dim=16, hidden_size=16, tie_weights=True)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown model config keys: colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": "red"})
    with pytest.raises(ConfigError, match="no vocab_size"):
        ModelConfig.from_dict({"hidden_size": 4})


@pytest.mark.parametrize("overrides, message", [
    (dict(num_layers=0), "--layers must be a positive integer"),
    (dict(batch_size=-1), "--batch-size must be a positive integer"),
    (dict(max_steps=0), "--max-steps must be a positive integer"),
    (dict(lr=0.0), "--lr must be in"),
    (dict(dropout=1.0), "--dropout must be in"),
    (dict(time_budget=-5), "--time-budget must be in"),
    (dict(tokenizer="bytes"), "--tokenizer must be one of"),
    (dict(tie_weights=True), "tie_weights needs embed_dim == hidden_size"),
    (dict(seq_len="128"), "--seq-len must be a positive integer"),
])
def test_train_config_names_flags_in_its_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_options(**overrides)


def test_train_config_round_trips_and_rejects_unknown_keys():
    config = train_options(lr=1)
    assert isinstance(config.lr, float)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainConfig.from_dict({**config.to_dict(), "hiden_size": 3})
    with pytest.raises(ConfigError, match="--corpus is required"):
        TrainConfig.from_dict({"out": "x"})


def test_merge_replaces_the_whole_group_of_stop_conditions():
    saved = {"corpus": "a", "max_steps": 100, "time_budget": None, "lr": 1.0}
    assert merge_options(saved, {"lr": 2.0}) == {"corpus": "a", "epochs": None, "max_steps": 100, "time_budget": None,
                                                 "lr": 2.0}
    merged = merge_options({"time_budget": 30.0}, saved, {"epochs": 2})
    assert (merged["epochs"], merged["max_steps"], merged["time_budget"]) == (2, None, None)


@pytest.mark.parametrize("recipe", sorted((REPO_ROOT / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_every_recipe_is_a_valid_config_for_a_registered_corpus(recipe):
    config = TrainConfig.from_dict(load_recipe(recipe))
    assert config.corpus == recipe.stem and config.corpus in registry()
    assert config.time_budget is not None


def test_recipe_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(bad)
    bad.write_text("[model]\nhidden_size = 3\n")
    with pytest.raises(ConfigError, match="flat"):
        load_recipe(bad)
    bad.write_text("seq-len = 64\nlearning_rate = 3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.toml")
    bad.write_text("seq-len = 64\n")
    assert load_recipe(bad) == {"seq_len": 64}


def test_train_config_holds_the_architecture_and_reads_flat_saved_options():
    """A checkpoint's saved options are one flat mapping, as they were before the architecture moved."""
    saved = {"corpus": "small.txt", "out": "old_run", "tokenizer": "char", "vocab_size": None,
             "encoding_errors": "strict", "valid_fraction": None, "num_layers": 2, "hidden_size": 64, "embed_dim": 16,
             "dropout": 0.3, "locked_dropout": True, "weight_drop": 0.1, "tie_weights": False, "dtype": "float32",
             "seq_len": 32, "batch_size": 8, "random_length": False, "window_sampling": "streams", "lr": 0.002,
             "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999, "clip": 1.0, "ema_decay": 0.9, "warmup_steps": 100,
             "schedule": "cosine", "min_lr_ratio": 0.1, "plateau_factor": 0.5, "plateau_patience": 2, "epochs": None,
             "max_steps": 30, "time_budget": None, "eval_every": 10, "checkpoint_every": 10, "log_every": 10, "seed": 5}
    config = TrainConfig.from_dict(saved)
    assert config.model == Architecture(embed_dim=16, hidden_size=64, dropout=0.3, locked_dropout=True,
                                        weight_drop=0.1)
    assert config.to_dict() == {**saved, "bpe_sample_mb": 50.0, "eval_tokens": 1_000_000}  # newer options: defaults
    assert config.model.with_vocab_size(66) == ModelConfig(vocab_size=66, **config.model.to_dict())
    with pytest.raises(ConfigError, match="model must be an Architecture"):
        TrainConfig(corpus="c", out="o", model=config.model.with_vocab_size(66))


def test_merging_says_when_there_is_nothing_to_resume():
    with pytest.raises(ConfigError, match="^no checkpoint to resume in RUN "):
        merge_train_config({}, {"out": "RUN"}, resume=True, saved=None)
    with pytest.raises(ConfigError, match="^--resume needs --out"):
        merge_train_config({"corpus": "c"}, {}, resume=True)
    with pytest.raises(ConfigError, match="^--corpus is required"):
        merge_train_config({}, {"out": "RUN"})
    resumed = merge_train_config({}, {"out": "RUN", "max_steps": 9}, resume=True,
                                 saved={"corpus": "c", "out": "RUN", "time_budget": 30.0, "hidden_size": 24,
                                        "embed_dim": 8})
    assert (resumed.max_steps, resumed.time_budget, resumed.model.hidden_size) == (9, None, 24)
