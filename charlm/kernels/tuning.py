"""Tile rows measured where the register file leaves a choice, remembered as this CPU's "wisdom" (as FFTW
keeps its plans).

`gemm.tile_for` derives one tile per ISA. How many rows a tile should hold also depends on the rows each
thread multiplies (a share of 16 rows is 8 + 8 in 8-row tiles, 6 + 6 + 4 in 6-row ones) and on the core's
caches and load ports, which no feature flag states. So for a model's larger recurrent products
`tuned_tile` times, once, every row count whose accumulators fit the register file on the model's own
shape and remembers the fastest in `wisdom.json` in charlm's cache dir (CHARLM_CACHE), keyed by CPU model,
LLVM CPU name and features, dtype and shape. Every candidate computes each output the same way (one
multiply-add chain over k), so the choice changes the speed, never a result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from charlm.kernels import gemm
from charlm.kernels.target import compile_target, cpu_model

# Row counts tried: each takes rows × panels accumulators, and must leave registers for the loaded panels
# and a broadcast row value.
CANDIDATE_ROWS = (4, 6, 8, 12)
# Products whose matrix is smaller keep the derived tile: they take too little of a step to be worth timing.
MIN_TUNED_BYTES = 1 << 20
# A candidate replaces the derived tile only when it is faster by more than this share.
MIN_GAIN = 0.05
# Timing: rounds over the candidates in alternating order, each round calling one candidate for this long.
ROUNDS = 7
ROUND_SECONDS = 0.01


def wisdom_path() -> Path:
    """The wisdom file in charlm's cache dir (CHARLM_CACHE, else ~/.cache/charlm)."""
    from charlm.corpus import cache_dir

    return cache_dir() / "wisdom.json"


def candidates() -> list[gemm.Tile]:
    """The derived tile with every candidate row count whose accumulators fit this target's registers."""
    base = gemm.default_tile()
    budget = compile_target().vector_registers - base.panels - 1
    rows = sorted({r for r in CANDIDATE_ROWS if r * base.panels <= budget} | {base.rows})
    return [replace(base, rows=r) for r in rows]


def _key(dtype, n_out: int, n_in: int, rows: int) -> str:
    target = compile_target()
    features = hashlib.sha256(target.features.encode()).hexdigest()[:12]
    return f"{cpu_model()} | {target.cpu_name} | {features} | {np.dtype(dtype).name} {n_out}x{n_in} rows {rows}"


def _read_wisdom(path: Path) -> dict:
    try:
        wisdom = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return wisdom if isinstance(wisdom, dict) else {}


def _remember(path: Path, key: str, entry: dict) -> None:
    """Add one entry to the wisdom file (written whole, then renamed into place); a cache dir that cannot be
    written only means timing again in the next process."""
    wisdom = _read_wisdom(path)
    wisdom[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(wisdom, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError:
        pass


def time_candidates(tiles: list[gemm.Tile], dtype, n_out: int, n_in: int, rows: int) -> dict[int, float]:
    """Seconds per call of add_row_products(rows × (n_out, n_in)) for each tile, keyed by its rows: the
    best of its rounds, as other processes can only slow a round down; the candidates take turns, in
    alternating order, so a change in the machine's load hits them alike."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, n_in)).astype(dtype)
    w = rng.standard_normal((n_out, n_in)).astype(dtype)
    width = gemm.panel_width(dtype, tiles[0])
    panels = np.empty((n_out // width, n_in, width), dtype)
    gemm.pack_panels(w, panels)
    out = np.zeros((rows, n_out), dtype)
    times: dict[int, list[float]] = {tile.rows: [] for tile in tiles}
    for tile in tiles:
        gemm.add_row_products(x, w, panels, out, 0, rows, tile)  # compile (or load) before timing
    for round_ in range(ROUNDS):
        for tile in tiles if round_ % 2 else tiles[::-1]:
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < ROUND_SECONDS:
                gemm.add_row_products(x, w, panels, out, 0, rows, tile)
                calls += 1
            times[tile.rows].append((time.perf_counter() - start) / calls)
    return {r: min(t) for r, t in times.items()}


@functools.cache
def tuned_tile(dtype, n_out: int, n_in: int, rows: int) -> gemm.Tile:
    """The tile for products of `rows` rows (a thread's share) with a packed (n_out, n_in) matrix: the
    derived one where the matrix is small or tiles do not apply, else the fastest candidate, from the
    wisdom file or timed now (a second or so, plus compiling each candidate the first time)."""
    base = gemm.default_tile()
    dtype = np.dtype(dtype)
    if n_out * n_in * dtype.itemsize < MIN_TUNED_BYTES or not gemm.panels_apply(n_out, dtype, rows, base):
        return base
    tiles = [tile for tile in candidates() if gemm.panels_apply(n_out, dtype, rows, tile)]
    path, key = wisdom_path(), _key(dtype, n_out, n_in, rows)
    known = _read_wisdom(path).get(key)
    if isinstance(known, dict) and known.get("rows") in [tile.rows for tile in tiles]:
        return replace(base, rows=known["rows"])
    seconds = time_candidates(tiles, dtype, n_out, n_in, rows)
    best = min(seconds, key=seconds.get)
    if seconds[best] > (1.0 - MIN_GAIN) * seconds[base.rows]:  # within the noise of a shared machine
        best = base.rows
    _remember(path, key, {"rows": best, "microseconds": {str(r): round(s * 1e6, 2) for r, s in seconds.items()}})
    return replace(base, rows=best)
