"""Dataset validation before training: counts, missing labels, unreadable files,
exact duplicates (also across the train/validation split), unusable heads."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd

from facemt.data import DataIndex, ImageCache
from facemt.files import sha256_file
from facemt.tasks import TASK_NAMES, TASKS
from facemt.transforms import PreprocessConfig


@dataclass
class DataReport:
    """What :func:`check_data` found.

    Attributes:
        problems: issues that make training meaningless (training stops).
        warnings: issues worth knowing that do not stop training.
        per_class: task -> class -> count (plus ``missing``).
        per_person: one row per person: images and, per task, the labels seen.
        unreadable: one message per file that cannot be decoded.
        duplicates: groups of paths with identical bytes.
    """

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    per_person: pd.DataFrame = field(default_factory=pd.DataFrame)
    unreadable: list[str] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "problems": self.problems, "warnings": self.warnings, "per_class": self.per_class,
            "per_person": self.per_person.to_dict(orient="records"), "unreadable": self.unreadable,
            "duplicates": self.duplicates,
        }


def check_data(
    index: DataIndex,
    tasks: Sequence[str] | None = None,
    val_rows: Sequence[int] | None = None,
    cache: ImageCache | None = None,
    decode: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> DataReport:
    """Validate a data set before training.

    Args:
        index: the indexed images.
        tasks: the heads to be trained (None: every head with labels).
        val_rows: validation rows, to find duplicates that cross the split.
        cache: decoder cache (reused by training afterwards).
        decode: decode every image to find unreadable ones.
        progress: ``(done, total)`` while decoding.
    """
    t = index.table
    report = DataReport()
    if len(t) == 0:
        report.problems.append("no images")
        return report
    summary = index.summary()
    report.per_class = summary["labels"]
    wanted = tuple(tasks) if tasks else tuple(n for n in TASK_NAMES if t[n].notna().any())
    trainable = []
    for task in wanted:
        counts = report.per_class[task]
        present = [c for c in TASKS[task].classes if counts[c]]
        if len(present) < 2:
            what = f"only {present[0]!r}" if present else "no labels"
            msg = f"{task}: {what}; a head needs at least two classes"
            (report.problems if tasks else report.warnings).append(msg + ("" if tasks else " (head skipped)"))
        else:
            trainable.append(task)
            missing = counts["missing"]
            if missing:
                report.warnings.append(f"{task}: {missing} of {len(t)} images have no label (masked in the loss)")
            absent = [c for c in TASKS[task].classes if not counts[c]]
            if absent:
                report.warnings.append(f"{task}: no image of class {', '.join(absent)}")
            small = [c for c in TASKS[task].classes if 0 < counts[c] < 5]
            if small:
                report.warnings.append(f"{task}: fewer than 5 images of {', '.join(small)}")
    if not trainable:
        report.problems.append("no head has labels of two or more classes: nothing to train")
    if t["person"].isna().all():
        report.warnings.append("no person ids: validation cannot be subject-disjoint")
    elif t["person"].isna().any():
        report.warnings.append(f"{int(t['person'].isna().sum())} images have no person id")
    persons = t.dropna(subset=["person"]).groupby("person")
    rows = []
    for person, g in persons:
        row = {"person": person, "images": int(len(g))}
        for task in TASK_NAMES:
            row[task] = ",".join(sorted(g[task].dropna().unique()))
        rows.append(row)
        for task in ("age_group", "gender"):
            if g[task].dropna().nunique() > 1:
                report.warnings.append(f"person {person} has several {task} labels: {row[task]}")
    report.per_person = pd.DataFrame(rows)

    hashes: dict[str, list[int]] = defaultdict(list)
    for i, path in enumerate(t["path"]):
        try:
            hashes[sha256_file(path)].append(i)
        except OSError:
            pass  # reported as unreadable below
    val = set(int(i) for i in val_rows) if val_rows is not None else set()
    crossing = []
    for rows_ in hashes.values():
        if len(rows_) > 1:
            group = [t["path"].iloc[i] for i in rows_]
            report.duplicates.append(group)
            if val and len({i in val for i in rows_}) == 2:
                crossing.append(group)
    # One summary line, not one per group: large web sets hold hundreds of duplicates.
    for groups, what in ((report.duplicates, "identical files"),
                         (crossing, "identical files in both training and validation")):
        if groups:
            shown = "; ".join(", ".join(g) for g in groups[:3])
            more = f"; and {len(groups) - 3} more groups" if len(groups) > 3 else ""
            report.warnings.append(f"{len(groups)} groups of {what}: {shown}{more} (check-data --json lists all)")
    if decode:
        _, errors = (cache or ImageCache()).load(list(t["path"]), PreprocessConfig(image_size=64), progress)
        report.unreadable = errors
        if errors:
            report.problems.append(f"{len(errors)} unreadable image(s): " + "; ".join(errors[:5])
                                   + (f"; and {len(errors) - 5} more" if len(errors) > 5 else ""))
    return report
