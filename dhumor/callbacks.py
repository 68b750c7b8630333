"""Lightning callbacks: export the selected checkpoint in the dhumor format at the end of fit."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
import yaml

from .checkpoint import checkpoint_meta, write_checkpoint

log = logging.getLogger("dhumor")


class ExportBestCheckpoint(L.Callback):
    """After ``fit``, write the best checkpoint (by the ModelCheckpoint monitor) as ``<log_dir>/export``:
    safetensors weights + dhumor.json with the resolved config and the selection metric."""

    def __init__(self, dirname: str = "export"):
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        ckpt_cb = trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            score = ckpt_cb.best_model_score
            selection = {"monitor": ckpt_cb.monitor, "score": float(score) if score is not None else None,
                         "checkpoint": Path(best).name}
        else:
            state, selection = pl_module.state_dict(), {"monitor": None, "checkpoint": "last"}
        config = None
        cfg_file = log_dir / "config.yaml"
        if cfg_file.exists():
            config = yaml.safe_load(cfg_file.read_text())
        meta = checkpoint_meta(pl_module.hparams, metrics={"selection": selection}, config=config)
        out = write_checkpoint(state, meta, log_dir / self.dirname)
        log.info("exported %s", out)
        print(f"dhumor checkpoint: {out}")
