"""Dataset indexing (FACES folders, CSV manifests), the decode-once image cache and
the torch Dataset.

Every source becomes the same table: one row per image with columns ``path``,
``person`` (may be missing), ``source`` and one column per task holding a
class name or ``None`` when that label is unknown.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from facemt.errors import FacemtError
from facemt.images import decode_file, is_image_file
from facemt.tasks import TASK_NAMES, TASKS
from facemt.faces import framing
from facemt.transforms import PreprocessConfig, face_images, shrink

log = logging.getLogger(__name__)

FACES_PATTERN = re.compile(
    r"^(?P<person>\d+)_(?P<age_group>[ymo])_(?P<gender>[mf])_(?P<expression>[adfhns])_(?P<set>[ab])$",
    re.IGNORECASE,
)
COLUMNS = ("path", "person", "source", *TASK_NAMES)
PERSON_COLUMNS = ("person", "group", "subject", "id")
#: Manifest file names that say nothing about the data: such a source is named after its folder.
GENERIC_MANIFEST_NAMES = ("labels", "label", "manifest", "data", "index", "annotations", "metadata")


@dataclass
class DataIndex:
    """A validated table of images plus what was left out while building it.

    Attributes:
        table: one row per image (see module docstring).
        skipped: file names that were seen but not understood, with the reason.
    """

    table: pd.DataFrame
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.table)

    def summary(self) -> dict:
        """Counts per task and class, persons and skipped files (JSON-ready)."""
        t = self.table
        out: dict = {
            "images": int(len(t)),
            "persons": int(t["person"].dropna().nunique()),
            "skipped": len(self.skipped),
            "sources": {str(k): int(v) for k, v in t["source"].value_counts().items()},
            "labels": {},
        }
        for name in TASK_NAMES:
            counts = t[name].value_counts()
            out["labels"][name] = {c: int(counts.get(c, 0)) for c in TASKS[name].classes}
            out["labels"][name]["missing"] = int(t[name].isna().sum())
        return out

    def tasks_present(self) -> tuple[str, ...]:
        """Tasks that have at least one label in the table."""
        return tuple(n for n in TASK_NAMES if self.table[n].notna().any())


def parse_faces_name(name: str) -> dict[str, str]:
    """Parse a FACES file name such as ``004_o_m_a_a.jpg`` into labels.

    Returns:
        dict with ``person``, ``age_group``, ``gender``, ``expression`` (class
        names) and ``set``.

    Raises:
        FacemtError: the name does not follow the FACES scheme.
    """
    stem = Path(str(name)).name
    stem = stem.split(".", 1)[0] if "." in stem else stem
    match = FACES_PATTERN.match(stem)
    if not match:
        raise FacemtError(
            f"{name!r} is not a FACES file name (expected id_age_gender_expression_set, e.g. 004_o_m_a_a.jpg)"
        )
    parts = {k: v.lower() for k, v in match.groupdict().items()}
    out = {"person": parts["person"], "set": parts["set"]}
    for task in TASK_NAMES:
        out[task] = TASKS[task].classes[TASKS[task].codes.index(parts[task])]
    return out


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})


def _finish_table(rows: list[dict], extra: Sequence[str] = ()) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=list(COLUMNS) + list(extra)) if rows else _empty_table()
    table = table.astype(object).where(table.notna(), None)
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def index_folder(root: str | os.PathLike) -> DataIndex:
    """Index a folder (recursively) of FACES-named images.

    Files with an image extension whose names do not parse are listed in
    ``skipped``; other files are ignored.

    Raises:
        FacemtError: the folder does not exist or holds no FACES-named image.
    """
    return _index_by_name(root, Path(root).name, parse_faces_name, "FACES-named",
                          "name files like 004_o_m_a_a.jpg or give a CSV manifest")


def read_manifest(csv_path: str | os.PathLike) -> DataIndex:
    """Read a CSV manifest: a ``path`` column (relative to the CSV's folder or
    absolute), any subset of the task columns (class names or FACES codes,
    empty = unknown) and optionally a ``person`` / ``group`` column. Other
    columns (e.g. ``ethnicity``) are carried into the table as they are.

    Raises:
        FacemtError: unreadable CSV, no ``path`` column, an unknown label
            (the message names the row), or one file listed with two different labels.
    """
    csv_path = Path(csv_path)
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[])
    except FileNotFoundError:
        raise FacemtError(f"{csv_path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise FacemtError(f"{csv_path}: not a readable CSV manifest ({str(exc).strip().splitlines()[0]})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if "path" not in frame.columns:
        raise FacemtError(f"{csv_path}: manifest needs a 'path' column (has: {', '.join(frame.columns) or 'none'})")
    label_cols = [t for t in TASK_NAMES if t in frame.columns]
    if not label_cols:
        raise FacemtError(f"{csv_path}: manifest has no label column; add one of {', '.join(TASK_NAMES)}")
    person_col = next((c for c in PERSON_COLUMNS if c in frame.columns), None)
    # Further columns (a set's ethnicity, say) travel with the rows: reports and benchmarks can group by them.
    extra = [c for c in frame.columns if c not in {*COLUMNS, *PERSON_COLUMNS} and c.isidentifier()]
    source = csv_path.parent.resolve().name if csv_path.stem.lower() in GENERIC_MANIFEST_NAMES else csv_path.stem
    rows = []
    for i, rec in enumerate(frame.to_dict("records"), start=2):
        raw = str(rec["path"]).strip()
        if not raw:
            raise FacemtError(f"{csv_path}:{i}: empty path")
        path = Path(raw) if Path(raw).is_absolute() else csv_path.parent / raw
        row = {"path": str(path.resolve()), "source": source, "person": None}
        row.update({c: (str(rec[c]).strip() or None) for c in extra})
        if person_col and str(rec[person_col]).strip():
            row["person"] = str(rec[person_col]).strip()
        for task in TASK_NAMES:
            value = str(rec.get(task, "")).strip()
            if not value:
                row[task] = None
                continue
            try:
                row[task] = TASKS[task].classes[TASKS[task].index(value)]
            except FacemtError as exc:
                raise FacemtError(f"{csv_path}:{i}: {exc}") from None
        rows.append(row)
    if not rows:
        raise FacemtError(f"{csv_path}: manifest has no rows")
    table = _finish_table(rows, extra)
    check_conflicts(table)
    return DataIndex(table, [])


# ------------------------------------------------------------------ adapters

UTKFACE_PATTERN = re.compile(r"^(?P<age>\d{1,3})_(?P<gender>[01])_(?P<race>[0-4])_(?P<stamp>\d+)")
JAFFE_PATTERN = re.compile(r"^(?P<person>[A-Z]{2})\.(?P<code>[A-Z]{2})(?P<take>\d+)\.(?P<number>\d+)$")
#: JAFFE's two-letter codes, in the order of the schema's expression classes.
JAFFE_CODES = dict(zip(("AN", "DI", "FE", "HA", "NE", "SA"), TASKS["expression"].classes))
#: FACES age ranges (years) per age group; the one place the mapping lives.
FACES_AGE_RANGES = {"young": (19, 31), "middle": (39, 55), "old": (69, 80)}
ADULT_AGE = 18


def persons_in(table: pd.DataFrame) -> list[str | None]:
    """Each row's person for reading a person's pictures together, qualified by the row's source where
    the table mixes sources (person ``01`` of two sets is two people); None where unknown."""
    persons = table["person"]
    if "source" in table and table["source"].nunique() > 1:
        persons = (table["source"].astype(str) + "/" + persons.astype(str)).where(persons.notna())
    return [None if pd.isna(p) else str(p) for p in persons]


def person_of(path: str | os.PathLike, how: str) -> str:
    """The person an image file shows, for pictures read together per person: ``name``: the id of a
    FACES (``004_o_m_a_a.jpg``) or JAFFE (``KA.AN1.39.tiff``) file name; ``folder``: the folder it is in.

    Raises:
        FacemtError: ``how`` is neither, or a file name follows neither scheme.
    """
    path = Path(path)
    if how == "folder":
        return str(path.resolve().parent)
    if how != "name":
        raise FacemtError(f"unknown person source {how!r}: choose name or folder")
    faces = FACES_PATTERN.match(path.name.split(".", 1)[0])
    jaffe = JAFFE_PATTERN.match(path.name.rsplit(".", 1)[0] if path.suffix else path.name)
    if faces:
        return faces["person"]
    if jaffe:
        return f"jaffe:{jaffe['person']}"
    raise FacemtError(f"{path}: the file name says no person (FACES names such as 004_o_m_a_a.jpg or JAFFE names "
                      "such as KA.AN1.39.tiff do); use --person-from folder with one folder per person")


def age_to_group(age: int, policy: str = "strict") -> str | None:
    """FACES age group of an age in years.

    ``strict``: only ages inside the FACES ranges (19-31, 39-55, 69-80) get a
    group; ages in the gaps return None (the row keeps its other labels).
    ``nearest``: adults in the gaps go to the nearest range (ties to the
    younger); over 80 is old. Under 19 is never a FACES group (None).
    """
    if policy not in ("strict", "nearest"):
        raise FacemtError(f"unknown age policy {policy!r}: choose strict or nearest")
    for group, (lo, hi) in FACES_AGE_RANGES.items():
        if lo <= age <= hi:
            return group
    if policy == "strict" or age < FACES_AGE_RANGES["young"][0]:
        return None
    distance = {g: min(abs(age - lo), abs(age - hi)) for g, (lo, hi) in FACES_AGE_RANGES.items()}
    return min(distance, key=lambda g: (distance[g], FACES_AGE_RANGES[g][0]))


def parse_utkface_name(name: str, policy: str = "strict") -> dict:
    """Parse ``age_gender_race_datetime.jpg.chip.jpg`` (UTKFace).

    Returns:
        dict with ``age`` (years), ``age_group`` (see :func:`age_to_group`),
        ``gender`` and ``person`` (the file name: one image per person in practice).

    Raises:
        FacemtError: a malformed name (e.g. a missing field) or an age above 130.
    """
    base = Path(str(name)).name
    match = UTKFACE_PATTERN.match(base)
    if not match:
        raise FacemtError(f"{name!r} is not a UTKFace file name (expected age_gender_race_datetime.jpg.chip.jpg)")
    age = int(match["age"])
    if age > 130:
        raise FacemtError(f"{name!r}: implausible age {age}")
    return {
        "age": age,
        "age_group": age_to_group(age, policy),
        "gender": TASKS["gender"].classes[int(match["gender"])],
        "person": f"utk:{base.split('.')[0]}",
    }


def parse_jaffe_name(name: str) -> dict:
    """Parse ``KA.AN1.39.tiff`` (JAFFE): person ``KA``, expression anger.

    All JAFFE subjects are women, so gender is ``female``; age is unknown.

    Raises:
        FacemtError: a malformed name, or surprise (``SU``), which FACES lacks.
    """
    stem = Path(str(name)).name
    stem = stem.rsplit(".", 1)[0] if stem.lower().endswith((".tiff", ".tif", ".jpg", ".png")) else stem
    match = JAFFE_PATTERN.match(stem)
    if not match:
        raise FacemtError(f"{name!r} is not a JAFFE file name (expected e.g. KA.AN1.39.tiff)")
    if match["code"] not in JAFFE_CODES:
        what = "surprise, which is not a FACES expression" if match["code"] == "SU" else f"unknown code {match['code']}"
        raise FacemtError(f"{name!r}: {what}")
    return {"person": f"jaffe:{match['person']}", "expression": JAFFE_CODES[match["code"]], "gender": "female"}


def _index_by_name(
    root: str | os.PathLike, source: str, parse: Callable[[str], dict], what: str, hint: str = ""
) -> DataIndex:
    """Index every image file below ``root`` whose name ``parse`` understands;
    the others are listed in ``skipped`` with the reason."""
    root = Path(root)
    if not root.exists():
        raise FacemtError(f"{root}: no such folder")
    if not root.is_dir():
        raise FacemtError(f"{root}: not a folder (give a folder of images or a .csv manifest)")
    rows, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p)):
        try:
            labels = parse(path.name)
        except FacemtError as exc:
            skipped.append(f"{path.relative_to(root)}: {str(exc).split(': ', 1)[-1]}")
            continue
        rows.append({"path": str(path.resolve()), "source": source, "person": labels.get("person"),
                     **{t: labels.get(t) for t in TASK_NAMES}})
    if not rows:
        raise FacemtError(f"{root}: no {what} images found ({len(skipped)} other image files)"
                          + (f"; {hint}" if hint else ""))
    if skipped:
        log.warning("%s: skipped %d image files; the first: %s", root, len(skipped), skipped[0])
    return DataIndex(_finish_table(rows), skipped)


def index_utkface(root: str | os.PathLike, policy: str = "strict") -> DataIndex:
    """Index a UTKFace folder: age group by :func:`age_to_group` (``policy``),
    gender. Faces under 19 are skipped and counted: FACES has adults only."""
    def parse(name: str) -> dict:
        labels = parse_utkface_name(name, policy)
        if labels["age"] <= ADULT_AGE:
            raise FacemtError(f"{name!r}: age {labels['age']} is under 19 (FACES has adults only)")
        return labels

    return _index_by_name(root, "utkface", parse, "UTKFace")


def index_jaffe(root: str | os.PathLike) -> DataIndex:
    """Index a JAFFE folder (expression, gender female; surprise skipped and counted)."""
    return _index_by_name(root, "jaffe", parse_jaffe_name, "JAFFE")


#: FER+ vote columns of Microsoft's label.csv, in file order; mapped onto the schema's class names.
FERPLUS_VOTES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                 "unknown", "NF")
FERPLUS_CLASSES = dict(zip(("anger", "disgust", "fear", "happiness", "neutral", "sadness"),
                           TASKS["expression"].classes))
FERPLUS_SPLITS = ("FER2013Train", "FER2013Valid", "FER2013Test")
FERPLUS_POLICIES = ("majority", "clear", "soft")
#: Column of a soft-labelled source: the crowd's votes over a head's classes, "3,0,1,5,0,1" in schema order.
VOTES_SUFFIX = "_votes"


def ferplus_label(votes: Sequence[int], policy: str = "majority") -> tuple[str | None, str]:
    """The FACES expression of one FER+ image from its ten vote counts.

    ``majority``: the class with the most votes; ``clear``: that class only if
    it holds more than half of the votes; ``soft``: the majority label (for
    accuracy), and training uses the vote distribution over the six FACES
    classes as the target (see :func:`soft_targets`). Ties, and a winner that is surprise,
    contempt, unknown or not-a-face (not FACES classes), give no label.

    Returns:
        (class name or None, the reason when None)
    """
    if policy not in FERPLUS_POLICIES:
        raise FacemtError(f"unknown FER+ label policy {policy!r}: choose from {', '.join(FERPLUS_POLICIES)}")
    votes = [int(v) for v in votes]
    top = max(votes)
    winners = [FERPLUS_VOTES[i] for i, v in enumerate(votes) if v == top]
    if top == 0 or len(winners) > 1:
        return None, "tied votes"
    if winners[0] not in FERPLUS_CLASSES:
        return None, f"{winners[0]} is not a FACES expression"
    if policy == "clear" and top * 2 <= sum(votes):
        return None, "no clear majority"
    return FERPLUS_CLASSES[winners[0]], ""


def _ferplus_split(folder: Path) -> Path | None:
    if (folder / "label.csv").is_file():
        return folder
    return folder / FERPLUS_SPLITS[0] if (folder / FERPLUS_SPLITS[0] / "label.csv").is_file() else None


def index_ferplus(root: str | os.PathLike, policy: str = "majority") -> DataIndex:
    """Index a FER+ folder in Microsoft's layout: a split folder holding
    ``label.csv`` (file, face box, ten vote counts) and its PNGs, or the folder
    above ``FER2013Train|Valid|Test`` (then ``FER2013Train`` is read).

    Labels: expression by :func:`ferplus_label` (``policy``); images without a
    FACES label are skipped and counted. FER2013 has no identities: every
    image is its own person.

    Raises:
        FacemtError: no ``label.csv``, or a malformed row (the message names it).
    """
    root = Path(root)
    if not root.exists():
        raise FacemtError(f"{root}: no such folder")
    folder = _ferplus_split(root)
    if folder is None:
        raise FacemtError(f"{root}: not a FER+ folder (expected label.csv or {FERPLUS_SPLITS[0]}/label.csv)")
    rows, skipped = [], []
    source = "ferplus" if folder.name not in FERPLUS_SPLITS else f"ferplus-{folder.name[7:].lower()}"
    with open(folder / "label.csv", newline="", encoding="utf-8") as f:
        for line, rec in enumerate(csv.reader(f), start=1):
            if not rec:
                continue
            try:
                name, votes = rec[0].strip(), [int(v) for v in rec[2:12]]
                if len(votes) != len(FERPLUS_VOTES) or min(votes) < 0 or not name:
                    raise ValueError
            except (ValueError, IndexError):
                raise FacemtError(f"{folder / 'label.csv'}:{line}: expected file,box and {len(FERPLUS_VOTES)} vote counts") from None
            label, why = ferplus_label(votes, policy)
            if label is None:
                skipped.append(f"{name}: {why}")
                continue
            row = {"path": str((folder / name).resolve()), "source": source,
                   "person": f"fer:{folder.name}/{name}", "expression": label}
            if policy == "soft":
                row["expression" + VOTES_SUFFIX] = ",".join(
                    str(votes[FERPLUS_VOTES.index(fer)]) for fer in FERPLUS_CLASSES)
            rows.append(row)
    if not rows:
        raise FacemtError(f"{folder}: no FER+ image with a FACES expression label ({len(skipped)} skipped)")
    log.info("%s: %d images, %d skipped (%s policy)", folder, len(rows), len(skipped), policy)
    return DataIndex(_finish_table(rows, ["expression" + VOTES_SUFFIX] if policy == "soft" else []), skipped)


def is_ferplus_test(path: str | os.PathLike) -> bool:
    """True for Microsoft's FER2013Test folder, which is never trained on."""
    return Path(path).name == FERPLUS_SPLITS[2] or Path(path).parent.name == FERPLUS_SPLITS[2]


ADAPTERS: dict[str, Callable[[str], DataIndex]] = {
    "faces": index_folder,
    "utkface": index_utkface,
    "jaffe": index_jaffe,
    "ferplus": index_ferplus,
    "ferplus-clear": lambda root: index_ferplus(root, "clear"),
    "ferplus-soft": lambda root: index_ferplus(root, "soft"),
    "csv": read_manifest,
}
_NAME_PARSERS = {"faces": parse_faces_name, "utkface": parse_utkface_name, "jaffe": parse_jaffe_name}


def detect_adapter(root: Path, sample: int = 200) -> str:
    """The adapter whose file-name scheme matches most image files in ``root``."""
    names = []
    for p in root.rglob("*"):
        if p.is_file() and is_image_file(p):
            names.append(p.name)
            if len(names) >= sample:
                break
    def score(parse: Callable[[str], dict]) -> int:
        n = 0
        for name in names:
            try:
                parse(name)
                n += 1
            except FacemtError:
                pass
        return n
    scores = {k: score(f) for k, f in _NAME_PARSERS.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] else "faces"


def _parse_source(source: str | os.PathLike) -> tuple[str | None, str | None, Path]:
    """``[NAME=][ADAPTER:]PATH`` -> (name or None, adapter or None, path)."""
    text = str(source)
    name = None
    head, eq, rest = text.partition("=")
    if eq and re.fullmatch(r"[A-Za-z0-9_.-]+", head) and not Path(text).exists():
        name, text = head, rest
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() in ADAPTERS and not Path(text).exists():
        return name, prefix.lower(), Path(rest)
    if sep and prefix and prefix.lower() not in ADAPTERS and not Path(text).exists() and len(prefix) > 1:
        raise FacemtError(f"unknown data adapter {prefix!r}: choose {', '.join(ADAPTERS)} (e.g. utkface:PATH)")
    return name, None, Path(text)


def resolve_source(source: str | os.PathLike) -> str:
    """The same source with its path made absolute (``NAME=`` and ``ADAPTER:`` kept), so that a
    run's recorded sources (``fit --resume``) read the same data from any working directory."""
    name, adapter, path = _parse_source(source)
    return (f"{name}=" if name else "") + (f"{adapter}:" if adapter else "") + str(path.resolve())


def load_index(source: str | os.PathLike) -> DataIndex:
    """Index one data source: ``[NAME=][ADAPTER:]PATH`` with ``ADAPTER`` one of
    ``faces``, ``utkface``, ``jaffe``, ``ferplus``, ``csv``, or a plain path (a
    ``.csv`` manifest, or a folder whose file-name scheme is detected).
    ``NAME=`` names the source (``--balance-sources``, reports, person ids);
    otherwise a source is named by its adapter, or a manifest by its file's
    stem (by its folder when the file has a generic name such as ``labels.csv``).

    Raises:
        FacemtError: unknown adapter, missing path, nothing usable inside.
    """
    name, adapter, path = _parse_source(source)
    if adapter is None:
        if path.suffix.lower() == ".csv":
            adapter = "csv"
        elif path.is_dir():
            adapter = "ferplus" if _ferplus_split(path) is not None else detect_adapter(path)
        else:
            adapter = "faces"
    index = ADAPTERS[adapter](path)
    if name:
        index.table["source"] = name
    return index


def check_conflicts(table: pd.DataFrame) -> None:
    """One image file, one set of labels: a file listed twice is fine only with
    the same labels and person.

    Raises:
        FacemtError: naming the first file listed with different labels or persons.
    """
    columns = ["person", *TASK_NAMES]
    repeated = table[table.duplicated("path", keep=False)]
    for path, rows in repeated.groupby("path", sort=True):
        differ = [c for c in columns if rows[c].map(lambda v: "" if v is None else str(v)).nunique() > 1]
        if differ:
            values = "; ".join(f"{c}: {', '.join(sorted({str(v) for v in rows[c]}))}" for c in differ)
            raise FacemtError(f"{path}: listed {len(rows)} times with different labels ({values}); "
                              "keep one row per image")


def load_sources(sources: Sequence[str | os.PathLike]) -> DataIndex:
    """Index every ``--data`` source and join them (see :func:`load_index`).

    Raises:
        FacemtError: a source given twice, or one file with two different labels or persons.
    """
    seen: dict[str, str] = {}
    for source in sources:
        key = str(_parse_source(source)[2].resolve())
        if key in seen:
            raise FacemtError(f"--data {source}: the same data as --data {seen[key]}; give each source once")
        seen[key] = str(source)
    index = combine([load_index(s) for s in sources])
    check_conflicts(index.table)
    return index


def combine(indexes: Sequence[DataIndex]) -> DataIndex:
    """Concatenate several indexes into one (same columns, skipped lists joined)."""
    if len(indexes) == 1:
        return indexes[0]
    table = pd.concat([i.table for i in indexes], ignore_index=True)
    return DataIndex(table, [s for i in indexes for s in i.skipped])


def encode_targets(table: pd.DataFrame, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Class indices per task, -1 where the label is missing."""
    out = {}
    for task in tasks:
        classes = TASKS[task].classes
        out[task] = np.array(
            [classes.index(v) if v is not None else -1 for v in table[task]], dtype=np.int64
        )
    return out


def soft_targets(table: pd.DataFrame, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Per task with a votes column (``ferplus-soft``): N x classes vote
    distributions, NaN rows where a row has no votes. Tasks without one are left out."""
    out = {}
    for task in tasks:
        column = task + VOTES_SUFFIX
        if column not in table.columns:
            continue
        dist = np.full((len(table), TASKS[task].num_classes), np.nan, dtype=np.float32)
        for i, text in enumerate(table[column]):
            if isinstance(text, str) and text:
                votes = np.array([float(v) for v in text.split(",")], dtype=np.float32)
                if votes.shape == (TASKS[task].num_classes,) and votes.sum() > 0:
                    dist[i] = votes / votes.sum()
        out[task] = dist
    return out


def file_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)


class ImageCache:
    """Decodes each image once (EXIF applied, RGB, shrunk to the working size)
    and keeps the result in memory, shared by every fold and model of a run.
    """

    def __init__(self, workers: int | None = None) -> None:
        self._store: dict[tuple, np.ndarray] = {}
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.decoded = 0
        #: the distinct framings (working size, input size, crop policy) images were decoded for.
        self.framings: set[tuple] = set()
        #: how each decoded path was framed: ``aligned``, ``boxed`` or ``whole``.
        self.framing: dict[str, str] = {}

    def _decode(self, path: str, cfg: PreprocessConfig) -> np.ndarray:
        if not cfg.policy.detects:
            self.framing[path] = "whole"
            return shrink(decode_file(path, cfg.working_side), cfg)
        face, array = face_images(decode_file(path), cfg, largest_only=True, fallback=True)[0]
        self.framing[path] = framing(cfg.policy, face)  # no face found: the whole picture
        return array

    def framing_counts(self, table: pd.DataFrame) -> dict[str, dict[str, int]]:
        """Per source, how many of ``table``'s images were aligned, boxed or used whole."""
        out: dict[str, dict[str, int]] = {}
        for path, source in zip(table["path"], table["source"]):
            how = self.framing.get(path)
            if how:
                counts = out.setdefault(str(source), {"aligned": 0, "boxed": 0, "whole": 0})
                counts[how] += 1
        return out

    def load(
        self,
        paths: Sequence[str],
        cfg: PreprocessConfig,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[list[np.ndarray | None], list[str]]:
        """Return the cached arrays for ``paths`` (None where unreadable) and the
        error messages of unreadable files, decoding only what is not cached yet.
        """
        results: list[np.ndarray | None] = [None] * len(paths)
        errors: list[str] = []
        todo = []
        for i, p in enumerate(paths):
            try:
                key = (*file_key(p), cfg.working_side, cfg.image_size, cfg.policy)
            except OSError:
                errors.append(f"{p}: no such file")
                continue
            if key in self._store:
                results[i] = self._store[key]
            else:
                todo.append((i, p, key))
        done = len(paths) - len(todo)
        if progress:
            progress(done, len(paths))

        def work(item):
            i, p, key = item
            try:
                return i, key, self._decode(p, cfg), None
            except FacemtError as exc:
                return i, key, None, str(exc)

        with ThreadPoolExecutor(self.workers) as pool:
            for i, key, arr, err in pool.map(work, todo):
                done += 1
                if err:
                    errors.append(err)
                else:
                    self._store[key] = arr
                    results[i] = arr
                    self.decoded += 1
                    self.framings.add(key[-3:])
                if progress:
                    progress(done, len(paths))
        return results, errors


class FaceDataset(Dataset):
    """Cached images + per-task targets; items are ``{"image": CHW tensor,
    "targets": {task: class index or -1}}``.

    Augmentation randomness is seeded per item from ``(seed, epoch, index)``,
    so an epoch's augmentations do not depend on which items came before: a
    resumed run sees exactly the images an uninterrupted one would.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        targets: dict[str, np.ndarray],
        transform: Callable[..., torch.Tensor],
        seed: int = 0,
        soft: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.images = list(images)
        self.targets = targets
        self.soft = soft or {}
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item_seed = int(np.random.SeedSequence([self.seed % (2**32), self.epoch, i]).generate_state(1)[0])
        return {
            "image": self.transform(self.images[i], seed=item_seed),
            "targets": {t: torch.tensor(v[i]) for t, v in self.targets.items()},
            **({"soft": {t: torch.from_numpy(v[i]) for t, v in self.soft.items()}} if self.soft else {}),
        }
