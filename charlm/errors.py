"""Errors a user can cause. The CLI prints their one-line message and exits 2, never a traceback."""


class CharlmError(Exception):
    """Base class: a problem with the user's input, flags, files or environment."""


class CorpusError(CharlmError):
    """A corpus that cannot be found, read or used for training."""


class TokenizerError(CharlmError):
    """Text that the tokenizer cannot encode, or a tokenizer file that does not fit."""


class CheckpointError(CharlmError):
    """A checkpoint that is missing, corrupt, from a newer format, or does not match its config."""


class ConfigError(CharlmError):
    """Flags or config values out of range, or a resumed run whose config changed."""


class InvalidField(ConfigError):
    """A ConfigError about one named field, so a caller can name it in its own terms (say, as a --flag)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def require_int(field: str, value, *, minimum: int = 1) -> None:
    """InvalidField unless value is an int >= minimum (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InvalidField(field, f"must be {kind}, got {value!r}")


class MissingExtraError(CharlmError):
    """A command needs an optional package (an extra such as charlm[onnx]) that is not installed."""
