"""Loss, perplexity and bits per character of a text under a model.

Bits per character divide the total information by the characters of the original text that the scored
tokens cover, so a char, word and BPE model of the same text can be compared on one scale.

A whole split is scored as `batch_size` streams with the state carried (`evaluate_ids`). Validation
during training on a big corpus scores a fixed sample instead (`validation_sample`): the same rows of
contiguous ids at every evaluation, so values compare, at a cost that does not grow with the corpus.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from charlm.corpus import TextSpan
from charlm.data import encode_cached
from charlm.errors import ConfigError, CorpusError

EVAL_SAMPLE_ROWS = 16
EVAL_SAMPLE_STREAM = 2  # a random stream of its own, apart from weights and dropout


@dataclass(frozen=True)
class EvalResult:
    """`loss` is mean nats per predicted token; `tokens` and `chars` are what was predicted and covered."""

    loss: float
    perplexity: float
    bits_per_char: float
    tokens: int
    chars: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model, tokenizer, text: str | TextSpan, batch_size: int = 16, seq_len: int = 256,
             unknown: str = "error", *, key: str | None = None, progress: bool = False) -> EvalResult:
    """Score every token of `text` after the first, each conditioned on all text before it in its stream.

    A corpus split (`TextSpan`) is encoded as a stream into the ids cache (`key`: see `encode_cached`);
    `progress` shows the encoding and scoring on a terminal.
    """
    if isinstance(text, TextSpan):
        ids = encode_cached(tokenizer, text, key=key, unknown=unknown, verbose=progress)
    else:
        ids = tokenizer.encode(text, unknown=unknown)
    return evaluate_ids(model, ids, chars=predicted_chars(tokenizer, ids), batch_size=batch_size,
                        seq_len=seq_len, progress=progress)


def predicted_chars(tokenizer, ids: np.ndarray) -> int:
    """Characters of the decoded text that tokens 1..N cover: all of it minus what the first token spells.

    Subtracting the first token (rather than decoding ids[1:]) keeps the separator a word tokenizer puts
    before the second word, which belongs to the predicted text. Decoded a block at a time, never whole.
    """
    if len(ids) < 2:
        return 0
    return tokenizer.decoded_length(ids) - len(tokenizer.decode(ids[:1]))


def validation_sample(ids: np.ndarray, max_tokens: int, seed: int, rows: int = EVAL_SAMPLE_ROWS) -> np.ndarray | None:
    """(rows, length + 1) ids: one contiguous piece of each of `rows` equal parts of `ids`, at an offset
    drawn from `seed`, about `max_tokens` predictions in all; None when the split has no more than that
    (score it whole). A function of the split and the seed only, so every evaluation scores the same windows
    (and ranks of a distributed run can share them out by row)."""
    if max_tokens <= 0 or len(ids) - 1 <= max_tokens:
        return None
    rows = max(1, min(rows, max_tokens, len(ids) // 2))
    part = len(ids) // rows
    length = min(max_tokens // rows, part - 1)
    offsets = np.random.default_rng([seed, EVAL_SAMPLE_STREAM]).integers(0, part - length - 1, rows, endpoint=True)
    starts = np.arange(rows) * part + offsets
    return np.stack([np.asarray(ids[start:start + length + 1], dtype=np.int32) for start in starts])


def evaluate_rows(model, rows: np.ndarray, *, chars: int, seq_len: int = 256, world=None) -> EvalResult:
    """Mean loss over each row's next-token predictions, every row an independent stream from a zero state
    (a `validation_sample`). With `world`, its processes score a share of the rows each and sum the nats."""
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise CorpusError(f"rows to evaluate must be (rows, 2 or more tokens), got shape {rows.shape}")
    rank, size = (0, 1) if world is None else (world.rank, world.size)
    first, stop = rows.shape[0] * rank // size, rows.shape[0] * (rank + 1) // size
    total_nats = 0.0
    if stop > first:
        with model.frozen_weights():
            total_nats, _ = _score_streams(model, rows[first:stop, :-1].T, rows[first:stop, 1:].T,
                                           model.zero_state(stop - first), seq_len)
    return _result(_sum_over(world, total_nats), rows.shape[0] * (rows.shape[1] - 1), chars)


def evaluate_ids(model, ids: np.ndarray, *, chars: int, batch_size: int = 16, seq_len: int = 256,
                 progress: bool = False, world=None) -> EvalResult:
    """Mean loss over all N-1 next-token predictions of `ids`, none dropped.

    The predictions are cut into `batch_size` contiguous streams of equal length, scored window by window
    with the state carried across windows (as in training); the few predictions left over after the last
    stream continue that stream's state in a final batch-1 pass. The trainer calls this for validation, so
    `charlm eval` with the same batch size and window reproduces the logged validation loss exactly.
    `progress` shows a tqdm bar of the tokens scored on a terminal.
    With `world` (charlm.distributed), its processes score a share of the streams each and sum the nats.
    """
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch size and window must be positive, got {batch_size} and {seq_len}")
    predictions = len(ids) - 1
    if predictions < 1:
        raise CorpusError(f"text too short to evaluate: {len(ids)} token(s), needs at least 2")
    streams = min(batch_size, predictions)
    stream_len = predictions // streams
    covered = streams * stream_len
    rank, size = (0, 1) if world is None else (world.rank, world.size)
    first, stop = streams * rank // size, streams * (rank + 1) // size
    inputs = np.asarray(ids[:covered]).reshape(streams, stream_len)[first:stop].T
    targets = np.asarray(ids[1:covered + 1]).reshape(streams, stream_len)[first:stop].T
    total_nats = 0.0
    bar = tqdm(total=predictions, unit="tok", unit_scale=True, desc="evaluating", file=sys.stderr,
               dynamic_ncols=True, disable=not (progress and sys.stderr.isatty()), leave=False)
    with bar, model.frozen_weights():
        if stop > first:
            total_nats, state = _score_streams(model, inputs, targets, model.zero_state(stop - first), seq_len, bar)
        if covered < predictions and stop == streams:
            h, c = state
            last_stream = (np.ascontiguousarray(h[:, -1:]), np.ascontiguousarray(c[:, -1:]))
            tail_nats, _ = _score_streams(model, np.asarray(ids[covered:-1])[:, None],
                                          np.asarray(ids[covered + 1:])[:, None], last_stream, seq_len, bar)
            total_nats += tail_nats
    return _result(_sum_over(world, total_nats), predictions, chars)


def _sum_over(world, nats: float) -> float:
    """The nats of every process of `world` (charlm.distributed) summed; `nats` itself without one."""
    if world is None:
        return nats
    total = np.array([nats])
    world.sum_in_place(total)
    return float(total[0])


def _result(total_nats: float, predictions: int, chars: int) -> EvalResult:
    loss = total_nats / predictions
    return EvalResult(
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        bits_per_char=total_nats / math.log(2) / chars if chars > 0 else math.nan,
        tokens=predictions,
        chars=chars,
    )


def _score_streams(model, inputs: np.ndarray, targets: np.ndarray, state, seq_len: int, bar=None):
    """Sum of nats over (T, B) streams, `seq_len` steps at a time; returns it with the final state."""
    total_nats = 0.0
    for start in range(0, inputs.shape[0], seq_len):
        window_inputs = np.ascontiguousarray(inputs[start:start + seq_len])
        window_targets = np.ascontiguousarray(targets[start:start + seq_len])
        loss, state = model.forward(window_inputs, window_targets, state, train=False)
        total_nats += loss * window_inputs.size
        if bar is not None:
            bar.update(window_inputs.size)
    return total_nats, state
