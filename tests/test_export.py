import json

import numpy as np
import pytest
import torch

import facemt
from facemt import FacemtError
from facemt.cli import main
from facemt.export import export
from tolerance import assert_same_predictions


def test_torchscript_export_matches_pytorch(run_dir, tmp_path):
    info = export(run_dir, "torchscript", tmp_path / "m.pt")
    assert info["max_abs_diff"] <= 1e-4
    assert info["outputs"] == ["age_group", "gender", "expression"]
    module = torch.jit.load(str(tmp_path / "m.pt"))
    out = module(torch.randn(3, 3, 32, 32))
    assert [o.shape for o in out] == [(3, 3), (3, 2), (3, 6)]
    assert torch.allclose(out[2].sum(1), torch.ones(3), atol=1e-5)  # probabilities
    side = json.loads((tmp_path / "m.pt.json").read_text())
    assert side["preprocess"]["image_size"] == 32 and side["output_kind"] == "probabilities"
    # what the probabilities assume, and the training class counts that move them to the other prior
    assert side["prior"] == "training" and side["class_counts"] == json.loads((run_dir / "config.json").read_text())["class_counts"]


def test_onnx_export_matches_pytorch_with_named_outputs(run_dir, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(path), "--logits"]) == 0
    assert "max |difference|" in capsys.readouterr().out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["age_group", "gender", "expression"]
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    onnx_out = session.run(None, {"image": x})
    model = facemt.load(run_dir, device="cpu").model
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x))
    for name, got in zip(["age_group", "gender", "expression"], onnx_out):
        assert np.abs(got - torch_out[name].numpy()).max() <= 1e-4


def test_unknown_format(run_dir):
    with pytest.raises(FacemtError, match="unknown export format"):
        export(run_dir, "tflite")


def test_onnx_engine_predicts_like_pytorch(run_dir, faces_dir):
    pytest.importorskip("onnxruntime")
    files = sorted(faces_dir.glob("*.jpg"))[:12]
    torch_preds = facemt.load(run_dir, device="cpu").predict(files)
    engine = facemt.load(run_dir, engine="onnx")
    assert engine.model.source is None  # no exported file in the run: built at load
    assert_same_predictions(torch_preds, engine.predict(files), tol=1e-4)
    with pytest.raises(FacemtError, match="unknown engine"):
        facemt.load(run_dir, engine="tensorrt")


def test_int8_export_is_used_by_the_int8_engine(run_dir, faces_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["export", "--model", str(run), "--quantize", "int8", "--calibration", str(faces_dir)]) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    side = json.loads((run / "model.int8.onnx.json").read_text())
    assert side["quantized"] == "int8" and side["weights_sha256"] == json.loads((run / "config.json").read_text())["weights_sha256"]
    from facemt.engines import INT8_DEFAULTS

    assert side["int8"] == INT8_DEFAULTS  # the graph says how it was quantized
    predictor = facemt.load(run, engine="onnx-int8")
    assert predictor.model.source == run / "model.int8.onnx"
    p = predictor.predict(sorted(faces_dir.glob("*.jpg"))[0])
    assert set(p.labels) == {"age_group", "gender", "expression"}
    assert all(abs(sum(v.values()) - 1) < 1e-3 for v in p.probabilities.values())
    assert facemt.load(run, engine="onnx").model.source is None  # float graph not exported: built
    assert main(["predict", str(faces_dir), "--model", str(run), "--engine", "onnx-int8", "--out",
                 str(tmp_path / "p.csv")]) == 0
    capsys.readouterr()
    scores = {}
    for engine in ("torch", "onnx-int8"):  # evaluate measures what quantization costs on labelled data
        assert main(["evaluate", "--model", str(run), "--data", str(faces_dir), "--engine", engine, "--json"]) == 0
        scores[engine] = json.loads(capsys.readouterr().out)
    assert scores["torch"].keys() == scores["onnx-int8"].keys()
    with pytest.raises(FacemtError, match="only int8"):
        export(run, "torchscript", quantize="int8")


def _weight_scales(path) -> dict[str, tuple[int, ...]]:
    """Per Conv/Gemm node of a QDQ graph: the shape of its weight's int8 scale, () when the weight is float."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    made_by = {o: n for n in graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = made_by.get(node.input[1])
            out[node.name] = tuple(inits[dq.input[1]].shape) or (1,) if dq is not None and dq.op_type == "DequantizeLinear" else ()
    return out


def test_int8_options_choose_scales_and_float_layers(run_dir, faces_dir, tmp_path):
    pytest.importorskip("onnx")
    from facemt.engines import end_nodes, quantize_int8
    from facemt.inference import calibration_batches
    from facemt.model import write_onnx

    predictor = facemt.load(run_dir, device="cpu", engine="torch")
    graph = tmp_path / "m.onnx"
    write_onnx(predictor.model, predictor.preprocess.image_size, graph)
    batches = calibration_batches(predictor.preprocess, sorted(faces_dir.glob("*.jpg"))[:8], batch_size=4)
    scales = {}
    plain = {"per_channel": True, "float_ends": False, "method": "minmax", "float_stride": 0}
    for name, options in {"channel": {}, "tensor": {"per_channel": False}, "ends": {"float_ends": True},
                          "early": {"float_stride": 4}}.items():
        quantize_int8(graph, tmp_path / f"{name}.onnx", batches, **{**plain, **options})
        scales[name] = _weight_scales(tmp_path / f"{name}.onnx")
    ends = set(end_nodes(graph))
    assert ends and any("Gemm" in n for n in ends) and any("Conv" in n for n in ends)
    assert all(s for s in scales["channel"].values())  # every layer quantized ...
    assert any(s[0] > 1 for s in scales["channel"].values())  # ... with one scale per output channel
    assert all(s in ((), (1,)) for s in scales["tensor"].values()) and any(scales["tensor"].values())
    assert {n for n, s in scales["ends"].items() if not s} == ends  # the first layer and the heads stay float
    early = {n for n, s in scales["early"].items() if not s}
    assert early and early < set(scales["early"]) and all(n not in early for n in ends if "Gemm" in n)
    with pytest.raises(FacemtError, match="calibration method"):
        quantize_int8(graph, tmp_path / "x.onnx", batches, method="kl")
