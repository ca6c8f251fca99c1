"""Whole training steps against PyTorch: the same weights, windows and Adam settings give the same losses.

The engine tests compare one forward/backward; this compares the pipeline a user runs (carried hidden
state, AdamW update, next window) over many steps, in float64 so any difference is a real one. PyTorch's
nn.LSTM has two bias vectors per layer where charlm has one; its `bias_hh` is zeroed and frozen so both
models have the same parameters (Adam on two biases would move their sum twice as fast).
"""

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.model import LSTMLanguageModel
from charlm.optim import AdamW

torch = pytest.importorskip("torch")

VOCAB, EMBED, HIDDEN, LAYERS, STEPS, BATCH = 13, 6, 10, 2, 8, 4


def torch_copy(model: LSTMLanguageModel):
    params = {name: torch.from_numpy(value.copy()) for name, value in model.params.items()}
    embedding = torch.nn.Embedding(VOCAB, EMBED, dtype=torch.float64)
    lstm = torch.nn.LSTM(EMBED, HIDDEN, LAYERS, dtype=torch.float64)
    decoder = torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)
    with torch.no_grad():
        embedding.weight.copy_(params["embedding"])
        for layer in range(LAYERS):
            getattr(lstm, f"weight_ih_l{layer}").copy_(params[f"lstm.{layer}.w_ih"])
            getattr(lstm, f"weight_hh_l{layer}").copy_(params[f"lstm.{layer}.w_hh"])
            getattr(lstm, f"bias_ih_l{layer}").copy_(params[f"lstm.{layer}.bias"])
            getattr(lstm, f"bias_hh_l{layer}").zero_()
            getattr(lstm, f"bias_hh_l{layer}").requires_grad_(False)
        decoder.weight.copy_(params["decoder.weight"])
        decoder.bias.copy_(params["decoder.bias"])
    return embedding, lstm, decoder


def test_training_trajectory_equals_pytorch_adam():
    config = ModelConfig(vocab_size=VOCAB, embed_dim=EMBED, hidden_size=HIDDEN, num_layers=LAYERS, dropout=0.0,
                         weight_drop=0.0, dtype="float64")
    model = LSTMLanguageModel(config, seed=3)
    embedding, lstm, decoder = torch_copy(model)
    trainable = [p for module in (embedding, lstm, decoder) for p in module.parameters() if p.requires_grad]
    torch_optimizer = torch.optim.Adam(trainable, lr=5e-3)
    optimizer = AdamW(model.params, lr=5e-3, weight_decay=0.0)

    rng = np.random.default_rng(0)
    cycle = rng.permutation(VOCAB)  # a learnable stream: each column walks the same cycle from its own offset
    stream = cycle[(np.arange(60 * STEPS + 1)[:, None] + rng.integers(0, VOCAB, BATCH)) % VOCAB]
    state, torch_state = model.zero_state(BATCH), None
    charlm_losses, torch_losses = [], []
    for window in range(60):
        inputs = stream[window * STEPS:(window + 1) * STEPS]
        targets = stream[window * STEPS + 1:(window + 1) * STEPS + 1]
        loss, state = model.forward(inputs, targets, state, train=True)
        grads, _ = model.backward()
        optimizer.step(grads, 5e-3)
        charlm_losses.append(loss)

        out, torch_state = lstm(embedding(torch.from_numpy(inputs)), torch_state)
        torch_state = tuple(s.detach() for s in torch_state)
        torch_loss = torch.nn.functional.cross_entropy(decoder(out).reshape(-1, VOCAB),
                                                       torch.from_numpy(targets).reshape(-1))
        torch_optimizer.zero_grad()
        torch_loss.backward()
        torch_optimizer.step()
        torch_losses.append(torch_loss.item())

    np.testing.assert_allclose(charlm_losses, torch_losses, rtol=1e-9)
    assert charlm_losses[-1] < 0.7 * charlm_losses[0]  # it learned something, so the comparison is not vacuous
