"""The LSTM language model's kernels in forward/backward pairs, in the order a training step runs them:
embedding lookup, the layers' time loops, softmax cross-entropy (forward, or forward with its backward),
the layers' time loops in reverse, the embedding's scatter-add.

The time loops fuse each step's small recurrent product (`gemm.add_row_products`) with the gates'
nonlinearities and the cell update; the weight gradients and the decoder's products are left to BLAS
(numpy.matmul into preallocated buffers, see charlm.model).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from charlm.kernels.fastmath import ERROR_MODEL, FASTMATH, exp, sigmoid, tanh
from charlm.kernels.gemm import add_row_products, project_rows


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def embedding_forward(table, ids, out):
    """Row lookup: out[n] = table[ids[n]].

    table: (V, D); ids: (N,) integer; out: (N, D), same dtype as table. Explicit loops: the slice assignment
    out[n, :] = table[ids[n]] ran at half the speed.
    """
    width = table.shape[1]
    for n in range(ids.shape[0]):
        row, target = table[ids[n]], out[n]
        for k in range(width):
            target[k] = row[k]


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _table_rows(table, ids, bias, out, lo, hi):
    """out[b] = table[ids[b]] + bias for the rows b in [lo, hi): layer 0's input projections from its table."""
    for b in range(lo, hi):
        row, proj = out[b], table[ids[b]]
        for j in range(row.shape[0]):
            row[j] = proj[j] + bias[j]


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model=ERROR_MODEL)
def activate_gates(gates, start, stop):
    """Pre-activations -> activations in place for the entries [start, stop) of one (4H,) row: sigmoid,
    sigmoid, tanh, sigmoid by block (generation's threads each take a share of the row; the time loops all).

    One simple pass per gate block, so LLVM vectorises each (a single loop fusing them stays scalar), each
    over a slice from 0: the output gate's loop written as range(3H, 4H) stayed scalar."""
    hidden = gates.shape[0] // 4
    for lo, hi, squash in ((0, 2 * hidden, True), (2 * hidden, 3 * hidden, False), (3 * hidden, 4 * hidden, True)):
        piece = gates[max(lo, start):min(hi, stop)]
        if squash:
            for j in range(piece.shape[0]):
                piece[j] = sigmoid(piece[j])
        else:
            for j in range(piece.shape[0]):
                piece[j] = tanh(piece[j])


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model=ERROR_MODEL)
def cell_update(gates, c_prev, c, h, tanh_c):
    """c = f*c_prev + i*g, h = o*tanh(c) for one row; gates: (4H,) activations [i, f, g, o].

    c may alias c_prev, but then the loop stays scalar: LLVM cannot rule out overlap."""
    hidden = c.shape[0]
    for k in range(hidden):
        cell = gates[hidden + k] * c_prev[k] + gates[k] * gates[2 * hidden + k]
        tc = tanh(cell)
        c[k] = cell
        tanh_c[k] = tc
        h[k] = gates[3 * hidden + k] * tc


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model=ERROR_MODEL)
def lstm_layer_forward(acts, use_table, table, ids, w_hh, w_hh_panels, bias, h, c, tanh_c, lo, hi, tile):
    """One layer's whole time loop over a window, for the batch rows [lo, hi) (a thread's share).

    acts: (T, B, 4H) holds the input projections x_t @ W_ihᵀ + bias on entry, or with `use_table` they are
    the rows ids (T, B) of table (V, 4H) plus bias; on exit the activations [i, f, g, o] kept for backward.
    Per step: pre-activations = projection + h_{t-1} @ W_hhᵀ (w_hh_panels: W_hh packed, see
    `gemm.add_row_products`, packed for the `gemm.Tile` tile), then the gate nonlinearities and the cell
    update. h, c: (T+1, B, H) with the initial state in h[0], c[0]; tanh_c: (T, B, H)."""
    for t in range(acts.shape[0]):
        if use_table:
            _table_rows(table, ids[t], bias, acts[t], lo, hi)
        add_row_products(h[t], w_hh, w_hh_panels, acts[t], lo, hi, tile)
        for b in range(lo, hi):
            activate_gates(acts[t, b], 0, acts.shape[2])
            cell_update(acts[t, b], c[t, b], c[t + 1, b], h[t + 1, b], tanh_c[t, b])


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model=ERROR_MODEL)
def lstm_stack_forward(acts0, use_table, table, ids, w_ih, w_ih_panels, w_hh, w_hh_panels, biases, h, c, gates,
                       tanh_c, lo, hi, tile):
    """Inference: every layer's time loop at once for the batch rows [lo, hi), layer l of step t right after
    layer l-1, so a step's pre-activations live only in `gates` (B, 4H) and the input projections of layers
    >= 1 are products inside the step (the same register tiles, on the thread's rows): no (T, B, 4H) buffer
    per layer written and read back, and no thread meeting between layers. Nothing is kept for backward.

    Layer 0's pre-activations come as in `lstm_layer_forward` (acts0 with the bias in, or with `use_table`
    rows of table plus bias). w_ih, w_ih_panels, w_hh, w_hh_panels, biases, h, c: tuples with one entry per
    layer (w_ih[0] and its panels unused); h, c: (T+1, B, H) each, the initial state in [0]; tanh_c: (B, H)."""
    for t in range(ids.shape[0]):
        for layer in range(len(w_hh)):
            if layer > 0:
                project_rows(h[layer - 1][t + 1], w_ih[layer], w_ih_panels[layer], biases[layer], gates, lo, hi,
                             max(hi - lo, 1), tile)
            elif use_table:
                _table_rows(table, ids[t], biases[0], gates, lo, hi)
            else:
                gates[lo:hi] = acts0[t, lo:hi]
            add_row_products(h[layer][t], w_hh[layer], w_hh_panels[layer], gates, lo, hi, tile)
            h_layer, c_layer = h[layer], c[layer]
            for b in range(lo, hi):
                activate_gates(gates[b], 0, gates.shape[1])
                cell_update(gates[b], c_layer[t, b], c_layer[t + 1, b], h_layer[t + 1, b], tanh_c[b])


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _max_of_sum(row, bias):
    """max(row + bias), the shift that keeps a softmax's exponentials finite."""
    top = row[0] + bias[0]  # not -inf: a float64 start would turn the whole row math float64
    for v in range(1, row.shape[0]):
        z = row[v] + bias[v]
        if z > top:
            top = z
    return top


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def softmax_xent_forward(logits, bias, targets):
    """Summed cross-entropy (nats, float64) of softmax(logits + bias) against targets, stable by max subtraction.

    logits: (N, V) without the bias; bias: (V,); targets: (N,) integer. Nothing is written.
    """
    n_rows, vocab = logits.shape
    total = 0.0
    for n in range(n_rows):
        top = _max_of_sum(logits[n], bias)
        acc = 0.0
        for v in range(vocab):
            acc += exp(logits[n, v] + bias[v] - top)
        total += np.log(acc) + top - (logits[n, targets[n]] + bias[targets[n]])
    return total


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def softmax_xent_forward_backward(logits, bias, targets, grad_scale):
    """`softmax_xent_forward` that also overwrites logits with its gradient (softmax - onehot) * grad_scale.

    logits: (N, V) without the bias, in place; bias: (V,); targets: (N,) integer. Returns the summed
    cross-entropy in nats (float64); grad_scale is 1/N for the gradient of the mean.
    """
    n_rows, vocab = logits.shape
    total = 0.0
    for n in range(n_rows):
        top = _max_of_sum(logits[n], bias)
        target = targets[n]
        z_target = logits[n, target] + bias[target]  # kept: a far-below-max target's probability underflows
        acc = 0.0
        for v in range(vocab):
            e = exp(logits[n, v] + bias[v] - top)
            logits[n, v] = e
            acc += e
        total += np.log(acc) + top - z_target
        scale = logits.dtype.type(grad_scale / acc)
        for v in range(vocab):
            logits[n, v] *= scale
        logits[n, target] -= logits.dtype.type(grad_scale)
    return total


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def lstm_layer_backward(acts, w_hh_t, w_hh_t_panels, d_h, d_c, d_above, mask, c, tanh_c, lo, hi, tile):
    """Backward of `lstm_layer_forward` in reverse time for the batch rows [lo, hi).

    acts: (T, B, 4H) activations on entry, gradients of the gate pre-activations dG on exit. The gradient
    reaching h_t is the recurrent dG_{t+1} @ W_hh (w_hh_t: W_hhᵀ's panels, or W_hhᵀ itself where there are none)
    plus d_above[t] * mask from the layer above or the decoder; mask: (1, B, H) shared by all steps, or
    (T, B, H). d_h, d_c: (B, H) are zero on entry and hold the gradients of h0, c0 on exit."""
    steps, four_h = acts.shape[0], acts.shape[2]
    hidden = four_h // 4
    one = acts.dtype.type(1.0)
    per_step_mask = mask.shape[0] > 1
    for t in range(steps - 1, -1, -1):
        step_mask = mask[t] if per_step_mask else mask[0]
        for b in range(lo, hi):
            gates, dh_rec, dh_out, keep = acts[t, b], d_h[b], d_above[t, b], step_mask[b]
            c_prev, tc_row, dc_row = c[t, b], tanh_c[t, b], d_c[b]
            for k in range(hidden):
                i = gates[k]
                f = gates[hidden + k]
                g = gates[2 * hidden + k]
                o = gates[3 * hidden + k]
                tc = tc_row[k]
                dh = dh_rec[k] + dh_out[k] * keep[k]
                dc = dc_row[k] + dh * o * (one - tc * tc)
                gates[k] = dc * g * i * (one - i)
                gates[hidden + k] = dc * c_prev[k] * f * (one - f)
                gates[2 * hidden + k] = dc * i * (one - g * g)
                gates[3 * hidden + k] = dh * tc * o * (one - o)
                dc_row[k] = dc * f
                dh_rec[k] = 0.0
        add_row_products(acts[t], w_hh_t, w_hh_t_panels, d_h, lo, hi, tile)


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def embedding_backward(d_table, ids, d_rows):
    """Scatter-add, the backward of `embedding_forward`: d_table[ids[n]] += d_rows[n] (d_table is not zeroed).

    d_table: (V, D); ids: (N,) integer; d_rows: (N, D). Threads may run it on disjoint column ranges. Explicit
    loops: on such column slices the array expression d_table[ids[n]] += d_rows[n] was much slower.
    """
    width = d_rows.shape[1]
    for n in range(d_rows.shape[0]):
        target, source = d_table[ids[n]], d_rows[n]
        for k in range(width):
            target[k] += source[k]
