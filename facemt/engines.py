"""ONNX Runtime as an inference engine: ``onnx`` (float32) and ``onnx-int8``
(static QDQ quantization, calibrated on face images framed as the run frames
them). Nothing here imports PyTorch: a model folder with a matching graph
predicts without it (``--engine auto``). The graph itself is written by
:mod:`facemt.export`.

An engine model quacks like the PyTorch one where prediction needs it
(``tasks``, ``eval()``, ``probabilities(batch)``; batches and results are
NumPy arrays here), so the predictor and evaluation use either.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from facemt.errors import FacemtError
from facemt.files import sha256_file

#: ``auto``: ONNX Runtime when the model folder holds a graph exported from its weights (the built-in model
#: ships one), else PyTorch.
ENGINES = ("auto", "torch", "onnx", "onnx-int8")
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
#: Quantized operators: the trunk's (convolutions, activations, residual adds, pooling) and the heads'
#: matrix products; softmax and the temperature division stay float, so probabilities still sum to 1.
QUANTIZED_OPS = ["Conv", "Clip", "Relu", "Add", "Mul", "GlobalAveragePool", "AveragePool", "MaxPool", "Flatten",
                 "Reshape", "Gemm", "MatMul", "Concat", "Sigmoid"]


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise FacemtError("the ONNX engine needs onnxruntime: pip install 'facemt[onnx]'") from None
    return onnxruntime


#: How facemt quantizes by default (``export --quantize int8``, ``--engine onnx-int8`` without an exported
#: graph), chosen by ``benchmarks/int8.py`` on real faces: per-channel weight scales, activation ranges
#: from percentile calibration, and the layers at output stride 8 or finer (the stem and first blocks:
#: 2.6 % of the built-in model's weights, but much of its arithmetic) left in float32. Plain min-max int8 of every layer changed 4-5 % of
#: top-1 answers on some heads; this keeps at least 98 % unchanged on every head and test set measured.
INT8_DEFAULTS = {"per_channel": True, "float_ends": False, "method": "percentile", "float_stride": 8}


def end_nodes(onnx_file: str | os.PathLike) -> list[str]:
    """Names of the graph's first and last layers: the operators that read the input image, and the
    heads' matrix products (``Gemm``/``MatMul``); what follows them (temperature, softmax) is never
    quantized."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    names = [n.name for n in graph.node if inputs.intersection(n.input)]
    return names + [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]


def early_nodes(onnx_file: str | os.PathLike, stride: int) -> list[str]:
    """Names of the operators whose output lies at ``stride`` or finer: the input side divided by the
    output's side is at most ``stride`` (the stem and first blocks of a convolutional trunk)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_file), load_external_data=False))
    graph = model.graph
    side = graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    if not side:  # a symbolic input size: strides cannot be told
        raise FacemtError(f"{onnx_file}: the graph's input size is not fixed; float_stride needs it")
    sides = {}
    for value in list(graph.value_info) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[-1].dim_value:
            sides[value.name] = dims[-1].dim_value
    return [n.name for n in graph.node if n.output and n.output[0] in sides and side / sides[n.output[0]] <= stride]


def quantize_int8(onnx_file: str | os.PathLike, out: str | os.PathLike, batches: Iterable[np.ndarray],
                  activation_bits: int = 8, per_channel: bool = INT8_DEFAULTS["per_channel"],
                  float_ends: bool = INT8_DEFAULTS["float_ends"], method: str = INT8_DEFAULTS["method"],
                  float_stride: int = INT8_DEFAULTS["float_stride"], keep_float: Sequence[str] = ()) -> None:
    """Static int8 quantization (QDQ, int8 weights, unsigned ``activation_bits``-bit
    activations) calibrated on ``batches`` of network inputs (N x 3 x S x S float32).

    Args:
        per_channel: one weight scale per output channel (else one per tensor).
        float_ends: keep the first convolution and the heads in float32.
        method: activation ranges from ``minmax``, ``entropy`` or ``percentile`` calibration.
        float_stride: keep the layers at output stride ``float_stride`` or finer in float32 (0: none).
        keep_float: further operators (by node name) left in float32.

    16-bit activations agree better with float32 but ran slower than float32 on the
    2-core benchmark machine, as did dynamic quantization (see benchmarks/README.md).
    """
    _ort()
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise FacemtError(f"calibration method {method!r}: use one of {', '.join(methods)}")

    images = np.concatenate([np.asarray(b, dtype=np.float32) for b in batches])
    # equal batches: onnxruntime's histogram calibrators stack every batch's outputs into one array
    size = max(d for d in range(1, min(32, len(images)) + 1) if len(images) % d == 0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(images), size))

        def get_next(self):
            start = next(self.starts, None)
            return None if start is None else {"image": np.ascontiguousarray(images[start:start + size])}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_file), str(prepared))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            op_types_to_quantize=QUANTIZED_OPS, calibrate_method=methods[method],
                            nodes_to_exclude=((end_nodes(prepared) if float_ends else [])
                                              + (early_nodes(prepared, float_stride) if float_stride else [])
                                              + list(keep_float)),
                            weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt16 if activation_bits == 16 else QuantType.QUInt8)


class OnnxModel:
    """An ONNX graph of a run (probability outputs) run by ONNX Runtime on the CPU."""

    def __init__(self, graph: str | os.PathLike | bytes, tasks: Sequence[str], threads: int | None = None) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        # as many threads as PyTorch would use (OMP_NUM_THREADS, else ONNX Runtime's default: one per core)
        options.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
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

    def probabilities(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Per head, N x classes probabilities of a N x 3 x S x S float32 batch."""
        outputs = self.session.run(list(self.tasks), {"image": np.ascontiguousarray(batch, dtype=np.float32)})
        return {t: np.asarray(o) for t, o in zip(self.tasks, outputs)}


def matching_graph(run_dir: Path, engine: str, weights_sha256: str) -> Path | None:
    """The run's exported graph for ``engine`` if ``facemt export`` wrote one
    from these very weights with probability outputs; else None.

    Raises:
        FacemtError: the graph's bytes do not match the SHA-256 its sidecar records.
    """
    path = run_dir / ONNX_FILES[engine]
    sidecar = path.with_name(path.name + ".json")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = path.is_file() and info.get("weights_sha256") == weights_sha256 and info.get("output_kind") == "probabilities"
    if ok and "sha256" in info and sha256_file(path) != info["sha256"]:
        raise FacemtError(f"{path}: SHA-256 does not match {sidecar.name} (file corrupt or replaced); "
                          "export it again or delete both")
    return path if ok else None
