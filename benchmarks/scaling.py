"""Scaling benchmark: data-parallel training under torchrun against one
process, a distributed run resumed with another process count, the ONNX
Runtime engines against PyTorch eager, int8 agreement and accuracy on real
faces, and photos-in-labels-out speed with 1 and 2 processes.

Run:  python benchmarks/scaling.py --data-root ../shared/data [--only ddp,resume,engines,int8,e2e]

Every section runs the real commands (``facemt fit``, ``torchrun ... -m facemt
fit``, ``facemt predict``, ``merge-predictions``) in subprocesses and times
them from outside, start-up included. Real faces are read in place from
``--data-root`` through symlinks in a temporary folder; nothing is copied into
the repository. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import publish  # noqa: E402
from speed import timeit  # noqa: E402

import facemt  # noqa: E402
from facemt.data import index_jaffe, index_utkface  # noqa: E402
from facemt.tasks import TASK_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIT = ["--epochs", "6", "--batch-size", "32", "--seed", "0", "--device", "cpu"]


def sh(args: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode not in (0, 130):
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc


def facemt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "facemt", *args]


def torchrun_cmd(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "facemt", *args]


def link_files(files: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / Path(f).name).symlink_to(Path(f).resolve())
    return folder


def utk_split(root: Path) -> tuple[list[str], list[str]]:
    """(UTKFace adults outside the documented hold-out list, held-out adults)."""
    held = set((ROOT / "benchmarks" / "utk_holdout.txt").read_text().split())
    table = index_utkface(root / "utkface").table
    names = table["path"].map(lambda p: Path(p).name)
    rng = np.random.default_rng(0)  # sorted names group by age: shuffle once, reproducibly
    train, test = sorted(table["path"][~names.isin(held)]), sorted(table["path"][names.isin(held)])
    return [train[i] for i in rng.permutation(len(train))], [test[i] for i in rng.permutation(len(test))]


# -- data-parallel training ---------------------------------------------------------------------------------

def ddp_section(root: Path, tmp: Path, out_png: Path) -> list[str]:
    utk = tmp / "utk400" if (tmp / "utk400").exists() else link_files(utk_split(root)[0][:400], tmp / "utk400")
    data = ["--data", f"jaffe:{root / 'jaffe'}", "--data", f"utkface:{utk}"]
    runs = {}
    for n in (1, 2):
        run = tmp / f"ddp{n}"
        cmd = (facemt_cmd if n == 1 else lambda *a: torchrun_cmd(2, *a))("fit", *data, "--out", str(run), *FIT)
        seconds, _ = sh(cmd)
        runs[n] = (seconds, pd.read_csv(run / "history.csv"))
    lines = ["\n### torchrun --nproc-per-node 2 against one process\n", "```",
             f"facemt fit --data jaffe:{root / 'jaffe'} --data utkface:<400 UTKFace adults> --out RUN {' '.join(FIT)}",
             "torchrun --standalone --nproc-per-node 2 -m facemt fit <same arguments>", "```", "",
             "Same global batch (32), seed and data; base-model start, default backbone (mobilenetv2_100, BatchNorm).",
             "", "| processes | wall s | " + " | ".join(f"final val {t} %" for t in TASK_NAMES) + " |",
             "|---|---|" + "---|" * len(TASK_NAMES)]
    for n, (seconds, h) in runs.items():
        lines.append(f"| {n} | {seconds:.0f} | " + " | ".join(f"{100 * h[f'val_{t}_acc'].iloc[-1]:.1f}" for t in TASK_NAMES) + " |")
    diffs = {t: 100 * (runs[2][1][f"val_{t}_acc"].iloc[-1] - runs[1][1][f"val_{t}_acc"].iloc[-1]) for t in TASK_NAMES}
    lines += ["", "2 minus 1 process, points: " + ", ".join(f"{t} {d:+.1f}" for t, d in diffs.items())]
    plot_curves(runs, out_png)
    lines += ["", f"Loss curves: [{out_png.name}]({out_png.name})"]
    return lines


def plot_curves(runs: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASK_NAMES), figsize=(4 * len(TASK_NAMES), 3.2))
    for ax, t in zip(axes, TASK_NAMES):
        for n, (_, h) in runs.items():
            style = "-" if n == 1 else "--"
            ax.plot(h["epoch"], h[f"train_{t}_loss"], style, color="C0", label=f"train, {n} proc")
            ax.plot(h["epoch"], h[f"val_{t}_loss"], style, color="C1", label=f"val, {n} proc")
        ax.set_title(t)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[-1].legend(fontsize=7)
    fig.suptitle("facemt fit: 1 process (solid) vs torchrun 2 processes (dashed)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


# -- distributed resume -------------------------------------------------------------------------------------

def resume_section(root: Path, tmp: Path) -> list[str]:
    utk = tmp / "utk400" if (tmp / "utk400").exists() else link_files(utk_split(root)[0][:400], tmp / "utk400")
    run = tmp / "resumed"
    args = ["fit", "--data", f"jaffe:{root / 'jaffe'}", "--data", f"utkface:{utk}", "--out", str(run), *FIT]
    proc = subprocess.Popen(torchrun_cmd(2, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (run / "history.csv").exists() or len(pd.read_csv(run / "history.csv")) < 2:
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(proc.communicate()[1][-2000:])
    worker = next(int(c) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                  for c in (task / "children").read_text().split()
                  if b"RANK=1" in Path(f"/proc/{c}/environ").read_bytes().split(b"\0"))
    os.kill(worker, signal.SIGTERM)
    proc.communicate()
    state = json.loads((run / "resume.json").read_text())
    seconds, _ = sh(facemt_cmd("fit", "--resume", str(run)))
    h = pd.read_csv(run / "history.csv")
    continuous = list(h["epoch"]) == list(range(1, len(h) + 1))
    return ["\n### Distributed resume with another process count\n", "```",
            "torchrun --standalone --nproc-per-node 2 -m facemt fit <as above>   # SIGTERM to rank 1 after epoch 2",
            "facemt fit --resume RUN                                              # one process", "```", "",
            f"Stopped at epoch {state['epoch']}, step {state['step']} (rank 1 signalled; both ranks stopped); "
            f"resumed with 1 process in {seconds:.0f} s; history epochs {list(h['epoch'])} "
            f"({'continuous' if continuous else 'NOT continuous'}); final val accuracy "
            + ", ".join(f"{t} {100 * h[f'val_{t}_acc'].iloc[-1]:.1f} %" for t in TASK_NAMES) + "."]


# -- engines --------------------------------------------------------------------------------------------------

def median_ms(fn, repeats: int = 20) -> float:
    return 1000 * timeit(fn, repeats, warmup=3)


def engines_section(calibration: list[str]) -> list[str]:
    torch.set_num_threads(os.cpu_count() or 1)
    # int8 calibrated on real faces, as export --calibration does
    predictors = {"torch": facemt.load(device="cpu", engine="torch"), "onnx": facemt.load(engine="onnx"),
                  "onnx-int8": quantized_predictor("int8", calibration),
                  "dynamic int8": quantized_predictor("dynamic"), "a16w8": quantized_predictor("a16w8", calibration)}
    size = predictors["torch"].preprocess.image_size
    lines = ["\n### ONNX Runtime engines against PyTorch eager (the built-in model, network only)\n",
             f"mobilenetv2_100 at {size} px, {torch.get_num_threads()} threads, median of 20 after 3 warm-ups. "
             "`dynamic int8` (onnxruntime's quantize_dynamic) and `a16w8` (int8 weights, 16-bit activations), "
             "not offered by facemt, for comparison.", "",
             "| batch | torch ms | onnx ms | onnx-int8 ms | dynamic int8 ms | a16w8 ms | onnx speed-up | "
             "int8 speed-up vs onnx |", "|---|---|---|---|---|---|---|---|"]
    for batch in (1, 32):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ms = {e: median_ms(lambda p=p: p.model.probabilities(x)) for e, p in predictors.items()}
        lines.append(f"| {batch} | {ms['torch']:.1f} | {ms['onnx']:.1f} | {ms['onnx-int8']:.1f} | "
                     f"{ms['dynamic int8']:.1f} | {ms['a16w8']:.1f} | {ms['torch'] / ms['onnx']:.2f}x | {ms['onnx'] / ms['onnx-int8']:.2f}x |")
    return lines


def quantized_predictor(kind: str, calibration: list[str] | None = None):
    """The built-in model run by ONNX Runtime after quantization: ``int8``
    (facemt's onnx-int8, calibrated on ``calibration``), and for comparison
    ``a16w8`` (16-bit activations) and ``dynamic`` (onnxruntime's quantize_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from facemt.engines import OnnxModel, quantize_int8
    from facemt.inference import calibration_batches
    from facemt.model import write_onnx

    base = facemt.load(device="cpu", engine="torch")
    with tempfile.TemporaryDirectory() as tmp:
        graph, out = Path(tmp) / "m.onnx", Path(tmp) / "q.onnx"
        write_onnx(base.model, base.preprocess.image_size, graph)
        if kind == "dynamic":
            quant_pre_process(str(graph), str(Path(tmp) / "p.onnx"))
            quantize_dynamic(str(Path(tmp) / "p.onnx"), str(out), weight_type=QuantType.QInt8)
        else:
            quantize_int8(graph, out, calibration_batches(base.preprocess, calibration),
                          activation_bits=16 if kind == "a16w8" else 8)
        base.model = OnnxModel(out.read_bytes(), base.tasks)
    return base


def int8_section(root: Path, calibration: list[str]) -> list[str]:
    _, held = utk_split(root)
    sets = {"JAFFE (all 213; expression)": index_jaffe(root / "jaffe").table,
            "UTKFace held-out adults (first 600; age group, gender)":
                index_utkface(root / "utkface").table.set_index("path").loc[held[:600]].reset_index()}
    predictors = {"torch": facemt.load(device="cpu", engine="torch"), "onnx": facemt.load(engine="onnx"),
                  "onnx-int8": quantized_predictor("int8", calibration),
                  "a16w8": quantized_predictor("a16w8", calibration)}
    lines = ["\n### int8 against float32 on real faces (the built-in model)\n",
             "int8: static QDQ quantization calibrated on 64 UTKFace training adults (not in the test sets).", "",
             "| set | head | torch % | onnx % | int8 % | int8 change (points) | int8 top-1 agreement with torch % | "
             "a16w8 agreement % |", "|---|---|---|---|---|---|---|---|"]
    for name, table in sets.items():
        files = list(table["path"])
        labels = {e: {t: [] for t in TASK_NAMES} for e in predictors}
        for engine, p in predictors.items():
            for pred in p.predict(files):
                for t in TASK_NAMES:
                    labels[engine][t].append(pred.labels[t])
        for t in TASK_NAMES:
            truth = table[t]
            if truth.isna().all():
                continue
            mask = truth.notna().to_numpy()
            acc = {e: 100 * np.mean(np.array(labels[e][t])[mask] == truth.to_numpy()[mask]) for e in predictors}
            agree = {e: 100 * np.mean(np.array(labels[e][t]) == np.array(labels["torch"][t])) for e in predictors}
            lines.append(f"| {name} | {t} | {acc['torch']:.1f} | {acc['onnx']:.1f} | {acc['onnx-int8']:.1f} | "
                         f"{acc['onnx-int8'] - acc['torch']:+.1f} | {agree['onnx-int8']:.1f} | {agree['a16w8']:.1f} |")
    return lines


# -- photos in, labels out ----------------------------------------------------------------------------------

def make_photos(folder: Path, n: int, side: int = 1600) -> None:
    from PIL import Image

    from facemt.synth import draw_face, make_person
    from facemt.tasks import TASKS

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        person = make_person(i, TASKS["age_group"].classes[i % 3], TASKS["gender"].classes[i % 2], rng)
        face = draw_face(person, TASKS["expression"].classes[i % 6], rng, (420, 525))
        noise = rng.integers(60, 200, size=(side * 3 // 4 // 8, side // 8, 3), dtype=np.uint8)
        photo = Image.fromarray(noise).resize((side, side * 3 // 4), Image.BILINEAR)
        photo.paste(face, (int(rng.integers(0, side - 420)), int(rng.integers(0, side * 3 // 4 - 525))))
        photo.save(folder / f"photo_{i:05d}.jpg", quality=90)


def e2e_section(root: Path, tmp: Path, photos: int, utk_files: int) -> list[str]:
    _, held = utk_split(root)
    sets = {f"UTKFace held-out adults ({utk_files} files, 200 px)": link_files(held[:utk_files], tmp / "utk_e2e")}
    start = time.perf_counter()
    make_photos(tmp / "photos", photos)
    print(f"generated {photos} photos in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    sets[f"generated 1,600 x 1,200 px photos ({photos} files)"] = tmp / "photos"
    lines = ["\n### Photos in, labels out (decode + detect + align + network + CSV)\n",
             "Wall time of the whole command from outside, start-up included; the built-in model.", "", "```",
             "facemt predict DIR --out preds.csv [--engine E]",
             "torchrun --standalone --nproc-per-node 2 -m facemt predict DIR --out preds.csv [--engine E]  "
             "# + facemt merge-predictions --out preds.csv", "```", "",
             "| set | engine | processes | wall s | faces | faces/s | 2 vs 1 process |", "|---|---|---|---|---|---|---|"]
    for name, folder in sets.items():
        for engine in ("torch", "onnx"):
            rates = {}
            # "1x1": one process limited to one thread, what each of the two processes gets.
            for n, threads in (("1", None), ("1x1", "1"), ("2", None)):
                out = tmp / f"e2e_{n}_{engine}_{folder.name}.csv"
                args = ["predict", str(folder), "--out", str(out), "--engine", engine]
                env = {"OMP_NUM_THREADS": threads} if threads else None
                seconds, _ = sh(torchrun_cmd(2, *args) if n == "2" else facemt_cmd(*args), env)
                if n == "2":
                    merge_s, _ = sh(facemt_cmd("merge-predictions", "--out", str(out)))
                    seconds += merge_s
                faces = int((pd.read_csv(out)["status"] == "ok").sum())
                rates[n] = faces / seconds
                ratio = f"{rates['2'] / rates['1']:.2f}x ({rates['2'] / rates['1x1']:.2f}x vs 1 thread)" if n == "2" else ""
                label = "1 (1 thread)" if n == "1x1" else n
                lines.append(f"| {name} | {engine} | {label} | {seconds:.1f} | {faces} | {faces / seconds:.1f} | {ratio} |")
                print(lines[-1], file=sys.stderr)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder holding jaffe/ and utkface/ (read in place)")
    parser.add_argument("--only", default="ddp,resume,engines,int8,e2e")
    parser.add_argument("--photos", type=int, default=2000, help="generated 1,600 px photos (default %(default)s)")
    parser.add_argument("--utk-files", type=int, default=1000, help="held-out UTKFace files for e2e (default %(default)s)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    root = Path(args.data_root)
    only = set(args.only.split(","))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU"
    started = time.perf_counter()
    lines = [f"\n## Scaling: `python benchmarks/scaling.py --data-root {args.data_root} --only {args.only}` "
             f"(commit {commit}, {machine})"]
    train_utk, _ = utk_split(root)
    calibration = train_utk[-64:]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "ddp" in only:
            lines += ddp_section(root, tmp, ROOT / "benchmarks" / "ddp_loss_curves.png")
        if "resume" in only:
            lines += resume_section(root, tmp)
        if "engines" in only:
            lines += engines_section(calibration)
        if "int8" in only:
            lines += int8_section(root, calibration)
        if "e2e" in only:
            lines += e2e_section(root, tmp, args.photos, args.utk_files)
    lines += ["", f"Wall time of this run: {time.perf_counter() - started:.0f} s."]
    publish(lines, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
