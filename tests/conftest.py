"""Shared fixtures: tiny generated datasets, an isolated stage cache, and the CLI entry point."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARMEME_DIR = ROOT.parent / "shared" / "datasets" / "harmeme-c"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Tests never read or write the user's feature cache; weights stay in the shared weights dir.
    os.environ["DHUMOR_CACHE"] = str(tmp_path_factory.mktemp("cache") / "cache.sqlite")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def harmeme_fixture(tmp_path_factory) -> Path:
    from dhumor.data.synthetic import write_fixture

    return write_fixture(tmp_path_factory.mktemp("harmeme"), n=32, seed=0, fmt="harmeme")


@pytest.fixture(scope="session")
def dhumor_fixture(tmp_path_factory) -> Path:
    from dhumor.data.synthetic import write_fixture

    return write_fixture(tmp_path_factory.mktemp("dhumor"), n=32, seed=1, fmt="dhumor")


@pytest.fixture
def copy_fixture(tmp_path):
    """A private copy of a fixture dataset (for tests that damage it)."""
    def make(src: Path) -> Path:
        dst = tmp_path / src.parent.name
        shutil.copytree(src.parent, dst)
        return dst / src.name
    return make


def needs_harmeme():
    return pytest.mark.skipif(not (HARMEME_DIR / "val.jsonl").exists(), reason="Harm-C not found in ../shared")
