"""Numba kernels over raw UTF-8 bytes: check, count and map code points without building a `str`.

A corpus of any size is read as blocks of bytes; these kernels walk a block once at memory speed and
release the GIL, so two threads check or encode two blocks at once. Validity follows CPython's strict
UTF-8 decoder exactly (no overlong forms, no surrogates, nothing above U+10FFFF), and an invalid sequence
is reported at its first byte, the offset `bytes.decode` would name.

buf: (n,) uint8, the bytes of whole lines (a sequence cut by the block's end is left for the next block).
"""

from __future__ import annotations

import numpy as np
from numba import njit

NO_POSITION = -1


@njit(cache=True, nogil=True, inline="always")
def _sequence_at(buf, i):
    """(code point, length) of the sequence starting at buf[i]; length 0 if invalid, -1 if cut by the end."""
    n = buf.shape[0]
    b0 = np.int64(buf[i])
    if b0 < 0x80:
        return b0, 1
    if b0 < 0xC2 or b0 > 0xF4:
        return 0, 0
    if b0 < 0xE0:
        length, cp, low, high = 2, b0 & 0x1F, 0x80, 0xBF
    elif b0 < 0xF0:
        length, cp = 3, b0 & 0x0F
        low = 0xA0 if b0 == 0xE0 else 0x80
        high = 0x9F if b0 == 0xED else 0xBF
    else:
        length, cp = 4, b0 & 0x07
        low = 0x90 if b0 == 0xF0 else 0x80
        high = 0x8F if b0 == 0xF4 else 0xBF
    for k in range(1, length):
        if i + k >= n:
            return 0, -1
        b = np.int64(buf[i + k])
        if b < low or b > high:
            return 0, 0
        low, high = 0x80, 0xBF
        cp = (cp << 6) | (b & 0x3F)
    return cp, length


@njit(cache=True, nogil=True)
def scan(buf):
    """(first invalid offset or -1, code points, bytes consumed) of a block.

    Scanning stops at the first invalid sequence. `bytes consumed` stops short of a multi-byte sequence
    cut by the block's end, whose bytes the caller prepends to the next block.
    """
    n = buf.shape[0]
    chars = 0
    i = 0
    while i < n:
        if buf[i] < 0x80:
            chars += 1
            i += 1
            continue
        _, length = _sequence_at(buf, i)
        if length == -1:
            break
        if length == 0:
            return i, chars, i
        chars += 1
        i += length
    return NO_POSITION, chars, i


@njit(cache=True, nogil=True)
def count_code_points(buf, counts):
    """Add each code point's occurrences in valid UTF-8 `buf` to `counts` ((0x110000,) int64)."""
    n = buf.shape[0]
    i = 0
    while i < n:
        cp, length = _sequence_at(buf, i)
        if length <= 0:
            return i
        counts[cp] += 1
        i += length
    return NO_POSITION


@njit(cache=True, nogil=True)
def map_code_points(buf, table, unknown_id, out):
    """Write table[code point] (or `unknown_id` past the table's end or where it holds -1) for each
    character of valid UTF-8 `buf` into `out`; returns (ids written, offset of the first unknown or -1,
    offset of the first invalid sequence or -1)."""
    n = buf.shape[0]
    size = table.shape[0]
    written = 0
    first_unknown = NO_POSITION
    i = 0
    while i < n:
        cp, length = _sequence_at(buf, i)
        if length <= 0:
            return written, first_unknown, i
        token = table[cp] if cp < size else -1
        if token < 0:
            token = unknown_id
            if first_unknown == NO_POSITION:
                first_unknown = i
        out[written] = token
        written += 1
        i += length
    return written, first_unknown, NO_POSITION
