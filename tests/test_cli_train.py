"""Training through the real CLI on a tiny generated fixture, then reload, predict and evaluate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dhumor.model.checkpoint import read_checkpoint
from dhumor.model.loading import load_module
from dhumor.cli import main
from dhumor.data.readers import read_manifest
from dhumor.inference.pipeline import Pipeline

from conftest import fit_cli as _fit


def test_fast_dev_run(tmp_path, harmeme_fixture):
    assert _fit(tmp_path, harmeme_fixture, "--trainer.fast_dev_run", "true") == 0


def test_fast_dev_run_dhumor_with_explanation_column(tmp_path, dhumor_fixture):
    assert _fit(tmp_path, dhumor_fixture, "--trainer.fast_dev_run", "true", "--model.streams",
                "[image, caption, reasoning]", "--data.images", str(dhumor_fixture.parent / "images"),
                config="configs/dhumor.yaml") == 0


def test_export_has_schema_config_and_safetensors(trained):
    export = trained / "export"
    meta = json.loads((export / "dhumor.json").read_text())
    assert meta["schema"]["name"] == "harmeme" and meta["encoders"]["caption"]["name"] == "all-minilm-l6-v2"
    assert meta["config"]["model"]["caption_encoder"] == "all-minilm-l6-v2"  # the resolved config travels along
    assert meta["metrics"]["selection"]["monitor"] == "val/macro_f1"
    assert (export / "model.safetensors").exists() and not list(export.glob("*.ckpt"))


def test_reloaded_checkpoint_gives_the_same_predictions(trained, harmeme_fixture):
    memes = read_manifest(harmeme_fixture).memes
    best = next((trained / "checkpoints").glob("best-*.ckpt"))
    a = Pipeline.from_checkpoint(trained / "export").predict_memes(memes).probs
    b = Pipeline.from_checkpoint(best).predict_memes(memes).probs  # the Lightning .ckpt, weights_only
    for task in a:
        np.testing.assert_allclose(a[task], b[task], rtol=0, atol=1e-6)
        assert a[task].shape == (32, {"harmful": 2, "harmfulness": 3, "target": 4}[task])
    # The selected weights are what was exported: same tensors as the best .ckpt.
    _, exported = read_checkpoint(trained / "export")
    lightning_state = torch.load(best, weights_only=True)["state_dict"]
    assert all(torch.equal(exported[k], lightning_state[k]) for k in exported)


def test_predict_writes_one_row_per_meme(trained, harmeme_fixture, tmp_path):
    out = tmp_path / "pred.jsonl"
    best = next((trained / "checkpoints").glob("best-*.ckpt"))
    assert main(["predict", "--config", str(trained / "config.yaml"), "--ckpt_path", str(best),
                 "--data.predict", str(harmeme_fixture), "--prediction_writer.output", str(out),
                 "--trainer.default_root_dir", str(tmp_path)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(m.id for m in read_manifest(harmeme_fixture).memes)
    probs = Pipeline.from_checkpoint(trained / "export").predict_memes(read_manifest(harmeme_fixture).memes).probs
    by_id = {r["id"]: r for r in rows}
    first = read_manifest(harmeme_fixture).memes[0].id
    assert by_id[first]["tasks"]["harmful"]["probs"]["yes"] == pytest.approx(probs["harmful"][0, 1], abs=1e-5)
    assert not list(tmp_path.glob("*.part"))


def test_evaluate_json_on_memes_the_model_never_saw(trained, tmp_path, capsys):
    from dhumor.data.synthetic import write_fixture

    unseen = write_fixture(tmp_path / "unseen", n=40, seed=11)  # another seed: other images and captions
    assert main(["evaluate", "--checkpoint", str(trained / "export"), "--manifest", str(unseen),
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"harmful", "harmfulness", "target"}
    assert {"accuracy", "macro_f1", "weighted_f1", "auroc", "n"} <= set(out["harmful"])
    assert "auroc" not in out["harmfulness"] and out["harmful"]["n"] == 40
    assert out["target"]["n"] == sum(1 for m in read_manifest(unseen).memes if m.labels["target"] >= 0)
    # The fixtures' captions and colours carry the label: what 6 epochs on 24 memes learnt carries over.
    assert out["harmful"]["auroc"] > 0.75


def test_export_carries_calibration_thresholds_and_reasoning_source(trained):
    meta = json.loads((trained / "export" / "dhumor.json").read_text())
    th = meta["thresholds"]
    assert set(th) == {"high recall", "balanced", "high precision"} and all(0 < v < 1 for v in th.values())
    assert set(meta["calibration"]) == {"harmful", "harmfulness", "target"}
    assert all(c["temperature"] > 0 for c in meta["calibration"].values())
    assert meta["reasoning_source"] == {"kind": "none"}  # image + caption: no reasoning stream
    assert meta["metrics"]["calibration_split"]["n"] == 8  # the held-out quarter of 32 memes


def test_evaluate_unseen_manifest_and_bad_images(trained, capsys):
    from dhumor.data.synthetic import write_fixture

    tmp = Path(trained) / "unseen"
    manifest = write_fixture(tmp, n=12, seed=7)
    (tmp / "images" / "meme_003.png").write_bytes(b"not an image")
    assert main(["evaluate", "--checkpoint", str(trained / "export"), "--manifest", str(manifest), "--json",
                 "--quiet"]) == 2
    assert "meme_003.png: not a recognised image format" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(trained / "export"), "--manifest", str(manifest), "--json",
                 "--quiet", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["harmful"]["n"] == 11
    assert '"unusable_images": 1' in captured.err


def test_evaluate_refuses_wrong_label_space(trained, dhumor_fixture, capsys):
    assert main(["evaluate", "--checkpoint", str(trained / "export"), "--manifest", str(dhumor_fixture),
                 "--quiet"]) == 2
    assert "carries 'dhumor' labels" in capsys.readouterr().err


def test_pickled_code_is_refused(tmp_path, trained):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as fh:
        pickle.dump({"state_dict": {}, "hyper_parameters": {}, "x": Evil()}, fh)
    from dhumor.errors import CheckpointError

    with pytest.raises(CheckpointError, match="pickled code is never run"):
        load_module(bad)


def test_compiled_fit_trains_exports_clean_weights_and_reloads(tmp_path, harmeme_fixture):
    """`model.compile: true` on CPU: fit runs the compiled network, the export has only plain weight
    names, and the reloaded (uncompiled) module predicts what the trained compiled one does."""
    from dhumor.cli import run_lightning
    from conftest import ROOT, SMALL

    cli = run_lightning(["fit", "--config", str(ROOT / "configs" / "harmeme.yaml"), "--data.train",
                         str(harmeme_fixture), "--data.test", str(harmeme_fixture), "--trainer.default_root_dir",
                         str(tmp_path), *SMALL, "--model.compile", "true", "--trainer.max_epochs", "1",
                         "--data.batch_size", "8", "--data.val_fraction", "0.25"])
    trained = cli.model
    assert trained._compiled is not None  # it really ran compiled
    export = Path(cli.trainer.log_dir) / "export"
    meta, state = read_checkpoint(export)
    assert meta["hparams"]["compile"] is True
    assert sorted(state) == sorted(trained.state_dict()) and not [k for k in state if "_orig_mod" in k]
    reloaded = load_module(export)
    batch = next(iter(cli.datamodule.val_dataloader()))
    trained.eval()
    with torch.no_grad():
        a, b = trained(batch), reloaded(batch)  # one epoch: the selected weights are the last ones
    for task in a:
        np.testing.assert_allclose(a[task].numpy(), b[task].numpy(), rtol=0, atol=1e-5)


def test_calibrating_an_older_export_recovers_what_fit_fitted(trained, tmp_path):
    """bench/calibrate_checkpoint.py gives an export without calibration (the shipped checkpoint
    predates it) what fit itself would have written: the held-out split rebuilt from the recorded
    config, the same temperatures and presets; the weights untouched."""
    import sys

    from dhumor.model.checkpoint import write_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import calibrate_checkpoint

    meta, state = read_checkpoint(trained / "export")
    older = write_checkpoint(state, {k: v for k, v in meta.items()  # it predates the unfamiliarity score too
                                     if k not in ("calibration", "thresholds", "ood", "abstention")},
                             tmp_path / "older")
    assert Pipeline.from_checkpoint(older).decider.temperatures == {}
    calibrate_checkpoint.main([str(older), "--out", str(tmp_path / "now")])
    now, now_state = read_checkpoint(tmp_path / "now")
    for task, cal in meta["calibration"].items():
        assert now["calibration"][task]["temperature"] == pytest.approx(cal["temperature"], rel=1e-3)
    assert now["thresholds"] == meta["thresholds"]
    assert now["metrics"]["calibration_split"] == meta["metrics"]["calibration_split"]
    assert all(torch.equal(now_state[k], state[k]) for k in state)
    with pytest.raises(SystemExit, match="calibrated already"):  # never calibrated twice
        calibrate_checkpoint.main([str(tmp_path / "now"), "--out", str(tmp_path / "again")])


def test_the_shipped_checkpoint_applies_its_temperatures():
    from dhumor.resources import SHIPPED_CHECKPOINT

    pipe = Pipeline.from_checkpoint(SHIPPED_CHECKPOINT)
    meta, _ = read_checkpoint(SHIPPED_CHECKPOINT)
    assert set(pipe.decider.temperatures) == {t.name for t in pipe.schema.tasks} == set(meta["calibration"])
    raw = {"harmful": np.array([0.1, 0.9])}
    assert pipe.decider.calibrate(raw)["harmful"][1] < 0.9  # T > 1 there: raw probabilities were over-confident
