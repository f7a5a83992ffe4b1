import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import facemt
from facemt import FacemtError
from facemt.checkpoint import CONFIG, WEIGHTS, load_checkpoint, save_checkpoint
from facemt.model import create_model
from tolerance import assert_same_predictions


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model, pre = create_model("resnet18", ("gender", "expression"), image_size=32)
    model.eval()
    save_checkpoint(tmp_path / "run", model, "resnet18", pre, {"train": {"epochs": 1}})
    return tmp_path / "run", model


def test_round_trip_gives_identical_outputs(saved):
    run, model = saved
    loaded, pre, config = load_checkpoint(run)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert a.keys() == b.keys() == {"gender", "expression"}
    for k in a:
        assert torch.equal(a[k], b[k])
    assert config["tasks"]["expression"][0] == "anger"
    assert config["format_version"] == 1 and config["facemt_version"] == facemt.__version__
    assert pre.image_size == 32


def test_no_temporary_files_left(saved):
    run, _ = saved
    assert sorted(p.name for p in run.iterdir()) == [CONFIG, WEIGHTS]


def test_edited_weights_are_rejected(saved):
    run, _ = saved
    data = bytearray((run / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (run / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(FacemtError, match="SHA-256"):
        load_checkpoint(run)


def test_truncated_weights_with_matching_hash_are_rejected(saved):
    run, _ = saved
    (run / WEIGHTS).write_bytes((run / WEIGHTS).read_bytes()[:1000])
    cfg = json.loads((run / CONFIG).read_text())
    from facemt.files import sha256_file

    cfg["weights_sha256"] = sha256_file(run / WEIGHTS)
    (run / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(FacemtError, match="safetensors"):
        load_checkpoint(run)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(format_version=99), "format version 99"),
        (lambda c: c.update(tasks={"gender": ["male", "female"], "age_group": ["young", "middle", "old"]}), "do not fit"),
        (lambda c: c.pop("preprocess"), "missing field 'preprocess'"),
    ],
)
def test_bad_config_is_named(saved, edit, match):
    run, _ = saved
    cfg = json.loads((run / CONFIG).read_text())
    edit(cfg)
    (run / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(FacemtError, match=match):
        load_checkpoint(run)


def test_corrupt_json_and_missing_folder(saved, tmp_path):
    run, _ = saved
    (run / CONFIG).write_text("{not json")
    with pytest.raises(FacemtError, match="corrupt JSON"):
        load_checkpoint(run)
    with pytest.raises(FacemtError, match="no such run folder"):
        load_checkpoint(tmp_path / "nothing")


def test_python_api_predicts_all_heads(run_dir, faces_dir):
    model = facemt.load(run_dir, device="cpu")
    path = sorted(faces_dir.glob("*.jpg"))[0]
    result = model.predict(path)
    assert result.age_group in ("young", "middle", "old")
    assert result.gender in ("male", "female")
    assert result.expression in facemt.TASKS["expression"].classes
    for task, probs in result.probabilities.items():
        assert abs(sum(probs.values()) - 1) < 1e-5
    from PIL import Image

    pil = Image.open(path)
    many = model.predict([path, pil, np.asarray(pil.convert("RGB"))])
    assert_same_predictions([dataclasses.replace(m, source=None) for m in many],
                            [dataclasses.replace(result, source=None)] * 3)  # one batch of three vs one of one
    assert many[0].source == str(path) and many[1].source is None


def test_files_get_normal_permissions(saved):
    run, _ = saved
    mask = os.umask(0)
    os.umask(mask)
    for name in (WEIGHTS, CONFIG):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~mask
