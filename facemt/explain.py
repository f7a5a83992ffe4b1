"""Where each head looks: per-head attribution maps over the aligned face, and class-average maps.

Every face is aligned to one canonical frame (eyes at fixed points), so the maps
of different faces can be averaged pixel by pixel: a class-average map per head
shows where that head finds evidence for a class across a data set. The
attribution arithmetic is captum's (Grad-CAM on a trunk stage, or integrated
gradients); which method and stage are the default was chosen by measurement
(``benchmarks/explain.py``: model-randomisation and deletion checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from facemt.errors import FacemtError
from facemt.tasks import TASKS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from facemt.model import MultiTaskNet

#: Side of every map, in the aligned frame (the network input scaled down): small enough for JSON.
MAP_SIDE = 28
#: ``gradcam-N``: Grad-CAM on the trunk stage with output stride N; ``integrated-gradients``: per pixel.
METHODS = ("gradcam-8", "gradcam-16", "gradcam-32", "integrated-gradients")
DEFAULT_METHOD = "gradcam-16"
IG_STEPS = 16


@dataclass
class Explanation:
    """One face's labels and, per head, where the evidence for a class lies.

    Attributes:
        source: the file path, or None for in-memory images.
        labels: task -> predicted class name; probabilities: task -> {class: p}.
        targets: task -> the class each map explains (the predicted one unless chosen).
        maps: task -> MAP_SIDE x MAP_SIDE float32 in [0, 1] over the network's input (the aligned
            face): 1 where the evidence for the target class is strongest.
        face_image: the network's input as HxWx3 uint8 (what the maps lie on).
        to_photo: 2x3 affine matrix taking map pixel coordinates (column, row) to the photo's pixels.
        face, box, framing: as in :class:`facemt.inference.Prediction`.
    """

    source: str | None
    labels: dict[str, str]
    probabilities: dict[str, dict[str, float]]
    targets: dict[str, str]
    maps: dict[str, np.ndarray] = field(repr=False)
    face_image: np.ndarray = field(repr=False)
    to_photo: np.ndarray = field(repr=False)
    face: int | None = None
    box: tuple[int, int, int, int] | None = None
    framing: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per head label, probability, target class and the map as nested lists."""
        return {
            "path": self.source, "face": self.face, "box": list(self.box) if self.box else None,
            "framing": self.framing, "map_side": MAP_SIDE, "to_photo": np.round(self.to_photo, 4).tolist(),
            **{t: {"label": self.labels[t], "probability": self.probabilities[t][self.labels[t]],
                   "target": self.targets[t], "target_probability": self.probabilities[t][self.targets[t]],
                   "map": np.round(self.maps[t], 3).tolist()} for t in self.maps},
        }


def parse_targets(texts: Sequence[str] | None, tasks: Sequence[str]) -> dict[str, int]:
    """``["expression=anger", ...]`` -> {task: class index}.

    Raises:
        FacemtError: not TASK=CLASS, a head the model lacks, or an unknown class.
    """
    out = {}
    for text in texts or ():
        task, sep, name = text.partition("=")
        if not sep or task not in TASKS:
            raise FacemtError(f"--target {text}: write TASK=CLASS, e.g. expression=anger")
        if task not in tasks:
            raise FacemtError(f"--target {text}: the model has no {task} head (it has {', '.join(tasks)})")
        out[task] = TASKS[task].index(name)
    return out


def check_method(method: str) -> str:
    if method not in METHODS:
        raise FacemtError(f"unknown explanation method {method!r}: choose {', '.join(METHODS)}")
    return method


def stage_layer(model: "MultiTaskNet", reduction: int) -> "nn.Module":
    """The deepest trunk stage whose output stride is ``reduction`` (timm's ``feature_info``)."""
    info = getattr(model.trunk, "feature_info", None)
    stages = [f for f in (info or []) if f["reduction"] == reduction]
    if not stages:
        have = sorted({f["reduction"] for f in info or []})
        raise FacemtError(f"the backbone has no stage of stride {reduction} (it has {have or 'no feature_info'})")
    return model.trunk.get_submodule(stages[-1]["module"])


def head_maps(model: "MultiTaskNet", batch: "torch.Tensor", targets: Mapping[str, Sequence[int]],
              method: str = DEFAULT_METHOD) -> dict[str, np.ndarray]:
    """Per head, N x MAP_SIDE x MAP_SIDE maps of the evidence for ``targets[head]`` (one class per face),
    each scaled to a maximum of 1 (all zeros where nothing speaks for the class).

    Args:
        model: the PyTorch network (in eval mode).
        batch: N x 3 x S x S network inputs.
        targets: per head, N class indices.
        method: one of :data:`METHODS`.
    """
    import torch
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
    from torch.nn import functional as F

    check_method(method)
    model.eval()
    out = {}
    for task, classes in targets.items():
        net = model.network_of(task)  # a head the start model answers is explained on that model's trunk

        def logits(x: torch.Tensor, task: str = task, net: "MultiTaskNet" = net) -> torch.Tensor:
            return net(x)[task]

        target = torch.as_tensor(list(classes), dtype=torch.long, device=batch.device)
        if method.startswith("gradcam"):
            cam = LayerGradCam(logits, stage_layer(net, int(method.split("-")[1])))
            attr = cam.attribute(batch, target=target, relu_attributions=True)
            attr = LayerAttribution.interpolate(attr, (MAP_SIDE, MAP_SIDE), interpolate_mode="bilinear")
        else:
            ig = IntegratedGradients(logits)
            attr = ig.attribute(batch, baselines=torch.zeros_like(batch), target=target, n_steps=IG_STEPS,
                                internal_batch_size=max(1, len(batch)) * 4)
            attr = F.adaptive_avg_pool2d(attr.abs().sum(1, keepdim=True), MAP_SIDE)
        maps = attr[:, 0].detach().clamp(min=0).cpu().numpy().astype(np.float32)
        peak = maps.reshape(len(maps), -1).max(1)
        out[task] = np.where(peak[:, None, None] > 0, maps / np.maximum(peak, 1e-12)[:, None, None], 0.0)
    return out


def class_average_maps(maps: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]
                       ) -> dict[str, dict[str, Any]]:
    """Per head and true class: the mean map over faces of that class and their count.

    Args:
        maps: per head, N x MAP_SIDE x MAP_SIDE maps (each face's evidence for its true class).
        labels: per head, N class indices (-1: unlabelled, left out).
    """
    out: dict[str, dict[str, Any]] = {}
    for task, m in maps.items():
        y = np.asarray(labels[task])
        out[task] = {}
        for k, name in enumerate(TASKS[task].classes):
            rows = m[y == k]
            out[task][name] = {"count": int(len(rows)),
                               "map": rows.mean(0) if len(rows) else np.zeros((MAP_SIDE, MAP_SIDE), np.float32)}
    return out


def map_to_input(input_size: int) -> np.ndarray:
    """3x3 affine from map pixel coordinates to network-input pixel coordinates (pixel centres kept)."""
    s = input_size / MAP_SIDE
    return np.array([[s, 0, 0.5 * s - 0.5], [0, s, 0.5 * s - 0.5], [0, 0, 1]])


def plot_explanation(e: Explanation, path: str, title: str | None = None) -> None:
    """One PNG: the aligned face, then one heat map per head over it, titled with label and probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(e.maps)
    fig, axes = plt.subplots(1, len(heads) + 1, figsize=(2.6 * (len(heads) + 1), 3.0))
    axes[0].imshow(e.face_image)
    axes[0].set_title("aligned face" if e.framing == "aligned" else f"face ({e.framing})", fontsize=9)
    side = e.face_image.shape[0]
    for ax, t in zip(axes[1:], heads):
        ax.imshow(e.face_image)
        ax.imshow(e.maps[t], cmap="jet", alpha=0.45, extent=(-0.5, side - 0.5, side - 0.5, -0.5),
                  interpolation="bilinear", vmin=0, vmax=1)
        label = f"{t}: {e.labels[t]} ({e.probabilities[t][e.labels[t]]:.2f})"
        if e.targets[t] != e.labels[t]:
            label += f"\nevidence for {e.targets[t]} ({e.probabilities[t][e.targets[t]]:.2f})"
        ax.set_title(label, fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plot_class_maps(averages: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str,
                    background: np.ndarray | None = None, title: str = "") -> None:
    """Rows = heads, columns = classes: each class-average map with its face count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(averages)
    cols = max(len(TASKS[t].classes) for t in heads)
    fig, axes = plt.subplots(len(heads), cols, figsize=(1.9 * cols, 2.1 * len(heads)), squeeze=False)
    for r, t in enumerate(heads):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(TASKS[t].classes):
                continue
            name = TASKS[t].classes[c]
            cell = averages[t][name]
            if background is not None:
                ax.imshow(background, cmap="gray", extent=(0, MAP_SIDE, MAP_SIDE, 0))
            ax.imshow(cell["map"], cmap="jet", alpha=0.55 if background is not None else 1.0,
                      extent=(0, MAP_SIDE, MAP_SIDE, 0), vmin=0, vmax=max(float(cell["map"].max()), 1e-6))
            ax.set_title(f"{t}: {name}\n(n={cell['count']})", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def save_class_maps(averages: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str) -> None:
    """The class-average maps as arrays: ``TASK/CLASS`` -> map, ``TASK/CLASS/count`` -> count (NumPy .npz)."""
    arrays = {}
    for t, classes in averages.items():
        for name, cell in classes.items():
            arrays[f"{t}/{name}"] = np.asarray(cell["map"], np.float32)
            arrays[f"{t}/{name}/count"] = np.asarray(cell["count"])
    with open(path, "wb") as f:  # a file object: savez would add ".npz" to a temporary name
        np.savez_compressed(f, **arrays)


def dataset_maps(model: "MultiTaskNet", arrays: Sequence[np.ndarray], preprocess: Any,
                 labels: Mapping[str, np.ndarray], method: str = DEFAULT_METHOD, batch_size: int = 32
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Maps of many cached faces, each head explaining each face's *true* class (rows labelled -1 get
    an all-zero map), and the mean face they lie on (greyscale, network-input size).

    Args:
        model: the PyTorch network.
        arrays: cached face images (as :func:`facemt.engine.decode_images` returns them).
        preprocess: the model's :class:`facemt.transforms.PreprocessConfig`.
        labels: per head, N class indices.
    """
    import torch

    from facemt.transforms import build_transform

    transform = build_transform(preprocess, "none")
    device = next(model.parameters()).device
    heads = [t for t in labels if t in model.tasks]
    out: dict[str, list[np.ndarray]] = {t: [] for t in heads}
    mean = np.zeros((preprocess.image_size, preprocess.image_size), np.float64)
    for start in range(0, len(arrays), batch_size):
        chunk = arrays[start:start + batch_size]
        pictures = [transform.image(a) for a in chunk]
        mean += sum(p.astype(np.float64).mean(2) for p in pictures)
        batch = torch.from_numpy(np.stack([transform.array(a) for a in chunk])).to(device)
        y = {t: np.asarray(labels[t][start:start + batch_size]) for t in heads}
        maps = head_maps(model, batch, {t: np.maximum(v, 0) for t, v in y.items()}, method)
        for t in heads:
            out[t].append(np.where((y[t] >= 0)[:, None, None], maps[t], 0.0).astype(np.float32))
    return ({t: np.concatenate(v) if v else np.zeros((0, MAP_SIDE, MAP_SIDE), np.float32) for t, v in out.items()},
            (mean / max(1, len(arrays))).astype(np.float32))
