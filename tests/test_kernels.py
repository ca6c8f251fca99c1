"""Kernels against numpy formulas, the batch-1 generation kernel against model.step, and the BLAS kernels
chosen at import."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import charlm.model
import charlm.runtime
from charlm.kernels import dropout, gemm, generate, lstm
from charlm.optim import adamw_update, sum_of_squares
from charlm.config import ModelConfig
from charlm.errors import ConfigError
from charlm.model import LSTMLanguageModel


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_update_matches_formula(dtype):
    # 40,000 + 30,000 elements: the two threads' halves split the first parameter, not at its end.
    rng = np.random.default_rng(0)
    lr, b1, b2, eps, step = 0.01, 0.9, 0.99, 1e-8, 3
    groups, expected = [], []
    for shape, wd in (((200, 200), 0.1), ((30_000,), 0.0)):
        param, m, grad = (rng.normal(size=shape).astype(dtype) for _ in range(3))
        v = rng.random(shape).astype(dtype)
        expected_m = b1 * m + (1 - b1) * grad
        expected_v = b2 * v + (1 - b2) * grad**2
        m_hat = expected_m / (1 - b1**step)
        v_hat = expected_v / (1 - b2**step)
        expected.append((param * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps), expected_m, expected_v))
        groups.append((param, grad, m, v, wd))
    adamw_update(groups, lr, b1, b2, eps, step)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12  # relative, and absolute where terms cancel
    for (param, _, m, v, _), (expected_param, expected_m, expected_v) in zip(groups, expected):
        for actual, wanted in ((m, expected_m), (v, expected_v), (param, expected_param)):
            np.testing.assert_allclose(actual, wanted, rtol=tolerance, atol=tolerance)
    param, grad, m, v, wd = groups[0]
    with pytest.raises(ValueError):
        adamw_update([(param.T, grad.T, m.T, v.T, wd)], lr, b1, b2, eps, step)


def test_sum_of_squares_accumulates_in_float64():
    grad = np.full((1000, 1000), 0.1, np.float32)
    assert sum_of_squares([grad]) == pytest.approx(1e6 * float(np.float32(0.1)) ** 2, rel=1e-12)
    pieces = [np.arange(n, dtype=np.float32) for n in (50_000, 3, 40_000)]
    expected = sum(float(np.sum(p.astype(np.float64) ** 2)) for p in pieces)
    assert sum_of_squares(pieces) == pytest.approx(expected, rel=1e-12)


def softmax_xent_reference(logits, bias, targets):
    """Summed cross-entropy and its gradient (scaled by 1/N), in float64."""
    z = logits.astype(np.float64) + bias
    log_probs = z - z.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    rows = np.arange(len(targets))
    grad = np.exp(log_probs)
    grad[rows, targets] -= 1
    return -log_probs[rows, targets].sum(), grad / len(targets)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_softmax_xent_matches_numpy_and_is_stable(dtype, scale):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(6, 300)) * scale).astype(dtype)
    logits[1] = -abs(scale) * 10  # a row far below zero must not underflow to log(0)
    bias = rng.normal(size=300).astype(dtype)
    targets = np.array([2, 0, 299, 3, 3, 5])
    expected_loss, expected_grad = softmax_xent_reference(logits, bias, targets)
    # At |logits| ~ 1e4 a float32 ulp is 1e-3: only stability, not digits, can be asked for there.
    rel = 1e-5 if scale < 100 or dtype == np.float64 else 1e-3
    assert lstm.softmax_xent_forward(logits, bias, targets) == pytest.approx(expected_loss, rel=rel)
    total = lstm.softmax_xent_forward_backward(logits, bias, targets, 1.0 / 6)
    assert np.isfinite(total) and total == pytest.approx(expected_loss, rel=rel)
    np.testing.assert_allclose(logits, expected_grad, atol=1e-6 if scale < 100 else 1e-3)
    np.testing.assert_allclose(logits.sum(axis=1), 0.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n_out", "n_in", "lo", "hi"), [
    (64, 7, 0, 16),    # whole tiles only
    (64, 33, 3, 20),   # two tiles and a leftover row, starting mid-array
    (96, 5, 1, 6),     # fewer rows than a tile
    (100, 20, 0, 17),  # no whole panels: dot products throughout
])
def test_row_products_match_numpy(dtype, n_out, n_in, lo, hi):
    rng = np.random.default_rng(n_out + n_in)
    w = rng.standard_normal((n_out, n_in)).astype(dtype)
    x = rng.standard_normal((hi + 2, n_in)).astype(dtype)
    out = rng.standard_normal((hi + 2, n_out)).astype(dtype)
    expected = out.copy()
    expected[lo:hi] += x[lo:hi] @ w.T
    tile = gemm.default_tile()
    width = gemm.panel_width(dtype, tile)
    panels = np.zeros((n_out // width if gemm.panels_apply(n_out, dtype, len(x), tile) else 0, n_in, width), dtype)
    gemm.pack_panels(w, panels)
    unread = np.full_like(w, np.nan)  # with panels, w itself is never read
    gemm.add_row_products(x, w if panels.shape[0] == 0 else unread, panels, out, lo, hi, tile)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)


def test_panels_packed_from_a_transposed_view_equal_those_of_a_contiguous_copy():
    w = np.random.default_rng(3).standard_normal((128, 64)).astype(np.float32)
    width = gemm.panel_width(np.float32, gemm.default_tile())
    from_view, from_copy = (np.zeros((64 // width, 128, width), np.float32) for _ in range(2))
    gemm.pack_panels(w.T, from_view)
    gemm.pack_panels(np.ascontiguousarray(w.T), from_copy)
    np.testing.assert_array_equal(from_view, from_copy)
    np.testing.assert_array_equal(from_view[1, :, 3], w[:, width + 3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_window_projection_matches_numpy_across_row_blocks(dtype):
    # 150 rows from row 5: two whole blocks of rows, a partial one, and leftover rows after the last tile.
    rng = np.random.default_rng(11)
    n_rows, n_out, n_in, lo, hi = 160, 64, 24, 5, 155
    w = rng.standard_normal((n_out, n_in)).astype(dtype)
    x = rng.standard_normal((n_rows, n_in)).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype)
    out = rng.standard_normal((n_rows, n_out)).astype(dtype)
    expected = out.copy()
    expected[lo:hi] = x[lo:hi] @ w.T + bias
    tile = gemm.default_tile()
    width = gemm.panel_width(dtype, tile)
    panels = np.zeros((n_out // width, n_in, width), dtype)
    gemm.pack_panels(w, panels)
    gemm.project_rows(x, w, panels, bias, out, lo, hi, 2 * tile.rows, tile)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_one_blocks_match_numpy(dtype):
    # Two whole blocks of packed rows, then a shorter last block that falls back to dot products.
    rng = np.random.default_rng(12)
    tile = gemm.default_tile()
    block = tile.vector_panels * gemm.panel_width(dtype, tile)
    n_out, n_in = 2 * block + 5, 19
    w = rng.standard_normal((n_out, n_in)).astype(dtype)
    x = rng.standard_normal((1, n_in)).astype(dtype)
    out = rng.standard_normal((1, n_out)).astype(dtype)
    expected = out + x @ w.T
    panels = np.zeros((n_out // block, n_in, block), dtype)
    gemm.pack_panels(w[:len(panels) * block], panels)
    gemm.add_matvec(x, w, panels, out, 0, n_out, tile)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)


def test_embedding_forward_and_backward_with_repeated_ids():
    rng = np.random.default_rng(2)
    table = rng.normal(size=(5, 130))
    ids = np.array([4, 0, 4, 4, 2, 0])
    rows = np.empty((6, 130))
    lstm.embedding_forward(table, ids, rows)
    np.testing.assert_array_equal(rows, table[ids])
    d_rows = rng.normal(size=(6, 130))
    d_table = np.ones((5, 130))
    lstm.embedding_backward(d_table, ids, d_rows)
    expected = np.ones((5, 130))
    np.add.at(expected, ids, d_rows)
    np.testing.assert_allclose(d_table, expected, rtol=1e-13)
    split = np.ones((5, 130))  # as the threads run it: disjoint column ranges, strided views
    for lo, hi in ((0, 57), (57, 130)):
        lstm.embedding_backward(split[:, lo:hi], ids, d_rows[:, lo:hi])
    np.testing.assert_allclose(split, expected, rtol=1e-13)


@pytest.fixture(scope="module", params=["small_vocab", "table", "three_layers_decoder_blocks", "float32_blocks"])
def model(request):
    if request.param == "three_layers_decoder_blocks":  # decoder and gates over several blocks (and a partial one)
        config = ModelConfig(vocab_size=300, embed_dim=6, hidden_size=240, num_layers=3, dtype="float64")
    elif request.param == "float32_blocks":  # whole blocks of panels (and the decoder's leftover rows)
        config = ModelConfig(vocab_size=300, embed_dim=6, hidden_size=64, num_layers=2)
    else:
        config = ModelConfig(vocab_size=13, embed_dim=6, hidden_size=10, num_layers=2, dtype="float64")
    model = LSTMLanguageModel(config, seed=8)
    for value in model.params.values():
        value *= 4.0  # sharper distributions, so the sampling tests restrict something
    model.generation_tokens = 20 if request.param == "table" else 5
    return model


@pytest.fixture(params=["one_thread", "all_threads"])
def generation_threads(request, monkeypatch):
    """Every generation test on one thread and with each token's products split across all the threads (the
    test models are below the size at which generation would choose that itself)."""
    if request.param == "all_threads":
        monkeypatch.setattr(charlm.model, "parallel_generation_bytes", lambda: 0)
        monkeypatch.setattr(charlm.model, "others_keep_cores_busy", lambda: False)
    else:
        monkeypatch.setattr(charlm.model, "parallel_generation_bytes", lambda: 1 << 62)
    return request.param


def replay(model, prompt, generated):
    """log-probs (len(generated), V) the model assigns before each generated token, via model.step."""
    state = model.zero_state(1)
    for token in prompt[:-1]:
        _, state = model.step(np.array([token]), state)
    out, token = [], prompt[-1]
    for next_token in generated:
        log_probs, state = model.step(np.array([token]), state)
        out.append(log_probs[0])
        token = next_token
    return np.array(out)


def test_greedy_generation_is_argmax_of_step(model, generation_threads):
    prompt = [1, 5, 2]
    generated = list(model.generate_ids(prompt, model.generation_tokens, temperature=0.0))
    assert len(generated) == model.generation_tokens
    np.testing.assert_array_equal(generated, replay(model, prompt, generated).argmax(axis=1))
    assert list(model.generate_ids(prompt, model.generation_tokens, temperature=1.0, top_k=1, seed=3)) == generated
    # A temperature so small that 1/T overflows float32 is greedy too (0 * inf would make every weight NaN).
    assert list(model.generate_ids(prompt, model.generation_tokens, temperature=1e-45, seed=3)) == generated


def test_same_seed_same_tokens(model, generation_threads):
    run = lambda seed: list(model.generate_ids([4], model.generation_tokens, temperature=1.0, seed=seed))
    assert run(7) == run(7)
    assert any(run(7) != run(seed) for seed in range(8, 12))


def test_top_k_and_top_p_restrict_the_support(model, generation_threads):
    prompt = [0, 3]
    for seed in range(4):
        generated = list(model.generate_ids(prompt, model.generation_tokens, top_k=3, seed=seed))
        log_probs = replay(model, prompt, generated)
        ranks = (log_probs > log_probs[np.arange(len(generated)), generated][:, None]).sum(axis=1)
        assert ranks.max() < 3
        generated = list(model.generate_ids(prompt, model.generation_tokens, top_p=0.5, seed=seed))
        probs = np.exp(replay(model, prompt, generated))
        for row, token in zip(probs, generated):
            mass_above = row[row > row[token]].sum()
            assert mass_above < 0.5  # the token is inside the smallest set holding half the mass


def test_generation_arguments_are_checked(model):
    with pytest.raises(ConfigError):
        model.generate_ids([], 3)
    with pytest.raises(ConfigError):
        model.generate_ids([1], 3, top_p=0.0)
    with pytest.raises(ConfigError):
        model.generate_ids([model.config.vocab_size], 3)


def openblas_coretype_after(imports: str, **env) -> str:
    """OPENBLAS_CORETYPE as a fresh interpreter sees it after `imports`, with `env` added to a clean environment."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "CHARLM_OPENBLAS_CORETYPE")}
    code = f"import os; {imports}; print(os.environ.get('OPENBLAS_CORETYPE', ''))"
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def test_haswell_openblas_kernels_only_on_amd_avx2_and_never_over_the_user():
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    amd_avx2 = "AuthenticAMD" in cpuinfo and " avx2" in cpuinfo
    assert openblas_coretype_after("import charlm") == ("Haswell" if amd_avx2 else "")
    assert openblas_coretype_after("import charlm", CHARLM_OPENBLAS_CORETYPE="keep") == ""
    assert openblas_coretype_after("import charlm", OPENBLAS_CORETYPE="Zen") == "Zen"
    assert openblas_coretype_after("import numpy, charlm") == ""  # too late: OpenBLAS has loaded


def test_generation_is_the_same_on_one_thread_and_on_all(monkeypatch):
    config = ModelConfig(vocab_size=40, embed_dim=5, hidden_size=64, num_layers=2)
    model = LSTMLanguageModel(config, seed=2)
    monkeypatch.setattr(charlm.model, "parallel_generation_bytes", lambda: 0)
    monkeypatch.setattr(charlm.model, "LOAD_CHECK_SECONDS", (0.0, 0.0))  # judge the load before every chunk
    compiled, parts_used = generate.generate_tokens, []

    def spy(part, n_parts, *args):
        if part == 0:
            parts_used.append(n_parts)
        compiled(part, n_parts, *args)

    monkeypatch.setattr(generate, "generate_tokens", spy)
    runs = []
    for busy in ([True], [False], [False, True, True, False]):  # the last: the load comes and goes mid-text
        loads = iter(busy * 10)
        monkeypatch.setattr(charlm.model, "others_keep_cores_busy", lambda: next(loads))
        parts_used.clear()
        runs.append(list(model.generate_ids([3, 1], 100, temperature=1.0, seed=5)))
        threads = charlm.runtime.thread_count()
        assert parts_used == [1 if b else threads for b in busy * 10][:len(parts_used)]
    assert runs[0] == runs[1] == runs[2]
    assert isinstance(charlm.runtime.others_keep_cores_busy(), bool)
    if threads > 1 and hasattr(os, "sched_getaffinity"):  # while split, each thread had a CPU of its own
        monkeypatch.setattr(charlm.model, "others_keep_cores_busy", lambda: False)
        cpus_seen = {}
        monkeypatch.setattr(generate, "generate_tokens",
                            lambda part, *args: (cpus_seen.setdefault(part, os.sched_getaffinity(0)),
                                                 compiled(part, *args)))
        assert list(model.generate_ids([3, 1], 100, temperature=1.0, seed=5)) == runs[0]
        assert sorted(len(cpus) for cpus in cpus_seen.values()) == [1] * threads
        assert len(set.union(*cpus_seen.values())) == threads
        monkeypatch.setattr(generate, "generate_tokens", spy)
    # An idle verdict holds for a while; a busy one is looked at again at once (a zero delay here).
    monkeypatch.setattr(charlm.model, "LOAD_CHECK_SECONDS", (1000.0, 0.0))
    loads = iter([True, True, False, True])
    monkeypatch.setattr(charlm.model, "others_keep_cores_busy", lambda: next(loads))
    parts_used.clear()
    assert list(model.generate_ids([3, 1], 100, temperature=1.0, seed=5)) == runs[0]
    assert parts_used == [1, 1] + [threads] * (len(parts_used) - 2)


def test_generation_gives_each_thread_at_least_the_threshold_in_weights(monkeypatch):
    model = LSTMLanguageModel(ModelConfig(vocab_size=40, embed_dim=5, hidden_size=64, num_layers=2), seed=2)
    weight_bytes = model._generation_bytes(model._generation_weights(30))
    monkeypatch.setattr(charlm.model, "others_keep_cores_busy", lambda: False)
    compiled, parts_used = generate.generate_tokens, set()
    monkeypatch.setattr(generate, "generate_tokens", lambda part, n_parts, *args: (parts_used.add(n_parts),
                                                                               compiled(part, n_parts, *args)))
    threads = charlm.runtime.thread_count()
    for threshold, parts in ((weight_bytes + 1, 1), (weight_bytes, 1), (weight_bytes // 2, min(2, threads)),
                             (1, threads)):
        monkeypatch.setattr(charlm.model, "parallel_generation_bytes", lambda: threshold)
        parts_used.clear()
        list(model.generate_ids([3, 1], 30, seed=5))
        assert parts_used == {parts}
    monkeypatch.setattr(charlm.model, "available_cores", lambda: 1)  # more threads asked for than CPUs
    parts_used.clear()
    list(model.generate_ids([3, 1], 30, seed=5))
    assert parts_used == {1}


def test_tokens_do_not_depend_on_how_many_each_compiled_call_samples(monkeypatch):
    config = ModelConfig(vocab_size=40, embed_dim=5, hidden_size=64, num_layers=2)
    model = LSTMLanguageModel(config, seed=4)
    runs = []
    for chunk in (1, 7, 64):
        monkeypatch.setattr(charlm.model, "GENERATION_CHUNK", chunk)
        runs.append(list(model.generate_ids([3, 1], 30, temperature=1.0, seed=5)))
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == 30


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.8])
def test_dropout_masks_keep_each_element_independently_with_the_given_probability(keep):
    n = 1 << 20
    mask = np.empty(n, np.float32)
    dropout.dropout_mask(mask, key=7, keep=keep)
    assert set(np.unique(mask)) == {0.0, np.float32(1.0 / keep)}
    kept = mask > 0
    sigma = np.sqrt(keep * (1 - keep) / n)
    assert abs(kept.mean() - keep) < 5 * sigma
    both = (kept[:-1] & kept[1:]).mean()  # neighbours, as the hash sees consecutive counters
    assert abs(both - keep * keep) < 5 * np.sqrt(keep * keep * (1 - keep * keep) / n)
    other = np.empty(n, np.float32)
    dropout.dropout_mask(other, key=8, keep=keep)
    assert abs(((other > 0) & kept).mean() - keep * keep) < 5 * np.sqrt(keep * keep / n)


def test_dropout_masks_depend_on_key_and_index_only():
    mask = np.empty((64, 8, 100), np.float64)
    dropout.dropout_mask(mask, key=2**64 - 1, keep=0.7)
    again = np.empty_like(mask)
    dropout.dropout_mask(again, key=2**64 - 1, keep=0.7)
    np.testing.assert_array_equal(mask, again)
    pieces = np.empty(mask.size, np.float64)  # filled in uneven slices, as threads would
    threshold = np.uint64(round(0.7 * (1 << dropout.MASK_BITS)))
    for lo, hi in ((0, 1), (1, 5000), (5000, mask.size)):
        dropout.dropout_mask_slice(pieces, np.uint64(2**64 - 1), threshold, 1 / 0.7, mask.size, mask.size, 0,
                                   lo, hi)
    np.testing.assert_array_equal(pieces, mask.reshape(-1))


@pytest.mark.parametrize("shape", [(1, 12, 5), (7, 12, 5)])
def test_a_share_of_the_rows_gets_exactly_those_rows_of_the_whole_mask(shape):
    """Data-parallel processes each fill their rows; together they must hold the one-process mask."""
    whole = np.empty(shape, np.float32)
    dropout.dropout_mask(whole, key=11, keep=0.6)
    for first, stop in ((0, 4), (4, 8), (8, 12), (3, 10)):
        share = np.empty((shape[0], stop - first, shape[2]), np.float32)
        dropout.dropout_mask(share, key=11, keep=0.6, rows=(first, shape[1]))
        np.testing.assert_array_equal(share, whole[:, first:stop])


@pytest.mark.parametrize("failing_part", [0, 1])
def test_a_thread_that_never_reaches_its_meetings_does_not_hang_the_others(failing_part):
    """Ctrl-C just before the caller's share of a chunk (part 0), or a failed call on a pool thread (part 1):
    the exception reaches the caller and the process exits, with no thread left waiting at a meeting."""
    script = f"""
import charlm.model, charlm.runtime
from charlm.kernels import generate
from charlm.config import ModelConfig
from charlm.model import LSTMLanguageModel
charlm.runtime.limit_threads(2)
charlm.model.parallel_generation_bytes = lambda: 0
charlm.model.others_keep_cores_busy = lambda: False
compiled = generate.generate_tokens
def generate_tokens(part, *args):
    if part == {failing_part}:
        raise KeyboardInterrupt
    compiled(part, *args)
generate.generate_tokens = generate_tokens
model = LSTMLanguageModel(ModelConfig(vocab_size=40, embed_dim=5, hidden_size=64, num_layers=2), seed=2)
try:
    list(model.generate_ids([3, 1], 40, seed=5))
except KeyboardInterrupt:
    print("interrupted")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "interrupted"
