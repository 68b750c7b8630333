"""The unfamiliarity score: fitted at export, carried in the checkpoint and by every row, used by the
decision (abstain / flag / ignore), the review queue and the CSV output; old checkpoints still work."""
from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dhumor.model.checkpoint import read_checkpoint, read_meta, write_checkpoint
from dhumor.cli import main
from dhumor.inference.decision import Decider
from dhumor.model.ood import METHODS, OODScorer
from dhumor.inference.pipeline import Pipeline
from dhumor.review.queue import order_queue
from dhumor.schema import get_schema

EXAMPLES = Path(__file__).resolve().parent.parent / "dhumor" / "assets" / "examples"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _score(src, out, ckpt, *extra) -> int:
    return main(["score", str(src), "--out", str(out), "--quiet", "--ocr", "none", "--checkpoint", str(ckpt), *extra])


def test_export_carries_statistics_from_train_and_a_threshold_from_the_held_out_split(trained):
    from safetensors.numpy import load_file

    meta = read_meta(trained / "export")
    ood = meta["ood"]
    assert ood["method"] in METHODS and np.isfinite(ood["threshold"])
    stats = trained / "export" / ood["file"]
    assert stats.stat().st_size == ood["bytes"] > 0
    tensors = load_file(stats)
    # 32 fixture memes, a quarter held out: the index holds the 24 training memes, never the held-out ones.
    assert ood["n_train"] == 24 and all(v.shape[0] == 24 for k, v in tensors.items() if k == "bank")
    assert ood["n_threshold"] == 8 and ood["held_out_quantiles"]["0.95"] == pytest.approx(ood["threshold"], abs=1e-6)
    assert 0 <= meta["abstention"]["uncertain_margin"] <= 1 and meta["abstention"]["coverage"] == 0.8


def test_the_reloaded_scorer_reproduces_the_export_threshold(trained, harmeme_fixture):
    """Scores at inference (Pipeline, statistics read back from ood.safetensors) equal those fit
    computed at export: 5% of the held-out split, rescored, lies above the recorded threshold."""
    from dhumor.data.datamodule import split_train_val
    from dhumor.data.readers import read_manifest

    meta = read_meta(trained / "export")
    _, held = split_train_val(read_manifest(harmeme_fixture).memes, 0.25, 0, "harmful")
    pipe = Pipeline.from_checkpoint(trained / "export")
    scores = [pipe.score_file(m.image, caption=m.caption)["ood"]["score"] for m in held]
    assert np.quantile(scores, 0.95) == pytest.approx(meta["ood"]["threshold"], rel=1e-4, abs=1e-3)
    assert np.quantile(scores, 0.5) == pytest.approx(meta["ood"]["held_out_quantiles"]["0.5"], rel=1e-4, abs=1e-3)


def test_every_row_carries_the_score_and_a_reload_gives_the_same(trained, harmeme_fixture, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert _score(harmeme_fixture, a, trained / "export") == 0
    assert _score(harmeme_fixture, b, trained / "export") == 0
    ra, rb = _rows(a), _rows(b)
    assert len(ra) == 32
    for r in ra:
        assert isinstance(r["ood"]["score"], float) and isinstance(r["ood"]["unfamiliar"], bool)
        assert set(r["decision"]) >= {"flagged", "abstain", "reason"}
        assert r["decision"]["abstain"] == r["ood"]["unfamiliar"]  # default --on-unfamiliar abstain, no other reason
    assert [r["ood"] for r in ra] == [r["ood"] for r in rb]
    # The library path (one meme at a time) gives the row's score.
    pipe = Pipeline.from_checkpoint(trained / "export")
    one = pipe.score_file(harmeme_fixture.parent / "images" / "meme_000.png", caption=ra[0]["caption"])
    first = next(r for r in ra if r["id"] == "meme_000")
    assert one["ood"]["score"] == pytest.approx(first["ood"]["score"], rel=1e-5, abs=1e-5)  # batch vs one: float noise


def test_an_in_domain_meme_is_more_familiar_than_a_noise_picture_without_text(trained, harmeme_fixture, tmp_path):
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (160, 160), dtype=np.uint8)).convert("RGB").save(noise)
    pipe = Pipeline.from_checkpoint(trained / "export")
    memes = [json.loads(line) for line in harmeme_fixture.read_text().splitlines()]
    own = [pipe.score_file(harmeme_fixture.parent / "images" / m["image"], caption=m["text"])["ood"]["score"]
           for m in memes[:8]]
    far = pipe.score_file(noise, caption="")
    assert far["ood"]["score"] > max(own)
    assert far["ood"]["unfamiliar"] and far["decision"]["abstain"] and far["decision"]["reason"] == "unfamiliar"


@pytest.mark.parametrize("policy", ["abstain", "flag", "ignore"])
def test_on_unfamiliar_decides_per_flag(trained, harmeme_fixture, tmp_path, policy):
    base, out = tmp_path / "base.jsonl", tmp_path / f"{policy}.jsonl"
    assert _score(harmeme_fixture, base, trained / "export", "--ood-threshold", "1e9") == 0  # nothing unfamiliar
    # An enormously low threshold: every meme is unfamiliar.
    assert _score(harmeme_fixture, out, trained / "export", "--ood-threshold=-1e9", "--on-unfamiliar", policy) == 0
    before = {r["id"]: r for r in _rows(base)}
    for r in _rows(out):
        d, was = r["decision"], before[r["id"]]["decision"]
        assert r["ood"]["unfamiliar"] and not before[r["id"]]["ood"]["unfamiliar"]
        assert r["ood"]["score"] == before[r["id"]]["ood"]["score"]
        assert r["tasks"] == before[r["id"]]["tasks"]  # the probabilities never change
        if policy == "abstain":
            assert d["abstain"] and d["reason"] == "unfamiliar" and d["flagged"] == was["flagged"]
        elif policy == "flag":
            assert d["flagged"] and not d["abstain"] and d["reason"] == "unfamiliar"
        else:
            assert d == was and d["reason"] is None


def test_decider_abstains_near_the_threshold_only_with_the_preset():
    schema = get_schema("harmeme")
    probs = {"harmful": np.array([0.45, 0.55]), "harmfulness": np.array([0.5, 0.3, 0.2]),
             "target": np.array([0.7, 0.1, 0.1, 0.1])}
    plain = Decider(schema, {"balanced": 0.5}).describe(probs)["decision"]
    assert plain["abstain"] is False and plain["reason"] is None and plain["flagged"]
    band = Decider(schema, {"balanced": 0.5}, uncertain_margin=0.1)
    assert band.describe(probs)["decision"]["reason"] == "uncertain"
    assert band.describe(probs, threshold=0.2)["decision"]["abstain"] is False  # 0.35 away from 0.2
    # Unfamiliar wins over uncertain; ignore leaves the uncertainty band in charge.
    assert band.describe(probs, ood={"score": 9.0, "unfamiliar": True})["decision"]["reason"] == "unfamiliar"
    ig = Decider(schema, {"balanced": 0.5}, on_unfamiliar="ignore", uncertain_margin=0.1)
    assert ig.describe(probs, ood={"score": 9.0, "unfamiliar": True})["decision"]["reason"] == "uncertain"
    with pytest.raises(ValueError, match="on_unfamiliar"):
        Decider(schema, on_unfamiliar="panic")


def test_abstain_uncertain_flag_uses_the_checkpoints_preset(trained, harmeme_fixture, tmp_path):
    out = tmp_path / "u.jsonl"
    assert _score(harmeme_fixture, out, trained / "export", "--abstain-uncertain", "--ood-threshold", "1e9") == 0
    margin = read_meta(trained / "export")["abstention"]["uncertain_margin"]
    for r in _rows(out):
        d = r["decision"]
        assert d["abstain"] == (abs(d["probability"] - d["threshold"]) < margin)
        assert d["reason"] == ("uncertain" if d["abstain"] else None)


def test_queue_order_unfamiliar_puts_the_most_unfamiliar_first():
    def row(i, score, p):
        return {"id": i, "decision": {"probability": p, "threshold": 0.5, "flagged": p >= 0.5},
                "ood": None if score is None else {"score": score, "unfamiliar": score > 1}}

    rows = [row("a", 0.2, 0.5), row("b", 3.0, 0.9), row("c", None, 0.5), row("d", 1.5, 0.1), row("e", None, 0.9)]
    assert [r["id"] for r in order_queue(rows, "unfamiliar")] == ["b", "d", "a", "c", "e"]


def test_csv_output_has_the_columns_and_the_summary_counts(trained, harmeme_fixture, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert _score(harmeme_fixture, out, trained / "export", "--ood-threshold=-1e9") == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["unfamiliar"] == summary["abstained"] == 32 and summary["unfamiliar_share"] == 1.0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"abstain", "abstain_reason", "ood_score", "unfamiliar"} <= set(rows[0])
    assert all(r["unfamiliar"] == "True" and r["abstain_reason"] == "unfamiliar" and np.isfinite(float(r["ood_score"]))
               for r in rows)
    assert _score(harmeme_fixture, out, trained / "export", "--ood-threshold=-1e9") == 0  # a rerun resumes its CSV
    capsys.readouterr()
    # ... but never with another abstention policy: the rows would mix two (provenance records it)
    assert _score(harmeme_fixture, out, trained / "export") == 2
    assert "unfamiliar above -1000000000.0 -> abstain" in capsys.readouterr().err


def test_a_checkpoint_without_statistics_still_scores_and_says_so_once(trained, harmeme_fixture, tmp_path, caplog):
    meta, state = read_checkpoint(trained / "export")
    old = write_checkpoint(state, {k: v for k, v in meta.items() if k not in ("ood", "abstention")}, tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="dhumor"):
        pipes = [Pipeline.from_checkpoint(old) for _ in range(2)]
    assert sum("no unfamiliarity statistics" in r.getMessage() for r in caplog.records) == 1
    row = pipes[0].score_file(harmeme_fixture.parent / "images" / "meme_001.png", caption="happy coffee")
    assert row["ood"] is None and row["decision"]["abstain"] is False and row["decision"]["reason"] is None
    new = Pipeline.from_checkpoint(trained / "export").score_file(harmeme_fixture.parent / "images" / "meme_001.png",
                                                                  caption="happy coffee")
    assert new["tasks"] == row["tasks"]  # the statistics never change a probability
    # A partial copy (dhumor.json names a statistics file that is not there) is a damaged checkpoint: refused
    # by name, never a run that silently abstains on nothing.
    from dhumor.errors import CheckpointError

    partial = tmp_path / "partial"
    shutil.copytree(trained / "export", partial)
    (partial / meta["ood"]["file"]).unlink()
    with pytest.raises(CheckpointError, match="ood.safetensors: missing"):
        Pipeline.from_checkpoint(partial)


def test_refitting_writes_the_same_statistics_file_and_a_damaged_one_is_refused(trained, tmp_path):
    meta = read_meta(trained / "export")
    s = OODScorer.load(trained / "export", meta["ood"])
    data = s.to_bytes()
    assert len(data) == meta["ood"]["bytes"]
    bad = tmp_path / "bad"
    shutil.copytree(trained / "export", bad)
    (bad / meta["ood"]["file"]).write_bytes(b"not safetensors")
    from dhumor.errors import CheckpointError

    with pytest.raises(CheckpointError, match="cannot read unfamiliarity statistics"):
        OODScorer.load(bad, meta["ood"])


def test_the_demo_shows_the_score_and_why_it_abstains():
    from dhumor.app.demo import unfamiliar_markdown

    text = unfamiliar_markdown({"decision": {"abstain": True, "reason": "unfamiliar"},
                                "ood": {"score": 0.71, "unfamiliar": True}})
    assert "0.710" in text and "abstains" in text and "unlike its training memes" in text
    assert "too close to the threshold" in unfamiliar_markdown({"decision": {"abstain": True, "reason": "uncertain"},
                                                                "ood": {"score": 0.1, "unfamiliar": False}})
    assert unfamiliar_markdown({"decision": {"abstain": False, "reason": None}, "ood": None}) == ""


def test_the_shipped_checkpoint_scores_unfamiliarity_without_changing_a_probability(tmp_path):
    from dhumor.resources import SHIPPED_CHECKPOINT

    meta = read_meta(SHIPPED_CHECKPOINT)
    assert meta["ood"]["method"] in METHODS and (Path(SHIPPED_CHECKPOINT) / meta["ood"]["file"]).is_file()
    bare = tmp_path / "bare"
    shutil.copytree(SHIPPED_CHECKPOINT, bare)
    (bare / meta["ood"]["file"]).unlink()
    m = json.loads((bare / "dhumor.json").read_text())
    del m["ood"], m["abstention"]
    (bare / "dhumor.json").write_text(json.dumps(m))
    img = EXAMPLES / "horse.jpg"
    with_stats = Pipeline.from_checkpoint(SHIPPED_CHECKPOINT).score_file(img, caption="when you bet everything")
    without = Pipeline.from_checkpoint(bare).score_file(img, caption="when you bet everything")
    assert with_stats["tasks"] == without["tasks"] and without["ood"] is None
    assert isinstance(with_stats["ood"]["score"], float)


def test_evaluate_summary_counts_unfamiliar_and_abstained(trained, harmeme_fixture, capsys):
    assert main(["evaluate", "--manifest", str(harmeme_fixture), "--checkpoint", str(trained / "export"), "--quiet",
                 "--json", "--ood-threshold=-1e9", "--on-unfamiliar", "flag"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    summary = json.loads(next(line for line in reversed(err) if line.startswith("{")))
    assert summary["unfamiliar"] == 32 and summary["unfamiliar_share"] == 1.0 and summary["abstained"] == 0


def test_abstain_uncertain_without_a_preset_is_refused_before_a_model_loads(trained, harmeme_fixture, tmp_path,
                                                                             capsys):
    meta, state = read_checkpoint(trained / "export")
    old = write_checkpoint(state, {k: v for k, v in meta.items() if k not in ("ood", "abstention")}, tmp_path / "old")
    assert _score(harmeme_fixture, tmp_path / "r.jsonl", old, "--abstain-uncertain") == 2
    assert "no confidence-abstention preset" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()
