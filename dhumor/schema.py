"""Tasks as data: which heads a model has, their classes, and the Meme record that flows through.

A :class:`TaskSchema` names every prediction head. It is stored inside every checkpoint, so a
checkpoint alone says what it predicts. Two presets ship:

>>> from dhumor.schema import get_schema
>>> s = get_schema("dhumor")
>>> [t.name for t in s.tasks], s.task("intensity").classes
(['humor', 'target', 'intensity'], ('mild', 'moderate', 'severe'))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from dhumor.errors import UnknownNameError

MISSING = -1  # label index for "this row has no label for this task": masked out of loss and metrics

STREAMS = ("image", "caption", "reasoning")


@dataclass(frozen=True)
class Task:
    """One prediction head.

    ``gate`` names a binary task: this task only applies to memes whose gate label is positive
    (the target of a meme that is not harmful does not exist). Gated labels are never guessed.
    ``refines`` names a binary task this one grades: class 0 is that task's negative, the others
    its positive levels (harmfulness refines harmful), so its label always agrees with the decision.
    """

    name: str
    classes: tuple[str, ...]
    gate: str | None = None
    description: str = ""
    refines: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def index(self, label: str) -> int:
        """Class index of a class name (exact match after the schema's normalisation)."""
        try:
            return self.classes.index(label)
        except ValueError:
            raise UnknownNameError(f"unknown {self.name} label {label!r}; expected one of {list(self.classes)}") from None


@dataclass(frozen=True)
class TaskSchema:
    """An ordered set of tasks; ``primary`` is the binary task a moderation decision is made on."""

    name: str
    tasks: tuple[Task, ...]
    primary: str

    def __post_init__(self):
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in schema {self.name}: {names}")
        if self.primary not in names or not self.task(self.primary).binary:
            raise ValueError(f"primary task {self.primary!r} must be a binary task of the schema")
        for t in self.tasks:
            if t.gate is not None and (t.gate not in names or not self.task(t.gate).binary):
                raise ValueError(f"task {t.name}: gate {t.gate!r} must be a binary task of the schema")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise UnknownNameError(f"schema {self.name} has no task {name!r}; tasks: {self.task_names}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "primary": self.primary,
            "tasks": [
                {"name": t.name, "classes": list(t.classes), "gate": t.gate, "description": t.description,
                 **({"refines": t.refines} if t.refines else {})}
                for t in self.tasks
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSchema":
        tasks = tuple(
            Task(name=t["name"], classes=tuple(t["classes"]), gate=t.get("gate"), description=t.get("description", ""),
                 refines=t.get("refines"))
            for t in d["tasks"]
        )
        return cls(name=d["name"], tasks=tasks, primary=d["primary"])


DHUMOR = TaskSchema(
    name="dhumor",
    primary="humor",
    tasks=(
        Task("humor", ("no", "yes"), description="is the meme dark humor"),
        Task(
            "target",
            ("gender/sex", "mental health", "disability", "race/ethnicity", "violence/death", "other"),
            gate="humor",
            description="what the dark humor targets",
        ),
        Task("intensity", ("mild", "moderate", "severe"), gate="humor", description="how dark"),
    ),
)

HARMEME = TaskSchema(
    name="harmeme",
    primary="harmful",
    tasks=(
        Task("harmful", ("no", "yes"), description="harmful vs not, derived from harmfulness"),
        Task("harmfulness", ("not harmful", "somewhat harmful", "very harmful"), description="3-level harmfulness",
             refines="harmful"),
        Task("target", ("individual", "organization", "community", "society"), gate="harmful",
             description="who a harmful meme targets"),
    ),
)

PRESETS: dict[str, TaskSchema] = {"dhumor": DHUMOR, "harmeme": HARMEME}


def get_schema(spec: "str | dict | TaskSchema") -> TaskSchema:
    """A preset by name, a schema from its dict form, or the schema itself."""
    if isinstance(spec, TaskSchema):
        return spec
    if isinstance(spec, dict):
        return TaskSchema.from_dict(spec)
    if spec in PRESETS:
        return PRESETS[spec]
    raise UnknownNameError(f"unknown task schema {spec!r}; presets: {sorted(PRESETS)}")


@dataclass
class Meme:
    """One meme as read from a dataset, a manifest or a folder.

    ``labels`` maps every task of the schema to a class index, or :data:`MISSING`.
    ``source`` says where the record came from (``file:row``) for error messages.
    """

    id: str
    image: Path | None
    caption: str | None = None
    explanation: str | None = None
    labels: dict[str, int] = field(default_factory=dict)
    source: str = ""
