"""Stability of a model's answers on real faces: (1) the same photo saved at 1x, 2x and 4x (bicubic), through
the whole prediction path, detector included; (2) landmark noise: each face's detected landmarks moved at
random by 2 % and 5 % of its eye distance (several draws), the face framed again and predicted.

    python benchmarks/stability.py --data-root ../shared/data [--model base] [--draws 4] [--utk-limit 400]
                                   [--results benchmarks/RESULTS.md]

Faces: the studio sets' test persons (benchmarks/studio_test_persons.txt) and UTKFace held-out faces
(benchmarks/utk_holdout.txt). A label flip is a face (and draw) whose label on any head differs from the
unperturbed answer; the probability change is the largest over heads and classes. A benchmark, not a
test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import publish  # noqa: E402
from studio import HERE, read_split, studio_index, test_rows  # noqa: E402

import facemt  # noqa: E402
from facemt.data import index_utkface  # noqa: E402
from facemt.faces import Face, default_detector, face_image  # noqa: E402
from facemt.images import decode_file  # noqa: E402

NOISE = (0.02, 0.05)


def faces(root: Path, utk_limit: int) -> list[tuple[str, Path]]:
    """(set name, path) of the studio test persons' pictures and the first UTKFace held-out faces."""
    out = []
    studio = studio_index(root).table
    split = read_split()
    for source, group in studio.groupby("source", sort=True):
        out += [(str(source), Path(p)) for p in group.iloc[test_rows(group, split)]["path"]]
    held = {line.strip() for line in (HERE / "utk_holdout.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    utk = index_utkface(root / "utkface").table
    utk = utk[utk["path"].map(lambda x: Path(x).name in held)]
    out += [("utkface", Path(p)) for p in utk["path"].iloc[:utk_limit]]
    return out


def answers(model, arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per face: the concatenated probabilities of every head, and the label index of every head."""
    probs = model.probabilities(arrays)
    return (np.concatenate([probs[t] for t in model.tasks], 1),
            np.stack([probs[t].argmax(1) for t in model.tasks], 1))


def moved(face: Face, sigma: float, rng: np.random.Generator) -> Face:
    """The face with every landmark moved by Gaussian noise of ``sigma`` x its eye distance per coordinate."""
    points = np.array(face.landmarks)
    eye_distance = float(np.hypot(*(points[1] - points[0])))
    points = points + rng.normal(0, sigma * eye_distance, points.shape)
    return Face(face.box, face.score, tuple(map(tuple, points)))


def measure(model, items: list[tuple[str, Path]], draws: int, seed: int = 0) -> pd.DataFrame:
    """One row per face and condition: set, condition, flipped (any head), flips per head, largest change."""
    pre, detector, rng = model.preprocess, default_detector(), np.random.default_rng(seed)
    rows = []
    for name, path in items:
        photo = decode_file(path)
        found = detector.detect(photo, max_faces=1)
        if not found:
            continue
        base_p, base_l = answers(model, [face_image(photo, found[0], pre.policy, pre.working_side, pre.image_size)])
        conditions: dict[str, list[np.ndarray]] = {}
        for k in (2, 4):  # the whole path, detector included, on the photo enlarged without new detail
            big = photo.resize((photo.width * k, photo.height * k), Image.BICUBIC)
            again = detector.detect(big, max_faces=1)
            if again:
                conditions.setdefault("same photo at 2x / 4x", []).append(
                    face_image(big, again[0], pre.policy, pre.working_side, pre.image_size))
        for sigma in NOISE:
            conditions[f"landmark noise {100 * sigma:g} % of eye distance"] = [
                face_image(photo, moved(found[0], sigma, rng), pre.policy, pre.working_side, pre.image_size)
                for _ in range(draws)]
        for condition, arrays in conditions.items():
            p, labels = answers(model, arrays)
            for i in range(len(arrays)):
                flips = labels[i] != base_l[0]
                rows.append({"set": name, "condition": condition, "flipped": bool(flips.any()),
                             **{f"flip_{t}": bool(f) for t, f in zip(model.tasks, flips)},
                             "change": float(np.abs(p[i] - base_p[0]).max())})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, tasks, title: str, command: str) -> list[str]:
    lines = [f"\n### {title}\n", "```", command, "```", "",
             "| condition | set | faces x draws | label flips (any head) | " + " | ".join(f"{t} flips" for t in tasks)
             + " | change: median / 95th pct / largest |", "|---|---|---|---|" + "---|" * len(tasks) + "---|"]
    for (condition, name), g in frame.groupby(["condition", "set"], sort=True):
        per_head = " | ".join(f"{100 * g[f'flip_{t}'].mean():.1f} %" for t in tasks)
        lines.append(f"| {condition} | {name} | {len(g)} | {100 * g['flipped'].mean():.1f} % | {per_head} | "
                     f"{g['change'].median():.3f} / {g['change'].quantile(0.95):.3f} / {g['change'].max():.3f} |")
    for condition, g in frame.groupby("condition", sort=True):
        lines.append(f"| {condition} | **all** | {len(g)} | **{100 * g['flipped'].mean():.1f} %** | "
                     + " | ".join(f"{100 * g[f'flip_{t}'].mean():.1f} %" for t in tasks)
                     + f" | {g['change'].median():.3f} / {g['change'].quantile(0.95):.3f} / {g['change'].max():.3f} |")
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--model", default="base")
    p.add_argument("--jitter", action="store_true", help="predict with facemt.load(jitter=True)")
    p.add_argument("--draws", type=int, default=4, help="noisy framings per face and noise level")
    p.add_argument("--utk-limit", type=int, default=400, help="UTKFace held-out faces used")
    p.add_argument("--csv", type=Path, help="also write the per-face rows here")
    p.add_argument("--results", type=Path)
    args = p.parse_args(argv)
    started = time.perf_counter()
    model = facemt.load(args.model, jitter=args.jitter)
    frame = measure(model, faces(args.data_root, args.utk_limit), args.draws)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    title = f"Stability: model `{args.model}`{' with --jitter' if args.jitter else ''} at commit {commit} ({time.perf_counter() - started:.0f} s)"
    lines = markdown(frame, model.tasks, title, f"python benchmarks/stability.py {' '.join(argv)}")
    if args.results:
        publish(lines, args.results)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
