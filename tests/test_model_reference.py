"""The Numba/BLAS model against an independent, plain-numpy LSTM language model written here (float64
math on the model's float32 weights): logits, loss, final state and every gradient."""

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.errors import ConfigError
from charlm.model import LSTMLanguageModel, param_shapes

TOLERANCE = 1e-5


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_lm(params, config, ids, targets, h0, c0):
    """Straightforward forward and backward, one step and one layer at a time, no dropout."""
    p = {name: value.astype(np.float64) for name, value in params.items()}
    decoder = p["embedding"] if config.tie_weights else p["decoder.weight"]
    steps, batch = ids.shape
    hidden, layers = config.hidden_size, config.num_layers
    inputs = p["embedding"][ids]
    caches, final_h, final_c = [], [], []
    for layer in range(layers):
        w_ih, w_hh, b = p[f"lstm.{layer}.w_ih"], p[f"lstm.{layer}.w_hh"], p[f"lstm.{layer}.bias"]
        h, c = h0[layer].astype(np.float64), c0[layer].astype(np.float64)
        outputs, cache = [], []
        for t in range(steps):
            z = inputs[t] @ w_ih.T + h @ w_hh.T + b
            i, f = sigmoid(z[:, :hidden]), sigmoid(z[:, hidden:2 * hidden])
            g, o = np.tanh(z[:, 2 * hidden:3 * hidden]), sigmoid(z[:, 3 * hidden:])
            c_prev, h_prev = c, h
            c = f * c_prev + i * g
            h = o * np.tanh(c)
            cache.append((inputs[t], h_prev, c_prev, i, f, g, o, c))
            outputs.append(h)
        caches.append(cache)
        final_h.append(h)
        final_c.append(c)
        inputs = np.stack(outputs)
    logits = inputs @ decoder.T + p["decoder.bias"]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    n_tokens = steps * batch
    picked = np.take_along_axis(probs, targets[..., None], axis=-1)[..., 0]
    loss = -np.log(picked).mean()

    grads = {name: np.zeros_like(value) for name, value in p.items()}
    d_logits = probs.copy()
    np.put_along_axis(d_logits, targets[..., None], np.take_along_axis(d_logits, targets[..., None], -1) - 1, -1)
    d_logits /= n_tokens
    decoder_grad = np.einsum("tbv,tbh->vh", d_logits, inputs)
    grads["decoder.bias"] = d_logits.sum(axis=(0, 1))
    d_outputs = d_logits @ decoder
    d_h0, d_c0 = np.zeros((layers, batch, hidden)), np.zeros((layers, batch, hidden))
    for layer in reversed(range(layers)):
        w_ih, w_hh = p[f"lstm.{layer}.w_ih"], p[f"lstm.{layer}.w_hh"]
        dh_next, dc_next = np.zeros((batch, hidden)), np.zeros((batch, hidden))
        d_inputs = []
        for t in reversed(range(steps)):
            x, h_prev, c_prev, i, f, g, o, c = caches[layer][t]
            dh = d_outputs[t] + dh_next
            dc = dc_next + dh * o * (1 - np.tanh(c) ** 2)
            dz = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g**2),
                                 dh * np.tanh(c) * o * (1 - o)], axis=1)
            grads[f"lstm.{layer}.w_ih"] += dz.T @ x
            grads[f"lstm.{layer}.w_hh"] += dz.T @ h_prev
            grads[f"lstm.{layer}.bias"] += dz.sum(axis=0)
            d_inputs.append(dz @ w_ih)
            dh_next, dc_next = dz @ w_hh, dc * f
        d_h0[layer], d_c0[layer] = dh_next, dc_next
        d_outputs = np.stack(d_inputs[::-1])
    np.add.at(grads["embedding"], ids, d_outputs)
    if config.tie_weights:
        grads["embedding"] += decoder_grad
    else:
        grads["decoder.weight"] = decoder_grad
    return logits, loss, (np.stack(final_h), np.stack(final_c)), grads, (d_h0, d_c0)


def close(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-6))


def window(config, steps, batch, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (steps, batch))
    targets = rng.integers(0, config.vocab_size, (steps, batch))
    h0 = rng.normal(0, 0.3, (config.num_layers, batch, config.hidden_size)).astype(config.dtype)
    c0 = rng.normal(0, 0.3, (config.num_layers, batch, config.hidden_size)).astype(config.dtype)
    return ids, targets, (h0, c0)


@pytest.mark.parametrize("layer0", ["never", "always"])
@pytest.mark.parametrize("tie_weights,layers", [(False, 2), (True, 3), (False, 1)])
def test_matches_numpy_reference_float32(layer0, tie_weights, layers):
    # H = 32 and 19 rows: the recurrent products run as register tiles of 8 rows plus leftover rows.
    config = ModelConfig(vocab_size=23, embed_dim=32 if tie_weights else 10, hidden_size=32,
                         num_layers=layers, dropout=0.3, tie_weights=tie_weights)
    model = LSTMLanguageModel(config, seed=5, embedding_table=layer0)
    ids, targets, state = window(config, 9, 19, seed=2)
    ref_logits, ref_loss, ref_state, ref_grads, ref_state_grads = reference_lm(
        model.params, config, ids, targets, *state)

    logits, logits_state = model.logits(ids, state)
    assert logits.dtype == np.float32
    assert close(logits, ref_logits) < TOLERANCE
    # dropout is 0.3 but only applies when train=True with masks; a config without dropout or DropConnect
    # is the reference.
    no_dropout = LSTMLanguageModel(ModelConfig(**{**config.to_dict(), "dropout": 0.0, "weight_drop": 0.0}),
                                   params=model.params, embedding_table=layer0)
    loss, final_state = no_dropout.forward(ids, targets, state, train=True)
    assert abs(loss - ref_loss) < TOLERANCE * ref_loss
    for actual, from_logits, expected in zip(final_state, logits_state, ref_state):
        assert close(actual, expected) < TOLERANCE
        assert close(from_logits, expected) < TOLERANCE
    grads, state_grads = no_dropout.backward()
    for name in param_shapes(config):
        assert close(grads[name], ref_grads[name]) < TOLERANCE, name
    for actual, expected in zip(state_grads, ref_state_grads):
        assert close(actual, expected) < TOLERANCE
    assert abs(model.forward(ids, targets, state)[0] - ref_loss) < TOLERANCE * ref_loss


def test_two_windows_carry_state_like_one_long_window():
    config = ModelConfig(vocab_size=17, embed_dim=6, hidden_size=12, num_layers=2, dtype="float64")
    model = LSTMLanguageModel(config, seed=1)
    ids, targets, state = window(config, 10, 3, seed=4)
    whole, whole_state = model.forward(ids, targets, state)
    first, carried = model.forward(ids[:5], targets[:5], state)
    second, final = model.forward(ids[5:], targets[5:], carried)
    assert np.isclose((first + second) / 2, whole, rtol=1e-12)
    for a, b in zip(final, whole_state):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_windows_of_other_lengths_reuse_one_workspace_and_match_a_fresh_model():
    # Random window lengths (AWD-LSTM) once kept a workspace of every length seen: gigabytes.
    config = ModelConfig(vocab_size=23, embed_dim=10, hidden_size=32, num_layers=2, dropout=0.3)
    used = LSTMLanguageModel(config, seed=3)
    fresh = LSTMLanguageModel(config, seed=3)
    ids, targets, state = window(config, 12, 19, seed=6)
    for steps in (12, 5, 9):
        used.forward(ids[:steps], targets[:steps], state, train=True, rng=np.random.default_rng(0))
        used.backward()
    assert len(used._workspaces) == 1
    short_ids, short_targets = ids[:7], targets[:7]
    results = []
    for model in (used, fresh):
        loss, final_state = model.forward(short_ids, short_targets, state, train=True, rng=np.random.default_rng(1))
        grads, state_grads = model.backward()
        results.append((loss, [a.copy() for a in final_state], {k: g.copy() for k, g in grads.items()},
                        [g.copy() for g in state_grads]))
    (loss_a, state_a, grads_a, d_state_a), (loss_b, state_b, grads_b, d_state_b) = results
    assert loss_a == loss_b
    for a, b in zip(state_a + d_state_a, state_b + d_state_b):
        np.testing.assert_array_equal(a, b)
    for name in grads_a:
        np.testing.assert_array_equal(grads_a[name], grads_b[name], err_msg=name)


def test_frozen_weights_packs_once_per_workspace_and_layer0_mode():
    # 9 rows and 4H = 128: the inference products use packed panels. "auto" uses layer 0's table for
    # T = 9 (81 tokens >= 2V) but not for T = 2 (18 tokens), which reuses the T = 9 workspace.
    config = ModelConfig(vocab_size=23, embed_dim=10, hidden_size=32, num_layers=2)
    model = LSTMLanguageModel(config, seed=4)
    ids, _, state = window(config, 9, 9, seed=8)
    windows = (ids[:5], ids, ids[:2])  # a first workspace, a longer one replacing it, then its prefix

    def fresh_logits(params, ids):
        return LSTMLanguageModel(config, params={k: v.copy() for k, v in params.items()}).logits(ids, state)[0]

    with model.frozen_weights():
        for window_ids in windows:
            np.testing.assert_array_equal(model.logits(window_ids, state)[0], fresh_logits(model.params, window_ids))
        before = {name: p.copy() for name, p in model.params.items()}
        model.params["lstm.1.w_hh"] *= 0.5  # not seen inside the block: the packed copy is reused
        np.testing.assert_array_equal(model.logits(ids, state)[0], fresh_logits(before, ids))
    for window_ids in windows:
        np.testing.assert_array_equal(model.logits(window_ids, state)[0], fresh_logits(model.params, window_ids))


def test_step_is_log_softmax_of_logits():
    config = ModelConfig(vocab_size=19, embed_dim=5, hidden_size=9, num_layers=2, dtype="float64")
    model = LSTMLanguageModel(config, seed=2)
    tokens = np.array([3, 0, 18])
    state = model.zero_state(3)
    log_probs, new_state = model.step(tokens, state)
    logits, ref_state = model.logits(tokens[None, :], state)
    expected = logits[0] - np.log(np.exp(logits[0]).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(log_probs, expected, rtol=1e-12)
    assert log_probs.dtype == np.float64
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=1), 1.0)
    np.testing.assert_array_equal(new_state[0], ref_state[0])


def test_init_is_deterministic_with_forget_bias_one():
    config = ModelConfig(vocab_size=7, embed_dim=3, hidden_size=4, num_layers=2)
    a, b = LSTMLanguageModel(config, seed=9), LSTMLanguageModel(config, seed=9)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
        assert a.params[name].dtype == np.float32 and a.params[name].flags.c_contiguous
    bias = a.params["lstm.1.bias"]
    np.testing.assert_array_equal(bias[4:8], 1.0)
    assert not bias[:4].any() and not bias[8:].any()
    assert a.num_parameters() == sum(int(np.prod(s)) for s in param_shapes(config).values())
    assert "decoder.weight" not in param_shapes(ModelConfig(vocab_size=7, embed_dim=4, hidden_size=4,
                                                              tie_weights=True))


def test_user_errors_are_config_errors():
    config = ModelConfig(vocab_size=7, embed_dim=3, hidden_size=4, num_layers=1)
    model = LSTMLanguageModel(config)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        model.forward(np.full((2, 2), 7), np.zeros((2, 2), int))
    with pytest.raises(ConfigError, match="state"):
        model.forward(np.zeros((2, 2), int), np.zeros((2, 2), int), model.zero_state(3))
    with pytest.raises(ConfigError, match="missing"):
        LSTMLanguageModel(config, params={"embedding": np.zeros((7, 3))})
    with pytest.raises(ConfigError, match="shape"):
        LSTMLanguageModel(config, params=dict(model.params, embedding=np.zeros((7, 4))))
