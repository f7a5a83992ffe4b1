"""Export a run to one ONNX or TorchScript graph with one named output per head."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from facemt.checkpoint import load_checkpoint
from facemt.engines import INT8_DEFAULTS, ONNX_FILES, quantize_int8
from facemt.model import Graph, write_onnx
from facemt.inference import calibration_batches, own_prior
from facemt.files import atomic_write, atomic_write_text, check_writable, sha256_file
from facemt.errors import FacemtError
from facemt.tasks import schema_dict

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4
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
    quantize: str | None = None,
    calibration: Sequence[str | os.PathLike] | None = None,
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
        quantize: ``int8``: static int8 ONNX graph (default file
            ``RUN/model.int8.onnx``, used by ``--engine onnx-int8``), calibrated
            on ``calibration`` images (framed by the run's crop policy) or, by
            default, on generated faces. Its parity is reported as top-1
            agreement with PyTorch, not checked against 1e-4.

    Returns:
        a description (path, outputs, max absolute difference) also written
        beside the graph as ``<file>.json``, with the preprocessing.

    Raises:
        FacemtError: unknown format, export failure, or parity above 1e-4.
    """
    if fmt not in FORMATS:
        raise FacemtError(f"unknown export format {fmt!r}: choose {', '.join(FORMATS)}")
    if quantize not in (None, "int8") or (quantize and (fmt != "onnx" or not probabilities)):
        raise FacemtError("quantize: only int8, of an ONNX graph with probability outputs")
    model, pre, config = load_checkpoint(run_dir)
    graph = Graph(model.cpu().eval(), probabilities).eval()
    default = ONNX_FILES["onnx-int8" if quantize else "onnx"] if fmt == "onnx" else "model.torchscript.pt"
    path = check_writable(Path(out) if out else Path(run_dir) / default, overwrite=True)  # said before any work
    torch.manual_seed(0)
    dummy = torch.randn(batch_size, 3, pre.image_size, pre.image_size)
    tasks = model.tasks
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "onnx" and quantize:
                def write(tmp: str) -> None:
                    batches = calibration_batches(pre, calibration)
                    float_graph = Path(tmp).with_suffix(".float.onnx")
                    try:
                        write_onnx(model, pre.image_size, float_graph, probabilities)
                        quantize_int8(float_graph, tmp, batches)
                    finally:
                        float_graph.unlink(missing_ok=True)
            elif fmt == "onnx":
                def write(tmp: str) -> None:
                    write_onnx(model, pre.image_size, tmp, probabilities)
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
        "weights_sha256": config["weights_sha256"], "quantized": quantize,
        # what the probabilities assume, and the counts that move them to the other prior (facemt predict --prior)
        "prior": own_prior(config), "class_counts": config.get("class_counts"),
    }
    if quantize:
        info["int8"] = dict(INT8_DEFAULTS)  # how it was quantized (see facemt.engines.quantize_int8)
    if check and quantize:
        with torch.no_grad():
            expected = [o.numpy() for o in graph(dummy)]
        got = _run_exported(fmt, path, dummy, tasks)
        info["top1_agreement_random_inputs"] = float(np.mean([np.mean(a.argmax(1) == b.argmax(1))
                                                              for a, b in zip(expected, got)]))
        info["max_abs_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(expected, got))
    elif check:
        with torch.no_grad():
            expected = [o.numpy() for o in graph(dummy)]
        got = _run_exported(fmt, path, dummy, tasks)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(expected, got))
        info["max_abs_diff"] = diff
        if not diff <= TOLERANCE:
            path.unlink(missing_ok=True)
            raise FacemtError(f"exported {fmt} graph differs from PyTorch by {diff:.2e} (> {TOLERANCE:g}); file removed")
    info["sha256"] = sha256_file(path)  # the graph's own bytes: a damaged file is never run
    atomic_write_text(path.with_name(path.name + ".json"), json.dumps(info, indent=2) + "\n")
    return {**info, "path": str(path)}
