"""`charlm serve` through the official OpenAI client and raw HTTP: completions, streaming, logprobs, echo
scoring against `charlm eval`, bad requests, the bounded queue, disconnects, SIGTERM; the engine's isolation
of a failed step."""

import math
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers import ServerProcess  # noqa: E402

from charlm.checkpoint import load_model  # noqa: E402
from charlm.engine import Engine, Failed, Finished, Piece, Sampling, Sequence  # noqa: E402
from charlm.evaluate import evaluate  # noqa: E402
from charlm.sample import context_ids, generate_text  # noqa: E402


@pytest.fixture(scope="module")
def server(serve_checkpoint):
    process = ServerProcess(serve_checkpoint)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def library(serve_checkpoint):
    model, tokenizer, _ = load_model(serve_checkpoint)
    return model, tokenizer


def test_models_lists_the_checkpoint(client):
    assert [m.id for m in client.models.list().data] == ["love"]


def test_greedy_completion_is_the_library_s_generation(client, library):
    model, tokenizer = library
    reply = client.completions.create(model="love", prompt="I love", max_tokens=40, temperature=0)
    expected = "".join(generate_text(model, tokenizer, "I love", length=40, temperature=0))[len("I love"):]
    choice = reply.choices[0]
    assert choice.text == expected and choice.finish_reason == "length" and choice.index == 0
    assert reply.object == "text_completion" and reply.model == "love" and reply.id.startswith("cmpl-")
    assert reply.usage.prompt_tokens == 6 and reply.usage.completion_tokens == 40
    assert reply.usage.total_tokens == 46


def test_seeded_sampling_repeats_and_choices_differ(client):
    first = client.completions.create(model="love", prompt=["I love", "I like"], max_tokens=30, n=2, seed=7)
    again = client.completions.create(model="love", prompt=["I love", "I like"], max_tokens=30, n=2, seed=7)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert first.usage.prompt_tokens == 12 and first.usage.completion_tokens == 120


def test_stream_sends_the_same_text_piece_by_piece(client):
    whole = client.completions.create(model="love", prompt="I love", max_tokens=50, seed=3)
    chunks = list(client.completions.create(model="love", prompt="I love", max_tokens=50, seed=3, stream=True))
    pieces = [c.choices[0].text for c in chunks]
    assert len([p for p in pieces if p]) > 10  # arrives as it is sampled, not in one piece
    assert "".join(pieces) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stop_string_ends_the_text_before_it(client):
    reply = client.completions.create(model="love", prompt="I love", max_tokens=200, temperature=0, stop=["\n"])
    assert reply.choices[0].finish_reason == "stop"
    assert "\n" not in reply.choices[0].text and reply.choices[0].text.endswith(".")


def test_logprobs_report_the_chosen_and_likeliest_tokens(client):
    reply = client.completions.create(model="love", prompt="I love", max_tokens=25, temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == list(np.cumsum([0] + [len(t) for t in logprobs.tokens[:-1]]))
    for token, chosen, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and chosen == max(top.values()) == top[token]  # greedy picks the likeliest
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-9


def test_echo_scores_a_text_as_charlm_eval_does(client, library):
    """max_tokens 0 with echo scores the prompt. A prompt is read after the line start, like `charlm generate`
    reads it, so every token of it is predicted; one that starts with a newline is read as it is, and then its
    first token has no context (null), exactly as `charlm eval --batch-size 1` skips a text's first token."""
    model, tokenizer = library
    text = "\nI love machine learning.\nI like deep water.\nI love deep learning."
    reply = client.completions.create(model="love", prompt=text, max_tokens=0, echo=True, logprobs=0)
    logprobs = reply.choices[0].logprobs
    assert reply.choices[0].text == text and "".join(logprobs.tokens) == text
    assert logprobs.token_logprobs[0] is None
    expected = evaluate(model, tokenizer, text, batch_size=1)
    assert -np.mean(logprobs.token_logprobs[1:]) == pytest.approx(expected.loss, abs=1e-6)

    plain = text.lstrip("\n")
    reply = client.completions.create(model="love", prompt=plain, max_tokens=0, echo=True, logprobs=0)
    scores = reply.choices[0].logprobs.token_logprobs
    assert len(scores) == len(plain) and None not in scores
    line_start = tokenizer.decode(context_ids(tokenizer, plain)[:1])
    expected = evaluate(model, tokenizer, line_start + plain, batch_size=1)
    assert -np.sum(scores) == pytest.approx(expected.loss * expected.tokens, abs=1e-6 * expected.tokens)


def test_echo_scores_a_short_prompt_read_inside_the_batch_the_same_way(client, library):
    """Short prompts are fed one token a step inside the batched steps, long ones in windows of their own."""
    from charlm.engine import PROMPT_TOKENS_IN_BATCH

    model, tokenizer = library
    text = "\nI like deep water."
    assert len(text) <= PROMPT_TOKENS_IN_BATCH
    reply = client.completions.create(model="love", prompt=text, max_tokens=0, echo=True, logprobs=1)
    scores = reply.choices[0].logprobs.token_logprobs
    assert scores[0] is None and len(scores) == len(text)
    expected = evaluate(model, tokenizer, text, batch_size=1)
    assert -np.mean(scores[1:]) == pytest.approx(expected.loss, abs=1e-6)


def test_echo_with_generation_returns_prompt_then_continuation(client):
    reply = client.completions.create(model="love", prompt="I love", max_tokens=10, temperature=0, echo=True)
    plain = client.completions.create(model="love", prompt="I love", max_tokens=10, temperature=0)
    assert reply.choices[0].text == "I love" + plain.choices[0].text


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": []}', "prompt"),
    (b'{"prompt": "I love", "max_tokens": -1}', "max_tokens"),
    (b'{"prompt": "I love", "max_tokens": 100000}', "max_tokens"),
    (b'{"prompt": "I love", "max_tokens": "10"}', "max_tokens"),
    (b'{"prompt": "I love", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "I love", "top_p": 0}', "top_p"),
    (b'{"prompt": "I love", "n": 0}', "n"),
    (b'{"prompt": "I love", "stream": "yes"}', "stream"),
    (b'{"prompt": "I love", "stop": 3}', "stop"),
    (b'{"prompt": "I love", "logprobs": 99}', "logprobs"),
    (b'{"prompt": "I love", "seed": -1}', "seed"),
    (b'{"prompt": "I love", "presence_penalty": 1.0}', "presence_penalty"),
    (b'{"prompt": "I love", "colour": "blue"}', "colour"),
    ('{"prompt": "I love \u0416"}'.encode(), "prompt"),
    (('{"prompt": "' + "I love " * 20000 + '"}').encode(), "prompt"),
])
def test_bad_requests_get_400_in_openai_s_shape(server, body, param):
    response = httpx.post(server.url + "/v1/completions", content=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_more_choices_than_the_server_holds_is_a_bad_request(server):
    body = {"prompt": ["I love"] * 16, "n": 16, "max_tokens": 1}  # 256 completions, the server holds 128
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_the_client_sees_errors_as_its_own_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="love", prompt="I love", max_tokens=-5)
    with pytest.raises(openai.NotFoundError, match="completion model"):
        client.chat.completions.create(model="love", messages=[{"role": "user", "content": "hi"}])


def test_fill_the_blank_endpoint_ranks_words(server):
    response = httpx.post(server.url + "/charlm/complete", json={"text": "I love machine ___", "top": 3}, timeout=60)
    ranked = response.json()["completions"]
    assert [c["text"] for c in ranked][:2] == ["learning", "tools"] or ranked[0]["text"] in ("learning", "tools")
    assert len(ranked) == 3 and ranked[0]["prob"] >= ranked[1]["prob"] >= ranked[2]["prob"] > 0
    bad = httpx.post(server.url + "/charlm/complete", json={"text": "no blank here"}, timeout=30)
    assert bad.status_code == 400 and "blank" in bad.json()["error"]["message"]


def test_page_is_served(server):
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "love" in page.text and "/v1/completions" in page.text and "/charlm/complete" in page.text


def test_full_queue_says_429_and_a_disconnect_frees_the_place(serve_checkpoint):
    """One place in the batch, none waiting: a second request is told to retry until the first client goes
    away, which must stop its generation (else the place would stay taken for 4096 tokens)."""
    small = ServerProcess(serve_checkpoint, "--max-batch", "1", "--max-waiting", "0")
    try:
        body = {"prompt": "I love", "max_tokens": 4096, "stream": True}
        with httpx.stream("POST", small.url + "/v1/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            refused = httpx.post(small.url + "/v1/completions", json={"prompt": "I love"}, timeout=30)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
        deadline = time.monotonic() + 10
        while True:  # the engine drops the sequence before its next step
            reply = httpx.post(small.url + "/v1/completions", json={"prompt": "I love", "max_tokens": 5}, timeout=30)
            if reply.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5
    finally:
        small.stop()


def test_sigterm_finishes_requests_in_flight_then_exits(serve_checkpoint):
    own = ServerProcess(serve_checkpoint)
    try:
        body = {"prompt": "I love", "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", own.url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            own.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        assert len([first] + rest) >= 100  # no piece was cut off by the shutdown
        # uvicorn ends by re-raising the signal it drained for, so the exit status says what stopped it.
        assert own.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Finished server process" in own.output()
    finally:
        own.stop()


class _FailingOnce:
    """A model whose next batched step raises, as a bug or an exhausted resource would."""

    def __init__(self, model):
        self._model = model
        self.fail = False

    def __getattr__(self, name):
        return getattr(self._model, name)

    def logits(self, ids, state=None):
        if self.fail and ids.shape[0] == 1 and ids.shape[1] > 0:
            self.fail = False
            raise MemoryError("no room for the batch")
        return self._model.logits(ids, state)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(library):
    model, tokenizer = library
    flaky = _FailingOnce(model)
    engine = Engine(flaky, tokenizer, max_batch=4, max_waiting=0)
    engine.start()
    try:
        def run(max_tokens):
            events, ended = [], threading.Event()

            def emit(event):
                events.append(event)
                if isinstance(event, (Finished, Failed)):
                    ended.set()
            engine.submit([Sequence(context_ids(tokenizer, "I love"), 6, Sampling(max_tokens=max_tokens), emit)])
            assert ended.wait(30)
            return events

        flaky.fail = True
        failed = run(20)
        assert isinstance(failed[-1], Failed) and "no room for the batch" in failed[-1].message
        after = run(20)
        assert isinstance(after[-1], Finished) and after[-1].completion_tokens == 20
        assert sum(len(e.text) for e in after if isinstance(e, Piece)) >= 20
    finally:
        engine.stop()
