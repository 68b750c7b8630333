"""The schema of a checkpoint's ``dhumor.json``, checked on load so that damage names its field.

A hand-edited or truncated ``dhumor.json`` (``hparams`` removed, ``streams`` gone, the whole file a
list, ``thresholds.balanced = "abc"``) is refused by :func:`validate_meta` with a
:class:`~dhumor.errors.CheckpointError` naming the field, before any model is built, instead of
surfacing later as a ``KeyError`` or a numpy error in the middle of a batch.

>>> validate_meta([], "ckpt/dhumor.json")
Traceback (most recent call last):
...
dhumor.errors.CheckpointError: ckpt/dhumor.json: damaged checkpoint metadata: the top level must be a JSON object, not a list
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dhumor.errors import CheckpointError

FORMAT = "dhumor-checkpoint/1"
WEIGHTS, META = "model.safetensors", "dhumor.json"
log = logging.getLogger("dhumor")
STREAMS = ("image", "caption", "reasoning")

Probability = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]


class _Open(BaseModel):
    """Fields this version does not know are kept (written by newer versions or other tools); no
    number may be infinite or NaN."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class TaskMeta(_Open):
    name: str
    classes: list[str] = Field(min_length=2)
    gate: str | None = None
    description: str = ""


class SchemaMeta(_Open):
    name: str
    primary: str
    tasks: list[TaskMeta] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_exist(self):
        names = [t.name for t in self.tasks]
        if self.primary not in names:
            raise ValueError(f"primary task {self.primary!r} is not one of the tasks {names}")
        for t in self.tasks:
            if t.gate is not None and t.gate not in names:
                raise ValueError(f"task {t.name!r} is gated on {t.gate!r}, which is not one of the tasks {names}")
        return self


class EncoderMeta(_Open):
    name: str
    dim: int | None = Field(default=None, gt=0)


# Sane bounds of the architecture: a damaged or hostile file cannot ask for a 2e16-byte allocation.
# Far above any model dhumor trains (d_model 128, hidden 128, 4 tokens, 768-wide encoders).
Width = Annotated[int, Field(ge=1, le=16384, strict=True)]


class HParams(_Open):
    task: str | dict[str, Any]
    streams: list[Literal["image", "caption", "reasoning"]] = Field(min_length=1)
    input_dims: dict[str, Annotated[int, Field(gt=0, le=65536, strict=True)]]
    mode: Literal["cached", "finetune"] = "cached"
    inputs: Literal["pooled", "tokens"] = "pooled"
    d_model: Width = 128
    heads: Annotated[int, Field(ge=1, le=256, strict=True)] = 4
    hidden: Width = 128
    tokens_per_stream: Annotated[int, Field(ge=1, le=1024, strict=True)] = 4
    max_tokens: Annotated[int, Field(ge=1, le=65536, strict=True)] = 128
    dropout: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    modality_dropout: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    input_dropout: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1

    @model_validator(mode="after")
    def _every_stream_described(self):
        extra = self.model_extra or {}
        for s in self.streams:
            if not isinstance(extra.get(f"{s}_encoder"), str) or not extra[f"{s}_encoder"]:
                raise ValueError(f"stream {s!r} has no {s}_encoder name")
            if s not in self.input_dims:
                raise ValueError(f"stream {s!r} has no input_dims entry")
        if len(set(self.streams)) != len(self.streams):
            raise ValueError(f"streams repeat: {self.streams}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        return self


class Calibration(_Open):
    # Fitted temperatures lie near 1 (the shipped model's: 1.3-3.1); 1e308 or 1e-300 is damage.
    temperature: float = Field(ge=0.01, le=100.0, strict=True)


class Thresholds(_Open):
    """Decision thresholds on the primary task's P(positive), one per preset (chosen on validation data)."""

    model_config = ConfigDict(populate_by_name=True)
    __pydantic_extra__: dict[str, Probability] = Field(init=False)  # more presets: numbers in [0, 1] too
    high_recall: Probability | None = Field(default=None, alias="high recall")
    balanced: Probability | None = None
    high_precision: Probability | None = Field(default=None, alias="high precision")


class OODMeta(_Open):
    """The unfamiliarity score (:mod:`dhumor.model.ood`): method, its threshold, its statistics file."""

    method: Literal["knn_streams", "knn_fused", "mahalanobis", "energy"]
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    file: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")  # a name beside the weights, no path
    k: int | None = Field(default=None, gt=0)


class AbstentionMeta(_Open):
    """The confidence-abstention preset: abstain when P(positive) is within ``uncertain_margin`` of the threshold."""

    uncertain_margin: float = Field(ge=0.0, le=1.0)
    coverage: Probability | None = None


class CheckpointMeta(_Open):
    format: Literal["dhumor-checkpoint/1"]
    schema_: SchemaMeta = Field(alias="schema")
    encoders: dict[str, EncoderMeta] = {}
    hparams: HParams
    metrics: dict[str, Any] | None = None
    config: Any = None
    notes: dict[str, Any] | None = None
    created: str | None = None
    versions: dict[str, Any] | None = None
    thresholds: Thresholds | None = None
    calibration: dict[str, Calibration] | None = None
    reasoning_source: dict[str, Any] | None = None
    ood: OODMeta | None = None
    abstention: AbstentionMeta | None = None


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False)[:3]:
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if e["type"] == "missing" or isinstance(got, (dict, list)) else f" (got {got!r:.60})"
        parts.append(f"field {_where(e['loc'])!r}: {msg}{shown}")
    more = err.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def validate_meta(meta: Any, where: str) -> dict:
    """The metadata as a plain dict, its values checked; CheckpointError naming the first bad fields."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: damaged checkpoint metadata: the top level must be a JSON object, "
                              f"not a {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    bad = _non_finite(meta)
    if bad is not None:
        raise CheckpointError(f"{where}: damaged checkpoint metadata: field {bad[0]!r} is {bad[1]!r}, not a finite number")
    try:
        checked = CheckpointMeta.model_validate(meta)
    except ValidationError as e:
        raise CheckpointError(f"{where}: damaged checkpoint metadata: {_describe(e)}") from None
    return checked.model_dump(by_alias=True, exclude_unset=True)


def _non_finite(obj: Any, loc: tuple = ()) -> tuple[str, float] | None:
    """The first number that is infinite or NaN anywhere in ``obj`` (JSON lets Python read them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return _where(loc), obj
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, (*loc, k))
        if found:
            return found
    return None


# ---------------------------------------------------------------- read without torch
# Everything below needs no torch: a configuration error in a checkpoint is refused in a second.
def read_meta_file(path: str | Path) -> dict:
    """A ``dhumor.json`` read and validated (CheckpointError naming the file and the field)."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    return validate_meta(meta, str(path))


FITTED_KEYS = ("thresholds", "calibration", "reasoning_source", "ood", "abstention")


def fitted_beside(ckpt: str | Path) -> dict:
    """What ``fit`` learned after training (calibration, threshold presets, reasoning source) for a
    Lightning ``.ckpt``: it lives in the run's ``export/dhumor.json`` (``<run>/checkpoints/x.ckpt`` →
    ``<run>/export``), and belongs to the one ``.ckpt`` it was fitted for (named, with its sha256, in
    the export's ``metrics.selection``). Any other ``.ckpt`` of the run (``last.ckpt``) gets only the
    reasoning source, and decides uncalibrated, with a warning. Empty when there is no export."""
    ckpt = Path(ckpt)
    meta_path = ckpt.resolve().parent.parent / "export" / META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    fitted = {k: meta[k] for k in FITTED_KEYS if k in meta}
    selection = ((meta.get("metrics") or {}).get("selection") or {}) if isinstance(meta.get("metrics"), dict) else {}
    name, digest = selection.get("checkpoint"), selection.get("checkpoint_sha256")
    mine = digest == file_sha256(ckpt) if digest else name == ckpt.name
    if mine:
        return fitted
    key = (str(ckpt.resolve()), str(meta_path))
    if key not in _WARNED_UNFITTED:
        _WARNED_UNFITTED.add(key)
        log.warning("%s: the calibration and thresholds in %s were fitted for %s, not this checkpoint: it decides "
                    "uncalibrated (pass --decision-threshold, or score with %s or the export)", ckpt, meta_path,
                    name or "another checkpoint", name or "that checkpoint")
    return {k: v for k, v in fitted.items() if k == "reasoning_source"}


_WARNED_UNFITTED: set[tuple[str, str]] = set()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_digest(path: str | Path) -> str:
    """The sha256 of what decides a checkpoint's rows: its weights and its metadata (for a ``.ckpt``, the
    fitted calibration it gets from its export). Recorded in every row's provenance."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir() or path.suffix == ".safetensors":
        d = path if path.is_dir() else path.parent
        parts = [d / WEIGHTS if path.is_dir() else path, d / META]
        stats = d / "ood.safetensors"  # the unfamiliarity statistics decide abstention: part of the model
        for p in parts + ([stats] if stats.is_file() else []):
            h.update(bytes.fromhex(file_sha256(p)))
    else:
        h.update(bytes.fromhex(file_sha256(path)))
        h.update(json.dumps(fitted_beside(path), sort_keys=True).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- weights checked before they load
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a ``.safetensors`` file's header alone (no tensor is read); every entry's
    byte range checked against the file. CheckpointError naming the tensor when the header is damaged."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (its header length is damaged)")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data = size - 8 - n
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (dtype in _DTYPE_BYTES and isinstance(shape, list) and all(type(x) is int and x >= 0 for x in shape)
                  and type(a) is int and type(b) is int and 0 <= a <= b <= data
                  and b - a == math.prod(shape) * _DTYPE_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: damaged weights: the header entry of tensor {name!r} is inconsistent "
                                  f"(dtype, shape or byte range)")
        shapes[name] = tuple(shape)
    return shapes


