"""The kernels' checks for the CPU this process compiles for (run by test_kernels_isa.py in a subprocess per
ISA, NUMBA_CPU_NAME and NUMBA_CPU_FEATURES set): products against numpy with every count of leftover rows,
gradients against finite differences with the register tiles in use, generation against model.step.
Prints one JSON line: the target, the tile, and each check's largest error; --products-only runs only
the product checks."""

import json
import sys
from dataclasses import asdict

import numpy as np

import charlm.runtime
from charlm.config import ModelConfig
from charlm.kernels import gemm, target
from charlm.model import LSTMLanguageModel


def product_errors(dtype) -> float:
    """Largest relative error of add_row_products, project_rows and add_matvec against numpy, over row
    ranges covering whole tiles and each count of leftover rows, and a partial last batch-1 block."""
    tile, rng, worst = gemm.default_tile(), np.random.default_rng(0), 0.0
    width = gemm.panel_width(dtype, tile)
    n_out, n_in = 2 * tile.panels * width, 13
    w = rng.standard_normal((n_out, n_in)).astype(dtype)
    panels = np.zeros((n_out // width, n_in, width), dtype)
    gemm.pack_panels(w, panels)
    rows = 2 * tile.rows + 8
    x = rng.standard_normal((rows, n_in)).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype)
    for count in range(tile.rows + 8):
        out = rng.standard_normal((rows, n_out)).astype(dtype)
        expected = out.copy()
        expected[1:1 + count] += x[1:1 + count] @ w.T
        gemm.add_row_products(x, w, panels, out, 1, 1 + count, tile)
        worst = max(worst, float(np.abs(out - expected).max()))
    out = np.zeros((rows, n_out), dtype)
    gemm.project_rows(x, w, panels, bias, out, 0, rows, tile.rows + 1, tile)
    worst = max(worst, float(np.abs(out - (x @ w.T + bias)).max()))
    block = tile.vector_panels * width
    w = rng.standard_normal((2 * block + 5, n_in)).astype(dtype)
    blocks = np.zeros((2, n_in, block), dtype)
    gemm.pack_panels(w[:2 * block], blocks)
    out = rng.standard_normal((1, len(w))).astype(dtype)
    expected = out + x[:1] @ w.T
    gemm.add_matvec(x[:1], w, blocks, out, 0, len(w), tile)
    return max(worst, float(np.abs(out - expected).max()))


def gradient_error() -> float:
    """Largest relative error of backward's gradients against central differences (float64), on shapes
    where every recurrent and input product goes through the tiles, each thread's rows a whole tile and
    leftovers (3: tiles of 2 and 1 rows)."""
    tile = gemm.default_tile()
    steps, batch, hidden, vocab = 3, charlm.runtime.thread_count() * (tile.rows + 3), 16, 11
    config = ModelConfig(vocab_size=vocab, embed_dim=5, hidden_size=hidden, num_layers=2, dropout=0.0,
                         weight_drop=0.0, dtype="float64")
    model = LSTMLanguageModel(config, seed=3, embedding_table="never")
    data = np.random.default_rng(7)
    ids, targets = data.integers(0, vocab, (steps, batch)), data.integers(0, vocab, (steps, batch))

    def loss() -> float:
        return model.forward(ids, targets, train=True)[0]

    loss()
    grads = {name: g.copy() for name, g in model.backward()[0].items()}
    worst = 0.0
    for name in ("lstm.0.w_ih", "lstm.0.w_hh", "lstm.1.w_ih", "lstm.1.w_hh", "embedding"):
        flat = model.params[name].reshape(-1)
        picks = data.choice(flat.size, 6, replace=False)
        numeric = []
        for index in picks:
            original = flat[index]
            flat[index] = original + 1e-5
            plus = loss()
            flat[index] = original - 1e-5
            minus = loss()
            flat[index] = original
            numeric.append((plus - minus) / 2e-5)
        numeric = np.array(numeric)
        analytic = grads[name].reshape(-1)[picks]
        worst = max(worst, float(np.abs(analytic - numeric).max() / max(np.abs(numeric).max(), 1e-8)))
    return worst


def generation_mismatches() -> int:
    """Greedy tokens (several blocks and a partial one) that differ from model.step's argmax; float64, whose
    kernels the gradient check compiled already."""
    config = ModelConfig(vocab_size=150, embed_dim=6, hidden_size=32, num_layers=2, dtype="float64")
    model = LSTMLanguageModel(config, seed=8)
    for value in model.params.values():
        value *= 4.0
    generated = list(model.generate_ids([1, 5, 2], 6, temperature=0.0))
    state, token, mismatches = model.step(np.array([1]), None)[1], 2, 0
    _, state = model.step(np.array([5]), state)
    for next_token in generated:
        log_probs, state = model.step(np.array([token]), state)
        mismatches += int(log_probs[0].argmax() != next_token)
        token = next_token
    return mismatches


if __name__ == "__main__":
    charlm.runtime.limit_threads(1)
    report = {"target": target.describe(), "tile": asdict(gemm.default_tile()),
              "float32_product_error": product_errors(np.float32),
              "float64_product_error": product_errors(np.float64)}
    if sys.argv[1:] != ["--products-only"]:
        report.update(gradient_error=gradient_error(), generation_mismatches=generation_mismatches())
    print(json.dumps(report))
