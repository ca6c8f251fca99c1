"""A run's loss curves as one image: training and validation loss against step and against wall time.

Reads the run's metrics.jsonl (see charlm.train: "train" records carry loss, lr and elapsed seconds, "val"
records loss, best and elapsed), so it works on a run that is still training: a torn last line is skipped.
Draws with matplotlib's Agg canvas, without pyplot, so no display and no global backend are involved.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from charlm.checkpoint import CONFIG_FILE
from charlm.errors import ConfigError
from charlm.extras import import_extra
from charlm.train import METRICS_FILE

TRAIN_COLOR, VAL_COLOR, BEST_COLOR, LR_COLOR = "#1f77b4", "#d62728", "#2ca02c", "#7f7f7f"
# The first training records (loss ~ln V) would squash the rest of the curve; the y axis starts from the
# records after this share of the run (the early ones run off the top).
Y_RANGE_SKIPS = 0.05


@dataclass(frozen=True)
class Curve:
    """One kind of record, in file order: step, wall-clock seconds since the run began, loss, lr."""

    steps: list[int]
    seconds: list[float]
    losses: list[float]
    lrs: list[float | None]


@dataclass(frozen=True)
class PlotSummary:
    """What `plot_run` drew, for the command's one-line report."""

    path: Path
    train_records: int
    val_records: int
    last_step: int
    best_val_loss: float | None
    best_step: int | None


def read_metrics(path: Path) -> tuple[Curve, Curve]:
    """(training, validation) curves from a metrics.jsonl; lines that are not complete records (the one a
    running trainer is writing) and non-finite losses (logged as null) are skipped."""
    rows: dict[str, list[tuple]] = {"train": [], "val": []}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("event") not in rows:
                continue
            step, elapsed, loss = record.get("step"), record.get("elapsed"), record.get("loss")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (step, elapsed, loss)):
                continue
            lr = record.get("lr")
            rows[record["event"]].append((step, elapsed, loss, lr if isinstance(lr, (int, float)) else None))
    curves = [Curve(*(list(column) for column in zip(*found))) if found else Curve([], [], [], [])
              for found in rows.values()]
    return curves[0], curves[1]


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> PlotSummary:
    """Draw RUN's metrics (a run folder, or its metrics.jsonl) to `out` (default RUN/loss.png; the format
    follows the suffix), replacing it atomically so a viewer never shows half an image."""
    metrics = _metrics_path(Path(run))
    try:
        train, val = read_metrics(metrics)
    except OSError as exc:
        raise ConfigError(f"cannot read {metrics}: {exc.strerror or exc}") from None
    if not train.steps and not val.steps:
        raise ConfigError(f"{metrics} holds no training or validation records yet")
    out = Path(out) if out is not None else metrics.parent / "loss.png"
    best = min(range(len(val.losses)), key=val.losses.__getitem__) if val.losses else None

    Figure = import_extra("matplotlib.figure", "plot", "charlm plot").Figure
    figure = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    scale, unit = _time_unit(max(train.seconds + val.seconds))
    for axes, x_of in ((by_step, lambda c: c.steps), (by_time, lambda c: [s / scale for s in c.seconds])):
        axes.plot(x_of(train), train.losses, color=TRAIN_COLOR, linewidth=1.2, label="training loss")
        axes.plot(x_of(val), val.losses, color=VAL_COLOR, linewidth=1.6, marker="o", markersize=3.5,
                  label="validation loss")
        if best is not None:
            axes.plot([x_of(val)[best]], [val.losses[best]], linestyle="none", marker="*", markersize=15,
                      color=BEST_COLOR, markeredgecolor="black", markeredgewidth=0.6, zorder=5,
                      label=f"best validation {val.losses[best]:.4f} (step {val.steps[best]:,})")
        axes.grid(True, alpha=0.3)
    by_step.set_xlabel("step")
    by_time.set_xlabel(f"wall time ({unit})")
    by_step.set_ylabel("loss (nats/token)")
    by_step.set_ylim(*_loss_range(train, val))
    by_time.legend(loc="upper right", framealpha=0.9)
    if any(lr is not None for lr in train.lrs):
        rate = by_step.twinx()
        rate.plot(train.steps, [math.nan if lr is None else lr for lr in train.lrs], color=LR_COLOR,
                  linestyle="--", linewidth=1.0)
        rate.set_ylabel("learning rate (dashed)", color=LR_COLOR)
        rate.tick_params(axis="y", colors=LR_COLOR)
        rate.yaxis.set_major_formatter(lambda value, _: f"{value:g}")
        rate.locator_params(axis="y", nbins=5)
        rate.set_ylim(bottom=0)
    figure.suptitle(_title(metrics.parent, max(train.steps + val.steps)))

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png")
        os.replace(tmp, out)
    except ValueError as exc:  # an image format matplotlib does not write
        raise ConfigError(f"cannot write {out}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return PlotSummary(path=out, train_records=len(train.steps), val_records=len(val.steps),
                       last_step=max(train.steps + val.steps),
                       best_val_loss=None if best is None else val.losses[best],
                       best_step=None if best is None else val.steps[best])


def _metrics_path(run: Path) -> Path:
    path = run / METRICS_FILE if run.is_dir() else run
    if not path.is_file():
        raise ConfigError(f"no {METRICS_FILE} at {run}; pass a run folder made by charlm train")
    return path


def _loss_range(train: Curve, val: Curve) -> tuple[float, float]:
    """Every validation loss and the training losses after the first few, with a margin."""
    shown = train.losses[int(len(train.losses) * Y_RANGE_SKIPS):] + val.losses
    low, high = min(shown), max(shown)
    margin = max(0.05 * (high - low), 0.01)
    return low - margin, high + margin


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds < 120:
        return 1.0, "s"
    if seconds < 7200:
        return 60.0, "min"
    return 3600.0, "h"


def _title(run: Path, last_step: int) -> str:
    """The run's name, corpus and model shape (from its latest checkpoint's config, when readable)."""
    parts = [run.resolve().name]
    for name in ("last", "best"):
        try:
            doc = json.loads((run / name / CONFIG_FILE).read_text(encoding="utf-8"))
            model, train = doc["model"], doc.get("train") or {}
            parts += [Path(str(train.get("corpus", ""))).name, str(train.get("tokenizer", "")),
                      f"{model['num_layers']}×{model['hidden_size']} LSTM"]
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    parts.append(f"step {last_step:,}")
    return " · ".join(dict.fromkeys(part for part in parts if part))  # a run named after its corpus says it once
