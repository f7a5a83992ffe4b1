"""Sharded folder prediction: split a sorted file list into N deterministic
shards, write each shard's predictions next to a small manifest, and merge the
parts back into one file, checking that every input appears exactly once.

A part of ``preds.csv`` is ``preds.part-K-of-N.csv`` (K counts from 1) with
``preds.part-K-of-N.csv.json`` beside it, written after the part is complete:
a part without its manifest is unfinished and is never merged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence, TypeVar

from facemt.errors import FacemtError
from facemt.files import atomic_write, atomic_write_text

T = TypeVar("T")
MANIFEST_FORMAT = "facemt-prediction-shard"


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N.

    Raises:
        FacemtError: anything else.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise FacemtError(f"--shard {text}: write K/N with 1 <= K <= N, e.g. 2/4 for the second of four shards")
    return int(match[1]), int(match[2])


def take_shard(files: Sequence[T], k: int, n: int) -> list[T]:
    """The K-th of N shards (K from 1): items K-1, K-1+N, ... of the list, so
    shards differ in size by at most one and together hold every item once.
    Used for folder prediction and for each training process's share of a batch."""
    return list(files[k - 1 :: n])


def part_path(out: str | os.PathLike, k: int, n: int) -> Path:
    """Where shard K of N of ``out`` is written: ``preds.csv`` -> ``preds.part-K-of-N.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.part-{k}-of-{n}{out.suffix}")


def _list_hash(files: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(files).encode("utf-8")).hexdigest()


def write_manifest(part: str | os.PathLike, k: int, n: int, all_files: Sequence[str], mine: Sequence[str],
                   options: dict | None = None) -> Path:
    """Record which inputs the finished ``part`` covers and the model and options that predicted it
    (``Predictor.options``; call after the part is in place)."""
    path = Path(str(part) + ".json")
    atomic_write_text(path, json.dumps({
        "format": MANIFEST_FORMAT, "format_version": 1, "shard": k, "shards": n, "total_files": len(all_files),
        "files_sha256": _list_hash([str(f) for f in all_files]), "options": options or {},
        "inputs": [str(f) for f in mine],
    }, indent=1) + "\n")
    return path


def find_parts(out: str | os.PathLike) -> list[Path]:
    """The finished parts (those with a manifest) of ``out``, e.g. ``preds.part-*-of-*.csv``."""
    out = Path(out)
    pattern = re.compile(rf"{re.escape(out.stem)}\.part-\d+-of-\d+{re.escape(out.suffix)}")
    folder = out.parent if str(out.parent) else Path(".")
    return sorted(p for p in folder.glob(f"{out.stem}.part-*{out.suffix}")
                  if pattern.fullmatch(p.name) and Path(str(p) + ".json").is_file())


def _read_manifest(part: Path) -> dict:
    path = Path(str(part) + ".json")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError("not a facemt shard manifest")
        missing = [k for k in ("shard", "shards", "total_files", "files_sha256", "inputs") if k not in manifest]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return manifest
    except FileNotFoundError:
        raise FacemtError(f"{part}: no manifest {path.name} (the shard did not finish; predict it again)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FacemtError(f"{path}: unreadable shard manifest ({exc})") from None


def _read_rows(part: Path) -> tuple[list[str] | None, list]:
    """(CSV header or None for JSON lines, rows as dicts / raw lines) of one part."""
    try:
        with open(part, encoding="utf-8", newline="") as f:
            if part.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                return list(reader.fieldnames or []), list(reader)
            return None, [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, csv.Error) as exc:
        raise FacemtError(f"{part}: unreadable ({exc})") from None


def merge_parts(parts: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, int]:
    """Join the parts of one sharded prediction into ``out`` (CSV or JSON lines,
    like the parts), rows in the order of the original sorted file list.

    Raises:
        FacemtError: parts from different runs, models, options or formats, a shard given twice
            or missing, an input in two shards or in none, rows for files a
            shard did not hold. ``out`` is then not written.

    Returns:
        ``{"shards", "files", "rows"}``.
    """
    parts = [Path(p) for p in parts]
    if not parts:
        raise FacemtError("no finished parts to merge (looked for FILE.part-K-of-N.csv with its .json manifest)")
    suffixes = {p.suffix.lower() for p in parts} | {Path(out).suffix.lower()}
    if len(suffixes) != 1 or suffixes - {".csv", ".jsonl"}:
        raise FacemtError(f"parts and --out must all be .csv or all .jsonl (got {', '.join(sorted(suffixes))})")
    manifests = [_read_manifest(p) for p in parts]
    runs = {(m["shards"], m["total_files"], m["files_sha256"]) for m in manifests}
    if len(runs) != 1:
        raise FacemtError("the parts come from different file lists or shard counts: merge one prediction at a time")
    n, total, _ = runs.pop()
    options = [m.get("options", {}) for m in manifests]
    differ = sorted({key for o in options for key in o if any(o.get(key) != other.get(key) for other in options)})
    if differ:
        raise FacemtError(f"the parts were predicted with different models or options ({', '.join(differ)}): "
                          "predict every shard with the same model and options, then merge")
    by_shard: dict[int, tuple[Path, dict]] = {}
    for part, m in zip(parts, manifests):
        if m["shard"] in by_shard:
            raise FacemtError(f"shard {m['shard']}/{n} given twice ({by_shard[m['shard']][0]} and {part}): "
                              "overlapping parts")
        by_shard[m["shard"]] = (part, m)
    missing = sorted(set(range(1, n + 1)) - set(by_shard))
    if missing:
        raise FacemtError(f"shard(s) {', '.join(f'{k}/{n}' for k in missing)} missing: predict them, then merge")
    order: dict[str, int] = {}
    for m in manifests:
        for i, name in enumerate(m["inputs"]):
            if name in order:
                raise FacemtError(f"{name} appears in more than one shard: overlapping parts")
            order[name] = (m["shard"] - 1) + i * n  # its place in the full sorted list
    if len(order) != total or sorted(order.values()) != list(range(total)):
        raise FacemtError(f"the parts cover {len(order)} of {total} files: a gap between shards")
    header, rows = None, []
    for k in range(1, n + 1):
        part, m = by_shard[k]
        part_header, part_rows = _read_rows(part)
        if header is not None and part_header != header:
            raise FacemtError(f"{part}: its columns differ from the other parts (another model?)")
        header = part_header
        mine, seen = set(m["inputs"]), set()
        for row in part_rows:
            path = row.get("path") if isinstance(row, dict) else None
            if path not in mine:
                raise FacemtError(f"{part}: a row for {path!r}, which is not an input of shard {k}/{n}")
            seen.add(path)
            rows.append(row)
        if seen != mine:
            raise FacemtError(f"{part}: no row for {len(mine - seen)} of its inputs (truncated part?)")
    rows.sort(key=lambda r: order[r["path"]])  # stable: faces of one photo keep their order
    _write_rows(Path(out), header, rows)
    return {"shards": n, "files": total, "rows": len(rows)}


def _write_rows(out: Path, header: list[str] | None, rows: list) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if header is not None:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(rows)
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    atomic_write(out, write)
