"""Every option in one place: the model's shape and the training run's options, with the recipes and the
merging of saved options, recipe and flags that produce them.

`ModelConfig` is saved in every checkpoint, so a checkpoint alone rebuilds its model. `TrainConfig` holds the
model's `Architecture` (everything but the vocabulary, which the tokenizer decides) beside the options of the
data, optimizer and schedule; it reads and writes one flat mapping whose keys are the TOML recipes' keys and
the `charlm train` flags' names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from charlm.corpus import ERROR_MODES
from charlm.data import SAMPLINGS
from charlm.errors import ConfigError, InvalidField, require_int
from charlm.optim import SCHEDULES
from charlm.tokenize import KINDS

DTYPES = ("float32", "float64")
DEFAULT_TIME_BUDGET_MINUTES = 30.0
# Without warmup_steps, the learning rate warms up over this share of the run (of its steps or its time budget).
DEFAULT_WARMUP_SHARE = 0.02
# The defaults before the general recipe became the defaults. A checkpoint saved before one of these settings
# existed ran with the value here, so resuming it must not pick up today's default.
EARLIER_DEFAULTS = {"locked_dropout": True, "weight_drop": 0.0, "seq_len": 128, "random_length": False,
                    "weight_decay": 0.01, "ema_decay": 0.0, "warmup_steps": 100, "min_lr_ratio": 0.1}
# The stop conditions: a layer of options naming any of them replaces all of them (see merge_options).
STOP_KEYS = ("epochs", "max_steps", "time_budget")
# Fields whose command-line flag is not simply the field name with dashes.
FLAG_NAMES = {"num_layers": "layers", "hidden_size": "hidden", "embed_dim": "embed", "warmup_steps": "warmup"}
FIELD_OF_FLAG = {flag_name: field_name for field_name, flag_name in FLAG_NAMES.items()}


def _require_number(name: str, value, *, low: float, high: float = math.inf, low_open: bool = False,
                    high_closed: bool = False) -> float:
    """The value as a float (TOML's `lr = 1` is fine) if it is a number in the interval, else InvalidField."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidField(name, f"must be a number, got {value!r}")
    above = value > low if low_open else value >= low
    below = value <= high if high_closed else value < high
    if not (above and below):
        left, right = "(" if low_open else "[", "]" if high_closed else ")"
        bound = "inf" if high == math.inf else f"{high:g}"
        raise InvalidField(name, f"must be in {left}{low:g}, {bound}{right}, got {value!r}")
    return float(value)


def _require_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise InvalidField(name, f"must be true or false, got {value!r}")


def _require_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidField(name, f"must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class Architecture:
    """Embedding -> `num_layers` stacked LSTMs -> linear decoder; everything of a model but its vocabulary.

    `dropout` is inverted and applied to the input of every LSTM layer but the first and to the last
    layer's output; `locked_dropout` shares one mask by all time steps of a window (variational, as in
    AWD-LSTM), otherwise every step draws its own (as nn.LSTM's dropout does). `weight_drop` is AWD-LSTM's
    DropConnect on every layer's W_hh: one mask per window, shared by all steps and rows.
    `tie_weights` shares the embedding with the decoder and needs `embed_dim == hidden_size`.
    """

    embed_dim: int = 128
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2
    locked_dropout: bool = False
    weight_drop: float = 0.2
    tie_weights: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("embed_dim", "hidden_size", "num_layers"):
            require_int(name, getattr(self, name))
        for name in ("dropout", "weight_drop"):
            object.__setattr__(self, name, _require_number(name, getattr(self, name), low=0.0, high=1.0))
        for name in ("locked_dropout", "tie_weights"):
            _require_bool(name, getattr(self, name))
        if self.tie_weights and self.embed_dim != self.hidden_size:
            raise ConfigError(
                f"tie_weights needs embed_dim == hidden_size, got {self.embed_dim} and {self.hidden_size}"
            )
        _require_choice("dtype", self.dtype, DTYPES)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_vocab_size(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **self.to_dict())


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Architecture):
    """An `Architecture` with its softmax over `vocab_size` tokens: all a checkpoint needs to rebuild its model."""

    vocab_size: int

    def __post_init__(self) -> None:
        require_int("vocab_size", self.vocab_size)
        super().__post_init__()

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from a `config.json` mapping; unknown or missing keys are a ConfigError, not a TypeError."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        if "vocab_size" not in data:
            raise ConfigError("model config has no vocab_size")
        return cls(**data)


ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(Architecture))


@dataclass(frozen=True)
class TrainConfig:
    """Every training option: the data, the model's architecture, the optimizer, the schedule, when to stop.

    The run stops at the first of `epochs`, `max_steps` and `time_budget` (minutes) that is reached;
    with none of them it stops after DEFAULT_TIME_BUDGET_MINUTES. The cosine schedule decays over the
    step count when there is one, else over the time budget. `ema_decay` > 0 validates and saves an
    exponential moving average of the weights (0 = the weights themselves). `warmup_steps` None warms up
    over DEFAULT_WARMUP_SHARE of the run. `vocab_size` caps a char or word vocabulary and sizes a BPE one
    (None: every character or word seen; BPE's default size); BPE learns its merges from an evenly spaced
    sample of `bpe_sample_mb` of a larger training split. Validation scores a fixed sample of about
    `eval_tokens` tokens of a larger validation split (0: all). The defaults (with Architecture's) are the
    general recipe, compared with a plain PyTorch LSTM on text no setting was tuned on by
    benchmarks/compare_defaults.py.
    Errors name the options as `charlm train` spells them (`--layers`, not num_layers).
    """

    corpus: str
    out: str
    tokenizer: str = "char"
    vocab_size: int | None = None
    bpe_sample_mb: float = 50.0
    encoding_errors: str = "strict"
    valid_fraction: float | None = None
    model: Architecture = field(default_factory=Architecture)
    seq_len: int = 64
    batch_size: int = 32
    random_length: bool = True
    window_sampling: str = "streams"
    lr: float = 2e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    clip: float = 1.0
    ema_decay: float = 0.995
    warmup_steps: int | None = None
    schedule: str = "cosine"
    min_lr_ratio: float = 0.2
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    epochs: int | None = None
    max_steps: int | None = None
    time_budget: float | None = None
    eval_every: int = 2000
    eval_tokens: int = 1_000_000
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        with _named_as_flags():
            self._validate()

    def _validate(self) -> None:
        if type(self.model) is not Architecture:
            raise ConfigError(f"model must be an Architecture, got {type(self.model).__name__}")
        for name in ("corpus", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidField(name, "must be a non-empty string")
        for name in ("seq_len", "batch_size", "eval_every", "checkpoint_every", "log_every", "plateau_patience"):
            require_int(name, getattr(self, name), minimum=1)
        for name in ("vocab_size", "epochs", "max_steps"):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name), minimum=1)
        if self.warmup_steps is not None:
            require_int("warmup_steps", self.warmup_steps, minimum=0)
        for name in ("seed", "eval_tokens"):
            require_int(name, getattr(self, name), minimum=0)
        _require_bool("random_length", self.random_length)
        ranges = {
            "lr": dict(low=0.0, low_open=True), "weight_decay": dict(low=0.0), "clip": dict(low=0.0),
            "beta1": dict(low=0.0, high=1.0), "beta2": dict(low=0.0, high=1.0), "ema_decay": dict(low=0.0, high=1.0),
            "min_lr_ratio": dict(low=0.0, high=1.0, high_closed=True),
            "plateau_factor": dict(low=0.0, high=1.0, low_open=True),
            "bpe_sample_mb": dict(low=0.0, low_open=True),
        }
        if self.valid_fraction is not None:
            ranges["valid_fraction"] = dict(low=0.0, high=1.0, low_open=True)
        if self.time_budget is not None:
            ranges["time_budget"] = dict(low=0.0, low_open=True)
        for name, bounds in ranges.items():
            object.__setattr__(self, name, _require_number(name, getattr(self, name), **bounds))
        _require_choice("tokenizer", self.tokenizer, KINDS)
        _require_choice("schedule", self.schedule, SCHEDULES)
        _require_choice("encoding_errors", self.encoding_errors, ERROR_MODES)
        _require_choice("window_sampling", self.window_sampling, SAMPLINGS)

    def to_dict(self) -> dict:
        """The flat mapping of every option (the architecture's fields in place of `model`)."""
        options = {}
        for f in dataclasses.fields(self):
            if f.name == "model":
                options.update(self.model.to_dict())
            else:
                options[f.name] = getattr(self, f.name)
        return options

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from flags, a recipe or a checkpoint's saved options; unknown keys are a ConfigError."""
        unknown = sorted(set(data) - set(OPTION_NAMES))
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
        for name in ("corpus", "out"):
            if data.get(name) is None:
                raise ConfigError(f"{flag(name)} is required")
        with _named_as_flags():
            model = Architecture(**{name: value for name, value in data.items() if name in ARCHITECTURE_FIELDS})
        return cls(model=model, **{name: value for name, value in data.items() if name not in ARCHITECTURE_FIELDS})


OPTION_NAMES = tuple(name for f in dataclasses.fields(TrainConfig)
                     for name in (ARCHITECTURE_FIELDS if f.name == "model" else (f.name,)))


def option_default(name: str):
    """The default of a training option (for help texts)."""
    owner = Architecture if name in ARCHITECTURE_FIELDS else TrainConfig
    return owner.__dataclass_fields__[name].default


def earlier_default(name: str):
    """The value a checkpoint that lacks option `name` ran with: the default of its day."""
    return EARLIER_DEFAULTS.get(name, option_default(name))


def flag(name: str) -> str:
    """The command-line spelling of a training option, for error messages."""
    return "--" + FLAG_NAMES.get(name, name).replace("_", "-")


@contextmanager
def _named_as_flags():
    """Re-raise a field's error with the field spelled as its --flag."""
    try:
        yield
    except InvalidField as exc:
        raise ConfigError(f"{flag(exc.field)} {exc.problem}") from None


def load_recipe(path: str | os.PathLike) -> dict:
    """A flat TOML file of training options (dashes or underscores), to be overridden by flags."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            doc = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a folder: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {str(exc).splitlines()[0]}") from None
    recipe = {key.replace("-", "_"): value for key, value in doc.items()}
    nested = [key for key, value in recipe.items() if isinstance(value, dict)]
    if nested:
        raise ConfigError(f"{path}: recipes are flat `key = value` files, found table(s) {', '.join(nested)}")
    unknown = sorted(set(recipe) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(f"{path}: unknown training option(s): {', '.join(unknown)}")
    return recipe


def merge_options(*layers: dict) -> dict:
    """Later layers override earlier ones; a layer naming any stop condition replaces all of them.

    So a recipe's 30-minute budget does not also cap a run given `--max-steps`, and resuming with a new
    `--max-steps` drops the old run's budget instead of stopping at whichever comes first.
    """
    merged: dict = {}
    for layer in layers:
        if any(layer.get(key) is not None for key in STOP_KEYS):
            for key in STOP_KEYS:
                merged[key] = None
        merged.update({key: value for key, value in layer.items() if value is not None or key not in STOP_KEYS})
    return merged


def merge_train_config(recipe: dict, explicit: dict, *, resume: bool = False, saved: dict | None = None) -> TrainConfig:
    """The options of a run: a resumed run's `saved` options, overridden by the recipe, then by the flags.

    `saved` is None when there is no checkpoint to resume; `--resume` alone then says so, in those words.
    """
    merged = merge_options(saved or {}, recipe, explicit)
    if resume and merged.get("out") is None:
        raise ConfigError("--resume needs --out, the folder of the run to continue")
    if resume and saved is None and merged.get("corpus") is None:
        raise ConfigError(f"no checkpoint to resume in {merged['out']} (pass --corpus to start a new run there)")
    return TrainConfig.from_dict(merged)
