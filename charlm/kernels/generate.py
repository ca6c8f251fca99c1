"""Batch-1 streaming generation in compiled code: every layer, the decoder and the sampler for a chunk of
tokens per call, split across threads that meet after each layer (charlm.runtime.meet)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from charlm.kernels.fastmath import ERROR_MODEL, FASTMATH, exp
from charlm.kernels.gemm import Tile, add_matvec
from charlm.kernels.lstm import activate_gates, cell_update
from charlm.runtime import meet


class GenerationWeights(NamedTuple):
    """What batch-1 generation reads of a model, L layers of hidden size H, vocabulary V, embedding width E.

    table0: (V, 4H) precomputed embedding @ W_ih0ᵀ, or a (0, 4H) array to use W_ih0 directly. w_ih, w_hh,
    bias: tuples of the L layers' arrays ((4H, In), (4H, H), (4H,)). The *_panels: the same matrices'
    whole blocks of rows packed for `gemm.add_matvec` (N, K, block) (w_ih_panels[0] empty with a table)
    for `tile` (a `gemm.Tile`: block = its vector_panels vectors)."""
    embedding: np.ndarray
    table0: np.ndarray
    w_ih: tuple
    w_hh: tuple
    bias: tuple
    decoder_weight: np.ndarray
    decoder_bias: np.ndarray
    w_ih_panels: tuple
    w_hh_panels: tuple
    decoder_panels: np.ndarray
    tile: Tile


class Sampling(NamedTuple):
    """How `sample` draws a token: temperature (0 = greedy), top_k (0 = all), top_p (1 = all)."""
    temperature: float
    top_k: int
    top_p: float


class GenerationScratch(NamedTuple):
    """A generation thread's buffers. Shared by the threads: gates (L, 4H), logits (1, V). Each thread's
    own: c_next and tanh_c (H,), probs (V,) float64."""
    gates: np.ndarray
    logits: np.ndarray
    c_next: np.ndarray
    tanh_c: np.ndarray
    probs: np.ndarray


@njit(cache=True, fastmath=FASTMATH, error_model=ERROR_MODEL)
def sample(logits, temperature, top_k, top_p, uniform, probs):
    """Token drawn from softmax(logits / temperature) restricted to the top_k tokens (0 = all) and to the
    smallest most-probable set with mass >= top_p, using one uniform number in [0, 1); argmax when
    temperature <= 0. probs: (V,) float64 workspace."""
    vocab = logits.shape[0]
    inv_temperature = logits.dtype.type(1.0 / temperature) if temperature > 0.0 else logits.dtype.type(np.inf)
    if inv_temperature == np.inf:  # temperature 0, or so small that 1/T overflows the dtype: greedy
        return np.argmax(logits)
    top = logits[0]
    for v in range(vocab):
        top = max(top, logits[v])
    threshold = -np.inf
    if 0 < top_k < vocab:
        threshold = -np.partition(-logits, top_k - 1)[top_k - 1]
    # In the logits' dtype and without a branch, so the exponentials vectorise (in float64 through libm they
    # were a large share of a large-vocabulary token).
    total = 0.0
    for v in range(vocab):
        e = exp((logits[v] - top) * inv_temperature)
        p = np.float64(e) if logits[v] >= threshold else 0.0
        probs[v] = p
        total += p
    if top_p < 1.0:
        order = np.argsort(-probs)
        kept = 0.0
        cut = vocab
        for rank in range(vocab):
            kept += probs[order[rank]]
            if kept >= top_p * total:
                cut = rank + 1
                break
        for rank in range(cut, vocab):
            probs[order[rank]] = 0.0
        total = kept
    target = uniform * total
    running = 0.0
    last = 0
    for v in range(vocab):
        if probs[v] > 0.0:
            running += probs[v]
            last = v
            if running > target:
                return v
    return last


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model=ERROR_MODEL)
def generate_tokens(part, n_parts, meetings, token, h, c, weights, sampling, uniforms, tokens, scratch):
    """Batch-1 streaming generation of len(uniforms) tokens after `token`, written to `tokens`: each step
    feeds the last token through all layers, the decoder and the sampler (one uniform number each).

    Run by n_parts threads at once, this one being `part` (0 alone writes `tokens`): at batch 1 the
    matrix-vector products stream every weight from cache or memory once per token, so each thread takes
    its share of every matrix's blocks of outputs (and activates its gates), and the threads meet
    (`meet`, on `meetings`) after each layer and after the decoder: L + 1 meetings a token. Each thread
    then updates the whole cell and samples on its own, with the same numbers, so they agree on the state
    and the token without passing them on, and the tokens do not depend on n_parts.

    h, c: (L, H), this thread's copy of the state, updated in place (equal in all threads). weights: a
    `GenerationWeights`; sampling: a `Sampling`; scratch: this thread's `GenerationScratch`. Several tokens
    per call, since a compiled call's own cost (type-checking its arguments) is paid once per call.
    """
    gates, logits, c_next, tanh_c, probs = scratch
    block = weights.decoder_panels.shape[2]
    n_layers, hidden = h.shape
    four_h = 4 * hidden
    blocks = (four_h + block - 1) // block
    vocab = weights.decoder_weight.shape[0]
    vocab_blocks = (vocab + block - 1) // block
    rows_lo = min(part * blocks // n_parts * block, four_h)
    rows_hi = min((part + 1) * blocks // n_parts * block, four_h)
    vocab_lo = min(part * vocab_blocks // n_parts * block, vocab)
    vocab_hi = min((part + 1) * vocab_blocks // n_parts * block, vocab)
    use_table = weights.table0.shape[0] > 0
    for i in range(uniforms.shape[0]):
        # What the old state determines: every layer's bias + h_prev @ W_hhᵀ, and layer 0's input.
        for layer in range(n_layers):
            layer_gates = gates[layer:layer + 1]
            layer_gates[0, rows_lo:rows_hi] = weights.bias[layer][rows_lo:rows_hi]
            if layer == 0:
                if use_table:
                    layer_gates[0, rows_lo:rows_hi] += weights.table0[token, rows_lo:rows_hi]
                else:
                    add_matvec(weights.embedding[token:token + 1], weights.w_ih[0], weights.w_ih_panels[0],
                               layer_gates, rows_lo, rows_hi, weights.tile)
            add_matvec(h[layer:layer + 1], weights.w_hh[layer], weights.w_hh_panels[layer], layer_gates, rows_lo,
                       rows_hi, weights.tile)
        for layer in range(n_layers):
            if layer > 0:
                add_matvec(h[layer - 1:layer], weights.w_ih[layer], weights.w_ih_panels[layer],
                           gates[layer:layer + 1], rows_lo, rows_hi, weights.tile)
            activate_gates(gates[layer], rows_lo, rows_hi)
            meet(meetings, part, n_parts)
            cell_update(gates[layer], c[layer], c_next, h[layer], tanh_c)
            c[layer] = c_next
        logits[0, vocab_lo:vocab_hi] = weights.decoder_bias[vocab_lo:vocab_hi]
        add_matvec(h[n_layers - 1:], weights.decoder_weight, weights.decoder_panels, logits, vocab_lo, vocab_hi,
                   weights.tile)
        meet(meetings, part, n_parts)
        token = sample(logits[0], sampling.temperature, sampling.top_k, sampling.top_p, uniforms[i], probs)
        if part == 0:
            tokens[i] = token
