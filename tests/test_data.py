import json

import numpy as np
import pytest

import charlm.data as data_module

from charlm.corpus import cache_dir, resolve_corpus
from charlm.data import BatchStream, encode_cached, train_tokenizer_cached
from charlm.errors import ConfigError, CorpusError, TokenizerError
from charlm.tokenize import train_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog\n" * 50


# --- encode_cached ------------------------------------------------------------------------------

def test_encoded_ids_are_cached_memory_mapped_in_the_smallest_dtype(monkeypatch):
    tok = train_tokenizer("char", TEXT)
    ids = encode_cached(tok, TEXT)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint8 and not ids.flags.writeable
    assert ids.tolist() == tok.encode(TEXT).tolist()
    (cached,) = (cache_dir() / "ids").glob("*.bin")
    assert json.loads(cached.with_suffix(".json").read_text()) == {"dtype": "uint8", "tokens": len(TEXT)}

    def fail(*args, **kwargs):
        raise AssertionError("a cached text must not be encoded again")

    monkeypatch.setattr(type(tok), "encode", fail)
    assert encode_cached(tok, TEXT).tolist() == ids.tolist()


def test_cache_key_includes_the_tokenizer_and_the_given_key():
    char = train_tokenizer("char", TEXT)
    word = train_tokenizer("word", TEXT)
    assert len(encode_cached(char, TEXT)) == len(TEXT)
    assert len(encode_cached(word, TEXT)) == len(TEXT.split()) + TEXT.count("\n")
    encode_cached(char, TEXT, key="corpus-a:train")
    encode_cached(char, TEXT, key="corpus-b:train")
    assert len(list((cache_dir() / "ids").glob("*.bin"))) == 4


def test_a_damaged_cache_file_is_rebuilt():
    tok = train_tokenizer("char", TEXT)
    encode_cached(tok, TEXT)
    (path,) = (cache_dir() / "ids").glob("*.bin")
    path.write_bytes(b"truncated")
    assert encode_cached(tok, TEXT).tolist() == tok.encode(TEXT).tolist()
    path.with_suffix(".json").write_text("{not json")
    assert encode_cached(tok, TEXT).tolist() == tok.encode(TEXT).tolist()


def test_unknown_handling_is_part_of_the_key():
    tok = train_tokenizer("char", "abc ")
    assert encode_cached(tok, "abc x", unknown="replace")[-1] == tok.unk_id
    with pytest.raises(TokenizerError, match="'x'"):
        encode_cached(tok, "abc x")


def test_large_vocabularies_are_stored_as_uint32():
    text = "".join(chr(cp) for cp in range(0x100, 0x100 + 70_000) if not 0xD800 <= cp < 0xE000)
    tok = train_tokenizer("char", text)
    assert tok.vocab_size > 65_536
    ids = encode_cached(tok, text)
    assert ids.dtype == np.uint32 and ids.max() == tok.vocab_size - 1


# --- BatchStream --------------------------------------------------------------------------------

def test_windows_walk_contiguous_streams_like_batchify():
    ids = np.arange(103)
    stream = BatchStream(ids, batch_size=4, seq_len=5)
    steps = 103 // 4
    windows = list(stream.epoch())
    assert len(windows) == stream.windows_per_epoch == 5  # 24 steps of input: 5+5+5+5+4
    position = 0
    for inputs, targets, reset_state in windows:
        assert inputs.dtype == np.int32 and inputs.flags.c_contiguous and inputs.shape[1] == 4
        expected = np.arange(position, position + len(inputs))[:, None] + steps * np.arange(4)[None, :]
        np.testing.assert_array_equal(inputs, expected)
        np.testing.assert_array_equal(targets, expected + 1)
        assert reset_state == (position == 0)
        position += len(inputs)
    assert position == steps - 1
    every_target = np.concatenate([targets for _, targets, _ in windows])
    for column in range(4):  # each stream's targets once, in order: every token but its first
        np.testing.assert_array_equal(every_target[:, column], np.arange(column * steps + 1, (column + 1) * steps))


def test_epochs_follow_each_other_and_report_their_start():
    stream = BatchStream(np.arange(50), batch_size=2, seq_len=4)
    first = [w.reset_state for w in stream.epoch()]
    assert first[0] and not any(first[1:]) and stream.current_epoch == 1 and stream.position == 0
    window = stream.next_window()
    assert window.reset_state and stream.current_epoch == 1


@pytest.mark.parametrize(("random_length", "sampling"), [(False, "streams"), (True, "streams"), (True, "random")])
def test_a_restored_stream_yields_exactly_the_same_windows(random_length, sampling):
    ids = np.arange(2000) % 97
    stream = BatchStream(ids, batch_size=3, seq_len=20, random_length=random_length, sampling=sampling, seed=7)
    for _ in range(45):
        stream.next_window()
    saved = json.loads(json.dumps(stream.state_dict()))
    expected = [stream.next_window() for _ in range(30)]
    restored = BatchStream(ids, batch_size=3, seq_len=20, random_length=random_length, sampling=sampling, seed=123)
    restored.load_state_dict(saved)
    for want, got in zip(expected, (restored.next_window() for _ in range(30))):
        np.testing.assert_array_equal(want.inputs, got.inputs)
        np.testing.assert_array_equal(want.targets, got.targets)
        assert want.reset_state == got.reset_state


def test_random_sampling_draws_spans_from_everywhere_and_always_resets_the_state():
    ids = np.arange(1000)
    stream = BatchStream(ids, batch_size=4, seq_len=10, sampling="random", seed=0)
    windows = list(stream.epoch())
    assert len(windows) == stream.windows_per_epoch and stream.current_epoch == 1
    starts = []
    for inputs, targets, reset_state in windows:
        assert reset_state and inputs.dtype == np.int32 and inputs.flags.c_contiguous
        np.testing.assert_array_equal(inputs, inputs[0] + np.arange(len(inputs))[:, None])  # contiguous spans
        np.testing.assert_array_equal(targets, inputs + 1)
        assert targets.max() < len(ids)
        starts.extend(inputs[0])
    assert min(starts) < 100 and max(starts) > 880  # the streams would start every row at 0, 250, 500, 750
    with pytest.raises(ConfigError, match="window sampling must be one of"):
        BatchStream(ids, batch_size=4, seq_len=10, sampling="shuffled")


def test_a_stream_cursor_does_not_resume_with_another_sampling():
    stream = BatchStream(np.arange(500), batch_size=2, seq_len=10)
    stream.next_window()
    state = stream.state_dict()
    with pytest.raises(ConfigError, match="sampling was 'streams', now 'random'"):
        BatchStream(np.arange(500), batch_size=2, seq_len=10, sampling="random").load_state_dict(state)
    del state["sampling"]  # saved before the option existed: streams
    BatchStream(np.arange(500), batch_size=2, seq_len=10).load_state_dict(state)


def test_random_lengths_follow_the_awd_lstm_rule():
    stream = BatchStream(np.arange(200_000), batch_size=1, seq_len=70, random_length=True, seed=0)
    lengths = np.array([len(stream.next_window().inputs) for _ in range(2000)])
    assert lengths.min() >= 2 and lengths.max() <= stream.max_seq_len == 85
    short = lengths < 50
    assert 0.02 < short.mean() < 0.09
    assert abs(lengths[~short].mean() - 70) < 1.0 and abs(lengths[short].mean() - 35) < 3.0


def test_same_seed_gives_the_same_random_lengths():
    lengths = [
        [len(w.inputs) for w in BatchStream(np.arange(5000), 2, 30, random_length=True, seed=3).epoch()]
        for _ in range(2)
    ]
    assert lengths[0] == lengths[1] and len(set(lengths[0])) > 3


def test_a_corpus_shorter_than_one_window_says_what_is_needed():
    with pytest.raises(CorpusError, match=r"corpus has 40 tokens, .*batch_size 4 x \(seq_len 10 \+ 1\) = 44"):
        BatchStream(np.arange(40), batch_size=4, seq_len=10)
    BatchStream(np.arange(44), batch_size=4, seq_len=10)


def test_resuming_with_a_different_shape_is_refused():
    state = BatchStream(np.arange(500), batch_size=4, seq_len=10).state_dict()
    with pytest.raises(ConfigError, match="batch_size was 4, now 5"):
        BatchStream(np.arange(500), batch_size=5, seq_len=10).load_state_dict(state)
    with pytest.raises(ConfigError, match="num_tokens"):
        BatchStream(np.arange(600), batch_size=4, seq_len=10).load_state_dict(state)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0, "seq_len": 5}, {"batch_size": 2, "seq_len": 2.5}])
def test_bad_shapes_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        BatchStream(np.arange(100), **kwargs)


def test_stream_over_cached_ids_of_a_real_split(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    splits = resolve_corpus(path)
    tok = train_tokenizer("char", splits.train)
    ids = encode_cached(tok, splits.train, key=splits.cache_key("train"))
    inputs, targets, _ = BatchStream(ids, batch_size=2, seq_len=8).next_window()
    half = len(ids) // 2
    train = splits.train.read_text()
    assert tok.decode(inputs[:, 0]) == train[:8]
    assert tok.decode(targets[:, 1]) == train[half + 1:half + 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]  # the cache is elsewhere


def test_a_tokenizer_trained_on_a_split_is_cached_by_key_and_settings(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    span = resolve_corpus(path).train
    char = train_tokenizer_cached("char", span, "corpus-a:train")
    assert char.to_json() == train_tokenizer("char", span).to_json()
    capped = train_tokenizer_cached("char", span, "corpus-a:train", vocab_size=5)
    assert capped.vocab_size == 5 and len(list((cache_dir() / "tokenizers").glob("*.json"))) == 2

    def fail(*args, **kwargs):
        raise AssertionError("a cached tokenizer must not be trained again")

    monkeypatch.setattr(data_module, "train_tokenizer", fail)
    assert train_tokenizer_cached("char", span, "corpus-a:train").to_json() == char.to_json()
    with pytest.raises(AssertionError, match="trained again"):
        train_tokenizer_cached("char", span, "corpus-b:train")
