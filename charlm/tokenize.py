"""Text <-> token ids: char, word or byte-level BPE, each stored as one Hugging Face `tokenizer.json`.

- char: one token per Unicode code point seen in training, plus "<unk>" (id 0) for any other.
- word: whitespace-separated words of the training text plus "<unk>" and "<eos>"; every newline is an
  "<eos>" token (Mikolov's PTB convention), so perplexities compare with published word-level ones.
  decode(encode(s)) is exact up to whitespace: words are re-joined by single spaces, lines by "\n".
- bpe: byte-level BPE, so every string encodes without unknowns and decodes back exactly.

Char text is mapped from its UTF-8 bytes by a Numba kernel and a table over code points (the same ids as
the `tokenizers` pipeline, which is far slower on one token per character); word and BPE text goes through
`tokenizers` in line-aligned chunks so it runs in parallel. A tokenizer trains on a string or on a corpus
split read as a stream (`TextSpan`): characters are counted chunk by chunk on every core, words and BPE
merges come from `tokenizers`' trainers fed an iterator, BPE on an evenly spaced sample of a big split.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections.abc import Iterable, Iterator

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from charlm.kernels import utf8
from charlm.corpus import TextSpan, map_chunks
from charlm.errors import ConfigError, TokenizerError

KINDS = ("char", "word", "bpe")
UNK = "<unk>"
EOS = "<eos>"
DEFAULT_BPE_VOCAB_SIZE = 1024
BYTE_ALPHABET_SIZE = 256
UNKNOWN_MODES = ("error", "replace")
ENCODE_CHUNK_CHARS = 1 << 16
CHUNKS_PER_BATCH = 16  # 1 M characters: the library returns rich Encoding objects, keep few alive
SHOWN_UNKNOWNS = 8
CODE_POINTS = 0x110000
DECODE_BLOCK_TOKENS = 1 << 20
DEFAULT_BPE_SAMPLE_BYTES = 50 * 10**6

# A cut after a newline followed by a word character (or one space and a word character, as every PTB
# and WikiText line starts) is a boundary for both the whitespace and the byte-level (GPT-2 regex)
# pre-tokenizers, so encoding chunk by chunk gives the same ids as one call.
_CHUNK_CUT = re.compile(r"\n(?= ?\w)")


def train_tokenizer(kind: str, source: str | TextSpan, vocab_size: int | None = None,
                    bpe_sample_bytes: int = DEFAULT_BPE_SAMPLE_BYTES) -> Tokenizer:
    """Build a tokenizer from training text (a string, or a corpus split read as a stream); `vocab_size`
    caps char/word (most frequent kept), sizes BPE. BPE learns its merges from `bpe_sample_bytes` of a
    larger split (`TextSpan.sample_ranges`); char and word vocabularies count all of it."""
    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not (source if isinstance(source, str) else source.size):
        raise TokenizerError("cannot train a tokenizer on empty text")
    if isinstance(source, str):
        _require_encodable(source)
    if kind == "char":
        return Tokenizer(_char_backend(_count_code_points(source), vocab_size))
    if kind == "word":
        return Tokenizer(_word_backend(_text_chunks(source), vocab_size))
    return Tokenizer(_bpe_backend(_text_chunks(source, sample_bytes=bpe_sample_bytes), vocab_size))


def _text_chunks(source: str | TextSpan, sample_bytes: int | None = None) -> Iterator[str]:
    if isinstance(source, str):
        return _chunks(source, ENCODE_CHUNK_CHARS)
    return source.chunks(source.sample_ranges(sample_bytes) if sample_bytes else None)


def _count_code_points(source: str | TextSpan) -> np.ndarray:
    """(0x110000,) int64 occurrences of each code point, counted chunk by chunk (in parallel for a span)."""
    counts = np.zeros(CODE_POINTS, dtype=np.int64)
    if isinstance(source, str):
        for piece in _chunks(source, ENCODE_CHUNK_CHARS):
            utf8.count_code_points(np.frombuffer(piece.encode("utf-8"), dtype=np.uint8), counts)
        return counts
    for present, occurrences in map_chunks(source, _code_points_in, desc="counting characters"):
        counts[present] += occurrences
    return counts


def _code_points_in(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(code points present, their counts) in UTF-8 bytes; invalid bytes (a corpus read with
    errors="replace") count as U+FFFD, as decoding them would."""
    counts = np.zeros(CODE_POINTS, dtype=np.int64)
    if utf8.count_code_points(np.frombuffer(data, dtype=np.uint8), counts) >= 0:
        counts[:] = 0
        text = data.decode("utf-8", errors="replace").encode("utf-8")
        utf8.count_code_points(np.frombuffer(text, dtype=np.uint8), counts)
    present = np.flatnonzero(counts)
    return present, counts[present]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what charlm needs around it: fast char encoding, unknown checks,
    streaming decode and word boundaries. The kind is read back from the tokenizer.json itself."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self._backend = backend
        spec = json.loads(backend.to_str())
        vocab = backend.get_vocab(with_added_tokens=True)
        self.kind = _kind_of(spec, vocab)
        self.vocab_size = len(vocab)
        self._tokens = [""] * self.vocab_size
        for token, token_id in vocab.items():
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"tokenizer.json has token id {token_id} outside 0..{self.vocab_size - 1}")
            self._tokens[token_id] = token
        self.unk_id = vocab.get(UNK) if self.kind != "bpe" else None
        self.eos_id = vocab.get(EOS) if self.kind == "word" else None
        if self.kind == "char":
            self._init_char_table()
        if self.kind == "bpe":
            byte_of = {char: byte for byte, char in enumerate(_byte_level_alphabet())}
            self._token_bytes = [bytes(byte_of[c] for c in token) for token in self._tokens]
        self._boundary = np.array([self._token_is_boundary(i) for i in range(self.vocab_size)], dtype=bool)
        self._clean_restart = np.array([self._decoding_restarts_at(i) for i in range(self.vocab_size)], dtype=bool)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # the library raises plain Exception for malformed JSON
            raise TokenizerError(f"tokenizer.json cannot be read: {str(exc).splitlines()[0]}") from None
        return cls(backend)

    def to_json(self) -> str:
        return self._backend.to_str()

    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """int32 ids; unknown="error" raises naming unseen characters/words, "replace" maps them to <unk>."""
        if unknown not in UNKNOWN_MODES:
            raise ConfigError(f"unknown must be one of {', '.join(UNKNOWN_MODES)}, got {unknown!r}")
        if not text:
            return np.zeros(0, dtype=np.int32)
        _require_encodable(text)
        if self.kind == "char":
            return self._encode_chars(text.encode("utf-8"), unknown, np.int32)
        return self._encode_with_backend(text, unknown).astype(np.int32, copy=False)

    @property
    def id_dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id: uint8 up to 256 tokens, then uint16, uint32."""
        for dtype in (np.uint8, np.uint16, np.uint32):
            if self.vocab_size <= np.iinfo(dtype).max + 1:
                return np.dtype(dtype)
        raise TokenizerError(f"vocabulary of {self.vocab_size} tokens is too large")

    def encode_utf8(self, data: bytes, unknown: str = "error") -> np.ndarray:
        """Ids (as `id_dtype`) of a piece of a corpus given as UTF-8 bytes that ends at a line boundary."""
        if unknown not in UNKNOWN_MODES:
            raise ConfigError(f"unknown must be one of {', '.join(UNKNOWN_MODES)}, got {unknown!r}")
        if self.kind == "char":
            return self._encode_chars(data, unknown, self.id_dtype)
        text = data.decode("utf-8", errors="replace")
        return self._encode_with_backend(text, unknown).astype(self.id_dtype) if text else \
            np.zeros(0, dtype=self.id_dtype)

    def decoded_length(self, ids: np.ndarray) -> int:
        """len(self.decode(ids)), decoding at most about a million tokens at a time: each block ends
        where decoding restarts cleanly (after <eos> for words, before a character's first byte for BPE)."""
        total, start = 0, 0
        while start < len(ids):
            end = min(start + DECODE_BLOCK_TOKENS, len(ids))
            if end < len(ids) and self.kind != "char":
                clean = self._clean_restart[np.asarray(ids[end:], dtype=np.int64)]
                end = end + int(np.argmax(clean)) + (self.kind == "word") if clean.any() else len(ids)
            total += len(self.decode(ids[start:end]))
            start = end
        return total

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise TokenizerError(f"token id {bad} is outside the vocabulary of {self.vocab_size}")
        if self.kind == "bpe":
            return b"".join(self._token_bytes[i] for i in ids.tolist()).decode("utf-8", errors="replace")
        if self.kind == "word":
            return "".join(_join_words(self._tokens[i] for i in ids.tolist()))
        return "".join(self._tokens[i] for i in ids.tolist())

    def decoder_stream(self) -> TokenStreamDecoder:
        return TokenStreamDecoder(self)

    def is_word_boundary(self, token_id: int) -> bool:
        """True when the token starts or ends a word (whitespace, punctuation, <eos>; every word token)."""
        return bool(self._boundary[token_id])

    def _init_char_table(self) -> None:
        """table[code point] = token id, -1 for characters outside the vocabulary."""
        chars = {ord(token): token_id for token_id, token in enumerate(self._tokens) if token_id != self.unk_id}
        self._char_table = np.full(max(chars, default=0) + 1, -1, dtype=np.int32)
        self._char_table[list(chars)] = list(chars.values())

    def _encode_chars(self, data: bytes, unknown: str, dtype) -> np.ndarray:
        """Ids of UTF-8 `data`; invalid bytes (a corpus read with errors="replace") are U+FFFD."""
        out = np.empty(len(data), dtype=dtype)
        written, first_unknown, invalid = utf8.map_code_points(
            np.frombuffer(data, dtype=np.uint8), self._char_table, self.unk_id, out)
        if invalid >= 0:
            return self._encode_chars(data.decode("utf-8", errors="replace").encode("utf-8"), unknown, dtype)
        if unknown == "error" and first_unknown >= 0:
            text = data.decode("utf-8")
            unseen = sorted({char for char in text if ord(char) >= len(self._char_table)
                             or self._char_table[ord(char)] < 0})
            raise TokenizerError(_unknown_message("characters", unseen))
        return out[:written]

    def _encode_with_backend(self, text: str, unknown: str) -> np.ndarray:
        pieces = []
        check = unknown == "error" and self.unk_id is not None
        encode_batch = self._backend.encode_batch if check else self._backend.encode_batch_fast  # offsets cost
        chunks = _chunks(text, ENCODE_CHUNK_CHARS)
        while batch := list(itertools.islice(chunks, CHUNKS_PER_BATCH)):
            for chunk, encoding in zip(batch, encode_batch(batch, add_special_tokens=False)):
                ids = np.asarray(encoding.ids, dtype=np.int32)
                if check:
                    self._check_unknown_words(chunk, ids, encoding.offsets)
                pieces.append(ids)
        return np.concatenate(pieces)

    def _check_unknown_words(self, chunk: str, ids: np.ndarray, offsets: list[tuple[int, int]]) -> None:
        """A literal "<unk>" in the text (as in PTB) is the unknown word itself, not an error."""
        unseen = {chunk[slice(*offsets[i])] for i in np.flatnonzero(ids == self.unk_id)} - {UNK}
        if unseen:
            raise TokenizerError(_unknown_message("words", sorted(unseen)))

    def _decoding_restarts_at(self, token_id: int) -> bool:
        """Decoding from this token on gives the same text as decoding it after what came before."""
        if self.kind == "word":
            return token_id == self.eos_id  # (for the token after it: see decoded_length)
        if self.kind == "bpe":
            return (self._token_bytes[token_id][:1] or b"\0")[0] & 0xC0 != 0x80
        return True

    def _token_is_boundary(self, token_id: int) -> bool:
        if token_id == self.unk_id:
            return self.kind == "word"
        if self.kind == "word":
            return True
        if self.kind == "char":
            return not self._tokens[token_id].isalnum()
        return _bytes_touch_boundary(self._token_bytes[token_id])


class TokenStreamDecoder:
    """Decodes one generated token at a time; a BPE token that ends inside a multi-byte character
    yields "" until the character is complete, so streamed text never shows broken characters."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_line_start = True

    def step(self, token_id: int) -> str:
        """The new text this token adds."""
        tok = self._tokenizer
        if not 0 <= token_id < tok.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary of {tok.vocab_size}")
        if tok.kind == "bpe":
            return self._utf8.decode(tok._token_bytes[token_id])
        token = tok._tokens[token_id]
        if tok.kind == "char":
            return token
        piece = "\n" if token == EOS else (token if self._at_line_start else " " + token)
        self._at_line_start = token == EOS
        return piece

    def finish(self) -> str:
        """Whatever an unfinished BPE byte sequence stands for (U+FFFD) at the end of generation."""
        return self._utf8.decode(b"", final=True)


def _char_backend(counts: np.ndarray, vocab_size: int | None) -> tokenizers.Tokenizer:
    """<unk>, then the characters seen in code point order (the most frequent when capped)."""
    unique = np.flatnonzero(counts)
    if vocab_size is not None:
        if vocab_size < 2:
            raise ConfigError(f"char vocab_size must be at least 2 (<unk> and one character), got {vocab_size}")
        keep = np.argsort(-counts[unique], kind="stable")[:vocab_size - 1]
        unique = np.sort(unique[keep])
    vocab = {UNK: 0} | {chr(cp): token_id for token_id, cp in enumerate(unique.tolist(), start=1)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return backend


def _word_backend(chunks: Iterator[str], vocab_size: int | None) -> tokenizers.Tokenizer:
    """<unk> and <eos> first, then words by falling frequency; <unk> counts once even when the text
    already uses it (PTB does), so PTB's train split gives exactly 10,000 tokens."""
    specials = [UNK, EOS]
    if vocab_size is not None and vocab_size <= len(specials):
        raise ConfigError(f"word vocab_size must be more than {len(specials)} (<unk>, <eos>), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
    _set_word_pipeline(backend)
    trainer = trainers.WordLevelTrainer(vocab_size=2**31 - 1, min_frequency=0, show_progress=False)
    backend.train_from_iterator(chunks, trainer=trainer)
    by_frequency = sorted(backend.get_vocab().items(), key=lambda item: item[1])
    words = [word for word, _ in by_frequency if word not in specials]
    if vocab_size is not None:
        words = words[:vocab_size - len(specials)]
    vocab = {token: token_id for token_id, token in enumerate(specials + words)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    _set_word_pipeline(backend)
    return backend


def _set_word_pipeline(backend: tokenizers.Tokenizer) -> None:
    backend.normalizer = normalizers.Replace("\n", f" {EOS} ")
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()


def _bpe_backend(chunks: Iterator[str], vocab_size: int | None) -> tokenizers.Tokenizer:
    vocab_size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size
    if vocab_size < BYTE_ALPHABET_SIZE:
        raise ConfigError(f"bpe vocab_size must be at least {BYTE_ALPHABET_SIZE} (the byte alphabet), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(chunks, trainer=trainer)
    return backend


def _kind_of(spec: dict, vocab: dict[str, int]) -> str:
    model = (spec.get("model") or {}).get("type")
    pre_tokenizer = (spec.get("pre_tokenizer") or {}).get("type")
    if model == "BPE" and pre_tokenizer == "ByteLevel":
        return "bpe"
    if model == "WordLevel" and pre_tokenizer == "Split" and UNK in vocab:
        if all(len(token) == 1 for token in vocab if token != UNK):
            return "char"
    if model == "WordLevel" and pre_tokenizer == "WhitespaceSplit" and UNK in vocab and EOS in vocab:
        return "word"
    raise TokenizerError(f"tokenizer.json is not a charlm char, word or bpe tokenizer (model {model}, "
                         f"pre-tokenizer {pre_tokenizer})")


def _chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of about `size` characters, cut only where no token can straddle the cut."""
    start = 0
    while len(text) - start > size:
        cut = _CHUNK_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.end()]
        start = cut.end()
    yield text[start:]


def _join_words(tokens: Iterable[str]) -> Iterator[str]:
    at_line_start = True
    for token in tokens:
        if token == EOS:
            yield "\n"
        else:
            yield token if at_line_start else " " + token
        at_line_start = token == EOS


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map that ByteLevel BPE tokens are spelled in (index = byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, shifted = [], 0
    for byte in range(BYTE_ALPHABET_SIZE):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(BYTE_ALPHABET_SIZE + shifted))
            shifted += 1
    return alphabet


def _bytes_touch_boundary(token: bytes) -> bool:
    """A BPE token is a boundary when its first or last whole character is not alphanumeric."""
    text = token.decode("utf-8", errors="replace")
    first_whole = token[0] < 0x80 or text[0] != "\ufffd"
    last_whole = token[-1] < 0x80 or text[-1] != "\ufffd"
    return (first_whole and not text[0].isalnum()) or (last_whole and not text[-1].isalnum())


def _unknown_message(what: str, unseen: list[str]) -> str:
    shown = ", ".join(repr(item) for item in unseen[:SHOWN_UNKNOWNS])
    more = f" and {len(unseen) - SHOWN_UNKNOWNS} more" if len(unseen) > SHOWN_UNKNOWNS else ""
    return (f"text has {what} not in the tokenizer's vocabulary: {shown}{more}; "
            f"map them to {UNK} with --unknown replace (unknown='replace' in Python)")


def _require_encodable(text: str) -> None:
    """Lone surrogates (e.g. undecodable bytes smuggled in by the OS) are not text any tokenizer can encode."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(
            f"text holds a lone surrogate U+{ord(text[exc.start]):04X} at position {exc.start}, which is not valid Unicode"
        ) from None
