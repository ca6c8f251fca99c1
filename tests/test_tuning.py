"""Tile rows measured once per CPU and shape, remembered in the wisdom file, never changing a result."""

import json
from dataclasses import replace

import numpy as np
import pytest

from charlm.kernels import gemm, tuning
from charlm.kernels.target import compile_target


@pytest.fixture
def wisdom(tmp_path, monkeypatch):
    """A fresh cache dir and no tiles remembered from other tests."""
    monkeypatch.setenv("CHARLM_CACHE", str(tmp_path))
    tuning.tuned_tile.cache_clear()
    yield tmp_path / "wisdom.json"
    tuning.tuned_tile.cache_clear()


def test_candidates_fit_the_register_file_and_include_the_derived_tile():
    tiles = tuning.candidates()
    registers = compile_target().vector_registers
    assert gemm.default_tile() in tiles
    assert all(tile.rows * tile.panels + tile.panels + 1 <= registers for tile in tiles)
    assert len({tile.vector_bytes for tile in tiles}) == 1  # packing is the same for all


def test_small_products_keep_the_derived_tile_without_timing(wisdom, monkeypatch):
    monkeypatch.setattr(tuning, "time_candidates", lambda *args: pytest.fail("timed a small product"))
    assert tuning.tuned_tile(np.float32, 64, 32, 16) == gemm.default_tile()
    assert not wisdom.exists()


def test_the_fastest_candidate_is_remembered_and_read_back(wisdom, monkeypatch):
    monkeypatch.setattr(tuning, "MIN_TUNED_BYTES", 0)
    slowest_first = {tile.rows: 1.0 / tile.rows for tile in tuning.candidates()}
    monkeypatch.setattr(tuning, "time_candidates",
                        lambda tiles, *args: {t.rows: slowest_first[t.rows] for t in tiles})
    tile = tuning.tuned_tile(np.float32, 512, 32, 16)
    fitting = [t.rows for t in tuning.candidates() if t.rows <= 16]
    assert tile == replace(gemm.default_tile(), rows=max(fitting))
    [entry] = json.loads(wisdom.read_text()).values()
    assert entry["rows"] == tile.rows
    tuning.tuned_tile.cache_clear()
    monkeypatch.setattr(tuning, "time_candidates", lambda *args: pytest.fail("timed again"))
    assert tuning.tuned_tile(np.float32, 512, 32, 16) == tile  # a new process reads the wisdom
    wisdom.write_text("{not json")
    tuning.tuned_tile.cache_clear()
    # A broken file is timed afresh; a candidate within the noise of the derived tile does not replace it.
    derived = gemm.default_tile().rows
    monkeypatch.setattr(tuning, "time_candidates",
                        lambda tiles, *args: {t.rows: 1.0 if t.rows == derived else 0.97 for t in tiles})
    assert tuning.tuned_tile(np.float32, 512, 32, 16).rows == derived


def test_every_candidate_gives_the_same_bits_and_gets_timed():
    rng = np.random.default_rng(1)
    tiles = [gemm.default_tile(), replace(gemm.default_tile(), rows=4)]
    n_out, n_in, rows = 2 * tiles[0].panels * gemm.panel_width(np.float32, tiles[0]), 37, 19
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    width = gemm.panel_width(np.float32, tiles[0])
    panels = np.empty((n_out // width, n_in, width), np.float32)
    gemm.pack_panels(w, panels)
    outs = [np.zeros((rows, n_out), np.float32) for _ in tiles]
    for tile, out in zip(tiles, outs):
        gemm.add_row_products(x, w, panels, out, 0, rows, tile)
    np.testing.assert_array_equal(outs[0], outs[1])
    seconds = tuning.time_candidates(tiles, np.float32, n_out, n_in, rows)
    assert set(seconds) == {tile.rows for tile in tiles} and all(s > 0 for s in seconds.values())
