"""The `charlm` command: train, generate, complete, eval, serve, info, export, plot.

Thin on purpose: each command parses its flags, builds the library's config objects and calls the same
functions a notebook would (`charlm.train.train`, `charlm.sample.generate_text`, ...). Errors a user can
cause arrive as CharlmError and leave as `error: <message>` on stderr with exit status 2.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys

import click

from charlm.checkpoint import load_checkpoint, load_model, resolve_checkpoint, saved_train_config
from charlm.config import (DEFAULT_TIME_BUDGET_MINUTES, DEFAULT_WARMUP_SHARE, DTYPES, FIELD_OF_FLAG, load_recipe,
                           merge_train_config, option_default)
from charlm.corpus import DEFAULT_VALID_FRACTION, ERROR_MODES, SPLITS, resolve_corpus
from charlm.data import SAMPLINGS
from charlm.errors import CharlmError, ConfigError, CorpusError
from charlm.evaluate import evaluate
from charlm.export import FORMATS as EXPORT_FORMATS
from charlm.export import export as export_checkpoint
from charlm.extras import import_extra
from charlm.optim import SCHEDULES
from charlm.plot import plot_run
from charlm.sample import complete as complete_blank
from charlm.sample import generate_text
from charlm.tokenize import KINDS, UNKNOWN_MODES
from charlm.train import train as run_training

EXIT_USER_ERROR = 2
EXIT_SIGNAL_BASE = 128


class UserError(click.ClickException):
    """A CharlmError on its way out: one line, no traceback, exit 2."""

    exit_code = EXIT_USER_ERROR

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class CharlmGroup(click.Group):
    """Turns CharlmError and misused flags into one `error: ...` line / exit 2, and Ctrl-C outside
    training into a quiet exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CharlmError as exc:
            raise UserError(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise UserError(f"{exc.format_message()} (see '{command} --help')") from None
        except KeyboardInterrupt:
            click.echo("", err=True)
            raise click.exceptions.Exit(EXIT_SIGNAL_BASE + 2) from None


@click.group(cls=CharlmGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """CPU-first LSTM language models: train, sample, fill in blanks, evaluate, serve, export, plot."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML recipe (e.g. configs/tinyshakespeare.toml); flags override it.")
@click.option("--corpus", help="Registered corpus name or a path to a text file or folder.")
@click.option("--out", help="Run folder for last/, best/ and metrics.jsonl.")
@click.option("--tokenizer", type=click.Choice(KINDS), help=f"Token unit [default: {option_default('tokenizer')}].")
@click.option("--vocab-size", type=int, help="Vocabulary size: a cap for char/word, the target for bpe.")
@click.option("--bpe-sample-mb", type=float,
              help="BPE learns its merges from this many MB of a larger training split, evenly spaced "
                   f"[default: {option_default('bpe_sample_mb'):g}].")
@click.option("--encoding-errors", type=click.Choice(ERROR_MODES),
              help=f"Non-UTF-8 corpus bytes: fail, or use U+FFFD [default: {option_default('encoding_errors')}].")
@click.option("--valid-fraction", type=float,
              help="Share of a single-file corpus held out for validation "
                   f"[default: the corpus's rule, else {DEFAULT_VALID_FRACTION:g}].")
@click.option("--layers", type=int, help=f"LSTM layers [default: {option_default('num_layers')}].")
@click.option("--hidden", type=int, help=f"Hidden units per layer [default: {option_default('hidden_size')}].")
@click.option("--embed", type=int, help=f"Embedding size [default: {option_default('embed_dim')}].")
@click.option("--dropout", type=float, help=f"Dropout probability [default: {option_default('dropout')}].")
@click.option("--locked-dropout/--per-step-dropout", default=None,
              help="One dropout mask per window (AWD-LSTM) or a fresh one every step "
                   f"[default: {'locked' if option_default('locked_dropout') else 'per-step'}].")
@click.option("--weight-drop", type=float,
              help=f"DropConnect on W_hh, one mask per window (AWD-LSTM) [default: {option_default('weight_drop')}].")
@click.option("--tie-weights/--no-tie-weights", default=None, help="Share embedding and decoder (embed == hidden) "
                   f"[default: {'tied' if option_default('tie_weights') else 'not tied'}].")
@click.option("--dtype", type=click.Choice(DTYPES),
              help=f"Parameter dtype [default: {option_default('dtype')}].")
@click.option("--seq-len", type=int, help=f"Truncated-BPTT window T [default: {option_default('seq_len')}].")
@click.option("--batch-size", type=int, help=f"Parallel streams B [default: {option_default('batch_size')}].")
@click.option("--random-length/--fixed-length", default=None, help="Vary the window length around T "
                   f"[default: {'random' if option_default('random_length') else 'fixed'}].")
@click.option("--window-sampling", type=click.Choice(SAMPLINGS),
              help="B contiguous streams with the state carried, or rows at random places from a zero state "
                   f"[default: {option_default('window_sampling')}].")
@click.option("--lr", type=float, help=f"Peak learning rate [default: {option_default('lr'):g}].")
@click.option("--weight-decay", type=float,
              help=f"AdamW decoupled weight decay on matrices [default: {option_default('weight_decay'):g}].")
@click.option("--clip", type=float, help=f"Global gradient-norm clip, 0 = off [default: {option_default('clip'):g}].")
@click.option("--ema-decay", type=float,
              help="Validate and save an exponential moving average of the weights with this decay (e.g. 0.995), "
                   f"0 = off [default: {option_default('ema_decay'):g}].")
@click.option("--warmup", type=int,
              help=f"Linear warm-up steps [default: {DEFAULT_WARMUP_SHARE:.0%} of the run's steps or time budget].")
@click.option("--schedule", type=click.Choice(SCHEDULES),
              help=f"Decay after warm-up [default: {option_default('schedule')}].")
@click.option("--epochs", type=int, help="Stop after this many passes over the training split.")
@click.option("--max-steps", type=int, help="Stop after this many steps.")
@click.option("--time-budget", type=float, metavar="MIN",
              help=f"Stop cleanly after MIN minutes [default without a stop flag: {DEFAULT_TIME_BUDGET_MINUTES:g}].")
@click.option("--eval-every", type=int, help=f"Validate every N steps [default: {option_default('eval_every')}].")
@click.option("--eval-tokens", type=int,
              help="Validate on a fixed sample of about N tokens of a larger validation split, the same at every "
                   f"evaluation; 0 = the whole split [default: {option_default('eval_tokens'):,}].")
@click.option("--checkpoint-every", type=int,
              help=f"Save last/ every N steps [default: {option_default('checkpoint_every')}].")
@click.option("--log-every", type=int,
              help=f"Write a train line to metrics.jsonl every N steps [default: {option_default('log_every')}].")
@click.option("--seed", type=int, help=f"Seed for weights, dropout and data order [default: {option_default('seed')}].")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--force", is_flag=True, help="Replace a run already in --out.")
def train(config_file, resume, force, **flags) -> None:
    """Train an LSTM language model on a corpus."""
    explicit = {FIELD_OF_FLAG.get(name, name): value for name, value in flags.items() if value is not None}
    recipe = load_recipe(config_file) if config_file else {}
    out = explicit.get("out", recipe.get("out"))
    saved = saved_train_config(out) if resume and out else None
    config = merge_train_config(recipe, explicit, resume=resume, saved=saved)
    result = run_training(config, resume=resume, force=force)
    if result.signal_number is not None:
        if result.rank == 0:  # one message from a data-parallel run, not one per process
            click.echo(f"interrupted at step {result.step}; checkpoint saved to {result.last_checkpoint}; "
                       f"resume with: charlm train --out {shlex.quote(str(result.out))} --resume", err=True)
        sys.exit(EXIT_SIGNAL_BASE + result.signal_number)


def _require_unicode(text: str, what: str) -> str:
    """Arguments arrive through the OS as bytes; ones that were not UTF-8 reach Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if 0xDC80 <= code <= 0xDCFF:
            byte = code - 0xDC00
            raise ConfigError(f"{what} is not valid UTF-8 (byte 0x{byte:02x}); check the terminal's encoding") from None
        raise ConfigError(f"{what} holds a lone surrogate U+{code:04X}, which is not text") from None
    return text


def _unknown_option():
    return click.option("--unknown", type=click.Choice(UNKNOWN_MODES), default="error", show_default=True,
                        help="Prompt characters/words outside the vocabulary: fail, or map to the unknown token.")


@cli.command()
@click.argument("checkpoint")
@click.option("--prompt", default="", help="Text to continue (printed first), read as the start of a line.")
@click.option("--length", default=500, show_default=True, help="Tokens to sample.")
@click.option("--temperature", default=1.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, help="Sample among the k likeliest tokens; 0 = all.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass in (0, 1]; 1 = off.")
@click.option("--seed", type=int, default=None, help="Same seed, same text.")
@click.option("--num-samples", default=1, show_default=True, help="Independent samples (seed, seed+1, ...).")
@_unknown_option()
def generate(checkpoint, prompt, length, temperature, top_k, top_p, seed, num_samples, unknown) -> None:
    """Stream text sampled from CHECKPOINT (a run folder or a checkpoint folder)."""
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {num_samples}")
    _require_unicode(prompt, "--prompt")
    model, tokenizer, _ = load_model(checkpoint)
    for index in range(num_samples):
        if index:
            click.echo("\n" + "-" * 40)
        sample_seed = None if seed is None else seed + index
        chunks = generate_text(model, tokenizer, prompt, length=length, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=sample_seed, unknown=unknown)
        for chunk in chunks:
            click.echo(chunk, nl=False)
            sys.stdout.flush()
        click.echo()


@cli.command()
@click.argument("checkpoint")
@click.argument("text")
@click.option("--top", default=5, show_default=True, help="How many fillers to list.")
@click.option("--beam-width", default=16, show_default=True, help="Hypotheses kept per search step.")
@click.option("--json", "as_json", is_flag=True, help='Print a JSON list of {"text", "prob"}, best first.')
@_unknown_option()
def complete(checkpoint, text, top, beam_width, as_json, unknown) -> None:
    """Rank the likeliest words for the blank ___ in TEXT, e.g. "I love machine ___"."""
    _require_unicode(text, "the text")
    model, tokenizer, _ = load_model(checkpoint)
    completions = complete_blank(model, tokenizer, text, top=top, beam_width=beam_width, unknown=unknown)
    if as_json:
        click.echo(json.dumps([{"text": c.text, "prob": c.prob} for c in completions], ensure_ascii=False))
        return
    width = max((len(repr(c.text)) for c in completions), default=0)
    for rank, c in enumerate(completions, start=1):
        click.echo(f"{rank:>2}. {repr(c.text):<{width}}  {c.prob:.4g}")


@cli.command("eval")
@click.argument("checkpoint")
@click.option("--corpus", help="Corpus name or path [default: the one the checkpoint was trained on].")
@click.option("--split", type=click.Choice(SPLITS),
              help="Split to score [default: test, or valid when the corpus has no test split].")
@click.option("--batch-size", default=16, show_default=True, help="Parallel streams.")
@click.option("--seq-len", default=256, show_default=True, help="Window length (the state is carried across).")
@click.option("--encoding-errors", type=click.Choice(ERROR_MODES), default="strict", show_default=True,
              help="Non-UTF-8 corpus bytes: fail, or replace with U+FFFD.")
@click.option("--unknown", type=click.Choice(UNKNOWN_MODES), default="error", show_default=True,
              help="Text outside the vocabulary: fail, or map to the unknown token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(checkpoint, corpus, split, batch_size, seq_len, encoding_errors, unknown, as_json) -> None:
    """Loss (nats/token), perplexity and bits per character of CHECKPOINT on a whole corpus split."""
    model, tokenizer, ckpt = load_model(checkpoint)
    trained_on = ckpt.train_config or {}
    corpus = corpus or trained_on.get("corpus")
    if corpus is None:
        raise ConfigError("the checkpoint does not record its corpus; pass --corpus")
    splits = resolve_corpus(corpus, valid_fraction=trained_on.get("valid_fraction"), errors=encoding_errors)
    split = split or ("test" if splits.test is not None else "valid")
    text = getattr(splits, split)
    if text is None:
        raise CorpusError(f"corpus {splits.name!r} has no {split} split; try --split valid")
    result = evaluate(model, tokenizer, text, batch_size=batch_size, seq_len=seq_len, unknown=unknown,
                      key=splits.cache_key(split), progress=not as_json)
    if as_json:
        doc = {"checkpoint": str(ckpt.folder), "corpus": splits.name, "split": split, **result.to_dict()}
        click.echo(json.dumps({k: _finite_or_none(v) for k, v in doc.items()}, allow_nan=False))
        return
    click.echo(f"{splits.name} ({split}): {result.tokens:,} tokens, {result.chars:,} characters")
    click.echo(f"loss {result.loss:.4f} nats/token | perplexity {result.perplexity:.2f} | "
               f"{result.bits_per_char:.4f} bits/char")


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


@cli.command()
@click.argument("checkpoint")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--max-batch", default=64, show_default=True, help="Requests generated together in one batched step.")
@click.option("--max-waiting", default=64, show_default=True,
              help="Requests that may wait for a place in the batch; beyond them the server answers 429.")
@click.option("--threads", type=int,
              help="Threads for the model's steps [default: the available cores]; 1 is quicker while other "
                   "processes keep the cores busy.")
def serve(checkpoint, host, port, max_batch, max_waiting, threads) -> None:
    """Serve CHECKPOINT over the OpenAI completions API, with a page to try it at /."""
    if max_batch < 1 or max_waiting < 0:
        raise ConfigError(f"--max-batch must be at least 1 and --max-waiting at least 0, got {max_batch} and "
                          f"{max_waiting}")
    if not 0 <= port < 65536:
        raise ConfigError(f"--port must be from 0 to 65535, got {port}")
    for module in ("starlette", "uvicorn"):
        import_extra(module, "serve", "charlm serve")
    from charlm.serve import serve as run_server

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    run_server(checkpoint, host=host, port=port, max_batch=max_batch, max_waiting=max_waiting, threads=threads)


@cli.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(checkpoint, as_json) -> None:
    """Config, parameter count, training steps and best validation loss of CHECKPOINT."""
    folder = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(folder)
    state = ckpt.trainer_state
    doc = {
        "checkpoint": str(folder),
        "parameters": int(sum(p.size for p in ckpt.params.values())),
        "model": ckpt.model_config.to_dict(),
        "tokenizer": ckpt.tokenizer.kind,
        "step": state.get("step"),
        "epoch": state.get("epoch"),
        "tokens_seen": state.get("tokens_seen"),
        "best_val_loss": state.get("best_val_loss"),
        "best_step": state.get("best_step"),
        "train": ckpt.train_config,
    }
    last = folder.parent / "last"
    if folder.name == "best" and last.is_dir():
        doc["run_steps"] = load_checkpoint(last).trainer_state.get("step")
    if as_json:
        click.echo(json.dumps(doc, allow_nan=False))
        return
    model = doc["model"]
    click.echo(f"checkpoint   {doc['checkpoint']}")
    click.echo(f"model        {model['num_layers']}x{model['hidden_size']} LSTM, embed {model['embed_dim']}, "
               f"{doc['tokenizer']} vocab {model['vocab_size']}, dropout {model['dropout']}, "
               f"tied {model['tie_weights']}, {model['dtype']}")
    click.echo(f"parameters   {doc['parameters']:,}")
    steps = f"{doc['step']}" + (f" (run trained to step {doc['run_steps']})" if "run_steps" in doc else "")
    click.echo(f"step         {steps}, epoch {doc['epoch']}, {doc['tokens_seen'] or 0:,} tokens seen")
    best = doc["best_val_loss"]
    click.echo("best val     " + (f"{best:.4f} nats/token (ppl {math.exp(best):.2f}) at step {doc['best_step']}"
                                  if best is not None else "none yet"))
    if ckpt.train_config:
        click.echo("train config " + ", ".join(f"{k}={v}" for k, v in ckpt.train_config.items() if v is not None))


@cli.command()
@click.argument("checkpoint")
@click.option("--to", "to", type=click.Choice(EXPORT_FORMATS), required=True,
              help="torch: model.safetensors with nn.LSTM's names; onnx: model.onnx (needs charlm[onnx]).")
@click.argument("out_dir")
def export(checkpoint, to, out_dir) -> None:
    """Write CHECKPOINT to OUT_DIR for PyTorch or ONNX Runtime, with tokenizer.json and config.json."""
    for path in export_checkpoint(checkpoint, to, out_dir):
        click.echo(f"{path}  {path.stat().st_size:,} bytes")


@cli.command()
@click.argument("run")
@click.option("--out", help="Image to write; the suffix picks the format [default: RUN/loss.png].")
def plot(run, out) -> None:
    """Training and validation loss of RUN against step and wall time (needs charlm[plot])."""
    summary = plot_run(run, out)
    best = ("no validation yet" if summary.best_val_loss is None
            else f"best validation loss {summary.best_val_loss:.4f} at step {summary.best_step:,}")
    click.echo(f"wrote {summary.path}: {summary.train_records} training and {summary.val_records} validation "
               f"records to step {summary.last_step:,}; {best}")


def main() -> None:
    """Console entry point; a closed stdout (`charlm generate ... | head`) ends quietly."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        cli(prog_name="charlm")
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_SIGNAL_BASE + 13)
