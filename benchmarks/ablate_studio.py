"""What makes the base model see studio portraits right: one recipe change at a time, at reduced scale,
each measured zero-shot by the studio benchmark (issue 23, step 3).

    python benchmarks/ablate_studio.py --data-root ../shared/data --init-from runs/base_v1_shipped \
        [--only reference,no-studio,...] [--out runs/ablate] [--results benchmarks/RESULTS.md]

Every variant continues the same starting model (``--init-from``, the web-photo base) for ``--epochs``
epochs on ``--limit`` training faces drawn from FER2013Train (``--fer-limit`` of it), UTKFace's training
adults and the studio sets' training persons, with ``benchmarks/pretrain.py``; the reference recipe is base
v2's (studio persons, sources balanced, backbone at 0.3x, class-balanced prior, aligned 112 px colour
faces) and each other variant changes exactly one thing. Then ``benchmarks/studio.py`` scores it on the
studio test persons, JAFFE and the UTKFace held-out faces. One seed per variant: differences of a few
points on a few dozen faces are noise (counts are given). A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy import publish  # noqa: E402

REFERENCE = ["--studio", "--balance-sources", "--backbone-lr-scale", "0.3"]
#: variant -> (what changes, pretrain.py arguments)
VARIANTS = {
    "reference": ("base v2's recipe", REFERENCE),
    "reference-seed1": ("base v2's recipe, another training seed: how far two identical recipes differ",
                        REFERENCE + ["--seed", "1"]),
    "no-studio": ("no studio faces in training", ["--balance-sources", "--backbone-lr-scale", "0.3"]),
    "unbalanced": ("sources in their natural proportions (no --balance-sources)",
                   ["--studio", "--backbone-lr-scale", "0.3"]),
    "training-prior": ("plain cross-entropy (predictions follow training frequencies)", REFERENCE + ["--prior", "training"]),
    "grey": ("greyscale training faces", REFERENCE + ["--grey"]),
    "box": ("detector box + 40 % margin (hair in) instead of aligned faces", REFERENCE + ["--crop", "box"]),
    "144px": ("144 px input instead of 112", REFERENCE + ["--image-size", "144"]),
    "aux-age": ("an auxiliary age-in-years head (5-year bins of UTKFace's exact ages, loss weight 0.5), removed "
                "after training", REFERENCE + ["--aux-age-weight", "0.5"]),
    "aux-age-1": ("the same with loss weight 1", REFERENCE + ["--aux-age-weight", "1"]),
}
#: (column, set, head, group) read from studio.py's rows
COLUMNS = [
    ("CFD women", "cfd (test persons)", "gender", "female recall"),
    ("CFD men", "cfd (test persons)", "gender", "male recall"),
    ("NimStim women", "nimstim (test persons)", "gender", "female recall"),
    ("RaFD women", "rafd (test persons)", "gender", "female recall"),
    ("CK+ women", "ckplus48 (test persons)", "gender", "female recall"),
    ("NimStim young", "nimstim (test persons)", "age_group", "young recall"),
    ("NimStim anger", "nimstim (test persons)", "expression", "anger recall"),
    ("RaFD fear", "rafd (test persons)", "expression", "fear recall"),
    ("CK+ fear", "ckplus48 (test persons)", "expression", "fear recall"),
    ("CK+ expression", "ckplus48 (test persons)", "expression", "all"),
    ("JAFFE expression", "jaffe (all)", "expression", "all"),
    ("UTK age", "utkface (held-out)", "age_group", "all"),
    ("UTK old", "utkface (held-out)", "age_group", "old recall"),
    ("UTK gender", "utkface (held-out)", "gender", "all"),
]


def run(args: list[str], log: Path) -> None:
    with log.open("a") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=HERE.parent)


def cell(rows: list[dict], set_: str, head: str, group: str) -> str:
    for r in rows:
        if r["set"] == set_ and r["head"] == head and r["group"] == group:
            return f"{100 * r['accuracy']:.0f} ({r['n']})"
    return "-"


def worst_cfd_group(rows: list[dict]) -> str:
    groups = [r for r in rows if r["set"].startswith("cfd") and r["head"] == "gender" and " x " in r["group"]]
    if not groups:
        return "-"
    r = min(groups, key=lambda r: r["accuracy"])
    return f"{100 * r['accuracy']:.0f} ({r['group']}, {r['n']})"


def table(results: dict[str, list[dict]]) -> list[str]:
    head = ["variant", *[c[0] for c in COLUMNS], "CFD worst gender x ethnicity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in results.items():
        lines.append("| " + " | ".join([name, *[cell(rows, *c[1:]) for c in COLUMNS], worst_cfd_group(rows)]) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--init-from", required=True, help="the starting model of every variant")
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants (default: all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=4000)
    p.add_argument("--fer-limit", type=int, default=4000)
    p.add_argument("--out", type=Path, default=Path("runs/ablate"))
    p.add_argument("--results", type=Path, help="append the table here (default: print it)")
    args = p.parse_args(argv)
    names = args.only.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "ablate.log"
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for name in names:
        run_dir, scores = args.out / name, args.out / f"{name}.json"
        if not scores.is_file():  # rerunning the script resumes where it stopped
            run([sys.executable, str(HERE / "pretrain.py"), "--data-root", args.data_root, "--init-from",
                 args.init_from, "--epochs", str(args.epochs), "--limit", str(args.limit), "--fer-limit",
                 str(args.fer_limit), "--out", str(run_dir), *VARIANTS[name][1]], log)
            run([sys.executable, str(HERE / "studio.py"), "--data-root", args.data_root, "--model", str(run_dir),
                 "--json", str(scores)], log)
        results[name] = json.loads(scores.read_text())
        print("\n".join(table({name: results[name]})[2:]), flush=True)
    lines = ["\n## Studio ablations: one recipe change at a time (reduced scale)\n", "```",
             f"python benchmarks/ablate_studio.py {' '.join(argv)}", "```", "",
             f"Each variant: `--init-from {args.init_from}`, {args.epochs} epochs on {args.limit} faces "
             f"(FER2013Train limited to {args.fer_limit} before the draw); recall or accuracy % (n faces) on the "
             f"studio test persons, JAFFE and the UTKFace held-out faces. Wall time of this invocation (variants "
             f"finished by an earlier one are read back from {args.out}): {time.perf_counter() - started:.0f} s.", "",
             *[f"- `{n}`: {VARIANTS[n][0]} (`{' '.join(VARIANTS[n][1])}`)" for n in names], "", *table(results)]
    if args.results:
        publish(lines, str(args.results))
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
