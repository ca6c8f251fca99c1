"""Shared fixtures: every test gets its own charlm cache, and real-corpus tests find the shared corpora."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def charlm_cache(tmp_path_factory, monkeypatch):
    """Encoded ids and downloads go to a fresh folder, never the user's ~/.cache/charlm."""
    cache = tmp_path_factory.mktemp("charlm_cache")
    monkeypatch.setenv("CHARLM_CACHE", str(cache))
    return cache


@pytest.fixture
def corpora_dir(monkeypatch):
    """The shared corpora ($CHARLM_CORPORA, else ../shared/corpora beside the repo), exported as
    $CHARLM_CORPORA for the test; skips when they are absent."""
    candidates = [os.environ.get("CHARLM_CORPORA"), str(REPO_ROOT.parent / "shared" / "corpora")]
    for candidate in filter(None, candidates):
        folder = Path(candidate).expanduser().resolve()
        if (folder / "ptb" / "train.txt").is_file():
            monkeypatch.setenv("CHARLM_CORPORA", str(folder))
            return folder
    pytest.skip("shared corpora not found: set CHARLM_CORPORA or put them at ../shared/corpora")
