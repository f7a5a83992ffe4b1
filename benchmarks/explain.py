"""Do facemt's explanation maps mean anything? Sanity checks on real faces, per method and head.

    python benchmarks/explain.py --data-root ../shared/data [--model base] [--faces 120]
                                 [--csv benchmarks/explain.csv] [--results benchmarks/RESULTS.md]
                                 [--figure benchmarks/explain_class_maps.png]

- model randomisation (Adebayo et al. 2018): Spearman rank correlation between each face's map from the
  trained model and from the same network with re-initialised heads, then also re-initialised last trunk
  stages (everything after the stride-16 stage). Maps that do not change are worthless; low is good.
- deletion (faithfulness): blank (set to the mean pixel) the 5/10/20 % most salient cells of the 28x28 map
  versus as many random cells (the same area in blocks of the same size), and compare the drop of the
  explained class's probability.
- timing: class-average maps for the faces, and `facemt explain PHOTO` as a whole command.
- class-average maps of the default method on JAFFE (expression) and the studio sets (gender): the figure
  shows only the maps (no face pixels).

Faces: the first --faces of JAFFE plus the same number from the studio sets (NimStim, RaFD, CFD), framed by
the model's crop policy. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

import facemt
from facemt.data import DataIndex, ImageCache, encode_targets, load_index, load_sources
from facemt.engine import decode_images
from facemt.explain import METHODS, DEFAULT_METHOD, class_average_maps, dataset_maps, head_maps, plot_class_maps
from facemt.transforms import build_transform

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.05, 0.10, 0.20)


def reinitialised(model, trunk_too: bool, seed: int = 0):
    """A copy with new head weights and, with ``trunk_too``, new weights after the trunk's stride-16 stage."""
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    for head in other.heads.values():
        head.reset_parameters()
    if trunk_too:
        stage = [f for f in other.trunk.feature_info if f["reduction"] == 16][-1]["module"]
        names = [n for n, _ in other.trunk.named_modules()]
        after = names[names.index(stage) + 1:]
        for name in after:
            if name.startswith(stage + "."):
                continue
            module = other.trunk.get_submodule(name)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return other.eval()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over faces of the Spearman correlation of two maps (faces with a constant map are left out)."""
    values = []
    for x, y in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        if x.std() > 0 and y.std() > 0:
            values.append(spearmanr(x, y).statistic)
    return float(np.mean(values)) if values else float("nan")


def deletion(model, batch: torch.Tensor, maps: np.ndarray, task: str, target: np.ndarray, fraction: float,
             seed: int = 0) -> dict[str, float]:
    """Mean drop of the target class's probability when map cells are blanked to the mean pixel: the most
    salient (``top``), as many random cells (``random``), a random square of the same area (``square``) and
    the least salient (``bottom``).

    Every choice deletes whole cells of the MAP_SIDE x MAP_SIDE map (blocks of input pixels). Scattered
    random cells look like noise to the network and can hurt more than any compact region, so the compact
    controls (a random square; the least salient cells) are reported too."""
    n, _, s, _ = batch.shape
    side = maps.shape[-1]
    cells = side * side
    k = max(1, int(round(fraction * cells)))
    rng = np.random.default_rng(seed)
    ranked = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")
    edge = int(round(np.sqrt(k)))
    squares = []
    for _ in range(n):
        r, c = rng.integers(0, side - edge + 1, size=2)
        squares.append((np.arange(r, r + edge)[:, None] * side + np.arange(c, c + edge)[None]).ravel())
    choices = {"top": ranked[:, :k], "random": np.stack([rng.choice(cells, k, replace=False) for _ in range(n)]),
               "square": np.stack(squares), "bottom": ranked[:, -k:]}
    y = torch.from_numpy(target)
    out = {}
    with torch.no_grad():
        before = model.probabilities(batch)[task][torch.arange(n), y]
        for name, chosen in choices.items():
            keep = np.ones((n, cells), np.float32)
            np.put_along_axis(keep, chosen, 0.0, axis=1)
            mask = torch.nn.functional.interpolate(torch.from_numpy(keep.reshape(n, 1, side, side)),
                                                   size=(s, s), mode="nearest")
            after = model.probabilities(batch * mask)[task][torch.arange(n), y]  # 0 = the mean pixel
            out[name] = float((before - after).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--model", default="base")
    p.add_argument("--faces", type=int, default=120, help="faces per group (JAFFE, studio)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--csv", type=Path)
    p.add_argument("--results", type=Path)
    p.add_argument("--figure", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    predictor = facemt.load(args.model, engine="torch", device="cpu")
    model, pre = predictor.model.eval(), predictor.preprocess
    jaffe = load_index(args.data_root / "jaffe").table.iloc[: args.faces]
    studio_sources = [str(args.data_root / s / "labels.csv") for s in ("nimstim", "rafd", "cfd")
                      if (args.data_root / s / "labels.csv").is_file()]
    studio = load_sources(studio_sources).table.sample(frac=1.0, random_state=0).iloc[: args.faces] \
        if studio_sources else jaffe.iloc[:0]
    table = pd.concat([jaffe, studio], ignore_index=True)
    index = DataIndex(table, [])
    cache = ImageCache()
    images = decode_images(index, pre, cache, None)
    transform = build_transform(pre, "none")
    batch = torch.from_numpy(np.stack([transform.array(a) for a in images]))
    with torch.no_grad():
        probs = model.probabilities(batch)
    predicted = {t: probs[t].argmax(1).numpy() for t in model.tasks}
    variants = {"heads": reinitialised(model, False), "stages": reinitialised(model, True)}
    rows = []
    for method in args.methods.split(","):
        started = time.perf_counter()
        maps = head_maps(model, batch, predicted, method)
        seconds = time.perf_counter() - started
        for task in model.tasks:
            row = {"method": method, "head": task, "faces": len(images), "seconds_all_heads": seconds}
            for name, other in variants.items():
                row[f"rank_corr_{name}"] = rank_correlation(maps[task], head_maps(other, batch, predicted, method)[task])
            for fraction in FRACTIONS:
                for name, drop in deletion(model, batch, maps[task], task, predicted[task], fraction).items():
                    row[f"drop_{name}_{int(fraction * 100)}"] = drop
            for control in ("random", "square", "bottom"):
                row[f"ratio_10_vs_{control}"] = (row["drop_top_10"] / row[f"drop_{control}_10"]
                                                 if row[f"drop_{control}_10"] > 0 else float("inf"))
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    frame = pd.DataFrame(rows)
    # class-average maps of the default method, true classes: expression on JAFFE, gender on the studio sets
    started = time.perf_counter()
    labels = encode_targets(table, model.tasks)
    all_maps, _ = dataset_maps(model, images, pre, labels, DEFAULT_METHOD)
    class_seconds = time.perf_counter() - started
    jaffe_rows, studio_rows = np.arange(len(jaffe)), np.arange(len(jaffe), len(table))
    averages = {"expression": class_average_maps({"expression": all_maps["expression"][jaffe_rows]},
                                                 {"expression": labels["expression"][jaffe_rows]})["expression"]}
    if len(studio_rows):
        averages["gender"] = class_average_maps({"gender": all_maps["gender"][studio_rows]},
                                                {"gender": labels["gender"][studio_rows]})["gender"]
    if args.figure:
        plot_class_maps(averages, str(args.figure), None, f"{args.model}: class-average {DEFAULT_METHOD} maps, "
                        "expression on JAFFE, gender on studio faces (maps only)")
    photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "facemt", "explain", str(photo), "--model", args.model, "--out", tmp,
                        "--overwrite"], check=True, capture_output=True)
    command_seconds = time.perf_counter() - started
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = [f"\n### Explanation sanity checks at commit {commit}\n",
             f"`python benchmarks/explain.py {' '.join(argv)}`: {len(jaffe)} JAFFE + {len(studio)} studio faces "
             f"(NimStim, RaFD, CFD), model `{args.model}`, each head explaining its predicted class. Rank "
             "correlation: trained vs re-initialised (lower = the map depends on what the model learned). "
             "Deletion: probability drop of the explained class when the top vs random 5/10/20 % of the 28x28 map's "
             "cells (blocks of input pixels) are blanked to the mean pixel.", "",
             "| method | head | rank corr, new heads | rank corr, new heads + last stages | drop at 5 / 10 / 20 %: "
             "top | random cells | random square | least salient | top / random at 10 % | top / square | "
             "top / least | s (all heads) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    triple = lambda r, name: " / ".join(f"{getattr(r, f'drop_{name}_{p}'):.3f}" for p in (5, 10, 20))  # noqa: E731
    for r in frame.itertuples():
        lines.append(f"| {r.method} | {r.head} | {r.rank_corr_heads:.2f} | {r.rank_corr_stages:.2f} | "
                     f"{triple(r, 'top')} | {triple(r, 'random')} | {triple(r, 'square')} | {triple(r, 'bottom')} | "
                     f"{r.ratio_10_vs_random:.2f}x | {r.ratio_10_vs_square:.2f}x | {r.ratio_10_vs_bottom:.2f}x | "
                     f"{r.seconds_all_heads:.1f} |")
    lines += ["", f"Class-average maps ({DEFAULT_METHOD}) for {len(images)} faces, all heads: {class_seconds:.1f} s; "
              f"`facemt explain grace_hopper.jpg` (whole command, one face): {command_seconds:.1f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
