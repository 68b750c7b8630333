"""Lightning callbacks: export the selected checkpoint in the dhumor format at the end of fit, with a
temperature per task and threshold presets fitted on the held-out split that selected it."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.utilities import move_data_to_device

from dhumor.model.checkpoint import checkpoint_meta, file_sha256, write_checkpoint
from dhumor.model.calibration import fit_calibration

log = logging.getLogger("dhumor")


class ExportBestCheckpoint(L.Callback):
    """After ``fit``, write the best checkpoint (by the ModelCheckpoint monitor) as ``<log_dir>/export``:
    safetensors weights + dhumor.json with the resolved config, the selection metric, and, fitted on the
    held-out split the checkpoint was selected on, ``calibration`` (a temperature per task) and
    ``thresholds`` (presets for the primary task), plus the ``reasoning_source`` it was trained on."""

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
            # Name and digest: the calibration below belongs to this one file (checkpoint.fitted_beside).
            selection = {"monitor": ckpt_cb.monitor, "score": float(score) if score is not None else None,
                         "checkpoint": Path(best).name, "checkpoint_sha256": file_sha256(best)}
        else:
            state, selection = pl_module.state_dict(), {"monitor": None, "checkpoint": "last"}
        config = None
        cfg_file = log_dir / "config.yaml"
        if cfg_file.exists():
            config = yaml.safe_load(cfg_file.read_text())
        fitted, held_out = self._fitted(trainer, pl_module, state)
        extra = self._unfamiliarity(trainer, pl_module, state, fitted, held_out["split"])
        meta = checkpoint_meta(pl_module.hparams, metrics={"selection": selection, "calibration_split": held_out},
                               config=config, fitted=fitted)
        out = write_checkpoint(state, meta, log_dir / self.dirname, extra_files=extra)
        log.info("exported %s", out)
        print(f"dhumor checkpoint: {out}")

    @staticmethod
    def _fitted(trainer: L.Trainer, module, state: dict) -> tuple[dict, dict]:
        """``({thresholds, calibration, reasoning_source}, {where they were fitted})`` for the exported weights."""
        dm = trainer.datamodule
        fitted = {"reasoning_source": {"kind": "none"}}
        if "reasoning" in module.stream_names and hasattr(dm, "reasoning_source"):
            fitted["reasoning_source"] = dm.reasoning_source()
        logits, labels = held_out_logits(module, state, dm.val_dataloader())
        fitted["calibration"], fitted["thresholds"] = fit_calibration(module.schema, logits, labels)
        hp = getattr(dm, "hparams", {})
        split = (f"val manifest {hp['val']}" if hp.get("val") else
                 f"held-out {hp.get('val_fraction', 0):.0%} of train (split_seed {hp.get('split_seed')})")
        n = int((labels[module.schema.primary] >= 0).sum())
        log.info("calibration on %s (n=%d): %s; thresholds %s", split, n, fitted["calibration"], fitted["thresholds"])
        return fitted, {"split": split, "n": n}


    @staticmethod
    def _unfamiliarity(trainer: L.Trainer, module, state: dict, fitted: dict, split: str) -> dict[str, bytes]:
        """Add ``ood`` (reference statistics from the training split, threshold from the held-out split)
        and ``abstention`` (the confidence-abstention preset) to ``fitted``; the statistics file's bytes."""
        from dhumor.model.calibration import calibrated_probs
        from dhumor.model.ood import UNCERTAIN_COVERAGE, fit_for_export, uncertain_margin

        dm = trainer.datamodule
        scorer, held = fit_for_export(module, state, dm.train_dataloader(), dm.val_dataloader(), split)
        data = scorer.to_bytes() if scorer.tensors else b""
        fitted["ood"] = scorer.meta(len(data) if data else 0)
        temp = fitted["calibration"][module.schema.primary]["temperature"]
        p = calibrated_probs(held.logits, temp)[:, 1]
        th = fitted["thresholds"].get("balanced", 0.5)
        fitted["abstention"] = {"uncertain_margin": round(uncertain_margin(p, th), 6), "coverage": UNCERTAIN_COVERAGE,
                                "fitted_on": split}
        log.info("unfamiliarity: %s, threshold %.4f (5%% of %s), statistics %d bytes", scorer.method,
                 scorer.threshold, split, len(data))
        return {fitted["ood"]["file"]: data} if data else {}


@torch.no_grad()
def held_out_logits(module, state: dict, loader) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Logits and labels per task of ``loader``'s batches under the weights ``state``; the module's own
    weights and train/eval mode are restored afterwards (training may go on after the export)."""
    backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
    was_training = module.training
    module.load_state_dict(state)
    module.eval()
    out: dict[str, list] = {t.name: [] for t in module.schema.tasks}
    ys: dict[str, list] = {t.name: [] for t in module.schema.tasks}
    try:
        for batch in loader:
            batch = move_data_to_device(batch, module.device)
            logits = module.net(module.stream_inputs(batch))  # the plain network: no recompile for eval
            for t in module.schema.tasks:
                out[t.name].append(logits[t.name].float().cpu().numpy())
                ys[t.name].append(batch["labels"][t.name].cpu().numpy())
    finally:
        module.load_state_dict(backup)
        module.train(was_training)
    return ({k: np.concatenate(v) for k, v in out.items()}, {k: np.concatenate(v) for k, v in ys.items()})
