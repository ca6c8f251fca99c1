"""A checkpoint as files other tools load: PyTorch's state-dict names in safetensors, or an ONNX graph.

Either way the folder holds the model file with the Hugging Face `tokenizer.json` and a `config.json`:

    model.safetensors  torch: encoder.weight, rnn.weight_ih_l{k}, rnn.weight_hh_l{k}, rnn.bias_ih_l{k},
                       rnn.bias_hh_l{k}, decoder.weight, decoder.bias, for Embedding -> LSTM -> Linear
    model.onnx         onnx: input_ids (T, B) int64, h0 and c0 (L, B, H) float32 -> logits (T, B, V) float32,
                       hn, cn (L, B, H); T and B are dynamic, so it runs over a window or step by step
    tokenizer.json     the checkpoint's tokenizer, as `tokenizers.Tokenizer.from_file` reads it
    config.json        {"format", "model_file", "model": charlm's model config, "tokenizer", "step"}

charlm keeps the gates in PyTorch's order i, f, g, o and one bias per layer (PyTorch's b_ih + b_hh), so
the torch export is the weights renamed, with bias_hh = 0 (and decoder.weight a copy of encoder.weight
when they are tied). ONNX's LSTM wants the gates as i, o, f, c and the biases as [W_b, R_b].
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors.numpy

from charlm.checkpoint import CHECKSUMS_FILE, Checkpoint, load_checkpoint, resolve_checkpoint
from charlm.config import ModelConfig
from charlm.errors import ConfigError
from charlm.extras import import_extra

FORMATS = ("torch", "onnx")
MODEL_FILES = {"torch": "model.safetensors", "onnx": "model.onnx"}
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # opset 17's own IR version, so runtimes older than the onnx package still load the file


def export(checkpoint: str | os.PathLike, to: str, out_dir: str | os.PathLike) -> list[Path]:
    """Write the checkpoint (a run or checkpoint folder) to `out_dir` as format `to`; returns the files
    written, model file first. Refuses to write into a charlm checkpoint folder, whose model.safetensors
    and config.json the export would replace."""
    if to not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {to!r}")
    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
    if to == "torch":
        model_bytes = safetensors.numpy.save(torch_state_dict(ckpt.model_config, ckpt.params),
                                             metadata={"format": "pt"})
        dtype = ckpt.model_config.dtype
    else:
        model_bytes = onnx_model(ckpt.model_config, ckpt.params).SerializeToString()
        dtype = "float32"
    files = {
        MODEL_FILES[to]: model_bytes,
        TOKENIZER_FILE: ckpt.tokenizer_json.encode("utf-8"),
        CONFIG_FILE: _export_config(ckpt, to, dtype),
    }
    out_dir = Path(out_dir)
    try:
        _prepare_folder(out_dir)
        for name, data in files.items():
            _write_replacing(out_dir / name, data)
    except OSError as exc:
        raise ConfigError(f"cannot export to {out_dir}: {exc.strerror or exc}") from None
    return [out_dir / name for name in files]


def torch_state_dict(config: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """charlm's parameters under nn.Embedding / nn.LSTM / nn.Linear's names (module attributes `encoder`,
    `rnn`, `decoder`), in the checkpoint's dtype."""
    tensors = {"encoder.weight": params["embedding"]}
    for layer in range(config.num_layers):
        bias = params[f"lstm.{layer}.bias"]
        tensors[f"rnn.weight_ih_l{layer}"] = params[f"lstm.{layer}.w_ih"]
        tensors[f"rnn.weight_hh_l{layer}"] = params[f"lstm.{layer}.w_hh"]
        tensors[f"rnn.bias_ih_l{layer}"] = bias
        tensors[f"rnn.bias_hh_l{layer}"] = np.zeros_like(bias)
    tensors["decoder.weight"] = params["embedding" if config.tie_weights else "decoder.weight"]
    tensors["decoder.bias"] = params["decoder.bias"]
    return {name: np.ascontiguousarray(value) for name, value in tensors.items()}


def onnx_model(config: ModelConfig, params: dict[str, np.ndarray]):
    """The model as an ONNX graph in float32: Gather -> one LSTM node per layer -> MatMul + Add, the state
    an input and an output. Checked by `onnx.checker` before it is returned."""
    onnx = import_extra("onnx", "onnx", "charlm export --to onnx")
    from onnx import TensorProto, helper, numpy_helper

    layers, hidden, vocab = config.num_layers, config.hidden_size, config.vocab_size
    # charlm's 4H rows are the gates i, f, g, o; ONNX's are i, o, f, c.
    gate_rows = np.concatenate([np.arange(gate * hidden, (gate + 1) * hidden) for gate in (0, 3, 1, 2)])

    def constant(name: str, value: np.ndarray):
        return numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)

    initializers = [
        constant("encoder.weight", params["embedding"]),
        numpy_helper.from_array(np.ones(layers, np.int64), "state_split"),
        numpy_helper.from_array(np.array([1], np.int64), "direction_axis"),
    ]
    state_names = {part: [f"{part}_l{layer}" for layer in range(layers)] for part in ("h0", "c0", "hn", "cn")}
    nodes = [
        helper.make_node("Gather", ["encoder.weight", "input_ids"], ["embedded"], axis=0),
        helper.make_node("Split", ["h0", "state_split"], state_names["h0"], axis=0),
        helper.make_node("Split", ["c0", "state_split"], state_names["c0"], axis=0),
    ]
    layer_input = "embedded"
    for layer in range(layers):
        bias = params[f"lstm.{layer}.bias"][gate_rows]
        initializers += [
            constant(f"rnn.W_l{layer}", params[f"lstm.{layer}.w_ih"][gate_rows][None]),
            constant(f"rnn.R_l{layer}", params[f"lstm.{layer}.w_hh"][gate_rows][None]),
            constant(f"rnn.B_l{layer}", np.concatenate([bias, np.zeros_like(bias)])[None]),
        ]
        nodes += [
            helper.make_node(
                "LSTM",
                [layer_input, f"rnn.W_l{layer}", f"rnn.R_l{layer}", f"rnn.B_l{layer}", "",
                 state_names["h0"][layer], state_names["c0"][layer]],
                [f"rnn.Y_l{layer}", state_names["hn"][layer], state_names["cn"][layer]],
                hidden_size=hidden,
            ),
            # Y is (T, num_directions = 1, B, H).
            helper.make_node("Squeeze", [f"rnn.Y_l{layer}", "direction_axis"], [f"rnn.out_l{layer}"]),
        ]
        layer_input = f"rnn.out_l{layer}"
    decoder = "encoder.weight"
    if not config.tie_weights:
        decoder = "decoder.weight"
        initializers.append(constant(decoder, params["decoder.weight"]))
    initializers.append(constant("decoder.bias", params["decoder.bias"]))
    nodes += [
        helper.make_node("Transpose", [decoder], ["decoder.weight_t"], perm=[1, 0]),
        helper.make_node("MatMul", [layer_input, "decoder.weight_t"], ["decoded"]),
        helper.make_node("Add", ["decoded", "decoder.bias"], ["logits"]),
        helper.make_node("Concat", state_names["hn"], ["hn"], axis=0),
        helper.make_node("Concat", state_names["cn"], ["cn"], axis=0),
    ]
    state_shape = [layers, "B", hidden]
    graph = helper.make_graph(
        nodes, "charlm",
        inputs=[helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["T", "B"]),
                helper.make_tensor_value_info("h0", TensorProto.FLOAT, state_shape),
                helper.make_tensor_value_info("c0", TensorProto.FLOAT, state_shape)],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", "B", vocab]),
                 helper.make_tensor_value_info("hn", TensorProto.FLOAT, state_shape),
                 helper.make_tensor_value_info("cn", TensorProto.FLOAT, state_shape)],
        initializer=initializers,
    )
    model = helper.make_model(graph, producer_name="charlm", ir_version=ONNX_IR_VERSION,
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _export_config(ckpt: Checkpoint, to: str, dtype: str) -> bytes:
    doc = {
        "format": to,
        "model_file": MODEL_FILES[to],
        "model": {**ckpt.model_config.to_dict(), "dtype": dtype},
        "tokenizer": ckpt.tokenizer.kind,
        "step": ckpt.trainer_state.get("step"),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _prepare_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file; export writes into a folder")
    if (folder / CHECKSUMS_FILE).exists():
        raise ConfigError(f"{folder} holds a charlm checkpoint; export into another folder")
    folder.mkdir(parents=True, exist_ok=True)


def _write_replacing(path: Path, data: bytes) -> None:
    """Write beside `path`, then rename over it: a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
