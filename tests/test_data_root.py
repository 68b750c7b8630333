"""Configs name data relative to one data root (``--data.root`` / ``$DHUMOR_DATA``); a missing
manifest is one line that names the file and how to get the data."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT, SMALL
from dhumor.cli import run_lightning
from dhumor.errors import ConfigError
from dhumor.paths import get_data_hint


def _fit(*args):
    return run_lightning(["fit", "--config", str(ROOT / "configs" / "harmeme.yaml"), *SMALL, *args])


def test_relative_manifests_resolve_under_the_data_root(tmp_path, harmeme_fixture):
    cli = _fit("--data.root", str(harmeme_fixture.parent), "--data.train", harmeme_fixture.name, "--data.test",
               harmeme_fixture.name, "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path))
    assert cli.datamodule.resolve(harmeme_fixture.name) == harmeme_fixture
    assert len(cli.datamodule.datasets["train"]) + len(cli.datamodule.datasets["val"]) == 32


def test_the_environment_variable_is_the_default_root(tmp_path, harmeme_fixture, monkeypatch):
    monkeypatch.setenv("DHUMOR_DATA", str(harmeme_fixture.parent))
    cli = _fit("--data.train", harmeme_fixture.name, "--data.test", harmeme_fixture.name,
               "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path))
    assert len(cli.datamodule.datasets["train"]) > 0


def test_a_missing_manifest_names_the_file_and_how_to_get_the_data(tmp_path):
    with pytest.raises(ConfigError) as e:
        _fit("--data.root", str(tmp_path), "--trainer.fast_dev_run", "true",
             "--trainer.default_root_dir", str(tmp_path))  # the config's train: train.jsonl
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "train.jsonl")) and get_data_hint(tmp_path) in msg
    assert f"dhumor data harmeme SRC {tmp_path}" in msg  # the fix puts the data where this run looks


def test_every_data_option_is_described_in_fit_help(capsys):
    with pytest.raises(SystemExit):
        run_lightning(["fit", "--help"])
    out = capsys.readouterr().out
    assert "data root that relative paths resolve against" in out
    section = out.split("<class 'dhumor.data.datamodule.MemeDataModule'>:")[1].split("\n<")[0]
    blocks = re.split(r"\n(?=  --)", section.strip("\n"))
    options = {}
    for b in blocks:
        m = re.match(r"\s*--data\.(\w+)(?: \S+)?\s+(.*)", b, re.S)
        if m:
            options[m.group(1)] = " ".join(m.group(2).split())
    assert {"train", "val", "test", "predict", "root", "batch_size", "progress"} <= set(options)
    bare = [k for k, desc in options.items() if desc.startswith("(type:")]
    assert not bare, f"data options without a description: {bare}"


def test_missing_data_is_the_only_line_fit_prints(tmp_path):
    """The check runs before Lightning builds a trainer: no "Seed set", no GPU/TPU lines before it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DHUMOR_DATA": str(tmp_path / "nowhere")}
    p = subprocess.run([sys.executable, "-c", "import sys; from dhumor.cli import main; sys.exit(main())", "fit",
                        "--config", str(ROOT / "configs" / "harmeme.yaml")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 2
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "train.jsonl: data not found" in lines[0], lines
