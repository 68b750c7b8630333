"""The same seed gives the same model, whatever the state of the feature cache."""
from __future__ import annotations

import json

from conftest import fit_cli


def test_same_seed_same_model_on_a_cold_and_a_warm_cache(tmp_path, harmeme_fixture):
    cache = tmp_path / "features.sqlite"  # cold for the first run, warm for the second
    exports = []
    for name in ("cold", "warm"):
        root = tmp_path / name
        assert fit_cli(root, harmeme_fixture, "--trainer.max_epochs", "3", "--data.val_fraction", "0.25",
                       "--data.batch_size", "8", "--data.cache", str(cache), "--seed_everything", "0") == 0
        exports.append(sorted((root / "lightning_logs").iterdir())[-1] / "export")
    cold, warm = exports
    assert (cold / "model.safetensors").read_bytes() == (warm / "model.safetensors").read_bytes()
    meta = [json.loads((e / "dhumor.json").read_text()) for e in exports]
    for key in ("calibration", "thresholds"):
        assert meta[0][key] == meta[1][key], key
    # the same epoch selected by the same score (the .ckpt files' own digests differ: they record the run's paths)
    sel = [{k: v for k, v in m["metrics"]["selection"].items() if k != "checkpoint_sha256"} for m in meta]
    assert sel[0] == sel[1]
