"""Per-head explanations: maps in the aligned frame, that change with the weights, follow --target, and
average into class maps in the cross-validation report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import facemt
from facemt import FacemtError
from facemt.cli import main
from facemt.explain import MAP_SIDE, class_average_maps, head_maps
from facemt.transforms import build_transform

from conftest import TINY_FIT


@pytest.fixture(scope="module")
def photo(faces_dir):
    return sorted(faces_dir.glob("*_f_*.jpg"))[0]


def test_maps_have_the_documented_shape_and_frame(run_dir, photo):
    e = facemt.load(run_dir, device="cpu").explain(photo)
    assert set(e.maps) == {"age_group", "gender", "expression"} and e.targets == e.labels
    for m in e.maps.values():
        assert m.shape == (MAP_SIDE, MAP_SIDE) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
    assert e.face_image.shape == (32, 32, 3) and e.to_photo.shape == (2, 3)
    # the map's frame is the aligned face: the point where alignment puts the eyes maps back onto the photo's eyes
    pre = facemt.load(run_dir, device="cpu").preprocess
    eyes_in_map = np.array([(0.5 * pre.image_size + 0.5) * MAP_SIDE / pre.image_size - 0.5,
                            (pre.eye_y * pre.image_size + 0.5) * MAP_SIDE / pre.image_size - 0.5, 1.0])
    found = facemt.load(run_dir, device="cpu").predict(photo)
    (lx, ly), (rx, ry) = found.landmarks[:2]
    np.testing.assert_allclose(e.to_photo @ eyes_in_map, [(lx + rx) / 2, (ly + ry) / 2], atol=2.0)
    as_dict = e.to_dict()
    assert np.asarray(as_dict["expression"]["map"]).shape == (MAP_SIDE, MAP_SIDE) and as_dict["map_side"] == MAP_SIDE


def test_maps_change_when_the_weights_change(run_dir, photo):
    """Model randomisation (Adebayo et al. 2018) as a unit test: new head weights, other maps."""
    predictor = facemt.load(run_dir, device="cpu", engine="torch")
    model = predictor.model
    x = build_transform(predictor.preprocess, "none")(predictor.explain(photo).face_image)[None]
    x = torch.nn.functional.interpolate(x, size=64)  # stride-16 maps need more than 2x2 cells to differ
    targets = {t: [0] for t in model.tasks}
    trained = head_maps(model, x, targets, "gradcam-8")
    torch.manual_seed(1)
    for head in model.heads.values():
        head.reset_parameters()
    shuffled = head_maps(model, x, targets, "gradcam-8")
    for t in model.tasks:
        assert not np.allclose(trained[t], shuffled[t], atol=1e-3), t


def test_target_picks_the_class(run_dir, photo):
    model = facemt.load(run_dir, device="cpu")
    plain = model.explain(photo)
    other = next(c for c in facemt.TASKS["expression"].classes if c != plain.labels["expression"])
    chosen = model.explain(photo, targets={"expression": other}, method="integrated-gradients")
    assert chosen.targets["expression"] == other and chosen.labels == plain.labels
    assert chosen.targets["gender"] == plain.labels["gender"]  # heads not named keep their predicted class
    assert not np.allclose(chosen.maps["expression"], model.explain(photo, method="integrated-gradients")
                           .maps["expression"], atol=1e-3)

def test_a_bad_target_is_one_line(run_dir, photo, capsys):
    assert main(["explain", str(photo), "--model", str(run_dir), "--target", "anger"]) == 2
    assert "TASK=CLASS" in capsys.readouterr().err


def test_explain_command_writes_one_png_per_face_and_json(run_dir, photo, tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["explain", str(photo), "--model", str(run_dir), "--out", str(out), "--json",
                 "--target", "expression=anger"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (out / f"{photo.stem}.face0.png").read_bytes()[:4] == b"\x89PNG"
    assert row["expression"]["target"] == "anger" and len(row["to_photo"]) == 2
    assert main(["explain", str(photo), "--model", str(run_dir), "--out", str(out)]) == 2  # no silent overwrite
    assert main(["explain", str(photo), "--model", str(run_dir), "--target", "expression=joy"]) == 2


def test_explanations_need_pytorch_and_say_so(photo, capsys):
    assert main(["explain", str(photo), "--engine", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "need PyTorch" in err and "\n" not in err.strip()
    with pytest.raises(FacemtError, match="need PyTorch"):
        facemt.load(engine="onnx").explain(photo)
    assert facemt.load().explain(photo).maps  # auto: the graph predicts, PyTorch explains


def test_class_average_maps_count_and_average_per_true_class():
    maps = {"gender": np.stack([np.full((MAP_SIDE, MAP_SIDE), v, np.float32) for v in (0.2, 0.4, 1.0, 0.0)])}
    averages = class_average_maps(maps, {"gender": np.array([0, 0, 1, -1])})
    assert averages["gender"]["male"]["count"] == 2 and averages["gender"]["female"]["count"] == 1
    np.testing.assert_allclose(averages["gender"]["male"]["map"], 0.3)
    np.testing.assert_allclose(averages["gender"]["female"]["map"], 1.0)


def test_cv_and_evaluate_write_class_maps(faces_dir, run_dir, tmp_path):
    out = tmp_path / "cv"
    assert main(["cv", "--data", str(faces_dir), "--out", str(out), "--folds", "2", "--no-baselines",
                 "--no-fit-model", *TINY_FIT, "--epochs", "1", "--explain"]) == 0
    assert (out / "class_maps.png").read_bytes()[:4] == b"\x89PNG"
    arrays = np.load(out / "class_maps.npz")
    assert arrays["expression/anger"].shape == (MAP_SIDE, MAP_SIDE) and int(arrays["expression/anger/count"]) == 12
    assert "![class-average maps](class_maps.png)" in (out / "report.md").read_text()
    assert main(["evaluate", "--model", str(run_dir), "--data", str(faces_dir), "--explain", str(tmp_path / "ev"),
                 "--json"]) == 0
    assert int(np.load(tmp_path / "ev" / "class_maps.npz")["gender/female/count"]) == 36


def test_explain_benchmark_runs_end_to_end(faces_dir, run_dir, tmp_path):
    """benchmarks/explain.py on a generated data root: JAFFE-named faces and a studio manifest."""
    import importlib.util
    import shutil
    from pathlib import Path

    import pandas as pd

    root = tmp_path / "data"
    (root / "jaffe").mkdir(parents=True)
    codes = dict(zip(facemt.TASKS["expression"].classes, ("AN", "DI", "FE", "HA", "NE", "SA")))
    rows = []
    for i, f in enumerate(sorted(faces_dir.glob("*.jpg"))[:24]):
        person, _, gender, expression, _ = f.stem.split("_")
        code = codes[facemt.TASKS["expression"].classes["adfhns".index(expression)]]
        shutil.copy(f, root / "jaffe" / f"K{'ABCDEF'[int(person) - 1]}.{code}1.{i}.tiff")
        rows.append({"path": str(f), "gender": "male" if gender == "m" else "female", "expression": "",
                     "person": person})
    (root / "nimstim").mkdir()
    pd.DataFrame(rows).to_csv(root / "nimstim" / "labels.csv", index=False)
    spec = importlib.util.spec_from_file_location("explain_bench", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "explain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = tmp_path / "RESULTS.md"
    assert script.main(["--data-root", str(root), "--model", str(run_dir), "--faces", "4", "--methods",
                        "gradcam-8,gradcam-16", "--csv", str(tmp_path / "e.csv"), "--results", str(results),
                        "--figure", str(tmp_path / "maps.png")]) == 0
    frame = pd.read_csv(tmp_path / "e.csv")
    assert len(frame) == 6 and frame["rank_corr_heads"].between(-1, 1).all()
    assert (tmp_path / "maps.png").read_bytes()[:4] == b"\x89PNG" and "### Explanation sanity checks" in results.read_text()
