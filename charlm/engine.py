"""Continuous batching: many generation requests advance together, one batched model step per token.

A server thread owns the model. Each step runs every request in flight at once: their next input tokens form
a (1, B) window and their states the batch rows, so the weights are read once for B tokens instead of once
per token. A request's row either reads its prompt (a short prompt one token a step, inside the batch, so a
crowd of new requests costs no extra passes over the weights; a long one in windows of its own before it
joins) or samples with the request's own temperature, top-k, top-p and seed (one uniform number a token
from its own generator, as `LSTMLanguageModel.generate_ids` draws them, so a seed gives the same tokens as
`charlm generate` up to floating-point rounding). A request joins at the next step and leaves as soon as it
ends, is cancelled or its consumer fails.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from charlm.errors import CharlmError, ConfigError
from charlm.kernels.generate import sample
from charlm.runtime import parallel_chunks, single_threaded_blas

# Prompts of up to this many tokens are read inside the batched steps, one token a step; longer ones first
# in windows of their own (a step per token would take too many steps).
PROMPT_TOKENS_IN_BATCH = 32
# Prompt tokens read per model call of a long prompt: the window `charlm eval` uses, so memory stays bounded.
PROMPT_WINDOW = 256
# Long-prompt tokens read in one turn before the next batched step, so that they do not hold up every stream
# in flight for their whole length.
PROMPT_TOKENS_PER_TURN = 512
class QueueFull(CharlmError):
    """More requests than the engine holds in flight plus its waiting room."""


@dataclass(frozen=True)
class Sampling:
    """How one sequence is generated. `logprobs`: None, or how many alternatives to report per token (0 =
    only the chosen token's); `stop`: strings that end the text (not included); `echo`: report the prompt's
    tokens first."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    stop: tuple[str, ...] = ()
    echo: bool = False


@dataclass(frozen=True)
class TokenInfo:
    """One token as OpenAI's `logprobs` reports it: its text, log-probability (None for a first token with
    no context) and the likeliest alternatives (text -> log-probability), under the model's own
    distribution (temperature 1, nothing filtered)."""

    text: str
    logprob: float | None
    top: dict[str, float]


@dataclass(frozen=True)
class Piece:
    """New text of a sequence, with its tokens when logprobs were asked for."""

    text: str
    tokens: tuple[TokenInfo, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The sequence ended: "length" (max_tokens reached) or "stop" (a stop string appeared)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The sequence could not go on; the server stays up."""

    message: str


Event = Piece | Finished | Failed


@dataclass(eq=False)
class Sequence:
    """One completion in flight. `prompt_ids` are what the model reads (the prompt after its line start,
    see `charlm.sample.context_ids`), of which the last `echo_count` tokens are the prompt's own."""

    prompt_ids: np.ndarray
    echo_count: int
    sampling: Sampling
    emit: Callable[[Event], None]
    cancelled: bool = False
    done: bool = False
    generated: int = 0
    held: str = ""
    token: int = 0
    h: np.ndarray | None = None
    c: np.ndarray | None = None
    rng: np.random.Generator | None = None
    decoder: object = None
    prompt_read: int = 0  # prompt tokens fed so far; the prompt is read when all but the last are
    prompt_state: tuple | None = None
    prompt_scores: list = field(default_factory=list)

    @property
    def reading(self) -> bool:
        """Whether the next step feeds a prompt token rather than samples."""
        return self.prompt_read < len(self.prompt_ids) - 1

    def cancel(self) -> None:
        """Stop generating (the client went away); takes effect before the next step."""
        self.cancelled = True


@njit(cache=True, nogil=True)
def _sample_rows(logits, temperatures, top_ks, top_ps, uniforms, probs, tokens, lo, hi):
    """tokens[i] for rows lo..hi of logits (B, V), each drawn as batch-1 generation draws it, with its own
    settings and uniform number; probs: (B, V) float64 workspace."""
    for i in range(lo, hi):
        tokens[i] = sample(logits[i], temperatures[i], top_ks[i], top_ps[i], uniforms[i], probs[i])


class Engine:
    """Runs every sequence on one thread: prompts first, then one batched step per token for all.

    `max_batch` sequences are stepped at once; up to `max_waiting` more wait for a place, beyond that
    `submit` raises QueueFull. Events reach each sequence's `emit` on the engine thread, so `emit` must be
    quick and thread-safe (the server hands them to its event loop). A step that fails ends the sequences
    in it with Failed and the engine goes on.
    """

    def __init__(self, model, tokenizer, max_batch: int = 64, max_waiting: int = 64):
        if max_batch < 1 or max_waiting < 0:
            raise ConfigError(f"need max_batch >= 1 and max_waiting >= 0, got {max_batch} and {max_waiting}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._token_texts = [tokenizer.decode(np.array([i])) for i in range(tokenizer.vocab_size)]
        self._waiting: deque[Sequence] = deque()
        self._reading: list[Sequence] = []
        self._active: list[Sequence] = []
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the engine thread and wait for one warm-up step (it compiles the sampler, packs the weights)."""
        self._thread = threading.Thread(target=self._run, name="charlm-engine", daemon=True)
        self._thread.start()
        ended: Future = Future()
        warm = Sequence(np.zeros(1, np.int32), 0, Sampling(max_tokens=1, temperature=0.0),
                        lambda event: isinstance(event, (Finished, Failed)) and ended.set_result(event))
        self.submit([warm])
        if isinstance(ended.result(), Failed):
            raise CharlmError(f"the model could not generate: {ended.result().message}")

    def stop(self) -> None:
        """Let the thread finish its turn and end; sequences still in flight are failed."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue all of `sequences` (the choices of one request), or none of them: QueueFull."""
        with self._wake:
            held = len(self._waiting) + len(self._reading) + len(self._active)
            if held + len(sequences) > self.max_batch + self.max_waiting:
                raise QueueFull(f"the server is busy: {held} sequences in flight or waiting; retry shortly")
            self._waiting.extend(sequences)
            self._wake.notify()

    def call(self, function: Callable[[], object]) -> Future:
        """Run function() on the engine thread between two steps (it may use the model); its Future."""
        future: Future = Future()
        with self._wake:
            self._calls.append((function, future))
            self._wake.notify()
        return future

    def _run(self) -> None:
        # The server never changes the weights: pack them once per batch size. BLAS runs on the calling thread
        # throughout (the model splits its products across its own threads).
        with self.model.frozen_weights(), single_threaded_blas():
            while True:
                with self._wake:
                    while not (self._stopping or self._calls or self._waiting or self._reading or self._active):
                        self._wake.wait()
                    if self._stopping:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                    room = self.max_batch - len(self._active) - len(self._reading)
                    for _ in range(min(room, len(self._waiting))):
                        self._admit(self._waiting.popleft())  # under the lock, so `submit` counts it
                for function, future in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(function())
                        except BaseException as exc:  # the caller gets it; the engine goes on
                            future.set_exception(exc)
                self._read_prompts()
                self._step()
        with self._wake:
            left = list(self._waiting) + self._reading + self._active
        for sequence in left:
            self._fail(sequence, "the server is shutting down")

    def _admit(self, sequence: Sequence) -> None:
        """A short prompt joins the batch at once; a long one is read in windows first."""
        if sequence.cancelled:
            return
        if len(sequence.prompt_ids) - 1 > PROMPT_TOKENS_IN_BATCH:
            self._reading.append(sequence)
            return
        try:
            self._join(sequence)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the others
            self._fail(sequence, f"starting the request failed: {exc}")

    def _read_prompts(self) -> None:
        """Advance the long prompts of newly admitted sequences, PROMPT_TOKENS_PER_TURN tokens in all (at least
        one window); a sequence whose prompt is read joins the batch."""
        budget = PROMPT_TOKENS_PER_TURN
        for sequence in list(self._reading):
            if budget <= 0:
                break
            if sequence.cancelled:
                self._reading.remove(sequence)
                continue
            try:
                budget -= self._read_window(sequence)
                if sequence.reading:
                    continue
                self._reading.remove(sequence)
                self._join(sequence)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the others
                self._reading.remove(sequence)
                self._fail(sequence, f"reading the prompt failed: {exc}")

    def _read_window(self, sequence: Sequence) -> int:
        """Run the next window of prompt_ids[:-1] (the last prompt token is fed by the first step)."""
        ids = sequence.prompt_ids
        start, stop = sequence.prompt_read, min(sequence.prompt_read + PROMPT_WINDOW, len(ids) - 1)
        if stop <= start:
            return 0
        logits, sequence.prompt_state = self.model.logits(np.ascontiguousarray(ids[start:stop, None]),
                                                          sequence.prompt_state)
        for row in range(stop - start):
            self._score_prompt_token(sequence, logits[row, 0])
        return stop - start

    def _score_prompt_token(self, sequence: Sequence, logits_row: np.ndarray) -> None:
        """The prompt's next token has been fed and logits_row predicts the one after it: keep its score if
        echo logprobs were asked for and it is one of the prompt's own (not the line start)."""
        sequence.prompt_read += 1
        target = sequence.prompt_read
        sampling = sequence.sampling
        if sampling.echo and sampling.logprobs is not None and target >= len(sequence.prompt_ids) - sequence.echo_count:
            sequence.prompt_scores.append(
                self._token_info(logits_row, int(sequence.prompt_ids[target]), sampling.logprobs, ""))

    def _join(self, sequence: Sequence) -> None:
        """Give the sequence its state (zeros, or where its long prompt's windows left it) and a place in the
        batch, its next input the first prompt token not yet fed."""
        config = self.model.config
        if sequence.prompt_state is None:
            sequence.h = np.zeros((config.num_layers, config.hidden_size), self.model.params["embedding"].dtype)
            sequence.c = np.zeros_like(sequence.h)
        else:
            sequence.h = np.ascontiguousarray(sequence.prompt_state[0][:, 0])
            sequence.c = np.ascontiguousarray(sequence.prompt_state[1][:, 0])
        sequence.prompt_state = None
        sequence.token = int(sequence.prompt_ids[sequence.prompt_read])
        sequence.rng = np.random.default_rng(sequence.sampling.seed)
        self._active.append(sequence)
        if not sequence.reading:
            self._prompt_read(sequence)

    def _prompt_read(self, sequence: Sequence) -> None:
        """All prompt tokens but the last are fed: echo the prompt if asked; end here for max_tokens 0."""
        sequence.decoder = self.tokenizer.decoder_stream()
        context = len(sequence.prompt_ids) - sequence.echo_count
        for token in sequence.prompt_ids[:context]:
            sequence.decoder.step(int(token))  # primes a word tokenizer's separator, as generation does
        if sequence.sampling.echo and sequence.echo_count:
            self._echo(sequence, context)
        if sequence.sampling.max_tokens == 0:
            self._finish(sequence, "length")

    def _echo(self, sequence: Sequence, context: int) -> None:
        texts = [sequence.decoder.step(int(token)) for token in sequence.prompt_ids[context:]]
        tokens = ()
        if sequence.sampling.logprobs is not None:
            scores = sequence.prompt_scores
            unscored = [TokenInfo(texts[0], None, {})] if len(scores) < len(texts) else []
            tokens = tuple(unscored + [TokenInfo(text, info.logprob, info.top)
                                       for text, info in zip(texts[len(unscored):], scores)])
        sequence.prompt_scores = []
        self._send(sequence, Piece("".join(texts), tokens))

    def _token_info(self, logits_row: np.ndarray, token: int, top: int, text: str) -> TokenInfo:
        """The chosen token's log-probability and the `top` likeliest tokens', from one row of logits."""
        z = logits_row.astype(np.float64)
        z -= z.max()
        z -= math.log(np.exp(z).sum())
        alternatives = {}
        if top:
            best = np.argpartition(-z, top - 1)[:top]
            for index in best[np.argsort(-z[best])]:
                alternatives[self._token_texts[index]] = float(z[index])
        return TokenInfo(text, float(z[token]), alternatives)

    def _step(self) -> None:
        """One token for every active sequence, as a single batched model step."""
        self._active = [s for s in self._active if not (s.cancelled or s.done)]
        active = self._active
        if not active:
            return
        count = len(active)
        rows = min(1 << (count - 1).bit_length(), self.max_batch)  # few batch sizes: one workspace each
        rows = max(rows, count)
        try:
            logits, tokens = self._batched_step(active, rows)
        except Exception as exc:  # noqa: BLE001 - fail this batch's sequences, keep serving
            for sequence in active:
                self._fail(sequence, f"generation failed: {exc}")
            self._active = []
            return
        for index, sequence in enumerate(active):
            try:
                if sequence.reading:
                    self._score_prompt_token(sequence, logits[index])
                    sequence.token = int(sequence.prompt_ids[sequence.prompt_read])
                    if not sequence.reading:
                        self._prompt_read(sequence)
                else:
                    self._advance(sequence, int(tokens[index]), logits[index])
            except Exception as exc:  # noqa: BLE001
                self._fail(sequence, f"generation failed: {exc}")

    def _batched_step(self, active: list[Sequence], rows: int):
        """Logits (count, V) of one step of all active sequences, and a sampled token for each row that is
        not reading its prompt (-1 for those: they draw no random number)."""
        count = len(active)
        config = self.model.config
        h = np.zeros((config.num_layers, rows, config.hidden_size), active[0].h.dtype)
        c = np.zeros_like(h)
        ids = np.zeros((1, rows), np.intp)
        for index, sequence in enumerate(active):
            h[:, index], c[:, index] = sequence.h, sequence.c
            ids[0, index] = sequence.token
        logits, (h, c) = self.model.logits(ids, (h, c))
        logits = logits[0, :count]
        for index, sequence in enumerate(active):
            sequence.h, sequence.c = h[:, index].copy(), c[:, index].copy()
        tokens = np.full(count, -1, np.int64)
        sampling = [index for index, sequence in enumerate(active) if not sequence.reading]
        if sampling:
            settings = [active[index].sampling for index in sampling]
            temperatures = np.array([s.temperature for s in settings], np.float64)
            top_ks = np.array([s.top_k for s in settings], np.int64)
            top_ps = np.array([s.top_p for s in settings], np.float64)
            uniforms = np.array([active[index].rng.random() for index in sampling], np.float64)
            rows_logits = np.ascontiguousarray(logits[sampling])
            probs = np.empty(rows_logits.shape, np.float64)
            drawn = np.empty(len(sampling), np.int64)
            parallel_chunks(len(sampling), lambda lo, hi: _sample_rows(rows_logits, temperatures, top_ks, top_ps,
                                                                       uniforms, probs, drawn, lo, hi))
            tokens[sampling] = drawn
        return logits, tokens

    def _advance(self, sequence: Sequence, token: int, logits_row: np.ndarray) -> None:
        """Take the sampled token: stream its text (holding back what may begin a stop string), end if due."""
        sampling = sequence.sampling
        sequence.token = token
        sequence.generated += 1
        text = sequence.decoder.step(token)
        info = ()
        if sampling.logprobs is not None:
            info = (self._token_info(logits_row, token, sampling.logprobs, text),)
        last = sequence.generated >= sampling.max_tokens
        if last:
            text += sequence.decoder.finish()
        sequence.held += text
        cut = _first_stop(sequence.held, sampling.stop)
        if cut is not None:
            self._send(sequence, Piece(sequence.held[:cut], info))
            self._finish(sequence, "stop")
            return
        keep = 0 if last else _stop_prefix_length(sequence.held, sampling.stop)
        ready, sequence.held = sequence.held[:len(sequence.held) - keep], sequence.held[len(sequence.held) - keep:]
        if ready or info:
            self._send(sequence, Piece(ready, info))
        if last:
            self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str) -> None:
        sequence.done = True
        self._send(sequence, Finished(reason, sequence.echo_count, sequence.generated))

    def _fail(self, sequence: Sequence, message: str) -> None:
        sequence.done = True
        try:
            sequence.emit(Failed(message))
        except Exception:  # noqa: BLE001 - a consumer that cannot take its failure is gone anyway
            pass

    def _send(self, sequence: Sequence, event: Event) -> None:
        try:
            sequence.emit(event)
        except Exception:  # noqa: BLE001 - a consumer that fails is treated as gone
            sequence.cancelled = True


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string begins in text, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text that begins some stop string (it must not be sent yet)."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
