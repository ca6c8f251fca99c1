"""The stacked-LSTM language model: parameters, forward and backward over one truncated-BPTT window, and
batch-1 generation.

A window of ids (T, B) goes embedding -> L LSTM layers -> linear decoder -> softmax. Per layer the input
projection of all T steps is one GEMM (or, for layer 0 with a small vocabulary, a lookup in the
precomputed (V, 4H) table embedding @ W_ih0ᵀ); each step is one recurrent GEMM W_hh @ hᵀ plus one fused
Numba kernel. Backward runs the steps in reverse with one fused kernel each and forms every weight
gradient as a single GEMM over the whole window. Buffers are allocated once per (B, train) for the longest
window seen; shorter windows use a prefix of them.
Threads split the batch rows for the time loops and the rows of every large GEMM (see charlm.runtime).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from charlm.kernels import generate, gemm, lstm, tuning
from charlm.kernels.dropout import dropout_mask
from charlm.kernels.target import caches
from charlm.config import ModelConfig
from charlm.errors import ConfigError
from charlm.runtime import (available_cores, ensure_threads_limited, meeting_counters, meetings_released_on_error,
                            one_cpu_each, others_keep_cores_busy, parallel_chunks, parallel_matmul, pinned_to_cpu,
                            single_threaded_blas, thread_count)

EMBEDDING_TABLE_MODES = ("auto", "always", "never")
# While generating on several threads, how often (seconds) to check that no other process has come to share
# the cores (a meeting then waits for a descheduled thread, far slower than one thread alone),
# and how soon to look again after a check found one, which may be passing through.
LOAD_CHECK_SECONDS = (0.25, 0.01)
# Tokens sampled per compiled call after the first: the call's own cost (type-checking its arguments) and,
# on several threads, waking the pool's thread are paid once per chunk, and a chunk of a large model still
# arrives within a blink.
GENERATION_CHUNK = 64


def parallel_generation_bytes() -> int:
    """Weight bytes a thread of batch-1 generation should have to read, at least, before a token's products
    are split across one more thread: half of one core's L2 (gemm.DEFAULT_L2_BYTES where the OS does not
    say). Weights that fit there are read about as fast by one core as by two, and the threads' meetings
    (L + 1 a token) then cost more than they save; weights that overflow one core's L2 are split so that
    each core's share stays in its own L2 (measurements in benchmarks/README.md)."""
    return (caches().l2 or gemm.DEFAULT_L2_BYTES) // 2


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, in the fixed order used by checkpoints and optimizers.

    The 4H rows of w_ih, w_hh and bias hold the gates in PyTorch's order i, f, g, o, so weights copy over
    unchanged; PyTorch's two biases (b_ih + b_hh) are one here."""
    vocab, hidden = config.vocab_size, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embedding": (vocab, config.embed_dim)}
    for layer in range(config.num_layers):
        inputs = config.embed_dim if layer == 0 else hidden
        shapes[f"lstm.{layer}.w_ih"] = (4 * hidden, inputs)
        shapes[f"lstm.{layer}.w_hh"] = (4 * hidden, hidden)
        shapes[f"lstm.{layer}.bias"] = (4 * hidden,)
    if not config.tie_weights:
        shapes["decoder.weight"] = (vocab, hidden)
    shapes["decoder.bias"] = (vocab,)
    return shapes


def init_params(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """PyTorch-like initialisation, deterministic in `seed`: LSTM and decoder weights U(±1/√H), biases 0
    except the forget gate's 1 (so early training does not forget everything). The embedding is N(0, 1)
    like nn.Embedding's, so the first layer sees inputs of unit scale from step one (U(±0.1) learned
    markedly slower: docs/experiments.md); tied to the decoder it is U(±0.1) instead (as in AWD-LSTM),
    since N(0, 1) decoder rows would start with huge logits."""
    rng = np.random.default_rng(seed)
    hidden = config.hidden_size
    bound = 1.0 / np.sqrt(hidden)
    params = {}
    for name, shape in param_shapes(config).items():
        if name == "embedding":
            value = rng.uniform(-0.1, 0.1, shape) if config.tie_weights else rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
            if name.startswith("lstm."):
                value[hidden : 2 * hidden] = 1.0
        else:
            value = rng.uniform(-bound, bound, shape)
        params[name] = np.ascontiguousarray(value, dtype=config.dtype)
    return params


def _checked_params(config: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The given arrays in the config's dtype, C-contiguous and writable (copied only when they are not)."""
    shapes = param_shapes(config)
    if set(params) != set(shapes):
        missing = sorted(set(shapes) - set(params))
        extra = sorted(set(params) - set(shapes))
        raise ConfigError(f"parameters do not match the model config: missing {missing}, unexpected {extra}")
    checked = {}
    for name, shape in shapes.items():
        value = np.asarray(params[name])
        if value.shape != shape:
            raise ConfigError(f"parameter {name} has shape {value.shape}, the config needs {shape}")
        value = np.require(value, dtype=config.dtype, requirements=["C", "W"])
        checked[name] = value
    return checked


class _Workspace:
    """Every buffer a window of up to `steps` steps needs, allocated once and reused by every window of
    that batch size (a shorter one uses a `prefix`)."""

    def __init__(self, config: ModelConfig, steps: int, batch: int, train: bool, tile: gemm.Tile):
        dtype = np.dtype(config.dtype)
        self.tile = tile
        self.steps, self.batch, self.train = steps, batch, train
        layers, hidden, vocab = config.num_layers, config.hidden_size, config.vocab_size
        self.h = [np.zeros((steps + 1, batch, hidden), dtype) for _ in range(layers)]  # h[l][0] = h0
        self.c = [np.zeros((steps + 1, batch, hidden), dtype) for _ in range(layers)]
        # Training keeps every layer's activations (then dG) and tanh(c) for backward; inference keeps only
        # layer 0's input projections, as the layers above project their inputs step by step into `gates`.
        self.acts = [np.zeros((steps, batch, 4 * hidden), dtype) for _ in range(layers if train else 1)]
        self.tanh_c = [np.zeros((steps, batch, hidden), dtype) for _ in range(layers if train else 0)]
        self.gates = np.zeros((0 if train else batch, 4 * hidden), dtype)
        self.tanh_step = np.zeros((0 if train else batch, hidden), dtype)
        self.embedded = np.zeros((steps, batch, config.embed_dim), dtype)
        self.table = np.zeros((vocab, 4 * hidden), dtype)
        self.logits = np.zeros((steps * batch, vocab), dtype)
        self.w_hh_panels = [self._panels(4 * hidden, hidden, dtype, batch, tile) for _ in range(layers)]
        # Window-wide input projections have T*B rows; inference's per-step ones above layer 0 have B.
        self.w_ih_panels = [
            self._panels(4 * hidden, config.embed_dim if layer == 0 else hidden, dtype,
                         steps * batch if train or layer == 0 else batch, tile)
            for layer in range(layers)
        ]
        dropout = train and config.dropout > 0.0
        # dropped[l] is the masked input of layer l (l >= 1); dropped[layers] the masked decoder input.
        self.dropped = [None] + [
            np.zeros((steps, batch, hidden), dtype) if dropout else None for _ in range(layers)
        ]
        if train:
            self.ones = np.ones((1, batch, hidden), dtype)
            # masks[l] multiplies the input of layer l (l >= 1), masks[layers] the decoder input: one (1, B, H)
            # mask for all steps when locked, else one per step.
            mask_shape = (1 if config.locked_dropout else steps, batch, hidden)
            self.masks = [None] + [np.zeros(mask_shape, dtype) if dropout else None for _ in range(layers)]
            weight_drop = config.weight_drop > 0.0
            self.w_hh_masks = [np.zeros((4 * hidden, hidden), dtype) if weight_drop else None for _ in range(layers)]
            self.w_hh_dropped = [np.zeros((4 * hidden, hidden), dtype) if weight_drop else None for _ in range(layers)]
            # Backward's recurrent products read W_hhᵀ packed straight from W_hh, or (without panels: a few
            # rows) as a contiguous copy; the other is empty.
            self.w_hh_t_panels = self._panels(hidden, 4 * hidden, dtype, batch, tile)
            self.w_hh_t = np.zeros((0 if self.w_hh_t_panels.shape[0] else hidden, 4 * hidden), dtype)
            self.d_h = np.zeros((batch, hidden), dtype)
            self.d_c = np.zeros((batch, hidden), dtype)
            self.d_hidden = np.zeros((steps, batch, hidden), dtype)
            self.d_embedded = np.zeros((steps, batch, config.embed_dim), dtype)
            self.d_table = np.zeros((vocab, 4 * hidden), dtype)
            self.d_decoder = np.zeros((vocab, hidden), dtype) if config.tie_weights else None

    def prefix(self, steps: int) -> _Workspace:
        """This workspace cut to its first `steps` time steps: views, no copies (all stay C-contiguous)."""
        if steps == self.steps:
            return self
        view = copy.copy(self)
        view.steps = steps
        view.h = [h[:steps + 1] for h in self.h]
        view.c = [c[:steps + 1] for c in self.c]
        view.acts = [acts[:steps] for acts in self.acts]
        view.tanh_c = [tanh_c[:steps] for tanh_c in self.tanh_c]
        view.dropped = [None if dropped is None else dropped[:steps] for dropped in self.dropped]
        view.embedded = self.embedded[:steps]
        view.logits = self.logits[:steps * self.batch]
        if self.train:
            view.masks = [None if mask is None else mask[:steps] for mask in self.masks]  # locked: (1, B, H) whole
            view.d_hidden = self.d_hidden[:steps]
            view.d_embedded = self.d_embedded[:steps]
        return view

    @staticmethod
    def _panels(n_out: int, n_in: int, dtype, batch: int, tile: gemm.Tile) -> np.ndarray:
        """Room for a (n_out, n_in) matrix packed by gemm.pack_panels; empty where panels do not apply,
        e.g. for the few rows of beam search, which then skips packing W_hh at every step."""
        width = gemm.panel_width(dtype, tile)
        n_panels = n_out // width if gemm.panels_apply(n_out, dtype, batch, tile) else 0
        return np.zeros((n_panels, n_in, width), dtype)


class LSTMLanguageModel:
    """Embedding -> stacked LSTM -> decoder, with forward/backward over a window and streaming generation.

    `params` are updated in place by the optimizer; `embedding_table` chooses when layer 0's input
    projection is a lookup in the (V, 4H) table instead of a GEMM ("auto": when V <= T*B/2).
    """

    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray] | None = None, seed: int = 0,
                 embedding_table: str = "auto"):
        if embedding_table not in EMBEDDING_TABLE_MODES:
            raise ConfigError(f"embedding_table must be one of {', '.join(EMBEDDING_TABLE_MODES)}")
        ensure_threads_limited()
        self.config = config
        self.params = init_params(config, seed) if params is None else _checked_params(config, params)
        self.embedding_table = embedding_table
        self._dtype = np.dtype(config.dtype)
        self._tile = gemm.default_tile()
        self._dropout_rng = np.random.default_rng(seed)
        self._workspaces: dict[tuple[int, bool], _Workspace] = {}
        self._saved: dict | None = None
        self._grads: dict[str, np.ndarray] | None = None
        self._grad_buffer: np.ndarray | None = None
        self._frozen_depth = 0
        self._packed: set[tuple] = set()  # what inference workspaces hold of the weights (see _needs_packing)

    def num_parameters(self) -> int:
        return sum(p.size for p in self.params.values())

    def zero_state(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return np.zeros(shape, self._dtype), np.zeros(shape, self._dtype)

    @property
    def _decoder_weight(self) -> np.ndarray:
        return self.params["embedding" if self.config.tie_weights else "decoder.weight"]

    def _uses_table(self, n_tokens: int) -> bool:
        if self.embedding_table == "auto":
            return 2 * self.config.vocab_size <= n_tokens
        return self.embedding_table == "always"

    def _time_loop_tile(self, batch: int) -> gemm.Tile:
        """The register tile for the time loops' products, where each thread multiplies its share of the
        batch rows with a (4H, H) matrix: measured once per CPU and shape where that leaves a choice
        (charlm.kernels.tuning)."""
        hidden = self.config.hidden_size
        return tuning.tuned_tile(self._dtype, 4 * hidden, hidden, max(1, batch // thread_count()))

    def _workspace(self, steps: int, batch: int, train: bool) -> _Workspace:
        """One workspace per (batch, train) as long as the longest window so far, shorter windows using its
        prefix: random window lengths would otherwise keep a workspace per length seen (140 MB each for the Tiny
        Shakespeare recipe: gigabytes)."""
        workspace = self._workspaces.get((batch, train))
        if workspace is None or workspace.steps < steps:
            workspace = self._workspaces[(batch, train)] = _Workspace(self.config, steps, batch, train,
                                                                      self._time_loop_tile(batch))
            if not train:  # a new buffer holds none of the weights yet
                self._packed = {key for key in self._packed if key[1] != batch}
        return workspace.prefix(steps)

    def _check_ids(self, ids, name: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"{name} must be a non-empty (T, B) integer array, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ConfigError(f"{name} holds ids outside the vocabulary of {self.config.vocab_size}")
        return np.ascontiguousarray(ids, dtype=np.intp)

    def _check_state(self, state, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if state is None:
            return self.zero_state(batch)
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        h0, c0 = (np.asarray(s) for s in state)
        if h0.shape != shape or c0.shape != shape:
            raise ConfigError(f"state must be two arrays of shape {shape}, got {h0.shape} and {c0.shape}")
        return h0, c0

    def _dropout_masks(self, ws: _Workspace, rng, rows: tuple[int, int] | None = None) -> list[np.ndarray | None]:
        """Fresh inverted-dropout masks in the workspace's buffers (see `_Workspace.masks`); `rows` as in
        `forward`."""
        for mask in ws.masks[1:]:
            self._fill_mask(mask, rng, self.config.dropout, rows)
        return ws.masks

    def _weight_drop_masks(self, ws: _Workspace, rng) -> list[np.ndarray]:
        """One DropConnect mask (4H, H) per layer's W_hh, drawn after the dropout masks."""
        for mask in ws.w_hh_masks:
            self._fill_mask(mask, rng, self.config.weight_drop)
        return ws.w_hh_masks

    @staticmethod
    def _fill_mask(mask: np.ndarray, rng, rate: float, rows: tuple[int, int] | None = None) -> None:
        """Inverted-dropout mask: 0 with probability `rate`, else 1 / (1 - rate); rng draws only its key."""
        dropout_mask(mask, int(rng.integers(2**64, dtype=np.uint64)), 1.0 - rate, rows)

    def _recurrent_weights(self, ws: _Workspace, weight_masks) -> list[np.ndarray]:
        """Each layer's W_hh as this window uses it: the parameter, or its masked copy under weight drop."""
        weights = [self.params[f"lstm.{layer}.w_hh"] for layer in range(self.config.num_layers)]
        if weight_masks is None:
            return weights
        return [np.multiply(w, mask, out=out) for w, mask, out in zip(weights, weight_masks, ws.w_hh_dropped)]

    def _run_layers(self, ws: _Workspace, ids: np.ndarray, h0, c0, masks, recurrent, use_table: bool) -> np.ndarray:
        """Forward through every LSTM layer; returns the decoder input (T*B, H), dropout applied.

        The time loop runs on the threads' shares of the batch rows, which stay independent for all T:
        in training a layer at a time (backward needs every layer's activations), in inference all layers
        at once (`lstm.lstm_stack_forward`)."""
        if not ws.train:
            return self._run_stack(ws, ids, h0, c0, recurrent, use_table)
        steps, batch = ids.shape
        n_tokens = steps * batch
        hidden = self.config.hidden_size
        params = self.params
        for layer in range(self.config.num_layers):
            w_hh = recurrent[layer]
            w_ih = params[f"lstm.{layer}.w_ih"]
            bias = params[f"lstm.{layer}.bias"]
            h, c, acts, tanh_c = ws.h[layer], ws.c[layer], ws.acts[layer], ws.tanh_c[layer]
            h[0] = h0[layer]
            c[0] = c0[layer]
            table = use_table and layer == 0
            if table:
                np.matmul(params["embedding"], w_ih.T, out=ws.table)
            else:
                if layer == 0:
                    lstm.embedding_forward(params["embedding"], ids.reshape(-1), ws.embedded.reshape(n_tokens, -1))
                    inputs = ws.embedded
                else:
                    inputs = self._layer_input(ws, layer, masks)
                self._project(inputs.reshape(n_tokens, -1), w_ih, ws.w_ih_panels[layer], bias,
                              acts.reshape(n_tokens, 4 * hidden))

            gemm.pack_panels(w_hh, ws.w_hh_panels[layer])
            parallel_chunks(batch, lambda lo, hi: lstm.lstm_layer_forward(
                acts, table, ws.table, ids, w_hh, ws.w_hh_panels[layer], bias, h, c, tanh_c, lo, hi, ws.tile))
        return self._layer_input(ws, self.config.num_layers, masks).reshape(n_tokens, hidden)

    @contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """A block in which the weights do not change (say an evaluation pass over a corpus): inference then
        packs them for its register tiles, and builds layer 0's table, once per batch size instead of once
        per window. Changing the weights inside it gives stale results."""
        if self._frozen_depth == 0:
            self._packed.clear()
        self._frozen_depth += 1
        try:
            yield
        finally:
            self._frozen_depth -= 1
            if self._frozen_depth == 0:
                self._packed.clear()

    def _needs_packing(self, key: tuple) -> bool:
        """Whether an inference workspace's copy of some weights (key: what, batch size, ...) must be built
        again: always, except once built inside `frozen_weights`."""
        if key in self._packed:
            return False
        if self._frozen_depth:
            self._packed.add(key)
        return True

    def _run_stack(self, ws: _Workspace, ids: np.ndarray, h0, c0, recurrent, use_table: bool) -> np.ndarray:
        """Inference forward (no dropout): layer 0's input projection for the whole window (or its table),
        then one compiled loop over steps and layers per thread; returns the last layer's outputs (T*B, H)."""
        steps, batch = ids.shape
        n_tokens = steps * batch
        params, layers = self.params, range(self.config.num_layers)
        w_ih = tuple(params[f"lstm.{layer}.w_ih"] for layer in layers)
        biases = tuple(params[f"lstm.{layer}.bias"] for layer in layers)
        for layer in layers:
            ws.h[layer][0] = h0[layer]
            ws.c[layer][0] = c0[layer]
        if self._needs_packing(("layers", batch)):
            for layer in layers:
                gemm.pack_panels(recurrent[layer], ws.w_hh_panels[layer])
                if layer > 0:
                    gemm.pack_panels(w_ih[layer], ws.w_ih_panels[layer])
        if self._needs_packing(("layer 0 input", batch, use_table)):
            if use_table:
                np.matmul(params["embedding"], w_ih[0].T, out=ws.table)
            else:
                gemm.pack_panels(w_ih[0], ws.w_ih_panels[0])
        acts0 = ws.acts[0]
        if not use_table:
            lstm.embedding_forward(params["embedding"], ids.reshape(-1), ws.embedded.reshape(n_tokens, -1))
            self._project(ws.embedded.reshape(n_tokens, -1), w_ih[0], ws.w_ih_panels[0], biases[0],
                          acts0.reshape(n_tokens, -1), packed=True)
        parallel_chunks(batch, lambda lo, hi: lstm.lstm_stack_forward(
            acts0, use_table, ws.table, ids, w_ih, tuple(ws.w_ih_panels), tuple(recurrent), tuple(ws.w_hh_panels),
            biases, tuple(ws.h), tuple(ws.c), ws.gates, ws.tanh_step, lo, hi, ws.tile))
        return ws.h[-1][1:].reshape(n_tokens, -1)

    def _project(self, x: np.ndarray, w: np.ndarray, panels: np.ndarray, bias: np.ndarray, out: np.ndarray,
                 packed: bool = False) -> None:
        """out = x @ wᵀ + bias for a whole window, through the register tiles where the shapes allow (quicker
        than OpenBLAS on the model's shapes, whose rows are few), else BLAS. `packed`: the panels already
        hold w."""
        if panels.shape[0] == 0:
            parallel_matmul(x, w.T, out)
            out += bias
            return
        if not packed:
            gemm.pack_panels(w, panels)
        block = gemm.row_block(w.shape[1], w.shape[0], x.dtype, self._tile)
        parallel_chunks(x.shape[0], lambda lo, hi: gemm.project_rows(x, w, panels, bias, out, lo, hi, block,
                                                                     self._tile))

    @staticmethod
    def _layer_input(ws: _Workspace, layer: int, masks) -> np.ndarray:
        """Input of `layer` (or of the decoder when layer == L): the layer below's outputs h[1:], masked."""
        below = ws.h[layer - 1][1:]
        if masks is None:
            return below
        return np.multiply(below, masks[layer], out=ws.dropped[layer])

    def _final_state(self, ws: _Workspace) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([h[-1] for h in ws.h]), np.stack([c[-1] for c in ws.c])

    def forward(self, ids, targets, state=None, train: bool = False, rng: np.random.Generator | None = None,
                rows: tuple[int, int] | None = None):
        """Mean cross-entropy (nats/token) of predicting `targets` from `ids`, both (T, B), starting from
        `state` (None = zeros); returns (loss, final state). train=True applies dropout with masks from
        `rng` and keeps what backward() needs. rows=(first, total): these B rows are rows first.. of a batch
        of `total` rows split among processes, and take that batch's dropout masks for their rows."""
        ids = self._check_ids(ids, "ids")
        targets = self._check_ids(targets, "targets")
        if targets.shape != ids.shape:
            raise ConfigError(f"targets shape {targets.shape} differs from ids shape {ids.shape}")
        steps, batch = ids.shape
        n_tokens = steps * batch
        h0, c0 = self._check_state(state, batch)
        self._saved = None
        ws = self._workspace(steps, batch, train)
        masks = weight_masks = None
        rng = self._dropout_rng if rng is None else rng
        if train and self.config.dropout > 0.0:
            masks = self._dropout_masks(ws, rng, rows)
        if train and self.config.weight_drop > 0.0:
            weight_masks = self._weight_drop_masks(ws, rng)
        recurrent = self._recurrent_weights(ws, weight_masks)
        use_table = self._uses_table(n_tokens)
        bias = self.params["decoder.bias"]
        flat_targets = targets.reshape(-1)
        logits = ws.logits

        def cross_entropy(lo: int, hi: int) -> float:
            if train:
                return lstm.softmax_xent_forward_backward(logits[lo:hi], bias, flat_targets[lo:hi], 1.0 / n_tokens)
            return lstm.softmax_xent_forward(logits[lo:hi], bias, flat_targets[lo:hi])

        with single_threaded_blas():
            outputs = self._run_layers(ws, ids, h0, c0, masks, recurrent, use_table)
            parallel_matmul(outputs, self._decoder_weight.T, logits)
            total = sum(parallel_chunks(n_tokens, cross_entropy))
        if train:
            self._saved = {"ws": ws, "ids": ids, "masks": masks, "recurrent": recurrent,
                           "weight_masks": weight_masks, "use_table": use_table, "outputs": outputs}
        return float(total) / n_tokens, self._final_state(ws)

    def backward(self) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """Gradients of the last training forward's mean loss: every parameter and the incoming (h0, c0).

        The returned arrays are reused: valid until the next forward call. Call once per forward."""
        if self._saved is None:
            raise RuntimeError("backward() needs a preceding forward(train=True)")
        saved, self._saved = self._saved, None
        ws, ids, masks, use_table = saved["ws"], saved["ids"], saved["masks"], saved["use_table"]
        config = self.config
        grads = self._gradient_views()
        batch = ids.shape[1]
        d_h0 = np.zeros((config.num_layers, batch, config.hidden_size), self._dtype)
        d_c0 = np.zeros_like(d_h0)
        with single_threaded_blas():
            self._backward_layers(ws, ids, masks, saved["recurrent"], use_table, saved["outputs"], grads, d_h0, d_c0)
            if saved["weight_masks"] is not None:
                for layer, mask in enumerate(saved["weight_masks"]):
                    grads[f"lstm.{layer}.w_hh"] *= mask
        if config.tie_weights:
            grads["embedding"] += ws.d_decoder
        return grads, (d_h0, d_c0)

    @property
    def flat_gradients(self) -> np.ndarray:
        """One flat buffer that the arrays backward() returns are views of, in `param_shapes` order (to sum
        across processes in one call)."""
        self._gradient_views()
        return self._grad_buffer

    def _gradient_views(self) -> dict[str, np.ndarray]:
        if self._grads is None:
            self._grad_buffer = np.zeros(self.num_parameters(), self._dtype)
            self._grads, start = {}, 0
            for name, param in self.params.items():
                self._grads[name] = self._grad_buffer[start:start + param.size].reshape(param.shape)
                start += param.size
        return self._grads

    def _backward_layers(self, ws: _Workspace, ids, masks, recurrent, use_table: bool, outputs, grads, d_h0,
                         d_c0) -> None:
        """Decoder, then every layer in reverse time; each weight gradient is one GEMM over the window."""
        config, params = self.config, self.params
        steps, batch = ids.shape
        n_tokens = steps * batch
        hidden = config.hidden_size
        flat_ids = ids.reshape(-1)
        d_logits = ws.logits
        decoder_grad = ws.d_decoder if config.tie_weights else grads["decoder.weight"]
        parallel_matmul(d_logits.T, outputs, decoder_grad)
        np.sum(d_logits, axis=0, out=grads["decoder.bias"])
        d_above = ws.d_hidden
        parallel_matmul(d_logits, self._decoder_weight, d_above.reshape(n_tokens, hidden))
        for layer in reversed(range(config.num_layers)):
            w_hh = recurrent[layer]
            w_ih = params[f"lstm.{layer}.w_ih"]
            h, c, acts, tanh_c = ws.h[layer], ws.c[layer], ws.acts[layer], ws.tanh_c[layer]
            mask = ws.ones if masks is None else masks[layer + 1]
            if ws.w_hh_t.shape[0]:
                np.copyto(ws.w_hh_t, w_hh.T)
            gemm.pack_panels(w_hh.T, ws.w_hh_t_panels)
            ws.d_h.fill(0.0)
            ws.d_c.fill(0.0)
            parallel_chunks(batch, lambda lo, hi: lstm.lstm_layer_backward(
                acts, ws.w_hh_t, ws.w_hh_t_panels, ws.d_h, ws.d_c, d_above, mask, c, tanh_c, lo, hi, ws.tile))
            d_h0[layer] = ws.d_h
            d_c0[layer] = ws.d_c
            d_gates = acts.reshape(n_tokens, 4 * hidden)
            parallel_matmul(d_gates.T, h[:-1].reshape(n_tokens, hidden), grads[f"lstm.{layer}.w_hh"])
            if layer == 0 and use_table:
                d_table = ws.d_table
                d_table.fill(0.0)
                parallel_chunks(4 * hidden, lambda lo, hi: lstm.embedding_backward(
                    d_table[:, lo:hi], flat_ids, d_gates[:, lo:hi]))
                parallel_matmul(d_table.T, params["embedding"], grads["lstm.0.w_ih"])
                np.sum(d_table, axis=0, out=grads["lstm.0.bias"])
                parallel_matmul(d_table, w_ih, grads["embedding"])
                continue
            np.sum(d_gates, axis=0, out=grads[f"lstm.{layer}.bias"])
            if layer == 0:
                d_embedded = ws.d_embedded.reshape(n_tokens, -1)
                parallel_matmul(d_gates.T, ws.embedded.reshape(n_tokens, -1), grads["lstm.0.w_ih"])
                parallel_matmul(d_gates, w_ih, d_embedded)
                d_embedding = grads["embedding"]
                d_embedding.fill(0.0)
                parallel_chunks(d_embedding.shape[1], lambda lo, hi: lstm.embedding_backward(
                    d_embedding[:, lo:hi], flat_ids, d_embedded[:, lo:hi]))
            else:
                inputs = self._layer_input_saved(ws, layer, masks)
                parallel_matmul(d_gates.T, inputs.reshape(n_tokens, hidden), grads[f"lstm.{layer}.w_ih"])
                parallel_matmul(d_gates, w_ih, d_above.reshape(n_tokens, hidden))

    @staticmethod
    def _layer_input_saved(ws: _Workspace, layer: int, masks) -> np.ndarray:
        """The input `layer` saw in the forward pass (masked copy kept in the workspace)."""
        return ws.h[layer - 1][1:] if masks is None else ws.dropped[layer]

    def logits(self, ids, state=None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Next-token logits (T, B, V) for a window of ids (T, B), no dropout; returns (logits, final state)."""
        ids = self._check_ids(ids, "ids")
        steps, batch = ids.shape
        h0, c0 = self._check_state(state, batch)
        self._saved = None
        ws = self._workspace(steps, batch, False)
        logits = np.empty((steps * batch, self.config.vocab_size), self._dtype)
        with single_threaded_blas():
            outputs = self._run_layers(ws, ids, h0, c0, None, self._recurrent_weights(ws, None),
                                       self._uses_table(steps * batch))
            parallel_matmul(outputs, self._decoder_weight.T, logits)
        logits += self.params["decoder.bias"]
        return logits.reshape(steps, batch, -1), self._final_state(ws)

    def step(self, token_ids, state=None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """One step for a batch of B sequences (e.g. beams): token_ids (B,) -> (B, V) float64 log-softmax."""
        token_ids = np.asarray(token_ids)
        if token_ids.ndim != 1:
            raise ConfigError(f"token_ids must be a (B,) array, got shape {token_ids.shape}")
        logits, state = self.logits(token_ids[None, :], state)
        z = logits[0].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
        return z, state

    def generate_ids(self, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """Yield up to `max_new_tokens` sampled token ids one at a time, continuing `prompt_ids`.

        temperature 0 = greedy; top_k (0 = off) and top_p (1 = off) restrict the support; the same seed
        gives the same tokens, on any number of threads. Tokens come from compiled code that runs all layers,
        the decoder and the sampler, GENERATION_CHUNK of them per call after the first."""
        prompt = self._check_ids(np.asarray(prompt_ids).reshape(-1, 1), "prompt_ids")[:, 0]
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        return self._generate(prompt, max_new_tokens, float(temperature), int(top_k), float(top_p), seed)

    def _generate(self, prompt: np.ndarray, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int | None) -> Iterator[int]:
        state = self.logits(prompt[:-1, None])[1] if prompt.size > 1 else self.zero_state(1)
        h, c = (np.ascontiguousarray(s[:, 0]) for s in state)
        weights = self._generation_weights(max_new_tokens)
        hidden, vocab = self.config.hidden_size, self.config.vocab_size
        gates = np.empty((self.config.num_layers, 4 * hidden), self._dtype)
        logits = np.empty((1, vocab), self._dtype)
        tokens = np.empty(GENERATION_CHUNK, np.int64)
        # Never more threads than CPUs: two meeting threads that share one run far slower than one thread.
        threads = max(1, min(thread_count(), available_cores(),
                             self._generation_bytes(weights) // max(parallel_generation_bytes(), 1)))
        meetings = meeting_counters(threads)
        # Each thread's own state and scratch; the first thread's state is the caller's h, c.
        own = [((h, c) if part == 0 else (h.copy(), c.copy()))
               + (generate.GenerationScratch(gates, logits, np.empty(hidden, self._dtype),
                                             np.empty(hidden, self._dtype), np.empty(vocab, np.float64)),)
               for part in range(threads)]
        sampling = generate.Sampling(temperature, top_k, top_p)
        cpus = one_cpu_each(threads)
        rng = np.random.default_rng(seed)
        token = int(prompt[-1])
        n_parts, next_load_check = 1, 0.0

        def sample(part: int, _: int) -> None:
            h_part, c_part, scratch = own[part]
            with pinned_to_cpu(cpus[part] if n_parts > 1 else None), meetings_released_on_error(meetings):
                generate.generate_tokens(part, n_parts, meetings, token, h_part, c_part, weights, sampling, uniforms,
                                         tokens, scratch)

        done = 0
        while done < max_new_tokens:
            if threads > 1 and time.perf_counter() >= next_load_check:
                busy = others_keep_cores_busy()
                n_parts = 1 if busy else threads
                next_load_check = time.perf_counter() + LOAD_CHECK_SECONDS[busy]
            for h_part, c_part, _ in own[1:n_parts]:
                h_part[...], c_part[...] = h, c
            meetings[:] = 0
            # The first token alone, so it streams out as soon as the prompt is read.
            count = min(GENERATION_CHUNK if done else 1, max_new_tokens - done)
            done += count
            uniforms = rng.random(count)  # the same numbers as `count` single draws: chunking never changes text
            with meetings_released_on_error(meetings):  # also Ctrl-C before this thread's part began
                parallel_chunks(n_parts, sample)  # one thread per part
            token = int(tokens[count - 1])
            yield from tokens[:count].tolist()

    @staticmethod
    def _generation_bytes(weights: generate.GenerationWeights) -> int:
        """Weight bytes one generation step reads."""
        inputs = weights.w_ih[1:] if weights.table0.shape[0] else weights.w_ih
        return sum(w.nbytes for w in (*inputs, *weights.w_hh, weights.decoder_weight))

    def _generation_weights(self, max_new_tokens: int) -> generate.GenerationWeights:
        """The weights batch-1 generation reads, from the current params (the optimizer may have changed
        them); the layer-0 table is worth its V*E*4H cost only when generating at least ~V tokens."""
        params, layers = self.params, range(self.config.num_layers)
        use_table = self.config.vocab_size <= max_new_tokens
        if use_table:
            # On this model's threads: a multi-threaded BLAS call would leave OpenBLAS's threads spinning for
            # a while, taking a core from the generation threads.
            table = np.empty((self.config.vocab_size, 4 * self.config.hidden_size), self._dtype)
            with single_threaded_blas():
                parallel_matmul(params["embedding"], params["lstm.0.w_ih"].T, table)
        else:
            table = np.zeros((0, 4 * self.config.hidden_size), self._dtype)
        w_ih = tuple(params[f"lstm.{layer}.w_ih"] for layer in layers)
        w_hh = tuple(params[f"lstm.{layer}.w_hh"] for layer in layers)
        return generate.GenerationWeights(
            embedding=params["embedding"], table0=table, w_ih=w_ih, w_hh=w_hh,
            bias=tuple(params[f"lstm.{layer}.bias"] for layer in layers),
            decoder_weight=self._decoder_weight, decoder_bias=params["decoder.bias"],
            w_ih_panels=tuple(self._vector_panels(w, needed=layer > 0 or not use_table)
                              for layer, w in enumerate(w_ih)),
            w_hh_panels=tuple(self._vector_panels(w) for w in w_hh),
            decoder_panels=self._vector_panels(self._decoder_weight), tile=self._tile)

    def _vector_panels(self, matrix: np.ndarray, needed: bool = True) -> np.ndarray:
        """The whole blocks of `matrix`'s rows packed for batch-1 products (generate.generate_tokens): panels
        VECTOR_PANELS vectors wide, so each k reads one contiguous stretch; the rows after them stay dot
        products."""
        block = self._tile.vector_panels * gemm.panel_width(self._dtype, self._tile)
        n_blocks = matrix.shape[0] // block if needed else 0
        panels = np.empty((n_blocks, matrix.shape[1], block), self._dtype)
        gemm.pack_panels(matrix[:n_blocks * block], panels)
        return panels


def _check_sampling(length: int, temperature: float, top_k: int, top_p: float) -> None:
    """The one check of the sampling options, in the words of the `generate` flags."""
    if length < 1:
        raise ConfigError(f"length must be at least 1, got {length}")
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top-k must be >= 0 (0 = all tokens), got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top-p must be in (0, 1], got {top_p}")
