"""`charlm export`: the PyTorch and ONNX files give charlm's logits and state, window by window and step by step."""

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from charlm.checkpoint import load_model, save_checkpoint
from charlm.cli import cli
from charlm.config import ModelConfig
from charlm.export import export
from charlm.model import init_params
from charlm.tokenize import train_tokenizer

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(params=[(2, False), (1, True)], ids=["2-layers", "1-layer-tied"])
def checkpoint(request, tmp_path):
    """A checkpoint with random weights, biases included (training leaves none at zero)."""
    layers, tied = request.param
    tokenizer = train_tokenizer("char", TEXT)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embed_dim=16 if tied else 10, hidden_size=16,
                         num_layers=layers, dropout=0.0, tie_weights=tied)
    rng = np.random.default_rng(layers)
    params = {name: value + rng.normal(0, 0.3, value.shape).astype(np.float32)
              for name, value in init_params(config, seed=7).items()}
    return save_checkpoint(tmp_path / "ckpt", model_config=config, params=params,
                           tokenizer_json=tokenizer.to_json(), trainer_state={"step": 12})


def windows_and_state(model, steps=6, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, (2 * steps, batch))
    shape = (model.config.num_layers, batch, model.config.hidden_size)
    h0, c0 = (rng.normal(0, 0.5, shape).astype(np.float32) for _ in range(2))
    return ids[:steps], ids[steps:], h0, c0


def test_torch_export_loads_into_the_readme_module_and_matches_over_carried_windows(checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    # The module docs/export.md shows.
    class CharLM(torch.nn.Module):
        def __init__(self, vocab_size, embed_dim, hidden_size, num_layers, **_):
            super().__init__()
            self.encoder = torch.nn.Embedding(vocab_size, embed_dim)
            self.rnn = torch.nn.LSTM(embed_dim, hidden_size, num_layers)
            self.decoder = torch.nn.Linear(hidden_size, vocab_size)

        def forward(self, ids, state=None):  # ids: (T, B) int64
            output, state = self.rnn(self.encoder(ids), state)
            return self.decoder(output), state

    files = export(checkpoint, "torch", tmp_path / "out")
    assert [f.name for f in files] == ["model.safetensors", "tokenizer.json", "config.json"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["format"] == "torch" and config["step"] == 12
    module = CharLM(**config["model"])
    module.load_state_dict(safetensors.torch.load_file(tmp_path / "out" / "model.safetensors"))

    model, tokenizer, _ = load_model(checkpoint)
    first, second, h0, c0 = windows_and_state(model)
    state = (torch.tensor(h0), torch.tensor(c0))
    expected_state = (h0, c0)
    with torch.no_grad():
        for window in (first, second):
            expected, expected_state = model.logits(window, expected_state)
            logits, state = module(torch.tensor(window), state)
            np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(state[0].numpy(), expected_state[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(state[1].numpy(), expected_state[1], rtol=0, atol=1e-5)

    import tokenizers
    exported = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert exported.encode(TEXT).ids == tokenizer.encode(TEXT).tolist()


def test_onnx_export_matches_over_a_window_and_step_by_step(checkpoint, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    result = invoke("export", checkpoint, "--to", "onnx", tmp_path / "out")
    assert result.exit_code == 0, result.output
    path = tmp_path / "out" / "model.onnx"
    assert str(path) in result.output
    onnx.checker.check_model(str(path), full_check=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["format"] == "onnx"
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "LSTM" for node in graph.node) == json.loads(
        (tmp_path / "out" / "config.json").read_text())["model"]["num_layers"]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model, _, _ = load_model(checkpoint)
    layers, hidden, vocab = model.config.num_layers, model.config.hidden_size, model.config.vocab_size
    signature = {v.name: (v.type, v.shape) for v in session.get_inputs() + session.get_outputs()}
    assert signature == {
        "input_ids": ("tensor(int64)", ["T", "B"]),
        "h0": ("tensor(float)", [layers, "B", hidden]), "c0": ("tensor(float)", [layers, "B", hidden]),
        "logits": ("tensor(float)", ["T", "B", vocab]),
        "hn": ("tensor(float)", [layers, "B", hidden]), "cn": ("tensor(float)", [layers, "B", hidden]),
    }

    window, _, h0, c0 = windows_and_state(model)
    expected, (h_final, c_final) = model.logits(window, (h0, c0))
    logits, hn, cn = session.run(None, {"input_ids": window.astype(np.int64), "h0": h0, "c0": c0})
    for got, want in ((logits, expected), (hn, h_final), (cn, c_final)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)

    h, c = h0, c0
    for step, ids in enumerate(window):
        logits, h, c = session.run(None, {"input_ids": ids[None].astype(np.int64), "h0": h, "c0": c})
        np.testing.assert_allclose(logits[0], expected[step], rtol=0, atol=1e-4)
    np.testing.assert_allclose(h, h_final, rtol=0, atol=1e-4)
    np.testing.assert_allclose(c, c_final, rtol=0, atol=1e-4)


def test_missing_onnx_is_one_line_naming_the_pip_install(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets when it is not installed
    result = invoke("export", checkpoint, "--to", "onnx", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: charlm export --to onnx needs onnx, which is not installed: pip install 'charlm[onnx]'"]
    assert not (tmp_path / "out").exists()


def test_export_never_writes_into_a_checkpoint_folder(checkpoint):
    before = {f.name: f.read_bytes() for f in checkpoint.iterdir()}
    result = invoke("export", checkpoint, "--to", "torch", checkpoint)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {checkpoint} holds a charlm checkpoint; export into another folder"]
    assert {f.name: f.read_bytes() for f in checkpoint.iterdir()} == before
