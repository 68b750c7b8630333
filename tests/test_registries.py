"""Registries: OCR engines, explanation backends and encoder families come from one place each; an
OCR engine is added by one new file (here: a plugin package with one module and its metadata)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dhumor.errors import ConfigError
from dhumor.registry import Registry

EXAMPLE = Path(__file__).resolve().parent.parent / "dhumor" / "assets" / "examples" / "chelsea.jpg"


def _plugin(tmp_path: Path) -> Path:
    """A separately installed OCR engine: one module, and the metadata pip writes for its
    ``[project.entry-points."dhumor.ocr_engines"]`` (what `pip install` of a plugin leaves behind)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "dummy_ocr.py").write_text(textwrap.dedent('''
        from dhumor.ocr.registry import ENGINES

        @ENGINES.register("dummy", requires=("json",), help="reads every meme as DUMMY TEXT", min_score=0.0)
        def dummy_engine():
            return lambda rgb: [([[0, 0], [10, 0], [10, 5], [0, 5]], f"DUMMY TEXT {rgb.shape[1]}", 0.99)]
    '''))
    dist = site / "dummy_ocr-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dummy-ocr\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dhumor.ocr_engines]\ndummy = dummy_ocr\n")
    return site


def _dhumor(args, site: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    return subprocess.run([sys.executable, "-m", "dhumor.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, **kw)


def test_a_new_ocr_engine_is_one_module(tmp_path):
    site = _plugin(tmp_path)
    helped = _dhumor(["score", "--help"], site)
    assert "dummy" in helped.stdout  # the CLI's choices come from the registry
    p = _dhumor(["ocr", str(EXAMPLE), "--ocr", "dummy", "--cache", str(tmp_path / "c.sqlite")], site)
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout.strip().splitlines()[-1])
    assert row["text"].startswith("DUMMY TEXT ") and row["id"] == "chelsea.jpg"
    # without the plugin, the same engine is a usage error naming the choices, before anything loads
    p = _dhumor(["ocr", str(EXAMPLE), "--ocr", "dummy"], tmp_path)
    assert p.returncode == 2 and "invalid choice: 'dummy'" in p.stderr


def test_registry_preflight_names_the_fix():
    r = Registry("widget", flag="--widget", fallback="pass --widget none")
    r.register("fancy", extra="fancy", requires=("no_such_module_xyz",))(lambda: None)

    def bad_settings(**kw):
        raise ConfigError(f"bad settings {kw}")

    r.register("picky", check=bad_settings)(lambda: None)
    with pytest.raises(ConfigError, match=r"missing no_such_module_xyz\): pip install 'dhumor\[fancy\]', or pass --widget none"):
        r.preflight("fancy")
    with pytest.raises(ConfigError, match="bad settings {'size': 3}"):
        r.preflight("picky", size=3)
    with pytest.raises(ConfigError, match=r"unknown widget 'nope' \(--widget\): choose one of fancy, picky"):
        r.get("nope")


def test_builtin_registries():
    from dhumor.encoders.modules import FAMILIES
    from dhumor.explain.backends import BACKENDS, check_backend
    from dhumor.ocr import ENGINES

    assert {"rapidocr", "easyocr"} <= set(ENGINES.names())
    assert BACKENDS.names() == ["offline", "openai", "transformers"]
    assert set(FAMILIES.names()) == {"efficientnet-lite", "vit", "hf-text"}
    with pytest.raises(ConfigError, match="--explain-model"):
        check_backend("transformers")
    with pytest.raises(ConfigError, match="unknown explanation backend 'gpt' \\(--explain\\)"):
        check_backend("gpt")
