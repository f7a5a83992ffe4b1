"""The graph of a run as one exportable module, and ONNX Runtime as an
inference engine: ``onnx`` (float32) and ``onnx-int8`` (static QDQ
quantization, calibrated on face images framed as the run frames them).

An engine model quacks like the PyTorch one where prediction needs it
(``tasks``, ``eval()``, ``probabilities(batch)``), so the predictor, evaluation
and export use either without knowing which.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from facemt.errors import FacemtError
from facemt.model import MultiTaskNet

ENGINES = ("torch", "onnx", "onnx-int8")
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
OPSET = 17
#: Quantized operators: the trunk's (convolutions, activations, residual adds, pooling) and the heads'
#: matrix products; softmax and the temperature division stay float, so probabilities still sum to 1.
QUANTIZED_OPS = ["Conv", "Clip", "Relu", "Add", "Mul", "GlobalAveragePool", "AveragePool", "MaxPool", "Flatten",
                 "Reshape", "Gemm", "MatMul", "Concat", "Sigmoid"]


class Graph(nn.Module):
    """The network with a fixed output order (the heads in schema order) and,
    by default, calibrated softmax probabilities instead of logits."""

    def __init__(self, model: MultiTaskNet, probabilities: bool = True) -> None:
        super().__init__()
        self.model, self.tasks, self.probabilities = model, model.tasks, probabilities

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.probabilities(image) if self.probabilities else self.model(image)
        return tuple(out[t] for t in self.tasks)


def write_onnx(model: MultiTaskNet, image_size: int, target: str | os.PathLike | io.BytesIO,
               probabilities: bool = True) -> None:
    """Export ``model`` as ONNX: input ``image`` (N x 3 x S x S), one output per head, any batch size."""
    graph = Graph(model.cpu().eval(), probabilities).eval()
    dummy = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    tasks = list(model.tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (dummy,), target, input_names=["image"], output_names=tasks,
                          dynamic_axes={"image": {0: "batch"}, **{t: {0: "batch"} for t in tasks}},
                          opset_version=OPSET, dynamo=False)


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise FacemtError("the ONNX engine needs onnxruntime: pip install 'facemt[onnx]'") from None
    return onnxruntime


def quantize_int8(onnx_file: str | os.PathLike, out: str | os.PathLike, batches: Iterable[np.ndarray],
                  activation_bits: int = 8) -> None:
    """Static int8 quantization (QDQ, per-channel int8 weights, unsigned
    ``activation_bits``-bit activations) calibrated on ``batches`` of network
    inputs (N x 3 x S x S float32). 16-bit activations agree better with float32
    but ran slower than float32 on the 2-core benchmark machine, as did dynamic
    quantization (see benchmarks/README.md); facemt's ``onnx-int8`` uses 8."""
    _ort()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_file), str(prepared))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            op_types_to_quantize=QUANTIZED_OPS,
                            weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt16 if activation_bits == 16 else QuantType.QUInt8)


class OnnxModel:
    """An ONNX graph of a run (probability outputs) run by ONNX Runtime on the CPU."""

    def __init__(self, graph: str | os.PathLike | bytes, tasks: Sequence[str], threads: int | None = None) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        source = graph if isinstance(graph, bytes) else str(graph)
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise FacemtError(f"ONNX Runtime cannot load the graph ({type(exc).__name__}: {exc})") from None
        self.tasks = tuple(tasks)
        self.source = None if isinstance(graph, bytes) else Path(graph)  # the file, or None: built in memory
        names = [o.name for o in self.session.get_outputs()]
        if sorted(names) != sorted(self.tasks):
            raise FacemtError(f"the ONNX graph's outputs {names} are not the run's heads {list(self.tasks)}")

    def eval(self) -> "OnnxModel":
        return self

    def probabilities(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.session.run(list(self.tasks), {"image": batch.detach().cpu().numpy().astype(np.float32)})
        return {t: torch.from_numpy(np.asarray(o)) for t, o in zip(self.tasks, outputs)}


def matching_graph(run_dir: Path, engine: str, weights_sha256: str) -> Path | None:
    """The run's exported graph for ``engine`` if ``facemt export`` wrote one
    from these very weights with probability outputs; else None."""
    path = run_dir / ONNX_FILES[engine]
    try:
        info = json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = path.is_file() and info.get("weights_sha256") == weights_sha256 and info.get("output_kind") == "probabilities"
    return path if ok else None
