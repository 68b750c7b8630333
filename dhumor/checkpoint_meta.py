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

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import CheckpointError

FORMAT = "dhumor-checkpoint/1"
STREAMS = ("image", "caption", "reasoning")

Probability = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]


class _Open(BaseModel):
    """Fields this version does not know are kept (written by newer versions or other tools)."""

    model_config = ConfigDict(extra="allow")


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


class HParams(_Open):
    task: str | dict[str, Any]
    streams: list[Literal["image", "caption", "reasoning"]] = Field(min_length=1)
    input_dims: dict[str, Annotated[int, Field(gt=0)]]
    mode: Literal["cached", "finetune"] = "cached"
    inputs: Literal["pooled", "tokens"] = "pooled"

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
        return self


class Calibration(_Open):
    temperature: float = Field(gt=0.0, strict=True)


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
    try:
        checked = CheckpointMeta.model_validate(meta)
    except ValidationError as e:
        raise CheckpointError(f"{where}: damaged checkpoint metadata: {_describe(e)}") from None
    return checked.model_dump(by_alias=True, exclude_unset=True)
