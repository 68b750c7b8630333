"""The review loop without a browser: queue order and progress, verdicts, export, conflicts and kappa,
and retraining from a checkpoint on reviewed memes (`model.init_from`, `data.extra`)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from dhumor.cli import main
from dhumor.data.readers import read_manifest
from dhumor.review.log import ReviewLog
from dhumor.review.queue import ReviewQueue, order_queue
from dhumor.review.export import check_labels, export_reviews
from dhumor.schema import DHUMOR, HARMEME

from conftest import SMALL, fit_cli

HARMFUL = {"harmful": "yes", "harmfulness": "very harmful", "target": "community"}
HARMLESS = {"harmful": "no", "harmfulness": "not harmful", "target": None}


def _row(i: int, p: float, th: float = 0.5, path: str | None = None) -> dict:
    probs = {"harmful": {"no": 1 - p, "yes": p}, "harmfulness": {"not harmful": 1 - p, "somewhat harmful": p,
                                                                  "very harmful": 0.0},
             "target": {"individual": 0.7, "organization": 0.1, "community": 0.1, "society": 0.1}}
    tasks = {t: {"label": max(v, key=v.get), "probs": v} for t, v in probs.items()}
    if p < th:
        tasks["target"]["label"] = None
    return {"id": f"m{i:02d}", "path": path or f"/nowhere/m{i:02d}.jpg", "sha256": f"{i:064x}", "caption": f"cap {i}",
            "tasks": tasks, "decision": {"task": "harmful", "flagged": p >= th, "threshold": th, "probability": p},
            "error": None}


def test_orders():
    rows = [_row(0, 0.95), _row(1, 0.52), _row(2, 0.10), _row(3, 0.40), _row(4, 0.70)]
    rows.append({"id": "bad", "decision": None, "error": "not an image"})
    assert [r["id"] for r in order_queue(rows, "uncertain")] == ["m01", "m03", "m04", "m02", "m00"]
    assert [r["id"] for r in order_queue(rows, "uncertain", threshold=0.9)] == ["m00", "m04", "m01", "m03", "m02"]
    assert [r["id"] for r in order_queue(rows, "flagged")] == ["m00", "m04", "m01", "m03", "m02"]
    a, b = order_queue(rows, "random", seed=0), order_queue(list(reversed(rows)), "random", seed=0)
    assert [r["id"] for r in a] == [r["id"] for r in b]  # seeded, independent of file order
    many = [_row(i, 0.5) for i in range(20)]
    assert [r["id"] for r in order_queue(many, "random", 1)] != [r["id"] for r in order_queue(many, "random", 2)]
    with pytest.raises(ValueError, match="unknown queue order"):
        order_queue(rows, "newest")


def test_check_labels():
    assert check_labels(HARMEME, {**HARMLESS, "target": "society"})["target"] is None  # gated off: never kept
    assert check_labels(HARMEME, HARMFUL) == HARMFUL
    with pytest.raises(ValueError, match="needs a target label"):
        check_labels(HARMEME, {**HARMFUL, "target": None})
    with pytest.raises(ValueError, match="contradicts harmfulness"):
        check_labels(HARMEME, {**HARMFUL, "harmfulness": "not harmful"})
    with pytest.raises(ValueError, match="unknown intensity label"):
        check_labels(DHUMOR, {"humor": "yes", "target": "other", "intensity": "extreme"})


def test_progress_survives_reopening_the_log(tmp_path):
    rows = [_row(i, p) for i, p in enumerate([0.9, 0.55, 0.2, 0.44])]
    path = tmp_path / "reviews.sqlite"
    q = ReviewQueue(rows, "q.jsonl", ReviewLog(path), HARMEME)
    assert q.progress("ana") == (0, 4)
    first = q.next_item("ana")
    assert first["id"] == "m01"  # nearest the threshold
    rid = q.record(first, HARMLESS, "ana", note="satire, not harmful", caption="corrected caption")
    with pytest.raises(ValueError, match="reviewer"):
        q.record(q.next_item("ana"), HARMLESS, "  ")
    q2 = ReviewQueue(rows, "q.jsonl", ReviewLog(path), HARMEME)  # a restarted demo
    assert q2.progress("ana") == (1, 4) and q2.progress("ben") == (0, 4)
    assert q2.next_item("ana")["id"] == "m03" and q2.next_item("ben")["id"] == "m01"
    assert q2.next_item("ana", skipped={"m03"})["id"] == "m02"
    rec = ReviewLog(path).labelled_rows()[0]
    assert rec["id"] == rid and rec["moderator"] == "ana" and rec["labels"] == HARMLESS and rec["created"]
    assert rec["caption"] == "corrected caption" and rec["note"] == "satire, not harmful"
    assert rec["verdict"] == "override: do not flag" and rec["final_flagged"] == 0  # the model flagged it (0.55)


def test_old_review_log_gains_queue_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE reviews (id INTEGER PRIMARY KEY AUTOINCREMENT, created TEXT NOT NULL,"
                " sha256 TEXT NOT NULL, filename TEXT, checkpoint TEXT, model_output TEXT NOT NULL,"
                " model_flagged INTEGER NOT NULL, threshold REAL, verdict TEXT NOT NULL, final_flagged INTEGER NOT NULL,"
                " note TEXT, moderator TEXT)")
    con.execute("INSERT INTO reviews (created, sha256, model_output, model_flagged, verdict, final_flagged) "
                "VALUES ('t', 'ab', '{}', 1, 'confirm', 1)")
    con.commit()
    con.close()
    log = ReviewLog(path)
    assert log.rows()[0]["labels"] is None and log.labelled_rows() == []
    # The demo's CSV export still works on the old rows, and says how many it wrote.
    assert log.export_csv(tmp_path / "r.csv") == len(log.rows()) == 1
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 2  # header + the one review


def _reviewed_log(tmp_path, harmeme_fixture) -> tuple[ReviewLog, list[dict]]:
    """Two reviewers over the fixture's first 6 memes: they agree on 4, disagree on 2."""
    memes = read_manifest(harmeme_fixture).memes[:6]
    rows = [_row(i, 0.3 + 0.1 * i, path=str(m.image)) | {"id": m.id, "sha256": _sha(m.image)}
            for i, m in enumerate(memes)]
    log = ReviewLog(tmp_path / "reviews.sqlite")
    q = ReviewQueue(rows, "q.jsonl", log, HARMEME, order="random")
    ana = [HARMFUL, HARMFUL, HARMLESS, HARMLESS, HARMFUL, HARMLESS]
    ben = [HARMFUL, HARMLESS, HARMLESS, HARMLESS, HARMFUL, {**HARMFUL, "target": "society"}]
    for row, a, b in zip(rows, ana, ben):
        q.record(row, a, "ana")
        q.record(row, b, "ben")
    q.record(rows[0], HARMLESS, "cy")  # a third reviewer on one meme: a conflict too
    q.record(rows[0], HARMFUL, "cy")   # ... until cy revises: the latest verdict per reviewer counts
    return log, rows


def test_export_conflicts_and_kappa(tmp_path, harmeme_fixture):
    log, rows = _reviewed_log(tmp_path, harmeme_fixture)
    out = tmp_path / "reviewed.jsonl"
    rep = export_reviews(log, out)
    assert sorted(c["id"] for c in rep.conflicts) == [rows[1]["id"], rows[5]["id"]]
    assert rep.written == 4 and rep.reviewers == ["ana", "ben", "cy"]
    ab = next(a for a in rep.agreement if a["reviewers"] == ["ana", "ben"])
    # harmful: ana y y n n y n, ben y n n n y y -> p_o = 4/6, p_e = 1/2, kappa = 1/3
    assert ab["n"] == 6 and ab["kappa"]["harmful"] == pytest.approx(1 / 3, abs=1e-4)
    assert ab["kappa"]["target"] is None  # both labelled a target on 2 memes, and always 'community'
    got = {m.id: m for m in read_manifest(out).memes}  # the manifest reads like any HarMeme file
    assert set(got) == {rows[i]["id"] for i in (0, 2, 3, 4)}
    m0 = got[rows[0]["id"]]
    assert (m0.labels["harmful"], m0.labels["harmfulness"], m0.labels["target"]) == (1, 2, 2)
    assert got[rows[2]["id"]].labels == {"harmful": 0, "harmfulness": 0, "target": -1}
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert {r["sha256"] for r in recs} == {rows[i]["sha256"] for i in (0, 2, 3, 4)}
    assert not list(tmp_path.glob(".*.tmp"))
    rep = export_reviews(log, out, include_conflicts=True)
    assert rep.written == 6
    latest = {m.id: m for m in read_manifest(out).memes}[rows[5]["id"]]
    assert latest.labels["target"] == HARMEME.task("target").index("society")  # ben's was the latest verdict


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_export_skips_moved_or_changed_images_and_refuses_empty(tmp_path, harmeme_fixture, copy_fixture):
    fixture = copy_fixture(harmeme_fixture)
    log, rows = _reviewed_log(tmp_path, fixture)
    Path(rows[0]["path"]).unlink()
    Path(rows[2]["path"]).write_bytes(Path(rows[3]["path"]).read_bytes())
    rep = export_reviews(log, tmp_path / "r.jsonl")
    assert rep.written == 2 and len(rep.skipped) == 2
    assert "image file not found" in rep.skipped[0] and "changed since it was reviewed" in rep.skipped[1]
    with pytest.raises(ValueError, match="no queue verdicts"):
        export_reviews(ReviewLog(tmp_path / "empty.sqlite"), tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="is a .jsonl file"):
        export_reviews(log, tmp_path / "r.csv")


def test_cli_reviews_export(tmp_path, harmeme_fixture, capsys):
    log, _ = _reviewed_log(tmp_path, harmeme_fixture)
    out = tmp_path / "reviewed.jsonl"
    assert main(["reviews", "export", "--out", str(out), "--review-log", log.path]) == 0
    err = capsys.readouterr().err
    assert "4 memes ->" in err and err.count("conflict on") == 2 and "--include-conflicts keeps them" in err
    assert main(["reviews", "export", "--out", str(out), "--review-log", str(tmp_path / "none.sqlite")]) == 2
    assert "none.sqlite: no review log here" in capsys.readouterr().err
    assert main(["reviews", "export", "--out", str(out), "--review-log", log.path]) == 0  # its own file: replaced
    manifest = tmp_path / "manifest.jsonl"  # anything else is left as it is
    manifest.write_text('{"id": "m1", "image": "a.jpg", "labels": ["not harmful"]}\n')
    assert main(["reviews", "export", "--out", str(manifest), "--review-log", log.path]) == 2
    assert manifest.read_text() == '{"id": "m1", "image": "a.jpg", "labels": ["not harmful"]}\n'
    assert "is not a reviewed manifest" in capsys.readouterr().err


def test_mix_extra():
    from dhumor.data.datamodule import mix_extra
    from dhumor.schema import Meme

    def memes(prefix, n, label=0):
        return [Meme(id=f"{prefix}{i}", image=Path(f"/img/{prefix}{i}.jpg"), labels={"harmful": (i + label) % 2})
                for i in range(n)]
    train, val, extra = memes("t", 40), memes("v", 5), memes("e", 20)
    extra.append(Meme(id="again", image=Path("/img/t3.jpg"), labels={"harmful": 1}))  # a train meme, relabelled
    tr, va = mix_extra(train, val, extra, None, 0.1, 0, "harmful")
    ids = [m.id for m in tr + va]
    assert "t3" not in ids and "again" in ids and len(ids) == len(set(ids)) == 40 - 1 + 5 + 21
    assert sum(m.id.startswith("e") or m.id == "again" for m in va) == 3  # 10% of the extra memes join val
    tr, _ = mix_extra(train, val, extra, 0.5, 0.1, 0, "harmful")
    assert sum(m.id.startswith("t") for m in tr) == round(0.5 * 21)
    tr2, _ = mix_extra(train, val, extra, 0.5, 0.1, 0, "harmful")
    assert [m.id for m in tr] == [m.id for m in tr2]  # seeded
    tr, va = mix_extra(train, None, extra[:3], None, 0.1, 0, "harmful")
    assert va is None and len(tr) == 43


def test_retrain_from_checkpoint_on_reviewed_memes(tmp_path, trained, harmeme_fixture):
    from dhumor.model.checkpoint import read_checkpoint
    from dhumor.model.loading import load_module
    from dhumor.model.lit import DHumorModule

    parent = trained / "export"
    # init_from takes the parent's architecture and weights, whatever else the arguments say
    m = DHumorModule(task="harmeme", streams=["caption"], d_model=32, init_from=str(parent))
    _, state = read_checkpoint(parent)
    assert m.stream_names == ["image", "caption"] and m.hparams["caption_encoder"] == "all-minilm-l6-v2"
    assert all(torch.equal(m.state_dict()[k], state[k]) for k in state)
    log, _ = _reviewed_log(tmp_path, harmeme_fixture)
    reviewed = tmp_path / "reviewed.jsonl"
    export_reviews(log, reviewed)
    root = tmp_path / "retrain"
    # the config asks for a caption-only model: the checkpoint's streams win (data module included)
    assert main(["fit", "--config", str(Path(__file__).parent.parent / "configs" / "harmeme.yaml"),
                 "--data.train", str(reviewed), "--data.test", "null", "--trainer.default_root_dir", str(root),
                 "--model.streams", "[caption]", "--model.init_from", str(parent), "--trainer.max_epochs", "2",
                 "--data.val_fraction", "0.5",
                 *SMALL]) == 0
    export = next(root.rglob("export"))
    meta, new_state = read_checkpoint(export)
    assert meta["hparams"]["init_from"] is None and meta["hparams"]["parent_checkpoint"] == str(parent)
    assert meta["hparams"]["streams"] == ["image", "caption"]
    assert any(not torch.equal(new_state[k], state[k]) for k in state)  # it trained
    load_module(export)  # a normal checkpoint: loads with nothing else, even if the parent is gone
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(harmeme_fixture), "--checkpoint", str(export), "--ocr", "none", "--out", str(out),
                 "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 32
    # mixed with the original data at a ratio
    root2 = tmp_path / "mixed"
    assert fit_cli(root2, harmeme_fixture, "--model.init_from", str(export), "--data.extra", str(reviewed),
                   "--data.extra_ratio", "2", "--trainer.max_steps", "1") == 0
    assert next(root2.rglob("export")).is_dir()


def test_init_from_refuses_a_missing_checkpoint(tmp_path):
    from dhumor.errors import CheckpointError
    from dhumor.model.lit import DHumorModule

    with pytest.raises(CheckpointError, match="checkpoint not found"):
        DHumorModule(init_from=str(tmp_path / "nope"))


def test_queue_over_a_folder_is_scored_once(tmp_path, trained, harmeme_fixture):
    from dhumor.inference.pipeline import Pipeline
    from dhumor.review.queue import load_queue_rows

    log = ReviewLog(tmp_path / "reviews.sqlite")
    pipe = Pipeline.from_checkpoint(trained / "export")
    folder = harmeme_fixture.parent / "images"
    path, rows = load_queue_rows(folder, pipe, log)
    assert path.parent == tmp_path / "queues" and len(rows) == 32
    before = path.read_bytes()
    assert len(load_queue_rows(folder, pipe, log)[1]) == 32 and path.read_bytes() == before  # resumed: nothing redone
    q = ReviewQueue(rows, path, log, pipe.schema, order="flagged")
    assert q.rows[0]["decision"]["flagged"] or not any(r["decision"]["flagged"] for r in rows)
    with pytest.raises(ValueError, match="no such results file or folder"):
        load_queue_rows(tmp_path / "missing", pipe, log)
    (tmp_path / "r.csv").write_text("id\n")
    with pytest.raises(ValueError, match="reads a JSONL results file"):
        load_queue_rows(tmp_path / "r.csv", pipe, log)
