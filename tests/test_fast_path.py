"""The default prediction path: the built-in model's shipped ONNX graph on ONNX Runtime, with no PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import matplotlib.cbook
import pytest

import facemt
from facemt import FacemtError
from facemt.checkpoint import base_dir, read_config
from facemt.engines import OnnxModel
from facemt.synth import generate
from tolerance import assert_same_predictions

PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # public domain


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big_faces")
    generate(folder, persons=2, size=(160, 200), seed=3)
    return sorted(folder.glob("*.jpg"))


def test_the_shipped_graph_matches_the_shipped_weights(faces):
    side = json.loads((base_dir() / "model.onnx.json").read_text())
    assert side["weights_sha256"] == read_config(base_dir())["weights_sha256"]
    assert side["output_kind"] == "probabilities" and side["preprocess"] == read_config(base_dir())["preprocess"]
    fast, torch_engine = facemt.load(), facemt.load(engine="torch")
    assert fast.engine == "onnx" and isinstance(fast.model, OnnxModel) and torch_engine.engine == "torch"
    assert_same_predictions(torch_engine.predict([PHOTO, *faces]), fast.predict([PHOTO, *faces]), tol=1e-4)


def test_the_shipped_int8_graph_is_opt_in_and_agrees_with_float32(faces):
    """The int8 graph (benchmarks/int8.py --ship) is of the shipped weights, is what --engine onnx-int8 runs
    (not rebuilt at start-up), stays out of ``auto``, and mostly gives float32's answers."""
    import numpy as np

    from facemt.engines import INT8_DEFAULTS

    side = json.loads((base_dir() / "model.int8.onnx.json").read_text())
    assert side["weights_sha256"] == read_config(base_dir())["weights_sha256"] and side["quantized"] == "int8"
    assert {k: side["int8"][k] for k in INT8_DEFAULTS} == INT8_DEFAULTS  # shipped as facemt quantizes
    int8, fast = facemt.load(engine="onnx-int8"), facemt.load()
    assert int8.model.source == base_dir() / "model.int8.onnx" and fast.model.source == base_dir() / "model.onnx"
    a, b = fast.predict([PHOTO, *faces]), int8.predict([PHOTO, *faces])
    assert a[0].labels == b[0].labels
    for task in fast.tasks:
        pa = np.array([list(p.probabilities[task].values()) for p in a])
        pb = np.array([list(p.probabilities[task].values()) for p in b])
        assert np.abs(pa - pb).max() < 0.25 and (pa.argmax(1) == pb.argmax(1)).mean() >= 0.9
        assert not np.allclose(pa, pb, atol=1e-4)  # it is a different, quantized network


def test_both_engines_agree_on_every_option(faces):
    for options in ({"tta": True}, {"prior": "training"}, {"batch_size": 5}):
        a = list(facemt.load(engine="torch", **options).predict_files(faces))
        b = list(facemt.load(**options).predict_files(faces))
        assert_same_predictions(a, b, tol=1e-4)


def test_predicting_with_the_shipped_graph_never_imports_pytorch(tmp_path):
    code = ("import sys, json, facemt\n"
            f"r = facemt.load().predict({str(PHOTO)!r})\n"
            "from facemt.cli import main\n"
            f"main(['predict', {str(PHOTO)!r}, '--out', {str(tmp_path / 'p.csv')!r}])\n"
            "print(json.dumps({'labels': r.labels, 'loaded': sorted(m for m in ('torch', 'timm', 'albumentations')"
            " if m in sys.modules)}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["loaded"] == [] and set(result["labels"]) == {"age_group", "gender", "expression"}
    assert (tmp_path / "p.csv").read_text().count("\n") == 2


def test_auto_uses_pytorch_without_a_matching_graph(run_dir, tmp_path):
    assert facemt.load(run_dir).engine == "torch"  # a run without an exported graph
    copy = tmp_path / "base"
    shutil.copytree(base_dir(), copy)
    side = json.loads((copy / "model.onnx.json").read_text())
    (copy / "model.onnx.json").write_text(json.dumps({**side, "weights_sha256": "0" * 64}))
    assert facemt.load(copy).engine == "torch"  # a graph of other weights is never used
    (copy / "model.onnx.json").write_text(json.dumps(side))
    assert facemt.load(copy).engine == "onnx"
    with pytest.raises(FacemtError, match="runs on the CPU"):
        facemt.load(copy, engine="onnx", device="cuda")


def test_a_damaged_graph_is_refused(tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(base_dir(), copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-200] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(FacemtError, match="SHA-256"):
        facemt.load(copy)


def test_startup_benchmark_runs_end_to_end(faces, tmp_path):
    import importlib.util
    from pathlib import Path

    import pandas as pd

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "startup.py"
    spec = importlib.util.spec_from_file_location("startup_bench", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = tmp_path / "RESULTS.md"
    assert script.main(["--folder", str(faces[0].parent), "--limit", "6", "--repeats", "1",
                        "--csv", str(tmp_path / "s.csv"), "--results", str(results)]) == 0
    frame = pd.read_csv(tmp_path / "s.csv")
    engines = {"auto", "torch", "onnx", "onnx-int8"}
    # three measures per engine, and the floor under the PyTorch engine (importing torch and timm)
    assert set(frame["engine"]) == engines and len(frame) == 3 * len(engines) + 1 and (frame["median"] > 0).all()
    assert frame["measure"].str.contains("import torch, timm").sum() == 1
    assert "| facemt predict PHOTO, cold, wall (s) |" in results.read_text()
