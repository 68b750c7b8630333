"""The manual: the README stays a short entry point, and the documentation site builds in strict mode
(broken links, anchors, missing or un-navigated pages fail the build)."""
from __future__ import annotations

import importlib.util
import json
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


# ---------------------------------------------------------------- every published number has a source
RESULTS = ROOT / "bench" / "results"
# Benches that write a checkpoint (their numbers live in its dhumor.json), not a results file.
CHECKPOINT_WRITERS = {"calibrate_checkpoint.py", "ship_checkpoint.py", "add_ood_stats.py"}
HEADLINE_KEYS = ("harmful_acc", "harmful_macro_f1", "harmful_auroc", "harmfulness_macro_f1", "target_macro_f1")


def _source_rows() -> list[list[str]]:
    """(table, command, numbers in) rows of bench/results/README.md."""
    rows = []
    for line in (RESULTS / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and not cells[0].startswith("---") and cells[1] != "command":
            rows.append(cells)
    return rows


def _tracked() -> set[str] | None:
    """Files git tracks in this checkout (None outside a git checkout, e.g. an unpacked sdist)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


def test_every_published_number_names_a_command_and_a_committed_file():
    rows = _source_rows()
    assert len(rows) >= 20, "bench/results/README.md lists the source of every table"
    bad = []
    for table, command, numbers_in in rows:
        files = re.findall(r"`([\w.-]+/[\w./-]+\.(?:json|md|png|ipynb))`", numbers_in)
        scripts = re.findall(r"(?:python|bash) (bench/[\w.]+|notebooks/[\w.]+)", command) + \
            re.findall(r"`(notebooks/[\w.]+\.ipynb)`", command)
        if not scripts and "dhumor " not in command:
            bad.append(f"{table[:50]}: no command")
        if not files:
            bad.append(f"{table[:50]}: no committed results file")
        if re.search(r"outputs/|not reproduced|prints|not kept", numbers_in, re.I):
            bad.append(f"{table[:50]}: {numbers_in[:60]}")
        bad += [f"{table[:50]}: {f} does not exist" for f in files + scripts if not (ROOT / f).exists()]
        tracked = _tracked()
        bad += [f"{table[:50]}: {f} is not committed (a fresh clone lacks it)" for f in files + scripts
                if tracked is not None and (ROOT / f).exists() and f not in tracked]
    assert not bad, "published numbers without a committed source:\n" + "\n".join(bad)


def test_every_results_file_is_listed_and_records_what_made_it():
    listed = (RESULTS / "README.md").read_text(encoding="utf-8")
    unlisted = [p.name for p in RESULTS.glob("*.json") if p.name not in listed]
    assert not unlisted, f"bench/results/README.md does not say what {unlisted} back"
    for p in RESULTS.glob("*.json"):
        data = json.loads(p.read_text(encoding="utf-8"))
        if "produced_by" in data:  # written by bench/record.py: what, where and on what it ran
            assert data["produced_by"].startswith(("python bench/", "python -m")), p.name
            assert data["machine"]["cores"] and "start" in data["load_average_1min"], p.name


def test_every_bench_writes_its_numbers_through_the_recorder():
    benches = [p for p in (ROOT / "bench").glob("*.py") if "def main" in p.read_text(encoding="utf-8")]
    assert len(benches) >= 15
    silent = [p.name for p in benches if p.name not in CHECKPOINT_WRITERS
              and "Recorder(" not in p.read_text(encoding="utf-8")]
    assert not silent, f"benches that only print (write bench/results/<name>.json via bench/record.py): {silent}"


def _row(text: str, starts: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith(starts))
    return [c.strip().strip("*") for c in line.strip().strip("|").split("|")][1:]


@pytest.mark.parametrize("page", ["docs/results.md", "README.md"])
def test_headline_table_is_the_committed_results_file(page):
    """The headline rows read exactly what bench/harmeme_results.py wrote (mean ± sample std, 3 decimals)."""
    result = json.loads((RESULTS / "harmeme_val.json").read_text(encoding="utf-8"))
    assert "sample" in result["std"]
    text = (ROOT / page).read_text(encoding="utf-8")
    names = {"caption only": "| caption only", "image only": "| image only", "TCRNet caption+image": "| **TCRNet caption + image**"}
    for s in result["summary"]:
        want = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in HEADLINE_KEYS]
        assert _row(text, names[s["variant"]]) == want, f"{page}: {s['variant']}"


def test_index_page_quotes_the_headline_file():
    """docs/index.md repeats TCRNet's headline in prose: the same three numbers as harmeme_val.json."""
    result = json.loads((RESULTS / "harmeme_val.json").read_text(encoding="utf-8"))
    tcr = next(s for s in result["summary"] if s["variant"] == "TCRNet caption+image")
    text = " ".join((ROOT / "docs" / "index.md").read_text(encoding="utf-8").split())
    for k in ("harmful_acc", "harmful_macro_f1", "harmful_auroc"):
        assert f"{tcr[k][0]:.3f} ± {tcr[k][1]:.3f}" in text, k
