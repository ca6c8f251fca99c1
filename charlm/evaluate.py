"""Loss, perplexity and bits per character of a text under a model.

Bits per character divide the total information by the characters of the original text that the scored
tokens cover, so a char, word and BPE model of the same text can be compared on one scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from charlm.errors import ConfigError, CorpusError


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


def evaluate(model, tokenizer, text: str, batch_size: int = 16, seq_len: int = 256,
             unknown: str = "error") -> EvalResult:
    """Score every token of `text` after the first, each conditioned on all text before it in its stream."""
    ids = tokenizer.encode(text, unknown=unknown)
    return evaluate_ids(model, ids, chars=predicted_chars(tokenizer, ids), batch_size=batch_size,
                        seq_len=seq_len)


def predicted_chars(tokenizer, ids: np.ndarray) -> int:
    """Characters of the decoded text that tokens 1..N cover: all of it minus what the first token spells.

    Subtracting the first token (rather than decoding ids[1:]) keeps the separator a word tokenizer puts
    before the second word, which belongs to the predicted text.
    """
    if len(ids) < 2:
        return 0
    return len(tokenizer.decode(ids)) - len(tokenizer.decode(ids[:1]))


def evaluate_ids(model, ids: np.ndarray, *, chars: int, batch_size: int = 16, seq_len: int = 256,
                 world=None) -> EvalResult:
    """Mean loss over all N-1 next-token predictions of `ids`, none dropped.

    The predictions are cut into `batch_size` contiguous streams of equal length, scored window by window
    with the state carried across windows (as in training); the few predictions left over after the last
    stream continue that stream's state in a final batch-1 pass. The trainer calls this for validation, so
    `charlm eval` with the same batch size and window reproduces the logged validation loss exactly.
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
    with model.frozen_weights():
        if stop > first:
            total_nats, state = _score_streams(model, inputs, targets, model.zero_state(stop - first), seq_len)
        if covered < predictions and stop == streams:
            h, c = state
            last_stream = (np.ascontiguousarray(h[:, -1:]), np.ascontiguousarray(c[:, -1:]))
            tail_nats, _ = _score_streams(model, np.asarray(ids[covered:-1])[:, None],
                                          np.asarray(ids[covered + 1:])[:, None], last_stream, seq_len)
            total_nats += tail_nats
    if world is not None:
        total = np.array([total_nats])
        world.sum_in_place(total)
        total_nats = float(total[0])
    loss = total_nats / predictions
    return EvalResult(
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        bits_per_char=total_nats / math.log(2) / chars if chars > 0 else math.nan,
        tokens=predictions,
        chars=chars,
    )


def _score_streams(model, inputs: np.ndarray, targets: np.ndarray, state, seq_len: int):
    """Sum of nats over (T, B) streams, `seq_len` steps at a time; returns it with the final state."""
    total_nats = 0.0
    for start in range(0, inputs.shape[0], seq_len):
        window_inputs = np.ascontiguousarray(inputs[start:start + seq_len])
        window_targets = np.ascontiguousarray(targets[start:start + seq_len])
        loss, state = model.forward(window_inputs, window_targets, state, train=False)
        total_nats += loss * window_inputs.size
    return total_nats, state
