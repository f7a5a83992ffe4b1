"""The one label schema: task names, ordered class names and FACES file-name codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from facemt.errors import FacemtError


@dataclass(frozen=True)
class Task:
    """One classification head.

    Attributes:
        name: column and head name, e.g. ``"expression"``.
        classes: class names in the order of the head's logits.
        codes: the one-letter FACES file-name code of each class, same order.
    """

    name: str
    classes: tuple[str, ...]
    codes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, label: str) -> int:
        """Class index of a class name or FACES code (case-insensitive)."""
        key = str(label).strip().lower()
        if key in self.classes:
            return self.classes.index(key)
        if key in self.codes:
            return self.codes.index(key)
        raise FacemtError(
            f"unknown {self.name} label {label!r}: expected one of "
            f"{', '.join(self.classes)} (or codes {', '.join(self.codes)})"
        )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("age_group", ("young", "middle", "old"), ("y", "m", "o")),
        Task("gender", ("male", "female"), ("m", "f")),
        Task(
            "expression",
            ("anger", "disgust", "fear", "happiness", "neutrality", "sadness"),
            ("a", "d", "f", "h", "n", "s"),
        ),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def select_tasks(names: Iterable[str] | str | None = None) -> tuple[str, ...]:
    """Validate a subset of task names and return it in schema order.

    Args:
        names: task names, a comma-separated string, or None for all tasks.

    Raises:
        FacemtError: on an unknown or empty selection.
    """
    if names is None:
        return TASK_NAMES
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    wanted = [n.strip() for n in names if n.strip()]
    unknown = [n for n in wanted if n not in TASKS]
    if unknown:
        raise FacemtError(f"unknown task {unknown[0]!r}: choose from {', '.join(TASK_NAMES)}")
    if not wanted:
        raise FacemtError(f"no task selected: choose from {', '.join(TASK_NAMES)}")
    return tuple(n for n in TASK_NAMES if n in wanted)


def schema_dict(names: Sequence[str]) -> dict[str, list[str]]:
    """The JSON form of a schema (task name -> class names) stored in checkpoints."""
    return {n: list(TASKS[n].classes) for n in names}


def check_schema(schema: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Check a stored schema against this version's tasks; return the task names."""
    for name, classes in schema.items():
        if name not in TASKS or tuple(classes) != TASKS[name].classes:
            raise FacemtError(
                f"checkpoint task {name!r} with classes {list(classes)} does not match "
                f"this facemt version's schema"
            )
    return tuple(n for n in TASK_NAMES if n in schema)


def class_prior(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """Class frequencies from a head's training label counts, each count + 1 so
    that a class absent from training keeps a finite log prior. The one prior
    both the logit-adjusted loss and prediction under another prior
    (:func:`facemt.inference.prior_weights`) use."""
    c = np.asarray(counts, dtype=float) + 1.0
    return c / c.sum()
