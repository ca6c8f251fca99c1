"""Shared fixtures: every test gets its own charlm cache, and real-corpus tests find the shared corpora."""

import os
from pathlib import Path

import pytest

from charlm.corpus import cache_dir, registry

REPO_ROOT = Path(__file__).resolve().parent.parent
# Where `charlm` itself keeps downloaded corpora, read before each test points CHARLM_CACHE at a fresh folder.
USER_CORPORA = cache_dir() / "corpora"


@pytest.fixture(autouse=True)
def charlm_cache(tmp_path_factory, monkeypatch):
    """Encoded ids and downloads go to a fresh folder, never the user's ~/.cache/charlm."""
    cache = tmp_path_factory.mktemp("charlm_cache")
    monkeypatch.setenv("CHARLM_CACHE", str(cache))
    return cache


@pytest.fixture
def corpora_dir(monkeypatch):
    """The registered corpora ($CHARLM_CORPORA, else the ones charlm downloaded into the user cache, else
    ../shared/corpora beside the repo), exported as $CHARLM_CORPORA for the test; skips unless every
    registered file is there."""
    candidates = [os.environ.get("CHARLM_CORPORA"), str(USER_CORPORA), str(REPO_ROOT.parent / "shared" / "corpora")]
    for candidate in filter(None, candidates):
        folder = Path(candidate).expanduser().resolve()
        if all((folder / name / file).is_file() for name, entry in registry().items() for file in entry["files"]):
            monkeypatch.setenv("CHARLM_CORPORA", str(folder))
            return folder
    pytest.skip("registered corpora not found: set CHARLM_CORPORA to a folder holding them")
