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
    assert all("--threads" in text for text in (score, explain, demo))  # llama.cpp threads, wherever it explains


def test_threads_must_be_a_positive_whole_number(capsys):
    for cmd in (["demo"], ["explain", "x", "--out", "y.jsonl"], ["score", "x", "--out", "y.jsonl"]):
        for bad, why in (("0", "must be 1 or more"), ("two", "expected a whole number")):
            with pytest.raises(SystemExit) as e:
                main([*cmd, "--threads", bad])
            assert e.value.code == 2 and why in capsys.readouterr().err


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
    from dhumor.inference.pipeline import Pipeline

    demo_pipe = Pipeline.from_checkpoint(export)  # what the demo calls, with the caption the moderator sees
    demo = {m.id: demo_pipe.score_file(m.image, caption=m.caption) for m in memes}

    def load(p):
        return {r["id"]: r for r in map(json.loads, p.read_text().splitlines())}

    a, b, c = load(scored), load(evaluated), load(predicted)
    assert set(a) == set(b) == set(c) == set(demo)
    for mid in a:  # every command's row says which meme it is, as score's does
        for other in (b[mid], c[mid]):
            assert {k: other[k] for k in ("path", "sha256", "caption")} == {k: a[mid][k] for k in ("path", "sha256", "caption")}
    for mid in a:
        for other in (b[mid], c[mid], demo[mid]):
            assert other["decision"]["flagged"] == a[mid]["decision"]["flagged"]
            assert other["decision"]["threshold"] == a[mid]["decision"]["threshold"]
            for task, t in a[mid]["tasks"].items():
                assert other["tasks"][task]["label"] == t["label"]
                for cls, p in t["probs"].items():
                    assert other["tasks"][task]["probs"][cls] == pytest.approx(p, abs=1e-5)  # batch order: float32 noise


def test_one_meme_one_row_from_a_folder_without_captions(tmp_path, trained, capsys):
    """A folder has no captions: score and the demo read them by OCR through the one pipeline and agree;
    predict (captions as given, no OCR) refuses it in one line naming `dhumor score`."""
    folder = tmp_path / "memes"
    folder.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    export = trained / "export"
    scored = tmp_path / "score.jsonl"
    assert main(["score", str(folder), "--checkpoint", str(export), "--out", str(scored), "--quiet"]) == 0
    rows = {r["id"]: r for r in map(json.loads, scored.read_text().splitlines())}
    from dhumor.ocr import create_ocr
    from dhumor.inference.pipeline import Pipeline

    demo_pipe = Pipeline.from_checkpoint(export, ocr=create_ocr("rapidocr"))
    for name, row in rows.items():
        assert row["caption_source"] == "rapidocr" and row["caption"]
        demo = demo_pipe.score_file(folder / name)
        assert demo["caption"] == row["caption"] and demo["decision"] == row["decision"]
        for task, t in row["tasks"].items():
            for cls, p in t["probs"].items():
                assert demo["tasks"][task]["probs"][cls] == pytest.approx(p, abs=1e-5)
    capsys.readouterr()
    best = next((trained / "checkpoints").glob("best-*.ckpt"))
    assert main(["predict", "--config", str(trained / "config.yaml"), "--ckpt_path", str(best), "--data.predict",
                 str(folder), "--prediction_writer.output", str(tmp_path / "p.jsonl"),
                 "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dhumor score" in err and "without captions" in err
    assert not (tmp_path / "p.jsonl").exists()


def test_demo_without_gradio_names_the_extra(tmp_path):
    p = _run_cli(["demo", "--ocr", "none"], block=("gradio",))
    assert p.returncode == 2 and "pip install 'dhumor[demo]'" in p.stderr and p.stderr.strip().count("\n") == 0


def test_data_harmeme_keeps_subfolders_replaces_stale_files_and_refuses_bad_outputs(tmp_path, capsys):
    src = write_mmf_fixture(tmp_path / "mmf", {"train": 4, "val": 2, "test": 2})
    base = src / "data" / "datasets" / "memes" / "defaults"
    (base / "images" / "sub").mkdir()
    (base / "images" / "meme_001.png").rename(base / "images" / "sub" / "meme_001.png")
    rows = [json.loads(line) for line in (base / "annotations" / "train.jsonl").read_text().splitlines()]
    rows[1]["image"] = "sub/meme_001.png"
    (base / "annotations" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    stale = out / "images" / "meme_000.png"
    stale.write_bytes(b"\0" * (base / "images" / "meme_000.png").stat().st_size)  # same size, wrong bytes
    assert main(["data", "harmeme", str(src), str(out)]) == 0
    assert len(read_manifest(out / "train.jsonl").memes) == 4  # every image where the manifest says
    assert stale.read_bytes() == (base / "images" / "meme_000.png").read_bytes()
    capsys.readouterr()
    assert main(["data", "harmeme", str(src), str(base / "annotations")]) == 2
    assert "inside the source" in capsys.readouterr().err
    (base / "images" / "meme_002.png").unlink()
    (base / "images" / "meme_002.png").mkdir()  # a folder named like the image
    assert main(["data", "harmeme", str(src), str(tmp_path / "o2")]) == 2
    assert "not a regular file" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_data_harmeme_into_an_unwritable_place_is_exit_2(tmp_path, capsys):
    src = write_mmf_fixture(tmp_path / "mmf", {"train": 2, "val": 1, "test": 1})
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["data", "harmeme", str(src), str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the converted data" in err[0]


def test_graded_task_and_gated_task_follow_the_threshold():
    from dhumor.inference.decision import Decider
    from dhumor.schema import get_schema

    d = Decider(get_schema("harmeme"))
    probs = {"harmful": [0.45, 0.55], "harmfulness": [0.6, 0.3, 0.1], "target": [0.1, 0.2, 0.3, 0.4]}
    low = d.describe(probs, threshold=0.5)["tasks"]
    assert (low["harmful"]["label"], low["harmfulness"]["label"], low["target"]["label"]) == \
        ("yes", "somewhat harmful", "society")
    high = d.describe(probs, threshold=0.6)["tasks"]
    assert (high["harmful"]["label"], high["harmfulness"]["label"], high["target"]["label"]) == \
        ("no", "not harmful", None)


def test_a_manifest_row_without_its_image_keeps_its_id_and_is_not_written_twice(tmp_path, trained):
    (tmp_path / "images").mkdir()
    shutil.copy(EXAMPLES / "horse.jpg", tmp_path / "images" / "horse.jpg")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": "horse.jpg", "text": "x"}) + "\n"
                        + json.dumps({"id": "b", "image": "gone.jpg", "text": "y"}) + "\n")
    out = tmp_path / "r.jsonl"
    assert _score(manifest, out, ckpt=trained / "export") == 3
    shutil.copy(EXAMPLES / "horse.jpg", tmp_path / "images" / "gone.jpg")
    assert _score(manifest, out, ckpt=trained / "export") == 3  # an input error waits for --retry-errors
    assert _score(manifest, out, "--retry-errors", ckpt=trained / "export") == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == ["a", "b"]


def test_two_names_for_one_output_meet_at_one_lock(tmp_path):
    real = tmp_path / "r.jsonl"
    real.touch()
    alias = tmp_path / "alias.jsonl"
    alias.symlink_to(real.name)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dhumor.inference.results_file import claim_output; "
                               f"claim_output({str(real)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from dhumor.errors import ConfigError
        from dhumor.inference.results_file import claim_output

        with pytest.raises(ConfigError, match="already writing"):
            claim_output(alias)
    finally:
        holder.kill()
        holder.wait()
