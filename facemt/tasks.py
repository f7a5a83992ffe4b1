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
#: heads whose label cannot change within one person (one age group, one gender in a set of pictures):
#: pictures read together per person share one answer for them (:func:`per_person`)
PERSON_HEADS: tuple[str, ...] = ("age_group", "gender")


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


def person_keys(persons: Sequence[object | None]) -> np.ndarray:
    """Each row's person as a string; "" where unknown (None or NaN)."""
    return np.array(["" if p is None or (isinstance(p, float) and np.isnan(p)) else str(p) for p in persons])


def has_pairs(persons: Sequence[object | None]) -> bool:
    """Whether some known person has two or more of the rows (:func:`per_person` changes something)."""
    keys = person_keys(persons)
    known = keys[keys != ""]
    return len(set(known)) < len(known)


def per_person(probs: np.ndarray, persons: Sequence[object | None]) -> np.ndarray:
    """``probs`` (N x classes of a head that cannot change within a person: :data:`PERSON_HEADS`)
    with every row of a person with two or more rows replaced by that person's answer: the mean of the
    rows' log-probabilities, renormalised (each picture's evidence counts once). Rows of unknown persons
    and persons with one row stay as they are."""
    keys = person_keys(persons)
    out = np.array(probs, dtype=np.float32, copy=True)
    for person in np.unique(keys[keys != ""]):
        rows = keys == person
        if rows.sum() >= 2:
            pooled = np.log(np.clip(out[rows], 1e-12, 1.0)).mean(axis=0)
            pooled = np.exp(pooled - pooled.max())
            out[rows] = pooled / pooled.sum()
    return out
