"""Task schema presets, label mappings against golden files, and reader errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from dhumor.data.readers import read_dhumor_table, read_harmeme_jsonl, read_image_folder, read_manifest
from dhumor.errors import DataError
from dhumor.schema import DHUMOR, HARMEME, TaskSchema, get_schema

GOLDEN = Path(__file__).parent / "golden"


def test_presets_match_the_design():
    assert [(t.name, t.num_classes) for t in DHUMOR.tasks] == [("humor", 2), ("target", 6), ("intensity", 3)]
    assert [(t.name, t.num_classes) for t in HARMEME.tasks] == [("harmful", 2), ("harmfulness", 3), ("target", 4)]
    assert DHUMOR.task("target").gate == "humor" and HARMEME.task("target").gate == "harmful"
    assert get_schema("dhumor") is DHUMOR
    assert TaskSchema.from_dict(HARMEME.to_dict()) == HARMEME


@pytest.mark.parametrize("name,schema", [("harmeme_labels.json", HARMEME), ("dhumor_labels.json", DHUMOR)])
def test_schema_classes_match_golden(name, schema):
    golden = json.loads((GOLDEN / name).read_text())["schema"]
    assert {t.name: list(t.classes) for t in schema.tasks} == golden


def _image(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "white").save(path)


def test_harmeme_label_mapping_matches_golden(tmp_path):
    rows = json.loads((GOLDEN / "harmeme_labels.json").read_text())["rows"]
    with open(tmp_path / "m.jsonl", "w") as fh:
        for i, r in enumerate(rows):
            _image(tmp_path / "images" / f"{i}.png")
            fh.write(json.dumps({"id": str(i), "image": f"{i}.png", "labels": r["labels"], "text": "t"}) + "\n")
    memes = read_harmeme_jsonl(tmp_path / "m.jsonl").memes
    assert [m.labels for m in memes] == [r["expected"] for r in rows]


def _write_dhumor(tmp_path: Path, rows, name="d.csv") -> Path:
    path = tmp_path / name
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["post id", "Text", "Explanation1", "Dark", "Target", "Intensity"])
        for i, (dark, target, intensity) in enumerate(rows):
            _image(tmp_path / "images" / f"p{i}.jpg")
            w.writerow([f"p{i}", f"caption {i}", f"explanation {i}", dark, target, intensity])
    return path


@pytest.mark.parametrize("table", json.loads((GOLDEN / "dhumor_labels.json").read_text())["tables"],
                         ids=lambda t: t["name"])
def test_dhumor_label_mapping_matches_golden(tmp_path, table):
    memes = read_dhumor_table(_write_dhumor(tmp_path, table["rows"])).memes
    got = [[m.labels["humor"], m.labels["target"], m.labels["intensity"]] for m in memes]
    assert got == table["expected"]
    assert memes[1].caption == "caption 1" and memes[1].explanation == "explanation 1"


def test_dhumor_xlsx_is_read(tmp_path):
    import pandas as pd

    for i in range(3):
        _image(tmp_path / "images" / f"{i}.png")
    # Intensity codes {1, 2} alone could be either base; Target's 0 settles the file's convention.
    df = pd.DataFrame({"post id": [0, 1, 2], "Text": ["a", "b", "c"], "Explanation1": ["x", None, "z"],
                       "Dark": [0, 1, 1], "Target": [None, 0, 2], "Intensity": [None, 1, 2]})
    df.to_excel(tmp_path / "d.xlsx", index=False)
    memes = read_manifest(tmp_path / "d.xlsx").memes
    assert [m.id for m in memes] == ["0", "1", "2"]
    assert [m.labels for m in memes[1:]] == [{"humor": 1, "target": 0, "intensity": 1},
                                             {"humor": 1, "target": 2, "intensity": 2}]
    assert memes[1].explanation is None


def test_ambiguous_code_base_is_an_error_not_a_guess(tmp_path):
    path = _write_dhumor(tmp_path, [["1", "1", "1"], ["0", "", ""], ["1", "2", "2"]])
    with pytest.raises(DataError, match="'Target': codes \\[1, 2\\] could be 0- or 1-based"):
        read_dhumor_table(path)
    assert read_dhumor_table(path, label_base=0).memes[0].labels == {"humor": 1, "target": 1, "intensity": 1}


def test_bad_rows_name_file_row_and_reason(tmp_path):
    path = _write_dhumor(tmp_path, [["0", "", ""], ["1", "weird", "mild"], ["1", "other", "mild"]])
    (tmp_path / "images" / "p2.jpg").unlink()
    with pytest.raises(DataError) as e:
        read_dhumor_table(path)
    assert e.value.file == str(path) and e.value.row == 3 and "unknown 'Target' label 'weird'" in e.value.reason
    res = read_dhumor_table(path, skip_bad=True)
    assert [m.id for m in res.memes] == ["p0"]
    assert [(s.row, "not" in s.reason or "no image" in s.reason) for s in res.skipped] == [(3, False), (4, True)]


def test_harmeme_bad_rows(tmp_path):
    _image(tmp_path / "images" / "a.png")
    lines = [json.dumps({"id": "a", "image": "a.png", "labels": ["not harmful"], "text": "x"}),
             "{not json",
             json.dumps({"id": "b", "image": "missing.png", "labels": ["not harmful"]}),
             json.dumps({"id": "c", "image": "a.png", "labels": ["mildly harmful"]})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl:2: invalid JSON"):
        read_harmeme_jsonl(tmp_path / "m.jsonl")
    res = read_harmeme_jsonl(tmp_path / "m.jsonl", skip_bad=True)
    assert [m.id for m in res.memes] == ["a"]
    reasons = [(e.row, e.reason) for e in res.skipped]
    assert reasons[0][0] == 2 and reasons[1] == (3, f"image not found: {tmp_path / 'images' / 'missing.png'}")
    assert reasons[2][0] == 4 and "unknown harmfulness label 'mildly harmful'" in reasons[2][1]


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_manifest(tmp_path / "e.jsonl")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_manifest(tmp_path / "e.csv", skip_bad=True)  # an empty file is never silently "skipped"
    with pytest.raises(DataError, match="file not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_duplicate_ids_are_refused(tmp_path):
    _image(tmp_path / "images" / "a.png")
    row = json.dumps({"id": "a", "image": "a.png", "labels": ["not harmful"]})
    (tmp_path / "m.jsonl").write_text(row + "\n" + row + "\n")
    with pytest.raises(DataError, match="duplicate id 'a'"):
        read_manifest(tmp_path / "m.jsonl")


def test_image_folder_is_recursive_and_sorted(tmp_path):
    for rel in ["b.png", "a/z.jpg", "a/y.webp", "notes.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            p.write_text("x")
        else:
            _image(p)
    ids = [m.id for m in read_image_folder(tmp_path).memes]
    assert ids == ["b.png", "a/y.webp", "a/z.jpg"] or ids == ["a/y.webp", "a/z.jpg", "b.png"]
    assert all(m.labels == {} for m in read_image_folder(tmp_path).memes)


def test_fixture_readers(harmeme_fixture, dhumor_fixture):
    h = read_manifest(harmeme_fixture)
    d = read_manifest(dhumor_fixture)
    assert len(h.memes) == 32 and h.schema_name == "harmeme"
    assert len(d.memes) == 32 and d.schema_name == "dhumor"
    assert all((m.labels["target"] == -1) == (m.labels["humor"] == 0) for m in d.memes)
