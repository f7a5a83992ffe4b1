"""Accuracy benchmarks on real faces (JAFFE, UTKFace), subject-disjoint.

Run (paths are arguments; the data never enters the repository):

    python benchmarks/accuracy.py --data-root ../shared/data \
        --weights ../shared/weights/mobilenetv2_100_imagenet.safetensors --only A,B,E

Benchmarks (see issue "Real faces"):
  A  JAFFE expression (6 FACES classes), subject-disjoint 5-fold (2 women per fold), seeds.
  B  UTKFace, FACES-size regime: 72 training images balanced over age group x gender
     (12 per cell), a fixed balanced test set of other images, seeds: single-task age
     and gender models and one two-head model.
  E  The old protocol: random 70/30 split on JAFFE (identity leaks), next to A.

Writes a CSV of every model and appends a Markdown table to --results.
Nothing here is a test; it measures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from facemt.data import DataIndex, ImageCache, index_jaffe, index_utkface
from facemt.engine import TrainConfig, predict_images, train
from facemt.evaluation import evaluate_predictions, make_folds


def run_models(index: DataIndex, config: TrainConfig, splits, bench: str, cache: ImageCache, models) -> list[dict]:
    rows = []
    for seed, fold, train_rows, test_rows in splits:
        for name, tasks in models:
            t = time.perf_counter()
            cfg = replace(config, tasks=tasks, seed=seed)
            result = train(index, cfg, train_rows, (), cache=cache)
            images = cache.load([index.table["path"].iloc[i] for i in test_rows], result.preprocess)[0]
            probs = predict_images(result.model, images, result.preprocess, 64)
            metrics = evaluate_predictions(index.table.iloc[test_rows], probs)
            for head in tasks:
                rows.append({"benchmark": bench, "model": name, "head": head, "seed": seed, "fold": fold,
                             "accuracy": metrics[head]["accuracy"], "n_test": metrics[head]["n"],
                             "seconds": time.perf_counter() - t})
            print(f"{bench} seed {seed} fold {fold} {name}: " +
                  ", ".join(f"{h}={metrics[h]['accuracy']:.3f}" for h in tasks), file=sys.stderr, flush=True)
    return rows


def utk_regime(index: DataIndex, seed: int, per_cell: int = 12, test_per_cell: int = 100):
    """72 balanced training rows and a fixed balanced test set (fixed across seeds)."""
    t = index.table
    ok = t.dropna(subset=["age_group", "gender"])
    cells = ok.groupby(["age_group", "gender"]).groups
    fixed = np.random.default_rng(12345)
    test, pool = [], []
    for key, rows in sorted(cells.items()):
        rows = np.array(sorted(rows))
        fixed.shuffle(rows)
        test += list(rows[:test_per_cell])
        pool.append(rows[test_per_cell:])
    rng = np.random.default_rng(seed)
    train_rows = [int(i) for rows in pool for i in rng.choice(rows, per_cell, replace=False)]
    return sorted(train_rows), sorted(int(i) for i in test)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="folder holding jaffe/ and utkface/")
    p.add_argument("--weights", required=True, help="ImageNet weights for --backbone (.safetensors)")
    p.add_argument("--backbone", default="mobilenetv2_100")
    p.add_argument("--only", default="A,B,E")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--augment", default="light")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--csv", default="benchmarks/accuracy.csv")
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    root = Path(args.data_root)
    config = TrainConfig(backbone=args.backbone, pretrained_file=args.weights, epochs=args.epochs,
                         image_size=args.image_size, augment=args.augment, lr=args.lr, batch_size=16, device="cpu")
    wanted = set(args.only.split(","))
    rows, started = [], time.perf_counter()
    cache = ImageCache()
    if {"A", "E"} & wanted:
        jaffe = index_jaffe(root / "jaffe")
        if "A" in wanted:
            splits = [(s, k, tr, te) for s in range(args.seeds)
                      for k, (tr, te) in enumerate(make_folds(jaffe.table, "subject", 5, s))]
            rows += run_models(jaffe, config, splits, "A", cache, [("single", ("expression",))])
        if "E" in wanted:
            splits = [(s, 0, tr, te) for s in range(args.seeds)
                      for tr, te in make_folds(jaffe.table, "random", 5, s, test_size=0.3)]
            rows += run_models(jaffe, config, splits, "E", cache, [("single", ("expression",))])
    if "B" in wanted:
        utk = index_utkface(root / "utkface")
        splits = [(s, 0, *utk_regime(utk, s)) for s in range(args.seeds)]
        models = [("single", ("age_group",)), ("single", ("gender",)), ("multitask", ("age_group", "gender"))]
        rows += run_models(utk, config, splits, "B", cache, models)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.csv, index=False)
    wall = time.perf_counter() - started
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    summary = frame.groupby(["benchmark", "model", "head"])["accuracy"].agg(["mean", "std", "count"]).reset_index()
    lines = [f"\n### {', '.join(sorted(wanted))} at commit {commit} ({wall:.0f} s on this machine)\n",
             "```", "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]), "```", "",
             "| benchmark | model | head | accuracy % (mean ± std) | runs |", "|---|---|---|---|---|"]
    for r in summary.itertuples():
        spread = "" if r.count < 2 else f" ± {100 * r.std:.1f}"
        lines.append(f"| {r.benchmark} | {r.model} | {r.head} | {100 * r.mean:.1f}{spread} | {r.count} |")
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
