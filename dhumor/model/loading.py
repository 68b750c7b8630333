"""Rebuilding a model from a checkpoint (the one place that knows both the checkpoint format and the
LightningModule, so that neither imports the other)."""
from __future__ import annotations

from pathlib import Path

import torch

from dhumor.errors import CheckpointError
from dhumor.model.checkpoint import read_checkpoint


def load_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild a :class:`~dhumor.model.lit.DHumorModule` from a checkpoint, in eval mode."""
    from dhumor.model.lit import DHumorModule

    meta, state = read_checkpoint(path)
    import inspect

    accepted = set(inspect.signature(DHumorModule.__init__).parameters) - {"self"}
    hp = {k: v for k, v in meta["hparams"].items() if k in accepted}
    if hp.get("mode") == "finetune":
        hp["pretrained"] = False  # every encoder weight is in the checkpoint
    try:
        module = DHumorModule(**hp)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: hyperparameters do not fit this dhumor version: {e}") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    module.checkpoint_meta = meta
    return module.to(map_location).eval()
