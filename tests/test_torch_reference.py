"""The same weights in torch.nn.Embedding/LSTM/Linear give the same logits, loss and gradients.
Torch is only a yardstick here (never a charlm dependency); without it the test skips."""

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.model import LSTMLanguageModel

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("layer0", ["never", "always"])
def test_matches_torch_lstm(layer0):
    config = ModelConfig(vocab_size=29, embed_dim=12, hidden_size=20, num_layers=2, dropout=0.0, weight_drop=0.0)
    model = LSTMLanguageModel(config, seed=4, embedding_table=layer0)
    rng = np.random.default_rng(0)
    steps, batch = 8, 5
    ids = rng.integers(0, config.vocab_size, (steps, batch))
    targets = rng.integers(0, config.vocab_size, (steps, batch))
    h0 = rng.normal(0, 0.3, (2, batch, 20)).astype(np.float32)
    c0 = rng.normal(0, 0.3, (2, batch, 20)).astype(np.float32)

    p = {name: torch.tensor(value) for name, value in model.params.items()}
    embedding = torch.nn.Embedding(29, 12)
    lstm = torch.nn.LSTM(12, 20, num_layers=2)
    decoder = torch.nn.Linear(20, 29)
    with torch.no_grad():
        embedding.weight.copy_(p["embedding"])
        for layer in range(2):
            getattr(lstm, f"weight_ih_l{layer}").copy_(p[f"lstm.{layer}.w_ih"])
            getattr(lstm, f"weight_hh_l{layer}").copy_(p[f"lstm.{layer}.w_hh"])
            getattr(lstm, f"bias_ih_l{layer}").copy_(p[f"lstm.{layer}.bias"])
            getattr(lstm, f"bias_hh_l{layer}").zero_()
        decoder.weight.copy_(p["decoder.weight"])
        decoder.bias.copy_(p["decoder.bias"])
    th0 = torch.tensor(h0, requires_grad=True)
    tc0 = torch.tensor(c0, requires_grad=True)
    output, (hT, cT) = lstm(embedding(torch.tensor(ids)), (th0, tc0))
    torch_logits = decoder(output)
    torch_loss = torch.nn.functional.cross_entropy(torch_logits.reshape(-1, 29), torch.tensor(targets).reshape(-1))
    torch_loss.backward()

    logits, _ = model.logits(ids, (h0, c0))
    np.testing.assert_allclose(logits, torch_logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    loss, (h_final, c_final) = model.forward(ids, targets, (h0, c0), train=True)
    assert abs(loss - torch_loss.item()) < 1e-5
    np.testing.assert_allclose(h_final, hT.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(c_final, cT.detach().numpy(), atol=1e-5)
    grads, (d_h0, d_c0) = model.backward()
    expected = {
        "embedding": embedding.weight.grad,
        "decoder.weight": decoder.weight.grad,
        "decoder.bias": decoder.bias.grad,
        **{f"lstm.{l}.w_ih": getattr(lstm, f"weight_ih_l{l}").grad for l in range(2)},
        **{f"lstm.{l}.w_hh": getattr(lstm, f"weight_hh_l{l}").grad for l in range(2)},
        **{f"lstm.{l}.bias": getattr(lstm, f"bias_ih_l{l}").grad for l in range(2)},
    }
    for name, grad in expected.items():
        np.testing.assert_allclose(grads[name], grad.numpy(), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(d_h0, th0.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(d_c0, tc0.grad.numpy(), atol=1e-6)
