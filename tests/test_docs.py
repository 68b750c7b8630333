"""The manual: the README stays a short entry point, and the documentation site builds in strict mode
(broken links, anchors, missing or un-navigated pages fail the build)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 250


def test_readme_is_a_short_manual_entry():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): " \
        "move detail into a docs/ page and link it"
    text = "\n".join(lines)
    # The two commands of the README; CI (.ci/run) runs the second one.
    assert "make examples" in text and "make test" in text


def test_readme_links_point_at_files_in_the_repository():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://|#", t)]
    assert targets, "README.md links into the documentation"
    missing = [t for t in targets if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_manual_names_no_machine_local_paths():
    """A user who clones the public repository has no ../shared or /work: data comes via DHUMOR_DATA."""
    pages = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = [(p.name, m) for p in pages if p.exists()
           for m in re.findall(r"\.\./shared|/work/\S*", p.read_text(encoding="utf-8"))]
    assert not bad, f"machine-local paths in the manual: {bad}"


def test_docs_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs / mkdocs-material not installed (pip install -e '.[dev]' installs them)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"mkdocs build --strict failed:\n{p.stdout}\n{p.stderr}"
    assert (tmp_path / "site" / "index.html").exists()
    for page in ("install", "scoring", "explanations", "results"):
        assert (tmp_path / "site" / page / "index.html").exists(), page
