"""Fine-tune mode through the CLI, every config instantiates, the GPU-recipe benchmark on CPU, and
two-process (gloo) DDP runs of fit and predict."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL, fit_cli
from dhumor.data.readers import read_manifest

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
    from dhumor.pipeline import Pipeline

    pred = Pipeline.from_checkpoint(export).predict_memes(read_manifest(harmeme_fixture).memes[:5])
    assert pred.probs["harmful"].shape == (5, 2)


def test_finetune_offline_encoders_top_layers(tmp_path, harmeme_fixture):
    assert fit_cli(tmp_path, harmeme_fixture, "--trainer.fast_dev_run", "true", "--data.batch_size", "4",
                   "--data.num_workers", "0", config="configs/finetune-offline.yaml") == 0


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_config_instantiates(config):
    from lightning.pytorch.cli import LightningCLI

    from dhumor.cli import run_lightning

    args = ["--config", str(ROOT / "configs" / config)]
    cfg = (ROOT / "configs" / config).read_text()
    if "mode: finetune" in cfg and "vit-base" in cfg:
        args += ["--model.pretrained", "false"]  # hub weights are not on this machine: same architecture
    if "accelerator: gpu" in cfg:
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--trainer.precision", "32-true"]
    cli = run_lightning(args, run=False)
    assert isinstance(cli, LightningCLI)
    assert cli.model.schema.name in ("harmeme", "dhumor")
    assert cli.datamodule.hparams.image_encoder == cli.model.hparams.image_encoder  # linked, not repeated


def test_gpu_recipe_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_recipe.py"), "--tiny", "--steps", "1", "--warmup",
                        "0", "--out", str(out), "--profile"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    timed = [row for row in res["rows"] if "samples_per_s" in row]
    assert [row["case"] for row in timed[:2]] == ["reference_train_fp32", "reference_score_fp32"] and len(timed) == 6
    assert res["summary"]["train_ratio_len128"] > 0 and all(r["samples_per_s"] > 0 for r in timed)
    prof = next(row for row in res["rows"] if row["case"] == "profile_dhumor_train_len128")
    assert abs(sum(prof["share"].values()) - 1) < 0.01 and prof["share"].get("matmul (GEMM)", 0) > 0


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
