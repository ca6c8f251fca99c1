"""AdamW against the textbook formula, the weight average, clipping, and the learning-rate schedules."""

import math

import numpy as np
import pytest

from charlm.errors import CheckpointError, ConfigError
from charlm.optim import AdamW, PlateauDecay, WeightAverage, clip_grad_norm, global_grad_norm, learning_rate


def reference_adamw(p, grads, lr, b1, b2, eps, wd):
    """AdamW (Loshchilov & Hutter) written out in float64 numpy, one step per gradient."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p -= lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adamw_matches_reference_formula_and_decays_only_matrices():
    rng = np.random.default_rng(0)
    params = {
        "w": rng.standard_normal((5, 7)),
        "b": rng.standard_normal(7),
    }
    initial = {k: v.copy() for k, v in params.items()}
    grad_steps = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(4)]
    opt = AdamW(params, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for grads in grad_steps:
        opt.step(grads, lr=0.01)
    assert opt.step_count == 4
    expected_w = reference_adamw(initial["w"], [g["w"] for g in grad_steps], 0.01, 0.9, 0.99, 1e-8, 0.1)
    expected_b = reference_adamw(initial["b"], [g["b"] for g in grad_steps], 0.01, 0.9, 0.99, 1e-8, 0.0)
    np.testing.assert_allclose(params["w"], expected_w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(params["b"], expected_b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_average_follows_the_ramped_moving_average(dtype):
    """Arrays of several sizes (one large enough to be split between threads) against the formula in float64."""
    rng = np.random.default_rng(4)
    params = {"big": rng.standard_normal(300_001).astype(dtype), "w": rng.standard_normal((5, 3)).astype(dtype),
              "b": rng.standard_normal(2).astype(dtype)}
    average = WeightAverage(params, decay=0.95)
    expected = {name: p.astype(np.float64) for name, p in params.items()}
    for updates in range(1, 40):
        for name, p in params.items():
            p += rng.standard_normal(p.shape).astype(dtype)
            decay = min(0.95, (1 + updates) / (10 + updates))
            expected[name] = decay * expected[name] + (1 - decay) * p
        average.update(updates)
    for name in params:
        assert average.averaged[name].dtype == dtype
        np.testing.assert_allclose(average.averaged[name], expected[name], rtol=1e-4 if dtype == np.float32 else 1e-12,
                                   atol=1e-5 if dtype == np.float32 else 1e-12)
        assert not np.shares_memory(average.averaged[name], params[name])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_weight_average_rejects_decays_outside_0_1(decay):
    with pytest.raises(ConfigError, match="decay"):
        WeightAverage({"w": np.zeros(3)}, decay)


def test_adamw_state_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    make = lambda: {"w": rng.standard_normal((3, 4)).astype(np.float32)}  # noqa: E731
    grads = [make() for _ in range(6)]
    params_a = make()
    params_b = {k: v.copy() for k, v in params_a.items()}

    opt_a = AdamW(params_a, lr=1e-2, weight_decay=0.01)
    for g in grads:
        opt_a.step(g)

    opt_b = AdamW(params_b, lr=1e-2, weight_decay=0.01)
    for g in grads[:3]:
        opt_b.step(g)
    saved = {k: v.copy() for k, v in opt_b.state_dict().items()}
    fresh = AdamW(params_b, lr=1e-2, weight_decay=0.01)
    fresh.load_state_dict(saved, opt_b.step_count)
    for g in grads[3:]:
        fresh.step(g)
    assert np.array_equal(params_a["w"], params_b["w"])


def test_adamw_load_rejects_missing_or_misshapen_moments():
    params = {"w": np.zeros((2, 3), np.float32)}
    opt = AdamW(params, lr=1e-3)
    with pytest.raises(CheckpointError, match="no 'm.w'"):
        opt.load_state_dict({}, 1)
    bad = {"m.w": np.zeros((3, 2), np.float32), "v.w": np.zeros((2, 3), np.float32)}
    with pytest.raises(CheckpointError, match="shape"):
        opt.load_state_dict(bad, 1)


def test_adamw_rejects_bad_hyperparameters():
    params = {"w": np.zeros((2, 2), np.float32)}
    with pytest.raises(ConfigError):
        AdamW(params, lr=0.0)
    with pytest.raises(ConfigError):
        AdamW(params, lr=1e-3, weight_decay=-1.0)
    with pytest.raises(ConfigError):
        AdamW(params, lr=1e-3, betas=(0.9, 1.0))


def test_clip_scales_to_max_norm_and_reports_norm_before():
    grads = {"a": np.full((2, 2), 3.0, np.float32), "b": np.full(4, 4.0, np.float32)}
    expected_norm = math.sqrt(4 * 9 + 4 * 16)
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert norm == pytest.approx(expected_norm)
    assert global_grad_norm(grads) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(grads["a"] / grads["b"][:4].reshape(2, 2), 0.75, rtol=1e-6)


def test_clip_leaves_small_and_non_finite_gradients_alone():
    small = {"a": np.array([0.3, 0.4], np.float32)}
    assert clip_grad_norm(small, max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(small["a"], np.array([0.3, 0.4], np.float32))
    bad = {"a": np.array([np.nan, 1.0], np.float32)}
    assert math.isnan(clip_grad_norm(bad, max_norm=1.0))
    assert bad["a"][1] == 1.0
    inf = {"a": np.array([np.inf, 1.0], np.float32)}
    assert math.isinf(clip_grad_norm(inf, max_norm=1.0))


def test_warmup_then_cosine_to_the_floor():
    kw = dict(base_lr=1.0, warmup_steps=10, total_steps=110, schedule="cosine", min_lr_ratio=0.1)
    rates = [learning_rate(s, **kw) for s in range(120)]
    assert rates[0] == pytest.approx(0.1)
    assert rates[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(rates[:10], rates[1:10]))
    assert all(a >= b for a, b in zip(rates[10:110], rates[11:111]))
    assert rates[60] == pytest.approx(0.55)
    assert rates[110] == pytest.approx(0.1)
    assert rates[119] == pytest.approx(0.1)


def test_cosine_by_progress_fraction_and_constant():
    assert learning_rate(50, base_lr=2.0, warmup_steps=0, total_steps=None, progress=0.5,
                         min_lr_ratio=0.0) == pytest.approx(1.0)
    assert learning_rate(500, base_lr=2.0, warmup_steps=5, total_steps=10, schedule="constant") == 2.0
    with pytest.raises(ConfigError):
        learning_rate(5, base_lr=1.0, warmup_steps=0, total_steps=None)
    with pytest.raises(ConfigError):
        learning_rate(5, base_lr=1.0, warmup_steps=0, total_steps=10, schedule="linear")


def test_warmup_share_follows_the_run_length():
    """A share of the run warms up over that share of its steps, or of its time budget's progress."""
    by_steps = [learning_rate(s, base_lr=1.0, warmup_steps=0, total_steps=500, warmup_share=0.02,
                              min_lr_ratio=0.0) for s in range(500)]
    assert by_steps[0] == pytest.approx(0.1) and by_steps[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(by_steps[:10], by_steps[1:10]))
    by_time = [learning_rate(s, base_lr=1.0, warmup_steps=0, total_steps=None, warmup_share=0.02,
                             progress=p, min_lr_ratio=0.0) for s, p in ((0, 0.005), (1, 0.01), (2, 0.5))]
    assert by_time == pytest.approx([0.25, 0.5, 0.5])
    with pytest.raises(ConfigError):
        learning_rate(5, base_lr=1.0, warmup_steps=0, total_steps=None, warmup_share=0.02)


def test_plateau_halves_after_patience_and_round_trips():
    plateau = PlateauDecay(factor=0.5, patience=2)
    for loss in (3.0, 2.0, 2.5, 2.1):
        plateau.update(loss)
    assert plateau.scale == 0.5
    plateau.update(1.9)
    assert plateau.scale == 0.5
    restored = PlateauDecay(factor=0.5, patience=2)
    restored.load_state_dict(plateau.state_dict())
    assert restored.state_dict() == plateau.state_dict()
    assert PlateauDecay().state_dict()["best"] is None
