import pytest

from charlm.config import ModelConfig
from charlm.errors import ConfigError


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
