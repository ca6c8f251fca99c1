import json
from functools import cache

import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import charlm.corpus as corpus_module
import charlm.tokenize as tokenize_module
from charlm.corpus import TextSpan, resolve_corpus
from charlm.data import encode_cached
from charlm.errors import ConfigError, TokenizerError
from charlm.tokenize import UNK, Tokenizer, train_tokenizer

SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\tCafé crème — naïve 😀 façade, 東京 «quoted» 'n' \"done\".\r\n"
) * 4


@cache
def sample_bpe() -> Tokenizer:
    return train_tokenizer("bpe", SAMPLE, vocab_size=300)


def library_ids(tok: Tokenizer, text: str) -> list[int]:
    """Ids from the plain `tokenizers` pipeline stored in tokenizer.json, as any other tool would get."""
    return tokenizers.Tokenizer.from_str(tok.to_json()).encode(text, add_special_tokens=False).ids


# --- char ---------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1))
def test_char_round_trips_any_text_it_was_trained_on(text):
    tok = train_tokenizer("char", text)
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text)
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(train=st.text(min_size=1, max_size=40), text=st.text(max_size=80))
def test_char_fast_path_gives_the_library_ids(train, text):
    tok = train_tokenizer("char", train)
    assert tok.encode(text, unknown="replace").tolist() == library_ids(tok, text)


def test_char_vocabulary_is_unk_then_code_points_in_order():
    tok = train_tokenizer("char", "bca\nb ")
    assert tok.kind == "char" and tok.unk_id == 0 and tok.eos_id is None
    assert tok.vocab_size == 6
    assert tok.encode("\n abc").tolist() == [1, 2, 3, 4, 5]


def test_char_unknown_characters_are_named_or_replaced():
    tok = train_tokenizer("char", "hello world")
    with pytest.raises(TokenizerError, match=r"characters not in .*'é'.*'😀'.*unknown='replace'"):
        tok.encode("héllo 😀")
    ids = tok.encode("héllo 😀", unknown="replace")
    assert ids[1] == tok.unk_id and ids[-1] == tok.unk_id
    assert tok.decode(ids) == f"h{UNK}llo {UNK}"


def test_char_vocab_size_keeps_the_most_frequent_characters():
    tok = train_tokenizer("char", "aaaa bbb cc d", vocab_size=4)
    assert tok.vocab_size == 4
    assert tok.encode("abcd", unknown="replace").tolist() == [2, 3, tok.unk_id, tok.unk_id]


# --- bpe ----------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_arbitrary_unicode(text):
    tok = sample_bpe()
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.text(alphabet=st.sampled_from(list("ab é\t\n'sX1,")), max_size=12), max_size=30))
def test_bpe_chunked_encoding_equals_one_library_call(monkeypatch, lines):
    monkeypatch.setattr(tokenize_module, "ENCODE_CHUNK_CHARS", 5)
    tok = sample_bpe()
    text = "\n".join(lines)
    assert tok.encode(text).tolist() == library_ids(tok, text)


def test_bpe_has_the_requested_size_and_no_unknown():
    tok = sample_bpe()
    assert tok.kind == "bpe" and tok.vocab_size == 300 and tok.unk_id is None and tok.eos_id is None
    assert tok.decode(tok.encode("never seen: ∮ 𝔘")) == "never seen: ∮ 𝔘"


def test_bpe_vocab_smaller_than_the_byte_alphabet_is_refused():
    with pytest.raises(ConfigError, match="at least 256"):
        train_tokenizer("bpe", SAMPLE, vocab_size=100)


def test_bpe_word_boundaries_follow_spaces_and_punctuation():
    tok = sample_bpe()
    vocab = tokenizers.Tokenizer.from_str(tok.to_json()).get_vocab()
    assert tok.is_word_boundary(vocab["Ġ"]) and tok.is_word_boundary(vocab[","])
    assert not tok.is_word_boundary(vocab["a"])
    merged_words = [t for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2]
    inner_pieces = [t for t in vocab if t.isalpha() and t.isascii() and len(t) > 1]
    assert merged_words and inner_pieces
    assert all(tok.is_word_boundary(vocab[t]) for t in merged_words)
    assert not any(tok.is_word_boundary(vocab[t]) for t in inner_pieces)


# --- word ---------------------------------------------------------------------------------------

WORD_TEXT = " the cat sat on the mat \n the dog sat \n\n a <unk> ran \n"


def test_word_counts_newlines_as_eos_and_keeps_literal_unk():
    tok = train_tokenizer("word", WORD_TEXT)
    assert tok.kind == "word" and tok.unk_id == 0 and tok.eos_id == 1
    assert tok.vocab_size == 2 + len({"the", "cat", "sat", "on", "mat", "dog", "a", "ran"})
    ids = tok.encode(WORD_TEXT)
    assert (ids == tok.eos_id).sum() == WORD_TEXT.count("\n")
    assert (ids == tok.unk_id).sum() == 1
    assert len(ids) == len(WORD_TEXT.split()) + WORD_TEXT.count("\n")


def test_word_vocabulary_is_ordered_by_frequency_and_can_be_capped():
    tok = train_tokenizer("word", WORD_TEXT, vocab_size=4)
    assert tok.vocab_size == 4
    assert tok.decode([2, 3]) == "the sat"
    assert tok.encode("the cat sat", unknown="replace").tolist() == [2, 0, 3]


def test_word_unknown_words_are_named_or_replaced():
    tok = train_tokenizer("word", WORD_TEXT)
    with pytest.raises(TokenizerError, match=r"words not in .*'bird', 'flew'"):
        tok.encode("the bird flew\n")
    assert tok.encode("the bird\n", unknown="replace").tolist() == [
        tok.encode("the")[0], tok.unk_id, tok.eos_id]


def normalise_whitespace(text: str) -> str:
    return "\n".join(" ".join(line.split()) for line in text.split("\n"))


@settings(max_examples=100, deadline=None)
@given(
    leading=st.sampled_from(["", " ", "\n"]),
    pieces=st.lists(st.tuples(st.sampled_from(["the", "cat", "<unk>", "a"]),
                              st.sampled_from([" ", "  ", "\t", "\n", " \n\n ", "\r\n"])), max_size=30),
)
def test_word_round_trip_is_exact_up_to_whitespace(leading, pieces):
    tok = train_tokenizer("word", WORD_TEXT)
    text = leading + "".join(word + separator for word, separator in pieces)
    assert tok.decode(tok.encode(text)) == normalise_whitespace(text)


# --- all kinds ----------------------------------------------------------------------------------

@pytest.fixture(params=["char", "word", "bpe"])
def any_tokenizer(request):
    return train_tokenizer(request.param, SAMPLE, vocab_size=300 if request.param == "bpe" else None)


def test_tokenizer_json_round_trip_keeps_kind_vocab_and_ids(any_tokenizer):
    restored = Tokenizer.from_json(any_tokenizer.to_json())
    assert (restored.kind, restored.vocab_size, restored.unk_id, restored.eos_id) == (
        any_tokenizer.kind, any_tokenizer.vocab_size, any_tokenizer.unk_id, any_tokenizer.eos_id)
    assert restored.encode(SAMPLE).tolist() == any_tokenizer.encode(SAMPLE).tolist()
    assert json.loads(restored.to_json()) == json.loads(any_tokenizer.to_json())


def test_training_is_deterministic(any_tokenizer):
    again = train_tokenizer(any_tokenizer.kind, SAMPLE, vocab_size=300 if any_tokenizer.kind == "bpe" else None)
    assert again.to_json() == any_tokenizer.to_json()


def test_stream_decoding_adds_up_to_decode(any_tokenizer):
    ids = any_tokenizer.encode(SAMPLE)
    stream = any_tokenizer.decoder_stream()
    pieces = [stream.step(int(i)) for i in ids]
    assert "".join(pieces) + stream.finish() == any_tokenizer.decode(ids)


def test_bpe_stream_holds_back_incomplete_characters():
    tok = sample_bpe()
    stream = tok.decoder_stream()
    pieces = [stream.step(int(i)) for i in tok.encode("😀")]
    assert pieces[-1] == "😀" and all(piece == "" for piece in pieces[:-1])


def test_decode_rejects_ids_outside_the_vocabulary(any_tokenizer):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        any_tokenizer.decode([0, any_tokenizer.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        any_tokenizer.decoder_stream().step(-1)


def test_char_and_word_boundaries():
    char = train_tokenizer("char", "ab c,\n")
    assert [char.is_word_boundary(int(i)) for i in char.encode("a ,\n")] == [False, True, True, True]
    word = train_tokenizer("word", WORD_TEXT)
    assert all(word.is_word_boundary(i) for i in range(word.vocab_size))


def test_bad_inputs_are_charlm_errors():
    with pytest.raises(ConfigError, match="kind"):
        train_tokenizer("sentencepiece", "abc")
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer("char", "")
    with pytest.raises(TokenizerError, match="cannot be read"):
        Tokenizer.from_json("{not json")
    other = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(TokenizerError, match="not a charlm"):
        Tokenizer.from_json(other.to_str())
    with pytest.raises(ConfigError, match="unknown must be"):
        train_tokenizer("char", "abc").encode("abc", unknown="skip")


def test_empty_text_encodes_to_no_ids(any_tokenizer):
    assert any_tokenizer.encode("").shape == (0,)
    assert any_tokenizer.decode([]) == ""


# --- real corpora -------------------------------------------------------------------------------

def test_ptb_word_tokenizer_matches_the_published_setup(corpora_dir):
    ptb = resolve_corpus("ptb")
    tok = train_tokenizer("word", ptb.train)
    assert tok.vocab_size == 10_000
    assert [len(encode_cached(tok, span)) for span in (ptb.train, ptb.valid, ptb.test)] == [929_589, 73_760, 82_430]


def test_wikitext2_word_tokenizer_matches_the_published_setup(corpora_dir):
    wiki = resolve_corpus("wikitext-2")
    tok = train_tokenizer("word", wiki.train)
    assert tok.vocab_size == 33_278
    # encoding valid/test without unknowns proves the combined vocabulary is the train one
    assert [len(encode_cached(tok, span)) for span in (wiki.train, wiki.valid, wiki.test)] == [
        2_088_628, 217_646, 245_569]


def test_ptb_char_fast_path_matches_library_on_real_text(corpora_dir):
    ptb_char = resolve_corpus("ptb_char")
    tok = train_tokenizer("char", ptb_char.train)
    assert tok.vocab_size == 52  # 51 distinct characters and <unk>
    sample = ptb_char.valid.read_text()[:200_000]
    assert tok.encode(sample).tolist() == library_ids(tok, sample)


@pytest.mark.parametrize("corpus, kind", [("tinyshakespeare", "char"), ("tinyshakespeare", "bpe"),
                                          ("ptb", "char"), ("ptb", "word"), ("ptb", "bpe"), ("enwik8_small", "char")])
def test_streamed_training_and_encoding_equal_whole_text_ones(corpora_dir, monkeypatch, corpus, kind):
    """A tokenizer trained on a split read as a stream is the one trained on its whole text, and ids encoded
    chunk by chunk (small chunks: many cuts) are the library's ids for the whole text at once."""
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 1 << 12)
    valid = resolve_corpus(corpus).valid
    text = valid.read_text()[:200_000]
    span = TextSpan(valid.path, valid.start, valid.start + len(text.encode()))
    assert len(span.byte_ranges()) > 10
    vocab_size = 300 if kind == "bpe" else None
    streamed = train_tokenizer(kind, span, vocab_size)
    assert streamed.to_json() == train_tokenizer(kind, text, vocab_size).to_json()
    ids = encode_cached(streamed, span)
    assert ids.dtype == streamed.id_dtype
    assert ids.tolist() == library_ids(streamed, text)


def test_id_dtype_is_the_smallest_that_holds_the_vocabulary():
    assert train_tokenizer("char", "abc").id_dtype == np.uint8
    assert train_tokenizer("char", "".join(chr(0x100 + i) for i in range(255))).id_dtype == np.uint8  # 256 ids
    assert train_tokenizer("char", "".join(chr(0x100 + i) for i in range(256))).id_dtype == np.uint16
    assert train_tokenizer("bpe", SAMPLE, 300).id_dtype == np.uint16


def test_decoded_length_counts_block_by_block(monkeypatch, any_tokenizer):
    text = SAMPLE * 40 + "naïve 😀\n" * 40
    ids = any_tokenizer.encode(text, unknown="replace")
    monkeypatch.setattr(tokenize_module, "DECODE_BLOCK_TOKENS", 7)
    assert any_tokenizer.decoded_length(ids) == len(any_tokenizer.decode(ids))


def test_lone_surrogates_are_a_tokenizer_error_not_a_crash(any_tokenizer):
    with pytest.raises(TokenizerError, match="lone surrogate U\\+DC80 at position 2"):
        any_tokenizer.encode("ab\udc80c", unknown="replace")
