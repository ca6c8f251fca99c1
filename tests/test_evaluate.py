import math

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.errors import ConfigError, CorpusError
from charlm.evaluate import evaluate, evaluate_ids, evaluate_rows, predicted_chars, validation_sample
from charlm.model import LSTMLanguageModel
from charlm.tokenize import train_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog.\nthe dog sleeps; the fox runs away!\n" * 3


@pytest.fixture(scope="module")
def char_tokenizer():
    return train_tokenizer("char", TEXT)


@pytest.fixture(scope="module")
def char_model(char_tokenizer):
    config = ModelConfig(vocab_size=char_tokenizer.vocab_size, embed_dim=8, hidden_size=16, num_layers=2,
                         dropout=0.0, dtype="float64")
    return LSTMLanguageModel(config, seed=3)


def stream_nats(model, ids):
    """Summed nats of one contiguous stream from a zero state, in a single window."""
    loss, _ = model.forward(ids[:-1, None], ids[1:, None], model.zero_state(1))
    return loss * (len(ids) - 1)


def test_single_stream_equals_one_forward_over_the_whole_text(char_model, char_tokenizer):
    ids = char_tokenizer.encode(TEXT)
    result = evaluate(char_model, char_tokenizer, TEXT, batch_size=1, seq_len=7)
    assert result.tokens == len(ids) - 1
    assert result.loss == pytest.approx(stream_nats(char_model, ids) / (len(ids) - 1), rel=1e-12)


@pytest.mark.parametrize("batch_size", [2, 3, 5])
def test_streams_plus_tail_cover_every_prediction(char_model, char_tokenizer, batch_size):
    """B equal streams, the leftover predictions continuing the last stream: nothing dropped or reset."""
    ids = char_tokenizer.encode(TEXT)
    predictions = len(ids) - 1
    stream_len = predictions // batch_size
    expected = sum(stream_nats(char_model, ids[b * stream_len:(b + 1) * stream_len + 1])
                   for b in range(batch_size - 1))
    expected += stream_nats(char_model, ids[(batch_size - 1) * stream_len:])
    result = evaluate(char_model, char_tokenizer, TEXT, batch_size=batch_size, seq_len=16)
    assert predictions % batch_size  # 239 predictions: every batch size here leaves a tail
    assert result.tokens == predictions
    assert result.loss * predictions == pytest.approx(expected, rel=1e-12)


def test_window_length_does_not_change_the_loss(char_model, char_tokenizer):
    losses = [evaluate(char_model, char_tokenizer, TEXT, batch_size=4, seq_len=t).loss for t in (1, 5, 64, 1000)]
    assert max(losses) - min(losses) < 1e-12


def test_more_streams_than_predictions(char_model, char_tokenizer):
    result = evaluate(char_model, char_tokenizer, "the fox", batch_size=16, seq_len=4)
    assert result.tokens == 6
    ids = char_tokenizer.encode("the fox")
    # 6 streams of one prediction each, every one from a zero state
    expected = sum(stream_nats(char_model, ids[i:i + 2]) for i in range(6))
    assert result.loss * 6 == pytest.approx(expected, rel=1e-12)


def test_char_model_bits_per_char_is_loss_in_bits(char_model, char_tokenizer):
    result = evaluate(char_model, char_tokenizer, TEXT, batch_size=4, seq_len=32)
    assert result.chars == len(TEXT) - 1
    assert result.bits_per_char == pytest.approx(result.loss / math.log(2), rel=1e-12)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)
    assert set(result.to_dict()) == {"loss", "perplexity", "bits_per_char", "tokens", "chars"}


def test_untrained_model_is_near_uniform(char_model, char_tokenizer):
    result = evaluate(char_model, char_tokenizer, TEXT, batch_size=4, seq_len=32)
    assert abs(result.loss - math.log(char_tokenizer.vocab_size)) < 0.2


def test_predicted_chars_of_word_and_bpe_tokens():
    """Characters covered by tokens 2..N: the whole text minus what the first token spells."""
    text = "the cat sat\non the mat\n"
    word = train_tokenizer("word", text)
    assert predicted_chars(word, word.encode(text)) == len(text) - len("the")
    bpe = train_tokenizer("bpe", text * 20, vocab_size=270)
    ids = bpe.encode(text)
    assert predicted_chars(bpe, ids) == len(text) - len(bpe.decode(ids[:1]))


def test_bits_per_char_divides_total_information_by_covered_chars():
    text = "the cat sat on the mat.\nthe dog sat on the log.\n" * 4
    tokenizer = train_tokenizer("bpe", text, vocab_size=280)
    model = LSTMLanguageModel(ModelConfig(vocab_size=tokenizer.vocab_size, embed_dim=8, hidden_size=8,
                                          num_layers=1, dropout=0.0), seed=0)
    result = evaluate(model, tokenizer, text, batch_size=2, seq_len=8)
    ids = tokenizer.encode(text)
    assert result.tokens == len(ids) - 1 < result.chars
    assert result.bits_per_char * result.chars * math.log(2) == pytest.approx(result.loss * result.tokens)


def test_rejects_too_short_text_and_bad_shapes(char_model, char_tokenizer):
    with pytest.raises(CorpusError, match="too short"):
        evaluate(char_model, char_tokenizer, "t")
    with pytest.raises(CorpusError, match="too short"):
        evaluate(char_model, char_tokenizer, "")
    with pytest.raises(ConfigError):
        evaluate_ids(char_model, np.arange(5), chars=4, batch_size=0)


# --- validation sample --------------------------------------------------------------------------

def test_validation_sample_is_fixed_by_split_and_seed_and_spread_over_the_split():
    ids = np.arange(100_000)
    sample = validation_sample(ids, 1600, seed=5, rows=16)
    assert sample.shape == (16, 101) and sample.dtype == np.int32
    assert np.array_equal(sample, validation_sample(ids, 1600, seed=5, rows=16))  # every evaluation alike
    assert not np.array_equal(sample, validation_sample(ids, 1600, seed=6, rows=16))
    part = len(ids) // 16
    for row, values in enumerate(sample):  # one contiguous piece from each sixteenth of the split
        start = int(values[0])
        assert row * part <= start <= (row + 1) * part - 101 and np.array_equal(values, ids[start:start + 101])
    assert validation_sample(ids, len(ids) - 1, seed=5) is None  # small enough: scored whole
    assert validation_sample(ids, 0, seed=5) is None  # 0: always whole


def test_evaluate_rows_scores_each_row_as_its_own_stream(char_model, char_tokenizer):
    ids = char_tokenizer.encode(TEXT)
    rows = np.stack([ids[:40], ids[60:100], ids[120:160]])
    result = evaluate_rows(char_model, rows, chars=117, seq_len=9)
    expected = sum(stream_nats(char_model, row) for row in rows) / (3 * 39)
    assert result.loss == pytest.approx(expected, rel=1e-9) and result.tokens == 3 * 39 and result.chars == 117
