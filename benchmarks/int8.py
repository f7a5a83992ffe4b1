"""int8 that agrees with float32 on real faces: which calibration faces, per-channel or per-tensor weight
scales, which layers stay float, which calibration method; agreement per head and set, and speed.

    python benchmarks/int8.py --data-root ../shared/data [--model base] [--results benchmarks/RESULTS.md]
                              [--ship VARIANT]

Inputs are framed exactly as ``facemt predict`` frames them (the model's crop policy, largest face,
whole picture when none is found) and normalised once; every variant sees the same arrays.

- Test faces (the base never trained on them): UTKFace held-out adults, FER+ FER2013Test, the studio
  sets' test persons (``benchmarks/studio_test_persons.txt``) and JAFFE.
- Calibration faces: drawn from the base model's own training data (UTKFace training adults, FER2013Train,
  the studio sets' training persons), or facemt's generated faces (what ``--engine onnx-int8`` used when a
  run had no exported int8 graph).
- Agreement: share of faces whose top-1 class is the same as float32's (ONNX Runtime, the shipped graph),
  per head and set; the target is 98 % on every head and set.
- Speed: network only, batch 1 and 32, median of ``--repeats`` alternating float32 and the variant.

``--ship VARIANT`` writes that variant's graph as ``facemt/base/model.int8.onnx`` with its sidecar
(the variant and its calibration faces recorded); ship only a variant that meets the target and is faster.
A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy import publish  # noqa: E402

import facemt  # noqa: E402
from facemt.data import index_ferplus, index_jaffe, index_utkface  # noqa: E402
from facemt.engines import OnnxModel, quantize_int8  # noqa: E402
from facemt.files import sha256_file  # noqa: E402
from facemt.inference import calibration_batches  # noqa: E402
from facemt.tasks import TASKS  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd

#: every layer int8, per-channel weight scales, min-max activation ranges (facemt's default before this study)
PLAIN = {"per_channel": True, "float_ends": False, "method": "minmax", "float_stride": 0}
#: variant -> (calibration pool, faces, quantize_int8 options)
VARIANTS = {
    "generated-64": ("generated", 64, PLAIN),
    "real-64": ("real", 64, PLAIN),
    "real-256": ("real", 256, PLAIN),
    "real-1024": ("real", 1024, PLAIN),
    "real-256 per-tensor": ("real", 256, {**PLAIN, "per_channel": False}),
    "real-256 float ends": ("real", 256, {**PLAIN, "float_ends": True}),
    "real-256 percentile": ("real", 256, {**PLAIN, "method": "percentile"}),
    "real-256 entropy": ("real", 256, {**PLAIN, "method": "entropy"}),
    "real-256 stride<=4 float": ("real", 256, {**PLAIN, "float_stride": 4}),
    "real-256 stride<=4 float, percentile": ("real", 256, {**PLAIN, "float_stride": 4, "method": "percentile"}),
    "real-1024 stride<=4 float, percentile": ("real", 1024, {**PLAIN, "float_stride": 4, "method": "percentile"}),
    "real-256 stride<=8 float, percentile": ("real", 256, {**PLAIN, "float_stride": 8, "method": "percentile"}),
    "generated-64 stride<=8 float, percentile": ("generated", 64, {**PLAIN, "float_stride": 8, "method": "percentile"}),
}
TARGET = 98.0
FRESH = "fresh: "


def utk_split(root: Path) -> tuple[list[str], list[str]]:
    from scaling import utk_split as split

    return split(root)


def studio_files(root: Path) -> tuple[list[str], list[str], "pd.DataFrame"]:
    """(training persons' files, test persons' files, test persons' table)."""
    from studio import read_split, studio_index, test_rows

    table = studio_index(root).table
    tested = test_rows(table, read_split())
    train = np.setdiff1d(np.arange(len(table)), tested)
    return list(table["path"].iloc[train]), list(table["path"].iloc[tested]), table.iloc[tested].reset_index(drop=True)


def draw(files: list[str], n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [files[i] for i in sorted(rng.choice(len(files), min(n, len(files)), replace=False))]


def inputs(preprocess, files: list[str]) -> np.ndarray:
    return np.concatenate(calibration_batches(preprocess, files, batch_size=64))


def probabilities(model: OnnxModel, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    parts = [model.probabilities(x[i:i + batch]) for i in range(0, len(x), batch)]
    return {t: np.concatenate([p[t] for p in parts]) for t in model.tasks}


def median_ms(model: OnnxModel, x: np.ndarray, repeats: int) -> float:
    model.probabilities(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.probabilities(x)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--model", default="base")
    p.add_argument("--per-set", type=int, default=800, help="test faces per set at most (default %(default)s)")
    p.add_argument("--only", action="append", metavar="VARIANT", help="run this variant (repeatable; default: all)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--cache", type=Path, default=Path("runs/int8_inputs.npz"), help="framed inputs kept here")
    p.add_argument("--results", type=Path)
    p.add_argument("--ship", metavar="VARIANT", help="write this variant as the model's model.int8.onnx")
    args = p.parse_args(argv)
    root = args.data_root
    started = time.perf_counter()
    predictor = facemt.load(args.model, engine="onnx")
    graph = predictor.model.source
    if graph is None:
        p.error(f"{args.model} has no exported model.onnx: run facemt export first")
    pre = predictor.preprocess
    utk_train, utk_test = utk_split(root)
    studio_train, studio_test, studio_table = studio_files(root)
    fer_test = index_ferplus(root / "ferplus" / "FER2013Test").table
    fer_train = list(index_ferplus(root / "ferplus" / "FER2013Train").table["path"])
    utk = index_utkface(root / "utkface").table.set_index("path")
    jaffe = index_jaffe(root / "jaffe").table
    n = args.per_set
    fer_order = np.random.default_rng(0).permutation(len(fer_test))
    tests = {"UTKFace held-out": utk.loc[utk_test[:n]].reset_index(),
             "FER+ Test": fer_test.iloc[np.sort(fer_order[:n])],
             "studio test persons": studio_table.iloc[:n], "JAFFE": jaffe,
             # fresh faces, looked at only after the variants were chosen on the sets above
             FRESH + "UTKFace held-out": utk.loc[utk_test[n:2 * n]].reset_index(),
             FRESH + "FER+ Test": fer_test.iloc[np.sort(fer_order[n:2 * n])]}
    # real calibration: equal thirds of the base's training sources, nested (the 64 are among the 256 ...)
    pool = [f for group in zip(draw(utk_train, 400, 1), draw(fer_train, 400, 2), draw(studio_train, 400, 3))
            for f in group]
    cached = dict(np.load(args.cache)) if args.cache.is_file() else {}
    x = {name: cached[name] if name in cached else inputs(pre, list(t["path"])) for name, t in tests.items()}
    real = cached["calibration"] if "calibration" in cached else inputs(pre, pool)
    if set(x) - set(cached) or "calibration" not in cached:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.cache, calibration=real, **x)
    print(f"inputs ready ({time.perf_counter() - started:.0f} s): "
          + ", ".join(f"{k} {len(v)}" for k, v in x.items()), flush=True)
    generated = np.concatenate(calibration_batches(pre))
    reference = {name: probabilities(predictor.model, v) for name, v in x.items()}
    names = args.only or list(VARIANTS)
    if set(names) - set(VARIANTS) or (args.ship and args.ship not in names):
        p.error(f"choose --only / --ship among {list(VARIANTS)} (--ship among those run)")
    rows, speed = [], []
    one, batch = x["UTKFace held-out"][:1], x["UTKFace held-out"][:32]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            kind, count, options = VARIANTS[name]
            calib = generated[:count] if kind == "generated" else real[:count]
            out = Path(tmp) / f"{len(rows)}.onnx"
            q_start = time.perf_counter()
            quantize_int8(graph, out, [calib[i:i + 32] for i in range(0, len(calib), 32)], **options)
            q_seconds = time.perf_counter() - q_start
            model = OnnxModel(out, predictor.tasks)
            for set_name, v in x.items():
                got = probabilities(model, v)
                truth = tests[set_name]
                for t in predictor.tasks:
                    f32, i8 = reference[set_name][t].argmax(1), got[t].argmax(1)
                    labels = truth[t].to_numpy() if t in truth else np.full(len(v), None)
                    known = np.array([lab is not None and lab == lab for lab in labels])
                    classes = np.asarray(TASKS[t].classes)
                    acc = lambda pred: 100 * float(np.mean(classes[pred][known] == labels[known])) if known.any() else np.nan
                    rows.append({"variant": name, "set": set_name, "head": t, "n": len(v),
                                 "agreement": 100 * float(np.mean(f32 == i8)),
                                 "max_abs_diff": float(np.abs(reference[set_name][t] - got[t]).max()),
                                 "accuracy_f32": acc(f32), "accuracy_int8": acc(i8)})
            ms = {}
            for label, data in (("1", one), ("32", batch)):
                f32_ms, i8_ms = [], []
                for _ in range(3):  # alternate, so both see the same machine
                    f32_ms.append(median_ms(predictor.model, data, args.repeats // 3))
                    i8_ms.append(median_ms(model, data, args.repeats // 3))
                ms[label] = (float(np.median(f32_ms)), float(np.median(i8_ms)))
            mine = [r for r in rows if r["variant"] == name]
            worst = min((r for r in mine if not r["set"].startswith(FRESH)), key=lambda r: r["agreement"])
            fresh = min((r for r in mine if r["set"].startswith(FRESH)), key=lambda r: r["agreement"])
            speed.append({"variant": name, "calibration": f"{count} {kind}", "options": options,
                          "quantize_s": q_seconds, "ms": ms, "worst": worst, "fresh": fresh,
                          "size_mb": out.stat().st_size / 1e6})
            print(f"{name}: worst agreement {worst['agreement']:.1f} % ({worst['set']}, {worst['head']}), "
                  f"fresh {fresh['agreement']:.1f} %; "
                  f"batch 32 {ms['32'][0]:.1f} -> {ms['32'][1]:.1f} ms; batch 1 {ms['1'][0]:.2f} -> {ms['1'][1]:.2f} ms",
                  flush=True)
            if args.ship == name:
                ship(predictor, out, name, kind, count, options,
                     {"chosen_sets": worst["agreement"], "fresh_sets": fresh["agreement"]})
    lines = report(argv, args.model, x, rows, speed, time.perf_counter() - started)
    if args.results:
        publish(lines, str(args.results))
    else:
        print("\n".join(lines))
    Path("runs/int8.json").write_text(json.dumps({"rows": rows, "speed": speed}, indent=1, default=str))
    return 0


def report(argv: list[str], model: str, x: dict, rows: list[dict], speed: list[dict], seconds: float) -> list[str]:
    """The RESULTS.md section: one row per variant, then every variant's agreement per head and set."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    lines = [f"\n## int8 against float32 on real faces: `python benchmarks/int8.py {' '.join(argv)}` "
             f"(commit {commit}, {seconds:.0f} s)\n",
             f"Model `{model}`; test faces: " + ", ".join(f"{k} {len(v)}" for k, v in x.items())
             + "; real calibration faces: thirds of UTKFace training adults, FER2013Train and the studio training "
             "persons (never test faces). Agreement: top-1 the same as float32's (ONNX Runtime). Target: "
             f"{TARGET:.0f} % on every head and set, and faster than float32.", "",
             "Variants were compared on the first four sets; the `fresh:` sets (other UTKFace held-out and FER+ "
             "Test faces) check the choice on faces not looked at while choosing.", "",
             "| variant | calibration | worst agreement % (set, head) | worst on fresh faces % | mean agreement % | "
             "batch 1 ms f32 / int8 | batch 32 ms f32 / int8 | size MB | meets target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in speed:
        mine = [r for r in rows if r["variant"] == s["variant"]]
        ok = (min(s["worst"]["agreement"], s["fresh"]["agreement"]) >= TARGET and s["ms"]["32"][1] < s["ms"]["32"][0]
              and s["ms"]["1"][1] < s["ms"]["1"][0])
        lines.append(f"| {s['variant']} | {s['calibration']} | {s['worst']['agreement']:.1f} ({s['worst']['set']}, "
                     f"{s['worst']['head']}) | {s['fresh']['agreement']:.1f} | {np.mean([r['agreement'] for r in mine]):.1f} | "
                     f"{s['ms']['1'][0]:.2f} / {s['ms']['1'][1]:.2f} | {s['ms']['32'][0]:.1f} / {s['ms']['32'][1]:.1f} | "
                     f"{s['size_mb']:.1f} | {'yes' if ok else 'no'} |")
    lines += ["", "Per head and set (agreement %, accuracy float32 -> int8 where the set has the label):", "",
              "| variant | set | head | n | agreement % | max abs prob. diff | accuracy f32 % | accuracy int8 % |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = "" if np.isnan(r["accuracy_f32"]) else f"{r['accuracy_f32']:.1f}"
        b = "" if np.isnan(r["accuracy_int8"]) else f"{r['accuracy_int8']:.1f}"
        lines.append(f"| {r['variant']} | {r['set']} | {r['head']} | {r['n']} | {r['agreement']:.1f} | "
                     f"{r['max_abs_diff']:.3f} | {a} | {b} |")
    return lines


def ship(predictor, graph: Path, name: str, kind: str, count: int, options: dict, agreement: dict) -> None:
    """The variant as the model folder's ``model.int8.onnx`` + sidecar (written beside the float graph's)."""
    import shutil

    from facemt.files import atomic_write_text

    folder = predictor.run_dir
    target = folder / "model.int8.onnx"
    shutil.copyfile(graph, target)
    info = json.loads((folder / "model.onnx.json").read_text())
    info.pop("max_abs_diff", None)  # the float graph's check against PyTorch
    info.update(top1_agreement_min_percent=agreement,file=target.name, quantized="int8", sha256=sha256_file(target),
                int8={"variant": name, "calibration": f"{count} {kind} faces (benchmarks/int8.py)", **options})
    atomic_write_text(folder / "model.int8.onnx.json", json.dumps(info, indent=2) + "\n")
    print(f"wrote {target}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
