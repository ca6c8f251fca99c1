"""Finite-difference checks (float64, central differences) of every gradient backward() returns."""

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.model import LSTMLanguageModel

STEPS, BATCH, HIDDEN, VOCAB = 5, 3, 7, 11
ENTRIES_PER_TENSOR = 12  # random entries checked per parameter; keeps the suite fast
DELTA = 1e-5


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    return float(np.abs(analytic - numeric).max() / max(np.abs(numeric).max(), 1e-8))


@pytest.mark.parametrize("layer0", ["never", "always"])
@pytest.mark.parametrize("tie_weights", [False, True])
@pytest.mark.parametrize(("dropout", "locked", "weight_drop"), [(0.0, True, 0.0), (0.4, True, 0.0), (0.4, False, 0.3)])
def test_gradients_match_finite_differences(layer0, tie_weights, dropout, locked, weight_drop):
    embed_dim = HIDDEN if tie_weights else 4
    config = ModelConfig(vocab_size=VOCAB, embed_dim=embed_dim, hidden_size=HIDDEN, num_layers=2, dropout=dropout,
                         locked_dropout=locked, weight_drop=weight_drop, tie_weights=tie_weights, dtype="float64")
    model = LSTMLanguageModel(config, seed=3, embedding_table=layer0)
    data = np.random.default_rng(7)
    ids = data.integers(0, VOCAB, (STEPS, BATCH))
    ids[0, 0] = ids[3, 1]  # a repeated id exercises the scatter-add
    targets = data.integers(0, VOCAB, (STEPS, BATCH))
    h0 = data.normal(0, 0.5, (2, BATCH, HIDDEN))
    c0 = data.normal(0, 0.5, (2, BATCH, HIDDEN))

    def loss() -> float:
        # A fresh generator with one seed gives the same dropout masks on every call.
        return model.forward(ids, targets, (h0, c0), train=True, rng=np.random.default_rng(11))[0]

    loss()
    grads, (d_h0, d_c0) = model.backward()
    grads = {name: g.copy() for name, g in grads.items()}
    tensors = dict(model.params, h0=h0, c0=c0)
    analytic = dict(grads, h0=d_h0, c0=d_c0)
    assert set(grads) == set(model.params)
    for name, tensor in tensors.items():
        flat = tensor.reshape(-1)
        picks = data.choice(flat.size, min(ENTRIES_PER_TENSOR, flat.size), replace=False)
        numeric = np.empty(picks.size)
        for n, index in enumerate(picks):
            original = flat[index]
            flat[index] = original + DELTA
            plus = loss()
            flat[index] = original - DELTA
            minus = loss()
            flat[index] = original
            numeric[n] = (plus - minus) / (2 * DELTA)
        error = relative_error(analytic[name].reshape(-1)[picks], numeric)
        assert error < 1e-6, f"{name}: relative error {error:.2e}"


def test_dropout_masks_change_the_loss_and_eval_ignores_them():
    config = ModelConfig(vocab_size=VOCAB, embed_dim=4, hidden_size=HIDDEN, num_layers=2, dropout=0.5,
                         dtype="float64")
    model = LSTMLanguageModel(config, seed=0)
    ids = np.arange(STEPS * BATCH).reshape(STEPS, BATCH) % VOCAB
    targets = (ids + 1) % VOCAB
    eval_loss = model.forward(ids, targets)[0]
    assert model.forward(ids, targets)[0] == eval_loss
    first = model.forward(ids, targets, train=True, rng=np.random.default_rng(1))[0]
    again = model.forward(ids, targets, train=True, rng=np.random.default_rng(1))[0]
    other = model.forward(ids, targets, train=True, rng=np.random.default_rng(2))[0]
    assert first == again
    assert first != other and first != eval_loss


@pytest.mark.parametrize("locked", [True, False])
def test_locked_masks_are_shared_by_all_steps_and_per_step_masks_are_not(locked):
    config = ModelConfig(vocab_size=VOCAB, embed_dim=4, hidden_size=64, num_layers=2, dropout=0.5,
                         locked_dropout=locked)
    model = LSTMLanguageModel(config, seed=0)
    model._workspace(STEPS + 3, BATCH, train=True)  # a shorter window then uses a prefix of its buffers
    masks = model._dropout_masks(model._workspace(STEPS, BATCH, train=True), np.random.default_rng(0))
    assert masks[0] is None and len(masks) == 3
    assert not np.array_equal(masks[1], masks[2])
    for mask in masks[1:]:
        assert mask.shape == (1 if locked else STEPS, BATCH, 64)
        assert set(np.unique(mask)) == {0.0, 2.0}
        if not locked:
            assert not np.array_equal(mask[0], mask[1])


def test_backward_without_training_forward_is_an_error():
    model = LSTMLanguageModel(ModelConfig(vocab_size=VOCAB, embed_dim=4, hidden_size=HIDDEN), seed=0)
    ids = np.zeros((2, 2), dtype=np.int64)
    model.forward(ids, ids, train=False)
    with pytest.raises(RuntimeError):
        model.backward()
