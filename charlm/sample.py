"""Text from a model: streaming generation, and the likeliest whole words to fill a blank."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from charlm.errors import ConfigError, TokenizerError

BLANK = "___"
MAX_FILLER_CHARS = 20
SPELLS_NOTHING = -2  # a token's boundary position when it can neither extend nor end a word


@dataclass(frozen=True)
class Completion:
    """A word that fills the blank and the model's probability of it (see `complete`)."""

    text: str
    prob: float


def _line_start_ids(tokenizer) -> np.ndarray:
    """The token that starts a line (a newline, or <eos> for words); none when the vocabulary lacks it."""
    try:
        ids = tokenizer.encode("\n", unknown="error")
    except TokenizerError:
        ids = np.zeros(0, dtype=np.int32)
    return ids[-1:]


def context_ids(tokenizer, text: str, unknown: str = "error") -> np.ndarray:
    """The ids of a prompt read as the start of a line, as every line was read in training: after the
    line-start token. (Without it the prompt would start from a bare zero state, which training shows the
    model only at the start of each epoch: on a corpus of short lines that can flip which word comes next.)
    An empty prompt is the line start alone, or token 0 when the vocabulary has no line start."""
    ids = tokenizer.encode(text, unknown=unknown)
    if text.startswith("\n"):
        return ids
    ids = np.concatenate([_line_start_ids(tokenizer), ids]).astype(np.int32)
    return ids if len(ids) else np.zeros(1, dtype=np.int32)


def generate_text(model, tokenizer, prompt: str, length: int = 500, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int | None = None, unknown: str = "error") -> Iterator[str]:
    """Yield the prompt as typed, then the continuation chunk by chunk as each token is sampled.

    `length` counts sampled tokens; temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off;
    the same seed gives the same text. The prompt is read as the start of a line (`context_ids`).
    The options (by the model) and the prompt are checked here, before the first chunk.
    """
    prompt_ids = context_ids(tokenizer, prompt, unknown)
    tokens = model.generate_ids(prompt_ids, length, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return _stream(tokenizer, prompt, prompt_ids, tokens)


def _stream(tokenizer, prompt: str, prompt_ids: np.ndarray, tokens: Iterator[int]) -> Iterator[str]:
    decoder = tokenizer.decoder_stream()
    for token in prompt_ids:
        decoder.step(int(token))  # primes separators and byte sequences; the prompt is echoed as typed
    if prompt:
        yield prompt
    for token in tokens:
        chunk = decoder.step(int(token))
        if chunk:
            yield chunk
    tail = decoder.finish()
    if tail:
        yield tail


def complete(model, tokenizer, text_with_blank: str, top: int = 5, beam_width: int = 16,
             unknown: str = "error") -> list[Completion]:
    """The `top` likeliest whole words for the blank "___", best first, found by beam search.

    `prob` is the model's own probability, not renormalised over the list: P(word, then a word boundary |
    text before the blank), summed over the boundary characters and tokenizations that spell the same word.
    When text follows the blank it replaces the boundary: P(word | before) * P(after | before + word).
    Whitespace ending the text before the blank is given, not predicted: P(word | "I love machine ").
    Words longer than MAX_FILLER_CHARS characters are not considered.
    """
    blanks = text_with_blank.count(BLANK)
    if blanks != 1:
        raise ConfigError(f'the text must contain exactly one blank "{BLANK}", found {blanks}')
    if top < 1 or beam_width < 1:
        raise ConfigError(f"top and beam width must be at least 1, got {top} and {beam_width}")
    before, after = text_with_blank.split(BLANK)
    suffix_ids = tokenizer.encode(after, unknown=unknown) if after else None
    search = _BlankSearch(model, tokenizer, before, suffix_ids, unknown)
    with model.frozen_weights():  # one packing of the weights per beam size, not per step
        fillers = search.run(top, beam_width)
    ranked = sorted(fillers.items(), key=lambda item: -item[1])[:top]
    return [Completion(text=word, prob=prob) for word, prob in ranked]


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char in "'\u2019"


def _first_boundary(text: str) -> int:
    """Index of the first character that ends a word (space, newline, punctuation), or -1."""
    return next((i for i, char in enumerate(text) if not _is_word_char(char)), -1)


class _BlankSearch:
    """Beam search from the text before the blank until each hypothesis has spelled a word and its boundary.

    A hypothesis is the text generated after the context: first the `lead` (whitespace ending the text
    before the blank, which BPE merges into the next word's token, so it is generated and conditioned on),
    then the filler word. Word tokenizers spell a whole word per token, so a word ends after one token.
    """

    def __init__(self, model, tokenizer, before: str, suffix_ids, unknown: str):
        self.model = model
        self.suffix_ids = suffix_ids
        self.one_token_words = tokenizer.kind == "word"
        context = before if self.one_token_words else before.rstrip()
        self.lead = before[len(context):]
        tokenizer.encode(self.lead, unknown=unknown)  # the lead is generated, not encoded: check it is spellable
        self.context_ids = context_ids(tokenizer, context, unknown)
        self.token_texts = [tokenizer.decode(np.array([i], dtype=np.int32)) for i in range(tokenizer.vocab_size)]
        cuts = np.array([_first_boundary(text) if text else SPELLS_NOTHING for text in self.token_texts])
        if tokenizer.unk_id is not None:
            cuts[tokenizer.unk_id] = SPELLS_NOTHING  # could stand for a letter or a space: neither word nor end
        self.word_only = cuts == -1
        self.boundary_first = cuts == 0
        self.word_then_boundary = cuts > 0
        self._lead_masks: dict[str, np.ndarray] = {}

    def run(self, top: int, beam_width: int) -> dict[str, float]:
        """Fillers found -> probability; stops once no open hypothesis can beat the `top`-th filler."""
        log_probs, state = self._warm_up()
        texts, logps = [""], np.zeros(1)
        fillers: dict[str, float] = defaultdict(float)
        for _ in range(len(self.lead) + MAX_FILLER_CHARS + 1):
            self._finish(texts, logps, log_probs, state, fillers)
            candidates = self._expand(texts, logps, log_probs, beam_width, fillers)
            if not candidates:
                break
            candidates.sort(key=lambda cand: -cand[0])
            candidates = candidates[:beam_width]
            if len(fillers) >= top and candidates[0][0] < math.log(sorted(fillers.values())[-top]):
                break
            logps = np.array([cand[0] for cand in candidates])
            parents = np.array([cand[1] for cand in candidates])
            tokens = np.array([cand[2] for cand in candidates], dtype=np.int32)
            texts = [cand[3] for cand in candidates]
            log_probs, state = self.model.step(tokens, _select(state, parents))
        return fillers

    def _warm_up(self):
        state = self.model.zero_state(1)
        if len(self.context_ids) > 1:
            _, state = self.model.logits(np.ascontiguousarray(self.context_ids[:-1, None]), state)
        return self.model.step(np.ascontiguousarray(self.context_ids[-1:]), state)

    def _finish(self, texts, logps, log_probs, state, fillers) -> None:
        """Add every hypothesis that has spelled a word, ended by a boundary token or by the given suffix."""
        done = [j for j, text in enumerate(texts) if len(text) > len(self.lead)]
        if not done:
            return
        rows = np.asarray(log_probs[done], dtype=np.float64)
        if self.suffix_ids is not None:
            scores = logps[done] + self._suffix_log_prob(rows, _select(state, np.array(done)))
        elif self.one_token_words:
            scores = logps[done]
        else:
            scores = logps[done] + _logsumexp(rows[:, self.boundary_first])
        for j, score in zip(done, scores):
            fillers[texts[j][len(self.lead):]] += math.exp(score)

    def _expand(self, texts, logps, log_probs, beam_width, fillers) -> list[tuple]:
        """Next-token candidates (log prob, parent, token, text) that extend a word or the lead.

        Tokens that spell the end of a word and then a boundary finish it directly; tokens that start with
        a boundary are already counted by `_finish`.
        """
        candidates = []
        for j, text in enumerate(texts):
            if self.one_token_words and text:
                continue
            row = np.asarray(log_probs[j], dtype=np.float64)
            if len(text) < len(self.lead):
                allowed = self._lead_mask(self.lead[len(text):])
                row = row - _logsumexp(row[None, allowed])[0]
            elif self.suffix_ids is not None:
                allowed = self.word_only
            else:
                allowed = self.word_only | self.word_then_boundary
            masked = np.where(allowed, row, -np.inf)
            best = np.argpartition(-masked, min(beam_width, len(masked) - 1))[:beam_width]
            for token in best[np.isfinite(masked[best])]:
                new_text = text + self.token_texts[token]
                score = logps[j] + masked[token]
                filler = new_text[len(self.lead):]
                cut = _first_boundary(filler)
                if cut == -1 and len(filler) <= MAX_FILLER_CHARS:
                    candidates.append((score, j, int(token), new_text))
                elif cut > 0 and self.suffix_ids is None:
                    fillers[filler[:cut]] += math.exp(score)
        return candidates

    def _lead_mask(self, remaining: str) -> np.ndarray:
        """Tokens whose text agrees with the rest of the lead: a prefix of it, or it and more."""
        if remaining not in self._lead_masks:
            self._lead_masks[remaining] = np.array(
                [bool(text) and (remaining.startswith(text) or text.startswith(remaining))
                 for text in self.token_texts])
        return self._lead_masks[remaining]

    def _suffix_log_prob(self, next_log_probs: np.ndarray, state) -> np.ndarray:
        """log P(suffix tokens) for each hypothesis, given its next-token distribution and state."""
        suffix = self.suffix_ids
        total = next_log_probs[:, suffix[0]].copy()
        if len(suffix) > 1:
            count = next_log_probs.shape[0]
            inputs = np.ascontiguousarray(np.repeat(suffix[:-1, None], count, axis=1))
            logits, _ = self.model.logits(inputs, state)
            logits = np.asarray(logits, dtype=np.float64)
            log_probs = logits - _logsumexp(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape[:2])[..., None]
            steps = np.arange(len(suffix) - 1)[:, None]
            total += log_probs[steps, np.arange(count)[None, :], suffix[1:, None]].sum(axis=0)
        return total


def _select(state, rows: np.ndarray):
    """The (h, c) of the chosen hypotheses, in order (batch is axis 1)."""
    h, c = state
    return np.ascontiguousarray(h[:, rows]), np.ascontiguousarray(c[:, rows])


def _logsumexp(rows: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp)) of a (n, k) array; -inf for rows with no finite entry."""
    peak = rows.max(axis=1, initial=-np.inf)
    safe_peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return safe_peak + np.log(np.exp(rows - safe_peak[:, None]).sum(axis=1))
