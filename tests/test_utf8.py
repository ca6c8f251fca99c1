"""The UTF-8 kernels agree with CPython's strict decoder on any bytes."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.kernels import utf8

# Bytes that make every kind of sequence: ASCII, NUL, continuation bytes, overlong and surrogate leads,
# the edges of each lead's valid second byte, and bytes that never appear in UTF-8.
INTERESTING = [0x00, 0x41, 0x0A, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1,
               0xED, 0xEF, 0xF0, 0xF1, 0xF4, 0xF5, 0xFF]
byte_strings = st.lists(st.sampled_from(INTERESTING), max_size=12).map(bytes) | st.binary(max_size=24) | \
    st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass"))


@settings(max_examples=600, deadline=None)
@given(byte_strings)
def test_scan_finds_what_python_decoding_finds(data):
    bad, chars, consumed = utf8.scan(np.frombuffer(data, dtype=np.uint8))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data":  # a sequence cut by the block's end: left for the next
            assert bad == -1 and consumed == exc.start
            assert chars == len(data[:consumed].decode("utf-8"))
        else:
            assert bad == exc.start and consumed == exc.start
        return
    assert (bad, chars, consumed) == (-1, len(text), len(data))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.sets(st.characters(), max_size=20))
def test_code_points_map_through_the_table_and_count(text, vocabulary):
    chars = sorted(vocabulary)
    table = np.full(max((ord(c) for c in chars), default=0) + 1, -1, dtype=np.int32)
    for token_id, char in enumerate(chars, start=1):
        table[ord(char)] = token_id
    data = text.encode("utf-8", "surrogatepass")
    if any(0xD800 <= ord(c) < 0xE000 for c in text):
        return  # not valid UTF-8: the corpus reader refuses it before any mapping
    out = np.empty(len(data), dtype=np.uint32)
    written, first_unknown, invalid = utf8.map_code_points(np.frombuffer(data, dtype=np.uint8), table, 0, out)
    expected = [chars.index(c) + 1 if c in vocabulary else 0 for c in text]
    assert invalid == -1 and out[:written].tolist() == expected
    unknown_at = next((i for i, c in enumerate(text) if c not in vocabulary), None)
    assert first_unknown == (-1 if unknown_at is None else len(text[:unknown_at].encode("utf-8")))
    counts = np.zeros(0x110000, dtype=np.int64)
    assert utf8.count_code_points(np.frombuffer(data, dtype=np.uint8), counts) == -1
    assert {chr(cp): int(n) for cp, n in enumerate(counts) if n} == {c: text.count(c) for c in set(text)}
