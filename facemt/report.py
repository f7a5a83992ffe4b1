"""Cross-validation reports: report.md, results.json / results.csv, history.csv and PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from facemt.config import BASE_NAME  # noqa: E402
from facemt.files import atomic_write, atomic_write_text  # noqa: E402
from facemt.evaluation import BASELINE, CVResult  # noqa: E402
from facemt.tasks import TASKS  # noqa: E402


def percent_text(mean: float | None, std: float | None = None) -> str:
    """``81.2 ± 3.4`` from fractions (``-`` for a missing mean; no ``±`` part without a std)."""
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "-"
    return f"{100 * mean:.1f}" + ("" if std is None or np.isnan(std) else f" ± {100 * std:.1f}")


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_learning_curves(histories: pd.DataFrame, protocol: str, path: Path) -> None:
    """Per head: loss and accuracy per epoch, train vs test fold, mean over folds x seeds."""
    h = histories[histories["protocol"] == protocol]
    heads = [t for t in TASKS if f"train_{t}_acc" in h.columns and h[f"train_{t}_acc"].notna().any()]
    fig, axes = plt.subplots(len(heads), 2, figsize=(10, 2.8 * len(heads)), squeeze=False)
    for r, head in enumerate(heads):
        for c, metric in enumerate(("loss", "acc")):
            ax = axes[r][c]
            for model, style in (("multitask", "-"), (f"single:{head}", "--")):
                m = h[h["model"] == model]
                if m.empty:
                    continue
                for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
                    col = f"{split}_{head}_{metric}"
                    if col not in m or m[col].isna().all():
                        continue
                    g = m.groupby("epoch")[col]
                    mean, std = g.mean(), g.std().fillna(0)
                    name = "test fold" if split == "val" else "train"
                    ax.plot(mean.index, mean.values, style, color=color, label=f"{model.split(':')[0]} {name}")
                    ax.fill_between(mean.index, mean - std, mean + std, color=color, alpha=0.12)
            ax.set_title(f"{head} {'accuracy' if metric == 'acc' else 'loss'}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if r == 0 and c == 1:
                ax.legend(fontsize=8)
    fig.suptitle(f"Learning curves ({protocol} split; mean ± std over folds x seeds)")
    fig.tight_layout()
    _save(fig, path)


def plot_confusions(result: CVResult, protocol: str, path: Path) -> None:
    """Summed confusion matrices (row-normalised) per model and head."""
    keys = [k for k in result.confusion if k[0] == protocol]
    models = sorted({k[1] for k in keys}, key=lambda m: m != "multitask")
    heads = [t for t in TASKS if any(k[2] == t for k in keys)]
    fig, axes = plt.subplots(len(models), len(heads), figsize=(3.6 * len(heads), 3.4 * len(models)), squeeze=False)
    for r, model in enumerate(models):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            cm = result.confusion.get((protocol, model, head))
            ax.set_axis_off() if cm is None else None
            if cm is None:
                continue
            norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
            ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
            classes = TASKS[head].classes
            ax.set_xticks(range(len(classes)), [c[:4] for c in classes], rotation=45, fontsize=8)
            ax.set_yticks(range(len(classes)), [c[:4] for c in classes], fontsize=8)
            for i in range(len(classes)):
                for j in range(len(classes)):
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
            ax.set_title(f"{model}: {head}", fontsize=9)
            ax.set_xlabel("predicted", fontsize=8)
            ax.set_ylabel("true", fontsize=8)
    fig.suptitle(f"Confusion matrices ({protocol} split, summed over folds x seeds)")
    fig.tight_layout()
    _save(fig, path)


#: legend names of the bars of :func:`plot_comparison`
LEGEND = {"multitask": "multi-task", "fit": "what fit writes", "single": "single-task", "zero_shot": "not fine-tuned"}


def plot_comparison(summary: pd.DataFrame, path: Path) -> None:
    """Bar chart per head: multi-task vs what fit writes vs single-task vs not
    fine-tuned vs majority class, with std error bars."""
    protocols = list(dict.fromkeys(summary["protocol"]))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.5 * len(protocols), 3.8), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        s = summary[summary["protocol"] == protocol]
        x = np.arange(len(s))
        bars = [(name, color) for name, color in (("multitask", "tab:blue"), ("fit", "tab:orange"),
                                                   ("single", "tab:green"), ("zero_shot", "tab:gray"))
                if f"{name}_mean" in s and s[f"{name}_mean"].notna().any()]
        width = 0.8 / len(bars)
        for i, (name, color) in enumerate(bars):
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, 100 * s[f"{name}_mean"], width,
                   yerr=100 * s[f"{name}_std"].fillna(0), capsize=4, color=color, label=LEGEND[name])
        ax.scatter(x, 100 * s["majority_mean"], marker="_", s=900, color="black", label="majority class", zorder=3)
        ax.set_xticks(x, s["head"])
        ax.set_ylim(0, 125)
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{protocol} split")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    _save(fig, path)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def interval_text(row: pd.Series, name: str) -> str:
    """``+1.2 [-0.4, +2.8]`` from a summary row's ``{name}_mean`` / ``_ci_low`` / ``_ci_high`` (points)."""
    mean, low, high = row.get(f"{name}_mean"), row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    if mean is None or pd.isna(mean):
        return "-"
    return f"{100 * mean:+.1f}" + ("" if low is None or pd.isna(low) else f" [{100 * low:+.1f}, {100 * high:+.1f}]")


def _start(cfg: dict) -> str:
    """Where the trained models' weights started."""
    train = cfg["train"]
    if cfg.get("zero_shot") == BASE_NAME:
        return "the built-in base model"
    if cfg.get("zero_shot"):
        return f"the facemt model `{cfg['zero_shot']}`"
    if train.get("pretrained_file"):
        return f"`{train['pretrained_file']}`"
    return "the timm hub's pretrained weights" if train.get("pretrained") else "random"


def _size_text(cfg: dict) -> str:
    size = cfg.get("image_size") or cfg["train"]["image_size"]  # reports before the resolved size: as given
    if size is None:
        return "image size of the initial model"
    return f"{size} px faces" + (" (the initial model's)" if cfg["train"]["image_size"] is None else "")


def render_markdown(result: CVResult, title: str = "facemt cross-validation report") -> str:
    """The human-readable report (tables, warnings, links to the plots)."""
    summary = result.summary()
    cfg = result.config
    ds = cfg["dataset"]
    train = cfg["train"]
    out = [f"# {title}", ""]
    for w in result.warnings:
        out += [f"> **Warning:** {w}", ""]
    out += [
        f"Data: {ds['images']} images, {ds['persons']} persons. Backbone `{train['backbone']}`, "
        f"{train['epochs']} epochs, {_size_text(cfg)}, augmentation `{train['augment']}`, "
        f"lr {train['lr']}, initial weights: {_start(cfg)}.",
        f"Protocol: split `{cfg['split']}`, "
        + (f"test size {cfg['test_size']}" if cfg["test_size"] else _folds_text(cfg))
        + f", {cfg['seeds']} seed(s); every model trains a fixed number of epochs (the test fold never picks one"
        + ("; *what fit writes* picks its epochs on its own validation persons, as `facemt fit` does" if "fit_folds" in cfg
           else "") + "). " + _decoded_text(cfg),
        "",
        "## Test accuracy per head (%, mean ± std over folds x seeds)",
        "",
    ]
    has_single = "single_mean" in summary
    has_zero = "zero_shot_mean" in summary
    has_fit = "fit_mean" in summary
    header = (["split", "head", "multi-task"] + (["single-task", "multi − single (95% CI)"] if has_single else [])
              + (["not fine-tuned", "multi − not fine-tuned (95% CI)"] if has_zero else [])
              + (["what fit writes"] + (["fit − not fine-tuned (95% CI)"] if has_zero else []) if has_fit else [])
              + ["majority class"])
    if "identity_leak_gap" in summary:
        header.append("identity-leak gap (random − subject)")
    rows = []
    for _, r in summary.iterrows():
        row = [r["protocol"], r["head"], percent_text(r["multitask_mean"], r["multitask_std"])]
        if has_single:
            row += [percent_text(r.get("single_mean"), r.get("single_std")), interval_text(r, "diff")]
        if has_zero:
            row += [percent_text(r.get("zero_shot_mean"), r.get("zero_shot_std")), interval_text(r, "gain")]
        if has_fit:
            row += [percent_text(r.get("fit_mean"), r.get("fit_std"))] + ([interval_text(r, "fit_gain")] if has_zero else [])
        row.append(percent_text(r["majority_mean"]))
        if "identity_leak_gap" in summary:
            row.append("-" if pd.isna(r["identity_leak_gap"]) else f"{100 * r['identity_leak_gap']:+.1f}")
        rows.append(row)
    out += [_markdown_table(header, rows), ""]
    out += [
        "How to read it: *multi-task* is one network with all heads; *single-task* is one network per head, "
        "trained on the same folds with the same seeds, epochs, augmentation and backbone. The difference is "
        "paired per fold and seed; its interval is a 95% t-interval over those pairs, so an interval that "
        "contains 0 means no difference was shown. *" + BASELINE[0].upper() + BASELINE[1:] + ". With few persons "
        "every number is uncertain by many points.",
        "",
    ]
    if has_zero:
        out += [f"*Not fine-tuned* is the model training started from ({_start(cfg)}), scored untouched on "
                "the same test folds: what `facemt predict` gives out of the box. Fine-tuning on these images "
                "helped a head where *multi − not fine-tuned* is above zero with its whole interval. In the "
                "*multi-task* column every head is the fine-tuned one.", ""]
    if has_fit:
        out += _fit_section(cfg)
    if "person_relative_mean" in summary:
        out += _relative_section(summary)
    if "per_person_mean" in summary:
        out += _per_person_section(summary)
    out += [
        "## Other metrics (multi-task, mean over folds x seeds)",
        "",
    ]
    rec = result.records
    mt = rec[rec["model"] == "multitask"].groupby(["protocol", "head"], sort=False)[
        ["balanced_accuracy", "macro_f1", "ece"]].mean().reset_index()
    out += [_markdown_table(["split", "head", "balanced accuracy", "macro-F1", "ECE"],
                            [[r.protocol, r.head, percent_text(r.balanced_accuracy), percent_text(r.macro_f1), f"{r.ece:.3f}"]
                             for r in mt.itertuples()]), "",
            "Macro-F1 averages over the classes present in each test fold's labels; balanced accuracy is the "
            "mean recall over those classes.", ""]
    out += ["## Plots", "", "![test accuracy per head and model](comparison.png)", ""]
    for protocol in dict.fromkeys(summary["protocol"]):
        out += [f"![learning curves, {protocol}](learning_curves_{protocol}.png)", "",
                f"![confusion matrices, {protocol}](confusion_{protocol}.png)", ""]
    if result.class_maps:
        out += ["## Where each head looks", "",
                f"Class-average maps ({result.class_maps['method']}): for every test face of every fold, the "
                "multi-task model's evidence for the face's true class, per head, averaged per class over the "
                "aligned faces (every face is aligned to one frame, so the maps add up pixel by pixel), drawn on "
                "the mean test face. Arrays: `class_maps.npz` (`TASK/CLASS` and `TASK/CLASS/count`).", "",
                "![class-average maps](class_maps.png)", ""]
    out += ["Every fold, seed, model and head: `results.csv` / `results.json`; per-epoch curves: `history.csv`.", ""]
    return "\n".join(out)


def _fit_section(cfg: dict) -> list[str]:
    """What `facemt fit` chose on the folds: epochs, heads answered by the start model, the person-relative step."""
    folds = pd.DataFrame(cfg["fit_folds"])
    unlabelled = sorted({h for k in folds["answered_by_start"] for h in k if h not in cfg["tasks"]})
    skipped = folds["never_worse_skipped"].dropna().unique()
    groups = cfg.get("train", {}).get("validation_groups", 1)
    where = (f"{groups} disjoint groups of validation persons together (--validation-groups {groups}: it trains once "
             "more per extra group)" if groups > 1 else "those validation persons")
    rows = []
    for protocol, g in folds.groupby("protocol", sort=False):
        kept = pd.Series([h for k in g["answered_by_start"] for h in k if h in cfg["tasks"]]).value_counts()
        steps = g["person_relative"].fillna("the head").value_counts() if "expression" in cfg["tasks"] else {}
        rule = ", ".join(f"{h} {n}" for h, n in kept.items()) or "none"
        if len(skipped):
            rule = f"rule skipped in {int(g['never_worse_skipped'].notna().sum())} folds" + (f"; {rule}" if kept.any() else "")
        rows.append([protocol, str(len(g)), f"{g['best_epoch'].mean():.1f}", rule,
                     ", ".join(f"{v} {n}" for v, n in steps.items()) or "-"])
    return ["*What fit writes* is `facemt fit` itself run on each fold's training persons, with the settings above: it "
            "holds out its own validation persons among them to pick the epoch"
            + (" and refits on all of them" if folds["refit"].any() else "") + ", answers a head with the starting "
            f"model where fine-tuning does not beat it on {where} (never worse than the start), and "
            "reads expression against each test person's other pictures where that beat the head there. This is "
            "the model a user of `facemt fit` gets from these images. What fit chose, per split (counts of folds):",
            "", _markdown_table(["split", "folds", "mean epoch chosen", "heads answered by the starting model",
                                 "expression read by"], rows), ""] + (
        ["Heads these images cannot train (no labels, or labels of one class: " + ", ".join(unlabelled) + ") are "
         "answered by the starting model in the model fit writes; cv scores the heads it trains.", ""]
        if unlabelled else []) + (
        ["The never-worse rule could not apply: " + "; ".join(skipped) + " (Training: never worse than the start).", ""]
        if len(skipped) else [])


def _relative_section(summary: pd.DataFrame) -> list[str]:
    """The person-relative expression classifier beside the multi-task head, per split."""
    rows = [[r["protocol"], percent_text(r["person_relative_mean"], r["person_relative_std"]),
             percent_text(r["multitask_mean"], r["multitask_std"]), interval_text(r, "relative_gain")]
            for _, r in summary.iterrows() if pd.notna(r.get("person_relative_mean"))]
    return ["## Expression read per person", "",
            _markdown_table(["split", "person-relative", "multi-task head", "person-relative − head (95% CI)"], rows),
            "", "*Person-relative* reads each test face's expression against the same person's other test pictures "
            "(persons with 3 or more), with a classifier (`centred`) fitted on the fold's training persons through the "
            "multi-task model's trunk (`facemt fit --person-relative`); faces of persons with fewer pictures get "
            "the head's answer. It helps where every person shows several expressions "
            "(FACES, JAFFE) and can hurt where a person shows one or two. `facemt fit` also tries two readings "
            "for those and keeps one only when it beats the head on fit's validation persons.", ""]


def _per_person_section(summary: pd.DataFrame) -> list[str]:
    """Age group and gender read once per test person, beside each picture alone (and the untouched model's)."""
    zero = "zero_shot_per_person_mean" in summary
    fitted = "fit_per_person_mean" in summary
    header = ["split", "head", "each picture alone", "per person", "per person − each picture (95% CI)"]
    header += ["not fine-tuned, per person", "per person: fine-tuned − not (95% CI)"] if zero else []
    header += ["what fit writes, per person"] + (["per person: fit − not fine-tuned (95% CI)"] if zero else []) \
        if fitted else []
    rows = []
    for _, r in summary.iterrows():
        if pd.isna(r.get("per_person_mean")):
            continue
        row = [r["protocol"], r["head"], percent_text(r["multitask_mean"], r["multitask_std"]),
               percent_text(r["per_person_mean"], r["per_person_std"]), interval_text(r, "per_person_gain")]
        if zero:
            row += [percent_text(r.get("zero_shot_per_person_mean"), r.get("zero_shot_per_person_std")),
                    interval_text(r, "per_person_zero_gain")]
        if fitted:
            row += [percent_text(r.get("fit_per_person_mean"), r.get("fit_per_person_std"))]
            row += [interval_text(r, "fit_per_person_gain")] if zero else []
        rows.append(row)
    return ["## Age group and gender read per person", "", _markdown_table(header, rows), "",
            "A person's age group and gender do not change across their pictures. *Per person* gives every test "
            "picture of a person the one answer of all that person's test pictures (the mean of their "
            "log-probabilities), as `facemt evaluate` and `facemt predict --person-from` do; the multi-task "
            "table above reads each picture alone (the network's own accuracy).", ""]


def _folds_text(cfg: dict) -> str:
    """The folds that ran per protocol (fewer than asked when persons ran out)."""
    run = cfg.get("folds_run") or {cfg["split"]: cfg["folds"]}
    text = ", ".join(f"{n} {protocol} folds" for protocol, n in run.items())
    return text + (f" ({cfg['folds']} asked)" if any(n != cfg["folds"] for n in run.values()) else "")


def _decoded_text(cfg: dict) -> str:
    images, decoded, framings = cfg["dataset"]["images"], cfg["images_decoded"], cfg.get("framings", 1)
    how = (f"{images} images, each once per framing ({framings} framings: the models' and the not fine-tuned "
           "model's)") if framings > 1 else f"{images} images, each once"
    return f"Images decoded: {decoded} ({how}; shared by all folds and models)."


def write_report(result: CVResult, out_dir: str | os.PathLike, title: str = "facemt cross-validation report") -> Path:
    """Write report.md, results.json, results.csv, history.csv and the PNG plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    atomic_write_text(out / "results.json", json.dumps(result.to_json(), indent=2) + "\n")
    atomic_write_text(out / "results.csv", result.records.to_csv(index=False))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(out / "history.csv", result.histories.to_csv(index=False))
    plot_comparison(summary, out / "comparison.png")
    for protocol in dict.fromkeys(summary["protocol"]):
        plot_learning_curves(result.histories, protocol, out / f"learning_curves_{protocol}.png")
        plot_confusions(result, protocol, out / f"confusion_{protocol}.png")
    if result.class_maps:
        from facemt.explain import plot_class_maps, save_class_maps

        maps = result.class_maps
        atomic_write(out / "class_maps.png", lambda tmp: plot_class_maps(
            maps["heads"], tmp, maps["mean_face"], f"where each head finds its evidence ({maps['method']}; test "
            "faces of every fold, true class)"), )
        atomic_write(out / "class_maps.npz", lambda tmp: save_class_maps(maps["heads"], tmp))
    atomic_write_text(out / "report.md", render_markdown(result, title))
    return out
