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
MODEL_CARD = ROOT / "dhumor" / "assets" / "checkpoints" / "harmeme-tcrnet" / "MODEL_CARD.md"
# Benches that write a checkpoint (their numbers live in its dhumor.json), not a results file.
CHECKPOINT_WRITERS = {"calibrate_checkpoint.py", "ship_checkpoint.py", "add_ood_stats.py"}
HEADLINE_KEYS = ("harmful_acc", "harmful_macro_f1", "harmful_auroc", "harmfulness_macro_f1", "target_macro_f1")
PAGES = [README, MODEL_CARD, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture(autouse=False)
def results_dir():
    if not (RESULTS / "README.md").exists():  # an sdist ships tests/ without bench/
        pytest.skip("bench/results/ is not in this copy of the project")
    return RESULTS


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _source_rows() -> list[list[str]]:
    """(table, command, numbers in) rows of bench/results/README.md; a malformed row fails loudly."""
    rows = []
    for n, line in enumerate((RESULTS / "README.md").read_text(encoding="utf-8").splitlines(), 1):
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        assert len(cells) == 3, f"bench/results/README.md:{n}: {len(cells)} cells, not 3: {line[:80]}"
        if not cells[0].startswith("---") and cells[1] != "command":
            rows.append(cells)
    return rows


def _text(path: Path) -> str:
    return " ".join(path.read_text(encoding="utf-8").split())  # wrapped lines read as one


def test_every_published_number_names_a_command_and_a_committed_file(results_dir):
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
        # The page the row names must exist and name (one of) its files.
        for page in re.findall(r"`(docs/[\w-]+\.md)`", table):
            if not (ROOT / page).exists():
                bad.append(f"{table[:50]}: {page} does not exist")
            elif files and not any(Path(f).name in (ROOT / page).read_text(encoding="utf-8") for f in files):
                bad.append(f"{table[:50]}: {page} names none of {files}")
    assert not bad, "published numbers without a committed source:\n" + "\n".join(bad)


def _committed() -> set[str] | None:
    """Files of the checkout's HEAD commit (None outside a git checkout of this project)."""
    try:
        top = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=30)
        if top.returncode or Path(top.stdout.strip()).resolve() != ROOT.resolve():
            return None
        out = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", "HEAD"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


def test_every_named_results_file_is_committed(results_dir):
    """A file that exists here but not in HEAD is missing from every fresh clone (and from CI)."""
    committed = _committed()
    if committed is None:
        pytest.skip("not a git checkout of this project")
    named = {f for _, _, numbers_in in _source_rows()
             for f in re.findall(r"`([\w.-]+/[\w./-]+\.(?:json|md|png|ipynb))`", numbers_in)}
    assert not sorted(f for f in named if f not in committed), "named but not committed"


def test_every_results_file_is_listed_and_records_what_made_it(results_dir):
    listed = set(re.findall(r"`(bench/results/[\w.-]+)`", (RESULTS / "README.md").read_text(encoding="utf-8")))
    files = [p for p in RESULTS.iterdir() if p.suffix in (".json", ".md") and p.name != "README.md"]
    unlisted = [p.name for p in files if f"bench/results/{p.name}" not in listed]
    assert not unlisted, f"bench/results/README.md does not say what {unlisted} back"
    for p in RESULTS.glob("*.json"):
        data = json.loads(p.read_text(encoding="utf-8"))
        if "produced_by" in data:  # written by bench/record.py: what, where and on what it ran
            assert data["produced_by"].startswith(("python bench/", "python -m")), p.name
            assert data["machine"]["cores"] and "start" in data["load_average_1min"], p.name


def test_every_bench_writes_its_numbers_through_the_recorder():
    benches = [p for p in (ROOT / "bench").glob("*.py") if "def main" in p.read_text(encoding="utf-8")]
    if not benches:
        pytest.skip("bench/ is not in this copy of the project")
    assert len(benches) >= 15
    silent = [p.name for p in benches if p.name not in CHECKPOINT_WRITERS
              and "Recorder(" not in p.read_text(encoding="utf-8")]
    assert not silent, f"benches that only print (write bench/results/<name>.json via bench/record.py): {silent}"


def test_no_page_publishes_what_no_script_reproduces():
    bad = [(p.name, m) for p in PAGES if p.exists()
           for m in re.findall(r"not reproduced by a script|\(prints[^)]*\)|; prints", _text(p))]
    assert not bad, f"numbers without a committed source (move them to CHANGELOG.md): {bad}"


def _row(text: str, starts: str) -> list[str]:
    line = next((l for l in text.splitlines() if l.startswith(starts)), None)
    assert line is not None, f"no table row starts with {starts!r}"
    return [c.strip().strip("*") for c in _cells(line)][1:]


@pytest.mark.parametrize("page", ["docs/results.md", "README.md"])
def test_headline_table_is_the_committed_results_file(page, results_dir):
    """The headline rows read exactly what bench/harmeme_results.py wrote (mean ± sample std, 3 decimals)."""
    result = json.loads((RESULTS / "harmeme_val.json").read_text(encoding="utf-8"))
    assert "sample" in result["std"]
    text = (ROOT / page).read_text(encoding="utf-8")
    names = {"caption only": "| caption only", "image only": "| image only",
             "TCRNet caption+image": "| **TCRNet caption + image**"}
    assert {s["variant"] for s in result["summary"]} == set(names), "the file lacks a published variant"
    for s in result["summary"]:
        assert len(s["seeds"]) == 3
        want = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in HEADLINE_KEYS]
        assert _row(text, names[s["variant"]]) == want, f"{page}: {s['variant']}"
    if page == "docs/results.md":
        floor = result["floor"]
        want = [f"{floor[k]:.3f}" for k in HEADLINE_KEYS[:4]] + ["—"]
        assert _row(text, "| the floor") == want


def _get(file: str, *keys):
    value = json.loads((RESULTS / file).read_text(encoding="utf-8"))
    for k in keys:
        value = value[k] if not isinstance(k, tuple) else next(x for x in value if x[k[0]] == k[1])
    return value


def _tcr(key):
    return lambda: "{:.3f} ± {:.3f}".format(*_get("harmeme_val.json", "summary", ("variant", "TCRNet caption+image"), key))


def _review_800() -> list[float]:
    summary = _get("review_loop.json", "summary")
    cell = {s["ordering"]: s["harmful_macro_f1"] for s in summary if s["reviewed"] == 800}
    return [*cell["uncertain"], *cell["random"]]


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s"


def _f3(*path):
    return lambda: f"{_get(*path):.3f}"


# (page, what the page must say, produced from a committed file): prose and tables the headline test
# does not cover. A rerun that moves a number fails here until the page says the new one.
QUOTED = [
    (MODEL_CARD, _tcr("harmful_acc")), (MODEL_CARD, _tcr("harmful_macro_f1")), (MODEL_CARD, _tcr("harmful_auroc")),
    (ROOT / "docs" / "index.md", _tcr("harmful_acc")), (ROOT / "docs" / "index.md", _tcr("harmful_auroc")),
    (ROOT / "docs" / "results.md", lambda: f"{round(1000 * _get('harmeme_val.json', 'feature_timing', 'image_seconds_per_meme'))} ms"),
    (ROOT / "docs" / "results.md", lambda: f"{round(_get('harmeme_val.json', 'summary', ('variant', 'TCRNet caption+image'), 'fit_seconds_mean'))} s wall"),
    (ROOT / "docs" / "results.md", _f3("ece_noise.json", "ece")), (MODEL_CARD, _f3("ece_noise.json", "ece")),
    (README, _f3("ece_noise.json", "ece")),
    (ROOT / "docs" / "results.md", _f3("ece_noise_raw.json", "ece")),
    (ROOT / "docs" / "results.md", _f3("shipped_checkpoint_val_ocr_captions.json", "harmful", "macro_f1")),
    (README, _f3("shipped_checkpoint_val_ocr_captions.json", "harmful", "macro_f1")),
    (MODEL_CARD, _f3("shipped_checkpoint_val_ocr_captions.json", "harmful", "auroc")),
    (ROOT / "docs" / "scoring.md", lambda: "tried {tried}, handled {handled}".format(**_get("faults.json", "totals"))),
    (ROOT / "docs" / "scoring.md", lambda: "| {} |".format(
        _get("score.json", "stages", ("stage", "pipeline_no_explanations"), "memes_per_second"))),
    (ROOT / "docs" / "scoring.md", lambda: "| {} |".format(
        _get("score.json", "stages", ("stage", "ocr_rapidocr"), "memes_per_second"))),
    (ROOT / "docs" / "explanations.md", lambda: f"{round(_get('explain_server_down.json', 'seconds'))} s"),
    (README, lambda: f"{_get('demo_latency_browser.json', 'first_explanation', 'p50'):.2f} s"),
    (ROOT / "docs" / "install.md", lambda: _minutes(_get("setup_times.json", "steps", ("command", "make examples"), "seconds"))),
    (README, lambda: _minutes(_get("setup_times.json", "steps", ("command", "make test"), "seconds"))),
    (ROOT / "docs" / "review-loop.md",
     lambda: "| 800 | {:.3f} ± {:.3f} | {:.3f} ± {:.3f} |".format(*_review_800())),
    (ROOT / "docs" / "scoring.md", lambda: "| {:.3f} | {:.3f} |".format(
        _get("ocr_quality.json", "engines", ("engine", "rapidocr"), "cer"),
        _get("ocr_quality.json", "engines", ("engine", "rapidocr"), "wer"))),
    (ROOT / "docs" / "demo.md", lambda: f"| {_get('demo_latency_browser.json', 'full', 'p50'):.2f} |"),
    (ROOT / "docs" / "explanations.md", lambda: "| {:.2f} | **{:.2f}×** |".format(
        _get("explain_throughput.json", "results", ("config", "batched-v2"), "memes_per_minute"),
        _get("explain_throughput.json", "results", ("config", "batched-v2"), "ratio_to_sequential-v1"))),
]


@pytest.mark.parametrize("page,quote", QUOTED, ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(QUOTED)])
def test_pages_quote_their_committed_files(page, quote, results_dir):
    want = quote()
    assert want.replace("**", "") in _text(page).replace("**", ""), f"{page.name} should say {want!r}"
