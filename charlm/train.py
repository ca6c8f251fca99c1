"""The training loop: corpus -> tokenizer -> ids -> windows -> model -> AdamW -> checkpoints and metrics.jsonl.

Exact resume: everything the next step depends on -- weights and their average, Adam moments, step count,
data cursor, dropout RNG, the hidden state carried between windows and the half-filled loss average of the
log -- goes into every checkpoint, so a run stopped anywhere and resumed with `resume=True` ends with the same
weights and the same metrics log (apart from the timing fields) as a run that was never stopped.

Under `mpiexec -n N python -m mpi4py -m charlm train ...` the N processes train one model, synchronous data
parallel (see charlm.distributed): each takes B/N rows of every window, with the dropout masks and data
order of the whole batch, and every process applies the same update from the summed gradients, so N
processes compute what one would. Rank 0 alone writes the run folder and the log.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from charlm.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from charlm.config import (ARCHITECTURE_FIELDS, DEFAULT_TIME_BUDGET_MINUTES, DEFAULT_WARMUP_SHARE, ModelConfig,
                           TrainConfig, earlier_default, flag)
from charlm.corpus import resolve_corpus
from charlm.data import BatchStream, encode_cached, train_tokenizer_cached
from charlm.distributed import SingleProcess, world
from charlm.errors import CharlmError, CheckpointError, ConfigError, CorpusError
from charlm.evaluate import evaluate_ids, evaluate_rows, predicted_chars, validation_sample
from charlm.model import LSTMLanguageModel
from charlm.optim import AdamW, PlateauDecay, WeightAverage, clip_grad_norm, learning_rate
from charlm.runlock import LOCK_FILE, RunLock
from charlm.runtime import ensure_threads_limited, limit_threads, thread_count
from charlm.tokenize import Tokenizer

MAX_CONSECUTIVE_NONFINITE = 5
METRICS_FILE = "metrics.jsonl"
# Fields of metrics.jsonl that measure the machine, not the run: they differ between identical runs.
VOLATILE_METRIC_KEYS = ("time", "elapsed", "tok_per_s", "gflop_per_s")
# Changing any of these on resume would make the saved weights, tokenizer or data cursor meaningless.
FROZEN_ON_RESUME = (
    "tokenizer", "vocab_size", *ARCHITECTURE_FIELDS, "valid_fraction", "encoding_errors", "seq_len", "batch_size",
    "random_length", "window_sampling", "seed", "ema_decay",
)
# The run's counters, saved in trainer_state.json under their own names and read back on resume (beside
# them: the data cursor, the dropout RNG, the plateau and optimizer state, the elapsed time).
RESUMED_COUNTERS = (
    "step", "tokens_seen", "best_val_loss", "best_step", "last_val_loss", "nonfinite_steps", "consecutive_nonfinite",
    "loss_sum", "loss_count",
)
DROPOUT_RNG_STREAM = 1
# With a weight average, a checkpoint's weights are the average (what eval and generate should use) and the
# optimizer file also holds the training weights themselves, under this prefix, for --resume.
TRAINING_WEIGHTS_PREFIX = "train."


class TrainingDiverged(CharlmError):
    """The loss or the gradients stayed non-finite: continuing would only burn time."""


@dataclass(frozen=True)
class TrainResult:
    """How a `train` call ended; `signal_number` is set when SIGINT/SIGTERM stopped it early."""

    out: Path
    step: int
    stop_reason: str
    best_val_loss: float | None
    last_val_loss: float | None
    nonfinite_steps: int
    signal_number: int | None = None
    rank: int = 0

    @property
    def last_checkpoint(self) -> Path:
        return self.out / "last"


def train(config: TrainConfig, *, resume: bool = False, force: bool = False, verbose: bool = True) -> TrainResult:
    """Train (or with `resume`, continue) the run in `config.out`; see the module docstring.

    `force` replaces a run already in `config.out`. Returns when a stop condition is reached or after
    SIGINT/SIGTERM (the current step finishes and last/ is saved first; a second signal abandons it).
    """
    if resume and force:
        raise ConfigError("use either --resume (continue the run) or --force (replace it), not both")
    processes = world()
    threads = processes.threads_per_rank()
    if threads is None:
        ensure_threads_limited()
    else:
        limit_threads(threads)
    verbose = verbose and processes.rank == 0
    if verbose and not processes.aborts_all_on_error:
        print("warning: start data-parallel runs as `mpiexec ... python -m mpi4py -m charlm train ...`, so that "
              "an error in one process ends all of them instead of leaving the others waiting", file=sys.stderr)
    out = Path(config.out)
    # Rank 0 alone writes the run folder, and holds its lock for the whole run. Every process reads the
    # checkpoint to resume (a shared file system, as for the corpus); rank 0 changes the folder only once
    # all have looked.
    with RunLock(out) if processes.rank == 0 else contextlib.nullcontext():
        checkpoint = _checkpoint_to_resume(out, resume=resume, force=force, verbose=verbose)
        run = _Run(config, out, checkpoint, verbose, processes)
        processes.barrier()
        if processes.rank == 0 and force:
            _remove_run_files(out)
        with _StopOnSignal(verbose) as stop:
            return run.loop(stop)


def _run_files(out: Path) -> list[Path]:
    return [out / name for name in ("last", "best", METRICS_FILE) if (out / name).exists()]


def _checkpoint_to_resume(out: Path, *, resume: bool, force: bool, verbose: bool) -> Checkpoint | None:
    """Refuse to overwrite another run by accident; return the checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if resume:
        if (out / "last").exists():
            return load_checkpoint(out / "last", load_optimizer=True)
        if verbose:
            print(f"nothing to resume in {out}; starting a new run", file=sys.stderr)
        return None
    if force:
        return None
    if _run_files(out):
        raise ConfigError(f"{out} already holds a training run; pass --resume to continue it or --force to replace it")
    if out.is_dir() and any(path.name != LOCK_FILE for path in out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose another --out or pass --force")
    return None


def _remove_run_files(out: Path) -> None:
    """--force: delete the old run's checkpoints and log (only once the new run has loaded its data)."""
    for path in _run_files(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_resume_matches(config: TrainConfig, saved: dict | None) -> None:
    if saved is None:
        raise ConfigError("the checkpoint to resume has no training config; start a new run with --force")
    # A setting missing from an older checkpoint had its default then (say ema_decay: no average).
    before = {name: saved.get(name, earlier_default(name)) for name in FROZEN_ON_RESUME}
    now = config.to_dict()
    changed = [name for name in FROZEN_ON_RESUME if before[name] != now[name]]
    if changed:
        details = ", ".join(f"{flag(n)} {before[n]!r} -> {now[n]!r}" for n in changed)
        raise ConfigError(f"--resume cannot change the model or data settings of a run: {details}")


def training_flops_per_token(model_config: ModelConfig) -> float:
    """Matrix-multiply FLOPs per token for forward + backward (6 per weight, as nanoGPT's estimate_mfu)."""
    h, layers = model_config.hidden_size, model_config.num_layers
    lstm = sum(4 * h * ((model_config.embed_dim if layer == 0 else h) + h) for layer in range(layers))
    return 6.0 * (lstm + model_config.vocab_size * h)


class _StopOnSignal:
    """SIGINT/SIGTERM set a flag the loop checks between steps; a second one abandons the step at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.signal_number: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt
        self.signal_number = signum
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving "
                  "(send it again to abandon the step without saving)", file=sys.stderr, flush=True)


class _MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written so a killed run loses at most a line."""

    def __init__(self, path: Path, keep_through_step: int, writer: bool = True) -> None:
        """`writer` False: a process of a data-parallel run other than rank 0, which logs nothing."""
        self.path = path
        self._handle = None
        if writer:
            self._truncate_after(keep_through_step)
            self._handle = open(path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint being resumed (and any torn last line)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        """Strict JSON: a non-finite number (a diverged loss, an infinite perplexity) is written as null."""
        if self._handle is None:
            return
        record = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                  for key, value in record.items()}
        record["time"] = round(time.time(), 3)
        self._handle.write(json.dumps(record, allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


class _Run:
    """One training run: the state that a checkpoint saves and the steps that advance it."""

    def __init__(self, config: TrainConfig, out: Path, checkpoint: Checkpoint | None, verbose: bool,
                 processes: SingleProcess) -> None:
        self.config = config
        self.out = out
        self.verbose = verbose
        self.processes = processes
        self.rows = processes.rows(config.batch_size)
        if checkpoint is not None:
            _check_resume_matches(config, checkpoint.train_config)
        splits = resolve_corpus(config.corpus, valid_fraction=config.valid_fraction, errors=config.encoding_errors)
        if checkpoint is not None and checkpoint.trainer_state.get("corpus_checksum") != splits.checksum:
            raise ConfigError(f"--resume: corpus {config.corpus!r} differs from the one this run was trained on")
        self.corpus_checksum = splits.checksum
        # Rank 0 trains the tokenizer and fills the ids cache first; the other processes then take its
        # tokenizer, and its ids from the cache where they share it (the same machine or file system).
        if processes.rank == 0:
            self.tokenizer = checkpoint.tokenizer if checkpoint is not None else self._train_tokenizer(splits)
            train_ids = self._encode(splits)
        self.tokenizer_json = processes.broadcast_json(self.tokenizer.to_json() if processes.rank == 0 else None)
        if processes.rank != 0:
            self.tokenizer = Tokenizer.from_json(self.tokenizer_json)
            train_ids = self._encode(splits)
        if len(self.valid_ids) < 2:
            raise CorpusError(f"validation split of {config.corpus!r} is too short ({len(self.valid_ids)} tokens)")
        # A big validation split is scored on a fixed sample (the same windows every time), a small one whole.
        self.valid_sample = validation_sample(self.valid_ids, config.eval_tokens, seed=config.seed)
        scored = [self.valid_ids] if self.valid_sample is None else self.valid_sample
        self.valid_chars = sum(predicted_chars(self.tokenizer, ids) for ids in scored)
        self.stream = BatchStream(train_ids, config.batch_size, config.seq_len,
                                  random_length=config.random_length, sampling=config.window_sampling,
                                  seed=config.seed, rows=self.rows)

        self.model_config = config.model.with_vocab_size(self.tokenizer.vocab_size)
        self.model = LSTMLanguageModel(self.model_config, params=checkpoint.params if checkpoint else None,
                                       seed=config.seed)
        self.optimizer = AdamW(self.model.params, lr=config.lr, betas=(config.beta1, config.beta2),
                               weight_decay=config.weight_decay)
        # Built from the checkpoint's weights, which are the average when there is one; _restore then
        # puts the training weights back into the model.
        self.average = WeightAverage(self.model.params, config.ema_decay) if config.ema_decay else None
        self.eval_model = self.model if self.average is None else LSTMLanguageModel(
            self.model_config, params=self.average.averaged)
        self.plateau = PlateauDecay(factor=config.plateau_factor, patience=config.plateau_patience)
        self.dropout_rng = np.random.default_rng([config.seed, DROPOUT_RNG_STREAM])
        self.hidden = self._zero_state()
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.last_val_loss: float | None = None
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self.loss_sum = 0.0
        self.loss_count = 0
        self.last_grad_norm: float | None = None
        if checkpoint is not None:
            self._restore(checkpoint)
        self.saved_step = self.step if checkpoint is not None else None
        processes.broadcast_in_place(self.model.params.values())  # every process starts from rank 0's weights
        self.clock = self.elapsed_before  # rank 0's elapsed seconds, as all processes last agreed on them
        self.signal_number: int | None = None

        self.total_steps = self._total_steps()
        self.time_budget_s = None if config.time_budget is None else config.time_budget * 60.0
        if self.total_steps is None and self.time_budget_s is None:
            self.time_budget_s = DEFAULT_TIME_BUDGET_MINUTES * 60.0
        self.flops_per_token = training_flops_per_token(self.model_config)

    def _train_tokenizer(self, splits) -> Tokenizer:
        config = self.config
        sample_bytes = int(config.bpe_sample_mb * 1e6)
        if self.verbose and config.tokenizer == "bpe" and splits.train.size > sample_bytes:
            print(f"bpe: learning merges from a {config.bpe_sample_mb:g} MB sample (evenly spaced 1 MB blocks) "
                  f"of the {splits.train.size / 1e6:,.0f} MB training split (--bpe-sample-mb)", file=sys.stderr)
        return train_tokenizer_cached(config.tokenizer, splits.train, splits.cache_key("train"), config.vocab_size,
                                      bpe_sample_bytes=sample_bytes)

    def _encode(self, splits) -> np.ndarray:
        """The training ids (returned) and validation ids (self.valid_ids) under self.tokenizer, from the cache."""
        # "replace": a capped vocabulary leaves rare training words out, and validation text may hold
        # characters never seen in training; both count as <unk> rather than stopping the run.
        train_ids = encode_cached(self.tokenizer, splits.train, key=splits.cache_key("train"), unknown="replace",
                                  verbose=self.verbose)
        self.valid_ids = encode_cached(self.tokenizer, splits.valid, key=splits.cache_key("valid"),
                                       unknown="replace", verbose=self.verbose)
        return train_ids

    def _zero_state(self) -> tuple[np.ndarray, np.ndarray]:
        """A zero carried state for this process's rows."""
        return self.model.zero_state(self.rows[1] - self.rows[0])

    def _total_steps(self) -> int | None:
        limits = []
        if self.config.max_steps is not None:
            limits.append(self.config.max_steps)
        if self.config.epochs is not None:
            limits.append(self.config.epochs * self.stream.windows_per_epoch)
        return min(limits) if limits else None

    def _restore(self, checkpoint: Checkpoint) -> None:
        """Load the resumable state; a checkpoint written without it (say a copied best/) cannot resume."""
        try:
            self._restore_state(checkpoint)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{checkpoint.folder} lacks the training state needed to resume ({exc}); start over with --force"
            ) from None

    def _restore_state(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.trainer_state
        moments = checkpoint.optimizer_state or {}
        self.optimizer.load_state_dict(moments, state["optimizer_steps"])
        if self.average is not None:
            for name, param in self.model.params.items():
                param[...] = moments[TRAINING_WEIGHTS_PREFIX + name]
        first, stop = self.rows
        self.hidden = tuple(np.ascontiguousarray(moments[name][:, first:stop]) for name in ("state.h", "state.c"))
        self.stream.load_state_dict(state["data"])
        self.dropout_rng.bit_generator.state = state["dropout_rng"]
        self.plateau.load_state_dict(state["plateau"])
        self.elapsed_before = state["elapsed_seconds"]
        for name in RESUMED_COUNTERS:
            setattr(self, name, state[name])

    def _trainer_state(self) -> dict:
        return {
            **{name: getattr(self, name) for name in RESUMED_COUNTERS},
            "epoch": self.stream.current_epoch,
            "elapsed_seconds": self.elapsed(),
            "optimizer_steps": self.optimizer.step_count,
            "plateau": self.plateau.state_dict(),
            "data": self.stream.state_dict(),
            "dropout_rng": self.dropout_rng.bit_generator.state,
            "corpus_checksum": self.corpus_checksum,
        }

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.session_start)

    def loop(self, stop: _StopOnSignal) -> TrainResult:
        self.session_start = time.monotonic()
        self.stop = stop
        self.metrics = _MetricsLog(self.out / METRICS_FILE, keep_through_step=self.step,
                                   writer=self.processes.rank == 0)
        try:
            reason = self._finished_reason()
            if reason is not None:
                if self.verbose:
                    print(f"{self.out} is already trained to step {self.step} ({reason}); nothing to do",
                          file=sys.stderr)
                return self._result(f"already finished ({reason})")
            self._announce()
            return self._loop(stop)
        finally:
            self.metrics.close()

    def _loop(self, stop: _StopOnSignal) -> TrainResult:
        progress = _Progress(self.verbose, self.total_steps, self.step, self.time_budget_s)
        interval_seconds, interval_tokens = 0.0, 0
        try:
            while True:
                started = time.monotonic()
                lr, tokens = self._train_step()
                interval_seconds += time.monotonic() - started
                interval_tokens += tokens
                progress.update()
                if self.step % self.config.log_every == 0:
                    progress.show_train(self._log_train(lr, interval_tokens / max(interval_seconds, 1e-9)))
                    interval_seconds, interval_tokens = 0.0, 0
                reason = self._finished_reason()
                if self.step % self.config.eval_every == 0 or reason is not None:
                    self._validate(progress)
                    self.clock = self._agree([])[0]
                    reason = reason or self._finished_reason()  # a budget spent validating ends the run here
                if self.step % self.config.checkpoint_every == 0 or reason is not None:
                    self.save_last()
                if reason is not None:
                    progress.close()
                    self._announce_end(reason)
                    return self._result(reason)
                if self.signal_number is not None:  # seen by all processes in the same step
                    if self.saved_step != self.step:
                        self.save_last()
                    self.processes.barrier()  # none exits (ending the job) while rank 0 is still saving
                    return self._result("interrupted", self.signal_number)
        finally:
            progress.close()

    def _train_step(self) -> tuple[float, int]:
        """One window: forward, backward, sum over processes, clip, AdamW; a non-finite loss or gradient skips
        the update.

        Returns the learning rate used and the tokens in the window (of all processes).
        """
        inputs, targets, reset_state = self.stream.next_window()
        if reset_state:
            self.hidden = self._zero_state()
        loss, hidden = self.model.forward(inputs, targets, self.hidden, train=True, rng=self.dropout_rng,
                                          rows=(self.rows[0], self.config.batch_size))
        grads, _ = self.model.backward()
        loss = self._agree_on_step(loss)
        norm = clip_grad_norm(grads, self.config.clip)
        lr = self._learning_rate()
        tokens = inputs.size * self.processes.size
        self.step += 1
        self.tokens_seen += tokens
        self.last_grad_norm = norm if math.isfinite(norm) else None
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.nonfinite_steps += 1
            self.consecutive_nonfinite += 1
            self.hidden = self._zero_state()
            if self.consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
                raise TrainingDiverged(
                    f"training diverged: loss or gradients were non-finite for {self.consecutive_nonfinite} "
                    f"steps in a row (at step {self.step}); the last good checkpoint is {self.out / 'last'}; "
                    "try a lower --lr or --clip"
                )
            return lr, tokens
        self.consecutive_nonfinite = 0
        self.optimizer.step(grads, lr)
        if self.average is not None:
            self.average.update(self.optimizer.step_count)
        self.hidden = hidden
        self.loss_sum += loss
        self.loss_count += 1
        return lr, tokens

    def _agree_on_step(self, loss: float) -> float:
        """Make every process's gradients the whole batch's (one sum over one flat buffer, then the mean, as
        each process's loss is the mean over its rows); agree on the loss, on rank 0's clock and on whether
        any process was sent SIGINT or SIGTERM. Returns the whole batch's loss."""
        if self.processes.size > 1:
            gradients = self.model.flat_gradients
            self.processes.sum_in_place(gradients)
            gradients *= gradients.dtype.type(1.0 / self.processes.size)
        signals = [float(self.stop.signal_number == signum) for signum in _StopOnSignal.SIGNALS]
        self.clock, total_loss, *signalled = self._agree([loss, *signals])
        stopping = [signum for signum, count in zip(_StopOnSignal.SIGNALS, signalled) if count]
        if stopping:
            self.signal_number = max(stopping)  # SIGTERM (a scheduler's) over SIGINT when both came
        return total_loss / self.processes.size

    def _agree(self, values: list[float]) -> list[float]:
        """[rank 0's elapsed seconds, then each value summed over the processes], identical on every one."""
        summed = np.array([self.elapsed() if self.processes.rank == 0 else 0.0, *values])
        self.processes.sum_in_place(summed)
        return summed.tolist()

    def _learning_rate(self) -> float:
        progress = None
        if self.total_steps is None:
            progress = self.clock / self.time_budget_s
        warmup = self.config.warmup_steps
        rate = learning_rate(self.step, base_lr=self.config.lr, warmup_steps=warmup or 0,
                             total_steps=self.total_steps, schedule=self.config.schedule,
                             min_lr_ratio=self.config.min_lr_ratio, progress=progress,
                             warmup_share=DEFAULT_WARMUP_SHARE if warmup is None else 0.0)
        return rate * self.plateau.scale if self.config.schedule == "plateau" else rate

    def _finished_reason(self) -> str | None:
        if self.config.max_steps is not None and self.step >= self.config.max_steps:
            return "max_steps"
        if self.config.epochs is not None and self.stream.current_epoch >= self.config.epochs:
            return "epochs"
        if self.time_budget_s is not None and self.clock >= self.time_budget_s:
            return "time_budget"
        return None

    def _log_train(self, lr: float, tokens_per_second: float) -> dict:
        loss = self.loss_sum / self.loss_count if self.loss_count else None
        record = {
            "event": "train",
            "step": self.step,
            "epoch": self.stream.current_epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": self.last_grad_norm,
            "tokens": self.tokens_seen,
            "nonfinite_steps": self.nonfinite_steps,
            "tok_per_s": round(tokens_per_second, 1),
            "gflop_per_s": round(tokens_per_second * self.flops_per_token / 1e9, 3),
            "elapsed": round(self.elapsed(), 3),
        }
        self.metrics.write(record)
        self.loss_sum, self.loss_count = 0.0, 0
        return record

    def _validate(self, progress: _Progress) -> None:
        """The validation split (whole, state carried across windows, or its fixed sample), no dropout;
        saves best/ on improvement."""
        if self.valid_sample is None:
            result = evaluate_ids(self.eval_model, self.valid_ids, chars=self.valid_chars, world=self.processes)
        else:
            result = evaluate_rows(self.eval_model, self.valid_sample, chars=self.valid_chars, world=self.processes)
        finite = math.isfinite(result.loss)
        self.last_val_loss = result.loss if finite else None
        improved = finite and (self.best_val_loss is None or result.loss < self.best_val_loss)
        if self.config.schedule == "plateau":
            self.plateau.update(result.loss)
        if improved:
            self.best_val_loss, self.best_step = result.loss, self.step
        self.metrics.write({
            "event": "val", "step": self.step, "epoch": self.stream.current_epoch,
            "loss": result.loss, "perplexity": result.perplexity, "bits_per_char": result.bits_per_char,
            "tokens": result.tokens, "best": improved, "elapsed": round(self.elapsed(), 3),
        })
        if improved and self.processes.rank == 0:
            self._save(self.out / "best")
        progress.write(f"step {self.step:>7} | epoch {self.stream.current_epoch} | val loss {result.loss:.4f} | "
                       f"ppl {result.perplexity:.2f} | bpc {result.bits_per_char:.3f}"
                       f"{' | best' if improved else ''} | {_format_duration(self.elapsed())}")

    def save_last(self) -> None:
        """Rank 0 saves last/, with the carried state of every process's rows gathered to it."""
        h, c = (self.processes.gather_rows(state) for state in self.hidden)
        if self.processes.rank == 0:
            self._save(self.out / "last", hidden=(h, c))
        self.saved_step = self.step

    def _save(self, folder: Path, *, hidden: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """A checkpoint of the weights; with the whole batch's carried state `hidden`, also everything
        --resume needs."""
        optimizer_state = None
        if hidden is not None:
            h, c = hidden
            optimizer_state = {**self.optimizer.state_dict(), "state.h": h, "state.c": c}
            if self.average is not None:
                optimizer_state.update({TRAINING_WEIGHTS_PREFIX + name: p for name, p in self.model.params.items()})
        save_checkpoint(folder, model_config=self.model_config, params=self.eval_model.params,
                        tokenizer_json=self.tokenizer_json, trainer_state=self._trainer_state(),
                        optimizer_state=optimizer_state, train_config=self.config.to_dict())

    def _announce(self) -> None:
        if not self.verbose:
            return
        c = self.config
        action = f"resuming at step {self.step}" if self.step else "training"
        limits = [f"{c.max_steps} steps" if c.max_steps else None,
                  f"{c.epochs} epochs ({c.epochs * self.stream.windows_per_epoch} steps)" if c.epochs else None,
                  f"{self.time_budget_s / 60:g} min" if self.time_budget_s else None]
        print(f"{action}: {self.model.num_parameters():,} parameters ({c.model.num_layers}x{c.model.hidden_size} LSTM, "
              f"{c.tokenizer} vocab {self.tokenizer.vocab_size}), {self.stream.windows_per_epoch} steps/epoch of "
              f"{c.batch_size}x{c.seq_len} tokens{self._processes_note()}, "
              f"stop at {' or '.join(x for x in limits if x)}; writing {self.out}", file=sys.stderr)
        if self.valid_sample is not None:
            rows, length = self.valid_sample.shape
            print(f"validating every {c.eval_every} steps on a fixed sample of {rows * (length - 1):,} of the "
                  f"{len(self.valid_ids) - 1:,} validation tokens ({rows} streams of {length - 1:,}, seed {c.seed}; "
                  "--eval-tokens); charlm eval scores the whole split", file=sys.stderr)

    def _processes_note(self) -> str:
        if self.processes.size == 1:
            return ""
        threads = thread_count()
        return (f" on {self.processes.size} processes ({self.rows[1] - self.rows[0]} rows, {threads} "
                f"thread{'s' if threads > 1 else ''} each)")

    def _announce_end(self, reason: str) -> None:
        if self.verbose:
            best = f"{self.best_val_loss:.4f}" if self.best_val_loss is not None else "n/a"
            print(f"done ({reason}) at step {self.step} in {_format_duration(self.elapsed())}: "
                  f"best val loss {best}, checkpoints in {self.out}/best and {self.out}/last", file=sys.stderr)

    def _result(self, reason: str, signal_number: int | None = None) -> TrainResult:
        return TrainResult(out=self.out, step=self.step, stop_reason=reason, best_val_loss=self.best_val_loss,
                           last_val_loss=self.last_val_loss, nonfinite_steps=self.nonfinite_steps,
                           signal_number=signal_number, rank=self.processes.rank)


class _Progress:
    """A tqdm bar (loss, tokens/s, lr, ETA) on a terminal; on a pipe or file, one plain line per train log."""

    def __init__(self, verbose: bool, total_steps: int | None, step: int, time_budget_s: float | None) -> None:
        self.verbose = verbose
        self.total_steps = total_steps
        self.time_budget_s = time_budget_s
        interactive = verbose and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True,
                        disable=not interactive, smoothing=0.1)
        self.plain = verbose and not interactive

    def update(self) -> None:
        self.bar.update(1)

    def show_train(self, record: dict) -> None:
        loss = "nan" if record["loss"] is None else f"{record['loss']:.3f}"
        fields = {"loss": loss, "tok/s": f"{record['tok_per_s']:.0f}", "lr": f"{record['lr']:.2e}"}
        if self.total_steps is None and self.time_budget_s is not None:
            fields["left"] = _format_duration(max(self.time_budget_s - record["elapsed"], 0.0))
        if self.plain:
            self.write(f"step {record['step']:>7} | epoch {record['epoch']} | "
                       + " | ".join(f"{k} {v}" for k, v in fields.items())
                       + f" | {record['gflop_per_s']:.2f} GFLOP/s | {_format_duration(record['elapsed'])}")
        else:
            self.bar.set_postfix(fields, refresh=False)

    def write(self, line: str) -> None:
        if self.verbose:
            tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
