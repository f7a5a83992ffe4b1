"""The recipe of facemt's built-in base model: one three-head network trained on
FER+ (expression) and UTKFace (age group, gender) from ImageNet weights.

    python benchmarks/pretrain.py --data-root ../shared/data \
        --weights ../shared/weights/mobilenetv2_100_imagenet.safetensors --out runs/base

- Expression: FER+ FER2013Train, majority vote onto the six FACES classes
  (ties, surprise, contempt, unknown and not-a-face are left out; the label
  policy was chosen by ``benchmarks/base_study.py``, ``--fer-policy``);
  FER2013Valid validates; FER2013Test is never trained on.
- Age group and gender: UTKFace adults, except a fixed held-out list written
  to ``benchmarks/utk_holdout.txt`` (benchmark B's test faces and its training
  draws for seeds 0-4, and benchmark C's test faces, which are also the base
  model's UTKFace test set); 10 % of the rest validates.
- JAFFE is not used, so JAFFE benchmarks stay honest tests of the base.
- Faces aligned (crop policy ``align``), logit-adjusted loss (class-balanced
  predictions), heavy augmentation; the epoch with the best mean validation
  accuracy is kept; a temperature per head is fitted on the validation rows.

Then ``benchmarks/ship_base.py RUN`` writes the fp16 copy into ``facemt/base/``.
Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import FIXED_SPLIT_SEED, utk_all_adults, utk_regime  # noqa: E402

from facemt.checkpoint import update_config  # noqa: E402
from facemt.data import DataIndex, ImageCache, combine, encode_targets, index_ferplus, index_utkface  # noqa: E402
from facemt.engine import TrainConfig, calibrate_run, class_counts, train  # noqa: E402
from facemt.tasks import TASK_NAMES  # noqa: E402

HOLDOUT = Path(__file__).resolve().parent / "utk_holdout.txt"


def utk_holdout(utk: DataIndex, seeds: int = 5) -> list[int]:
    """Rows of benchmark B (test faces, training draws of seeds 0..seeds-1) and C (test faces)."""
    rows: set[int] = set()
    for seed in range(seeds):
        b_train, b_test = utk_regime(utk, seed)
        rows |= set(b_train) | set(b_test)
    rows |= set(utk_all_adults(utk)[1])
    return sorted(rows)


def base_split(root: Path, fer_policy: str = "majority", limit: int = 0, studio: bool = False, fer_limit: int = 0
               ) -> tuple[DataIndex, list[int], list[int], list[int]]:
    """The recipe's data: (FER2013Train + FER2013Valid + UTKFace index, training
    rows, validation rows, file names of the held-out UTKFace faces). With
    ``studio``, also the studio sets' persons outside ``benchmarks/studio_test_persons.txt``
    (a tenth of those persons validate); ``fer_limit`` draws that many FER2013Train rows."""
    fer_train = index_ferplus(root / "ferplus" / "FER2013Train", fer_policy)
    fer_valid = index_ferplus(root / "ferplus" / "FER2013Valid")
    utk = index_utkface(root / "utkface")
    held = utk_holdout(utk)
    rest = np.setdiff1d(np.arange(len(utk)), held)
    rng = np.random.default_rng(FIXED_SPLIT_SEED)
    rng.shuffle(rest)
    utk_val, utk_train = np.sort(rest[: len(rest) // 10]), np.sort(rest[len(rest) // 10:])
    parts = [fer_train, fer_valid, utk]
    studio_train, studio_val = [], []
    if studio:
        from studio import read_split, studio_index, test_rows

        sets = studio_index(root)
        tested = set(test_rows(sets.table, read_split()))
        keys = sets.table["source"].astype(str) + "/" + sets.table["person"].astype(str)
        persons = sorted(set(keys[[i for i in range(len(keys)) if i not in tested]]))
        val_persons = set(np.random.default_rng(FIXED_SPLIT_SEED).permutation(persons)[: len(persons) // 10])
        for i, key in enumerate(keys):
            if i not in tested:
                (studio_val if key in val_persons else studio_train).append(i)
        sets.table["source"] = "studio"  # one source: --balance-sources weighs studio, FER+ and UTKFace alike
        parts.append(sets)
    index = combine(parts)
    offsets = np.cumsum([0] + [len(x) for x in parts])
    fer_rows = list(range(offsets[0], offsets[1]))
    if fer_limit:
        fer_rows = sorted(np.random.default_rng(FIXED_SPLIT_SEED).choice(fer_rows, fer_limit, replace=False).tolist())
    train_rows = fer_rows + [int(offsets[2] + i) for i in utk_train]
    val_rows = list(range(offsets[1], offsets[2])) + [int(offsets[2] + i) for i in utk_val]
    if studio:
        train_rows += [int(offsets[3] + i) for i in studio_train]
        val_rows += [int(offsets[3] + i) for i in studio_val]
    if limit:
        pick = np.random.default_rng(0)
        train_rows = sorted(pick.choice(train_rows, limit, replace=False).tolist())
        val_rows = sorted(pick.choice(val_rows, limit // 4, replace=False).tolist())
    return index, train_rows, val_rows, [Path(utk.table["path"].iloc[i]).name for i in held]


#: The auxiliary age head's classes (``--aux-age-weight``): 5-year bins of UTKFace's exact ages, 19 to 79+.
AGE_BIN_EDGES = tuple(range(19, 80, 5))
AUX = "age_years"


def add_age_years_head() -> tuple[str, ...]:
    """Register the study-only head ``age_years`` in this process's schema (never in the package's): one
    class per 5-year bin, trained on UTKFace's ages in years (gap ages included), masked elsewhere."""
    import facemt.tasks as schema

    if AUX not in schema.TASKS:
        names = tuple(f"{lo}-{lo + 4}" for lo in AGE_BIN_EDGES[:-1]) + (f"{AGE_BIN_EDGES[-1]}+",)
        schema.TASKS[AUX] = schema.Task(AUX, names, tuple(f"b{i}" for i in range(len(names))))
        schema.TASK_NAMES = (*schema.TASK_NAMES, AUX)
    return schema.TASKS[AUX].classes


def age_bins(index: DataIndex) -> list:
    """Each row's ``age_years`` class: UTKFace rows by the age in their file name, None elsewhere."""
    from facemt.data import parse_utkface_name

    classes = add_age_years_head()
    out = []
    for path, source in zip(index.table["path"], index.table["source"]):
        if source != "utkface":
            out.append(None)
            continue
        age = parse_utkface_name(Path(path).name)["age"]
        out.append(classes[int(np.searchsorted(AGE_BIN_EDGES, age, side="right")) - 1])
    return out


def drop_aux_head(run_dir: str, weight: float) -> None:
    """Rewrite the run without its ``age_years`` head (the three FACES heads stay as trained), so it loads
    and predicts like any facemt run; config.json records the study."""
    from facemt.checkpoint import load_checkpoint, read_config, save_checkpoint

    model, pre, config = load_checkpoint(run_dir)
    del model.heads[AUX]
    model.tasks = tuple(t for t in model.tasks if t != AUX)
    model.temperatures.pop(AUX, None)
    extra = {k: v for k, v in read_config(run_dir).items()
             if k not in ("format", "format_version", "facemt_version", "created", "backbone", "dropout", "tasks",
                          "preprocess", "weights_sha256")}

    def without(value):
        if isinstance(value, dict):
            return {k: without(v) for k, v in value.items() if k != AUX}
        if isinstance(value, list):
            return [without(v) for v in value if v != AUX]
        return value

    extra = without(extra)
    extra["aux_age"] = {"weight": weight, "bins": list(add_age_years_head()), "head": "trained, then removed"}
    save_checkpoint(run_dir, model, config["backbone"], pre, extra)


class GreyCache(ImageCache):
    """Every decoded face as greyscale, as FER+ faces arrive (the colour-vs-greyscale study)."""

    def _decode(self, path, cfg):
        from base_model import greyscale

        return greyscale(super()._decode(path, cfg))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--weights", help="ImageNet weights of --backbone (.safetensors); required unless --init-from")
    p.add_argument("--init-from", metavar="RUN",
                   help="continue from a facemt run (e.g. an earlier base run) instead of ImageNet weights: "
                        "a second, lower-rate cycle on the same data and split")
    p.add_argument("--backbone", default="mobilenetv2_100")
    p.add_argument("--out", default="runs/base")
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, default=0,
                   help="training rows drawn from all sources (validation: a quarter as many), for a study (0 = all)")
    p.add_argument("--fer-policy", choices=("majority", "clear", "soft"), default="majority",
                   help="FER+ training labels: majority vote, clear majority only, or vote distributions as soft "
                        "targets; validation always uses the majority label (default %(default)s)")
    p.add_argument("--studio", action="store_true",
                   help="also train on the studio sets' persons that benchmarks/studio_test_persons.txt does not test")
    p.add_argument("--fer-limit", type=int, default=0, help="draw this many FER2013Train rows (0 = all)")
    p.add_argument("--balance-sources", action="store_true", help="every source equally often per epoch")
    p.add_argument("--backbone-lr-scale", type=float, default=1.0)
    p.add_argument("--crop", choices=("align", "box"), default="align",
                   help="framing: aligned faces, or the detector's box with a 40 %% margin (hair in)")
    p.add_argument("--prior", choices=("balanced", "training"), default="balanced",
                   help="balanced: logit-adjusted loss, class-balanced predictions (the recipe); training: plain "
                        "cross-entropy, predictions follow the training frequencies")
    p.add_argument("--aux-age-weight", type=float, default=0.0,
                   help="study: also train an age-in-years head (5-year bins of UTKFace's exact ages, masked on "
                        "other sources) with this loss weight, then remove it from the saved run; keeps the last "
                        "epoch (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="training seed (batch order, augmentation, dropout)")
    p.add_argument("--jitter-consistency", type=float, default=0.0, metavar="W",
                   help="fit's --jitter-consistency: re-framed faces must keep their probabilities (weight W)")
    p.add_argument("--grey", action="store_true",
                   help="train and validate on greyscale faces (ITU-R 601 luma in three channels), for a study")
    p.add_argument("--record-counts", metavar="RUN", nargs="+",
                   help="train nothing: write the class counts of this recipe's training rows into each RUN's "
                        "config.json (for a base trained before runs recorded them; needed by --prior)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    root = Path(args.data_root)
    if args.record_counts:
        index, train_rows, _, _ = base_split(root, args.fer_policy, args.limit, args.studio, args.fer_limit)
        counts = class_counts(encode_targets(index.table, TASK_NAMES), train_rows)
        for run in args.record_counts:
            update_config(run, {"class_counts": counts})
        print(json.dumps({"class_counts": counts}))
        return 0
    if not (args.weights or args.init_from):
        p.error("give --weights (ImageNet backbone) or --init-from RUN")
    started = time.perf_counter()
    index, train_rows, val_rows, held = base_split(root, args.fer_policy, args.limit, args.studio, args.fer_limit)
    tasks = ("age_group", "gender", "expression")
    if args.aux_age_weight:
        index.table[AUX] = pd.Series(age_bins(index), index=index.table.index, dtype=object)
        tasks += (AUX,)
    HOLDOUT.write_text("# UTKFace files the base model never trains on (benchmarks B and C)\n"
                       + "".join(name + "\n" for name in held))
    config = TrainConfig(
        backbone=args.backbone, pretrained_file=None if args.init_from else args.weights,
        init_from=args.init_from, backbone_lr_scale=args.backbone_lr_scale, epochs=args.epochs, image_size=args.image_size,
        batch_size=args.batch_size, lr=args.lr, augment="heavy", crop=args.crop,
        balance_classes=args.prior == "balanced",
        tasks=tasks, loss_weights={AUX: args.aux_age_weight} if args.aux_age_weight else {},
        warmup_epochs=args.warmup_epochs, device=args.device, seed=args.seed,
        balance_sources=args.balance_sources, jitter_consistency=args.jitter_consistency,
    )
    # a second cycle records the first one's recipe before its own: the whole way from ImageNet weights
    earlier = json.loads((Path(args.init_from) / "config.json").read_text()).get(
        "recipe", f"(facemt run {args.init_from})") + " && " if args.init_from else ""
    extra = {
        "sources": [f"{'ferplus' if args.fer_policy == 'majority' else 'ferplus-' + args.fer_policy}:"
                    f"{root / 'ferplus' / 'FER2013Train'}", f"ferplus:{root / 'ferplus' / 'FER2013Valid'}",
                    f"utkface:{root / 'utkface'}"] + ([str(root / s / "labels.csv") for s in ("cfd", "nimstim", "rafd",
                                                      "ckplus48")] if args.studio else []),
        "recipe": earlier + "benchmarks/pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dataset": index.summary(),
        "split": {"train_images": len(train_rows), "val_images": len(val_rows),
                  "utk_held_out": len(held), "utk_held_out_list": "benchmarks/utk_holdout.txt"},
    }
    print(f"train {len(train_rows)} images, validate {len(val_rows)}, UTKFace held out {len(held)}", flush=True)
    epoch_started = [time.perf_counter()]

    def progress(event: str, info: dict) -> None:
        if event == "framing":
            print(f"framing: {info['counts']}", flush=True)
        elif event == "epoch_start":
            epoch_started[0] = time.perf_counter()
        elif event == "epoch_end":
            row = info["row"]
            accs = " ".join(f"{k[4:-4]}={v:.3f}" for k, v in row.items() if k.startswith("val_") and k.endswith("_acc"))
            print(f"epoch {info['epoch']}/{info['epochs']} {time.perf_counter() - epoch_started[0]:.0f} s "
                  f"train loss {sum(v for k, v in row.items() if k.startswith('train_') and k.endswith('_loss')):.3f} "
                  f"val {accs}", flush=True)

    cache = GreyCache() if args.grey else ImageCache()
    # the best epoch is picked by the mean validation accuracy of every head: with the study's head that mean
    # would count age bins, so those runs keep their last epoch
    result = train(index, config, train_rows, val_rows, out_dir=args.out, cache=cache, callback=progress, extra=extra,
                   select_best=not args.aux_age_weight)
    temperatures = calibrate_run(args.out, result.model, index, val_rows, result.preprocess, cache, device=args.device)
    if args.aux_age_weight:
        drop_aux_head(args.out, args.aux_age_weight)
    wall = time.perf_counter() - started
    print(json.dumps({"best_epoch": result.best_epoch, "temperatures": temperatures, "wall_s": round(wall)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
