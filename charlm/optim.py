"""AdamW, weight averaging, global-norm gradient clipping and learning-rate schedules.

The per-element work (the AdamW update, the weight average, the gradients' sum of squares) runs in compiled
kernels, at the end of this module, in one parallel pass over all parameters laid end to end: handing
each small array to a thread of its own would cost more than its work.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from charlm.errors import CheckpointError, ConfigError
from charlm.kernels.fastmath import ERROR_MODEL, FASTMATH
from charlm.runtime import MIN_ELEMENTWISE_CHUNK, parallel_chunks

SCHEDULES = ("cosine", "constant", "plateau")


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), updating `params` in place.

    Weight decay applies to matrices only (embedding, LSTM and decoder weights): decaying biases
    and the forget-gate bias of 1 would only pull them away from useful values.
    """

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"Adam betas must be in [0, 1), got {betas!r}")
        if weight_decay < 0:
            raise ConfigError(f"weight decay must be non-negative, got {weight_decay!r}")
        self.params = params
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.step_count = 0
        self.m = {name: np.zeros_like(p) for name, p in params.items()}
        self.v = {name: np.zeros_like(p) for name, p in params.items()}

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """One update of every parameter with `lr` (the scheduled rate; defaults to the base rate)."""
        self.step_count += 1
        rate = self.lr if lr is None else lr
        groups = [(param, grads[name], self.m[name], self.v[name], self.weight_decay if param.ndim >= 2 else 0.0)
                  for name, param in self.params.items()]
        adamw_update(groups, rate, self.beta1, self.beta2, self.eps, self.step_count)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The moments as named arrays ("m.<param>", "v.<param>"); `step_count` is kept separately."""
        state = {f"m.{name}": m for name, m in self.m.items()}
        state.update({f"v.{name}": v for name, v in self.v.items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray], step_count: int) -> None:
        """Restore moments saved by `state_dict`; a missing or misshapen moment is a CheckpointError."""
        for moments, prefix in ((self.m, "m"), (self.v, "v")):
            for name, current in moments.items():
                key = f"{prefix}.{name}"
                saved = state.get(key)
                if saved is None:
                    raise CheckpointError(f"optimizer state has no {key!r}")
                if saved.shape != current.shape:
                    raise CheckpointError(
                        f"optimizer state {key!r} has shape {saved.shape}, expected {current.shape}"
                    )
                current[...] = saved
        if step_count < 0:
            raise CheckpointError(f"optimizer step count must be non-negative, got {step_count}")
        self.step_count = int(step_count)


class WeightAverage:
    """An exponential moving average of the weights, kept beside them for evaluation and checkpoints.

    The average of the last iterates scores better than the last iterate itself, which carries the noise
    of the final updates (Polyak averaging; AWD-LSTM averages SGD's iterates for the same reason). After
    n updates the decay is min(decay, (1 + n) / (10 + n)), so early on the average covers about the last
    tenth of the run rather than remembering the random initialisation.
    """

    def __init__(self, params: dict[str, np.ndarray], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"weight-average decay must be in (0, 1), got {decay!r}")
        self.params = params
        self.decay = decay
        self.averaged = {name: p.copy() for name, p in params.items()}

    def update(self, updates: int) -> None:
        """Fold in the current weights, after `updates` optimizer steps in all (1-based)."""
        decay = min(self.decay, (1.0 + updates) / (10.0 + updates))
        moving_average_update([(self.averaged[name], p) for name, p in self.params.items()], 1.0 - decay)


def global_grad_norm(grads: dict[str, np.ndarray]) -> float:
    """The L2 norm of all gradients taken as one vector (float64 accumulation; inf/nan propagate)."""
    return math.sqrt(sum_of_squares(grads.values()))


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients together so their global norm is at most `max_norm`; return the norm before.

    A non-finite norm is returned without scaling: the caller skips that update instead.
    """
    norm = global_grad_norm(grads)
    if math.isfinite(norm) and max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= g.dtype.type(scale)
    return norm


def learning_rate(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int | None,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    progress: float | None = None,
    warmup_share: float = 0.0,
) -> float:
    """The rate for update number `step` (0-based): linear warm-up, then the schedule's decay.

    Warm-up lasts `warmup_steps` steps or, when `warmup_share` > 0, that share of the run: of `total_steps`,
    or of `progress` when the run's length is a time budget, so a short run does not spend a fifth of
    itself warming up. "cosine" falls from `base_lr` to `min_lr_ratio * base_lr` over the steps after
    warm-up, or over `progress` (a 0..1 fraction, e.g. of a time budget) when the run's length is not a
    step count. "constant" and "plateau" stay at `base_lr`; plateau decay is applied by `PlateauDecay` on top.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup_share > 0.0:
        if progress is None:
            if total_steps is None:
                raise ConfigError("a warm-up share needs a total step count or a progress fraction")
            warmup_steps = round(warmup_share * total_steps)
        elif progress < warmup_share:
            return base_lr * max(progress, 0.0) / warmup_share
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule != "cosine":
        return base_lr
    if progress is None:
        if total_steps is None:
            raise ConfigError("a cosine schedule needs a total step count or a progress fraction")
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    min_lr = min_lr_ratio * base_lr
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PlateauDecay:
    """Multiply the rate by `factor` when validation loss has not improved for `patience` evaluations."""

    def __init__(self, factor: float = 0.5, patience: int = 2, min_scale: float = 1e-3) -> None:
        if not 0.0 < factor < 1.0:
            raise ConfigError(f"plateau factor must be in (0, 1), got {factor!r}")
        if patience < 1:
            raise ConfigError(f"plateau patience must be a positive integer, got {patience!r}")
        self.factor = factor
        self.patience = patience
        self.min_scale = min_scale
        self.scale = 1.0
        self.best = math.inf
        self.bad_evals = 0

    def update(self, val_loss: float) -> None:
        if val_loss < self.best:
            self.best = val_loss
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.scale = max(self.scale * self.factor, self.min_scale)
            self.bad_evals = 0

    def state_dict(self) -> dict:
        """JSON-able (no infinities: a run with no evaluation yet stores `best` as None)."""
        best = self.best if math.isfinite(self.best) else None
        return {"scale": self.scale, "best": best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.bad_evals = int(state["bad_evals"])


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model=ERROR_MODEL)
def _adamw_kernel(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    one = param.dtype.type(1.0)
    b1 = param.dtype.type(beta1)
    b2 = param.dtype.type(beta2)
    decay = param.dtype.type(1.0 - lr * weight_decay)
    step_size = param.dtype.type(lr / (1.0 - beta1**step))
    inv_root_correction = param.dtype.type(1.0 / np.sqrt(1.0 - beta2**step))
    epsilon = param.dtype.type(eps)
    for n in range(param.shape[0]):
        g = grad[n]
        m[n] = b1 * m[n] + (one - b1) * g
        v[n] = b2 * v[n] + (one - b2) * g * g
        param[n] = param[n] * decay - step_size * m[n] / (np.sqrt(v[n]) * inv_root_correction + epsilon)


def _pieces(sizes: list[int], lo: int, hi: int):
    """(array index, start, stop) of each part of the range [lo, hi) of arrays of these sizes laid end to end:
    one parallel pass over many arrays, since handing each small array to a thread costs more than its work."""
    first = 0
    for index, size in enumerate(sizes):
        if first < hi and first + size > lo:
            yield index, max(lo, first) - first, min(hi, first + size) - first
        first += size


def _flat_groups(groups, caller: str) -> list[list[np.ndarray]]:
    """Flat views of each group's arrays, which must share one shape and be C-contiguous (updated in place)."""
    for arrays in groups:
        if any(not a.flags.c_contiguous for a in arrays) or len({a.shape for a in arrays}) != 1:
            raise ValueError(f"{caller} needs C-contiguous arrays of one shape")
    return [[a.reshape(-1) for a in arrays] for arrays in groups]


def _over_pieces(flats: list[list[np.ndarray]], work) -> list:
    """work(index, slices) for every piece (see `_pieces`) of the groups of flat arrays laid end to end, the
    slices being the same stretch of each of group `index`'s arrays; one parallel pass, results in order."""
    sizes = [arrays[0].size for arrays in flats]

    def chunk(lo: int, hi: int) -> list:
        return [work(index, [a[start:stop] for a in flats[index]]) for index, start, stop in _pieces(sizes, lo, hi)]

    return [result for results in parallel_chunks(sum(sizes), chunk, min_chunk=MIN_ELEMENTWISE_CHUNK)
            for result in results]


def adamw_update(groups, lr, beta1, beta2, eps, step) -> None:
    """AdamW in place on every (param, grad, m, v, weight_decay) of groups: decoupled weight decay
    (p -= lr*wd*p), then Adam with bias correction for `step` (1-based).

    Each group's arrays: same shape and dtype, C-contiguous (updated through flat views)."""
    flats = _flat_groups([arrays for *arrays, _ in groups], "adamw_update")
    decays = [float(weight_decay) for *_, weight_decay in groups]
    scalars = (float(lr), float(beta1), float(beta2), float(eps))
    _over_pieces(flats, lambda index, arrays: _adamw_kernel(*arrays, *scalars, decays[index], int(step)))


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model=ERROR_MODEL)
def _moving_average_kernel(average, value, weight):
    w = average.dtype.type(weight)
    for n in range(average.shape[0]):
        average[n] += w * (value[n] - average[n])


def moving_average_update(pairs, weight: float) -> None:
    """average += weight * (value - average) for every (average, value) of pairs, in one parallel pass."""
    _over_pieces(_flat_groups(pairs, "moving_average_update"),
                 lambda index, arrays: _moving_average_kernel(*arrays, float(weight)))


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _sum_of_squares_kernel(flat):
    total = 0.0
    for n in range(flat.shape[0]):
        x = np.float64(flat[n])
        total += x * x
    return total


def sum_of_squares(arrays) -> float:
    """Σ x² over all the arrays, accumulated in float64 (for global-norm gradient clipping)."""
    flats = [[np.ascontiguousarray(a).reshape(-1)] for a in arrays]
    return float(sum(_over_pieces(flats, lambda index, pieces: _sum_of_squares_kernel(pieces[0]))))
