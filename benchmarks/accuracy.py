"""Accuracy benchmarks on real faces (JAFFE, UTKFace), subject-disjoint.

Run (paths are arguments; the data never enters the repository):

    python benchmarks/accuracy.py --data-root ../shared/data \
        --weights ../shared/weights/mobilenetv2_100_imagenet.safetensors

Benchmarks (see issue "Real faces"):
  A  JAFFE expression (6 FACES classes), subject-disjoint 5-fold (2 women per fold),
     --seeds seeds.
  B  UTKFace, FACES-size regime: 72 training images balanced over age group x gender
     (12 per cell), a fixed balanced test set of 600 other images (100 per cell), --seeds-b seeds:
     single-task age and gender models and one two-head model.
  C  UTKFace, every adult in the FACES age ranges, one fixed stratified 80/20 split:
     one two-head model per seed (--seeds-c), --epochs-c epochs.
  D  Joint: one three-head network per A fold and seed, trained on that fold's JAFFE
     training women + the B training draw of the same seed, evaluated on the A fold
     (expression) and on B's test set (age group, gender); paired against the
     single-task models of A and B with the same seed. JAFFE's gender label (all
     female) is dropped in D, so the gender head learns from UTKFace alone.
  E  The old protocol: random 70/30 split on JAFFE (identity leaks), next to A.
  Z  Zero-shot: the initial model itself (--init base), no training: JAFFE
     expression on A's test folds, age group and gender on B's test set, and
     per-class recall on all of JAFFE.

--init imagenet starts every model from --weights (ImageNet); --init base from
facemt's built-in base model (or --init RUN from a run folder). --summarize
CSV... merges the CSVs of several runs (e.g. run in parallel) into one section;
--compare REF.csv OTHER.csv... pairs each other run's models with REF's on the
same (benchmark, model, head, seed, fold) and reports the mean difference with
its 95 % t-interval (settings compared on identical folds and draws).

Every model is trained for a fixed number of epochs: no test image selects an epoch.
Writes a CSV of every model (--csv) and appends a Markdown section to --results.
Nothing here is a test; it measures.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from facemt.checkpoint import base_dir, load_checkpoint
from facemt.data import DataIndex, ImageCache, combine, index_jaffe, index_utkface
from facemt.engine import TrainConfig, predict_images, train
from facemt.evaluation import evaluate_predictions, paired_interval
from facemt.splits import make_folds
from facemt.tasks import TASKS

UTK_TEST_PER_CELL = 100
UTK_TRAIN_PER_CELL = 12
FIXED_SPLIT_SEED = 12345


def train_and_score(index: DataIndex, config: TrainConfig, train_rows, tests: dict[str, list[int]],
                    cache: ImageCache, tta: bool = False) -> tuple[dict[str, float], float]:
    """Train on ``train_rows``; return accuracy per head (on the test rows named for
    that head, or ``tests["*"]``; ``tta``: mirror-averaged predictions) and the wall time."""
    t = time.perf_counter()
    result = train(index, config, train_rows, (), cache=cache, select_best=False)
    by_rows: dict[tuple[int, ...], list[str]] = {}  # heads sharing a test set share one prediction pass
    for head in result.tasks:
        by_rows.setdefault(tuple(tests.get(head, tests.get("*"))), []).append(head)
    scores = {}
    for rows, heads in by_rows.items():
        images = cache.load([index.table["path"].iloc[i] for i in rows], result.preprocess)[0]
        probs = predict_images(result.model, images, result.preprocess, 64, next(result.model.parameters()).device,
                               tta)
        metrics = evaluate_predictions(index.table.iloc[list(rows)], probs)
        scores.update({h: metrics[h]["accuracy"] for h in heads})
    return {h: scores[h] for h in result.tasks}, time.perf_counter() - t


def run_models(index, config, splits, bench, cache, models, tta: bool = False) -> list[dict]:
    """``splits``: (seed, fold, train_rows, test_rows); ``models``: (name, tasks)."""
    rows = []
    for seed, fold, train_rows, test_rows in splits:
        for name, tasks in models:
            scores, seconds = train_and_score(index, replace(config, tasks=tasks, seed=seed), train_rows,
                                              {"*": test_rows}, cache, tta)
            rows += records(bench, name, seed, fold, scores, {h: len(test_rows) for h in scores}, seconds)
    return rows


def records(bench, name, seed, fold, scores, n_test, seconds) -> list[dict]:
    """One CSV row per head (and a progress line on stderr)."""
    print(f"{bench} seed {seed} fold {fold} {name}: "
          + ", ".join(f"{h}={a:.3f}" for h, a in scores.items()) + f" ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return [{"benchmark": bench, "model": name, "head": h, "seed": seed, "fold": fold, "accuracy": a,
             "n_test": n_test[h], "seconds": seconds} for h, a in scores.items()]


def utk_regime(index: DataIndex, seed: int, per_cell: int = UTK_TRAIN_PER_CELL,
               test_per_cell: int = UTK_TEST_PER_CELL) -> tuple[list[int], list[int]]:
    """``per_cell`` training rows per age group x gender cell (drawn by ``seed``) and a
    fixed balanced test set of ``test_per_cell`` per cell (the same for every seed)."""
    ok = index.table.dropna(subset=["age_group", "gender"])
    fixed = np.random.default_rng(FIXED_SPLIT_SEED)
    test, pool = [], []
    for _, rows in sorted(ok.groupby(["age_group", "gender"]).groups.items()):
        rows = np.array(sorted(rows))
        fixed.shuffle(rows)
        test += list(rows[:test_per_cell])
        pool.append(rows[test_per_cell:])
    rng = np.random.default_rng(seed)
    train_rows = [int(i) for rows in pool for i in rng.choice(rows, per_cell, replace=False)]
    return sorted(train_rows), sorted(int(i) for i in test)


def utk_all_adults(index: DataIndex, test_fraction: float = 0.2) -> tuple[list[int], list[int]]:
    """Every face with both labels; one fixed split stratified by age group x gender."""
    from sklearn.model_selection import train_test_split

    ok = index.table.dropna(subset=["age_group", "gender"])
    strata = ok["age_group"].astype(str) + "/" + ok["gender"].astype(str)
    tr, te = train_test_split(ok.index.to_numpy(), test_size=test_fraction, stratify=strata,
                              random_state=FIXED_SPLIT_SEED)
    return sorted(int(i) for i in tr), sorted(int(i) for i in te)


def jaffe_subject_splits(jaffe: DataIndex, seeds: int):
    return [(s, k, tr, te) for s in (range(seeds) if isinstance(seeds, int) else seeds)
            for k, (tr, te) in enumerate(make_folds(jaffe.table, "subject", 5, s))]


def joint(jaffe: DataIndex, utk: DataIndex, config: TrainConfig, seeds: int, cache: ImageCache,
          cells: tuple[int, int] = (UTK_TRAIN_PER_CELL, UTK_TEST_PER_CELL), tta: bool = False) -> list[dict]:
    """Benchmark D: one three-head model per (seed, JAFFE fold)."""
    jaffe = DataIndex(jaffe.table.assign(gender=None), jaffe.skipped)
    both = combine([jaffe, utk])
    offset = len(jaffe.table)
    rows = []
    for seed, fold, j_train, j_test in jaffe_subject_splits(jaffe, seeds):
        u_train, u_test = utk_regime(utk, seed, *cells)
        train_rows = list(j_train) + [offset + i for i in u_train]
        u_test = [offset + i for i in u_test]
        tests = {"expression": list(j_test), "age_group": u_test, "gender": u_test}
        cfg = replace(config, tasks=("age_group", "gender", "expression"), seed=seed)
        scores, seconds = train_and_score(both, cfg, train_rows, tests, cache, tta)
        rows += records("D", "multitask", seed, fold, scores, {h: len(tests[h]) for h in scores}, seconds)
    return rows


def zero_shot(model_dir: str, jaffe: DataIndex, utk: DataIndex, seeds: int, cache: ImageCache,
              cells: tuple[int, int], device: str, tta: bool = False) -> tuple[list[dict], dict[str, float]]:
    """Benchmark Z: the model as it is on A's test folds and B's test set; and
    its per-class expression recall on all of JAFFE."""
    model, pre, _ = load_checkpoint(model_dir, map_location=device)
    images = cache.load(list(jaffe.table["path"]), pre)[0]
    probs = predict_images(model, images, pre, 64, device, tta)
    classes = TASKS["expression"].classes
    predicted = np.asarray(classes)[probs["expression"].argmax(1)]
    truth = jaffe.table["expression"].to_numpy()
    rows = []
    for seed, fold, _, test in jaffe_subject_splits(jaffe, seeds):
        acc = float((predicted[test] == truth[test]).mean())
        rows += records("Z", "zero-shot", seed, fold, {"expression": acc}, {"expression": len(test)}, 0.0)
    u_test = utk_regime(utk, 0, *cells)[1]
    u_images = cache.load([utk.table["path"].iloc[i] for i in u_test], pre)[0]
    metrics = evaluate_predictions(utk.table.iloc[u_test], predict_images(model, u_images, pre, 64, device, tta))
    rows += records("Z", "zero-shot", 0, 0, {h: metrics[h]["accuracy"] for h in ("age_group", "gender")},
                    {"age_group": len(u_test), "gender": len(u_test)}, 0.0)
    recall = {c: float((predicted[truth == c] == c).mean()) for c in classes}
    return rows, recall


def joint_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """D minus single-task per head. Expression pairs per (seed, fold) with A;
    age group and gender: D averaged over the folds of a seed, paired with B's
    single-task model of that seed (one B model per seed, so one pair per seed)."""
    d = frame[frame["benchmark"] == "D"]
    out = []
    for head, ref in (("expression", "A"), ("age_group", "B"), ("gender", "B")):
        single = frame[(frame["benchmark"] == ref) & (frame["model"] == "single") & (frame["head"] == head)]
        joint_ = d[d["head"] == head]
        keys = ["seed", "fold"] if ref == "A" else ["seed"]
        j = joint_.groupby(keys)["accuracy"].mean()
        s = single.groupby(keys)["accuracy"].mean().reindex(j.index)
        diff = (j - s).dropna()
        mean, low, high = paired_interval(diff)
        out.append({"head": head, "joint": j.mean(), "single": s.mean(), "diff": mean, "low": low, "high": high,
                    "pairs": len(diff), "against": ref})
    return pd.DataFrame(out)


def compare(reference: pd.DataFrame, others: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Each other run minus ``reference``, paired on (benchmark, model, head,
    seed, fold): mean accuracy of both, the mean difference in points and its
    95 % t-interval, and the number of pairs."""
    keys = ["benchmark", "model", "head", "seed", "fold"]
    ref = reference.groupby(keys)["accuracy"].mean()
    out = []
    for name, frame in others.items():
        both = pd.concat([ref.rename("ref"), frame.groupby(keys)["accuracy"].mean().rename("other")],
                         axis=1, join="inner")
        for (bench, model, head), group in both.groupby(level=[0, 1, 2]):
            mean, low, high = paired_interval(100 * (group["other"] - group["ref"]))
            out.append({"run": name, "benchmark": bench, "model": model, "head": head,
                        "reference": 100 * group["ref"].mean(), "other": 100 * group["other"].mean(),
                        "diff": mean, "low": low, "high": high, "pairs": len(group)})
    return pd.DataFrame(out)


def compare_markdown(table: pd.DataFrame, reference: str, command: str) -> list[str]:
    lines = [f"\n### Paired comparison against {reference}\n", "```", command, "```", "",
             "| run | benchmark | model | head | reference % | run % | run − reference, points [95 % CI] | pairs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.run} | {r.benchmark} | {r.model} | {r.head} | {r.reference:.1f} | {r.other:.1f} | "
                     f"{r.diff:+.1f} [{r.low:+.1f}, {r.high:+.1f}] | {r.pairs} |")
    return lines


def publish(lines: list[str], results: str | Path) -> None:
    """Append a Markdown section to the results file and print it (every benchmark script ends so)."""
    with open(results, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def markdown(frame: pd.DataFrame, title: str, command: str, recall: dict[str, float] | None = None) -> list[str]:
    summary = frame.groupby(["benchmark", "model", "head"], sort=False).agg(
        mean=("accuracy", "mean"), std=("accuracy", "std"), count=("accuracy", "size"),
        seconds=("seconds", "mean")).reset_index()
    lines = [f"\n### {title}\n", "```", command, "```", "",
             "| benchmark | model | head | accuracy % (mean ± std) | models | s per model |",
             "|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        spread = "" if r.count < 2 else f" ± {100 * r.std:.1f}"
        lines.append(f"| {r.benchmark} | {r.model} | {r.head} | {100 * r.mean:.1f}{spread} | {r.count} | {r.seconds:.0f} |")
    if recall:
        lines += ["", "Z zero-shot expression recall per class on all of JAFFE: "
                  + ", ".join(f"{c} {100 * r:.0f} %" for c, r in recall.items())]
    if (frame["benchmark"] == "D").any() and (frame["benchmark"] == "A").any():
        lines += ["", "D joint minus single-task (paired, 95 % t-interval):", "",
                  "| head | joint % | single-task % | difference (points) | 95 % interval | pairs |",
                  "|---|---|---|---|---|---|"]
        for r in joint_pairs(frame).itertuples():
            lines.append(f"| {r.head} | {100 * r.joint:.1f} | {100 * r.single:.1f} ({r.against}) | "
                         f"{100 * r.diff:+.1f} | [{100 * r.low:+.1f}, {100 * r.high:+.1f}] | {r.pairs} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="folder holding jaffe/ and utkface/")
    p.add_argument("--weights", help="ImageNet weights for --backbone (.safetensors), for --init imagenet")
    p.add_argument("--backbone", default="mobilenetv2_100")
    p.add_argument("--init", default="imagenet", help="imagenet (--weights), base (the built-in model) or a run folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-alone", action="store_true", help="run D without also running A and B (pair later "
                   "with --summarize)")
    p.add_argument("--summarize", nargs="+", metavar="CSV", help="merge these CSVs into one section and exit")
    p.add_argument("--compare", nargs="+", metavar="CSV", help="REF.csv OTHER.csv...: paired differences of each "
                   "other run against the first, then exit")
    p.add_argument("--only", default="A,B,C,D,E", help="comma-separated benchmarks (D needs A and B: they are added)")
    p.add_argument("--seeds", type=int, default=3, help="seeds for A, D, E (default %(default)s)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds start here (A, B, D, E), to split a run")
    p.add_argument("--seeds-b", type=int, default=5, help="seeds for B (default %(default)s)")
    p.add_argument("--seeds-c", type=int, default=1, help="seeds for C (default %(default)s)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--epochs-c", type=int, default=6, help="epochs for C, which has ~2,900 training faces")
    p.add_argument("--image-size", type=int, help="default 128, or the initial model's with --init base/RUN")
    p.add_argument("--augment", default="light")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone-lr-scale", type=float, default=1.0)
    p.add_argument("--layer-decay", type=float, default=1.0, help="facemt fit --layer-decay")
    p.add_argument("--head-warmup-epochs", type=float, default=0.0, help="facemt fit --head-warmup-epochs")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--tta", action="store_true", help="score mirror-averaged predictions (facemt predict --tta)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--loss-weighting", choices=("fixed", "uncertainty"), default="fixed")
    p.add_argument("--balance-sources", action="store_true")
    p.add_argument("--crop", choices=("align", "box", "none"), default="align",
                   help="crop policy (facemt fit --crop)")
    p.add_argument("--crop-margin", type=float, default=0.4)
    p.add_argument("--utk-train-per-cell", type=int, default=UTK_TRAIN_PER_CELL, help="B training faces per cell")
    p.add_argument("--utk-test-per-cell", type=int, default=UTK_TEST_PER_CELL, help="B test faces per cell")
    p.add_argument("--b-models", default="single,multitask", help="B's models (D always trains both)")
    p.add_argument("--title", default="", help="heading of the appended section")
    p.add_argument("--csv", default="benchmarks/accuracy.csv")
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/accuracy.py", *(argv if argv is not None else sys.argv[1:])])
    if args.compare:
        if len(args.compare) < 2:
            p.error("--compare needs a reference CSV and at least one other")
        table = compare(pd.read_csv(args.compare[0]), {Path(c).stem: pd.read_csv(c) for c in args.compare[1:]})
        publish(compare_markdown(table, Path(args.compare[0]).stem, command), args.results)
        return 0
    if args.summarize:
        frame = pd.concat([pd.read_csv(c) for c in args.summarize], ignore_index=True)
        frame.to_csv(args.csv, index=False)
        publish(markdown(frame, args.title or "merged", command), args.results)
        return 0
    root = Path(args.data_root)
    init = None if args.init == "imagenet" else str(base_dir()) if args.init == "base" else args.init
    if init is None and not args.weights:
        p.error("--init imagenet needs --weights")
    backbone = load_checkpoint(init)[2]["backbone"] if init else args.backbone
    config = TrainConfig(
        backbone=backbone, pretrained_file=None if init else args.weights, init_from=init,
        epochs=args.epochs, image_size=args.image_size or (None if init else 128),
        augment=args.augment, lr=args.lr, backbone_lr_scale=args.backbone_lr_scale,
        head_warmup_epochs=args.head_warmup_epochs, layer_decay=args.layer_decay,
        label_smoothing=args.label_smoothing, batch_size=args.batch_size, loss_weighting=args.loss_weighting,
        balance_sources=args.balance_sources, crop=args.crop, crop_margin=args.crop_margin, device=args.device)
    wanted = set(args.only.split(","))
    if "D" in wanted and not args.d_alone:
        wanted |= {"A", "B"}
    cells = (args.utk_train_per_cell, args.utk_test_per_cell)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows, started = [], time.perf_counter()
    cache = ImageCache()
    jaffe = index_jaffe(root / "jaffe") if wanted & {"A", "D", "E", "Z"} else None
    utk = index_utkface(root / "utkface") if wanted & {"B", "C", "D", "Z"} else None
    recall = None
    if "Z" in wanted:
        if not init:
            p.error("Z (zero-shot) needs --init base or a run folder")
        z_rows, recall = zero_shot(init, jaffe, utk, args.seeds, cache, cells, args.device, args.tta)
        rows += z_rows
    if "A" in wanted:
        rows += run_models(jaffe, config, jaffe_subject_splits(jaffe, seeds), "A", cache,
                           [("single", ("expression",))], args.tta)
    if "E" in wanted:
        splits = [(s, 0, tr, te) for s in seeds
                  for tr, te in make_folds(jaffe.table, "random", 5, s, test_size=0.3)]
        rows += run_models(jaffe, config, splits, "E", cache, [("single", ("expression",))], args.tta)
    if "B" in wanted:
        models = [m for m in (("single", ("age_group",)), ("single", ("gender",)), ("multitask", ("age_group", "gender")))
                  if m[0] in args.b_models.split(",") or "D" in wanted]
        rows += run_models(utk, config, [(s, 0, *utk_regime(utk, s, *cells)) for s in range(args.first_seed, args.first_seed + args.seeds_b)], "B", cache,
                           models, args.tta)
    if "D" in wanted:
        rows += joint(jaffe, utk, config, seeds, cache, cells, args.tta)
    if "C" in wanted:
        tr, te = utk_all_adults(utk)
        rows += run_models(utk, replace(config, epochs=args.epochs_c),
                           [(s, 0, tr, te) for s in range(args.seeds_c)], "C", cache,
                           [("multitask", ("age_group", "gender"))], args.tta)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.csv, index=False)
    wall = time.perf_counter() - started
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    title = f"{args.title + ': ' if args.title else ''}{', '.join(sorted(wanted))} at commit {commit} " \
            f"({wall:.0f} s on this machine)"
    publish(markdown(frame, title, command, recall), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
