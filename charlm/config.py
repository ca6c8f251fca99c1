"""The model's shape as a frozen dataclass: saved in every checkpoint, so a checkpoint alone rebuilds it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from charlm.errors import ConfigError

DTYPES = ("float32", "float64")


def require_int(label: str, value, *, minimum: int = 1) -> None:
    """ConfigError naming `label` (a field or a --flag) unless value is an int >= minimum (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{label} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Embedding -> `num_layers` stacked LSTMs -> linear decoder -> softmax over `vocab_size` tokens.

    `dropout` is inverted and applied to the input of every LSTM layer but the first and to the last
    layer's output; `locked_dropout` shares one mask by all time steps of a window (variational, as in
    AWD-LSTM), otherwise every step draws its own (as nn.LSTM's dropout does). `weight_drop` is AWD-LSTM's
    DropConnect on every layer's W_hh: one mask per window, shared by all steps and rows.
    `tie_weights` shares the embedding with the decoder and needs `embed_dim == hidden_size`.
    """

    vocab_size: int
    embed_dim: int = 128
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2
    locked_dropout: bool = True
    weight_drop: float = 0.0
    tie_weights: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "hidden_size", "num_layers"):
            require_int(name, getattr(self, name))
        for name in ("dropout", "weight_drop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("locked_dropout", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.tie_weights and self.embed_dim != self.hidden_size:
            raise ConfigError(
                f"tie_weights needs embed_dim == hidden_size, got {self.embed_dim} and {self.hidden_size}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from a `config.json` mapping; unknown or missing keys are a ConfigError, not a TypeError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        if "vocab_size" not in data:
            raise ConfigError("model config has no vocab_size")
        return cls(**data)
