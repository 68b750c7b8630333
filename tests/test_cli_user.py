"""What a user with only the public repository meets: getting the data, single files, exit codes,
one-line errors found before any model loads, and one decision for one meme whatever the command."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dhumor.cli import main
from dhumor.data.readers import read_manifest
from dhumor.data.synthetic import write_mmf_fixture

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "dhumor" / "assets" / "examples"


# ---------------------------------------------------------------- dhumor data harmeme
def test_data_harmeme_converts_all_three_splits(tmp_path, capsys):
    src = write_mmf_fixture(tmp_path / "mmf", {"train": 10, "val": 4, "test": 3})
    out = tmp_path / "harmeme-c"
    assert main(["data", "harmeme", str(src), str(out)]) == 0
    err = capsys.readouterr().err
    assert "train    10 memes" in err and "val       4 memes" in err and "test      3 memes" in err
    for split, n in (("train", 10), ("val", 4), ("test", 3)):
        res = read_manifest(out / f"{split}.jsonl")  # the layout training reads, images beside it
        assert len(res.memes) == n and all(m.image.parent == out / "images" for m in res.memes)
    assert len(list((out / "images").iterdir())) == 17
    # Rerunning over a finished conversion is harmless.
    assert main(["data", "harmeme", str(src), str(out)]) == 0


def test_data_harmeme_names_every_problem_and_writes_nothing(tmp_path, capsys):
    src = write_mmf_fixture(tmp_path / "mmf", {"train": 6, "val": 2, "test": 2})
    base = src / "data" / "datasets" / "memes" / "defaults"
    (base / "images" / "meme_001.png").unlink()
    with open(base / "annotations" / "val.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "x", "image": "meme_000.png", "labels": ["quite harmful"], "text": "t"}) + "\n")
    out = tmp_path / "out"
    assert main(["data", "harmeme", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s); nothing was written" in err
    assert "image not found" in err and "meme_001.png" in err and "quite harmful" in err
    assert not (out / "train.jsonl").exists()


def test_data_harmeme_missing_split_and_wrong_folder(tmp_path, capsys):
    src = write_mmf_fixture(tmp_path / "mmf")
    (src / "data" / "datasets" / "memes" / "defaults" / "annotations" / "test.jsonl").unlink()
    assert main(["data", "harmeme", str(src), str(tmp_path / "o")]) == 2
    assert "test.jsonl: missing" in capsys.readouterr().err
    assert main(["data", "harmeme", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "is this a clone of https://github.com/di-dimitrov/mmf" in capsys.readouterr().err


# ---------------------------------------------------------------- inputs and exit codes
def _score(src, out, *extra, ckpt=None):
    args = ["score", str(src), "--out", str(out), "--quiet", "--ocr", "none", *extra]
    return main(args + (["--checkpoint", str(ckpt)] if ckpt else []))


def test_a_single_image_file_is_an_input(tmp_path, trained):
    out = tmp_path / "one.jsonl"
    assert _score(EXAMPLES / "horse.jpg", out, ckpt=trained / "export") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["horse.jpg"] and rows[0]["decision"] is not None


def test_exit_code_3_when_some_rows_fail_and_every_row_is_written(tmp_path, trained, capsys):
    src = tmp_path / "memes"
    src.mkdir()
    shutil.copy(EXAMPLES / "horse.jpg", src / "good.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "r.jsonl"
    assert _score(src, out, ckpt=trained / "export") == 3
    rows = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    assert set(rows) == {"good.jpg", "broken.png"} and rows["broken.png"]["error"]
    assert "1 of 2 rows" in capsys.readouterr().err
    assert _score(src, out, ckpt=trained / "export") == 3  # a rerun over the same output says the same


def test_missing_checkpoint_fails_fast_in_one_line(tmp_path, capsys):
    assert _score(EXAMPLES, tmp_path / "r.jsonl", ckpt=tmp_path / "nope") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint not found" in err[0] and not (tmp_path / "r.jsonl").exists()


def test_missing_default_checkpoint_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DHUMOR_CHECKPOINT", str(tmp_path / "gone"))
    assert main(["score", str(EXAMPLES), "--out", str(tmp_path / "r.jsonl"), "--quiet", "--ocr", "none"]) == 2
    assert "DHUMOR_CHECKPOINT points at" in capsys.readouterr().err


def _run_cli(args, env_extra=None, block=()):
    """``dhumor ARGS`` in a fresh interpreter, with the modules in ``block`` made unimportable."""
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block) + \
           "from dhumor.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_missing_ocr_engine_fails_before_models_load(tmp_path):
    p = _run_cli(["score", str(EXAMPLES), "--out", str(tmp_path / "r.jsonl"), "--quiet"], block=("rapidocr",))
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "pip install 'dhumor[ocr]'" in p.stderr and "--ocr none" in p.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_missing_explainer_backend_fails_fast(tmp_path):
    p = _run_cli(["score", str(EXAMPLES), "--out", str(tmp_path / "r.jsonl"), "--ocr", "none", "--explain", "openai"],
                 env_extra={"DHUMOR_OPENAI_BASE_URL": ""})
    assert p.returncode == 2 and "--base-url" in p.stderr and p.stderr.strip().count("\n") == 0


def test_missing_input_and_unknown_output_suffix(tmp_path, capsys):
    assert _score(tmp_path / "nothing-here", tmp_path / "r.jsonl") == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert _score(EXAMPLES, tmp_path / "r.txt") == 2
    assert ".jsonl" in capsys.readouterr().err


def test_fit_with_a_missing_manifest_is_one_line(tmp_path, capsys):
    assert main(["fit", "--config", str(ROOT / "configs" / "harmeme.yaml"), "--data.train",
                 str(tmp_path / "missing.jsonl"), "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dhumor fit")]
    assert err and "missing.jsonl" in err[0] and "Traceback" not in err[0]


def test_help_shows_defaults_and_one_name_per_concept():
    from dhumor.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    score, explain, demo = (sub[n].format_help() for n in ("score", "explain", "demo"))
    for text in (score, explain, demo):
        assert "--explain-model" in text and "--similarity-threshold" in text and "(default: 3)" in text
        assert "--threshold " not in text and "--model " not in text
    assert "--decision-threshold" in score and "--decision-threshold" in demo
    assert "(default: rapidocr)" in score


# ---------------------------------------------------------------- one inference path
def test_one_meme_one_decision_in_score_evaluate_predict_and_demo(tmp_path, trained, harmeme_fixture):
    export = trained / "export"
    memes = read_manifest(harmeme_fixture).memes
    scored = tmp_path / "score.jsonl"
    assert main(["score", str(harmeme_fixture), "--checkpoint", str(export), "--out", str(scored), "--ocr", "none",
                 "--quiet"]) == 0
    evaluated = tmp_path / "eval.jsonl"
    assert main(["evaluate", "--checkpoint", str(export), "--manifest", str(harmeme_fixture), "--predictions",
                 str(evaluated), "--quiet"]) == 0
    predicted = tmp_path / "pred.jsonl"
    best = next((trained / "checkpoints").glob("best-*.ckpt"))
    assert main(["predict", "--config", str(trained / "config.yaml"), "--ckpt_path", str(best), "--data.predict",
                 str(harmeme_fixture), "--prediction_writer.output", str(predicted),
                 "--trainer.default_root_dir", str(tmp_path)]) == 0
    from dhumor.pipeline import Pipeline

    demo_pipe = Pipeline.from_checkpoint(export)  # what the demo calls, with the caption the moderator sees
    demo = {m.id: demo_pipe.score_file(m.image, caption=m.caption) for m in memes}

    def load(p):
        return {r["id"]: r for r in map(json.loads, p.read_text().splitlines())}

    a, b, c = load(scored), load(evaluated), load(predicted)
    assert set(a) == set(b) == set(c) == set(demo)
    for mid in a:
        for other in (b[mid], c[mid], demo[mid]):
            assert other["decision"]["flagged"] == a[mid]["decision"]["flagged"]
            assert other["decision"]["threshold"] == a[mid]["decision"]["threshold"]
            for task, t in a[mid]["tasks"].items():
                assert other["tasks"][task]["label"] == t["label"]
                for cls, p in t["probs"].items():
                    assert other["tasks"][task]["probs"][cls] == pytest.approx(p, abs=1e-5)  # batch order: float32 noise


def test_demo_without_gradio_names_the_extra(tmp_path):
    p = _run_cli(["demo", "--ocr", "none"], block=("gradio",))
    assert p.returncode == 2 and "pip install 'dhumor[demo]'" in p.stderr and p.stderr.strip().count("\n") == 0
