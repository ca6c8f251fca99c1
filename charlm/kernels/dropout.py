"""Dropout masks from a counter-based hash: each element depends only on (key, its index), so threads fill
any slices independently and a mask is the same on any number of threads."""

from __future__ import annotations

import numpy as np
from numba import njit

from charlm.runtime import MIN_ELEMENTWISE_CHUNK, parallel_chunks

# splitmix64 (Steele, Lea & Flood 2014): a counter hashed by these steps is a well-tested random stream.
_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = np.uint64(0x94D049BB133111EB)
MASK_BITS = 24  # keep probability resolution 2**-24; float32 keeps 24 bits of it anyway


@njit(cache=True, nogil=True)
def dropout_mask_slice(flat, key, threshold, scale, block, block_stride, offset, lo, hi):
    """flat[n] = scale if hash(key, index) < threshold else 0 for n in [lo, hi), where index is n's place in
    the whole mask: (n // block) * block_stride + offset + n % block (see `dropout_mask`). One division per
    block: the inner loop is the plain counter loop, which vectorises."""
    shift30, shift27, shift31 = np.uint64(30), np.uint64(27), np.uint64(31)
    shift_bits = np.uint64(64 - MASK_BITS)
    zero = flat.dtype.type(0.0)
    n = lo
    while n < hi:
        within = n % block
        stop = min(hi, n + block - within)
        shift = (n // block) * block_stride + offset + within - n  # index = n + shift inside this block
        for m in range(n, stop):
            z = key + np.uint64(m + shift + 1) * _SPLITMIX_GAMMA
            z = (z ^ (z >> shift30)) * _SPLITMIX_MUL1
            z = (z ^ (z >> shift27)) * _SPLITMIX_MUL2
            z = z ^ (z >> shift31)
            flat[m] = scale if (z >> shift_bits) < threshold else zero
        n = stop


def dropout_mask(out, key: int, keep: float, rows: tuple[int, int] | None = None) -> None:
    """Fill out (any shape, C-contiguous) with an inverted-dropout mask: 1 / keep with probability keep, else 0,
    each element drawn by hashing (key, its index), in one parallel pass (numpy's random + compare + scale
    took about four times as long).

    rows=(first, total): out (S, B, ...) holds rows first..first+B of a (S, total, ...) mask and gets exactly
    those rows' values, so processes sharing a batch draw the masks one process would."""
    flat = out.reshape(-1)
    block = block_stride = max(flat.size, 1)
    offset = 0
    if rows is not None:
        first, total = rows
        row_size = out[0, 0].size
        block, block_stride, offset = out.shape[1] * row_size, total * row_size, first * row_size
    threshold = np.uint64(round(keep * (1 << MASK_BITS)))
    scale = out.dtype.type(1.0 / keep)
    parallel_chunks(flat.size, lambda lo, hi: dropout_mask_slice(flat, np.uint64(key), threshold, scale, block,
                                                                 block_stride, offset, lo, hi),
                    min_chunk=MIN_ELEMENTWISE_CHUNK)
