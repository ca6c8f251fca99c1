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


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory):
    """A tiny char model trained for a few seconds on "I love machine learning." lines, for the server tests."""
    import numpy as np

    from charlm.config import TrainConfig
    from charlm.train import train

    root = tmp_path_factory.mktemp("serve")
    lines = ["I love machine learning.", "I love machine tools.", "I love deep learning.", "I like deep water."]
    picks = np.random.default_rng(0).choice(len(lines), size=800, p=[0.5, 0.2, 0.2, 0.1])
    corpus = root / "love.txt"
    corpus.write_text("\n".join(lines[i] for i in picks) + "\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHARLM_CACHE", str(root / "cache"))
        train(TrainConfig.from_dict(dict(
            corpus=str(corpus), out=str(root / "love"), num_layers=1, hidden_size=48, embed_dim=16, dropout=0.0,
            seq_len=32, batch_size=16, lr=2e-2, warmup_steps=5, max_steps=60, eval_every=60, checkpoint_every=60,
            log_every=20)), verbose=False)
    return root / "love" / "best"
