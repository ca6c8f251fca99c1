import math

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.data import BatchStream
from charlm.errors import ConfigError, TokenizerError
from charlm.model import LSTMLanguageModel
from charlm.optim import AdamW
from charlm.sample import Completion, complete, context_ids, generate_text
from charlm.tokenize import train_tokenizer

# "I love machine ___" is "learning" (0.45/0.55) before "tools"; followed by " tools." the blank is "hand"
# (0.30 vs 0.10), followed by " learning." it is "machine" (0.45 vs 0.10).
SENTENCES = {
    "I love machine learning.": 0.45,
    "I love machine tools.": 0.10,
    "I love hand tools.": 0.30,
    "I love deep learning.": 0.10,
    "I love deep water.": 0.05,
}
TEXT = "the quick brown fox jumps over the lazy dog.\nthe dog sleeps; the fox runs away!\n" * 3


def love_corpus(lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    names = list(SENTENCES)
    picks = rng.choice(len(names), size=lines, p=list(SENTENCES.values()))
    return "\n".join(names[i] for i in picks) + "\n"


def random_model(tokenizer, hidden=16, dtype="float64", seed=5):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embed_dim=8, hidden_size=hidden, num_layers=2,
                         dropout=0.0, dtype=dtype)
    return LSTMLanguageModel(config, seed=seed)


@pytest.fixture(scope="module")
def char_tokenizer():
    return train_tokenizer("char", TEXT)


@pytest.fixture(scope="module")
def char_model(char_tokenizer):
    return random_model(char_tokenizer)


@pytest.fixture(scope="module")
def trained():
    """A small char model trained in-process on the love corpus until it knows the sentence statistics."""
    text = love_corpus(3000, seed=0)
    tokenizer = train_tokenizer("char", text)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embed_dim=16, hidden_size=64, num_layers=1,
                         dropout=0.0)
    model = LSTMLanguageModel(config, seed=0)
    optimizer = AdamW(model.params, lr=1e-2)
    stream = BatchStream(tokenizer.encode(text), batch_size=16, seq_len=32)
    state = model.zero_state(16)
    for step in range(250):
        window = stream.next_window()
        if window.reset_state:
            state = model.zero_state(16)
        _, state = model.forward(window.inputs, window.targets, state, train=True)
        grads, _ = model.backward()
        optimizer.step(grads, lr=1e-2 if step < 150 else 2e-3)
    return model, tokenizer


def joined(chunks) -> str:
    return "".join(chunks)


def greedy_reference(model, tokenizer, prompt, length):
    """Argmax decoding with model.step from a line start, independent of generate_ids."""
    ids = tokenizer.encode("\n" + prompt)
    state = model.zero_state(1)
    for token in ids:
        log_probs, state = model.step(np.array([token]), state)
    out = []
    for _ in range(length):
        token = int(np.argmax(log_probs[0]))
        out.append(token)
        log_probs, state = model.step(np.array([token]), state)
    return tokenizer.decode(out)


def test_same_seed_same_text_and_seeds_differ(char_model, char_tokenizer):
    first = joined(generate_text(char_model, char_tokenizer, "the ", length=60, seed=11))
    again = joined(generate_text(char_model, char_tokenizer, "the ", length=60, seed=11))
    other = joined(generate_text(char_model, char_tokenizer, "the ", length=60, seed=12))
    assert first == again
    assert first != other
    assert first.startswith("the ")


def test_temperature_zero_is_greedy_and_top_k_one_too(char_model, char_tokenizer):
    expected = "the fox" + greedy_reference(char_model, char_tokenizer, "the fox", 40)
    assert joined(generate_text(char_model, char_tokenizer, "the fox", length=40, temperature=0)) == expected
    assert joined(generate_text(char_model, char_tokenizer, "the fox", length=40, top_k=1, seed=4)) == expected


def test_chunks_stream_one_per_token_and_match_the_sampled_ids(char_model, char_tokenizer):
    chunks = list(generate_text(char_model, char_tokenizer, "dog", length=25, seed=2))
    ids = list(char_model.generate_ids(char_tokenizer.encode("\ndog"), 25, seed=2))
    assert chunks[0] == "dog"
    assert chunks[1:] == [char_tokenizer.decode([i]) for i in ids]


def test_bpe_stream_decodes_like_the_whole_sequence():
    text = "naïve café über straße — ünïcödé ok\n" * 10
    tokenizer = train_tokenizer("bpe", text, vocab_size=300)
    model = random_model(tokenizer, dtype="float32")
    ids = list(model.generate_ids(context_ids(tokenizer, "café"), 80, seed=9))
    streamed = joined(generate_text(model, tokenizer, "café", length=80, seed=9))
    assert streamed == "café" + tokenizer.decode(ids)


def test_prompts_are_read_from_a_line_start(char_model, char_tokenizer):
    newline = char_tokenizer.encode("\n")
    assert list(context_ids(char_tokenizer, "")) == list(newline)
    assert list(context_ids(char_tokenizer, "dog")) == list(char_tokenizer.encode("\ndog"))
    assert list(context_ids(char_tokenizer, "\ndog")) == list(char_tokenizer.encode("\ndog"))  # not twice
    ids = list(char_model.generate_ids(newline, 30, seed=3))
    assert joined(generate_text(char_model, char_tokenizer, "", length=30, seed=3)) == char_tokenizer.decode(ids)
    word_tokenizer = train_tokenizer("word", "the cat sat\nthe dog ran\n")
    eos = word_tokenizer.encode("\n").tolist()
    assert len(eos) == 1 and context_ids(word_tokenizer, "the dog").tolist() == eos + word_tokenizer.encode("the dog").tolist()


def test_without_newline_in_vocabulary_prompts_start_bare_and_empty_is_token_zero():
    tokenizer = train_tokenizer("char", "abcabc")
    assert list(context_ids(tokenizer, "")) == [0]
    assert list(context_ids(tokenizer, "cab")) == list(tokenizer.encode("cab"))


def test_word_stream_spaces_words_after_the_prompt():
    tokenizer = train_tokenizer("word", "the cat sat on the mat\nthe dog sat on the log\n")
    model = random_model(tokenizer)
    text = joined(generate_text(model, tokenizer, "the cat", length=12, seed=1))
    ids = tokenizer.encode("the cat").tolist() + list(model.generate_ids(context_ids(tokenizer, "the cat"), 12, seed=1))
    assert text == tokenizer.decode(ids)


@pytest.mark.parametrize("flags, message", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_k": -1}, "top-k"),
    ({"top_p": 0.0}, "top-p"),
    ({"top_p": 1.5}, "top-p"),
    ({"length": 0}, "length"),
])
def test_out_of_range_flags_raise_before_any_text(char_model, char_tokenizer, flags, message):
    with pytest.raises(ConfigError, match=message):
        generate_text(char_model, char_tokenizer, "the", **flags)


def test_unknown_prompt_characters(char_model, char_tokenizer):
    with pytest.raises(TokenizerError, match="'Z'"):
        generate_text(char_model, char_tokenizer, "Zebra")
    text = joined(generate_text(char_model, char_tokenizer, "Zebra", length=5, seed=0, unknown="replace"))
    assert text.startswith("Zebra") and len(text) > len("Zebra")


def continuation_log_prob(model, tokenizer, before, continuation):
    """log P(continuation | line start + before) for a char model, one model.step per character."""
    ids = tokenizer.encode("\n" + before + continuation)
    state = model.zero_state(1)
    total = 0.0
    for i, token in enumerate(ids):
        if i >= 1 + len(before):
            total += log_probs[0, token]
        log_probs, state = model.step(np.array([token]), state)
    return total, log_probs[0]


def char_filler_prob(model, tokenizer, before, word, after=None):
    """P(word, then any boundary | before), or P(word | before) * P(after | before + word)."""
    if after is not None:
        return math.exp(continuation_log_prob(model, tokenizer, before, word + after)[0])
    log_p, next_log_probs = continuation_log_prob(model, tokenizer, before, word)
    boundary = [i for i in range(tokenizer.vocab_size)
                if i != tokenizer.unk_id and not tokenizer.decode([i]).isalnum()]
    return math.exp(log_p) * np.exp(next_log_probs[boundary]).sum()


def test_complete_reports_the_model_probability_of_each_word(char_model, char_tokenizer):
    results = complete(char_model, char_tokenizer, "the lazy ___", top=6)
    assert 1 <= len(results) <= 6
    assert len({r.text for r in results}) == len(results)
    assert [r.prob for r in results] == sorted((r.prob for r in results), reverse=True)
    for result in results:
        assert result.text and result.text.isalnum()
        assert result.prob == pytest.approx(char_filler_prob(char_model, char_tokenizer, "the lazy ", result.text),
                                            rel=1e-9)


def test_complete_scores_the_text_after_the_blank(char_model, char_tokenizer):
    results = complete(char_model, char_tokenizer, "the ___ fox.", top=4)
    assert results
    for result in results:
        assert result.prob == pytest.approx(
            char_filler_prob(char_model, char_tokenizer, "the ", result.text, after=" fox."), rel=1e-9)


def test_complete_mid_word_continues_the_word(char_model, char_tokenizer):
    for result in complete(char_model, char_tokenizer, "the la___", top=3):
        assert result.prob == pytest.approx(char_filler_prob(char_model, char_tokenizer, "the la", result.text),
                                            rel=1e-9)


def test_trained_model_fills_the_blank(trained):
    model, tokenizer = trained
    machine = complete(model, tokenizer, "I love machine ___", top=3)
    assert machine[0].text == "learning"
    assert machine[1].text == "tools"
    assert 0.6 < machine[0].prob < 0.95
    assert complete(model, tokenizer, "I love ___ tools.", top=3)[0].text == "hand"
    assert complete(model, tokenizer, "I love ___ learning.", top=3)[0].text == "machine"


def test_word_model_fills_with_the_likeliest_single_words():
    tokenizer = train_tokenizer("word", "the cat sat on the mat .\nthe dog sat on the log !\n")
    model = random_model(tokenizer)
    state = model.zero_state(1)
    for token in tokenizer.encode("\nthe cat sat on"):
        log_probs, state = model.step(np.array([token]), state)
    words = [(tokenizer.decode([i]), math.exp(log_probs[0, i])) for i in range(tokenizer.vocab_size)
             if tokenizer.decode([i]).isalnum()]
    expected = sorted(words, key=lambda item: -item[1])[:4]
    results = complete(model, tokenizer, "the cat sat on ___", top=4)
    assert [r.text for r in results] == [word for word, _ in expected]
    assert [r.prob for r in results] == pytest.approx([prob for _, prob in expected], rel=1e-9)


def test_bpe_fillers_are_whole_words():
    text = "I love machine learning.\nI love machine tools.\nI love deep learning.\n" * 20
    tokenizer = train_tokenizer("bpe", text, vocab_size=300)
    model = random_model(tokenizer, dtype="float32")
    results = complete(model, tokenizer, "I love machine ___", top=5)
    assert results
    for result in results:
        assert isinstance(result, Completion)
        assert result.text.isalnum() and 0 < result.prob <= 1


@pytest.mark.parametrize("text", ["no blank here", "two ___ blanks ___"])
def test_complete_needs_exactly_one_blank(char_model, char_tokenizer, text):
    with pytest.raises(ConfigError, match="exactly one blank"):
        complete(char_model, char_tokenizer, text)


def test_complete_rejects_bad_counts_and_unknown_text(char_model, char_tokenizer):
    with pytest.raises(ConfigError):
        complete(char_model, char_tokenizer, "the ___", top=0)
    with pytest.raises(TokenizerError):
        complete(char_model, char_tokenizer, "Zany ___")
