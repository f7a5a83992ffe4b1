"""``facemt check-data``, ``evaluate``, ``cv`` and ``explain``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from facemt.errors import FacemtError
from facemt.files import check_folder
from facemt.config import CROP_POLICIES

from facemt.cli.train import add_train_args, train_config
from facemt.cli.common import (
    EXIT_OK, EXIT_PARTIAL, EPILOG, bars, timing, EventProgress, load_data, print_summary, crop_override,
    metrics_table, add_engine_arg, add_tta_arg, add_prior_arg, add_model_arg, chosen_model, add_method_arg,
    add_explain_args, parse_targets, add_person_relative_arg,
)


def cmd_check_data(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.checks import check_data
    from facemt.splits import validation_split

    sources = [*args.sources, *(args.data or [])]
    if not sources:
        raise FacemtError("check-data needs --data DIR|CSV")
    index = load_data(sources, err)
    _, val_rows = validation_split(index.table, args.val_fraction, args.seed)
    tasks = None
    if args.tasks:
        from facemt.tasks import select_tasks

        tasks = select_tasks(args.tasks)
    with bars(err, TextColumn("decode"), BarColumn(), MofNCompleteColumn(), transient=True) as progress:
        task = progress.add_task("decode", total=len(index))
        report = check_data(index, tasks, val_rows, progress=lambda d, n: progress.update(task, completed=d))
    if args.json:
        print(json.dumps({"images": len(index), "skipped": index.skipped, **report.to_dict()}, indent=2))
    else:
        table = Table(title=f"{len(index)} images, {index.summary()['persons']} persons, {len(index.skipped)} skipped")
        table.add_column("head")
        table.add_column("images per class")
        table.add_column("missing", justify="right")
        for head, counts in report.per_class.items():
            table.add_row(head, ", ".join(f"{c} {n}" for c, n in counts.items() if c != "missing"), str(counts["missing"]))
        out.print(table)
        if len(report.per_person):
            pt = Table(title="per person")
            for col in report.per_person.columns:
                pt.add_column(col)
            for row in report.per_person.itertuples(index=False):
                pt.add_row(*map(str, row))
            out.print(pt)
        for s_ in index.skipped[:20]:
            out.print(f"skipped: {s_}", markup=False, highlight=False)
        for w in report.warnings:
            out.print(f"warning: {w}", style="yellow", markup=False, highlight=False)
        for p_ in report.problems:
            out.print(f"problem: {p_}", style="red", markup=False, highlight=False)
        out.print("data OK for training" if report.ok else "data NOT usable for training as is")
    return EXIT_OK if report.ok else EXIT_PARTIAL


def cmd_evaluate(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.data import ImageCache, persons_in
    from facemt.tasks import PERSON_HEADS, has_pairs
    from facemt.engine import decode_images
    from facemt.evaluation import evaluate_predictions, evaluation_notes
    from facemt.inference import load

    predictor = load(chosen_model(args), device=args.device, batch_size=args.batch_size, crop=crop_override(args),
                     engine=args.engine, tta=args.tta, prior=args.prior, jitter=args.jitter)
    if args.explain:
        from facemt.explain import check_method

        check_method(args.method)
        check_folder(args.explain, flag="--explain")
        predictor.torch_model()  # an ONNX engine asked for by name is said now
    index = load_data(args.data, err)
    cache = ImageCache()
    with EventProgress(err) as progress:
        images = decode_images(index, predictor.preprocess, cache, progress)
    persons = None if args.no_person_relative else persons_in(index.table)
    if persons is not None and all(p is None for p in persons):
        persons = None  # nobody's person is known: every picture alone
    pooled = [t for t in PERSON_HEADS if t in predictor.tasks] if persons and has_pairs(persons) else []
    relative = persons is not None and predictor.person_relative
    metrics = evaluate_predictions(index.table, predictor.probabilities(images, persons))
    if args.explain:
        _class_maps(predictor, index, images, Path(args.explain), args.method, args.overwrite, err)
    notes = evaluation_notes(predictor.config, predictor.tasks, index.table)
    if pooled:
        notes.append(f"{' and '.join(pooled)}: one answer per person, from all of that person's pictures "
                     "(--no-person-relative: each picture alone)")
    if relative:
        notes.append("expression is read against each person's other pictures (the run's person-relative "
                     "classifier; --no-person-relative: the network's head alone)")
    for note in notes:
        err.print(f"note: {note}", style="yellow", markup=False, highlight=False)
    if args.json:
        print(json.dumps({"model": str(predictor.run_dir), "images": len(index), "crop": predictor.preprocess.crop,
                          "tta": predictor.tta, "prior": predictor.prior, "person_relative": relative,
                          "per_person": pooled, "notes": notes,
                          "framing": cache.framing_counts(index.table), "metrics": metrics}, indent=2))
        return EXIT_OK
    out.print(metrics_table(f"{predictor.run_dir} on {len(index)} images ({predictor.prior} prior)", metrics))
    for head, m in metrics.items():
        if not m["n"]:
            continue
        t = Table(title=f"{head}: per class")
        for col in ("class", "precision", "recall", "support"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for c, pc in m["per_class"].items():
            t.add_row(c, f"{pc['precision']:.3f}", f"{pc['recall']:.3f}", str(pc["support"]))
        out.print(t)
        cm = Table(title=f"{head}: confusion (rows true, columns predicted)")
        cm.add_column("")
        for c in m["classes"]:
            cm.add_column(c[:5], justify="right")
        for c, row in zip(m["classes"], m["confusion"]):
            cm.add_row(c, *map(str, row))
        out.print(cm)
    return EXIT_OK


def _class_maps(predictor, index, images, folder: Path, method: str, overwrite: bool, err: Console) -> None:
    """evaluate --explain: class-average maps of the labelled faces, as a figure and arrays."""
    from facemt.data import encode_targets
    from facemt.explain import class_average_maps, dataset_maps, plot_class_maps, save_class_maps
    from facemt.files import atomic_write

    targets = [folder / "class_maps.png", folder / "class_maps.npz"]
    if any(t.exists() for t in targets) and not overwrite:
        raise FacemtError(f"--explain {folder}: already holds class maps; choose another folder or pass --overwrite")
    labels = encode_targets(index.table, predictor.tasks)
    maps, mean = dataset_maps(predictor.torch_model(), images, predictor.preprocess, labels, method)
    averages = class_average_maps(maps, labels)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(targets[0], lambda tmp: plot_class_maps(averages, tmp, mean, f"{predictor.run_dir.name} on "
                                                         f"{len(images)} faces ({method}; true class)"))
    atomic_write(targets[1], lambda tmp: save_class_maps(averages, tmp))
    err.print(f"class-average maps ({method}) written to {targets[0]} and {targets[1]}", markup=False, highlight=False)


class _CVProgress(EventProgress):
    """One bar over every epoch of every model in the cross-validation."""

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        p = self.progress
        if event == "decode":
            super().__call__(event, info)
        elif event == "run_start":
            if self.train_task is None:
                self.total = info["runs"] * info["epochs"]
                self.train_task = p.add_task("cv", total=self.total)
            p.update(self.train_task, description=f"model {info['run']}/{info['runs']} {info['label']}")
            if not self.console.is_terminal:  # a log file or CI: no bar is drawn, so say where the run is
                self.console.print(f"cv model {info['run']}/{info['runs']} {info['label']}{timing(self.started, info['run'] - 1, info['runs'])}",
                                   markup=False, highlight=False)
        elif event in ("refit", "evidence"):  # fit's second training, or one per extra validation group
            self.total += math.ceil(info["epochs"])
            p.update(self.train_task, total=self.total)
        elif event == "epoch_end":
            p.update(self.train_task, advance=1)


def cmd_cv(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.evaluation import cross_validate
    from facemt.report import interval_text, percent_text, write_report

    if not args.data:
        raise FacemtError("cv needs --data")
    config = train_config(args)
    if args.explain:
        from facemt.explain import check_method

        check_method(args.method)
    report_dir = Path(args.out)
    if (report_dir / "report.md").exists() and not args.overwrite:
        raise FacemtError(f"{report_dir} already holds a report; choose another --out or pass --overwrite")
    check_folder(report_dir)
    index = load_data(args.data, err)
    from facemt.splits import make_folds

    for protocol in ("subject", "random") if args.split == "both" else (args.split,):
        make_folds(index.table, protocol, args.folds, config.seed, args.test_size)  # said before anything is printed
    print_summary(index, err)
    with _CVProgress(err) as progress:
        result = cross_validate(index, config, folds=args.folds, split=args.split, seeds=args.seeds,
                                baselines=args.baselines, test_size=args.test_size, callback=progress,
                                explain=args.method if args.explain else None, fit_model=args.fit_model)
    for warning in result.warnings:
        err.print(f"warning: {warning}", style="yellow", markup=False)
    write_report(result, report_dir)
    summary = result.summary()
    if args.json:
        print(json.dumps({"report": str(report_dir / "report.md"), "summary": json.loads(summary.to_json(orient="records"))},
                         indent=2))
        return EXIT_OK
    single, zero = "single_mean" in summary, "zero_shot_mean" in summary
    table = Table(title="test accuracy % (mean ± std over folds x seeds)")
    columns = ["split", "head", "multi-task"] + (["single-task", "multi − single [95% CI]"] if single else [])
    columns += ["not fine-tuned", "gain [95% CI]"] if zero else []
    for col in columns + ["majority"]:
        table.add_column(col, justify="left" if col in ("split", "head") else "right")
    pct = percent_text
    for _, r in summary.iterrows():
        cells = [pct(r["multitask_mean"], r["multitask_std"])]
        cells += [pct(r.get("single_mean"), r.get("single_std")), interval_text(r, "diff")] if single else []
        cells += [pct(r.get("zero_shot_mean"), r.get("zero_shot_std")), interval_text(r, "gain")] if zero else []
        table.add_row(r["protocol"], r["head"], *cells, pct(r["majority_mean"]))
    out.print(table)
    _print_lines(summary, result.config, out)
    out.print(f"report written to {report_dir / 'report.md'}")
    return EXIT_OK


def _given(value: Any) -> bool:
    return value is not None and value == value  # NaN: a summary column this row has no number for


def _fit_line(r, config: dict) -> str:
    """What fit writes for one split and head: accuracy, gain over the start model, what fit chose."""
    from facemt.report import interval_text, percent_text

    folds = [f for f in config["fit_folds"] if f["protocol"] == r["protocol"]]
    line = f"{r['protocol']} {r['head']} as fit writes it: {percent_text(r['fit_mean'], r['fit_std'])} %"
    if _given(r.get("fit_gain_mean")):  # training started from a facemt model
        skipped = sum(f["never_worse_skipped"] is not None for f in folds)
        line += (f", minus not fine-tuned {interval_text(r, 'fit_gain')}; answered by the starting model in "
                 f"{sum(r['head'] in f['answered_by_start'] for f in folds)} of {len(folds)} folds"
                 + (f" (never-worse rule skipped in {skipped}: see the report)" if skipped else ""))
    relative = sum(f["person_relative"] is not None for f in folds) if r["head"] == "expression" else 0
    return line + (f", read against each person's other pictures in {relative}" if relative else "")


def _print_lines(summary, config: dict, out: Console) -> None:
    """Below cv's table, one line per head for what fit writes and for each reading per person."""
    from facemt.report import interval_text, percent_text as pct

    for _, r in summary.iterrows():
        if _given(r.get("fit_mean")):
            out.print(_fit_line(r, config), markup=False, highlight=False)
        if _given(r.get("person_relative_mean")):
            out.print(f"{r['protocol']} {r['head']} read per person (person-relative): "
                      f"{pct(r['person_relative_mean'], r['person_relative_std'])} %, minus the multi-task head "
                      f"{interval_text(r, 'relative_gain')}", markup=False, highlight=False)
        if _given(r.get("per_person_mean")):
            untouched = r.get("zero_shot_per_person_mean")
            out.print(f"{r['protocol']} {r['head']} read per person: {pct(r['per_person_mean'], r['per_person_std'])} %, "
                      f"minus each picture alone {interval_text(r, 'per_person_gain')}"
                      + (f"; not fine-tuned, per person: {pct(untouched, r['zero_shot_per_person_std'])} %"
                         if _given(untouched) else ""),
                      markup=False, highlight=False)


def cmd_explain(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.explain import check_method, plot_explanation
    from facemt.images import iter_image_files
    from facemt.inference import load

    check_method(args.method)
    targets = parse_targets(args.target)
    files = iter_image_files(args.inputs)
    if not files:
        raise FacemtError("no image files found in the given inputs")
    folder = check_folder(args.out)
    predictor = load(chosen_model(args), device=args.device, crop=crop_override(args), engine=args.engine, prior=args.prior)
    predictor.torch_model()  # an ONNX engine asked for by name is said now, before any work
    written, results, failed = [], [], 0
    with bars(err, TextColumn("explain"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
              transient=True, disable=len(files) < 4) as progress:
        task = progress.add_task("explain", total=len(files))
        for path in files:
            try:
                explanations = predictor.explain(path, targets, args.method, all_faces=True)
            except FacemtError as exc:
                err.print(f"error: {exc}", markup=False, highlight=False)
                failed += 1
                continue
            for e in explanations:
                name = f"{path.stem}.face{e.face}.png" if e.face is not None else f"{path.stem}.png"
                target = folder / name
                if target.exists() and not args.overwrite:
                    raise FacemtError(f"{target}: already exists; choose another --out or pass --overwrite")
                from facemt.files import atomic_write

                folder.mkdir(parents=True, exist_ok=True)
                atomic_write(target, lambda tmp, e=e: plot_explanation(e, tmp, title=f"{path.name} ({args.method})"))
                written.append(target)
                results.append({**e.to_dict(), "png": str(target)})
            progress.update(task, advance=1)
    if args.json:
        print(json.dumps(results))
    else:
        table = Table()
        for col in ("file", "face", *predictor.tasks, "explanation"):
            table.add_column(col)
        for r in results:
            cells = [f"{r[t]['label']} ({r[t]['probability']:.2f})"
                     + ("" if r[t]["target"] == r[t]["label"] else f", map: {r[t]['target']}") for t in predictor.tasks]
            table.add_row(Path(r["path"]).name, "-" if r["face"] is None else str(r["face"]), *cells, r["png"])
        out.print(table)
    err.print(f"{len(written)} explanation(s) ({args.method}) written to {folder}", markup=False, highlight=False)
    return EXIT_PARTIAL if failed else EXIT_OK




def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
    p = sub.add_parser("check-data", help="validate a data set before training", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="DIR|CSV", help=argparse.SUPPRESS)
    p.add_argument("--data", action="append", metavar="DIR|CSV",
                   help="labelled images (repeatable; the older positional form also works)")
    p.add_argument("--tasks", help="heads you intend to train (default: every labelled one)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share used by fit (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed used by fit (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("evaluate", help="metrics of a trained model on labelled images", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help=argparse.SUPPRESS)
    add_model_arg(p)
    p.add_argument("--data", action="append", required=True, metavar="DIR|CSV", help="labelled images (repeatable)")
    p.add_argument("--crop", choices=CROP_POLICIES,
                   help="override the run's crop policy (default: the one it was trained with)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--batch-size", type=int, default=32, help="default %(default)s")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    add_engine_arg(p)
    add_tta_arg(p)
    add_prior_arg(p)
    add_explain_args(p, "DIR", "also write class-average maps (rows heads, columns classes: where each head finds "
                      "the evidence for the true class) to DIR/class_maps.png and DIR/class_maps.npz")
    add_person_relative_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace class maps already in --explain DIR")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("explain", help="per-head heat maps: where in the face each head finds its evidence",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files or folders")
    add_model_arg(p)
    p.add_argument("--out", default="explanations", help="folder for one PNG per face (default %(default)s)")
    p.add_argument("--target", action="append", metavar="TASK=CLASS",
                   help="explain this class instead of the predicted one, e.g. expression=anger (repeatable)")
    add_method_arg(p)
    p.add_argument("--crop", choices=CROP_POLICIES, help="override the run's crop policy")
    p.add_argument("--no-detect", action="store_true", help="same as --crop none")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    add_engine_arg(p)
    add_prior_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace PNGs already in --out")
    p.add_argument("--json", action="store_true",
                   help="print JSON: per face and head the label, the explained class, its map "
                        "(28x28 in the aligned frame) and the matrix taking map pixels to photo pixels")
    p.set_defaults(func=cmd_explain)


def add_cv_parser(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
    p = sub.add_parser("cv", help="cross-validate multi-task vs single-task models and write a report",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    p.add_argument("--out", required=True, help="report folder (report.md, results.json/csv, plots)")
    p.add_argument("--folds", type=int, default=5, help="default %(default)s (leave-one-person-out with fewer persons)")
    p.add_argument("--split", choices=("subject", "random", "both"), default="subject",
                   help="subject-disjoint folds (default), stratified random folds, or both")
    p.add_argument("--seeds", type=int, default=1, help="repeats with successive seeds (default %(default)s)")
    p.add_argument("--test-size", type=float, help="one held-out split of this fraction per seed instead of K folds "
                   "(--split random --test-size 0.3 is the original 70/30 protocol)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also train one single-task model per head on the same folds (default on)")
    p.add_argument("--fit-model", action=argparse.BooleanOptionalAction, default=True,
                   help="also run fit itself on each fold's training persons (its own validation persons, the "
                   "never-worse rule, --refit when given, the person-relative step) and score the model it writes: "
                   "what `facemt fit` gives you on such images (default on; about one more multi-task model per fold)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--json", action="store_true", help="print the summary table as JSON")
    add_explain_args(p, None, "also map where each multi-task model finds the evidence for its test faces' true "
                      "class, per head; the report adds the class averages (class_maps.png, class_maps.npz)")
    p.set_defaults(func=cmd_cv)
