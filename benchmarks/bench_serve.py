"""Load benchmark of `charlm serve`: many concurrent streaming clients against batch-1 generation.

    python benchmarks/bench_serve.py                          # bpe-512 and char-512, 64 clients
    python benchmarks/bench_serve.py --configs bpe-512 --clients 64 --rounds 2 --json serve.json

For each model shape (random weights, a real tokenizer trained on Tiny Shakespeare; built with the library
into a temporary folder) it
  1. times batch-1 generation in this process (`LSTMLanguageModel.generate_ids`, what `charlm generate` runs),
  2. starts `charlm serve` on a free loopback port and lets --clients clients each stream --rounds
     completions back to back (max_tokens drawn from --tokens, so requests end at different times and new
     ones join the running batch: continuous batching), checking that every request ends with
     finish_reason "length", its full token count (usage) and [DONE];
  3. sends a burst of 3 x (max batch + waiting room) requests at once: every one must be answered 200 or
     429, none lost;
  4. checks the server still answers, stops it with SIGTERM, and times batch-1 generation again.
Reports aggregate streamed tokens/s against the median batch-1 tokens/s, and p50/p99 time to first token.
Everything is bounded: --timeout seconds per request, and the server is always stopped.

The clients run in this process, on the same cores as the server: on a 2-core machine they take a share of
the CPU the server could have used, so the aggregate is a lower bound for remote clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import charlm  # noqa: F401  (before numpy: see charlm/__init__.py)
import httpx
import numpy as np

from charlm.checkpoint import save_checkpoint
from charlm.config import ModelConfig
from charlm.corpus import resolve_corpus
from charlm.kernels.target import cpu_model
from charlm.model import init_params
from charlm.tokenize import train_tokenizer

# Shapes as in bench_lstm.py; the vocabulary comes from a tokenizer trained on the corpus.
CONFIGS = {
    "bpe-512": {"tokenizer": "bpe", "vocab_size": 8000, "embed_dim": 256, "hidden_size": 512, "num_layers": 2},
    "char-512": {"tokenizer": "char", "vocab_size": None, "embed_dim": 128, "hidden_size": 512, "num_layers": 2},
}
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING HENRY", "To be, or not", "JULIET:\nO Romeo",
           "The king", "MENENIUS:\nWhat", "Come, sir"]
MAX_BATCH = 64
MAX_WAITING = 64


def build_checkpoint(name: str, folder: Path, corpus: str) -> Path:
    """A checkpoint of the named shape with random weights and a tokenizer trained on `corpus`."""
    shape = CONFIGS[name]
    text = resolve_corpus(corpus).train
    tokenizer = train_tokenizer(shape["tokenizer"], text, shape["vocab_size"])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embed_dim=shape["embed_dim"],
                         hidden_size=shape["hidden_size"], num_layers=shape["num_layers"], dropout=0.0)
    return save_checkpoint(folder / name, model_config=config, params=init_params(config, seed=0),
                           tokenizer_json=tokenizer.to_json(), trainer_state={"step": 0})


def batch1_tokens_per_second(checkpoint: Path, tokens: int, reps: int) -> list[float]:
    """Batch-1 generation speed, as `charlm generate` runs it (prompt reading and first token not timed)."""
    from charlm.checkpoint import load_model
    from charlm.sample import context_ids

    model, tokenizer, _ = load_model(checkpoint)
    prompt = context_ids(tokenizer, PROMPTS[0])
    rates = []
    for rep in range(reps + 1):  # the first compiles and warms up
        stream = model.generate_ids(prompt, tokens + 1, seed=rep)
        next(stream)
        start = time.perf_counter()
        count = sum(1 for _ in stream)
        if rep:
            rates.append(count / (time.perf_counter() - start))
    return rates


def start_server(checkpoint: Path, port: int, log, threads: int | None) -> subprocess.Popen:
    flags = [] if threads is None else ["--threads", str(threads)]
    process = subprocess.Popen([sys.executable, "-m", "charlm", "serve", str(checkpoint), "--port", str(port),
                                "--max-batch", str(MAX_BATCH), "--max-waiting", str(MAX_WAITING), *flags],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited at start; see its log")
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).raise_for_status()
            return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 120 s")


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> dict:
    """One streamed completion: status, time to first text, tokens (from usage) and whether it ended whole.
    Reads raw bytes and parses only the last events, so the clients take little of the CPU the server uses."""
    sent = time.perf_counter()
    first = None
    tail = b""
    async with client.stream("POST", url, json=body, timeout=timeout) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code}
        async for data in response.aiter_bytes():
            if first is None and b'"text": "' in data.replace(b'"text": ""', b""):
                first = time.perf_counter() - sent
            tail = (tail + data)[-4096:]
    events = [json.loads(event[6:]) for event in tail.decode("utf-8", "replace").split("\n\n")
              if event.startswith("data: {")]
    usage = next((e["usage"] for e in reversed(events) if e.get("usage")), None)
    finish = next((c["finish_reason"] for e in reversed(events) for c in e["choices"] if c["finish_reason"]), None)
    whole = (tail.endswith(b"data: [DONE]\n\n") and finish == "length" and usage is not None
             and usage["completion_tokens"] == body["max_tokens"])
    return {"status": 200, "ttft": first, "tokens": usage["completion_tokens"] if usage else 0, "whole": whole}


async def load_phase(port: int, clients: int, rounds: int, token_range: tuple[int, int], timeout: float) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    rng = np.random.default_rng(0)
    plans = [[{"prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": int(rng.integers(*token_range, endpoint=True)),
               "temperature": 0.8, "seed": c * 1000 + r, "stream": True, "stream_options": {"include_usage": True}}
              for r in range(rounds)] for c in range(clients)]
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(limits=limits) as client:
        async def one_client(plan):
            return [await stream_one(client, url, body, timeout) for body in plan]

        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(plan) for plan in plans), return_exceptions=True)
        seconds = time.perf_counter() - start
    flat, errors = [], []
    for result in results:
        if isinstance(result, BaseException):
            errors.append(repr(result))
        else:
            flat.extend(result)
    ok = [r for r in flat if r["status"] == 200]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    return {
        "requests": clients * rounds, "answered_200": len(ok), "answered_429": sum(r["status"] == 429 for r in flat),
        "other_status": sorted({r["status"] for r in flat} - {200, 429}), "client_errors": errors[:3],
        "lost": clients * rounds - len(flat), "cut_short": sum(not r["whole"] for r in ok),
        "tokens": sum(r["tokens"] for r in ok), "seconds": seconds,
        "tokens_per_second": sum(r["tokens"] for r in ok) / seconds,
        "ttft_p50": float(np.percentile(ttfts, 50)) if ttfts else None,
        "ttft_p99": float(np.percentile(ttfts, 99)) if ttfts else None,
    }


async def burst_phase(port: int, count: int, timeout: float) -> dict:
    """`count` requests at once, more than the server holds: each must get 200 (whole) or 429."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits) as client:
        bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 50, "stream": True, "seed": i,
                   "stream_options": {"include_usage": True}} for i in range(count)]
        results = await asyncio.gather(*(stream_one(client, url, body, timeout) for body in bodies),
                                       return_exceptions=True)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    return {"requests": count, "answered_200": sum(r["status"] == 200 for r in answered),
            "answered_429": sum(r["status"] == 429 for r in answered),
            "other_status": sorted({r["status"] for r in answered} - {200, 429}),
            "cut_short": sum(r["status"] == 200 and not r["whole"] for r in answered),
            "lost": len(errors), "client_errors": errors[:3]}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config(name: str, args, folder: Path) -> dict:
    checkpoint = build_checkpoint(name, folder, args.corpus)
    before = batch1_tokens_per_second(checkpoint, args.batch1_tokens, args.batch1_reps)
    port = free_port()
    with open(folder / f"{name}-server.log", "w") as log:
        server = start_server(checkpoint, port, log, args.server_threads)
        try:
            load = asyncio.run(load_phase(port, args.clients, args.rounds, tuple(args.tokens), args.timeout))
            burst = asyncio.run(burst_phase(port, 3 * (MAX_BATCH + MAX_WAITING), args.timeout))
            alive = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                exit_status = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                exit_status = "killed after 60 s"
    after = batch1_tokens_per_second(checkpoint, args.batch1_tokens, args.batch1_reps)
    batch1 = statistics.median(before + after)
    return {"config": name, "batch1_tokens_per_second": batch1, "batch1_runs": before + after, "load": load,
            "burst": burst, "alive_after": alive, "server_exit": exit_status,
            "speedup": load["tokens_per_second"] / batch1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--corpus", default="tinyshakespeare", help="Corpus the tokenizers are trained on.")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="Completions each client streams back to back.")
    parser.add_argument("--tokens", type=int, nargs=2, default=(100, 300), metavar=("MIN", "MAX"),
                        help="max_tokens of each request, drawn uniformly.")
    parser.add_argument("--batch1-tokens", type=int, default=1000)
    parser.add_argument("--batch1-reps", type=int, default=3, help="Batch-1 runs before and after the load.")
    parser.add_argument("--server-threads", type=int, help="`charlm serve --threads` [default: its own].")
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds allowed per request.")
    parser.add_argument("--json", help="Also write the results here.")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            result = run_config(name, args, Path(tmp))
            results.append(result)
            load, burst = result["load"], result["burst"]
            print(f"{name}: {args.clients} clients x {args.rounds} streamed completions: "
                  f"{load['answered_200']} answered, {load['answered_429']} told 429, {load['lost']} lost, "
                  f"{load['cut_short']} cut short; {load['tokens']} tokens in {load['seconds']:.1f} s")
            print(f"  aggregate {load['tokens_per_second']:.0f} tokens/s vs batch-1 "
                  f"{result['batch1_tokens_per_second']:.0f} tokens/s (median of "
                  f"{', '.join(f'{r:.0f}' for r in result['batch1_runs'])}): {result['speedup']:.2f}x")
            print(f"  time to first token p50 {load['ttft_p50']:.3f} s, p99 {load['ttft_p99']:.3f} s")
            print(f"  burst of {burst['requests']}: {burst['answered_200']} answered, {burst['answered_429']} "
                  f"told 429, other {burst['other_status']}, {burst['lost']} lost, {burst['cut_short']} cut short; "
                  f"server alive after: {result['alive_after']}, exit status after SIGTERM: {result['server_exit']}")
    doc = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "results": results}
    print(f"CPU: {doc['cpu']}, {doc['cores']} cores")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
