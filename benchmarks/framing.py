"""JAFFE zero-shot under other framings: is the base model's failure on posed
expressions one of framing?

FER+ faces (what the base learned expression from) are 48-pixel greyscale
crops around the face; JAFFE pictures are 256-pixel studio portraits with
hair and shoulders. Each variant re-cuts every JAFFE picture the way FER+
faces were cut (a square around the detected face box, plus a margin,
greyscale, resized), then the model frames it with its own crop policy as
for any picture; accuracy and per-class recall on all JAFFE faces of the six
FACES classes, next to the pictures as they are. Re-cut copies go to a
temporary folder, never into the repository.

    python benchmarks/framing.py --data-root ../shared/data [--model base] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import publish  # noqa: E402

from facemt.data import ImageCache, index_jaffe  # noqa: E402
from facemt.engine import decode_images  # noqa: E402
from facemt.errors import FacemtError  # noqa: E402
from facemt.evaluation import evaluate_predictions  # noqa: E402
from facemt.faces import default_detector  # noqa: E402
from facemt.images import as_rgb_image  # noqa: E402
from facemt.inference import load  # noqa: E402
from facemt.tasks import TASKS  # noqa: E402

#: (name, margin around the face box as a fraction of its side, side in pixels); None: the picture as it is
VARIANTS = (("as is", None, None), ("face box, 48 px (as FER+)", 0.0, 48), ("face box, 128 px", 0.0, 128),
            ("face box + 60 %, 48 px", 0.6, 48), ("face box + 60 %, 128 px", 0.6, 128))


def recut(src: Path, out: Path, margin: float, side: int) -> None:
    """Every picture of ``src`` as a greyscale ``side``-pixel square around its
    largest face (the whole picture when none is found), named as before."""
    detector = default_detector()
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        try:
            picture = as_rgb_image(path)
        except FacemtError:  # not a picture (a README, a licence file)
            continue
        faces = detector.detect(picture)
        x, y, w, h = faces[0].box if faces else (0, 0, *picture.size)
        half = max(w, h) * (1 + margin) / 2
        cx, cy = x + w / 2, y + h / 2
        square = picture.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
        square.convert("L").resize((side, side)).save(out / f"{path.stem}.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--model", default="base")
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    jaffe = Path(args.data_root) / "jaffe"
    model = load(args.model, device="cpu")
    classes = TASKS["expression"].classes
    lines = ["| JAFFE pictures | faces | aligned | accuracy % | "
             + " | ".join(f"{c} recall %" for c in classes) + " |", "|---|---|---|---|" + "---|" * len(classes)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, margin, side in VARIANTS:
            folder = jaffe
            if side is not None:
                folder = Path(tmp) / f"{margin}_{side}"
                recut(jaffe, folder, margin, side)
            index = index_jaffe(folder)
            cache = ImageCache()
            images = decode_images(index, model.preprocess, cache, None)
            m = evaluate_predictions(index.table, model.probabilities(images))["expression"]
            aligned = sum(c["aligned"] for c in cache.framing_counts(index.table).values())
            lines.append(f"| {name} | {m['n']} | {aligned} | {100 * m['accuracy']:.1f} | "
                         + " | ".join(f"{100 * m['per_class'][c]['recall']:.0f}" for c in classes) + " |")
            print(lines[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    publish([f"\n### JAFFE zero-shot under other framings, model `{args.model}`, at commit {commit}\n", "```",
             "python benchmarks/framing.py " + " ".join(argv if argv is not None else sys.argv[1:]), "```", "",
             *lines], args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
