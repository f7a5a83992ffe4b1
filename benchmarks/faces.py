"""Face detection on real face sets: YuNet (facemt's detector) vs OpenCV's Haar
cascade (facemt 0.1's), detection rate per source and milliseconds per image.

    python benchmarks/faces.py --data-root ../shared/data [--limit 0] [--out benchmarks/faces.csv]

Sources: UTKFace adults (the 19+ chips the utkface adapter keeps), JAFFE
(every image), FER+ (FER2013Train, every image). Detection runs exactly as
`facemt fit` runs it (the largest face; small crops enlarged and padded
before scanning). Appends a Markdown table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import publish  # noqa: E402

from facemt.data import index_jaffe, index_utkface  # noqa: E402
from facemt.faces import FaceDetector  # noqa: E402
from facemt.images import decode_file  # noqa: E402


class Haar:
    """facemt 0.1's detector: the frontal cascade, faces >= 8 % of the shorter side."""

    def __init__(self) -> None:
        self.cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))

    def detect(self, image: Image.Image) -> list:
        grey = cv2.equalizeHist(np.asarray(image.convert("L")))
        side = max(12, int(0.08 * min(grey.shape)))
        boxes = self.cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        return list(boxes)


def sources(root: Path, limit: int) -> dict[str, list[str]]:
    out = {
        "UTKFace adults": list(index_utkface(root / "utkface").table["path"]),
        "JAFFE": list(index_jaffe(root / "jaffe").table["path"]),
        "FER+ Train": sorted(str(p) for p in (root / "ferplus" / "FER2013Train").glob("*.png")),
    }
    if limit:
        rng = np.random.default_rng(0)
        out = {k: sorted(rng.choice(v, min(limit, len(v)), replace=False)) for k, v in out.items()}
    return out


def rate(detector, paths: list[str]) -> tuple[int, float]:
    found, started = 0, time.perf_counter()
    for p in paths:
        found += bool(detector.detect(decode_file(p)))
    return found, (time.perf_counter() - started) / max(1, len(paths)) * 1000


def timing(detector, image: Image.Image, sizes=(48, 200, 640, 1600), repeats: int = 20) -> dict[int, float]:
    out = {}
    for side in sizes:
        w, h = image.size
        scaled = image.resize((side, round(side * h / w)))
        detector.detect(scaled)
        started = time.perf_counter()
        for _ in range(repeats):
            detector.detect(scaled)
        out[side] = (time.perf_counter() - started) / repeats * 1000
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--limit", type=int, default=0, help="images per source (0 = all)")
    p.add_argument("--out", default="benchmarks/faces.csv")
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    detectors = {"YuNet (facemt)": FaceDetector(), "YuNet, one scan (no mirror)": FaceDetector(mirror=False)}
    if hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 dropped the Haar cascades
        detectors["Haar (facemt 0.1)"] = Haar()
    rows = []
    for source, paths in sources(Path(args.data_root), args.limit).items():
        for name, det in detectors.items():
            found, ms = rate(det, paths)
            rows.append({"source": source, "detector": name, "images": len(paths), "found": found,
                         "rate": found / len(paths), "ms_per_image": ms})
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out, index=False)
    sample = decode_file(next(iter(sources(Path(args.data_root), 1).values()))[0])
    speed = {name: timing(det, sample) for name, det in detectors.items() if name != "YuNet, one scan (no mirror)"}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/faces.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"\n### Face detection on real faces at commit {commit}\n", "```", command, "```", "",
             "| source | detector | images | faces found | rate | ms per image (incl. decode) |", "|---|---|---|---|---|---|"]
    for r in frame.itertuples():
        lines.append(f"| {r.source} | {r.detector} | {r.images} | {r.found} | {100 * r.rate:.1f} % | {r.ms_per_image:.1f} |")
    lines += ["", "Detection time alone on one UTKFace chip resized to a width of 48 / 200 / 640 / 1600 px "
              "(1 thread, mean of 20):", "", "| detector | 48 px | 200 px | 640 px | 1600 px |", "|---|---|---|---|---|"]
    for name, t in speed.items():
        lines.append(f"| {name} | " + " | ".join(f"{t[s]:.1f} ms" for s in (48, 200, 640, 1600)) + " |")
    publish(lines, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
