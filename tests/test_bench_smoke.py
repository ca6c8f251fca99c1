"""Smoke tests for benchmarks/bench_lstm.py: a micro config end to end, so the benchmark cannot rot."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lstm.py"
MICRO = "V65-E16-H32-L2-T16-B4"
METRICS = ("speed", "gflops", "peak_share", "peak_rss")


def load_bench():
    """Import the script as a module (benchmarks/ is not a package); dataclasses need it in sys.modules."""
    if "bench_lstm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_lstm", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_lstm"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_lstm"]


def run_bench(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "bench.json"
    args = [sys.executable, str(SCRIPT), "--configs", MICRO, "--reps", "2", "--warmup", "1",
            "--gen-tokens", "10", "--threads", "1", "--bandwidth-mib", "16", "--json", str(out), *extra]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    environment = payload["environment"]
    assert environment["isa"] in ("avx512", "avx2", "avx", "sse", "neon", "generic")
    assert environment["cpu_model"] and environment["bandwidth_gbs"] > 0
    assert f"charlm ISA: {environment['isa']}" in result.stdout and "memory read bandwidth" in result.stdout
    return result, payload["records"]


def test_flops_per_token_counts_the_nominal_dense_model():
    char_256 = load_bench().NAMED_CONFIGS["char-256"]
    layer0 = 4 * 256 * (64 + 256)
    layer1 = 4 * 256 * (256 + 256)
    forward = 2 * (layer0 + layer1) + 2 * 256 * 65
    assert char_256.forward_flops_per_token() == forward == 1_737_216
    assert char_256.flops_per_token("train") == 3 * forward
    assert char_256.flops_per_token("eval") == char_256.flops_per_token("generate") == forward


def test_parse_config_accepts_names_and_shapes_and_rejects_the_rest():
    bench = load_bench()
    assert bench.parse_config("bpe-512").vocab_size == 8000
    micro = bench.parse_config(MICRO)
    assert (micro.vocab_size, micro.embed_dim, micro.hidden_size, micro.num_layers, micro.seq_len,
            micro.batch_size) == (65, 16, 32, 2, 16, 4)
    with pytest.raises(ValueError, match="unknown config"):
        bench.parse_config("char-1024")


def test_interleaving_alternates_order_settles_and_discards_warmup(monkeypatch):
    bench = load_bench()
    calls = []

    class FakeRunner:
        def __init__(self, library, seconds):
            self.library, self.seconds = library, seconds

        def train(self):
            calls.append(self.library)
            return self.seconds.pop(0)

        @contextlib.contextmanager
        def phase(self, task):
            calls.append(f"{self.library} {task} phase")
            yield
            calls.append(f"{self.library} {task} phase ends")

    a = FakeRunner("charlm", [100.0, 1.0, 2.0, 3.0])
    b = FakeRunner("torch", [100.0, 5.0, 7.0, 9.0])
    monkeypatch.setattr(bench.time, "sleep", lambda seconds: calls.append(f"sleep {seconds}"))
    medians = bench.time_interleaved([a, b], "train", reps=3, warmup=1, settle=0.5)
    assert calls == ["charlm train phase", "torch train phase"] + [
        call for name in ("charlm", "torch", "torch", "charlm", "charlm", "torch", "torch", "charlm")
        for call in ("sleep 0.5", name)] + ["torch train phase ends", "charlm train phase ends"]
    assert medians == {"charlm": 2.0, "torch": 7.0}


def test_charlm_side_runs_on_a_micro_config(tmp_path):
    result, records = run_bench(tmp_path)
    assert {(r["task"], r["metric"]) for r in records} == {
        (task, metric) for task in ("train", "eval", "generate") for metric in METRICS
    }
    for r in records:
        assert r["config"] == MICRO
        assert r["torch"] is None and r["ratio"] is None
        assert math.isfinite(r["charlm"]) and r["charlm"] > 0
        if r["task"] == "generate":  # weights: 4 bytes x (4*32*(16+32) + 4*32*(32+32) + 65*32)
            assert r["weights_bytes"] == 4 * (4 * 32 * 48 + 4 * 32 * 64 + 65 * 32)
            assert r["exceeds_l3"] is False and 0 < r["bandwidth_share"]
        else:
            assert "weights_bytes" not in r
    assert MICRO in result.stdout and "GEMM peak" in result.stdout


def test_vs_torch_reports_ratios_where_above_one_means_charlm_wins(tmp_path):
    pytest.importorskip("torch")
    _, records = run_bench(tmp_path, "--vs-torch", "--tasks", "train,generate")
    by_metric = {(r["task"], r["metric"]): r for r in records}
    train, generate = by_metric["train", "speed"], by_metric["generate", "speed"]
    assert train["unit"] == "tokens/s" and train["ratio"] == pytest.approx(train["charlm"] / train["torch"])
    assert generate["unit"] == "ms/token"
    assert generate["ratio"] == pytest.approx(generate["torch"] / generate["charlm"])
    rss = by_metric["train", "peak_rss"]
    assert rss["ratio"] == pytest.approx(rss["torch"] / rss["charlm"])


def test_isa_restriction_re_executes_with_every_library_restricted(monkeypatch):
    bench = load_bench()
    calls = []
    monkeypatch.setattr(bench.os, "execve", lambda path, argv, env: calls.append((argv, env)))
    for name in bench.ISA_ENVIRONMENTS["avx2"]:
        monkeypatch.delenv(name, raising=False)
    bench.restrict_isa("avx2", ["--isa", "avx2", "--vs-torch"])
    [(argv, env)] = calls
    assert argv[-3:] == ["--isa", "avx2", "--vs-torch"]
    assert (env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"], env["ONEDNN_MAX_CPU_ISA"], env["ATEN_CPU_CAPABILITY"],
            env["OPENBLAS_CORETYPE"]) == ("haswell", "", "AVX2", "avx2", "Haswell")
    for name, value in env.items():
        if name in bench.ISA_ENVIRONMENTS["avx2"]:
            monkeypatch.setenv(name, value)
    bench.restrict_isa("avx2", ["--isa", "avx2"])  # restricted already: runs on
    assert len(calls) == 1


def test_unknown_task_is_a_usage_error():
    result = subprocess.run([sys.executable, str(SCRIPT), "--tasks", "train,sing"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "--tasks must be a subset" in result.stderr
