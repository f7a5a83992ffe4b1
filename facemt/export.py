"""Export a run to one ONNX or TorchScript graph with one named output per head."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facemt.checkpoint import load_checkpoint
from facemt.files import atomic_write, atomic_write_text
from facemt.errors import FacemtError
from facemt.tasks import schema_dict

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4


class _Graph(nn.Module):
    """The network with a fixed output order (the heads in schema order) and,
    by default, softmax probabilities instead of logits."""

    def __init__(self, model: nn.Module, probabilities: bool) -> None:
        super().__init__()
        self.model, self.tasks, self.probabilities = model, model.tasks, probabilities

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.probabilities(image) if self.probabilities else self.model(image)
        return tuple(out[t] for t in self.tasks)


def _run_exported(fmt: str, path: Path, batch: torch.Tensor, tasks: tuple[str, ...]) -> list[np.ndarray]:
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return [o.numpy() for o in module(batch)]
    try:
        import onnxruntime as ort
    except ImportError:
        raise FacemtError("the ONNX parity check needs onnxruntime: pip install 'facemt[onnx]' (or pass --no-check)") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(list(tasks), {"image": batch.numpy()})
    return list(outputs)


def export(
    run_dir: str | os.PathLike,
    fmt: str = "onnx",
    out: str | os.PathLike | None = None,
    probabilities: bool = True,
    check: bool = True,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Write the model as a single graph: input ``image`` (N x 3 x S x S, normalised
    as in the run's preprocessing), one output per head named after the task.

    Args:
        run_dir: a run folder.
        fmt: ``onnx`` or ``torchscript``.
        out: output file (default ``RUN/model.onnx`` or ``RUN/model.torchscript.pt``).
        probabilities: outputs are softmax probabilities (default) or raw logits.
        check: compare the exported graph with PyTorch on a random batch.
        batch_size: size of that batch.

    Returns:
        a description (path, outputs, max absolute difference) also written
        beside the graph as ``<file>.json``, with the preprocessing.

    Raises:
        FacemtError: unknown format, export failure, or parity above 1e-4.
    """
    if fmt not in FORMATS:
        raise FacemtError(f"unknown export format {fmt!r}: choose {', '.join(FORMATS)}")
    model, pre, config = load_checkpoint(run_dir)
    graph = _Graph(model.cpu().eval(), probabilities).eval()
    path = Path(out) if out else Path(run_dir) / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    torch.manual_seed(0)
    dummy = torch.randn(batch_size, 3, pre.image_size, pre.image_size)
    tasks = model.tasks
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                def write(tmp: str) -> None:
                    torch.onnx.export(
                        graph, (dummy,), tmp, input_names=["image"], output_names=list(tasks),
                        dynamic_axes={"image": {0: "batch"}, **{t: {0: "batch"} for t in tasks}},
                        opset_version=17, dynamo=False,
                    )
            else:
                traced = torch.jit.trace(graph, dummy)

                def write(tmp: str) -> None:
                    torch.jit.save(traced, tmp)
            atomic_write(path, write)
    except FacemtError:
        raise
    except Exception as exc:
        raise FacemtError(f"exporting {run_dir} to {fmt} failed: {type(exc).__name__}: {exc}") from None
    info: dict[str, Any] = {
        "file": path.name, "format": fmt, "input": "image", "input_shape": ["batch", 3, pre.image_size, pre.image_size],
        "outputs": list(tasks), "output_kind": "probabilities" if probabilities else "logits",
        "tasks": schema_dict(tasks), "preprocess": pre.to_dict(), "backbone": config["backbone"],
        "weights_sha256": config["weights_sha256"],
    }
    if check:
        with torch.no_grad():
            expected = [o.numpy() for o in graph(dummy)]
        got = _run_exported(fmt, path, dummy, tasks)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(expected, got))
        info["max_abs_diff"] = diff
        if not diff <= TOLERANCE:
            path.unlink(missing_ok=True)
            raise FacemtError(f"exported {fmt} graph differs from PyTorch by {diff:.2e} (> {TOLERANCE:g}); file removed")
    atomic_write_text(path.with_name(path.name + ".json"), json.dumps(info, indent=2) + "\n")
    return {**info, "path": str(path)}
