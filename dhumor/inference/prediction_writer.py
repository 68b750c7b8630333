"""``dhumor predict`` output: one JSONL row per meme, exactly once, also across DDP ranks."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from dhumor.inference.decision import Decider
from dhumor.util.files import atomic_write, file_sha256

log = logging.getLogger("dhumor")


class JsonlPredictionWriter(BasePredictionWriter):
    """Each rank appends its rows to its own part file (whole lines, fsynced); at the end rank 0 merges
    the parts into ``output`` in id order, dropping the duplicates a distributed sampler pads with,
    and renames it into place: the output is complete or absent, never half-written."""

    def __init__(self, output: str | None = None):
        """
        Args:
            output: JSONL file for the predictions (one row per meme, decided with the checkpoint's calibration
                and balanced threshold preset, as ``dhumor score`` decides).
        """
        super().__init__(write_interval="batch")
        self.output = output
        self._decider: Decider | None = None
        self._by_id: dict | None = None

    def decider(self, trainer, pl_module) -> Decider:
        """The module's own metadata, else what fit stored in the run's export beside ``--ckpt_path``."""
        if self._decider is None:
            from dhumor.model.checkpoint import fitted_beside

            meta = getattr(pl_module, "checkpoint_meta", None)
            ckpt = getattr(trainer, "ckpt_path", None)
            if not meta and ckpt:
                meta = fitted_beside(ckpt)
            if not meta or not meta.get("thresholds"):
                log.warning("no threshold presets or calibration found for %s (they live in the run's export/): "
                            "decisions use a threshold of 0.5 on uncalibrated probabilities", ckpt or "this model")
            self._decider = Decider.from_meta(pl_module.schema, meta)
        return self._decider

    def _memes(self, trainer) -> dict:
        if self._by_id is None:
            ds = getattr(getattr(trainer, "datamodule", None), "datasets", {}).get("predict")
            self._by_id = {m.id: m for m in getattr(ds, "memes", [])}
        return self._by_id

    def _part(self, rank: int) -> Path:
        return Path(f"{self.output}.rank{rank}.part")

    def on_predict_start(self, trainer, pl_module):
        if self.output:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            self._part(trainer.global_rank).unlink(missing_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if not self.output:
            return
        decider = self.decider(trainer, pl_module)
        probs = decider.calibrate({t: v.numpy() for t, v in prediction["probs"].items()})
        memes = self._memes(trainer)
        lines = []
        for i, mid in enumerate(prediction["ids"]):
            row = decider.describe({t: v[i] for t, v in probs.items()})
            m = memes.get(mid)  # the meme's identity, as a score row carries it
            ident = {"path": str(m.image) if m else None, "sha256": _sha256(m.image) if m else None,
                     "caption": m.caption if m else None, "caption_source": "given" if m and m.caption is not None
                     else None}
            lines.append(json.dumps({"id": mid, **ident, **row, "error": None}, ensure_ascii=False) + "\n")
        with open(self._part(trainer.global_rank), "a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())

    def on_predict_end(self, trainer, pl_module):
        if not self.output:
            return
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            rows: dict[str, str] = {}
            for r in range(trainer.world_size):
                part = self._part(r)
                if part.exists():
                    for line in part.read_text(encoding="utf-8").split("\n"):  # "\n" only ends a row
                        if line.strip():
                            rows.setdefault(json.loads(line)["id"], line)
            atomic_write(self.output, "".join(rows[k] + "\n" for k in sorted(rows)))
            for r in range(trainer.world_size):
                self._part(r).unlink(missing_ok=True)
            print(f"dhumor predict: {len(rows)} rows -> {self.output}")
        trainer.strategy.barrier()


def _sha256(path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None
