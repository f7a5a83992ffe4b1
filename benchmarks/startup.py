"""Start-up and throughput of prediction per engine, side by side in one run: cold `facemt predict PHOTO`
(a new process each time), `import facemt; facemt.load().predict(PHOTO)` in a new Python, and a folder of
photos in, labels out.

    python benchmarks/startup.py [--folder DIR] [--limit 500] [--repeats 5] [--csv benchmarks/startup.csv]
                                 [--results benchmarks/RESULTS.md]

--folder defaults to ../shared/data/utkface (real 200-pixel chips; the first --limit files); any folder of
photos works. Wall-clock medians; a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.cbook
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
ENGINES = ("auto", "torch", "onnx", "onnx-int8")
API = ("import sys, time; t = time.perf_counter(); import facemt; "
       "facemt.load(engine={engine!r}).predict({photo!r}); print(time.perf_counter() - t)")


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def cold_rows(photo: str, repeats: int) -> list[dict]:
    """Per engine: a whole `facemt predict PHOTO` process, and load() + one prediction in a new Python;
    and the floor under the PyTorch engine: a new Python importing torch and timm, nothing else."""
    floor = [_wall([sys.executable, "-c", "import torch, timm"]) for _ in range(repeats)]
    rows = [{"measure": "python -c 'import torch, timm' (what --engine torch loads first), wall (s)",
             "engine": "torch", "median": statistics.median(floor), "min": min(floor), "max": max(floor),
             "n": repeats}]
    for engine in ENGINES:
        cli = [_wall([sys.executable, "-m", "facemt", "predict", photo, "--engine", engine]) for _ in range(repeats)]
        api = [float(subprocess.run([sys.executable, "-c", API.format(engine=engine, photo=photo)], check=True,
                                    capture_output=True, text=True).stdout.split()[-1]) for _ in range(repeats)]
        rows += [{"measure": "facemt predict PHOTO, cold, wall (s)", "engine": engine,
                  "median": statistics.median(cli), "min": min(cli), "max": max(cli), "n": repeats},
                 {"measure": "import facemt; load().predict(PHOTO) in a new Python (s)", "engine": engine,
                  "median": statistics.median(api), "min": min(api), "max": max(api), "n": repeats}]
    return rows


def folder_rows(folder: Path, limit: int) -> list[dict]:
    """Per engine: `facemt predict FOLDER --out file` on ``limit`` photos, faces per second of the whole command."""
    files = sorted(p for p in folder.iterdir() if p.is_file())[:limit]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "photos"
        listing.mkdir()
        for f in files:
            os.symlink(f.resolve(), listing / f.name)
        for engine in ENGINES:
            out = Path(tmp) / f"{engine}.csv"
            wall = _wall([sys.executable, "-m", "facemt", "predict", str(listing), "--engine", engine,
                          "--out", str(out)])
            rows.append({"measure": f"folder of {len(files)} photos, photos/s (whole command)", "engine": engine,
                         "median": len(files) / wall, "min": None, "max": None, "n": 1})
    return rows


def markdown(frame: pd.DataFrame, argv: list[str]) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    lines = [f"### Prediction start-up and throughput per engine at commit {commit}", "",
             f"`python benchmarks/startup.py {' '.join(argv)}` on {platform.machine()}, {os.cpu_count()} CPU(s), "
             f"{datetime.now(timezone.utc):%Y-%m-%d}. Median of repeated runs (min-max).", "",
             "| measure | " + " | ".join(ENGINES) + " |", "|---|" + "---|" * len(ENGINES)]
    for measure, group in frame.groupby("measure", sort=False):
        cells = []
        for engine in ENGINES:
            if not (group["engine"] == engine).any():
                cells.append("")
                continue
            r = group[group["engine"] == engine].iloc[0]
            spread = "" if pd.isna(r["min"]) else f" ({r['min']:.2f}-{r['max']:.2f})"
            cells.append(f"{r['median']:.2f}{spread}")
        lines.append(f"| {measure} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=ROOT.parent / "shared" / "data" / "utkface")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--photo", default=PHOTO)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv", type=Path)
    p.add_argument("--results", type=Path, help="append the table to this markdown file (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    frame = pd.DataFrame(cold_rows(str(args.photo), args.repeats) + folder_rows(args.folder, args.limit))
    text = markdown(frame, argv)
    print(text)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
