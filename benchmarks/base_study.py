"""Choose the base model's FER+ label policy and backbone by measurement, at a
reduced scale that fits 2 CPU cores: each variant trains
``benchmarks/pretrain.py`` on the same number of rows drawn from FER+ Train and
UTKFace (minus the hold-out list) and is measured by
``benchmarks/base_model.py`` on data it never saw (FER+ Test, UTKFace held-out
adults), network speed included.

    python benchmarks/base_study.py --data-root ../shared/data --limit 6000 --epochs 3

Variants: FER+ majority vote, clear majority only, and vote distributions as
soft targets (mobilenetv2_100); and tf_efficientnet_lite0 with majority
labels. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import publish  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = [("mobilenetv2_100", "majority"), ("mobilenetv2_100", "clear"), ("mobilenetv2_100", "soft"),
            ("tf_efficientnet_lite0", "majority")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--weights-dir", default=str(HERE.parents[1] / "shared" / "weights"))
    p.add_argument("--limit", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--only", help="comma-separated variant numbers (1-4)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    picked = [VARIANTS[int(i) - 1] for i in args.only.split(",")] if args.only else VARIANTS
    rows = []
    for backbone, policy in picked:
        run = Path(args.out) / f"{backbone}-{policy}"
        started = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "pretrain.py"), "--data-root", args.data_root,
                        "--weights", str(Path(args.weights_dir) / f"{backbone}_imagenet.safetensors"),
                        "--backbone", backbone, "--fer-policy", policy, "--out", str(run), "--limit", str(args.limit),
                        "--epochs", str(args.epochs), "--image-size", str(args.image_size), "--device", "cpu"],
                       check=True)
        train_s = time.perf_counter() - started
        numbers = run / "measured.json"
        subprocess.run([sys.executable, str(HERE / "base_model.py"), "--data-root", args.data_root, "--model", str(run),
                        "--json", str(numbers), "--results", "/dev/null"], check=True, stdout=subprocess.DEVNULL)
        m = json.loads(numbers.read_text())
        f, u = m["ferplus_test"], m["utkface_heldout"]
        rows.append({"backbone": backbone, "policy": policy, "train_s": train_s, "fer": f["accuracy"],
                     "fer_bal": f["balanced_accuracy"], "ece": f["ece"], "age": u["age_group"]["accuracy"],
                     "gender": u["gender"]["accuracy"], "speed": m["faces_per_second_batch32"]})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"\n## Base model study: `python benchmarks/base_study.py --data-root {args.data_root} --limit {args.limit} "
             f"--epochs {args.epochs} --image-size {args.image_size}`\n",
             f"Each variant: {args.limit} training rows drawn from FER+ Train + UTKFace (hold-out list excluded), "
             f"{args.epochs} epochs, {args.image_size} px, aligned, from ImageNet; measured on FER+ Test (majority "
             "label, six FACES classes) and UTKFace held-out adults.", "",
             "| backbone | FER+ labels | FER+ Test % | balanced % | UTK age group % | UTK gender % | ECE expr. (calibrated) | "
             "faces/s (batch 32) | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['policy']} | {100 * r['fer']:.1f} | {100 * r['fer_bal']:.1f} | "
                     f"{100 * r['age']:.1f} | {100 * r['gender']:.1f} | {r['ece']:.3f} | {r['speed']:.0f} | "
                     f"{r['train_s']:.0f} |")
    publish(lines, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
