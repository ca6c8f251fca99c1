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


class MissingExtraError(CharlmError):
    """A command needs an optional package (an extra such as charlm[onnx]) that is not installed."""
