"""PyTorch's nn.LSTM on any corpus, fed by charlm's own data pipeline and validated by charlm's evaluator.

Two uses:
  --steps N    the same batches and initial weights as `charlm train --seed S --max-steps N` with
               `locked_dropout = false` and the same lr, schedule, clipping and sampling: the two validation
               curves then show whether charlm learns what PyTorch learns, step for step.
  --minutes M  a plain PyTorch reference run (2×512, embedding 128, dropout 0.2, Adam with linear warm-up and
               cosine decay over the wall-clock budget, T=128, B=32, streams with the state carried), for the
               same budget as a charlm run; compare_defaults.py runs it beside `charlm train`.
The corpus is split as `charlm train` splits it (a registered corpus's own validation file, else the
contiguous last 10 %). Prints one JSON line per validation. Needs torch (`pip install -e '.[torch]'`).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from charlm.config import ModelConfig
from charlm.corpus import resolve_corpus
from charlm.data import SAMPLINGS, BatchStream
from charlm.evaluate import evaluate_ids, predicted_chars
from charlm.model import LSTMLanguageModel
from charlm.optim import learning_rate
from charlm.tokenize import train_tokenizer


class CharLSTM(nn.Module):
    """nn.Embedding -> nn.LSTM (dropout between layers) -> dropout -> nn.Linear: charlm's model in PyTorch."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_size, config.num_layers, dropout=config.dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, ids, state=None):
        output, state = self.lstm(self.embedding(ids), state)
        return self.decoder(self.dropout(output)), state


def copy_from_charlm(model: CharLSTM, params: dict[str, np.ndarray], num_layers: int) -> None:
    """charlm's parameters into the PyTorch model (charlm's one bias goes to b_ih, b_hh = 0)."""
    with torch.no_grad():
        model.embedding.weight.copy_(torch.from_numpy(params["embedding"]))
        for layer in range(num_layers):
            getattr(model.lstm, f"weight_ih_l{layer}").copy_(torch.from_numpy(params[f"lstm.{layer}.w_ih"]))
            getattr(model.lstm, f"weight_hh_l{layer}").copy_(torch.from_numpy(params[f"lstm.{layer}.w_hh"]))
            getattr(model.lstm, f"bias_ih_l{layer}").copy_(torch.from_numpy(params[f"lstm.{layer}.bias"]))
            getattr(model.lstm, f"bias_hh_l{layer}").zero_()
        model.decoder.weight.copy_(torch.from_numpy(params["decoder.weight"]))
        model.decoder.bias.copy_(torch.from_numpy(params["decoder.bias"]))


def copy_to_charlm(model: CharLSTM, params: dict[str, np.ndarray], num_layers: int) -> None:
    """The PyTorch model's weights into charlm's parameters, for validation by charlm's evaluator."""
    with torch.no_grad():
        params["embedding"][...] = model.embedding.weight.numpy()
        for layer in range(num_layers):
            params[f"lstm.{layer}.w_ih"][...] = getattr(model.lstm, f"weight_ih_l{layer}").numpy()
            params[f"lstm.{layer}.w_hh"][...] = getattr(model.lstm, f"weight_hh_l{layer}").numpy()
            params[f"lstm.{layer}.bias"][...] = (getattr(model.lstm, f"bias_ih_l{layer}")
                                                 + getattr(model.lstm, f"bias_hh_l{layer}")).numpy()
        params["decoder.weight"][...] = model.decoder.weight.numpy()
        params["decoder.bias"][...] = model.decoder.bias.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="train this many steps, cosine schedule over them")
    budget.add_argument("--minutes", type=float, help="train this long, cosine schedule over the wall clock")
    parser.add_argument("--corpus", default="tinyshakespeare", help="registered corpus name or a text file")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (0 = none)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    parser.add_argument("--sampling", choices=SAMPLINGS, default="streams")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=200, help="validate every N steps; 0 = only at the end")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    splits = resolve_corpus(args.corpus)
    tokenizer = train_tokenizer("char", splits.train)
    # As `charlm train`: validation characters never seen in training count as <unk>.
    train_ids = tokenizer.encode(splits.train.read_text())
    valid_ids = tokenizer.encode(splits.valid.read_text(), unknown="replace")
    valid_chars = predicted_chars(tokenizer, valid_ids)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embed_dim=128, hidden_size=512, num_layers=2,
                         dropout=0.2, locked_dropout=False)
    evaluator = LSTMLanguageModel(config, seed=args.seed)
    model = CharLSTM(config)
    copy_from_charlm(model, evaluator.params, config.num_layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    stream = BatchStream(train_ids, 32, 128, sampling=args.sampling, seed=args.seed)

    def validate(step: int, start: float, train_seconds: float) -> None:
        copy_to_charlm(model, evaluator.params, config.num_layers)
        loss = evaluate_ids(evaluator, valid_ids, chars=valid_chars).loss
        print(json.dumps({"step": step, "val": loss, "train_seconds": round(train_seconds, 1),
                          "elapsed": round(time.time() - start, 1)}), flush=True)

    state, step, start = None, 0, time.time()
    while (step < args.steps) if args.steps else (time.time() - start < args.minutes * 60):
        inputs, targets, reset_state = stream.next_window()
        if reset_state:
            state = None
        progress = None if args.steps else (time.time() - start) / (args.minutes * 60)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, base_lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                                        min_lr_ratio=args.min_lr_ratio, progress=progress)
        model.train()
        logits, state = model(torch.from_numpy(inputs).long(), state)
        state = tuple(s.detach() for s in state)
        loss = nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size),
                                           torch.from_numpy(targets).long().reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if args.eval_every and step % args.eval_every == 0:
            validate(step, start, time.time() - start)
    if not args.eval_every or step % args.eval_every:
        validate(step, start, time.time() - start)


if __name__ == "__main__":
    main()
