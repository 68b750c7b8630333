"""Shared fixtures: tiny generated datasets, an isolated stage cache, and the CLI entry point."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dhumor.paths import data_root

ROOT = Path(__file__).resolve().parent.parent
HARMEME_DIR = data_root()  # $DHUMOR_DATA (CI exports it), else data/harmeme-c


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
    return pytest.mark.skipif(not (HARMEME_DIR / "val.jsonl").exists(), reason=f"Harm-C not found in {HARMEME_DIR} (set DHUMOR_DATA)")


SMALL = ["--model.caption_encoder", "all-minilm-l6-v2", "--model.reasoning_encoder", "all-minilm-l6-v2",
         "--data.progress", "false", "--trainer.enable_progress_bar", "false"]


def fit_cli(root, fixture, *extra, config="configs/harmeme.yaml") -> int:
    """``dhumor fit`` on a fixture with the small offline text encoder."""
    from dhumor.cli import main

    return main(["fit", "--config", str(ROOT / config), "--data.train", str(fixture), "--data.test", str(fixture),
                 "--trainer.default_root_dir", str(root), *SMALL, *extra])


@pytest.fixture(scope="session")
def trained(tmp_path_factory, harmeme_fixture) -> Path:
    """A short real run through the CLI: 6 epochs, early stopping on a held-out quarter of the fixture.
    Returns the run's version folder (config.yaml, checkpoints/, export/)."""
    root = tmp_path_factory.mktemp("run")
    assert fit_cli(root, harmeme_fixture, "--trainer.max_epochs", "6", "--data.val_fraction", "0.25",
                   "--data.batch_size", "8", "--model.lr", "3e-3") == 0
    return sorted((root / "lightning_logs").iterdir())[-1]
