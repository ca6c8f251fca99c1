"""Text <-> token ids: char, word or byte-level BPE, each stored as one Hugging Face `tokenizer.json`.

- char: one token per Unicode code point seen in training, plus "<unk>" (id 0) for any other.
- word: whitespace-separated words of the training text plus "<unk>" and "<eos>"; every newline is an
  "<eos>" token (Mikolov's PTB convention), so perplexities compare with published word-level ones.
  decode(encode(s)) is exact up to whitespace: words are re-joined by single spaces, lines by "\n".
- bpe: byte-level BPE, so every string encodes without unknowns and decodes back exactly.

Char text is encoded with numpy (same ids as the `tokenizers` pipeline, which is slow on char
tokens); word and BPE text goes through `tokenizers` in line-aligned chunks so it runs in parallel.
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

from charlm.errors import ConfigError, TokenizerError

KINDS = ("char", "word", "bpe")
UNK = "<unk>"
EOS = "<eos>"
DEFAULT_BPE_VOCAB_SIZE = 1024
BYTE_ALPHABET_SIZE = 256
UNKNOWN_MODES = ("error", "replace")
ENCODE_CHUNK_CHARS = 1 << 16
CHUNKS_PER_BATCH = 64
CHAR_ENCODE_BLOCK = 1 << 22
SHOWN_UNKNOWNS = 8

# A cut after a newline followed by a word character (or one space and a word character, as every PTB
# and WikiText line starts) is a boundary for both the whitespace and the byte-level (GPT-2 regex)
# pre-tokenizers, so encoding chunk by chunk gives the same ids as one call.
_CHUNK_CUT = re.compile(r"\n(?= ?\w)")


def train_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer from training text; `vocab_size` caps char/word (most frequent kept), sizes BPE."""
    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not text:
        raise TokenizerError("cannot train a tokenizer on empty text")
    if kind == "char":
        return Tokenizer(_char_backend(text, vocab_size))
    if kind == "word":
        return Tokenizer(_word_backend(text, vocab_size))
    return Tokenizer(_bpe_backend(text, vocab_size))


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
            return self._encode_chars(text, unknown)
        return self._encode_with_backend(text, unknown)

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
        chars = [(ord(token), token_id) for token_id, token in enumerate(self._tokens) if token_id != self.unk_id]
        chars.sort()
        self._char_codepoints = np.array([cp for cp, _ in chars], dtype=np.uint32)
        self._char_ids = np.array([token_id for _, token_id in chars], dtype=np.int32)

    def _encode_chars(self, text: str, unknown: str) -> np.ndarray:
        ids = np.empty(len(text), dtype=np.int32)
        for start in range(0, len(text), CHAR_ENCODE_BLOCK):
            block = text[start:start + CHAR_ENCODE_BLOCK]
            codepoints = np.frombuffer(block.encode("utf-32-le"), dtype="<u4")
            slots = np.searchsorted(self._char_codepoints, codepoints)
            np.minimum(slots, len(self._char_codepoints) - 1, out=slots)
            known = self._char_codepoints[slots] == codepoints
            if unknown == "error" and not known.all():
                unseen = [chr(cp) for cp in np.unique(codepoints[~known])]
                raise TokenizerError(_unknown_message("characters", unseen))
            ids[start:start + len(block)] = np.where(known, self._char_ids[slots], self.unk_id)
        return ids

    def _encode_with_backend(self, text: str, unknown: str) -> np.ndarray:
        pieces = []
        chunks = _chunks(text, ENCODE_CHUNK_CHARS)
        while batch := list(itertools.islice(chunks, CHUNKS_PER_BATCH)):
            for chunk, encoding in zip(batch, self._backend.encode_batch(batch, add_special_tokens=False)):
                ids = np.asarray(encoding.ids, dtype=np.int32)
                if unknown == "error" and self.unk_id is not None:
                    self._check_unknown_words(chunk, ids, encoding.offsets)
                pieces.append(ids)
        return np.concatenate(pieces)

    def _check_unknown_words(self, chunk: str, ids: np.ndarray, offsets: list[tuple[int, int]]) -> None:
        """A literal "<unk>" in the text (as in PTB) is the unknown word itself, not an error."""
        unseen = {chunk[slice(*offsets[i])] for i in np.flatnonzero(ids == self.unk_id)} - {UNK}
        if unseen:
            raise TokenizerError(_unknown_message("words", sorted(unseen)))

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


def _char_backend(text: str, vocab_size: int | None) -> tokenizers.Tokenizer:
    codepoints = np.concatenate([
        np.frombuffer(text[start:start + CHAR_ENCODE_BLOCK].encode("utf-32-le"), dtype="<u4")
        for start in range(0, len(text), CHAR_ENCODE_BLOCK)
    ])
    unique, counts = np.unique(codepoints, return_counts=True)
    if vocab_size is not None:
        if vocab_size < 2:
            raise ConfigError(f"char vocab_size must be at least 2 (<unk> and one character), got {vocab_size}")
        keep = np.argsort(-counts, kind="stable")[:vocab_size - 1]
        unique = np.sort(unique[keep])
    vocab = {UNK: 0} | {chr(cp): token_id for token_id, cp in enumerate(unique.tolist(), start=1)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return backend


def _word_backend(text: str, vocab_size: int | None) -> tokenizers.Tokenizer:
    """<unk> and <eos> first, then words by falling frequency; <unk> counts once even when the text
    already uses it (PTB does), so PTB's train split gives exactly 10,000 tokens."""
    specials = [UNK, EOS]
    if vocab_size is not None and vocab_size <= len(specials):
        raise ConfigError(f"word vocab_size must be more than {len(specials)} (<unk>, <eos>), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
    _set_word_pipeline(backend)
    trainer = trainers.WordLevelTrainer(vocab_size=2**31 - 1, min_frequency=0, show_progress=False)
    backend.train_from_iterator(_chunks(text, ENCODE_CHUNK_CHARS), trainer=trainer)
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


def _bpe_backend(text: str, vocab_size: int | None) -> tokenizers.Tokenizer:
    vocab_size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size
    if vocab_size < BYTE_ALPHABET_SIZE:
        raise ConfigError(f"bpe vocab_size must be at least {BYTE_ALPHABET_SIZE} (the byte alphabet), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(_chunks(text, ENCODE_CHUNK_CHARS), trainer=trainer)
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
