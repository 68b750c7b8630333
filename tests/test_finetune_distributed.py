"""Fine-tune mode through the CLI, every config instantiates, the GPU-recipe benchmark on CPU, and
two-process (gloo) DDP runs of fit and predict."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL, fit_cli
from dhumor.data.readers import read_manifest

pytestmark = pytest.mark.slow  # two-process DDP, the GPU recipe on CPU

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    """A tiny ViT and a tiny BERT (with a real WordPiece tokenizer) saved as local directories."""
    from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

    from dhumor.encoders.weights import minilm_dir

    d = tmp_path_factory.mktemp("enc")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8), add_pooling_layer=False).save_pretrained(d / "vit")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(d / "bert")
    tok.save_pretrained(d / "bert")
    return d


def test_finetune_mode_trains_end_to_end(tmp_path, harmeme_fixture, tiny_encoders):
    assert fit_cli(tmp_path, harmeme_fixture, "--model.mode", "finetune", "--model.image_encoder",
                   f"vit:{tiny_encoders / 'vit'}", "--model.caption_encoder", f"hf:{tiny_encoders / 'bert'}",
                   "--trainer.max_epochs", "2", "--data.batch_size", "8", "--data.val_fraction", "0.25") == 0
    export = next(tmp_path.rglob("export"))
    meta = json.loads((export / "dhumor.json").read_text())
    assert meta["hparams"]["mode"] == "finetune"
    from safetensors.torch import load_file

    keys = load_file(export / "model.safetensors").keys()
    assert any(k.startswith("encoders.") for k in keys)  # fine-tuned encoder weights travel in the checkpoint
    from dhumor.inference.pipeline import Pipeline

    pred = Pipeline.from_checkpoint(export).predict_memes(read_manifest(harmeme_fixture).memes[:5])
    assert pred.probs["harmful"].shape == (5, 2)


def test_finetune_offline_encoders_top_layers(tmp_path, harmeme_fixture):
    assert fit_cli(tmp_path, harmeme_fixture, "--trainer.fast_dev_run", "true", "--data.batch_size", "4",
                   "--data.num_workers", "0", config="configs/finetune-offline.yaml") == 0


def _explanations_for(manifest: Path, out: Path) -> Path:
    """An explanations JSONL as `dhumor explain` writes it, one ok row per meme of ``manifest``."""
    rows = [{"id": m.id, "status": "ok", "text": f"Summary: a meme that says {m.caption}.", "iterations": [],
             "prompt_version": "v1-test", "backend": {"backend": "offline", "model": "tiny.gguf"}}
            for m in read_manifest(manifest).memes]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


CONFIGS = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_fits_a_step_and_reloads(config, tmp_path, harmeme_fixture, dhumor_fixture, tiny_encoders):
    """Each YAML (an ablation after configs/harmeme.yaml, as documented) trains one batch through the CLI,
    exports, and the export loads back into a module that predicts what the exported weights predict."""
    from dhumor.model.checkpoint import read_checkpoint

    path = ROOT / "configs" / config
    cfg = path.read_text()
    base, args = f"configs/{config}", []
    if config.startswith("ablations/"):  # an ablation goes after its base config, as documented
        base, args = "configs/harmeme.yaml", ["--config", str(path), "--trainer.default_root_dir", str(tmp_path)]
    fixture = dhumor_fixture if "task: dhumor" in cfg else harmeme_fixture
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
             "--data.batch_size", "4", "--data.val_fraction", "0.25", "--data.num_workers", "0"]
    if fixture is dhumor_fixture:
        args += ["--data.images", str(fixture.parent / "images")]
    if "vit-base" in cfg:  # the paper's hub encoders are not on this machine: tiny ones, same code path
        args += ["--model.image_encoder", f"vit:{tiny_encoders / 'vit'}",
                 "--model.caption_encoder", f"hf:{tiny_encoders / 'bert'}"]
    if "accelerator: gpu" in cfg:
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--trainer.precision", "32-true"]
    if "explanations:" in cfg:
        args += ["--data.explanations", str(_explanations_for(fixture, tmp_path / "expl.jsonl"))]
    assert fit_cli(tmp_path, fixture, *args, config=base) == 0
    export = next(tmp_path.rglob("export"))
    meta, state = read_checkpoint(export)
    assert not [k for k in state if "_compiled" in k or "_orig_mod" in k]
    assert set(meta["thresholds"]) == {"high recall", "balanced", "high precision"}
    assert set(meta["calibration"]) == {t["name"] for t in meta["schema"]["tasks"]}
    expected_source = ("explanations" if "explanations:" in cfg else
                       "column" if "reasoning" in meta["hparams"]["streams"] else "none")
    assert meta["reasoning_source"]["kind"] == expected_source
    if expected_source == "explanations":
        assert meta["reasoning_source"] | {"file": None} == {
            "kind": "explanations", "file": None, "backend": "offline", "model": "tiny.gguf",
            "prompt_version": "v1-test", "iteration": -1}
    from dhumor.inference.pipeline import Pipeline

    best = next(tmp_path.rglob("best-*.ckpt"))
    memes = read_manifest(fixture, images=fixture.parent / "images").memes[:4]
    a = Pipeline.from_checkpoint(export).predict_memes(memes).probs
    b = Pipeline.from_checkpoint(best).predict_memes(memes).probs  # the Lightning checkpoint it was selected as
    assert set(a) == set(meta["calibration"])
    for task in a:
        assert a[task].shape[0] == 4 and np.isfinite(a[task]).all()
        np.testing.assert_allclose(a[task], b[task], rtol=0, atol=1e-6)


def test_gpu_recipe_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_recipe.py"), "--tiny", "--steps", "1", "--warmup",
                        "0", "--out", str(out), "--profile"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    timed = [row for row in res["rows"] if "samples_per_s" in row]
    assert [row["case"] for row in timed[:2]] == ["reference_train_fp32", "reference_score_fp32"]
    ladder = res["summary"]["ladder"]
    assert [x["rung"] for x in ladder] == ["dhumor_paper_recipe", "+bf16", "+batch", "+fused_adamw", "+compile",
                                           "+dynamic_padding"]
    # Each rung changes one thing relative to the one before it.
    rungs = [row for row in timed if row["case"].startswith("ladder_train:")]
    keys = ("bf16", "big", "fused", "compile", "dynamic")
    changed = [[k for k in keys if a[k] != b[k]] for a, b in zip(rungs, rungs[1:])]
    assert changed == [["bf16"], ["big"], ["fused"], ["compile"], ["dynamic"]]
    assert all(x["speedup_vs_previous"] > 0 for x in ladder) and all(r["samples_per_s"] > 0 for r in timed)
    prof = next(row for row in res["rows"] if row["case"] == "profile_dhumor_train_len128")
    assert abs(sum(prof["share"].values()) - 1) < 0.01


def _cli(*args, cwd=ROOT, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dhumor.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_ddp_fit_and_predict_with_two_gloo_processes(tmp_path, harmeme_fixture, trained):
    common = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    r = _cli("fit", "--config", str(ROOT / "configs" / "harmeme.yaml"), "--data.train", str(harmeme_fixture),
             "--data.test", str(harmeme_fixture), "--trainer.default_root_dir", str(tmp_path / "fit"),
             "--trainer.max_epochs", "2", "--data.val_fraction", "0.25", "--data.batch_size", "8", *SMALL, *common)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "world_size: 2" in r.stderr or "distributed_backend=gloo" in r.stderr
    assert list((tmp_path / "fit").rglob("export/model.safetensors"))
    out = tmp_path / "pred.jsonl"
    best = next((trained / "checkpoints").glob("best-*.ckpt"))
    r = _cli("predict", "--config", str(trained / "config.yaml"), "--ckpt_path", str(best), "--data.predict",
             str(harmeme_fixture), "--prediction_writer.output", str(out), "--trainer.default_root_dir",
             str(tmp_path / "pred"), "--data.batch_size", "5", *common)
    assert r.returncode == 0, r.stderr[-4000:]
    ids = [json.loads(l)["id"] for l in out.read_text().splitlines()]
    assert sorted(ids) == sorted(m.id for m in read_manifest(harmeme_fixture).memes)  # each once, none lost


def test_ddp_batches_without_a_target_label_keep_every_head_in_the_graph(tmp_path, harmeme_fixture):
    """Batches of one meme: every harmless meme is a batch with no target label. Under DDP with
    find_unused_parameters=False (Lightning's `ddp` default) a head left out of the graph fails the
    next step's gradient reduction; a zero loss that keeps it in trains on."""
    memes = read_manifest(harmeme_fixture).memes
    assert sum(m.labels["target"] < 0 for m in memes) >= 4  # the fixture has such memes
    r = _cli("fit", "--config", str(ROOT / "configs" / "harmeme.yaml"), "--data.train", str(harmeme_fixture),
             "--data.test", str(harmeme_fixture), "--trainer.default_root_dir", str(tmp_path),
             "--trainer.max_epochs", "1", "--data.val_fraction", "0.25", "--data.batch_size", "1",
             "--data.split_seed", "3", *SMALL, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
             "--trainer.strategy", "ddp")
    assert r.returncode == 0, r.stderr[-4000:]
    assert list(tmp_path.rglob("export/model.safetensors"))
