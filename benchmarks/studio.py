"""The studio benchmark: a model on studio portraits it never trained on, per head, class, gender and
ethnicity; next to JAFFE and the UTKFace held-out faces; optionally after subject-disjoint fine-tuning.

    python benchmarks/studio.py --data-root ../shared/data [--model base] [--fine-tune --epochs 20]
                                [--json out.json] [--results benchmarks/RESULTS.md]
    python benchmarks/studio.py --data-root ../shared/data --write-split   # (re)writes studio_test_persons.txt

Studio sets (CFD, NimStim, RaFD, CK+) are split once by person into base-training persons and test
persons (``benchmarks/studio_test_persons.txt``, ``SOURCE/PERSON`` per line: 25 % of each set's persons,
stratified by gender and, for CFD, ethnicity; seed 0). Zero-shot numbers use the test persons only, so a
base model may train on the others. Fine-tuning (``--fine-tune``) runs ``facemt cv`` (5 subject-disjoint
folds, fit's defaults but --epochs) on every set with two or more classes for a head, over all its persons.
A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import publish  # noqa: E402

import facemt  # noqa: E402
from facemt.data import DataIndex, ImageCache, index_jaffe, index_utkface, load_sources  # noqa: E402
from facemt.engine import decode_images  # noqa: E402
from facemt.evaluation import evaluate_predictions, person_consistency, recall_by  # noqa: E402
from facemt.tasks import TASKS  # noqa: E402

HERE = Path(__file__).resolve().parent
STUDIO = ("cfd", "nimstim", "rafd", "ckplus48")
SPLIT_FILE = HERE / "studio_test_persons.txt"
TEST_SHARE = 0.25


def studio_index(root: Path) -> DataIndex:
    """Every studio set found under ``root`` as one table (source = the set's folder)."""
    sources = [str(root / s / "labels.csv") for s in STUDIO if (root / s / "labels.csv").is_file()]
    return load_sources(sources)


def write_split(index: DataIndex, path: Path = SPLIT_FILE, share: float = TEST_SHARE, seed: int = 0) -> list[str]:
    """Pick ``share`` of each set's persons for testing (at least one), stratified by gender (and ethnicity
    where known): each stratum gets its proportional quota, rounded by largest remainder."""
    rng = np.random.default_rng(seed)
    persons = index.table.drop_duplicates(["source", "person"])
    chosen = []
    for source, group in persons.groupby("source", sort=True):
        keys = group["gender"].fillna("?").astype(str)
        if "ethnicity" in group:
            keys = keys + "/" + group["ethnicity"].fillna("?").astype(str)
        strata = {key: sorted(g["person"].astype(str)) for key, g in group.groupby(keys, sort=True)}
        total = max(1, int(round(share * len(group)))) if len(group) > 1 else 0
        quota = {key: share * len(names) for key, names in strata.items()}
        take = {key: int(np.floor(q)) for key, q in quota.items()}
        order = sorted(strata, key=lambda key: (take[key] - quota[key], rng.random()))  # largest remainder first
        for key in order[: max(0, total - sum(take.values()))]:
            take[key] += 1
        for key, names in strata.items():
            chosen += [f"{source}/{p}" for p in rng.permutation(names)[: take[key]]]
    lines = [f"# studio test persons (SOURCE/PERSON): never trained on by the built-in model; "
             f"{share:.0%} per set, stratified by gender and ethnicity, seed {seed} (benchmarks/studio.py)"]
    path.write_text("\n".join(lines + sorted(chosen)) + "\n", encoding="utf-8")
    return sorted(chosen)


def read_split(path: Path = SPLIT_FILE) -> set[str]:
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")}


def test_rows(table: pd.DataFrame, split: set[str]) -> np.ndarray:
    keys = table["source"].astype(str) + "/" + table["person"].astype(str)
    return np.flatnonzero(keys.isin(split).to_numpy())


def scores(name: str, table: pd.DataFrame, probs: dict[str, np.ndarray]) -> list[dict]:
    """Accuracy per head, recall per class, and gender accuracy per gender x ethnicity where known."""
    rows = []
    metrics = evaluate_predictions(table, probs)
    for head, m in metrics.items():
        if not m["n"]:
            continue
        rows.append({"set": name, "head": head, "group": "all", "n": m["n"], "accuracy": m["accuracy"]})
        for cls, pc in m["per_class"].items():
            if pc["support"]:
                rows.append({"set": name, "head": head, "group": f"{cls} recall", "n": pc["support"],
                             "accuracy": pc["recall"]})
    if "ethnicity" in table and "gender" in probs and table["ethnicity"].notna().any():
        predicted = np.asarray(TASKS["gender"].classes)[probs["gender"].argmax(1)]
        truth = table["gender"].to_numpy()
        for (gender, ethnicity), rows_ in table.groupby(["gender", "ethnicity"]).groups.items():
            idx = table.index.get_indexer(rows_)
            rows.append({"set": name, "head": "gender", "group": f"{gender} x {ethnicity}", "n": len(idx),
                         "accuracy": float((predicted[idx] == truth[idx]).mean())})
    return rows


def consistency(name: str, table: pd.DataFrame, probs: dict[str, np.ndarray]) -> list[dict]:
    """Labels that cannot change within a person: the share of persons (two or more pictures) whose
    predicted age group or gender changes across their pictures (``accuracy`` holds that share, lower is
    better); and gender recall per true expression and gender."""
    predicted = {t: np.asarray(TASKS[t].classes)[p.argmax(1)] for t, p in probs.items()}
    rows = []
    persons = person_consistency(table, predicted)
    for head, g in persons.groupby("head", sort=False):
        rows.append({"set": name, "head": head, "group": "persons whose label changes (lower is better)",
                     "n": len(g), "accuracy": float(g["changed"].mean())})
    if "gender" in predicted and "expression" in table and table["expression"].notna().any():
        for r in recall_by(table, predicted, "gender", "expression").itertuples():
            rows.append({"set": name, "head": "gender", "group": f"{r.gender} recall, {r.expression}", "n": r.n,
                         "accuracy": r.recall})
    return rows


def zero_shot(model, index: DataIndex, name: str) -> list[dict]:
    images = decode_images(index, model.preprocess, ImageCache(), None)
    probs = model.probabilities(images)
    return scores(name, index.table, probs) + consistency(name, index.table, probs)


def fine_tune(index: DataIndex, name: str, epochs: int, model: str) -> list[dict]:
    """facemt cv (subject-disjoint, 5 folds) from ``model`` on every head with two or more classes."""
    from facemt.config import TrainConfig
    from facemt.evaluation import cross_validate

    heads = [t for t in TASKS if index.table[t].dropna().nunique() >= 2]
    if not heads or index.table["person"].nunique() < 5:
        return []
    config = TrainConfig(epochs=epochs, tasks=tuple(heads), init_from=model, device="cpu")
    result = cross_validate(index, config, folds=5, split="subject", baselines=False, fit_model=False)
    rows = []
    for (head, model_name), g in result.records.groupby(["head", "model"]):
        rows.append({"set": name, "head": head, "group": f"cv {model_name}", "n": int(g["n_test"].sum()),
                     "accuracy": float(g["accuracy"].mean()), "std": float(g["accuracy"].std())})
    return rows


def markdown(frame: pd.DataFrame, title: str, command: str) -> list[str]:
    lines = [f"\n### {title}\n", "```", command, "```", "", "| set | head | group | n | accuracy % |",
             "|---|---|---|---|---|"]
    for r in frame.itertuples():
        spread = f" ± {100 * r.std:.1f}" if "std" in frame and pd.notna(getattr(r, "std", np.nan)) else ""
        lines.append(f"| {r.set} | {r.head} | {r.group} | {r.n} | {100 * r.accuracy:.1f}{spread} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--model", default="base")
    p.add_argument("--split", type=Path, default=SPLIT_FILE)
    p.add_argument("--write-split", action="store_true", help="(re)write --split from the data and stop")
    p.add_argument("--fine-tune", action="store_true")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--utk-limit", type=int, default=0, help="only the first N UTKFace held-out faces (0: all)")
    p.add_argument("--jitter", action="store_true", help="predict with facemt.load(jitter=True)")
    p.add_argument("--json", type=Path)
    p.add_argument("--results", type=Path)
    args = p.parse_args(argv)
    studio = studio_index(args.data_root)
    if args.write_split:
        chosen = write_split(studio, args.split)
        print(f"wrote {len(chosen)} test persons to {args.split}")
        return 0
    started = time.perf_counter()
    model = facemt.load(args.model, jitter=args.jitter)
    split = read_split(args.split)
    rows: list[dict] = []
    for source, group in studio.table.groupby("source", sort=True):
        table = group.iloc[test_rows(group, split)].reset_index(drop=True)
        if len(table):
            rows += zero_shot(model, DataIndex(table, []), f"{source} (test persons)")
    if (args.data_root / "jaffe").is_dir():
        rows += zero_shot(model, index_jaffe(args.data_root / "jaffe"), "jaffe (all)")
    if (args.data_root / "utkface").is_dir() and (HERE / "utk_holdout.txt").is_file():
        held = {line.strip() for line in (HERE / "utk_holdout.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
        utk = index_utkface(args.data_root / "utkface").table
        utk = utk[utk["path"].map(lambda x: Path(x).name in held)].reset_index(drop=True)
        if args.utk_limit:
            utk = utk.iloc[: args.utk_limit]
        if len(utk):
            rows += zero_shot(model, DataIndex(utk, []), "utkface (held-out)")
    if args.fine_tune:
        for source, group in studio.table.groupby("source", sort=True):
            rows += fine_tune(DataIndex(group.reset_index(drop=True), []), f"{source} (all persons)", args.epochs,
                              args.model)
    frame = pd.DataFrame(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    title = (f"Studio benchmark: model `{args.model}`{' with --jitter' if args.jitter else ''} at commit {commit} "
             f"({time.perf_counter() - started:.0f} s)")
    lines = markdown(frame, title, f"python benchmarks/studio.py {' '.join(argv)}")
    if args.results:
        publish(lines, args.results)
    else:
        print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
