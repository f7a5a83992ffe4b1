"""Measure a base model (the built-in one by default) on data it never trained on:
FER+ FER2013Test (six FACES expressions, majority vote), the UTKFace held-out
faces of benchmark C (age group, gender; per race, gender, age group and age group x gender), calibration
(ECE with and without the stored temperatures) and network speed.

    python benchmarks/base_model.py --data-root ../shared/data [--model base] [--tta] [--json out.json]

Prints Markdown (the tables of MODEL_CARD.md) and appends it to --results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import publish, utk_all_adults  # noqa: E402

from facemt.checkpoint import load_checkpoint, resolve_run  # noqa: E402
from facemt.data import ImageCache, encode_targets, index_ferplus, index_utkface  # noqa: E402
from facemt.engine import decode_images  # noqa: E402
from facemt.evaluation import head_metrics  # noqa: E402
from facemt.inference import own_prior, prior_weights, reweight  # noqa: E402
from facemt.losses import expected_calibration_error  # noqa: E402
from facemt.tasks import TASKS  # noqa: E402
from facemt.transforms import build_transform  # noqa: E402

RACES = ("white", "black", "asian", "indian", "others")


def logits_of(model, images, pre, tta: bool = False, batch_size: int = 64) -> list[dict[str, np.ndarray]]:
    """Logits per head for each view: the faces, and with ``tta`` also their mirror images."""
    transform = build_transform(pre, "none")
    views: list[dict[str, list]] = [{t: [] for t in model.tasks} for _ in range(2 if tta else 1)]
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(im) for im in images[start:start + batch_size]])
            for view, x in zip(views, (batch, batch.flip(-1))):
                for t, v in model(x).items():
                    view[t].append(v.float().numpy())
    return [{t: np.concatenate(v) for t, v in view.items()} for view in views]


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    e = np.exp((z - z.max(1, keepdims=True)) / temperature)
    return e / e.sum(1, keepdims=True)


def greyscale(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 face as greyscale (ITU-R 601 luma, PIL's "L"), still three channels as FER+ faces arrive."""
    luma = np.rint(image[..., :3] @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)
    return np.repeat(luma[..., None], 3, axis=2)


def probs_of(views: list[dict[str, np.ndarray]], head: str, temperature: float = 1.0,
             weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Probabilities averaged over the views, as ``facemt predict --tta`` does;
    ``weights`` (per head, :func:`facemt.inference.prior_weights`) move them to another prior."""
    p = np.mean([softmax(v[head], temperature) for v in views], axis=0)
    return reweight(p, weights[head]) if weights and head in weights else p


def speed(model, size: int, batch: int = 32, repeats: int = 10) -> float:
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--model", default="base")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    p.add_argument("--tta", action="store_true", help="average each face with its mirror image (facemt predict --tta)")
    args = p.parse_args(argv)
    root = Path(args.data_root)
    run = resolve_run(args.model)
    model, pre, config = load_checkpoint(run)
    cache = ImageCache()
    out: dict = {"model": str(run), "temperatures": dict(model.temperatures), "tta": args.tta}

    fer = index_ferplus(root / "ferplus" / "FER2013Test")
    z = logits_of(model, decode_images(fer, pre, cache, None), pre, args.tta)
    y = encode_targets(fer.table, ["expression"])["expression"]
    t = model.temperatures["expression"]
    m = head_metrics(y, probs_of(z, "expression", t), TASKS["expression"].classes)
    m["ece_uncalibrated"] = expected_calibration_error(y, probs_of(z, "expression"))
    m["framing"] = cache.framing_counts(fer.table)
    # The base predicts under a class-balanced prior (logit-adjusted loss); FER+ Test follows FER+ Train's
    # class frequencies (40 % neutral). The other prior (facemt predict --prior) shows what that choice costs.
    other = "training" if own_prior(config) == "balanced" else "balanced"
    weights = prior_weights(config, other)
    out["prior"], out["other_prior"] = own_prior(config), other
    m["other_prior"] = head_metrics(y, probs_of(z, "expression", t, weights), TASKS["expression"].classes)
    out["ferplus_test"] = m

    utk = index_utkface(root / "utkface")
    test = utk_all_adults(utk)[1]
    sub = type(utk)(utk.table.iloc[test].reset_index(drop=True), [])
    faces = decode_images(sub, pre, cache, None)
    logits = logits_of(model, faces, pre, args.tta)
    targets = encode_targets(sub.table, ["age_group", "gender"])
    age, gender = sub.table["age_group"].to_numpy(), sub.table["gender"].to_numpy()
    groups = {"race": (np.array([RACES[int(Path(p).name.split("_")[2])] for p in sub.table["path"]]), RACES),
              "gender": (gender, TASKS["gender"].classes), "age group": (age, TASKS["age_group"].classes),
              "age group, gender": (np.array([f"{a} {g}" for a, g in zip(age, gender)]),
                                    [f"{a} {g}" for a in TASKS["age_group"].classes for g in TASKS["gender"].classes])}
    out["utkface_heldout"] = {}
    for head in ("age_group", "gender"):
        probs = probs_of(logits, head, model.temperatures[head])
        hm = head_metrics(targets[head], probs, TASKS[head].classes)
        hm["ece_uncalibrated"] = expected_calibration_error(targets[head], probs_of(logits, head))
        pred = probs.argmax(1)
        hm["by_group"] = {f"{kind}: {g}": {"n": int((of == g).sum()),
                                            "accuracy": float((pred[of == g] == targets[head][of == g]).mean())}
                          for kind, (of, names) in groups.items() for g in names if (of == g).any()}
        hm["other_prior"] = head_metrics(targets[head], probs_of(logits, head, model.temperatures[head], weights),
                                         TASKS[head].classes)
        out["utkface_heldout"][head] = hm
    # Colour against greyscale: the same held-out faces with their colour removed (FER+ and JAFFE are greyscale).
    grey = logits_of(model, [greyscale(f) for f in faces], pre, args.tta)
    out["utkface_greyscale"] = {head: head_metrics(targets[head], probs_of(grey, head, model.temperatures[head]),
                                                   TASKS[head].classes) for head in ("age_group", "gender")}
    colour_expr = probs_of(logits, "expression", t).argmax(1)
    grey_expr = probs_of(grey, "expression", t).argmax(1)
    out["utkface_greyscale"]["expression_agreement"] = float((colour_expr == grey_expr).mean())
    torch.set_num_threads(2)
    out["faces_per_second_batch32"] = speed(model, pre.image_size)
    out["image_size"] = pre.image_size

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    f = out["ferplus_test"]
    lines = [f"\n### Base model `{Path(run).name}` on held-out data{' with flip TTA' if args.tta else ''}, "
             f"at commit {commit}\n", "```",
             "python benchmarks/base_model.py " + " ".join(argv if argv is not None else sys.argv[1:]), "```", "",
             f"FER+ FER2013Test, six FACES expressions (majority vote), {f['n']} faces: accuracy "
             f"**{100 * f['accuracy']:.1f} %**, balanced accuracy {100 * f['balanced_accuracy']:.1f} %, "
             f"macro-F1 {100 * f['macro_f1']:.1f} %, ECE {f['ece_uncalibrated']:.3f} uncalibrated / "
             f"{f['ece']:.3f} with temperature {t:.2f}.", "",
             "| class | recall % | precision % | test faces |", "|---|---|---|---|"]
    for c, pc in f["per_class"].items():
        lines.append(f"| {c} | {100 * pc['recall']:.1f} | {100 * pc['precision']:.1f} | {pc['support']} |")
    lines += ["", "Confusion (rows true, columns predicted; " + ", ".join(f["classes"]) + "):", "", "```"]
    lines += [f"{c[:10]:>10} " + " ".join(f"{v:5d}" for v in row) for c, row in zip(f["classes"], f["confusion"])]
    lines += ["```", ""]
    w = f["other_prior"]
    lines += [f"Under the {other} prior (`--prior {other}`): accuracy "
              f"{100 * w['accuracy']:.1f} %, balanced {100 * w['balanced_accuracy']:.1f} %, recall "
              + ", ".join(f"{c} {100 * pc['recall']:.0f} %" for c, pc in w["per_class"].items()) + ".", ""]
    for head, hm in out["utkface_heldout"].items():
        w = hm["other_prior"]
        lines.append(f"UTKFace held-out (benchmark C's test faces), {head}, {hm['n']} faces: accuracy "
                     f"**{100 * hm['accuracy']:.1f} %**, balanced {100 * hm['balanced_accuracy']:.1f} %, ECE "
                     f"{hm['ece_uncalibrated']:.3f} uncalibrated / {hm['ece']:.3f} with temperature "
                     f"{model.temperatures[head]:.2f}; under the {other} prior {100 * w['accuracy']:.1f} % "
                     f"(balanced {100 * w['balanced_accuracy']:.1f} %).")
    g = out["utkface_greyscale"]
    lines += ["", f"The same UTKFace held-out faces in greyscale: age group {100 * g['age_group']['accuracy']:.1f} %, "
              f"gender {100 * g['gender']['accuracy']:.1f} %; the expression answer is the same in colour and in "
              f"greyscale for {100 * g['expression_agreement']:.1f} % of them."]
    lines += ["", "| group | faces | age group % | gender % |", "|---|---|---|---|"]
    ag, ge = out["utkface_heldout"]["age_group"], out["utkface_heldout"]["gender"]
    for g, row in ag["by_group"].items():
        lines.append(f"| {g} | {row['n']} | {100 * row['accuracy']:.1f} | {100 * ge['by_group'][g]['accuracy']:.1f} |")
    lines += ["", f"Network speed: {out['faces_per_second_batch32']:.0f} faces/s at batch 32, "
              f"{pre.image_size} px, 2 CPU threads (median of 10 after 3 warm-up batches; no decoding or detection)."]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    publish(lines, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
