"""Checkpoints that load with nothing else and never run pickled code.

A dhumor checkpoint is a directory: ``model.safetensors`` (weights) and ``dhumor.json`` (task
schema, encoder names and provenance, hyperparameters, the resolved training config, metrics).
Lightning ``.ckpt`` files also load, through ``torch.load(weights_only=True)``.

>>> from dhumor.model.loading import load_module
>>> module = load_module("checkpoints/harmeme-tcrnet")            # doctest: +SKIP
>>> module.schema.name, module.stream_names                         # doctest: +SKIP
('harmeme', ['image', 'caption'])
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dhumor.encoders.registry import get_entry
from dhumor.errors import CheckpointError
from dhumor.model.checkpoint_meta import (FITTED_KEYS, FORMAT, META, WEIGHTS, checkpoint_digest,  # noqa: F401
                                          file_sha256, fitted_beside, read_meta_file, safetensors_shapes,
                                          validate_meta)

log = logging.getLogger("dhumor")


def _plain(obj: Any) -> Any:
    """JSON-safe copy of hyperparameters (tuples → lists, paths → str)."""
    return json.loads(json.dumps(obj, default=str))


def checkpoint_meta(hparams: dict, metrics: dict | None = None, config: Any = None, notes: dict | None = None,
                    fitted: dict | None = None) -> dict:
    """``dhumor.json``'s content. ``fitted``: what fit learned after training, written as top-level keys
    (``thresholds``, ``calibration``, ``reasoning_source``; see :mod:`dhumor.model.calibration`)."""
    from dhumor.version import __version__
    import lightning

    from dhumor.schema import get_schema

    hp = _plain({k: v for k, v in dict(hparams).items() if not k.startswith("_")})  # CLI bookkeeping
    streams = hp["streams"]
    encoders = {}
    for s in streams:
        name = hp[f"{s}_encoder"]
        try:
            e = get_entry(name)
            encoders[s] = {"name": name, "provenance": e.provenance, "offline": e.offline}
        except KeyError:
            encoders[s] = {"name": name}
        encoders[s]["dim"] = hp["input_dims"][s]
    return {
        "format": FORMAT,
        "schema": get_schema(hp["task"]).to_dict(),
        "encoders": encoders,
        "hparams": hp,
        "metrics": _plain(metrics) if metrics else None,
        "config": _plain(config) if config is not None else None,
        "notes": notes or {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"dhumor": __version__, "torch": torch.__version__, "lightning": lightning.__version__},
        **_plain(fitted or {}),
    }


def write_checkpoint(state_dict: dict[str, torch.Tensor], meta: dict, out_dir: str | Path,
                     extra_files: dict[str, bytes] | None = None) -> Path:
    """Write weights + metadata into ``out_dir`` atomically (a killed write leaves the old one intact).
    ``extra_files``: more files written beside them (e.g. ``ood.safetensors``), in the same swap."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, tmp / WEIGHTS, metadata={"format": FORMAT})
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
        written = {WEIGHTS, META, *(extra_files or {})}
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700: a checkpoint is meant to be shared
        for f in written:
            os.chmod(tmp / f, 0o666 & ~umask)
        if out_dir.is_dir():  # keep what else lives beside the weights (a model card, notes)
            for extra in out_dir.iterdir():
                if extra.is_file() and extra.name not in written:
                    shutil.copy2(extra, tmp / extra.name)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_module(module, out_dir: str | Path, metrics: dict | None = None, config: Any = None,
                  notes: dict | None = None) -> Path:
    """Export a :class:`~dhumor.model.lit.DHumorModule` as a dhumor checkpoint directory."""
    return write_checkpoint(module.state_dict(), checkpoint_meta(module.hparams, metrics, config, notes), out_dir)


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, state_dict)`` of a checkpoint directory, its ``model.safetensors``, or a Lightning ``.ckpt``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir() or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        d = path if path.is_dir() else path.parent
        meta_path, weights_path = d / META, (d / WEIGHTS if path.is_dir() else path)
        if not meta_path.exists() or not weights_path.exists():
            raise CheckpointError(f"{d}: a dhumor checkpoint needs {META} and {WEIGHTS}")
        meta = validate_meta(_read_json(meta_path), str(meta_path))
        check_weights(meta, safetensors_shapes(weights_path), weights_path)  # before a tensor is allocated
        try:
            return meta, load_file(weights_path)
        except Exception as e:
            raise CheckpointError(f"{weights_path}: cannot read weights ({e})") from None
    if path.suffix == ".ckpt":
        try:  # mmap: the tensors stay on disk until the shapes are checked against the hyper-parameters
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path}: refused to load (only plain tensors and values are accepted; "
                                  f"pickled code is never run): {(str(e).splitlines() or [type(e).__name__])[0][:300]}") from None
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
            raise CheckpointError(f"{path}: not a Lightning checkpoint of a dhumor model")
        try:
            meta = checkpoint_meta(ckpt["hyper_parameters"])
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: damaged hyper_parameters: {type(e).__name__}: {e}") from None
        meta = validate_meta({**meta, **fitted_beside(path)}, str(path))
        state = ckpt["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: damaged state_dict (not a mapping of names to tensors)")
        check_weights(meta, {k: tuple(v.shape) for k, v in state.items()}, path)
        return meta, state
    raise CheckpointError(f"{path}: expected a checkpoint directory, a .safetensors or a .ckpt file")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def read_meta(path: str | Path) -> dict:
    """The validated ``dhumor.json`` of a checkpoint directory, without loading the weights (cheap:
    for checks before a model loads, e.g. the task schema that names a CSV output's columns)."""
    path = Path(path)
    d = path if path.is_dir() else path.parent
    if path.suffix == ".ckpt":
        return read_checkpoint(path)[0]
    if not (d / META).exists():
        raise CheckpointError(f"{d}: a dhumor checkpoint needs {META} and {WEIGHTS}")
    return validate_meta(_read_json(d / META), str(d / META))


def expected_shapes(meta: dict) -> dict[str, tuple[int, ...]]:
    """The fusion network's tensor shapes its metadata asks for, built on the meta device (no memory)."""
    import dataclasses

    from dhumor.model.tcrnet import TCRNet, TCRNetConfig  # torch only: no Lightning import before a refusal
    from dhumor.schema import get_schema

    hp = meta["hparams"]
    cfg = TCRNetConfig(**{f.name: hp[f.name] for f in dataclasses.fields(TCRNetConfig) if f.name in hp})
    streams = [s for s in ("image", "caption", "reasoning") if s in hp["streams"]]
    with torch.device("meta"):
        net = TCRNet(get_schema(hp["task"]), {s: int(hp["input_dims"][s]) for s in streams}, cfg)
    return {f"net.{k}": tuple(v.shape) for k, v in net.state_dict().items()}


def check_weights(meta: dict, shapes: dict[str, tuple[int, ...]], where: str | Path) -> None:
    """Every fusion-network tensor present with the shape the metadata asks for; CheckpointError naming
    the first tensor that is not (encoder tensors of a fine-tuned checkpoint are checked when they load)."""
    try:
        want = expected_shapes(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: hyper-parameters do not describe a model: {type(e).__name__}: {e}") from None
    for name, shape in want.items():
        if name not in shapes:
            raise CheckpointError(f"{where}: damaged weights: tensor {name!r} is missing")
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{where}: damaged weights: tensor {name!r} has shape {list(shapes[name])}, the "
                                  f"metadata's hyper-parameters need {list(shape)}")
    extra = [k for k in shapes if k.startswith("net.") and k not in want]
    if extra:
        raise CheckpointError(f"{where}: damaged weights: unexpected tensor {extra[0]!r} (not in this model)")
